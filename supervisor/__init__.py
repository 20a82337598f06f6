"""corral: serve WebAssembly code that is allowed to fail, behind ZeroMQ.

The package's rooms say which process runs their code:

  corral            (supervisor/)         the arbiter: config, broker, pool, circuit, control, CLI
  corral.wire       (supervisor/wire/)    both sides: client dialects, worker protocol, frame I/O, logs
  corral.workers    (workers/)            the worker process: wasmtime host, guest ABI, outcomes
  corral.client     (supervisor/client/)  client processes: the native client, the load generator

The worker imports nothing of the arbiter's (tests/test_layout.py).
"""
