"""Routing decisions, as pure functions: whom to peer with, which received routes to accept,
which routes the kernel should hold, and what to announce to whom.

Pools here are every pool that exists: a disabled pool takes no new allocations but its pods
keep their addresses, so their routes stay (Calico's meaning of "disabled").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network

from bgp_agent import bgp_filter
from bgp_agent.bgp_config import BGPConfig
from bgp_agent.bgp_filter import BGPFilter
from bgp_agent.bgp_peer import BGPPeer
from bgp_agent.md5_password import PasswordRef, PasswordUnavailable
from ipip.routes import NextHop, Route
from bgp_agent.model import Announcement, Neighbor, Path
from bgp_agent.node import NodeRecord
from ipam.pool import IPPool

# Sessions between nodes: the mesh, to a route reflector, to another node (peerSelector)
INTERNAL_KINDS = ("mesh", "reflector", "peer-node")


def local_as(me: NodeRecord, config: BGPConfig) -> int:
    return me.as_number or config.as_number


def is_reflector(node: NodeRecord) -> bool:
    return node.route_reflector_cluster_id is not None


def _other_nodes(me: NodeRecord, nodes: Iterable[NodeRecord]) -> list[NodeRecord]:
    return [n for n in nodes if n.name != me.name and n.address is not None
            and n.address.ip != me.address.ip]


def node_neighbor(me: NodeRecord, other: NodeRecord, config: BGPConfig, kind: str,
                  peer: BGPPeer | None = None, password: str | None = None,
                  filters: tuple[BGPFilter, ...] = ()) -> Neighbor:
    """A session between two nodes. Calico's rule for reflectors: when this node is one, a
    same-AS peer whose cluster id is empty or another is its client, the same id a
    non-client (a fellow reflector of the cluster)."""
    my_as, their_as = local_as(me, config), local_as(other, config)
    cluster = me.route_reflector_cluster_id
    times = ((peer.hold_time, peer.restart_time) if peer is not None
             else (config.node_mesh_hold_time, config.node_mesh_restart_time))
    limits = {} if peer is None else dict(
        keepalive_time=peer.keepalive_time,
        max_prefixes=peer.max_prefixes, allow_pool_prefixes=peer.allow_pool_prefixes,
        allowed_local_as=peer.allowed_local_as, filters=filters,
        ttl_security=peer.ttl_security, next_hop_self=peer.next_hop_mode == "Self")
    return Neighbor(address=other.address.ip, peer_as=their_as, local_address=me.address.ip,
                    local_as=my_as, kind=kind, name=other.name, hold_time=times[0],
                    restart_time=times[1], password=password,
                    listen_port=config.port_of(me.name), peer_port=config.port_of(other.name),
                    passive=me.address.ip < other.address.ip,
                    rr_client=(cluster is not None and my_as == their_as
                               and other.route_reflector_cluster_id != cluster),
                    **limits)


def _between(other: NodeRecord) -> str:
    """The kind of a session to another node outside the mesh."""
    return "reflector" if is_reflector(other) else "peer-node"


def mesh_neighbors(me: NodeRecord, nodes: Iterable[NodeRecord],
                   config: BGPConfig) -> list[Neighbor]:
    """A session to every other registered node with an address (full iBGP mesh). Route
    reflectors take no part in it."""
    if not config.node_to_node_mesh or me.address is None or is_reflector(me):
        return []
    return sorted((node_neighbor(me, n, config, "mesh") for n in _other_nodes(me, nodes)
                   if not is_reflector(n)), key=lambda n: n.address)


def reflector_neighbors(me: NodeRecord, nodes: Iterable[NodeRecord], config: BGPConfig,
                        peers: Iterable[BGPPeer]) -> list[tuple[NodeRecord, BGPPeer | None]]:
    """The nodes this node peers with outside the mesh, each with the BGPPeer behind it:
    the reflectors of its own cluster id (they mesh among themselves), then, for every
    BGPPeer with a peerSelector in order, the nodes it selects when it applies to this node,
    and with reversePeering Auto the nodes it applies to when it selects this node. The first
    reason to peer with a node wins."""
    others = _other_nodes(me, nodes)
    found: dict[str, tuple[NodeRecord, BGPPeer | None]] = {}
    if is_reflector(me):
        for other in others:
            if other.route_reflector_cluster_id == me.route_reflector_cluster_id:
                found.setdefault(other.name, (other, None))
    for peer in sorted((p for p in peers if p.peer_selector is not None),
                       key=lambda p: (p.rank, p.name)):
        forward = peer.applies_to(me)
        backward = peer.reverse_peering == "Auto" and peer.selects_peer(me)
        for other in others:
            if (forward and peer.selects_peer(other)) or (backward and peer.applies_to(other)):
                found.setdefault(other.name, (other, peer))
    return sorted(found.values(), key=lambda pair: pair[0].address.ip)


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
    warnings: list[str] = field(default_factory=list)  # e.g. a BGPFilter that is not there

    def filters_of(self, peer: BGPPeer | None, known: Mapping[str, BGPFilter]
                   ) -> tuple[BGPFilter, ...]:
        """The peer's filters, in its order; one it names that does not exist (deleted
        behind pipitctl's back) is left out and warned about, as Calico leaves it out."""
        if peer is None:
            return ()
        for name in peer.filters:
            if name not in known:
                warning = (f"BGPPeer {peer.name!r} names BGPFilter {name!r}, which is not "
                           "there or not valid: its sessions run without it")
                if warning not in self.warnings:
                    self.warnings.append(warning)
        return tuple(known[name] for name in peer.filters if name in known)


