"""security: CURVE's cost. The same load against corral on loopback tcp with and without
CURVE (interleaved rounds), the broker's drain with and without reading each message's
User-Id, and the module check in its child process against the same check in-process."""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

from corral.client import loadgen
from corral.config import to_toml

from bench import report as tables
from bench.measure import check
from bench.systems import ECHO, Context, Corral, free_port


def run(opts, ctx: Context, report: tables.Report) -> None:
    import tomllib

    import zmq.auth

    from corral.client import CurveKeys
    procs = ctx.procs
    keys_dir = procs.root / "keys"
    (keys_dir / "clients").mkdir(parents=True)
    zmq.auth.create_certificates(keys_dir, "server")
    zmq.auth.create_certificates(keys_dir, "bench")
    shutil.copy(keys_dir / "bench.key", keys_dir / "clients" / "bench.key")
    keys = CurveKeys.load(str(keys_dir / "bench.key_secret"), str(keys_dir / "server.key"))
    tcp = lambda name: f"tcp://127.0.0.1:{free_port()}"   # CURVE covers tcp only: both on tcp
    plain = Corral(procs, tcp, opts, name="tcp-plain", label="c  corral, tcp")
    curve = Corral(procs, tcp, opts, name="tcp-curve", label="c  corral, tcp + CURVE")
    doc = tomllib.loads(curve.config.read_text())
    doc["security"] = {"curve_secret_key": str(keys_dir / "server.key_secret"),
                       "client_keys": str(keys_dir / "clients")}
    curve.config.write_text(to_toml(doc))
    runs: dict[str, list[loadgen.Result]] = {plain.label: [], curve.label: []}
    try:
        plain.start()
        curve.start()
        for _ in range(opts.rounds):
            for system, with_keys in ((plain, None), (curve, keys)):
                result = loadgen.run(system.endpoint, b"echo", opts.body.encode(), requests=opts.requests,
                                     concurrency=opts.concurrency, clients=opts.clients, progress=opts.progress,
                                     keys=with_keys)
                check(result, system.label)
                runs[system.label].append(result)
    finally:
        plain.stop()
        curve.stop()
    tables.security(report, opts, runs, plain.label, curve.label, _frames_impl(),
                    _measure_drains(keys_dir, opts), _measure_check(procs.root, opts))


def _frames_impl() -> str:
    from corral.wire import frames
    return frames.IMPLEMENTATION


def _measure_drains(keys_dir: Path, opts) -> dict[str, float]:
    """drain() against drain_with_user() on the same CURVE connection, per message."""
    import zmq.auth
    from corral.broker import BATCH
    from corral.wire.frames import _drain_with_user, drain, drain_with_user
    from zmq.auth.thread import ThreadAuthenticator
    context = zmq.Context()
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys_dir / "clients"))
    try:
        server_public, server_secret = zmq.auth.load_certificate(keys_dir / "server.key_secret")
        public, secret = zmq.auth.load_certificate(keys_dir / "bench.key_secret")
        router = context.socket(zmq.ROUTER)
        router.curve_server, router.curve_secretkey = True, server_secret
        router.setsockopt(zmq.RCVHWM, 0)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer = context.socket(zmq.DEALER)
        dealer.curve_secretkey, dealer.curve_publickey, dealer.curve_serverkey = secret, public, server_public
        dealer.setsockopt(zmq.SNDHWM, 0)
        dealer.connect(f"tcp://127.0.0.1:{port}")
        count = 2000 if opts.quick else 20000
        results: dict[str, list[float]] = {"drain": [], "drain_with_user": [], "pyzmq_with_user": []}
        for _ in range(opts.reps):
            for name, fn in (("drain", drain), ("drain_with_user", drain_with_user),
                             ("pyzmq_with_user", _drain_with_user)):
                for i in range(count):
                    dealer.send_multipart([b"CORRAL1", b"%d" % i, b"echo", b"", b"hello"])
                got, spent = 0, 0
                while got < count:
                    router.poll(1000)
                    start = time.perf_counter_ns()
                    got += len(fn(router, BATCH))
                    spent += time.perf_counter_ns() - start
                results[name].append(spent / count / 1000)
        dealer.close(0)
        router.close(0)
    finally:
        auth.stop()
        context.term()
    return {name: statistics.median(values) for name, values in results.items()}


def _measure_check(root: Path, opts) -> dict[str, float]:
    """The start-up/reload module check: run_check's child against the same work in-process."""
    from corral.daemon import run_check
    from corral.workers import modules
    from corral.workers.host import EpochTicker, first_instance_fault
    from corral.workers.spec import AppSpec, CheckRequest
    cache = root / "check-cache"
    cache.mkdir()
    app = AppSpec("echo", str(ECHO), "", "reuse", 1000, 64, "respawn")
    request = CheckRequest(str(cache), 4096, 0, "", "", [app])
    run_check(request)   # fills the cache: both measure a warm start
    child, in_process = [], []
    for _ in range(opts.reps):
        start = time.perf_counter()
        run_check(request)
        child.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        engine = modules.make_engine(False)
        ticker = EpochTicker(engine)
        ticker.start()
        module, artifact = modules.compile_cached(engine, ECHO, cache, False)
        modules.inspect(module)
        first_instance_fault(engine, AppSpec(**{**app.__dict__, "artifact": str(artifact)}), module, cache, False)
        ticker.stop()
        in_process.append((time.perf_counter() - start) * 1000)
    return {"child": statistics.median(child), "in_process": statistics.median(in_process)}

