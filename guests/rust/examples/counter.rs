//! counter: the fault model's test guest, a count kept in linear memory.
//!
//! It answers like guests/counter.wat, with a Rust panic in place of the
//! hand-written throw and trap:
//!
//!   get      answers the count unchanged
//!   panic    adds one, then panics
//!   anything else (e.g. "" or "incr")  adds one, answers the new count
//!
//! Counts are ASCII decimal. What a panic does depends on the build
//! (guests/build.py builds both; config/languages.toml serves both):
//! - panic=abort (rust_counter.wasm): the panic executes `unreachable`, a
//!   trap: 502, the instance is never entered again and its count is gone;
//!   a fresh instance starts at 0.
//! - panic=unwind (rust_counter_unwind.wasm): the panic is a Wasm exception
//!   that leaves corral_handle: 500 with the panic message, and the instance
//!   keeps its count, which includes the increment made before the panic.

use std::cell::Cell;

thread_local! {
    static COUNT: Cell<u64> = Cell::new(0);
}

fn handle(request: &[u8]) -> Result<Vec<u8>, String> {
    let count = COUNT.with(|count| {
        if request != b"get" {
            count.set(count.get() + 1);
        }
        count.get()
    });
    if request == b"panic" {
        panic!("counter: asked to panic at count {}", count);
    }
    Ok(count.to_string().into_bytes())
}

corral_guest::export_handler!(handle);