def select_neighbors(me: NodeRecord, nodes: Iterable[NodeRecord], config: BGPConfig,
                     peers: Iterable[BGPPeer],
                     password: Callable[[PasswordRef], str],
                     filters: Mapping[str, BGPFilter] = {}) -> Selection:
    """This node's sessions: the mesh (if on, and this node no route reflector), every
    global BGPPeer and every BGPPeer whose node or nodeSelector picks this node, and the
    sessions between nodes (reflector_neighbors). A BGPPeer with a peerIP wins over a
    session between nodes to the same address, and that over the mesh; between BGPPeers for
    one address the most specific wins (node, then selector, then global), then the first
    name. `password` reads a password reference and raises PasswordUnavailable; a peer
    whose password cannot be read is skipped, never configured without it. `filters`: the
    BGPFilters by name, for the peers' `filters`."""
    selection = Selection()
    if me.address is None:
        return selection
    peers, nodes = list(peers), list(nodes)
    mine = sorted((p for p in peers if p.applies_to(me) and p.peer_ip is not None),
                  key=lambda p: (p.rank, p.name))
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
        my_as = peer.local_as_number or local_as(me, config)
        selection.neighbors.append(Neighbor(
            address=peer.peer_ip, peer_as=peer.as_number, local_address=me.address.ip,
            local_as=my_as, kind=kind, name=peer.name,
            # a reflector's same-AS router (a BIRD, an FRR) is its client (Calico's rule)
            rr_client=is_reflector(me) and peer.as_number == my_as,
            hold_time=peer.hold_time, keepalive_time=peer.keepalive_time, password=secret,
            restart_time=peer.restart_time,
            listen_port=config.port_of(me.name), peer_port=peer_port(peer, nodes, config),
            max_prefixes=peer.max_prefixes, allow_pool_prefixes=peer.allow_pool_prefixes,
            allowed_local_as=peer.allowed_local_as,
            keep_original_next_hop=peer.keep_original_next_hop,
            filters=selection.filters_of(peer, filters), ttl_security=peer.ttl_security,
            reachable_by=peer.reachable_by, next_hop_self=peer.next_hop_mode == "Self"))
    between_nodes: list[Neighbor] = []
    for other, peer in reflector_neighbors(me, nodes, config, peers):
        address = other.address.ip
        if address in chosen:
            selection.skipped.append(Skipped(
                other.name, address, _between(other), local_as(other, config),
                f"node {other.name} is peered through BGPPeer {chosen[address].name!r} instead"))
            continue
        try:
            secret = password(peer.password) if peer and peer.password else None
        except PasswordUnavailable as error:
            selection.skipped.append(Skipped(other.name, address, _between(other),
                                             local_as(other, config), str(error)))
            chosen[address] = peer
            continue
        between_nodes.append(node_neighbor(me, other, config, _between(other), peer, secret,
                                           selection.filters_of(peer, filters)))
    taken = set(chosen) | {n.address for n in between_nodes}
    selection.neighbors += between_nodes
    mesh = mesh_neighbors(me, nodes, config)
    mesh_secret = mesh_problem = None
    if mesh and config.node_mesh_password is not None:
        try:
            mesh_secret = password(config.node_mesh_password)
        except PasswordUnavailable as error:  # no mesh session goes up without it
            mesh_problem = f"nodeMeshPassword: {error}"
    for neighbor in mesh:
        if neighbor.address in chosen:
            selection.skipped.append(Skipped(
                neighbor.name, neighbor.address, "mesh", neighbor.peer_as,
                f"node {neighbor.name} is peered through BGPPeer "
                f"{chosen[neighbor.address].name!r} instead"))
        elif neighbor.address in taken:
            continue
        elif mesh_problem is not None:
            selection.skipped.append(Skipped(neighbor.name, neighbor.address, "mesh",
                                             neighbor.peer_as, mesh_problem))
        else:
            selection.neighbors.append(replace(neighbor, password=mesh_secret))
    selection.neighbors.sort(key=lambda n: n.address)
    return selection


