"""The reflector's vocabulary: a route received from a peer, the attributes it is reflected
with, and one change to send. Frozen data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from ipaddress import IPv4Address, IPv4Network

ORIGINS = ("igp", "egp", "incomplete")  # best first (RFC 4271 §9.1.2.2 b)


@dataclass(frozen=True, slots=True)
class Route:
    """A route in a peer's Adj-RIB-In. The fields before `peer` are bgp_agent.model.Path's, in
    its order; `peer` is the session it came from and `peer_router_id` that peer's BGP
    identifier (from its OPEN), which stands in for ORIGINATOR_ID when the route has none."""
    prefix: IPv4Network
    next_hop: IPv4Address
    as_path: tuple[int, ...] = ()
    communities: tuple[tuple[int, int], ...] = ()
    local_pref: int | None = None  # None: 100 in best-path selection (DEFAULT_LOCAL_PREF)
    med: int | None = None  # None: 0, the best value (RFC 4271 §9.1.2.2 c)
    origin: str = "igp"
    originator_id: IPv4Address | None = None
    cluster_list: tuple[IPv4Address, ...] = ()
    large_communities: tuple[tuple[int, int, int], ...] = ()
    extended_communities: tuple[int, ...] = ()
    peer: IPv4Address = field(kw_only=True)
    peer_router_id: IPv4Address = field(kw_only=True)

    def __post_init__(self):
        if self.origin not in ORIGINS:
            raise ValueError(f"origin {self.origin!r} is not one of {', '.join(ORIGINS)}")


@dataclass(frozen=True)
class Attributes:
    """The path attributes a route is reflected with: what was received, unchanged (next hop
    included), with ORIGINATOR_ID filled in and our cluster id prepended to CLUSTER_LIST.
    The names are bgp_agent.model.Announcement's, plus `origin`."""
    next_hop: IPv4Address
    as_path: tuple[int, ...] = ()
    communities: tuple[tuple[int, int], ...] = ()
    local_pref: int | None = None
    med: int | None = None
    origin: str = "igp"
    originator_id: IPv4Address | None = None
    cluster_list: tuple[IPv4Address, ...] = ()
    large_communities: tuple[tuple[int, int, int], ...] = ()
    extended_communities: tuple[int, ...] = ()

    def __hash__(self) -> int:
        return self._hash

    @cached_property
    def _hash(self) -> int:
        # Batching groups by attributes, and one set of attributes is shared by every prefix
        # and peer its route goes to; ipaddress hashes in Python, so this is computed once.
        return hash((self.next_hop, self.as_path, self.communities, self.local_pref, self.med,
                     self.origin, self.originator_id, self.cluster_list, self.large_communities,
                     self.extended_communities))


@dataclass(frozen=True, slots=True)
class Update:
    """One prefix's new state at a set of peers: announced with `attributes` (replacing what
    they had), or withdrawn when `attributes` is None. A list of updates is applied in order;
    `peers` is one shared set for a whole fan-out, not one update per peer."""
    peers: frozenset[IPv4Address]
    prefix: IPv4Network
    attributes: Attributes | None
