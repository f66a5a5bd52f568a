"""Next hops that no link of the node reaches, resolved through the kernel's own route to them:
BIRD's `gateway recursive`, which Calico's BGP configuration sets on every session. A node
learns `10.244.7.0/26` from a node in another subnet (mesh or reflector, pool without
encapsulation) or from a multihop peer; the kernel refuses `via 192.168.4.10` when that
address is not on one of its links, so the route goes via the gateway the kernel itself uses
to reach 192.168.4.10 (`via 192.168.3.1 dev eth0`: the node's router, a ToR that learned
the block too). Pure; the agent looks the routes up (ipip.kernel_routes.KernelRoutes.lookup)
on every routing pass and every UNDERLAY_CHECK_SECONDS.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network

from ipip.route_netlink import RTN_UNICAST
from ipip.routes import RTPROT_PIPIT, FibMatch, NextHop, Route

# How often the kernel's routes to far next hops are looked up again between routing passes:
# Calico's BIRD scans the kernel's table every 2 s.
UNDERLAY_CHECK_SECONDS = 2.0


def _plain(hop: NextHop) -> bool:
    """A next hop without a device, which the kernel must find on one of its links."""
    return hop.ifindex is None and not hop.onlink


def far_gateways(routes: Iterable[Route], local: IPv4Network) -> frozenset[IPv4Address]:
    """The gateways of plain next hops outside the node's own network: each needs a look at
    the kernel's route to it (another link of the node may still reach it directly)."""
    return frozenset(hop.gateway for route in routes for hop in route.nexthops
                     if _plain(hop) and hop.gateway not in local)


def through(match: FibMatch | None) -> tuple[NextHop, ...] | None:
    """The next hops that replace a far gateway, from the kernel's route to it (`match`): that
    route's gateways on their devices. `()`: the gateway is on a link after all (a route with
    no gateway), it stays as it is. None: nothing usable leads to it (no route, a blackhole
    or unreachable one, or one of Pipit's own: a pod block is no way to a node); it stays too,
    and the kernel refuses its routes."""
    if match is None or match.kind != RTN_UNICAST or match.protocol == RTPROT_PIPIT:
        return None
    return match.nexthops


def resolve(routes: Mapping[IPv4Network, Route],
            resolved: Mapping[IPv4Address, tuple[NextHop, ...] | None]
            ) -> Mapping[IPv4Network, Route]:
    """`routes` with every plain next hop whose gateway resolved to next hops (through())
    replaced by them (ECMP if several; duplicates merged); `routes` itself when none did."""
    resolved = {gateway: hops for gateway, hops in resolved.items() if hops}
    if not resolved:
        return routes
    result = {}
    for dst, route in routes.items():
        if any(_plain(hop) and hop.gateway in resolved for hop in route.nexthops):
            hops = dict.fromkeys(
                replacement for hop in route.nexthops
                for replacement in (resolved.get(hop.gateway, (hop,)) if _plain(hop)
                                    else (hop,)))
            route = Route(dst, tuple(hops), table=route.table)
        result[dst] = route
    return result
