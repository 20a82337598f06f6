//! echo: answers every request with its own bytes, unchanged.
//!
//! Built by guests/build.py into build/guests/rust_echo.wasm.

fn echo(request: &[u8]) -> Result<Vec<u8>, String> {
    Ok(request.to_vec())
}

corral_guest::export_handler!(echo);
