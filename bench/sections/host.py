"""host: corral's call path (Guest.run, CorralEntry.handle_request) against
wasmtime-py's Func.__call__ + Memory.read/write doing the same corral/1 request by hand."""

from __future__ import annotations

from bench import report as tables
from bench.measure import timed
from bench.systems import Context, make_host


def run(opts, ctx: Context, report: tables.Report) -> None:
    import wasmtime
    from corral.workers.outcome import Outcome
    body = opts.body.encode()
    host = make_host(ctx.root / "cache")
    guest = host.guests[b"echo"]
    timeout_ms = 1000
    entry = guest.instances[None]

    # The same corral/1 request done by hand with wasmtime-py's public API, on the
    # same engine (epoch interruption on: the deadline is set before each request,
    # as corral sets it).
    store = wasmtime.Store(host.engine)
    store.set_limits(memory_size=64 * 1024 * 1024)
    instance = guest.pre.instantiate(store)
    exports = instance.exports(store)
    alloc, handle, memory = exports["corral_alloc"], exports["corral_handle"], exports["memory"]
    ticks = timeout_ms // 5 + 1

    def by_hand() -> tuple[int, bytes]:
        store.set_epoch_deadline(ticks)
        size = len(body)
        at = alloc(store, size)
        memory.write(store, body, at)
        packed = handle(store, at, size) & 0xFFFFFFFFFFFFFFFF
        start, length = packed >> 32, packed & 0xFFFFFFFF
        response = memory.read(store, start, start + length)
        return response[0], bytes(response[1:])

    def corral_run() -> Outcome:
        return guest.run(None, body, timeout_ms)

    def corral_entry() -> Outcome:
        return entry.handle_request(body, timeout_ms)

    def one_func_call() -> int:   # the deadline is set once, before its loop
        return alloc(store, len(body))

    assert by_hand() == (0, body), by_hand()
    assert corral_run().body == body and corral_entry().body == body
    n, reps = opts.host_iterations, opts.reps
    for fn in (by_hand, corral_run, corral_entry):   # warm up
        timed(fn, min(n, 1000), 1)
    rows = [("corral       Guest.run: instance lookup, handle_request, outcome", timed(corral_run, n, reps)),
            ("corral       CorralEntry.handle_request", timed(corral_entry, n, reps)),
            ("wasmtime-py  Func.__call__ + Memory.read/write, by hand", timed(by_hand, n, reps))]
    store.set_epoch_deadline(1 << 40)
    timed(one_func_call, min(n, 1000), 1)
    rows.append(("wasmtime-py  one Func.__call__ (corral_alloc), for scale", timed(one_func_call, n, reps)))
    tables.host(report, opts, body, rows)
