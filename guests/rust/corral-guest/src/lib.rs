//! Write a corral/1 guest in Rust: one handler, one macro.
//!
//! ```ignore
//! fn handle(request: &[u8]) -> Result<Vec<u8>, String> {
//!     Ok(request.to_vec())
//! }
//! corral_guest::export_handler!(handle);
//! // or, with a hook that corral calls once after instantiation:
//! // corral_guest::export_handler!(handle, init = setup);
//! ```
//!
//! The macro exports `corral_alloc`, `corral_handle` (and `corral_init`);
//! rustc exports `memory` itself for a `cdylib`. What the handler returns
//! becomes the response's status byte and body:
//!
//! | handler          | status byte | body                 | corral status |
//! |------------------|-------------|----------------------|---------------|
//! | `Ok(body)`       | 0           | `body`               | 200           |
//! | `Err(message)`   | 1           | `message` (UTF-8)    | 422           |
//! | panics, unwind   | - (exception) | the panic message  | 500           |
//! | panics, abort    | -           | `unreachable` trap   | 502           |
//!
//! The crate builds either way; one build switch, rustc's `-C panic=`,
//! chooses what a panic does (guests/build.py builds both: `rust_NAME.wasm`
//! with abort, `rust_NAME_unwind.wasm` with unwind):
//!
//! - **panic=unwind**: the panic is a real Wasm exception. It unwinds the
//!   handler (running `Drop`s) and leaves `corral_handle`; corral resets the
//!   shadow stack (`__stack_pointer`), calls `corral_exception_message`,
//!   which rethrows the exception inside `catch_unwind` (freeing it and
//!   clearing `thread::panicking()`) and hands back the panic message, and
//!   answers 500 with it. The instance keeps its memory: a keyed guest keeps
//!   its state, including what the handler changed before it panicked.
//!   Choose it when an instance holds state worth keeping (keyed apps) and
//!   the guest's invariants survive a panic (the same judgement as any
//!   `catch_unwind`: a panic in the middle of updating state leaves it half
//!   updated). It needs std rebuilt with `-Zbuild-std=std,panic_unwind`,
//!   `-C target-feature=+exception-handling` and the exnref encoding.
//! - **panic=abort**: a panic executes `unreachable`, a trap: 502, the
//!   instance is never entered again and its state is gone. Smaller code
//!   (no landing pads) and nothing half-updated can be observed. Choose it
//!   for stateless guests, or where a panic means the state cannot be
//!   trusted.
//!
//! Either build exports `__stack_pointer` (`-C link-arg=--export=__stack_pointer`)
//! and the unwind build `__cpp_exception` (`-C link-arg=--export=__cpp_exception`):
//! corral needs both to recover from an escaped panic.
//!
//! State that must survive from one request to the next lives in a
//! `thread_local!` or a `static` (see `examples/kv.rs`): an instance runs
//! one request at a time, and keeps its linear memory between requests.

#![cfg_attr(all(target_family = "wasm", panic = "unwind"), feature(link_llvm_intrinsics), allow(internal_features))]

use std::cell::RefCell;

pub mod alarm;
pub mod kv;

pub const STATUS_OK: u8 = 0;
pub const STATUS_ERROR: u8 = 1;
pub const STATUS_PANICKED: u8 = 2;

/// A request handler: the request bytes in, a body or an error message out.
pub type Handler = fn(&[u8]) -> Result<Vec<u8>, String>;

struct Buffers {
    /// What `corral_alloc` handed out; taken (and freed) by `corral_handle`.
    request: Vec<u8>,
    /// The last response (or exception message): the host reads it after
    /// the call returns, so it lives until the next call into the instance.
    response: Vec<u8>,
}

thread_local! {
    static BUFFERS: RefCell<Buffers> = RefCell::new(Buffers {
        request: Vec::new(),
        response: Vec::new(),
    });
    /// The last panic as the hook saw it (location and message): the
    /// payload alone that catch_unwind returns has no location.
    static LAST_PANIC: RefCell<Option<String>> = RefCell::new(None);
}

/// `corral_alloc(len)`: a buffer for the next request, 0 when out of memory.
#[doc(hidden)]
pub fn alloc(len: i32) -> i32 {
    install_panic_hook();
    if len < 0 {
        return 0;
    }
    BUFFERS.with(|buffers| {
        let mut buffers = buffers.borrow_mut();
        // The host has read the previous response by now; free it first so
        // that a large request does not have to fit beside a large response.
        buffers.response = Vec::new();
        // At least one byte, so that even an empty request gets a real heap
        // address rather than Vec's dangling placeholder.
        let mut request = Vec::new();
        if request.try_reserve_exact(len.max(1) as usize).is_err() {
            return 0;
        }
        let ptr = request.as_ptr() as usize as i32;
        buffers.request = request;
        ptr
    })
}

/// `corral_handle(ptr, len)`: run the handler on the request bytes and
/// return `(resp_ptr << 32) | resp_len`. A panic leaves through here as a
/// Wasm exception (panic=unwind) or a trap (panic=abort).
#[doc(hidden)]
pub fn handle(ptr: i32, len: i32, handler: Handler) -> i64 {
    let mut request = BUFFERS.with(|buffers| std::mem::take(&mut buffers.borrow_mut().request));
    // alloc always reserves at least one byte: capacity 0 means no alloc.
    let from_alloc = len >= 0
        && request.capacity() > 0
        && ptr == request.as_ptr() as usize as i32
        && len as usize <= request.capacity();
    let (status, body) = if from_alloc {
        // The host wrote these bytes into the buffer's spare capacity.
        unsafe { request.set_len(len as usize) };
        split(handler(&request))
    } else {
        (
            STATUS_ERROR,
            b"corral_handle: the request is not in the buffer corral_alloc returned".to_vec(),
        )
    };
    drop(request);
    respond(status, body)
}

