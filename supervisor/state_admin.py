"""`corral state export|import|backup`: the operator's tools for durable state (docs/state.md).

They read the config only to find state_dir and the services; they open the
SQLite files directly, so they work with the daemon running or not: an export
is one consistent read, an import one transaction, a backup SQLite's online
backup (each copy consistent even while workers commit).
"""

from __future__ import annotations

import argparse
import json
import sys
from base64 import b64decode, b64encode
from binascii import Error as Base64Error
from pathlib import Path

from corral import cordons, paths
from corral.workers import state

EXIT_FAILED = 1


def state_dir(config) -> Path:
    return paths.state_dir(config.supervisor.state_dir, paths.cache_dir(config.supervisor.cache_dir))


def database_path(folder: Path, config, service: str) -> Path:
    """A service's file, in its cordon's directory (docs/confinement.md)."""
    return state.database_path(cordons.state_dir(folder, config.apps[service].cordon), service)


def add_verbs(verbs, with_config) -> None:
    group = verbs.add_parser("state", help="export, import or back up the durable state of services")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = with_config(actions.add_parser("export", help="write a service's entries as JSON lines"))
    export.add_argument("service")
    export.add_argument("key", nargs="?", help="only this scope: a keyed service's key (UTF-8)")
    imports = with_config(actions.add_parser("import", help="read JSON lines (as export writes) into a service"))
    imports.add_argument("service")
    backup = with_config(actions.add_parser("backup", help="copy every service's database, consistently, "
                                                           "while serving"))
    backup.add_argument("dir", type=Path)


def run(args: argparse.Namespace, config) -> int:
    if config.state.backend == "postgresql":
        return run_postgresql(args, config)
    folder = state_dir(config)
    if args.action == "backup":
        return backup(folder, config, args.dir)
    app = config.apps.get(args.service)
    if app is None:
        print(f"corral: no service {args.service!r} in {config.path}", file=sys.stderr)
        return EXIT_FAILED
    path = database_path(folder, config, args.service)
    if args.action == "export":
        return export(path, args.key.encode() if args.key is not None else None)
    return import_lines(path, app.state_durability)


def export(path: Path, scope: bytes | None) -> int:
    if not path.is_file():
        return 0  # a service that never wrote anything has nothing to export
    try:
        write_lines(sys.stdout, state.export_rows(path, scope))
    except state.sqlite3.Error as exc:
        print(f"corral: state file {path}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def write_lines(out, rows) -> None:
    """JSON lines: {"scope", "key", "value"} per entry, {"scope", "alarm"} per alarm (docs/alarms.md)."""
    for row in rows:
        if len(row) == 2:
            out.write(json.dumps({"scope": b64encode(row[0]).decode(), "alarm": row[1]}) + "\n")
            continue
        row_scope, key, value = row
        out.write(json.dumps({"scope": b64encode(row_scope).decode(), "key": b64encode(key).decode(),
                              "value": b64encode(value).decode()}) + "\n")
    out.flush()


def parse_line(number: int, line: str) -> tuple[bytes, bytes, bytes] | tuple[bytes, int]:
    try:
        entry = json.loads(line)
        if isinstance(entry, dict) and set(entry) == {"scope", "alarm"}:
            return parse_alarm(entry)
        if not isinstance(entry, dict) or set(entry) != {"scope", "key", "value"}:
            raise ValueError('each line is {"scope": b64, "key": b64, "value": b64} '
                             'or {"scope": b64, "alarm": at_ms}')
        scope, key, value = (b64decode(entry[name], validate=True) for name in ("scope", "key", "value"))
    except (ValueError, TypeError, Base64Error) as exc:
        raise ValueError(f"line {number}: {exc}") from None
    if not key:
        raise ValueError(f"line {number}: empty key")
    return scope, key, value


def parse_alarm(entry: dict) -> tuple[bytes, int]:
    """A scope's alarm line; raise ValueError."""
    at_ms = entry["alarm"]
    if type(at_ms) is not int or not 0 <= at_ms < 1 << 63:
        raise ValueError("alarm must be a time in milliseconds since the Unix epoch (0 or more)")
    return b64decode(entry["scope"], validate=True), at_ms


def import_lines(path: Path, durability: str) -> int:
    try:
        entries = [parse_line(n, line) for n, line in enumerate(sys.stdin, 1) if line.strip()]
    except ValueError as exc:
        print(f"corral: {exc}; nothing imported", file=sys.stderr)
        return EXIT_FAILED
    try:
        count = state.import_rows(path, entries, durability)
    except (state.sqlite3.Error, OSError) as exc:
        print(f"corral: state file {path}: {exc}; nothing imported", file=sys.stderr)
        return EXIT_FAILED
    print(f"{path}: {count} {'entry' if count == 1 else 'entries'} imported")
    return 0


def backup(folder: Path, config, target: Path) -> int:
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    copied = 0
    for name in sorted(config.apps):
        path = database_path(folder, config, name)
        if not path.is_file():
            continue
        try:
            state.backup(path, state.database_path(target, name))
        except state.sqlite3.Error as exc:
            print(f"corral: state file {path}: {exc}", file=sys.stderr)
            return EXIT_FAILED
        copied += 1
    print(f"{target}: {copied} database{'' if copied == 1 else 's'} copied")
    return 0


def run_postgresql(args: argparse.Namespace, config) -> int:
    """The same verbs on the shared PostgreSQL store (docs/cluster.md). An export is one
    REPEATABLE READ snapshot; an import one transaction; a backup is a consistent export: one
    snapshot for every service, written as DIR/SERVICE.jsonl (what `import` reads)."""
    import psycopg
    from corral.workers import state_pg
    dsn = config.state.dsn
    where = f"PostgreSQL ({state_pg.describe(dsn)})"
    if args.action != "backup" and args.service not in config.apps:
        print(f"corral: no service {args.service!r} in {config.path}", file=sys.stderr)
        return EXIT_FAILED
    try:
        if args.action == "export":
            key = args.key.encode() if args.key is not None else None
            write_lines(sys.stdout, state_pg.export_rows(dsn, args.service, key))
            return 0
        if args.action == "import":
            try:
                entries = [parse_line(n, line) for n, line in enumerate(sys.stdin, 1) if line.strip()]
            except ValueError as exc:
                print(f"corral: {exc}; nothing imported", file=sys.stderr)
                return EXIT_FAILED
            count = state_pg.import_rows(dsn, args.service, entries)
            print(f"{where} {args.service}: {count} {'entry' if count == 1 else 'entries'} imported")
            return 0
        args.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        files = {name: open(args.dir / f"{name}.jsonl", "w") for name in sorted(config.apps)}
        try:
            for service, row in state_pg.backup_lines(dsn, sorted(config.apps)):
                write_lines(files[service], [row])
        finally:
            for file in files.values():
                file.close()
        print(f"{args.dir}: {len(files)} services exported from one snapshot of {where}")
        return 0
    except (psycopg.Error, state.Unavailable, OSError) as exc:
        print(f"corral: {where}: {str(exc).strip()}" + ("; nothing imported" if args.action == "import" else ""),
              file=sys.stderr)
        return EXIT_FAILED
