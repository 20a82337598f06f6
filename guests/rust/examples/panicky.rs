//! panicky: a counter with one request for each way a Rust guest can fail,
//! for the fault-model and chaos tests.
//!
//!   panic          panics (panic=abort build: `unreachable` trap, 502;
//!                  panic=unwind build: an escaped exception, 500 with the message)
//!   error          returns Err: status byte 1, 422, the instance is fine
//!   alloc <n>      allocates n more bytes and keeps them; when the allocator
//!                  gets no memory (memory.grow returned -1 at the app's
//!                  max_memory_mib) Rust aborts: `unreachable` trap, 502,
//!                  in either build
//!   try-alloc <n>  the same, but a failed allocation is handled: 422
//!   stack          recurses until the stack is gone: a trap, 502
//!   loop           spins forever: 504 at the app's timeout_ms
//!   panicking      answers std::thread::panicking() ("true"/"false"): after a
//!                  panic that unwound it must be false again, or every Drop
//!                  that asks (a MutexGuard poisoning its Mutex) goes wrong
//!   anything else  adds one to the count and answers it (ASCII decimal), so
//!                  a fresh instance answers 1 to its first request
//!
//! `alloc` and `try-alloc` answer the bytes kept so far.
//!
//! Built by guests/build.py into build/guests/rust_panicky.wasm.

use std::cell::{Cell, RefCell};

thread_local! {
    static COUNT: Cell<u64> = Cell::new(0);
    static KEPT: RefCell<Vec<Vec<u8>>> = RefCell::new(Vec::new());
}

fn handle(request: &[u8]) -> Result<Vec<u8>, String> {
    let (command, arg) = match request.iter().position(|&b| b == b' ') {
        Some(at) => (&request[..at], &request[at + 1..]),
        None => (request, &[][..]),
    };
    match command {
        b"panic" => panic!("panicky: asked to panic"),
        b"error" => Err("panicky: asked for an error".to_string()),
        b"alloc" => {
            let mut block = Vec::with_capacity(size(arg)?);
            block.push(1u8); // touch it, so the allocation cannot be elided
            keep(block)
        }
        b"try-alloc" => {
            let mut block = Vec::new();
            block
                .try_reserve_exact(size(arg)?)
                .map_err(|_| "panicky: out of memory".to_string())?;
            block.push(1u8);
            keep(block)
        }
        b"stack" => Ok(recurse(0).to_string().into_bytes()),
        b"loop" => spin(),
        b"panicking" => Ok(std::thread::panicking().to_string().into_bytes()),
        _ => {
            let count = COUNT.with(|count| {
                count.set(count.get() + 1);
                count.get()
            });
            Ok(count.to_string().into_bytes())
        }
    }
}

fn size(arg: &[u8]) -> Result<usize, String> {
    std::str::from_utf8(arg)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| "panicky: expected a byte count".to_string())
}

fn keep(block: Vec<u8>) -> Result<Vec<u8>, String> {
    KEPT.with(|kept| {
        let mut kept = kept.borrow_mut();
        kept.push(block);
        let total: usize = kept.iter().map(|b| b.capacity()).sum();
        Ok(total.to_string().into_bytes())
    })
}

// Each frame keeps a buffer on the shadow stack (in linear memory) and the
// volatile accesses stop the optimiser from folding the recursion away.
#[allow(unconditional_recursion)]
fn recurse(depth: u32) -> u32 {
    let mut frame = [0u8; 256];
    let slot = depth as usize % frame.len();
    unsafe { std::ptr::write_volatile(&mut frame[slot], depth as u8) };
    recurse(depth + 1) + unsafe { std::ptr::read_volatile(&frame[slot]) } as u32
}

fn spin() -> ! {
    let mut n = 0u64;
    loop {
        n = unsafe { std::ptr::read_volatile(&n) }.wrapping_add(1);
    }
}

corral_guest::export_handler!(handle);
