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
//!   silence N  from now on, the count goes back to 0 after N ms without an
//!              add (an alarm, corral_guest::alarm; 0: no new alarms)
//!
//! A failed kv call answers 422 with its reason.

use corral_guest::{alarm, kv};

fn number(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.trim().parse().ok()
}

/// Arm the alarm at now + the key's silence period, if it has one.
fn arm() -> Result<(), String> {
    let silence = kv::get(b"silence").map_err(|e| e.to_string())?.and_then(|b| number(&b)).unwrap_or(0);
    if silence > 0 {
        alarm::set(alarm::now_ms() + silence).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The alarm: a period of silence is over, the count starts again from 0.
fn reset(_retries: u32) -> Result<(), String> {
    kv::delete(b"count").map_err(|e| e.to_string())?;
    Ok(())
}

fn handle(request: &[u8]) -> Result<Vec<u8>, String> {
    if let Some(period) = request.strip_prefix(b"silence ") {
        let period = number(period).ok_or("silence takes a number of milliseconds")?;
        kv::put(b"silence", period.to_string().as_bytes()).map_err(|e| e.to_string())?;
        arm()?;
        return Ok(b"0".to_vec());
    }
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
        arm()?;
    }
    if request == b"panic" {
        panic!("counter_durable: asked to panic at count {}", count);
    }
    Ok(count.to_string().into_bytes())
}

corral_guest::export_handler!(handle);
corral_guest::export_alarm!(reset);
