"""The many-hosts fixtures (tests/netns.py, tests/pgserver.py) with real parts: a host in its
own network namespace reaches PostgreSQL on the test's side of a veth link, over TCP, with the
store's own code; a partition (link down) makes its store unreachable (-6, 503), healing the
link brings it back, and nothing is left behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pgserver import PgServer

# Inside the namespace: one commit and one read through PgStore, then wait for a line on stdin
# and read again (the test cuts or heals the link in between).
_HOST_SIDE = r"""
import sys
from corral.workers import state, state_pg
state_pg.RETRY_AFTER_S = 0
store = state_pg.PgStore(sys.argv[1], "svc", "os", state.Limits(), 30, run="r", worker="r/host1-w0.1")
writes = state.WriteSet(store, b"s")
print("put", writes.put(b"k", b"from the namespace"), flush=True)
store.stage(writes, 200, b"", b"")
store.commit()
print("committed", flush=True)
for line in sys.stdin:
    store.close()
    print("get", state.WriteSet(store, b"s").get(b"k"), flush=True)
"""


@pytest.mark.timeout(90)
def test_a_host_in_its_namespace_reaches_the_store_and_a_partition_cuts_it(namespaces):
    host = namespaces()
    server = PgServer(listen=host.host_address)
    try:
        server.start()
        dsn = server.dsn(server.create_database(), tcp_host=host.host_address) + " connect_timeout=2"
        child = subprocess.Popen(host.command([sys.executable, "-c", _HOST_SIDE, dsn]), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, bufsize=1)
        try:
            assert child.stdout.readline().split() == ["put", "0"]
            assert child.stdout.readline().strip() == "committed"
            host.partition()
            child.stdin.write("read\n")
            assert child.stdout.readline().strip() == "get -6"
            host.heal()
            child.stdin.write("read\n")
            assert child.stdout.readline().strip() == "get b'from the namespace'"
        finally:
            child.kill()
            child.wait(10)
        # Reached only through the link: the server listens on no other address than it.
        assert server.sql("SHOW listen_addresses").strip() == host.host_address
    finally:
        server.destroy()
