"""Routing decisions, as pure functions: whom to peer with, which received routes to accept,
which routes the kernel should hold, and what to announce to whom.

Pools here are every pool that exists: a disabled pool takes no new allocations but its pods
keep their addresses, so their routes stay (Calico's meaning of "disabled").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from bgp_agent.bgp_config import BGPConfig
from bgp_agent.kernel_routes import NextHop, Route
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
                            restart_time=config.node_mesh_restart_time)
                   for n in nodes if n.name != me.name and n.address is not None
                   and n.address.ip != me.address.ip),
                  key=lambda n: n.address)


def in_pools(prefix: IPv4Network, pools: Iterable[IPPool]) -> bool:
    """Equal to or inside one of the pools."""
    return any(prefix.subnet_of(p.cidr) for p in pools)


@dataclass
class ImportResult:
    accepted: dict[IPv4Network, Path] = field(default_factory=dict)
    rejected: dict[IPv4Network, str] = field(default_factory=dict)  # prefix -> why


def import_routes(neighbor: Neighbor, paths: Mapping[IPv4Network, Path],
                  pools: list[IPPool], own_blocks: set[IPv4Network],
                  my_as: int, allow_pool_prefixes: bool = False) -> ImportResult:
    """Mesh and reflector peers may only tell us about pod addresses (inside a pool); external
    peers (a ToR) may send anything except routes over pod addresses, unless allowed."""
    result = ImportResult()
    for prefix, path in paths.items():
        if my_as in path.as_path:
            why = "our own AS is in its AS path (a loop)"
        elif prefix in own_blocks:
            why = "it is one of this node's own blocks"
        elif neighbor.kind in INTERNAL_KINDS:
            why = "" if in_pools(prefix, pools) else "it is not inside an IP pool"
        elif in_pools(prefix, pools) and not allow_pool_prefixes:
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


def _preference(path: Path) -> tuple:
    """BGP best-path order, reduced to what matters here: higher local-pref, shorter AS path,
    lower origin, lower MED. Equal tuples share the traffic (ECMP)."""
    origin = {"igp": 0, "egp": 1}.get(path.origin, 2)
    return (-(path.local_pref if path.local_pref is not None else 100), len(path.as_path),
            origin, path.med or 0)


def kernel_routes(accepted: Mapping[IPv4Address, Mapping[IPv4Network, Path]],
                  own_blocks: Iterable[IPv4Network],
                  next_hop: callable = lambda path: NextHop(path.next_hop)) -> dict[
                      IPv4Network, Route]:
    """The routes this node's kernel should hold: the best received path(s) for every prefix
    (several equal ones: ECMP), and a blackhole for each block the node owns, so traffic to
    its unused addresses stops here."""
    candidates: dict[IPv4Network, list[Path]] = {}
    for paths in accepted.values():
        for prefix, path in paths.items():
            candidates.setdefault(prefix, []).append(path)
    routes: dict[IPv4Network, Route] = {}
    for prefix, paths in candidates.items():
        best = min(_preference(p) for p in paths)
        hops = {next_hop(p) for p in paths if _preference(p) == best}
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
        communities = () if neighbor.kind in INTERNAL_KINDS else config.communities
        result[neighbor.address] = {p: Announcement(p, communities=communities)
                                    for p in prefixes}
    return result
