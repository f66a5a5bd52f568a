"""Namespaces wired as an underlay with nodes and pods, packet captures and pings, for the
encapsulation tests (test_ipip_*.py, test_agent_encapsulation.py). Everything lives in
namespaces made through a lab.netns.Namespaces, which removes them (and with them every device
and process route) at the end of the test, also on failure.

    underlay:  node A eth0 192.168.1.10/24 --- to-a [router] to-b --- eth0 192.168.2.10/24 node B
               (or several nodes on one bridge of the router: Underlay.lan)
    pods:      attached by the CNI plugins through the agents (test_agent_encapsulation.py)
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

from lab import netns
from lab.netns import Namespaces
from lab.process import wait

_TIMESTAMP = re.compile(r"\d\d:\d\d:\d\d\.\d+ ")


def run(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return result


def ip(ns: str, *args: str) -> str:
    return run("ip", "-n", ns, *args).stdout


def veth(ns_a: str, if_a: str, ns_b: str, if_b: str, mtu: int = 1500) -> None:
    ip(ns_a, "link", "add", if_a, "mtu", str(mtu), "type", "veth", "peer", "name", if_b,
       "netns", ns_b, "mtu", str(mtu))
    ip(ns_a, "link", "set", if_a, "up")
    ip(ns_b, "link", "set", if_b, "up")


def forwarding(ns: str) -> None:
    run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")


@dataclass
class Node:
    ns: str
    address: IPv4Interface  # on eth0, the uplink

    @property
    def ip(self) -> IPv4Address:
        return self.address.ip


@dataclass
class Pod:
    ns: str
    address: IPv4Address
    node: Node


class Underlay:
    """Builds nodes and routers inside `namespaces`."""

    def __init__(self, namespaces: Namespaces):
        self.namespaces = namespaces

    def router(self, tag: str = "router") -> str:
        ns = self.namespaces.create(tag)
        forwarding(ns)
        return ns

    def lan(self, router: str, bridge: str, gateway: str) -> None:
        """A bridge in `router` holding `gateway` (ADDR/LEN): the nodes attached to it
        (`node(..., router=router, bridge=bridge)`) share one subnet and reach each other
        directly."""
        ip(router, "link", "add", bridge, "type", "bridge")
        ip(router, "addr", "add", gateway, "dev", bridge)
        ip(router, "link", "set", bridge, "up")

    def node(self, tag: str, address: str, *, router: str | None = None,
             router_if: str = "", mtu: int = 1500, bridge: str | None = None) -> Node:
        """A node whose eth0 holds `address`; attached to `router` (which gets the subnet's
        first address on `router_if`, or has it on `bridge`, which `router_if` then joins;
        the node's default gateway) when given."""
        ns = self.namespaces.create(tag)
        forwarding(ns)
        node = Node(ns, IPv4Interface(address))
        if router is not None:
            gateway = next(node.address.network.hosts())
            veth(router, router_if, ns, "eth0", mtu)
            if bridge is not None:
                ip(router, "link", "set", router_if, "master", bridge)
            else:
                ip(router, "addr", "add", f"{gateway}/{node.address.network.prefixlen}",
                   "dev", router_if)
            ip(ns, "addr", "add", address, "dev", "eth0")
            ip(ns, "route", "add", "default", "via", str(gateway))
        return node


def ping(source: Pod | str, target: IPv4Address | str, *, size: int | None = None,
         df: bool = False, count: int = 1) -> subprocess.CompletedProcess:
    ns = source.ns if isinstance(source, Pod) else source
    options = ["-n", "-i", "0.2"]
    if size is not None:
        options += ["-s", str(size)]
    if df:
        options += ["-M", "do"]
    return netns.ping(ns, target, *options, count=count, reply_wait=2, timeout=30)


def wait_ping(source: Pod | str, target: IPv4Address | str, timeout: float = 15) -> None:
    """Ping until a reply comes (the first packets may wait for ARP), or fail at `timeout`."""
    last: list[subprocess.CompletedProcess] = []

    def replied() -> bool:
        last[:] = [ping(source, target)]
        return last[0].returncode == 0
    try:
        wait(replied, timeout, f"a reply from {target}")
    except TimeoutError:
        raise AssertionError(f"no reply from {target} within {timeout:g} s:\n"
                             f"{last[0].stdout}{last[0].stderr}") from None


class Capture:
    """tcpdump on one interface of a namespace, written to a pcap file; `count()` reads it back
    with a filter once the capture is stopped (leaving `with`)."""

    def __init__(self, ns: str, ifname: str, directory: Path):
        self.ns, self.ifname = ns, ifname
        self.path = directory / f"{ns}-{ifname}.pcap"
        self._log = directory / f"{ns}-{ifname}.log"
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> Capture:
        with open(self._log, "wb") as log:
            self._process = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, "tcpdump", "-i", self.ifname, "-n", "-U",
                 "--immediate-mode", "-Z", "root", "-w", str(self.path)],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        def listening() -> bool:
            return "listening on" in self._log.read_text()
        try:
            wait(lambda: listening() or self._process.poll() is not None, 15, "tcpdump")
        except TimeoutError:
            pass
        if not listening():
            self.stop()
            raise RuntimeError(f"tcpdump on {self.ns}/{self.ifname} did not start: "
                               f"{self._log.read_text().strip()}")
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)  # tcpdump flushes and closes the file
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __exit__(self, *exc) -> None:
        self.stop()

    def packets(self, bpf: str = "") -> list[str]:
        """The packets matching a tcpdump filter, one string each (an encapsulated packet's
        text includes the decoded inner packet)."""
        assert self._process is None, "read a capture after stopping it"
        argv = ["tcpdump", "-r", str(self.path), "-n"] + ([bpf] if bpf else [])
        packets: list[str] = []
        for line in run(*argv).stdout.splitlines():
            if _TIMESTAMP.match(line):
                packets.append(line)
            elif packets and line.strip():
                packets[-1] += " | " + line.strip()
        return packets

    def count(self, bpf: str = "") -> int:
        return len(self.packets(bpf))


