"""Routing decisions, as pure functions: whom to peer with, which received routes to accept,
which routes the kernel should hold, and what to announce to whom.

Pools here are every pool that exists: a disabled pool takes no new allocations but its pods
keep their addresses, so their routes stay (Calico's meaning of "disabled").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from bgp_agent.bgp_config import BGPConfig
from bgp_agent.bgp_peer import BGPPeer, PasswordRef, PasswordUnavailable
from ipip.kernel_routes import NextHop, Route
from bgp_agent.model import Announcement, Neighbor, Path
from bgp_agent.node import NodeRecord
from ipam.pool import IPPool

INTERNAL_KINDS = ("mesh", "reflector")


def local_as(me: NodeRecord, config: BGPConfig) -> int:
    return me.as_number or config.as_number


def mesh_neighbors(me: NodeRecord, nodes: Iterable[NodeRecord],
                   config: BGPConfig) -> list[Neighbor]:
    """A session to every other registered node with an address (full iBGP mesh)."""
    if not config.node_to_node_mesh or me.address is None:
        return []
    return sorted((Neighbor(address=n.address.ip, peer_as=local_as(n, config),
                            local_address=me.address.ip, local_as=local_as(me, config),
                            kind="mesh", name=n.name, hold_time=config.node_mesh_hold_time,
                            restart_time=config.node_mesh_restart_time,
                            listen_port=config.listen_port, peer_port=config.listen_port)
                   for n in nodes if n.name != me.name and n.address is not None
                   and n.address.ip != me.address.ip),
                  key=lambda n: n.address)


@dataclass(frozen=True)
class Skipped:
    """A peer this node was asked to have but does not, and why (for its status)."""
    name: str
    address: IPv4Address
    kind: str
    peer_as: int
    reason: str


@dataclass
class Selection:
    neighbors: list[Neighbor] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def select_neighbors(me: NodeRecord, nodes: Iterable[NodeRecord], config: BGPConfig,
                     peers: Iterable[BGPPeer],
                     password: Callable[[PasswordRef], str]) -> Selection:
    """This node's sessions: the mesh (if on), every global BGPPeer and every BGPPeer whose
    node or nodeSelector picks this node. A BGPPeer wins over a mesh session to the same
    address; between BGPPeers for one address the most specific wins (node, then selector,
    then global), then the first name. `password` reads a password reference and raises
    PasswordUnavailable; a peer whose password cannot be read is skipped, never configured
    without it."""
    selection = Selection()
    if me.address is None:
        return selection
    mine = sorted((p for p in peers if p.applies_to(me)), key=lambda p: (p.rank, p.name))
    chosen: dict[IPv4Address, BGPPeer] = {}
    for peer in mine:
        kind = peer.scope
        if peer.peer_ip == me.address.ip:
            selection.skipped.append(Skipped(peer.name, peer.peer_ip, kind, peer.as_number,
                                             "its peerIP is this node's own address"))
            continue
        if peer.peer_ip in chosen:
            selection.skipped.append(Skipped(
                peer.name, peer.peer_ip, kind, peer.as_number,
                f"BGPPeer {chosen[peer.peer_ip].name!r} already peers with this address"))
            continue
        try:
            secret = password(peer.password) if peer.password else None
        except PasswordUnavailable as error:
            selection.skipped.append(Skipped(peer.name, peer.peer_ip, kind, peer.as_number,
                                             str(error)))
            chosen[peer.peer_ip] = peer  # no weaker peer (or the mesh) stands in for it
            continue
        chosen[peer.peer_ip] = peer
        selection.neighbors.append(Neighbor(
            address=peer.peer_ip, peer_as=peer.as_number, local_address=me.address.ip,
            local_as=local_as(me, config), kind=kind, name=peer.name,
            hold_time=peer.hold_time, password=secret, restart_time=peer.restart_time,
            listen_port=config.listen_port, peer_port=peer.peer_port,
            max_prefixes=peer.max_prefixes, allow_pool_prefixes=peer.allow_pool_prefixes,
            allowed_local_as=peer.allowed_local_as,
            keep_original_next_hop=peer.keep_original_next_hop))
    for neighbor in mesh_neighbors(me, nodes, config):
        if neighbor.address in chosen:
            selection.skipped.append(Skipped(
                neighbor.name, neighbor.address, "mesh", neighbor.peer_as,
                f"node {neighbor.name} is peered through BGPPeer "
                f"{chosen[neighbor.address].name!r} instead"))
        else:
            selection.neighbors.append(neighbor)
    selection.neighbors.sort(key=lambda n: n.address)
    return selection


def in_pools(prefix: IPv4Network, pools: Iterable[IPPool]) -> bool:
    """Equal to or inside one of the pools."""
    return any(prefix.subnet_of(p.cidr) for p in pools)


@dataclass
class ImportResult:
    accepted: dict[IPv4Network, Path] = field(default_factory=dict)
    rejected: dict[IPv4Network, str] = field(default_factory=dict)  # prefix -> why


def import_routes(neighbor: Neighbor, paths: Mapping[IPv4Network, Path],
                  pools: list[IPPool], own_blocks: set[IPv4Network],
                  my_as: int) -> ImportResult:
    """Mesh and reflector peers may only tell us about pod addresses (inside a pool); external
    peers (a ToR) may send anything except routes over pod addresses, unless the neighbour's
    allow_pool_prefixes allows them. Our own AS may appear in an AS path as often as the
    neighbour's allowed_local_as says (an AS per rack: routes of the other nodes of our rack
    come back through the ToR with our AS in them)."""
    result = ImportResult()
    for prefix, path in paths.items():
        if path.as_path.count(my_as) > neighbor.allowed_local_as:
            why = "our own AS is in its AS path (a loop)"
        elif prefix in own_blocks:
            why = "it is one of this node's own blocks"
        elif neighbor.kind in INTERNAL_KINDS:
            why = "" if in_pools(prefix, pools) else "it is not inside an IP pool"
        elif in_pools(prefix, pools) and not neighbor.allow_pool_prefixes:
            # Equal to or inside a pool would steal pod traffic; a covering route (a default
            # route, an aggregate) loses to the nodes' more specific blocks and is fine.
            why = "it is inside an IP pool (only nodes announce pod addresses)"
        else:
            why = ""
        if why:
            result.rejected[prefix] = why
        else:
            result.accepted[prefix] = path
    return result


def over_limit(neighbor: Neighbor, received: int) -> str:
    """Why a peer must be disconnected for the number of prefixes it sent ("" if it need
    not). Accepted and rejected prefixes both count: a peer flooding us with routes we drop
    still costs memory and CPU."""
    if neighbor.max_prefixes and received > neighbor.max_prefixes:
        return (f"it sent {received} prefixes, more than its maxPrefixes "
                f"{neighbor.max_prefixes}")
    return ""


def md5_diagnosis(password_set: bool, grown: Mapping[str, int]) -> str:
    """What the kernel's TCP MD5 counters (their growth while a session is not up) say about
    it: segments dropped for a wrong signature, for a missing one, or for an unexpected one."""
    failure = grown.get("TCPMD5Failure", 0)
    missing = grown.get("TCPMD5NotFound", 0)
    unexpected = grown.get("TCPMD5Unexpected", 0)
    if password_set and failure > 0:
        return (f"TCP MD5 signatures do not match: the passwords differ (the kernel dropped "
                f"{_segments(failure)} with a wrong signature)")
    if password_set and missing > 0:
        return (f"the peer sends no TCP MD5 signature but a password is set here: it has "
                f"none (the kernel dropped {_segments(missing)} without one)")
    if not password_set and unexpected > 0:
        return (f"the peer signs with TCP MD5 but no password is set here (the kernel "
                f"dropped {_segments(unexpected)} signed with one)")
    return ""


def _segments(count: int) -> str:
    return f"{count} segment{'' if count == 1 else 's'}"


def import_all(neighbors: Iterable[Neighbor],
               received: Mapping[IPv4Address, Mapping[IPv4Network, Path]],
               pools: list[IPPool], own_blocks: set[IPv4Network],
               my_as: int) -> dict[IPv4Address, ImportResult]:
    """import_routes for every neighbour."""
    return {n.address: import_routes(n, received.get(n.address, {}), pools, own_blocks, my_as)
            for n in neighbors}


def _preference(path: Path) -> tuple:
    """BGP best-path order, reduced to what matters here: higher local-pref, shorter AS path,
    lower origin, lower MED. Equal tuples share the traffic (ECMP)."""
    origin = {"igp": 0, "egp": 1}.get(path.origin, 2)
    return (-(path.local_pref if path.local_pref is not None else 100), len(path.as_path),
            origin, path.med or 0)


def native(path: Path) -> NextHop:
    """A received path's next hop as it came, without encapsulation: kernel_routes' default
    `next_hop`."""
    return NextHop(path.next_hop)


def kernel_routes(accepted: Mapping[IPv4Address, Mapping[IPv4Network, Path]],
                  own_blocks: Iterable[IPv4Network],
                  next_hop: Callable[[Path], NextHop] = native) -> dict[IPv4Network, Route]:
    """The routes this node's kernel should hold: the best received path(s) for every prefix
    (several equal ones: ECMP), and a blackhole for each block the node owns, so traffic to
    its unused addresses stops here."""
    candidates: dict[IPv4Network, list[Path]] = {}
    for paths in accepted.values():
        for prefix, path in paths.items():
            candidates.setdefault(prefix, []).append(path)
    routes: dict[IPv4Network, Route] = {}
    for prefix, paths in candidates.items():
        ranked = [(_preference(p), p) for p in paths]
        best = min(preference for preference, _ in ranked)
        hops = {next_hop(p) for preference, p in ranked if preference == best}
        routes[prefix] = Route(prefix, tuple(hops))
    for block in own_blocks:
        routes[block] = Route(block, blackhole=True)
    return routes


def exported_prefixes(own_blocks: Iterable[IPv4Network], borrowed: Iterable[IPv4Address],
                      pools: list[IPPool]) -> set[IPv4Network]:
    """This node's blocks and the addresses it borrowed from others' blocks (as /32s), for
    pools that allow BGP export."""
    exportable = [p for p in pools if not p.disable_bgp_export]
    prefixes = {b for b in own_blocks if in_pools(b, exportable)}
    prefixes |= {IPv4Network(a) for a in borrowed if in_pools(IPv4Network(a), exportable)}
    return prefixes


def announcements(prefixes: Iterable[IPv4Network], neighbors: Iterable[Neighbor],
                  config: BGPConfig) -> dict[IPv4Address, dict[IPv4Network, Announcement]]:
    """What to send to each neighbour: every exported prefix, next hop self; external peers
    also get the configured communities."""
    prefixes = sorted(prefixes)
    result = {}
    for neighbor in neighbors:
        internal = neighbor.kind in INTERNAL_KINDS
        tags = {} if internal else {"communities": config.communities,
                                    "large_communities": config.large_communities}
        result[neighbor.address] = {p: Announcement(p, **tags) for p in prefixes}
    return result