def peer_port(peer: BGPPeer, nodes: Iterable[NodeRecord], config: BGPConfig) -> int:
    """Where a BGPPeer's session goes: the port its peerIP gives, else, when peerIP and
    asNumber are a Pipit node's, that node's listenPort (Calico's rule), else BGP's 179."""
    if peer.peer_port is not None:
        return peer.peer_port
    node = next((n for n in nodes if n.address is not None and n.address.ip == peer.peer_ip
                 and local_as(n, config) == peer.as_number), None)
    return 179 if node is None else config.port_of(node.name)


def reflector_warnings(me: NodeRecord, nodes: Iterable[NodeRecord],
                       neighbors: Iterable[Neighbor]) -> list[str]:
    """A client that peers with some but not all reflectors of one cluster id never learns
    the routes of the other reflectors' clients (they do not reflect to each other what
    carries their shared cluster id: Calico #2735); one sentence per such cluster id."""
    if is_reflector(me):
        return []
    peered = {n.address for n in neighbors}
    clusters: dict[IPv4Address, list[NodeRecord]] = {}
    for node in nodes:
        if is_reflector(node) and node.address is not None and node.name != me.name:
            clusters.setdefault(node.route_reflector_cluster_id, []).append(node)
    warnings = []
    for cluster, reflectors in sorted(clusters.items()):
        have = sorted(r.name for r in reflectors if r.address.ip in peered)
        missing = sorted(r.name for r in reflectors if r.address.ip not in peered)
        if have and missing:
            warnings.append(
                f"this node peers with {', '.join(have)} but not {', '.join(missing)} of "
                f"route reflector cluster {cluster}: it does not learn the routes of the "
                f"clients of {', '.join(missing)} (peer with every reflector of a cluster "
                "id, or give them different cluster ids)")
    return warnings


def in_pools(prefix: IPv4Network, pools: Iterable[IPPool]) -> bool:
    """Equal to or inside one of the pools."""
    return any(p.holds(prefix) for p in pools)


@dataclass(frozen=True)
class Ownership:
    """Who may announce pod addresses, as etcd says: each block's owner and each borrowed
    address's holder, as (node name, node address)."""
    blocks: Mapping[IPv4Network, tuple[str, IPv4Address | None]] = field(default_factory=dict)
    borrowed: Mapping[IPv4Address, tuple[str, IPv4Address | None]] = field(default_factory=dict)

    def disagrees(self, path: Path) -> str:
        """Why a route to pod addresses from a node or a reflector does not match etcd ("" if
        it does): its next hop, and its ORIGINATOR_ID when reflected, must be the address of
        the node that owns the block (or holds the borrowed address). Checked for iBGP, where
        any same-AS speaker could otherwise announce (or reflect) a hijack."""
        prefix = path.prefix
        owner = self.borrowed.get(prefix.network_address) if prefix.prefixlen == 32 else None
        owner = owner or self.blocks.get(prefix)
        if owner is None:
            return "no node owns it in etcd"
        name, address = owner
        if address is None:
            return f"node {name}, which owns it in etcd, has no address"
        if path.next_hop != address:
            return f"its next hop {path.next_hop} is not node {name} ({address}), which owns it"
        if path.originator_id is not None and path.originator_id != address:
            return (f"its originator {path.originator_id} is not node {name} ({address}), "
                    "which owns it")
        return ""


@dataclass
class ImportResult:
    accepted: dict[IPv4Network, Path] = field(default_factory=dict)
    rejected: dict[IPv4Network, str] = field(default_factory=dict)  # prefix -> why
    # for the next pass: what decided (the inputs other than the routes), and the rejected
    # routes' Paths (the accepted ones are in `accepted`)
    basis: tuple = field(default=(), repr=False, compare=False)
    rejected_paths: dict[IPv4Network, Path] = field(default_factory=dict, repr=False,
                                                    compare=False)