def exists(ns: str, ifname: str) -> bool:
    return run("ip", "-n", ns, "link", "show", ifname, check=False).returncode == 0


def pipit_routes(ns: str) -> list[str]:
    """`ip route show proto 91`: the routes Pipit owns in a namespace, as iproute2 prints them."""
    return [" ".join(line.split()) for line in ip(ns, "route", "show", "proto", "91").splitlines()]


# -- a UDP echo in a pod, and one flow to it ----------------------------------------------------
# The echo answers each datagram with the source address it saw; the flow always leaves from
# the same port, so the kernel tracks it as one connection (its conntrack entry).

ECHO_PORT = 7777
ECHO_SERVER = f"""\
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", {ECHO_PORT}))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(100)
    s.sendto(peer[0].encode(), peer)
"""


@contextlib.contextmanager
def udp_echo(ns: str) -> Iterator[None]:
    """The echo running in namespace `ns` (killed before the namespace goes)."""
    server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", ECHO_SERVER],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline() == "ready\n", server.stderr.read()
        yield
    finally:
        server.kill()
        server.communicate(timeout=10)


FLOW_PORT = 40000
FLOW_CLIENT = f"""\
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {FLOW_PORT}))  # the same flow every time: one conntrack entry
s.settimeout(2)
s.sendto(b"?", (sys.argv[1], {ECHO_PORT}))
try:
    data, peer = s.recvfrom(100)
    print(peer[0], data.decode())
except socket.timeout:
    print("none")
"""


def flow(ns: str, target: object) -> str:
    """One datagram of the same UDP flow (source port FLOW_PORT) to `target` and back: the
    reply's source and what the pod saw, or "none"."""
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", FLOW_CLIENT,
                          str(target)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()
