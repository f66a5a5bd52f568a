"""RFC 4456's rules for one route: whether it loops, which peers it is reflected to, and the
attributes it goes out with."""

from __future__ import annotations

from ipaddress import IPv4Address

from route_reflector.route import Attributes, Route

CLIENT = "client"
NON_CLIENT = "non-client"
ROLES = (CLIENT, NON_CLIENT)


def looped(route: Route, router_id: IPv4Address, cluster_id: IPv4Address) -> bool:
    """The route has been through this cluster already (our cluster id in its CLUSTER_LIST) or
    started here (our router id as its ORIGINATOR_ID): it is ignored (RFC 4456 §8)."""
    originator = route.originator_id  # (None == an address: an exception inside ipaddress)
    return originator is not None and originator == router_id or cluster_id in route.cluster_list


def reflects(source_role: str, target_role: str) -> bool:
    """A client's best route goes to every other peer, a non-client's to clients only (RFC 4456
    §6); never back to the peer it came from, which the caller checks."""
    return source_role == CLIENT or target_role == CLIENT


def reflected(route: Route, cluster_id: IPv4Address) -> Attributes:
    """What the route is sent with: everything as received (next hop, AS path, LOCAL_PREF, MED,
    ORIGIN, communities: standard, large and extended), ORIGINATOR_ID set to the peer's router
    id if it had none, our cluster id prepended to CLUSTER_LIST."""
    return Attributes(
        next_hop=route.next_hop, as_path=route.as_path, communities=route.communities,
        local_pref=route.local_pref, med=route.med, origin=route.origin,
        originator_id=route.originator_id or route.peer_router_id,
        cluster_list=(cluster_id, *route.cluster_list),
        large_communities=route.large_communities,
        extended_communities=route.extended_communities)