def import_routes(neighbor: Neighbor, paths: Mapping[IPv4Network, Path],
                  pools: list[IPPool], own_blocks: set[IPv4Network],
                  my_as: int, ownership: Ownership = Ownership(),
                  previous: ImportResult | None = None,
                  services: tuple[IPv4Network, ...] = ()) -> ImportResult:
    """Routes over pod addresses (equal to or inside a pool) are taken from nodes and
    reflectors, the mesh and any same-AS peer (a BIRD or FRR route reflector), only where
    they match etcd (Ownership); from an external peer (a ToR) never, unless the neighbour's
    allow_pool_prefixes allows them. Mesh and reflector peers may tell us about nothing else;
    other peers may send any other route (a covering route, a default route, loses to the
    nodes' more specific blocks and is fine). Our own AS may appear in an AS path as often as
    the neighbour's allowed_local_as says (an AS per rack: routes of the other nodes of our
    rack come back through the ToR with our AS in them). A route equal to or inside one of
    the cluster's service ranges (`services`) is never taken: kube-proxy serves those here.

    `previous`, the neighbour's result of the pass before: where the neighbour, pools, own
    blocks, AS and ownership are the same, a route that is the very Path decided then keeps
    its verdict (a pass over thousands of routes, a few of them new, decides only those)."""
    basis = (neighbor, tuple(pools), frozenset(own_blocks), my_as, ownership, services)
    result = ImportResult(basis=basis)
    accepted, rejected, rejected_paths = result.accepted, result.rejected, result.rejected_paths
    if previous is not None and previous.basis == basis:
        was_accepted, was_rejected = previous.accepted, previous.rejected_paths
        reasons = previous.rejected
    else:
        was_accepted = was_rejected = reasons = {}
    internal = neighbor.kind in INTERNAL_KINDS
    ibgp = internal or neighbor.peer_as == neighbor.local_as  # (a BGPPeer's localASNumber)
    for prefix, path in paths.items():
        if was_accepted.get(prefix) is path:
            why = ""
        elif was_rejected.get(prefix) is path:
            why = reasons[prefix]
        else:
            why = _rejection(neighbor, prefix, path, pools, own_blocks, my_as, ownership,
                             internal, ibgp, services)
        if why:
            rejected[prefix] = why
            rejected_paths[prefix] = path
        else:
            accepted[prefix] = path
    return result


def _rejection(neighbor: Neighbor, prefix: IPv4Network, path: Path, pools: list[IPPool],
               own_blocks: set[IPv4Network], my_as: int, ownership: Ownership,
               internal: bool, ibgp: bool, services: tuple[IPv4Network, ...] = ()) -> str:
    """Why import_routes rejects the route ("" if it takes it): the peer's BGPFilters first,
    then Pipit's own rules, which a filter's Accept does not lift."""
    if neighbor.filters:
        why = bgp_filter.import_rejection(neighbor.filters, prefix, ibgp, path.communities,
                                          path.as_path)
        if why:
            return why
    if path.as_path.count(my_as) > neighbor.allowed_local_as or (
            neighbor.local_as != my_as
            and path.as_path.count(neighbor.local_as) > neighbor.allowed_local_as):
        return "our own AS is in its AS path (a loop)"
    if prefix in own_blocks:
        return "it is one of this node's own blocks"
    for service in services:
        if prefix.subnet_of(service):
            return f"it is inside service range {service} (kube-proxy serves it on this node)"
    if not in_pools(prefix, pools):
        return "it is not inside an IP pool" if internal else ""
    if neighbor.allow_pool_prefixes:
        return ""
    if ibgp:
        return ownership.disagrees(path)
    return "it is inside an IP pool (only nodes announce pod addresses)"


def over_limit(neighbor: Neighbor, received: int) -> str:
    """Why a peer must be disconnected for the number of prefixes it sent ("" if it need
    not). Accepted and rejected prefixes both count: a peer flooding us with routes we drop
    still costs memory and CPU."""
    if neighbor.max_prefixes and received > neighbor.max_prefixes:
        return (f"it sent {received} prefixes, more than its maxPrefixes "
                f"{neighbor.max_prefixes}")
    return ""


