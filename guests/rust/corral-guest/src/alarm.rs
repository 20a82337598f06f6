//! Alarms (docs/alarms.md): a scope asks to be woken at a time.
//!
//! ```ignore
//! use corral_guest::{alarm, kv};
//! fn handle(_request: &[u8]) -> Result<Vec<u8>, String> {
//!     alarm::set(alarm::now_ms() + 60_000).map_err(|e| e.to_string())?;  // in a minute
//!     Ok(b"armed".to_vec())
//! }
//! fn wake(retries: u32) -> Result<(), String> {
//!     kv::delete(b"session").map_err(|e| e.to_string())?;
//!     Ok(())
//! }
//! corral_guest::export_handler!(handle);
//! corral_guest::export_alarm!(wake);
//! ```
//!
//! One alarm per scope (the key of a keyed app, else the service), written
//! with the request's other writes: kept only when it answers 200 or 422.
//! When it is due, corral calls the handler exported by `export_alarm!` as a
//! request of that scope: `Ok(())` is done (its writes are kept and the alarm
//! deleted, unless it set another); `Err`, a panic or a trap failed it
//! (nothing it wrote is kept; it runs again after 1 s, 2 s, ... 32 s with
//! `retries` 1..6, then it is dropped). At least once: make it idempotent.

use crate::kv::Error;

#[link(wasm_import_module = "corral")]
extern "C" {
    fn alarm_set(at_ms: i64) -> i32;
    fn alarm_get() -> i64;
    fn alarm_delete() -> i32;
}

#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    fn clock_time_get(clock: u32, precision: u64, time: *mut u64) -> u16;
}

/// Wake this scope at `at_ms` (Unix epoch milliseconds), replacing its alarm;
/// a time already past is due at once.
pub fn set(at_ms: u64) -> Result<(), Error> {
    if at_ms > i64::MAX as u64 {
        return Err(Error::BadKey);
    }
    match unsafe { alarm_set(at_ms as i64) } {
        0 => Ok(()),
        code => Err(Error::from_code(code as i64)),
    }
}

/// This scope's alarm time, if it has one.
pub fn get() -> Result<Option<u64>, Error> {
    match unsafe { alarm_get() } {
        -1 => Ok(None),
        at if at >= 0 => Ok(Some(at as u64)),
        code => Err(Error::from_code(code)),
    }
}

/// Delete this scope's alarm: true if there was one.
pub fn delete() -> Result<bool, Error> {
    match unsafe { alarm_delete() } {
        1 => Ok(true),
        0 => Ok(false),
        code => Err(Error::from_code(code as i64)),
    }
}

/// The wall clock in Unix epoch milliseconds (WASI's realtime clock, which
/// corral provides to every guest that imports it), for "N ms from now".
pub fn now_ms() -> u64 {
    let mut time = 0u64;
    unsafe { clock_time_get(0, 1_000_000, &mut time) };
    time / 1_000_000
}

/// An alarm handler: `retries` is 0 on the first run, n on the nth retry.
pub type AlarmHandler = fn(u32) -> Result<(), String>;

#[doc(hidden)]
pub fn run(retries: i32, handler: AlarmHandler) -> i32 {
    crate::install_panic_hook();
    match handler(retries.max(0) as u32) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

/// Export `handler` (a `fn(u32) -> Result<(), String>`) as `corral_alarm`.
/// `extern "C-unwind"`: a panic leaves as a Wasm exception (a failed run,
/// 500) in a panic=unwind build, as a trap (502) with panic=abort.
#[macro_export]
macro_rules! export_alarm {
    ($handler:path) => {
        #[no_mangle]
        pub extern "C-unwind" fn corral_alarm(retries: i32) -> i32 {
            $crate::alarm::run(retries, $handler)
        }
    };
}
