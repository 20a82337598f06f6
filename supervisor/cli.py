"""The `corral` command: run, check, call, status, bench, and the admin verbs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from corral.wire.exits import EX_CONFIG, EX_SOFTWARE

EXIT_FAILED_REPLY = 1   # a reply came, but not 200
EXIT_NO_REPLY = 3       # no reply within --timeout, or the daemon is not there


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="corral", description=__doc__)
    parser.add_argument("--version", action="version", version=version())
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    from corral import verbs as control_verbs

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("-c", "--config", type=Path, help="config file (default: the packaged corral.toml)")
        return p

    with_config(verbs.add_parser("run", help="run the daemon in the foreground"))
    with_config(verbs.add_parser("check", help="validate a config and compile its modules"))

    def with_keys(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--key-file", type=Path, metavar="NAME.key_secret",
                       help="CURVE: this client's key pair (corral keygen); needed on a frontend with CURVE")
        p.add_argument("--server-key", type=Path, metavar="FILE",
                       help="CURVE: the server's public certificate (its NAME.key); default: the public "
                            "half of the config's [security] curve_secret_key, when this host can read it")
        return p

    call = with_keys(with_config(verbs.add_parser("call", help="send one request and print the reply body")))
    call.add_argument("service")
    call.add_argument("body", nargs="?", default="", help="the request body; - reads stdin")
    call.add_argument("-e", "--endpoint", help="frontend endpoint (default: the config's first)")
    call.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default 10)")
    call.add_argument("--key", help="key, for a keyed service")
    call.add_argument("--deadline-ms", type=int, help="the request's deadline, queue time included")
    call.add_argument("--idempotent", action="store_true", help="may be re-dispatched after a crash")
    call.add_argument("--raw", action="store_true", help="print the body exactly, no newline added")

    status = with_config(verbs.add_parser("status", help=control_verbs.summary("status"), epilog=control_verbs.usage("status"),
                                      formatter_class=argparse.RawDescriptionHelpFormatter))
    status.add_argument("--json", action="store_true", help="print the raw JSON")

    bench = with_keys(with_config(verbs.add_parser("bench", help="load a service and print req/s and latency")))
    bench.add_argument("service", help="the service to load")
    bench.add_argument("body", nargs="?", default="hello", help="the body of every request (default: hello)")
    bench.add_argument("-n", "--requests", type=int, default=10000,
                       help="requests to time, in all (default 10000); before them each client sends one "
                            "request to check that the service answers, then --warmup requests: those are "
                            "not in the numbers printed")
    bench.add_argument("--warmup", type=int, metavar="W",
                       help="warm-up requests per client, sent and answered before the timed run "
                            "(default: 4 x --concurrency, at most 1000); the daemon serves them, and counts "
                            "them in corral status, like any other request")
    bench.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    bench.add_argument("--clients", type=int, default=1, help="client sockets (each its own process)")
    bench.add_argument("--rate", type=float, metavar="R",
                       help="open loop: R requests per second in all, on a fixed schedule whatever the "
                            "replies do (latency at a given load); default: closed loop, --concurrency "
                            "in flight")
    bench.add_argument("-e", "--endpoint", help="frontend endpoint (default: the config's first)")
    bench.add_argument("--key", help="key, for a keyed service")
    bench.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bar on stderr (default: when stderr is a terminal)")

    keygen = verbs.add_parser("keygen", help="write a CURVE key pair: NAME.key (public) and NAME.key_secret")
    keygen.add_argument("name", help="the key's name (a client's name in [apps.X] allow)")
    keygen.add_argument("--dir", type=Path, default=Path("."), help="where to write them (default: here)")

    with_config(verbs.add_parser("host", help="run a worker host: its workers serve a broker's apps over "
                                              "tcp+CURVE (docs/cluster.md); the config's [host] table"))

    scale = with_config(verbs.add_parser("scale", help=control_verbs.summary("scale"), epilog=control_verbs.usage("scale"),
                                      formatter_class=argparse.RawDescriptionHelpFormatter))
    scale.add_argument("cordon", nargs="?", help="the cordon to scale (default: the default cordon)")
    scale.add_argument("workers", type=int)
    restart = with_config(verbs.add_parser("restart", help=control_verbs.summary("restart"), epilog=control_verbs.usage("restart"),
                                      formatter_class=argparse.RawDescriptionHelpFormatter))
    restart.add_argument("slots", type=int, nargs="*", help="slots to restart (default: all)")
    reload = with_config(verbs.add_parser("reload", help=control_verbs.summary("reload"), epilog=control_verbs.usage("reload"),
                                      formatter_class=argparse.RawDescriptionHelpFormatter))
    reload.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="give up waiting after S seconds (default 120; the reload goes on)")

    from corral import state_admin
    state_admin.add_verbs(verbs, with_config)

    args = parse(parser, {"call": call, "bench": bench}, argv)
    return {"run": run, "check": check, "call": call_verb, "status": status_verb, "bench": bench_verb,
            "keygen": keygen_verb, "host": host_verb, "scale": admin_verb, "restart": admin_verb, "reload": admin_verb,
            "state": state_verb}[args.verb](args)


def parse(parser: argparse.ArgumentParser, intermixed: dict[str, argparse.ArgumentParser],
          argv: list[str] | None) -> argparse.Namespace:
    """The arguments; `intermixed` verbs take options after their body too.

    argparse fills a verb's positionals in one go, so `corral call counter --key alice
    throw` would leave `throw` over: call and bench parse their own arguments intermixed
    (the verb comes first: the top level has only --help and --version)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in intermixed:
        args = intermixed[argv[0]].parse_intermixed_args(argv[1:])
        args.verb = argv[0]
        return args
    return parser.parse_args(argv)


def config_path(args: argparse.Namespace) -> Path:
    if args.config is not None:
        return args.config
    from corral import paths
    return paths.default_config()


def load_config(args: argparse.Namespace):
    """The config, or exit 78 naming its problems. A server key in $CREDENTIALS_DIRECTORY
    that is not set here (an operator's shell, outside the unit) is no problem for these
    verbs: none of them reads the server's secret key (`run` and `check` do)."""
    from corral import config
    try:
        return config.with_defaults(config.load(config_path(args)))
    except config.ConfigError as exc:
        if exc.partial is not None and all(config.CREDENTIALS_UNSET in p for p in exc.problems):
            return config.with_defaults(exc.partial)
        for problem in exc.problems:
            print(f"corral: {problem}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None


def run(args: argparse.Namespace) -> int:
    from corral.daemon import Daemon
    return Daemon(config_path(args).absolute()).run()   # status and logs name the file wherever it ran


def host_verb(args: argparse.Namespace) -> int:
    from corral.host import Host
    if args.config is None:
        print("corral: host: name the host's config with -c FILE (a [host] table: docs/cluster.md)", file=sys.stderr)
        return 2
    return Host(args.config.absolute()).run()


def check(args: argparse.Namespace) -> int:
    from corral import config as config_module
    from corral import paths
    from corral.daemon import Daemon
    from corral.wire.exits import UntestedWasmtime
    try:
        config, problems = config_module.with_defaults(config_module.load(config_path(args))), []
    except config_module.ConfigError as exc:
        # The rest of the file is still checked: every problem is named in one run.
        if exc.partial is None or not exc.partial.apps:
            return said(exc.problems, EX_CONFIG)
        config, problems = config_module.with_defaults(exc.partial), exc.problems
    daemon = Daemon(config.path)
    daemon.cache_dir = paths.cache_dir(config.supervisor.cache_dir)
    try:
        from corral.pool import confinement_refused
        confinement_refused(config, daemon.log)
        daemon.compile(config, mode="check")
    except UntestedWasmtime as exc:
        return said([str(exc)], EX_SOFTWARE)
    except config_module.ConfigError as exc:
        problems += exc.problems
    if problems:
        return said(problems, EX_CONFIG)
    for warning in config_module.warnings(config):
        print(f"corral: warning: {warning}", file=sys.stderr)
    count = len(config.apps)
    print(f"{config.path}: ok, {count} app{'' if count == 1 else 's'}: {', '.join(sorted(config.apps))}")
    from corral.workers.confine import offered
    # On stderr, beside the warnings: stdout stays the one line that says the config is good.
    print(f"corral: confinement: {config.supervisor.confinement} (this kernel offers {offered().describe()}; "
          f"docs/confinement.md)", file=sys.stderr)
    return 0


def said(problems: list[str], code: int) -> int:
    for problem in problems:
        print(f"corral: {problem}", file=sys.stderr)
    return code


def client_endpoint(args: argparse.Namespace) -> str:
    if args.endpoint:
        return args.endpoint
    endpoint = load_config(args).supervisor.frontend[0]
    return endpoint.replace("tcp://*:", "tcp://127.0.0.1:").replace("tcp://0.0.0.0:", "tcp://127.0.0.1:")


def require_listener(endpoint: str) -> None:
    """Exit 3 at once when nothing listens on `endpoint`, rather than after a timeout."""
    from corral.client.probe import nothing_listening
    if nothing_listening(endpoint):
        print(f"corral: nothing is listening on {endpoint} (is the daemon running?)", file=sys.stderr)
        raise SystemExit(EXIT_NO_REPLY)


def knows_the_daemon(args: argparse.Namespace) -> bool:
    """Whether the config describes the daemon called: it gave the endpoint, or was named with -c.
    (With -e alone, the packaged config says nothing of the daemon at that endpoint.)"""
    return args.endpoint is None or args.config is not None


def require_sendable(args: argparse.Namespace, endpoint: str, body: bytes) -> None:
    """Say at once what the daemon would never answer: a body its frontend drops with the
    connection, or a keyless client on a CURVE frontend (ZAP cuts it off: no reply either)."""
    if not knows_the_daemon(args):
        return
    config = load_config(args)
    limit_kib = config.supervisor.max_message_kib
    # The broker's frontend MAXMSGSIZE (corral.broker: twice the limit, plus 64 KiB for the
    # other frames): libzmq drops a connection that sends a frame over it, without a reply.
    if len(body) > 2 * limit_kib * 1024 + 65536:
        print(f"corral: the body is {len(body) // 1024} KiB, over twice max_message_kib ({limit_kib} KiB) in "
              f"{config.path}: the daemon would drop the connection without a reply (up to twice the "
              f"limit it answers 413)", file=sys.stderr)
        raise SystemExit(EXIT_FAILED_REPLY)
    if config.security.curve and endpoint.startswith("tcp://") and args.key_file is None:
        print(f"corral: {endpoint} speaks CURVE ([security] curve_secret_key in {config.path}): this frontend "
              f"needs --key-file NAME.key_secret (a key pair from corral keygen whose public half is in "
              f"{config.security.client_keys})", file=sys.stderr)
        raise SystemExit(2)


def not_found_hint(args: argparse.Namespace, service: str) -> str:
    """For a 404: the config's closest service name, or its services."""
    if not knows_the_daemon(args):
        return ""
    import difflib
    names = sorted(load_config(args).apps)
    close = difflib.get_close_matches(service, names, n=1)
    return f" (did you mean {close[0]}?)" if close else f" (the services of this config: {', '.join(names)})"


def client_keys(args: argparse.Namespace):
    """The CURVE keys of --key-file and --server-key (or the config's server key), or None."""
    if args.key_file is None:
        if args.server_key is not None:
            print("corral: --server-key needs --key-file (this client's key pair)", file=sys.stderr)
            raise SystemExit(2)
        return None
    from corral.client import CurveKeys
    server_key = args.server_key
    if server_key is None:
        from corral.config import CREDENTIALS
        server_key = load_config(args).security.curve_secret_key
        if server_key is None or str(server_key).startswith(CREDENTIALS):
            why = "has no [security] curve_secret_key" if server_key is None else \
                f"reads the server key from {CREDENTIALS}, which only the unit has"
            print(f"corral: --key-file needs --server-key (the server's public NAME.key): the config {why}",
                  file=sys.stderr)
            raise SystemExit(2)
    try:
        return CurveKeys.load(str(args.key_file), str(server_key))
    except ValueError as exc:
        print(f"corral: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def keygen_verb(args: argparse.Namespace) -> int:
    import re
    import zmq.auth
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}", args.name):
        print(f"corral: {args.name!r}: a key name is 1-128 letters, digits, '_', '.', '-'", file=sys.stderr)
        return 2
    public, secret = args.dir / f"{args.name}.key", args.dir / f"{args.name}.key_secret"
    for path in (public, secret):
        if path.exists():
            print(f"corral: {path} exists: not overwritten", file=sys.stderr)
            return 1
    import os
    args.dir.mkdir(parents=True, exist_ok=True)
    old_umask = os.umask(0o077)   # the secret is never readable by others, not even for a moment
    try:
        zmq.auth.create_certificates(args.dir, args.name)
    finally:
        os.umask(old_umask)
    public.chmod(0o644)
    print(f"{public}\n{secret}")
    return 0


def call_verb(args: argparse.Namespace) -> int:
    from corral.client import Client, NoReply
    body = sys.stdin.buffer.read() if args.body == "-" else args.body.encode()
    endpoint = client_endpoint(args)
    require_sendable(args, endpoint, body)
    require_listener(endpoint)
    with Client(endpoint, keys=client_keys(args)) as client:
        try:
            reply = client.call(args.service, body, timeout=args.timeout, key=args.key,
                                deadline_ms=args.deadline_ms, idempotent=args.idempotent or None)
        except NoReply:
            print(f"corral: no reply from {endpoint} within {args.timeout:g} s", file=sys.stderr)
            return EXIT_NO_REPLY
    if reply.status != 200:
        hint = not_found_hint(args, args.service) if reply.status == 404 else ""
        print(f"corral: {reply.status}: {reply.body.decode(errors='replace')}{hint}", file=sys.stderr)
        return EXIT_FAILED_REPLY
    sys.stdout.buffer.write(reply.body if args.raw else reply.body + b"\n")
    sys.stdout.flush()
    return 0


def control_request(args: argparse.Namespace, verb: str, arguments: dict, timeout_s: float = 5.0,
                    no_answer: str = "") -> dict:
    """The daemon's answer to one verb; exit 3 with `no_answer` (or the usual question) if none comes."""
    import zmq
    endpoint = load_config(args).supervisor.control
    require_listener(endpoint)
    context = zmq.Context.instance()
    socket = context.socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    socket.send_multipart([verb.encode(), json.dumps(arguments).encode()])
    if not socket.poll(int(timeout_s * 1000)):
        socket.close()
        message = no_answer or f"no answer on the control endpoint {endpoint} (is the daemon running?)"
        print(f"corral: {message}", file=sys.stderr)
        raise SystemExit(EXIT_NO_REPLY)
    reply = json.loads(socket.recv())
    socket.close()
    return reply


def status_verb(args: argparse.Namespace) -> int:
    status = control_request(args, "status", {})
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    from corral.snapshot import Snapshot
    print(Snapshot.from_json(status).table())
    return 0


def state_verb(args: argparse.Namespace) -> int:
    from corral import state_admin
    return state_admin.run(args, load_config(args))


def admin_verb(args: argparse.Namespace) -> int:
    if args.verb == "scale":
        reply = control_request(args, "scale", {"workers": args.workers,
                                                **({"cordon": args.cordon} if args.cordon else {})})
    elif args.verb == "restart":
        reply = control_request(args, "restart", {"slots": args.slots} if args.slots else {})
    else:
        control_request(args, "status", {})  # a daemon that is not there is told at once, not after --timeout
        reply = control_request(args, "reload", {}, timeout_s=args.timeout,
                                no_answer=f"the reload is not over after {args.timeout:g} s; it goes on "
                                          f"(see corral status)")
    if not reply.get("ok"):
        for problem in reply.get("problems", [reply.get("error", "failed")]):
            print(f"corral: {problem}", file=sys.stderr)
        return 1
    for warning in reply.get("warnings", []):
        print(f"corral: warning: {warning}", file=sys.stderr)
    print(admin_sentence(args.verb, reply))
    return 0


def admin_sentence(verb: str, reply: dict) -> str:
    """What an admin verb did, said in words."""
    if verb == "scale":
        workers = reply["workers"]
        where = f" in cordon {reply['cordon']}" if reply.get("cordon", "default") != "default" else ""
        return f"scaling to {workers} worker{'' if workers == 1 else 's'}{where}"
    if verb == "restart":
        slots = reply["restarting"]
        return f"restarting the worker{'' if len(slots) == 1 else 's'} in slot{'' if len(slots) == 1 else 's'} " \
               f"{', '.join(map(str, slots))}, one at a time"
    return f"reloaded: every worker serves config generation {reply['config_generation']}"


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed
    parts = []
    for name in ("corral", "wasmtime", "pyzmq"):
        try:
            parts.append(f"{name} {installed(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    return f"{parts[0]} ({', '.join(parts[1:])})"


def bench_verb(args: argparse.Namespace) -> int:
    from corral.client import loadgen
    require_sendable(args, client_endpoint(args), args.body.encode())
    require_listener(client_endpoint(args))
    result = loadgen.run(client_endpoint(args), args.service.encode(), args.body.encode(),
                         requests=args.requests, concurrency=args.concurrency, clients=args.clients,
                         key=args.key, rate=args.rate, warmup=args.warmup, keys=client_keys(args),
                         progress=sys.stderr.isatty() if args.progress is None else args.progress)
    print(result.report())
    return 0 if result.failed == 0 else 1


def entry() -> int:
    """The console script: main(), quiet when its reader goes away (`corral status | head`)."""
    try:
        return main()
    except BrokenPipeError:
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(entry())
