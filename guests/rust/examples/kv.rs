//! kv: a key-value store that lives in the instance's linear memory.
//!
//! Serve it with `instances = "keyed"`: each key (the native meta `key`)
//! gets an instance of its own, so a store of its own. Requests:
//!
//!   set <name> <value>   store value (everything after the second space,
//!                        any bytes, may be empty); answers ""
//!   get <name>           answers the value; a missing name is an error (422)
//!   del <name>           removes the name, answers the old value; missing: 422
//!   keys                 answers the names, one per line, sorted
//!   stats                answers "keys=<n> inits=<m>"; m counts corral_init
//!                        calls, so it is 1 in any instance corral set up
//!
//! Names are bytes up to the first space. Any other request is an error (422).
//!
//! Built by guests/build.py into build/guests/rust_kv.wasm.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

thread_local! {
    // Statics survive from one request to the next: an instance keeps its
    // memory until it is dropped (or poisoned by a trap).
    static STORE: RefCell<BTreeMap<Vec<u8>, Vec<u8>>> = RefCell::new(BTreeMap::new());
    static INITS: Cell<u32> = Cell::new(0);
}

fn init() {
    INITS.with(|n| n.set(n.get() + 1));
}

fn handle(request: &[u8]) -> Result<Vec<u8>, String> {
    let (command, rest) = split_word(request);
    STORE.with(|store| {
        let mut store = store.borrow_mut();
        match command {
            b"set" => {
                let (name, value) = split_word(rest);
                store.insert(name.to_vec(), value.to_vec());
                Ok(Vec::new())
            }
            b"get" => store.get(rest).cloned().ok_or_else(|| missing(rest)),
            b"del" => store.remove(rest).ok_or_else(|| missing(rest)),
            b"keys" => Ok(store.keys().cloned().collect::<Vec<_>>().join(&b'\n')),
            b"stats" => {
                let inits = INITS.with(|n| n.get());
                Ok(format!("keys={} inits={}", store.len(), inits).into_bytes())
            }
            _ => Err(format!("unknown command {:?}", String::from_utf8_lossy(command))),
        }
    })
}

/// Split at the first space: (word, rest after the space).
fn split_word(bytes: &[u8]) -> (&[u8], &[u8]) {
    match bytes.iter().position(|&b| b == b' ') {
        Some(at) => (&bytes[..at], &bytes[at + 1..]),
        None => (bytes, &[]),
    }
}

fn missing(name: &[u8]) -> String {
    format!("no such key: {}", String::from_utf8_lossy(name))
}

corral_guest::export_handler!(handle, init = init);
