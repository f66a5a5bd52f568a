"""BGPPeer: BGP sessions outside the node-to-node mesh, for every node (global), for one node
(`node`) or for the nodes a label selector picks (`nodeSelector`): to a router (`peerIP`: a
top-of-rack switch, a BIRD reflector), or to other nodes (`peerSelector`: every node it selects,
as AS its own; Calico's route-reflector topology). Stored at /pipit/resources/bgppeers/<name>.

    apiVersion: pipit.dev/v1
    kind: BGPPeer
    metadata: {name: rack-a-tor}
    spec:
      peerIP: 10.99.1.1                # or 10.99.1.1:1179: a peer that listens on another port
                                       # (none given: 179, or the listenPort of the Pipit node
                                       # whose address and AS these are, as Calico)
      asNumber: 65101
      localASNumber: 65010             # the AS the node shows this peer (default: its own)
      nodeSelector: rack == 'a'        # or node: n1, or neither: every node
      password: {file: /etc/pipit/tor.secret}   # or {secretKeyRef: {name: bgp, key: tor}}
      holdTime: 90                     # seconds, 0 or 3-65535
      keepaliveTime: 30                # seconds between keepalives, below holdTime (default
                                       # a third of the hold time the session agrees on)
      maxRestartTime: 120              # graceful restart time we advertise, 0 turns it off
      maxPrefixes: 1000                # more received prefixes disconnect the peer; 0: no limit
      keepOriginalNextHop: false
      allowPoolPrefixes: false         # accept routes inside IP pools from this peer
      numAllowedLocalASNumbers: 0      # how often our AS may appear in a received AS path
      filters: [tor-in, tor-out]       # BGPFilters over what is imported and exported, in order
      ttlSecurity: 1                   # GTSM (RFC 5082): the peer is this many hops away
      reachableBy: 10.99.1.254         # a /32 route to peerIP through this gateway
      nextHopMode: Auto                # Self: a reflector reflects to it with itself as next hop

    spec:                              # every node peers with every route reflector
      nodeSelector: all()
      peerSelector: route-reflector == 'true'   # instead of peerIP and asNumber
      reversePeering: Auto             # Auto: the selected nodes peer back (Manual: they
                                       # need a BGPPeer of their own)

The password itself never appears in the resource (bgp_agent.md5_password): only where to
read it. The agent reads it whenever it recomputes its sessions (on any change, and at least
once a minute), so a rotated password file or Secret is picked up by itself.

maxPrefixes counts every prefix the peer sent, accepted or not; one more disconnects the peer
(as BIRD's `receive limit N action disable`): it stays down, shown as disabled in `pipitctl
node status`, until its BGPPeer changes (raise the limit, or touch any field) or the agent
restarts. numAllowedLocalASNumbers is Calico's: with an AS per rack, routes of the other
nodes of the rack come back through the ToR with our own AS in their path.
localASNumber is Calico's: the AS number the node peers with this router as, in place of its
own (BIRD's `local as`), e.g. while a rack moves from one AS to another; the node still
refuses routes carrying its own AS, or this one, as loops.
ttlSecurity is Calico's GTSM (RFC 5082, BIRD's `ttl security on`): the node sends with TTL 255
and its kernel drops what arrives from the peer with a TTL below 256 - ttlSecurity, so a
spoofed segment from farther away cannot reach the session; the peer must run GTSM too.
reachableBy is Calico's: the node holds a /32 route to peerIP through that gateway while it
peers with it, over any route to peerIP learned from BGP, so a session to a router's loopback
that the router itself announces does not flap with its own route (a session carried over a
route it delivers). sourceAddress is accepted as UseNodeIP (Calico's default, and what
Pipit does); None (let the kernel choose) is refused. keepOriginalNextHop and nextHopMode
(which replaces it) are Calico's: a node only announces its own blocks, whose next hop is the
node itself in every mode, and a route reflector reflects routes with their next hop kept
(Auto, Keep) unless the member's mode is Self: then with its own address, so that member
sends the traffic through the reflector (which must forward it: a dedicated pipit-rr
programs no routes, and node status warns).

Pure parsing and validation here; checks against other resources (the node itself,
duplicates) are in `check_peer`, over the stored peers and nodes it is given.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, ip_address

from bgp_agent.bgp_config import (NO_WORKLOAD_PEERING, check_hold_time, check_restart_time,
                                  parse_as_number)
from bgp_agent.md5_password import PasswordRef, parse_password
from bgp_agent.model import DEFAULT_HOLD_TIME, DEFAULT_RESTART_TIME
from bgp_agent.node import NodeRecord
from ipam.errors import InvalidResource
from ipam.resource import (SpecReader, check_name, make_document, read_document, shown,
                           with_metadata)
from ipam.selector import parse_selector

KIND = "BGPPeer"
_FIELDS = {"peerIP", "asNumber", "node", "nodeSelector", "peerSelector", "reversePeering",
           "password", "holdTime", "maxRestartTime", "maxPrefixes", "keepOriginalNextHop",
           "allowPoolPrefixes", "numAllowedLocalASNumbers", "filters", "ttlSecurity",
           "localASNumber", "sourceAddress", "reachableBy", "nextHopMode", "keepaliveTime"}
REVERSE_PEERING = ("Auto", "Manual")
# Calico's fields Pipit does not do, and why (refused in that sentence)
UNSUPPORTED = {"localWorkloadSelector": NO_WORKLOAD_PEERING}
NEXT_HOP_MODES = ("Auto", "Self", "Keep")
MAX_ALLOWED_LOCAL_AS = 10


@dataclass(frozen=True)
class BGPPeer:
    name: str
    peer_ip: IPv4Address | None  # None: the peers are the nodes peer_selector picks
    as_number: int | None  # None with peer_selector: each selected node's own
    node: str | None = None
    node_selector: str | None = None
    peer_selector: str | None = None
    reverse_peering: str = "Auto"
    password: PasswordRef | None = None
    hold_time: int = DEFAULT_HOLD_TIME
    keepalive_time: int = 0  # seconds between keepalives; 0: a third of the hold time
    restart_time: int = DEFAULT_RESTART_TIME
    max_prefixes: int = 0  # 0: no limit
    keep_original_next_hop: bool = False
    allow_pool_prefixes: bool = False
    allowed_local_as: int = 0  # numAllowedLocalASNumbers
    # peerIP's optional :port, where the peer accepts the session; None, not given: 179, or
    # the listenPort of the Pipit node that has peerIP and asNumber (Calico's rule)
    peer_port: int | None = None
    filters: tuple[str, ...] = ()  # BGPFilter names, applied in this order
    ttl_security: int = 0  # GTSM: the peer's distance in hops (0: off)
    local_as_number: int | None = None  # the AS the node peers as (None: its own)
    reachable_by: IPv4Address | None = None  # the gateway of a /32 route to peerIP
    next_hop_mode: str | None = None  # nextHopMode as written (None: not given, Auto)
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)

    @property
    def endpoint(self) -> str:
        """peerIP as written: the address, with the port if one was given (or the
        peerSelector)."""
        if self.peer_selector is not None:
            return f"selector {self.peer_selector}"
        return (str(self.peer_ip) if self.peer_port is None
                else f"{self.peer_ip}:{self.peer_port}")

    @property
    def scope(self) -> str:
        """global (every node) | node (one node, or the nodes a selector picks)."""
        return "global" if self.node is None and self.node_selector is None else "node"

    @property
    def rank(self) -> int:
        """Which of two peers with the same address wins on a node: the more specific."""
        return 0 if self.node is not None else 1 if self.node_selector is not None else 2

    def applies_to(self, node: NodeRecord) -> bool:
        if self.node is not None:
            return node.name == self.node
        if self.node_selector is not None:
            return parse_selector(self.node_selector).matches(node.labels)
        return True

    def selects_peer(self, node: NodeRecord) -> bool:
        """Whether `node` is one of the peers (peerSelector) of the nodes this applies to."""
        return (self.peer_selector is not None
                and parse_selector(self.peer_selector).matches(node.labels))

    def describe_scope(self) -> str:
        if self.node is not None:
            return self.node
        if self.node_selector is not None:
            return self.node_selector
        return "(global)"


def peer_from_spec(name: str, spec: Mapping) -> BGPPeer:
    """Build a peer from its resource spec; any problem is one InvalidResource sentence."""
    check_name(KIND, name)
    read = SpecReader(KIND, name, spec, _FIELDS, UNSUPPORTED)
    where = read.where
    peer_selector = read.string("peerSelector") or None
    reverse = read.string("reversePeering") or "Auto"
    if reverse not in REVERSE_PEERING:
        raise read.fail(f"reversePeering {reverse!r} must be Auto or Manual.")
    if peer_selector is not None:
        if spec.get("peerIP") not in (None, ""):
            raise read.fail("give either peerIP or peerSelector, not both.")
        if spec.get("asNumber") is not None:
            raise read.fail("asNumber goes with peerIP: with peerSelector each selected node "
                            "is peered with its own AS number.")
        try:
            parse_selector(peer_selector)
        except InvalidResource as error:
            raise read.fail(f"peerSelector: {error}") from None
        peer_ip, peer_port, as_number = None, None, None
    else:
        if "reversePeering" in spec:
            raise read.fail("reversePeering goes with peerSelector (sessions between nodes).")
        peer_ip, peer_port = _peer_address(read)
        if spec.get("asNumber") is None:
            raise read.fail("spec.asNumber is required (the peer's AS number, such as 65001).")
        as_number = parse_as_number(spec["asNumber"], where)
    local_as_number = None
    if spec.get("localASNumber") is not None:
        if peer_selector is not None:
            raise read.fail("localASNumber goes with peerIP: sessions between nodes use the "
                            "nodes' own AS numbers.")
        local_as_number = parse_as_number(spec["localASNumber"], where, "localASNumber")
    node = read.string("node") or None
    if node is not None:
        try:
            check_name("node", node)
        except InvalidResource:
            raise read.fail(f"node {node!r} is not a valid node name.") from None
    selector = read.string("nodeSelector") or None
    if node is not None and selector is not None:
        raise read.fail("give either node or nodeSelector, not both.")
    if selector is not None:
        try:
            parse_selector(selector)
        except InvalidResource as error:
            raise read.fail(f"nodeSelector: {error}") from None
    restart = check_restart_time(read.seconds("maxRestartTime", DEFAULT_RESTART_TIME),
                                 "maxRestartTime", where)
    max_prefixes = read.integer("maxPrefixes", 0)
    if max_prefixes < 0:
        raise read.fail(f"maxPrefixes {max_prefixes} must be 0 (no limit) or more.")
    allowed = read.integer("numAllowedLocalASNumbers", 0)
    if not 0 <= allowed <= MAX_ALLOWED_LOCAL_AS:
        raise read.fail(f"numAllowedLocalASNumbers {allowed} is outside 0-"
                        f"{MAX_ALLOWED_LOCAL_AS}.")
    source = read.string("sourceAddress") or "UseNodeIP"
    if source != "UseNodeIP":
        raise read.fail(f"sourceAddress {source!r} is not supported: Pipit peers from the "
                        "node's address (UseNodeIP, Calico's default).")
    hold_time = check_hold_time(read.seconds("holdTime", DEFAULT_HOLD_TIME), where)
    return BGPPeer(
        name=name, peer_ip=peer_ip, as_number=as_number, node=node, node_selector=selector,
        peer_selector=peer_selector, reverse_peering=reverse,
        password=parse_password(read, spec.get("password")),
        hold_time=hold_time, keepalive_time=_keepalive_time(read, hold_time),
        restart_time=restart, max_prefixes=max_prefixes,
        keep_original_next_hop=read.boolean("keepOriginalNextHop"),
        allow_pool_prefixes=read.boolean("allowPoolPrefixes"),
        allowed_local_as=allowed, peer_port=peer_port, filters=_filter_names(read),
        ttl_security=_ttl_security(read), local_as_number=local_as_number,
        reachable_by=_reachable_by(read, peer_ip), next_hop_mode=_next_hop_mode(read))


def _keepalive_time(read: SpecReader, hold_time: int) -> int:
    """keepaliveTime (Calico's): seconds between keepalives, below the hold time; not given,
    a third of the hold time (0)."""
    if read.spec.get("keepaliveTime") is None:
        return 0
    keepalive = read.seconds("keepaliveTime", 0)
    if hold_time == 0:
        raise read.fail("keepaliveTime cannot be set with holdTime 0: such a session sends no "
                        "keepalives.")
    if not 1 <= keepalive < hold_time:
        raise read.fail(f"keepaliveTime {keepalive} must be 1 or more and below holdTime "
                        f"{hold_time} (else the peer's hold timer expires between two).")
    return keepalive


def _next_hop_mode(read: SpecReader) -> str | None:
    if not read.string("nextHopMode"):
        return None
    mode = read.choice("nextHopMode", "Auto", NEXT_HOP_MODES)
    if read.boolean("keepOriginalNextHop"):
        raise read.fail("give either nextHopMode or keepOriginalNextHop (which it replaces), "
                        "not both.")
    return mode


def _reachable_by(read: SpecReader, peer_ip: IPv4Address | None) -> IPv4Address | None:
    text = read.string("reachableBy") or None
    if text is None:
        return None
    if peer_ip is None:
        raise read.fail("reachableBy goes with peerIP: it is the gateway of the route to that "
                        "address.")
    try:
        gateway = ip_address(text.strip())
    except ValueError:
        raise read.fail(f"reachableBy {text!r} is not an IP address (the gateway through "
                        "which peerIP is reached, such as 10.0.0.1).") from None
    if gateway.version != 4:
        raise read.fail(f"reachableBy {gateway} is IPv6, and peerIP {peer_ip} IPv4.")
    if gateway == peer_ip:
        raise read.fail(f"reachableBy {gateway} is peerIP itself; leave reachableBy out for a "
                        "peer on the node's own network.")
    special = _special(gateway)
    if special:
        raise read.fail(f"reachableBy {gateway} is {special}, which cannot be a gateway.")
    return gateway


def _ttl_security(read: SpecReader) -> int:
    hops = read.integer("ttlSecurity", 0)
    if not 0 <= hops <= 254:
        raise read.fail(f"ttlSecurity {hops} must be the number of hops to the peer, 1-254 "
                        "(0 or none: off).")
    return hops


def _filter_names(read: SpecReader) -> tuple[str, ...]:
    names = read.spec.get("filters")
    if names is None:
        return ()
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise read.fail(f"filters must list BGPFilter names, not {shown(names)}.")
    for name in names:
        try:
            check_name("BGPFilter", name)
        except InvalidResource:
            raise read.fail(f"filters: {shown(name)} is not a valid BGPFilter name.") from None
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise read.fail(f"filters names BGPFilter {twice!r} twice.")
    return tuple(names)


_WITH_PORT = re.compile(r"(\d+\.\d+\.\d+\.\d+):(\d+)|\[([0-9a-fA-F:.]+)\]:(\d+)")


def _peer_address(read: SpecReader) -> tuple[IPv4Address, int | None]:
    """peerIP: an address, or address:port for a peer that listens elsewhere than 179 (a
    reflector, a router with another daemon on 179), in Calico's forms 10.0.0.1:1179 and
    [fd00::1]:1179; the port None when not given."""
    text = read.string("peerIP")
    if not text:
        raise read.fail("spec.peerIP is required (the router's address, such as 10.0.0.1), "
                        "or peerSelector (the nodes to peer with).")
    text = text.strip()
    port = None
    with_port = _WITH_PORT.fullmatch(text)
    if with_port:
        host = with_port[1] or with_port[3]
        digits = with_port[2] or with_port[4]
        port = int(digits)
        if not 1 <= port <= 65535 or len(digits) > 5:
            raise read.fail(f"peerIP {text!r} has port {digits}, outside 1-65535.")
        text = host
    try:
        address = ip_address(text)
    except ValueError:
        raise read.fail(f"peerIP {read.spec['peerIP']!r} is not an IP address (write one "
                        "address, such as 10.0.0.1, or an address and port, such as "
                        "10.0.0.1:1179, without a prefix length).") from None
    if address.version != 4:
        raise read.fail(f"peerIP {address} is IPv6; Pipit peers over IPv4 only for now.")
    special = _special(address)
    if special:
        raise read.fail(f"peerIP {address} is {special}, which no BGP router can have.")
    return address, port


def _special(address: IPv4Address) -> str:
    """What makes an address no router's ("" for a usable one)."""
    for bad, what in ((address.is_unspecified, "the unspecified address"),
                      (address.is_loopback, "a loopback address"),
                      (address.is_multicast, "a multicast address"),
                      (address == IPv4Address("255.255.255.255"), "the broadcast address"),
                      (address.is_reserved, "a reserved (class E) address")):
        if bad:
            return what
    return ""


def peer_to_spec(peer: BGPPeer) -> dict:
    if peer.peer_selector is not None:
        spec: dict = {"peerSelector": peer.peer_selector,
                      "reversePeering": peer.reverse_peering}
    else:
        spec = {"peerIP": peer.endpoint, "asNumber": peer.as_number}
    if peer.node is not None:
        spec["node"] = peer.node
    if peer.node_selector is not None:
        spec["nodeSelector"] = peer.node_selector
    if peer.password is not None:
        spec["password"] = peer.password.to_spec()
    spec.update({
        "holdTime": peer.hold_time, "maxRestartTime": peer.restart_time,
        "maxPrefixes": peer.max_prefixes, "keepOriginalNextHop": peer.keep_original_next_hop,
        "allowPoolPrefixes": peer.allow_pool_prefixes,
        "numAllowedLocalASNumbers": peer.allowed_local_as,
    })
    if peer.filters:
        spec["filters"] = list(peer.filters)
    if peer.ttl_security:
        spec["ttlSecurity"] = peer.ttl_security
    if peer.local_as_number is not None:
        spec["localASNumber"] = peer.local_as_number
    if peer.reachable_by is not None:
        spec["reachableBy"] = str(peer.reachable_by)
    if peer.next_hop_mode is not None:
        spec["nextHopMode"] = peer.next_hop_mode
    if peer.keepalive_time:
        spec["keepaliveTime"] = peer.keepalive_time
    return spec


def peer_to_document(peer: BGPPeer) -> dict:
    return make_document(KIND, peer.name, peer_to_spec(peer), peer.labels, peer.annotations)


def peer_from_document(doc: Mapping) -> BGPPeer:
    document = read_document(doc)
    return with_metadata(peer_from_spec(document.name, dict(document.spec)), document)


# -- checks against the other resources ----------------------------------------------------

def check_peer(peer: BGPPeer, peers: Iterable[BGPPeer], nodes: Iterable[NodeRecord],
               filters: Iterable[str] | None = None) -> None:
    """Refuse a peer that is the node it applies to, or that a stored peer already covers
    (same address for an overlapping set of nodes); a peerSelector that would only ever
    peer a node with itself; one naming a BGPFilter that is not among `filters` (names)."""
    nodes = list(nodes)
    where = f"{KIND} {peer.name!r}"
    if filters is not None:
        known = set(filters)
        for name in peer.filters:
            if name not in known:
                raise InvalidResource(f"{where}: filters names BGPFilter {name!r}, which does "
                                      "not exist (apply the BGPFilter first, or with the "
                                      "BGPPeer in the same input).")
    if peer.peer_selector is not None:
        pairs = {(a.name, b.name) for a in nodes if peer.applies_to(a)
                 for b in nodes if peer.selects_peer(b)}
        if pairs and all(a == b for a, b in pairs):
            [(only, _)] = pairs
            raise InvalidResource(f"{where}: its nodeSelector and peerSelector pick only node "
                                  f"{only}, which cannot peer with itself.")
        return
    for node in nodes:
        if node.address is not None and node.address.ip == peer.peer_ip and \
                peer.node is not None and peer.applies_to(node):
            raise InvalidResource(f"{where}: peerIP {peer.peer_ip} is the address of node "
                                  f"{node.name} itself, which cannot peer with itself.")
    for other in peers:
        if other.name == peer.name or other.peer_ip is None or other.peer_ip != peer.peer_ip:
            continue
        shared = _overlap(peer, other, nodes)
        if shared:
            raise InvalidResource(f"{where}: BGPPeer {other.name!r} already peers with "
                                  f"{peer.peer_ip} for {shared}; change that one instead.")


def _overlap(a: BGPPeer, b: BGPPeer, nodes: list[NodeRecord]) -> str:
    """Which nodes both peers apply to, in words ("" if none)."""
    if a.scope == "global" and b.scope == "global":
        return "every node"
    if a.scope == "global" or b.scope == "global":
        narrow = b if a.scope == "global" else a
        return (f"node {narrow.node}" if narrow.node is not None
                else f"the nodes {narrow.node_selector!r} selects")
    if a.node is not None and b.node is not None:
        return f"node {a.node}" if a.node == b.node else ""
    if a.node_selector is not None and b.node_selector is not None and \
            parse_selector(a.node_selector) == parse_selector(b.node_selector):
        return f"the nodes {a.node_selector!r} selects"
    both = sorted(n.name for n in nodes if a.applies_to(n) and b.applies_to(n))
    return f"node {', '.join(both)}" if both else ""
