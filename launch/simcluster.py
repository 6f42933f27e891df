"""A simulated cluster on one machine: each host is a Linux network namespace with its own address,
joined to the others by veth links (through a bridge when there are more than two), with every
host's outgoing bandwidth capped by `tc` (token bucket). Traffic between hosts is read from the
hosts' interface counters; traffic between ranks of one host stays on that host's loopback.

Needs root and iproute2. `unavailable()` says why not where that is missing; `python -m
launch.simcluster up|down` sets one up for trying things by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

SUBNET = "10.231.7"
MTU = 9000  # jumbo frames, as on cluster fabrics: headers stay < 1% of the bytes counted


@dataclass(frozen=True)
class SimHost:
    """One simulated host: its namespace, its link to the others and its address on that link."""

    index: int
    netns: str
    iface: str
    addr: str

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside this host's network namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]


def unavailable() -> str | None:
    """Why a simulated cluster cannot be built here, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (this process is not root)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = "titan-probe"
    added = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if added.returncode:
        return f"`ip netns add` is not allowed here: {added.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class SimCluster:
    """`hosts` namespaces named `<name>-h<i>` at `10.231.7.<i+1>`, uplinks capped at `rate_mbit`
    (None: uncapped). Use as a context manager; leftovers of an earlier run of the same name are
    removed first."""

    def __init__(self, hosts: int, rate_mbit: float | None = None, name: str = "titan"):
        if not 2 <= hosts <= 200:
            raise ValueError(f"a simulated cluster needs 2 to 200 hosts, got {hosts}")
        self.name, self.rate_mbit = name, rate_mbit
        self.hosts = [SimHost(i, f"{name}-h{i}", f"{name[:8]}{i}", f"{SUBNET}.{i + 1}") for i in range(hosts)]
        self.switch = f"{name}-sw"

    def __enter__(self) -> SimCluster:
        self.down()
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        if len(self.hosts) == 2:
            a, b = self.hosts
            _ip("link", "add", a.iface, "type", "veth", "peer", "name", b.iface)
        else:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for host in self.hosts:
                port = f"{host.iface}p"
                _ip("link", "add", host.iface, "type", "veth", "peer", "name", port)
                _ip("link", "set", port, "netns", self.switch)
                _ip("-n", self.switch, "link", "set", port, "mtu", str(MTU), "master", "br0", "up")
        for host in self.hosts:
            _ip("netns", "add", host.netns)
            _ip("link", "set", host.iface, "netns", host.netns)
            _ip("-n", host.netns, "link", "set", "lo", "up")
            _ip("-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", host.iface)
            _ip("-n", host.netns, "link", "set", host.iface, "mtu", str(MTU), "up")
            if self.rate_mbit:
                self._cap(host)

    def _cap(self, host: SimHost) -> None:
        """Token bucket on the host's egress: `rate_mbit` sustained, bursts of ~4 ms of traffic."""
        burst = max(int(self.rate_mbit * 1e6 / 8 * 0.004), 4 * MTU)
        _run(["ip", "netns", "exec", host.netns, "tc", "qdisc", "add", "dev", host.iface, "root", "tbf",
              "rate", f"{self.rate_mbit}mbit", "burst", str(burst), "latency", "200ms"])

    def down(self) -> None:
        """Delete every namespace of this cluster's name, however many hosts it had (their links go
        with them)."""
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for line in listed.splitlines():
            netns = line.split()[0] if line.strip() else ""
            if netns == self.switch or (netns.startswith(f"{self.name}-h") and netns[len(self.name) + 2:].isdigit()):
                subprocess.run(["ip", "netns", "del", netns], capture_output=True)

    def tx_bytes(self) -> list[int]:
        """Bytes each host has sent to the others so far (its link's counter)."""
        return [_link_stats(host)["tx"]["bytes"] for host in self.hosts]


def _link_stats(host: SimHost) -> dict:
    out = _run(["ip", "-n", host.netns, "-j", "-s", "link", "show", "dev", host.iface])
    return json.loads(out)[0]["stats64"]


def _ip(*args: str) -> None:
    _run(["ip", *args])


def _run(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}")
    return proc.stdout


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.simcluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("up", "down", "stats"))
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--rate-mbit", type=float, default=None, help="uplink cap per host (default: none)")
    parser.add_argument("--name", default="titan")
    args = parser.parse_args(argv)
    reason = unavailable()
    if reason:
        print(f"error: no simulated cluster on this machine: {reason}.", file=sys.stderr)
        return 2
    cluster = SimCluster(args.hosts, args.rate_mbit, args.name)
    if args.action == "up":
        cluster.down()
        cluster.up()
        for host in cluster.hosts:
            print(f"{host.netns}: {host.addr} on {host.iface}; run with: ip netns exec {host.netns} <command>")
    elif args.action == "down":
        cluster.down()
    else:
        for host, sent in zip(cluster.hosts, cluster.tx_bytes()):
            print(f"{host.netns}: {sent} bytes sent")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
