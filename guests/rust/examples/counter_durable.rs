//! counter_durable: counter.rs with its count in durable state (corral_guest::kv).
//!
//! Serve it with `instances = "keyed"`: each key is its own scope, so its own
//! count, stored under the state key "count". The count survives whatever
//! throws the instance away (a trap, a killed worker, a restart):
//!
//!   get      answers the count unchanged
//!   panic    adds one, then panics: the add is not kept (500 or 502)
//!   anything else (e.g. "" or "incr")  adds one, answers the new count
//!
//! A failed kv call answers 422 with its reason.

use corral_guest::kv;

fn handle(request: &[u8]) -> Result<Vec<u8>, String> {
    let stored = kv::get(b"count").map_err(|e| e.to_string())?;
    let mut count = match stored {
        Some(bytes) if bytes.len() == 8 => {
            let mut le = [0u8; 8];
            le.copy_from_slice(&bytes);
            u64::from_le_bytes(le)
        }
        Some(_) => return Err("the stored count is not 8 bytes".to_string()),
        None => 0,
    };
    if request != b"get" {
        count += 1;
        kv::put(b"count", &count.to_le_bytes()).map_err(|e| e.to_string())?;
    }
    if request == b"panic" {
        panic!("counter_durable: asked to panic at count {}", count);
    }
    Ok(count.to_string().into_bytes())
}

corral_guest::export_handler!(handle);
