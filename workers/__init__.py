"""The worker process: hosts Wasm guests with wasmtime and serves the broker."""
