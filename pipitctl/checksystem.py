"""`pipitctl node checksystem` (calicoctl's): can this host's kernel do what Pipit asks of it?
Each check does the thing itself, the way the agent will, and leaves nothing behind: a tunnel
device made in a throw-away network namespace (ipip.capability), Pipit's NAT table checked by
nft without being applied (`nft --check`), a count of the conntrack table over netlink, a TCP
MD5 key set on a socket never connected. Each names what needs it, so a host that lacks one
can still run pools and peers that do not.
"""

from __future__ import annotations

import errno
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from ipam.pool import IPPool
from ipip import capability, nat
from ipip.encap import IPIP, VXLAN
from pipitctl import output

TCP_MD5SIG = 14  # linux/tcp.h


@dataclass(frozen=True)
class Check:
    what: str
    needed_for: str
    problem: str = ""  # empty: available

    @property
    def ok(self) -> bool:
        return not self.problem


def _tunnel(kind: str) -> str:
    if capability.kernel_supports(kind):
        return ""
    module = capability.MODULES[kind]
    return f"the {module} module is not available (modprobe {module})"


def _nft_nat() -> str:
    if shutil.which("nft") is None:
        return "nft is not installed (Debian: apt install nftables)"
    script = nat.ruleset([IPPool("probe", IPv4Network("10.244.0.0/16"), nat_outgoing=True)],
                         {IPv4Address("10.244.9.9"): IPv4Address("10.244.1.5")})
    result = subprocess.run(["nft", "--check", "-f", "-"], input=script, capture_output=True,
                            text=True, timeout=30)
    if result.returncode != 0:
        return f"nft refused Pipit's NAT table: {result.stderr.strip().splitlines()[0]}"
    return ""


def _conntrack() -> str:
    from ipip.pyroute2_core import NetlinkError  # pyroute2 without the rest of the package
    from pyroute2.conntrack import Conntrack
    try:
        table = Conntrack()
        try:
            table.count()
        finally:
            table.close()
    except (NetlinkError, OSError) as error:
        return f"conntrack over netlink (nf_conntrack_netlink) is not available: {error}"
    return ""


def _tcp_md5() -> str:
    key = b"pipit-checksystem"
    address = struct.pack("=H2s4s120x", socket.AF_INET, b"\0\0",
                          socket.inet_aton("127.0.0.1"))  # a sockaddr_storage
    option = address + struct.pack("=BBHI80s", 0, 0, len(key), 0, key)  # struct tcp_md5sig
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.setsockopt(socket.IPPROTO_TCP, TCP_MD5SIG, option)
        except OSError as error:
            if error.errno in (errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP):
                return "the kernel has no TCP MD5 signatures (CONFIG_TCP_MD5SIG)"
            raise
    return ""


CHECKS: tuple[tuple[str, str, Callable[[], str]], ...] = (
    ("ipip tunnels", "pools with ipipMode Always or CrossSubnet", lambda: _tunnel(IPIP)),
    ("vxlan tunnels", "pools with vxlanMode Always or CrossSubnet", lambda: _tunnel(VXLAN)),
    ("nftables NAT", "natOutgoing and floating IPs", _nft_nat),
    ("conntrack over netlink", "floating IPs that move", _conntrack),
    ("TCP MD5 signatures", "BGP passwords", _tcp_md5),
)


def run_checks() -> list[Check]:
    """Every check, in order; one that cannot even be tried says why."""
    found = []
    for what, needed_for, probe in CHECKS:
        try:
            problem = probe()
        except (OSError, subprocess.SubprocessError) as error:
            problem = f"could not be checked: {error}"
        found.append(Check(what, needed_for, problem))
    return found


def table(checks: list[Check]) -> str:
    """The checks as `node checksystem` prints them."""
    return output.table(("CHECK", "NEEDED FOR", "RESULT"),
                        [(c.what, c.needed_for, "OK" if c.ok else f"MISSING: {c.problem}")
                         for c in checks])
