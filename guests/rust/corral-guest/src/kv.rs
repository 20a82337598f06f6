//! Durable state (docs/state.md): the host functions of module `corral`, typed.
//!
//! ```ignore
//! use corral_guest::kv;
//! fn handle(_request: &[u8]) -> Result<Vec<u8>, String> {
//!     let count = match kv::get(b"count").map_err(|e| e.to_string())? {
//!         Some(bytes) if bytes.len() == 8 => u64::from_le_bytes(bytes.try_into().unwrap()),
//!         _ => 0,
//!     } + 1;
//!     kv::put(b"count", &count.to_le_bytes()).map_err(|e| e.to_string())?;
//!     Ok(count.to_string().into_bytes())
//! }
//! ```
//!
//! A keyed app's entries belong to the instance's key, another app's to the
//! service. Reads see committed data plus this request's own writes; the
//! writes commit when the handler returns (`Ok` or `Err`: 200 or 422), and
//! are dropped when it panics or the instance traps. A guest that never
//! calls these functions imports none of them.

use std::fmt;

#[link(wasm_import_module = "corral")]
extern "C" {
    fn kv_get(key_ptr: *const u8, key_len: u32, buf_ptr: *mut u8, buf_cap: u32) -> i64;
    fn kv_put(key_ptr: *const u8, key_len: u32, val_ptr: *const u8, val_len: u32) -> i32;
    fn kv_delete(key_ptr: *const u8, key_len: u32) -> i32;
    fn kv_list(prefix_ptr: *const u8, prefix_len: u32, after_ptr: *const u8, after_len: u32,
               buf_ptr: *mut u8, buf_cap: u32) -> i64;
}

/// What a call can fail with (the host's negative return codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// -2: the key is empty or longer than `max_state_key_bytes`.
    BadKey,
    /// -3: the value is larger than `max_state_value_kib`.
    TooLarge,
    /// -4: the write would take the scope over `max_state_mib`.
    OverQuota,
    /// -5: the next key alone does not fit in the buffer (`list_page`).
    NoRoom,
    /// -6: the storage cannot be used now.
    Unavailable,
    /// A code this crate does not know.
    Other(i64),
}

impl Error {
    pub(crate) fn from_code(code: i64) -> Error {
        match code {
            -2 => Error::BadKey,
            -3 => Error::TooLarge,
            -4 => Error::OverQuota,
            -5 => Error::NoRoom,
            -6 => Error::Unavailable,
            other => Error::Other(other),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadKey => write!(f, "bad key (empty or over max_state_key_bytes)"),
            Error::TooLarge => write!(f, "value over max_state_value_kib"),
            Error::OverQuota => write!(f, "over the scope's quota (max_state_mib)"),
            Error::NoRoom => write!(f, "the next key does not fit in the buffer"),
            Error::Unavailable => write!(f, "storage unavailable"),
            Error::Other(code) => write!(f, "kv error {}", code),
        }
    }
}

impl std::error::Error for Error {}

/// The value stored at `key`, or None.
pub fn get(key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
    let mut buffer: Vec<u8> = Vec::with_capacity(256);
    loop {
        let cap = buffer.capacity();
        let n = unsafe { kv_get(key.as_ptr(), key.len() as u32, buffer.as_mut_ptr(), cap as u32) };
        if n == -1 {
            return Ok(None);
        }
        if n < 0 {
            return Err(Error::from_code(n));
        }
        let n = n as usize;
        if n <= cap {
            unsafe { buffer.set_len(n) };
            return Ok(Some(buffer));
        }
        // Too small: nothing was copied; ask again with room for it.
        buffer = Vec::with_capacity(n);
    }
}

/// Store `value` at `key` (visible to this request now, durable once it answers).
pub fn put(key: &[u8], value: &[u8]) -> Result<(), Error> {
    let code = unsafe { kv_put(key.as_ptr(), key.len() as u32, value.as_ptr(), value.len() as u32) };
    if code == 0 { Ok(()) } else { Err(Error::from_code(code as i64)) }
}

/// Remove `key`: true if it was there.
pub fn delete(key: &[u8]) -> Result<bool, Error> {
    match unsafe { kv_delete(key.as_ptr(), key.len() as u32) } {
        1 => Ok(true),
        0 => Ok(false),
        code => Err(Error::from_code(code as i64)),
    }
}

/// One page of the keys that start with `prefix` and sort after `after` (bytewise),
/// ascending, as many as fit in `cap` bytes (4 per key plus the key): empty when none is left.
pub fn list_page(prefix: &[u8], after: &[u8], cap: usize) -> Result<Vec<Vec<u8>>, Error> {
    let mut buffer: Vec<u8> = Vec::with_capacity(cap);
    let n = unsafe {
        kv_list(prefix.as_ptr(), prefix.len() as u32, after.as_ptr(), after.len() as u32,
                buffer.as_mut_ptr(), cap as u32)
    };
    if n < 0 {
        return Err(Error::from_code(n));
    }
    unsafe { buffer.set_len(n as usize) };
    let mut keys = Vec::new();
    let mut at = 0;
    while at + 4 <= buffer.len() {
        let len = u32::from_le_bytes([buffer[at], buffer[at + 1], buffer[at + 2], buffer[at + 3]]) as usize;
        keys.push(buffer[at + 4..at + 4 + len].to_vec());
        at += 4 + len;
    }
    Ok(keys)
}

/// Every key that starts with `prefix`, ascending.
pub fn list(prefix: &[u8]) -> Result<Vec<Vec<u8>>, Error> {
    let mut keys: Vec<Vec<u8>> = Vec::new();
    let mut cap = 4096;
    loop {
        let after = keys.last().cloned().unwrap_or_default();
        match list_page(prefix, &after, cap) {
            Ok(page) if page.is_empty() => return Ok(keys),
            Ok(page) => keys.extend(page),
            Err(Error::NoRoom) => cap *= 2,
            Err(other) => return Err(other),
        }
    }
}
