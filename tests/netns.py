"""Network namespaces for the many-hosts tests (docs/cluster.md): each host its own namespace,
joined to the test's (the broker's, the database's) by a veth pair the test makes and removes.

Addresses live only on those links (10.199.N.0/30: .1 on the test's side, .2 in the
namespace). A partition is `ip link set DEV down` (this kernel has no netem); `heal()`
brings it up again. Every namespace and link is deleted at the end, whatever happened.
"""

from __future__ import annotations

import itertools
import os
import subprocess

_numbers = itertools.count(1)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


class Namespace:
    """One host's namespace and its veth link to the test's namespace."""

    def __init__(self):
        n = next(_numbers) + (os.getpid() % 200) * 16
        self.number = n % 250 + 1
        self.name = f"crl-{os.getpid()}-{self.number}"
        self.outside = f"crlv{os.getpid() % 10000}o{self.number}"[:15]   # the test's end
        self.inside = f"crlv{os.getpid() % 10000}i{self.number}"[:15]
        self.host_address = f"10.199.{self.number}.1"   # the test's side: broker, database
        self.address = f"10.199.{self.number}.2"        # the namespace's side
        ip("netns", "add", self.name)
        try:
            ip("link", "add", self.outside, "type", "veth", "peer", "name", self.inside)
            ip("link", "set", self.inside, "netns", self.name)
            ip("addr", "add", f"{self.host_address}/30", "dev", self.outside)
            ip("link", "set", self.outside, "up")
            ip("-n", self.name, "addr", "add", f"{self.address}/30", "dev", self.inside)
            ip("-n", self.name, "link", "set", self.inside, "up")
            ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.remove()
            raise

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def partition(self) -> None:
        ip("link", "set", self.outside, "down")

    def heal(self) -> None:
        ip("link", "set", self.outside, "up")

    def remove(self) -> None:
        ip("link", "del", self.outside, check=False)     # takes its peer along
        ip("netns", "del", self.name, check=False)


def leftovers() -> list[str]:
    """Namespaces and links of this process still there (for the fixture's final check)."""
    mine = f"crl-{os.getpid()}-"
    names = [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.startswith(mine)]
    links = [line for line in ip("-o", "link").stdout.splitlines() if f"crlv{os.getpid() % 10000}" in line]
    return names + links
