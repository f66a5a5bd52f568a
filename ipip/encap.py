"""Which traffic is encapsulated, and how: pure functions over pools and addresses, no I/O.

A pool's `ipipMode` or `vxlanMode` (at most one of them is not Never) decides how routes to
the blocks inside it look:

    Never         <block> via <node IP>                                 (native)
    IPIP          <block> via <node IP> dev tunl0 onlink
    VXLAN         <block> via <remote VTEP IP> dev vxlan.pipit onlink
    CrossSubnet   native when the remote node is in this node's own subnet, else as Always

Pools are duck-typed (`cidr`, `ipip_mode`, `vxlan_mode`, `disabled`, `name`, `serves()`: what
ipam.pool.IPPool has), so this package does not import the IPAM code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import TYPE_CHECKING

from ipip.routes import NextHop

if TYPE_CHECKING:
    from ipam.pool import IPPool

NEVER, ALWAYS, CROSS_SUBNET = "Never", "Always", "CrossSubnet"
MODES = (NEVER, ALWAYS, CROSS_SUBNET)
IPIP, VXLAN = "ipip", "vxlan"

TUNL0 = "tunl0"  # the ipip module's fallback device: one per network namespace
VXLAN_DEVICE = "vxlan.pipit"
VXLAN_VNI = 4096  # Calico's
VXLAN_PORT = 4789  # IANA
# Bytes each encapsulation adds in front of the pod's packet: an outer IPv4 header; for VXLAN
# also UDP (8), VXLAN (8) and the inner Ethernet header (14).
OVERHEAD = {IPIP: 20, VXLAN: 50}


@dataclass(frozen=True)
class Encap:
    """How traffic to one prefix travels: `kind` None is native (no encapsulation)."""

    kind: str | None = None
    mode: str = NEVER

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"encapsulation mode {self.mode!r} is not one of {', '.join(MODES)}")
        if (self.kind is None) != (self.mode == NEVER) or self.kind not in (None, IPIP, VXLAN):
            raise ValueError(f"encapsulation {self.kind!r} with mode {self.mode!r} is not valid")


NATIVE = Encap()


@dataclass(frozen=True)
class Devices:
    """This node's tunnel devices that are up and usable, by interface index."""

    tunl0: int | None = None
    vxlan: int | None = None


@dataclass(frozen=True)
class RemoteVTEP:
    """Another node's VXLAN endpoint, as its node record publishes it."""

    node_address: IPv4Address  # the node's underlay address: the BGP next hop of its blocks
    address: IPv4Address  # its VTEP address (on its vxlan.pipit)
    mac: str  # its vxlan.pipit MAC, e.g. "02:5e:..."


def pool_encap(pool: IPPool) -> Encap:
    if pool.ipip_mode != NEVER:
        return Encap(IPIP, pool.ipip_mode)
    if pool.vxlan_mode != NEVER:
        return Encap(VXLAN, pool.vxlan_mode)
    return NATIVE


def encapsulation_for(pools: Iterable[IPPool], prefix: IPv4Network) -> Encap:
    """The encapsulation of the pool that holds `prefix` (a block, or a borrowed /32); native
    outside every pool. Disabled pools count: their pods keep their addresses."""
    for pool in pools:
        if pool.holds(prefix):
            return pool_encap(pool)
    return NATIVE


def encapsulates(encap: Encap, local: IPv4Interface, remote: IPv4Address) -> bool:
    """Whether traffic to a node at `remote` is encapsulated: Always, or CrossSubnet when
    `remote` is outside this node's subnet (`local` is its address with prefix length)."""
    if encap.mode == ALWAYS:
        return True
    if encap.mode == CROSS_SUBNET:
        return remote not in local.network
    return False


def next_hop(encap: Encap, local: IPv4Interface, gateway: IPv4Address, devices: Devices,
             vteps: Mapping[IPv4Address, RemoteVTEP] | None = None) -> NextHop:
    """The next hop towards a remote block whose BGP next hop (its node) is `gateway`.

    Where encapsulation is wanted but its device is not up, or the remote node has published no
    VTEP yet, the next hop is native: the agent sets up devices before routes, so this happens
    only when the kernel cannot encapsulate (capability.check says so at start-up) or for the
    moment a new node's record lacks its VTEP."""
    if encapsulates(encap, local, gateway):
        if encap.kind == IPIP and devices.tunl0 is not None:
            return NextHop(gateway, devices.tunl0, onlink=True)
        if encap.kind == VXLAN and devices.vxlan is not None:
            vtep = (vteps or {}).get(gateway)
            if vtep is not None:
                return NextHop(vtep.address, devices.vxlan, onlink=True)
    return NextHop(gateway)


def route_next_hop(pools: Iterable[IPPool], local: IPv4Interface, devices: Devices,
                   vteps: Iterable[RemoteVTEP] = ()) -> Callable[[object], NextHop]:
    """The `next_hop` function for bgp_agent.policy.kernel_routes(): received path (with
    `.prefix` and `.next_hop`) -> NextHop."""
    pools = list(pools)
    by_node = {vtep.node_address: vtep for vtep in vteps}
    # The answer depends only on the prefix's encapsulation and the BGP next hop (the rest
    # is fixed here): few pools and nodes, so nearly every path is a hit.
    cache: dict[tuple[Encap, IPv4Address], NextHop] = {}

    def choose(path) -> NextHop:
        key = (encapsulation_for(pools, path.prefix), path.next_hop)
        hop = cache.get(key)
        if hop is None:
            hop = cache[key] = next_hop(key[0], local, path.next_hop, devices, by_node)
        return hop

    return choose


def kinds_in_use(pools: Iterable[IPPool]) -> set[str]:
    """The encapsulations any pool uses: their devices must exist on every node, to reach the
    blocks of those pools wherever they are."""
    return {encap.kind for encap in map(pool_encap, pools) if encap.kind is not None}


def pools_using(pools: Iterable[IPPool], kind: str) -> list[IPPool]:
    return sorted((p for p in pools if pool_encap(p).kind == kind), key=lambda p: p.name)


def tunnel_pools(pools: Iterable[IPPool], labels: Mapping[str, str], kind: str) -> list[IPPool]:
    """Enabled pools of this encapsulation that select the node and allow tunnel addresses
    (allowedUses Tunnel, assignmentMode Automatic), by name: the node's tunnel address (tunl0,
    or its VTEP) comes from the first. None: the node holds no tunnel address, and the agent
    releases the one it had."""
    return [p for p in pools_using(pools, kind) if p.serves("Tunnel", labels)]


def tunnel_handle(kind: str, node: str) -> str:
    """The IPAM handle that holds a node's tunnel address: `ipip-tunnel-addr-<node>`,
    `vxlan-tunnel-addr-<node>` (Calico's names)."""
    if kind not in (IPIP, VXLAN):
        raise ValueError(f"no tunnel address for encapsulation {kind!r}")
    return f"{kind}-tunnel-addr-{node}"


def vtep_mac(node: str) -> str:
    """A node's VXLAN MAC, the same on every start: from a hash of its name, with the locally
    administered bit set and the multicast bit clear."""
    digest = bytearray(hashlib.sha256(f"pipit-vtep/{node}".encode()).digest()[:6])
    digest[0] = (digest[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in digest)
