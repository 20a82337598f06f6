"""[cluster] and [state] in the config (docs/cluster.md), through `corral check` as a process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harness import GUESTS
from corral.config import ConfigError, parse, to_toml

KV_OPS = GUESTS / "kv_ops.wat"


def check(tmp_path: Path, apps: dict, **sections) -> subprocess.CompletedProcess:
    keys = tmp_path / "keys"
    if not keys.exists():
        for name in ("broker", "host1"):
            subprocess.run([sys.executable, "-m", "corral", "keygen", name, "--dir", str(keys)], check=True,
                           capture_output=True, timeout=60)
        (keys / "clients").mkdir()
        (keys / "hosts").mkdir()
        (keys / "host1.key").rename(keys / "hosts" / "host1.key")
    doc = {"supervisor": {"cache_dir": str(tmp_path / "cache"), "state_dir": str(tmp_path / "state")},
           "security": {"curve_secret_key": str(keys / "broker.key_secret"), "client_keys": str(keys / "clients")},
           **sections, "apps": apps}
    config = tmp_path / "corral.toml"
    config.write_text(to_toml(doc))
    return subprocess.run([sys.executable, "-m", "corral", "check", "-c", str(config)], capture_output=True,
                          text=True, timeout=120)


def test_check_refuses_a_cluster_with_a_stateful_app_on_sqlite(tmp_path):
    cluster = {"listen": "tcp://127.0.0.1:5560", "host_keys": str(tmp_path / "keys" / "hosts")}
    apps = {"kv": {"module": str(KV_OPS)}, "echo": {"module": str(GUESTS / "echo.wat")}}
    refused = check(tmp_path, apps, cluster=cluster)
    assert refused.returncode == 78, refused.stderr
    assert "[apps.kv]" in refused.stderr and 'backend = "postgresql"' in refused.stderr
    assert "[apps.echo]" not in refused.stderr          # a stateless app is fine anywhere
    # The same on PostgreSQL passes; check does not connect to the database.
    fine = check(tmp_path, apps, cluster=cluster,
                 state={"backend": "postgresql", "dsn": "host=db.invalid dbname=corral user=corral"})
    assert fine.returncode == 0, fine.stderr
    assert "[cluster]" not in fine.stderr               # served now: no warning left (docs/cluster.md)
    # Without [cluster], sqlite is the right default.
    assert check(tmp_path, apps).returncode == 0


def test_cluster_and_state_keys_are_checked_by_name(tmp_path):
    app = {"e": {"module": str(GUESTS / "echo.wat")}}
    cases = [
        ({"cluster": {"listen": "tcp://0.0.0.0:5560", "host_keys": str(tmp_path)}}, "[cluster] listen: needs [security]"),
        ({"cluster": {"listen": "ipc:///tmp/x", "host_keys": str(tmp_path)}}, "[cluster] listen: 'ipc:///tmp/x'"),
        ({"cluster": {"listen": "tcp://0.0.0.0:5560"}}, "[cluster] host_keys: missing"),
        ({"cluster": {"listen": "tcp://0.0.0.0:1", "host_keys": str(tmp_path / "no")}}, "[cluster] host_keys:"),
        ({"state": {"backend": "postgresql"}}, "[state] dsn: missing"),
        ({"state": {"backend": "postgresql", "dsn": "host=db password=secret"}}, "[state] dsn: must not hold a password"),
        ({"state": {"backend": "postgresql", "dsn": "postgresql://corral:secret@db/corral"}}, "[state] dsn: must not"),
        ({"state": {"dsn": "host=db"}}, '[state] dsn: only with backend = "postgresql"'),
        ({"state": {"backend": "mysql"}}, "[state] backend: must be one of"),
    ]
    for sections, expected in cases:
        try:
            parse({**sections, "apps": app}, tmp_path / "c.toml")
        except ConfigError as exc:
            assert expected in str(exc), (sections, str(exc))
        else:
            raise AssertionError(f"{sections} was accepted")
    parse({"state": {"backend": "postgresql", "dsn": "host=db dbname=corral user=corral"}, "apps": app},
          tmp_path / "c.toml")


def test_no_workers_of_its_own_only_with_a_cluster(tmp_path):
    app = {"e": {"module": str(GUESTS / "echo.wat")}}
    try:
        parse({"supervisor": {"workers": 0}, "apps": app}, tmp_path / "c.toml")
    except ConfigError as exc:
        assert "[supervisor] workers: must be between 1 and 256 (0 only with [cluster]" in str(exc)
    else:
        raise AssertionError("workers = 0 without [cluster] was accepted")
    keys = tmp_path / "keys"
    subprocess.run([sys.executable, "-m", "corral", "keygen", "broker", "--dir", str(keys)], check=True,
                   capture_output=True, timeout=60)
    config = parse({"supervisor": {"workers": 0},
                    "security": {"curve_secret_key": str(keys / "broker.key_secret"), "client_keys": str(keys)},
                    "cluster": {"listen": "tcp://0.0.0.0:5560", "host_keys": str(keys)}, "apps": app},
                   tmp_path / "c.toml")
    assert config.supervisor.workers == 0
