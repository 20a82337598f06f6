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
//! | panics, unwind   | 2           | the panic message    | 500           |
//! | panics, abort    | -           | `unreachable` trap   | 502           |
//!
//! With `-C panic=unwind` (nightly, `-Zbuild-std`, Wasm exceptions) the
//! handler runs inside `catch_unwind`, so a panic fails only its request and
//! the instance keeps its memory. With `-C panic=abort` (stable rustc's only
//! choice for wasm32-unknown-unknown) a panic executes `unreachable`: the
//! instance is poisoned and corral never enters it again.
//!
//! State that must survive from one request to the next lives in a
//! `thread_local!` or a `static` (see `examples/kv.rs`): an instance runs
//! one request at a time, and keeps its linear memory between requests.

use std::cell::RefCell;

pub mod kv;

pub const STATUS_OK: u8 = 0;
pub const STATUS_ERROR: u8 = 1;
pub const STATUS_PANICKED: u8 = 2;

/// A request handler: the request bytes in, a body or an error message out.
pub type Handler = fn(&[u8]) -> Result<Vec<u8>, String>;

struct Buffers {
    /// What `corral_alloc` handed out; taken (and freed) by `corral_handle`.
    request: Vec<u8>,
    /// The last response: the host reads it after `corral_handle` returns,
    /// so it lives until the next call into the instance.
    response: Vec<u8>,
}

thread_local! {
    static BUFFERS: RefCell<Buffers> = RefCell::new(Buffers {
        request: Vec::new(),
        response: Vec::new(),
    });
}

/// `corral_alloc(len)`: a buffer for the next request, 0 when out of memory.
#[doc(hidden)]
pub fn alloc(len: i32) -> i32 {
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
/// return `(resp_ptr << 32) | resp_len`.
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
        run(handler, &request)
    } else {
        (
            STATUS_ERROR,
            b"corral_handle: the request is not in the buffer corral_alloc returned".to_vec(),
        )
    };
    drop(request);
    respond(status, body)
}

/// Call the handler and turn its outcome into a status byte and a body.
#[cfg(panic = "unwind")]
pub fn run(handler: Handler, request: &[u8]) -> (u8, Vec<u8>) {
    match std::panic::catch_unwind(|| handler(request)) {
        Ok(outcome) => split(outcome),
        Err(payload) => (STATUS_PANICKED, panic_message(&*payload).into_bytes()),
    }
}

/// Call the handler and turn its outcome into a status byte and a body.
/// With panic=abort there is nothing to catch: a panic traps.
#[cfg(not(panic = "unwind"))]
pub fn run(handler: Handler, request: &[u8]) -> (u8, Vec<u8>) {
    split(handler(request))
}

fn split(outcome: Result<Vec<u8>, String>) -> (u8, Vec<u8>) {
    match outcome {
        Ok(body) => (STATUS_OK, body),
        Err(message) => (STATUS_ERROR, message.into_bytes()),
    }
}

#[cfg(panic = "unwind")]
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_string()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "panicked with a non-string payload".to_string()
    }
}

fn respond(status: u8, mut body: Vec<u8>) -> i64 {
    body.insert(0, status);
    let packed = ((body.as_ptr() as usize as u64) << 32) | body.len() as u64;
    // Moving the Vec into the static keeps its heap buffer where it is.
    BUFFERS.with(|buffers| buffers.borrow_mut().response = body);
    packed as i64
}

/// Export `handler` (a `fn(&[u8]) -> Result<Vec<u8>, String>`) as a
/// corral/1 guest; `init = f` also exports `f` (a `fn()`) as `corral_init`.
#[macro_export]
macro_rules! export_handler {
    ($handler:path) => {
        #[no_mangle]
        pub extern "C" fn corral_alloc(len: i32) -> i32 {
            $crate::alloc(len)
        }

        #[no_mangle]
        pub extern "C" fn corral_handle(ptr: i32, len: i32) -> i64 {
            $crate::handle(ptr, len, $handler)
        }
    };
    ($handler:path, init = $init:path) => {
        $crate::export_handler!($handler);

        #[no_mangle]
        pub extern "C" fn corral_init() {
            $init()
        }
    };
}

// Run natively with `rustc --edition 2021 --test src/lib.rs`: the host
// target unwinds, so this also checks the catch_unwind path that a
// wasm32 panic=unwind build takes.
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

    fn explode_static(_: &[u8]) -> Result<Vec<u8>, String> {
        panic!("static message")
    }

    #[test]
    fn ok_and_error() {
        assert_eq!(run(echo, b"hi"), (STATUS_OK, b"hi".to_vec()));
        assert_eq!(run(refuse, b""), (STATUS_ERROR, b"no thanks".to_vec()));
    }

    #[cfg(panic = "unwind")]
    #[test]
    fn a_panic_becomes_status_2_with_its_message() {
        assert_eq!(run(explode, b"abc"), (STATUS_PANICKED, b"exploded on 3 bytes".to_vec()));
        assert_eq!(run(explode_static, b""), (STATUS_PANICKED, b"static message".to_vec()));
        // and the next request is served as usual
        assert_eq!(run(echo, b"after"), (STATUS_OK, b"after".to_vec()));
    }
}