def import_all(neighbors: Iterable[Neighbor],
               received: Mapping[IPv4Address, Mapping[IPv4Network, Path]],
               pools: list[IPPool], own_blocks: set[IPv4Network],
               my_as: int, ownership: Ownership = Ownership(),
               previous: Mapping[IPv4Address, ImportResult] | None = None,
               services: tuple[IPv4Network, ...] = ()) -> dict[IPv4Address, ImportResult]:
    """import_routes for every neighbour (`previous`: the pass before's results)."""
    previous = previous or {}
    return {n.address: import_routes(n, received.get(n.address, {}), pools, own_blocks, my_as,
                                     ownership, previous.get(n.address), services)
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


def peer_routes(neighbors: Iterable[Neighbor]) -> dict[IPv4Network, Route]:
    """Calico's reachableBy: a /32 route to each such peer through its gateway."""
    return {IPv4Network(n.address): Route(IPv4Network(n.address), (NextHop(n.reachable_by),))
            for n in neighbors if n.reachable_by is not None}


def floating_routes(floating: Mapping[IPv4Address, IPv4Address]) -> dict[IPv4Network, Route]:
    """A /32 to each floating IP of this node's pods via the pod's own address, as Felix
    routes one to its workload: the node's own processes look their route up before the DNAT
    (ipip.nat), and the blackhole of the block holding it would refuse them."""
    return {IPv4Network(a): Route(IPv4Network(a), (NextHop(pod),))
            for a, pod in floating.items()}


def kernel_routes(accepted: Mapping[IPv4Address, Mapping[IPv4Network, Path]],
                  own_blocks: Iterable[IPv4Network],
                  next_hop: Callable[[Path], NextHop] = native,
                  static: Mapping[IPv4Network, Route] | None = None) -> dict[IPv4Network, Route]:
    """The routes this node's kernel should hold: the best received path(s) for every prefix
    (several equal ones: ECMP), over which the `static` routes (peer_routes) win, and a
    blackhole for each block the node owns, so traffic to its unused addresses stops here."""
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
    routes.update(static or {})
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
                  config: BGPConfig, services: Iterable[IPv4Network] = ()
                  ) -> dict[IPv4Address, dict[IPv4Network, Announcement]]:
    """What to send to each neighbour: every exported prefix, next hop self, with the
    configured communities (the cluster's, and those of the prefixAdvertisements holding each
    prefix; to every peer, as Calico's export filter adds them, so a route reflected on to a
    router carries them too); external peers also get `services`, the Kubernetes service
    ranges (kube-proxy answers them on every node, so the fabric spreads them over the nodes:
    Calico's serviceClusterIPs, serviceExternalIPs, serviceLoadBalancerIPs). Other nodes
    never get the service ranges: they serve them themselves. A neighbour's BGPFilters
    hold back what their export rules reject, and change what an Accept's operations say."""
    prefixes = sorted(prefixes)
    tagged: dict[IPv4Network, Announcement] = {}
    for p in sorted(set(prefixes) | set(services)):
        communities, large = config.communities_for(p)
        tagged[p] = Announcement(p, communities=communities, large_communities=large)
    internal = {p: tagged[p] for p in prefixes}
    result = {}
    for neighbor in neighbors:
        wanted = dict(internal if neighbor.kind in INTERNAL_KINDS else tagged)
        if neighbor.filters:
            wanted = filtered_exports(neighbor, wanted)
        result[neighbor.address] = wanted
    return result


def filtered_exports(neighbor: Neighbor, wanted: Mapping[IPv4Network, Announcement]
                     ) -> dict[IPv4Network, Announcement]:
    """The node's own routes for a neighbour past its BGPFilters: matched as they are before
    the configured communities are added (as Calico's filters are), held back or sent with
    an Accept's communities added and AS numbers prepended (after the node's own AS, to an
    eBGP peer: ExaBGP sends a given AS path as it is)."""
    ibgp = neighbor.peer_as == neighbor.local_as
    out = {}
    for prefix, announced in wanted.items():
        verdict = bgp_filter.export(neighbor.filters, prefix, ibgp, remote=False)
        if not verdict.sent:
            continue
        if verdict.changes:
            as_path = announced.as_path
            if verdict.prepend:  # an AS path given is sent as it is: to eBGP, ours first
                as_path = (*(() if ibgp else (neighbor.local_as,)), *verdict.prepend, *as_path)
            announced = replace(
                announced,
                communities=tuple(dict.fromkeys((*announced.communities, *verdict.communities))),
                large_communities=tuple(dict.fromkeys((*announced.large_communities,
                                                       *verdict.large_communities))),
                as_path=as_path)
        out[prefix] = announced
    return out