fn split(outcome: Result<Vec<u8>, String>) -> (u8, Vec<u8>) {
    match outcome {
        Ok(body) => (STATUS_OK, body),
        Err(message) => (STATUS_ERROR, message.into_bytes()),
    }
}

fn respond(status: u8, mut body: Vec<u8>) -> i64 {
    body.insert(0, status);
    keep(body)
}

/// Keep `bytes` until the next call into the instance and return their
/// `(ptr << 32) | len`.
fn keep(bytes: Vec<u8>) -> i64 {
    let packed = ((bytes.as_ptr() as usize as u64) << 32) | bytes.len() as u64;
    // Moving the Vec into the static keeps its heap buffer where it is.
    BUFFERS.with(|buffers| buffers.borrow_mut().response = bytes);
    packed as i64
}

/// The text of a panic as corral reports it: `panicked at FILE:LINE:COL: MESSAGE`.
pub fn panic_text(info: &std::panic::PanicHookInfo) -> String {
    let message = payload_text(info.payload());
    match info.location() {
        Some(location) => format!("panicked at {}: {}", location, message),
        None => format!("panicked: {}", message),
    }
}

fn payload_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_string()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "a panic with a non-string payload".to_string()
    }
}

/// Record each panic's text for `corral_exception_message`, instead of
/// printing it to a stderr that wasm32-unknown-unknown does not have.
pub fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let text = panic_text(info);
            LAST_PANIC.with(|last| *last.borrow_mut() = Some(text));
        }))
    });
}

/// The recorded text of the panic being caught, or what its payload says.
fn take_panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    LAST_PANIC
        .with(|last| last.borrow_mut().take())
        .unwrap_or_else(|| payload_text(payload))
}

/// `corral_exception_message(exn)`: called by corral after a panic escaped
/// an export, with the exception's payload (an `_Unwind_Exception*`). It
/// throws the exception again inside `catch_unwind`, which frees it and
/// lowers the panic count (so `thread::panicking()` is false and the next
/// panic is not a double panic), and returns the panic's text.
#[cfg(all(target_family = "wasm", panic = "unwind"))]
#[doc(hidden)]
pub fn exception_message(exception: i32) -> i64 {
    unsafe extern "C-unwind" {
        // What std's own `_Unwind_RaiseException` lowers to on wasm: tag 0
        // is LLVM's `__cpp_exception`, the one Rust panics are thrown with.
        #[link_name = "llvm.wasm.throw"]
        fn wasm_throw(tag: i32, ptr: *mut u8) -> !;
    }
    let caught = std::panic::catch_unwind(|| unsafe { wasm_throw(0, exception as usize as *mut u8) });
    let text = match caught {
        Err(payload) => take_panic_text(&*payload),
        Ok(()) => String::new(),
    };
    keep(text.into_bytes())
}

/// Export `handler` (a `fn(&[u8]) -> Result<Vec<u8>, String>`) as a
/// corral/1 guest; `init = f` also exports `f` (a `fn()`) as `corral_init`.
///
/// The exports are `extern "C-unwind"`: with `extern "C"` a panic that
/// reaches the export boundary aborts, even in a panic=unwind build.
#[macro_export]
macro_rules! export_handler {
    ($handler:path) => {
        #[no_mangle]
        pub extern "C-unwind" fn corral_alloc(len: i32) -> i32 {
            $crate::alloc(len)
        }

        #[no_mangle]
        pub extern "C-unwind" fn corral_handle(ptr: i32, len: i32) -> i64 {
            $crate::handle(ptr, len, $handler)
        }

        #[cfg(all(target_family = "wasm", panic = "unwind"))]
        #[no_mangle]
        pub extern "C-unwind" fn corral_exception_message(exception: i32) -> i64 {
            $crate::exception_message(exception)
        }
    };
    ($handler:path, init = $init:path) => {
        $crate::export_handler!($handler);

        #[no_mangle]
        pub extern "C-unwind" fn corral_init() {
            $crate::install_panic_hook();
            $init()
        }
    };
}

// Run natively with `rustc --edition 2021 --test src/lib.rs`: the host
// target unwinds, so the hook and catch_unwind run as in a wasm32
// panic=unwind build (only the rethrow itself is wasm-only).
#[cfg(test)]
mod tests {
    use super::*;

    fn echo(request: &[u8]) -> Result<Vec<u8>, String> {
        Ok(request.to_vec())
    }

    fn refuse(_: &[u8]) -> Result<Vec<u8>, String> {
        Err("no thanks".to_string())
    }

    fn explode(request: &[u8]) -> Result<Vec<u8>, String> {
        panic!("exploded on {} bytes", request.len())
    }

    #[test]
    fn ok_and_error() {
        assert_eq!(split(echo(b"hi")), (STATUS_OK, b"hi".to_vec()));
        assert_eq!(split(refuse(b"")), (STATUS_ERROR, b"no thanks".to_vec()));
    }

    #[test]
    fn the_hook_records_location_and_message_and_panicking_is_cleared() {
        install_panic_hook();
        let caught = std::panic::catch_unwind(|| explode(b"abc"));
        let payload = caught.unwrap_err();
        let text = take_panic_text(&*payload);
        assert!(text.starts_with("panicked at ") && text.contains("lib.rs:"), "{}", text);
        assert!(text.ends_with(": exploded on 3 bytes"), "{}", text);
        assert!(!std::thread::panicking());
        // taken: a payload without a recorded panic falls back to its text
        assert_eq!(take_panic_text(&"plain"), "plain");
    }
}
