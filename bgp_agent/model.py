"""The vocabulary the agent and its BGP speaker share: neighbours, received paths, the routes
this node announces, a peer's session state, and the Speaker interface itself. Plain frozen
data, no I/O."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Protocol

DEFAULT_AS = 64512
DEFAULT_HOLD_TIME = 90
DEFAULT_RESTART_TIME = 120
MAX_RESTART_TIME = 4095  # the graceful restart capability's 12-bit field (RFC 4724)


@dataclass(frozen=True)
class Neighbor:
    """One BGP session this node should have."""
    address: IPv4Address
    peer_as: int
    local_address: IPv4Address
    local_as: int
    kind: str = "mesh"  # how the peer was chosen: mesh | global | node (BGPPeer with peerIP)
    #                     | reflector (a node that is a route reflector) | peer-node (another
    #                     node a BGPPeer's peerSelector picks)
    name: str = ""  # the node name or BGPPeer resource behind it
    # this node is a route reflector and the peer is its client (routes from clients go to
    # every peer, routes from non-clients to clients only; RFC 4456)
    rr_client: bool = False
    hold_time: int = DEFAULT_HOLD_TIME
    password: str | None = None  # TCP MD5
    restart_time: int = DEFAULT_RESTART_TIME  # graceful restart; 0 disables it
    listen_port: int = 179  # where this node accepts the session (BGPConfiguration listenPort)
    # only wait for the peer to connect: between two nodes, the one with the lower address
    # (ExaBGP on both ends drops both connections of a collision, and two nodes that keep
    # connecting at the same moment never come up)
    passive: bool = False
    peer_port: int = 179  # where the peer accepts it (another node: the same listenPort)
    keepalive_time: int = 0  # seconds between keepalives; 0: a third of the hold time
    ttl_security: int = 0  # GTSM: the peer's distance in hops; 0: off
    # import policy for this peer (not part of ExaBGP's configuration: changing them does
    # not touch the session)
    max_prefixes: int = 0  # more received prefixes than this disconnect the peer; 0: no limit
    allow_pool_prefixes: bool = False  # accept routes equal to or inside an IP pool
    allowed_local_as: int = 0  # times our own AS may appear in a received AS path
    keep_original_next_hop: bool = False
    # the BGPFilters (bgp_agent.bgp_filter) of its BGPPeer, in the order it names them
    filters: tuple = ()
    # BGPPeer reachableBy: the kernel holds a /32 route to the peer through this gateway
    # (policy.peer_routes), over any route to it learned from BGP
    reachable_by: IPv4Address | None = None
    # BGPPeer nextHopMode Self: a reflector reflects to this member with its own address as
    # next hop (bgp_agent.reflection)
    next_hop_self: bool = False


@dataclass(frozen=True)
class Path:
    """A route received from a peer."""
    prefix: IPv4Network
    next_hop: IPv4Address
    as_path: tuple[int, ...] = ()
    communities: tuple[tuple[int, int], ...] = ()
    local_pref: int | None = None
    med: int | None = None
    origin: str = "igp"
    originator_id: IPv4Address | None = None
    cluster_list: tuple[IPv4Address, ...] = ()
    large_communities: tuple[tuple[int, int, int], ...] = ()  # RFC 8092
    extended_communities: tuple[int, ...] = ()  # RFC 4360, each its 8 octets as a number


@dataclass(frozen=True)
class Announcement:
    """A route this node sends to one neighbour. next_hop None means "self"."""
    prefix: IPv4Network
    next_hop: IPv4Address | None = None
    communities: tuple[tuple[int, int], ...] = ()
    as_path: tuple[int, ...] = ()
    local_pref: int | None = None
    med: int | None = None
    originator_id: IPv4Address | None = None
    cluster_list: tuple[IPv4Address, ...] = ()
    large_communities: tuple[tuple[int, int, int], ...] = ()  # RFC 8092
    origin: str = "igp"  # igp | egp | incomplete (a reflected route keeps its own)
    extended_communities: tuple[int, ...] = ()  # RFC 4360 (a reflected route keeps its own)


def with_prefix(route: Path | Announcement, prefix: IPv4Network) -> Path | Announcement:
    """dataclasses.replace(route, prefix=prefix), three times as fast: a frozen dataclass's
    __init__ sets its fields one by one through object.__setattr__, and tables are made of
    thousands of routes that differ in their prefix only. Path and Announcement keep their
    fields in their __dict__ and check nothing on creation (no __post_init__)."""
    clone = object.__new__(type(route))
    fields_of = clone.__dict__
    fields_of.update(route.__dict__)
    fields_of["prefix"] = prefix
    return clone


@dataclass(frozen=True)
class PeerState:
    address: IPv4Address
    state: str = "idle"  # idle | up | down (only "up" is Established)
    since: float = 0.0  # time.time() of the last state change
    reason: str = ""  # why the session went down, as the speaker said
    notification: bool = False  # it went down with a NOTIFICATION (sent or received)
    graceful_restart: bool = False  # negotiated in the last OPEN exchange
    restart_time: int = 0  # the peer's advertised restart time
    router_id: IPv4Address | None = None
    end_of_rib: bool = False  # the peer finished its initial table since the session came up
    extra: dict = field(default_factory=dict)


class SpeakerError(Exception):
    """The speaker refused or failed a request."""


class Speaker(Protocol):
    """A BGP speaker as the routing loop sees it (MetalLB's session interface is the model):
    what it reads, as of the speaker's last event, and what it asks. ExaBGP behind
    pipit-exabgp-bridge (bgp_agent.speaker) is the backend; tests use one in memory."""

    @property
    def connected(self) -> bool:
        """The tables below are the speaker's (False: unknown, e.g. ExaBGP restarting)."""

    @property
    def peers(self) -> Mapping[IPv4Address, PeerState]: ...

    @property
    def received(self) -> Mapping[IPv4Address, Mapping[IPv4Network, Path]]:
        """Per peer that is up, the paths of its current session."""

    @property
    def announced(self) -> Mapping[IPv4Address, Mapping[IPv4Network, Announcement]]:
        """Per neighbour, what the speaker holds to send it (sent, or sent once it is up)."""

    @property
    def own(self) -> Mapping[IPv4Address, Set[IPv4Network]]:
        """Per neighbour, the prefixes of `announced` that are this node's own routes (next
        hop self), not reflected ones."""

    async def set_neighbors(self, neighbors: Sequence[Neighbor]) -> None:
        """The whole set of sessions to have; unchanged neighbours keep their sessions."""

    async def announce(self, neighbor: IPv4Address, routes: Sequence[Announcement]) -> None: ...

    async def withdraw(self, neighbor: IPv4Address, prefixes: Sequence[IPv4Network]) -> None: ...

    def announce_to(self, neighbors: Sequence[IPv4Address],
                    routes: Sequence[Announcement]) -> Awaitable[None]:
        """announce() to several neighbours at once (a reflector's fan-out). Asked when it is
        called, not when awaited: what is asked after it is sent after it (a reflector's
        next pass does not wait for its last pass's sends to be done)."""

    def withdraw_from(self, neighbors: Sequence[IPv4Address],
                      prefixes: Sequence[IPv4Network]) -> Awaitable[None]:
        """withdraw() from several neighbours at once; asked when called, as announce_to."""

    async def send_end_of_rib(self, neighbor: IPv4Address) -> None:
        """Tell the neighbour our table is complete (after a session comes up)."""
