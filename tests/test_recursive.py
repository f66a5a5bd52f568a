"""Next hops on none of the node's links, resolved through the kernel's route to them
(ipip.recursive, pure). test_kernel_routes has the kernel's answers, test_agent_encapsulation
the agents end to end."""

from __future__ import annotations

import pytest

from ipip.recursive import far_gateways, resolve, through
from ipip.route_netlink import RTN_BLACKHOLE, RTN_UNICAST
from ipip.routes import RTPROT_PIPIT, FibMatch, NextHop
from tests.route_support import A, N, blackhole, by_dst, via

LOCAL = N("192.168.3.0/24")
ROUTER, OTHER_ROUTER = A("192.168.3.1"), A("192.168.3.2")
FAR, FAR2 = A("192.168.4.10"), A("192.168.4.11")
NEAR = A("192.168.3.11")
ETH0 = 2


def test_far_gateways_are_plain_next_hops_outside_the_nodes_network():
    routes = [
        via("10.244.1.0/26", NEAR),                              # on the node's own network
        via("10.244.2.0/26", FAR),                               # far
        via("10.244.3.0/26", FAR2, NEAR),                        # ECMP, one of them far
        via("10.244.4.0/26", A("172.16.0.9"), ifindex=7, onlink=True),  # a tunnel's: on a device
        via("10.244.5.0/26", A("10.0.0.1"), ifindex=ETH0),      # a device named: the kernel's say
        blackhole("10.244.6.0/26"),
    ]
    assert far_gateways(routes, LOCAL) == {FAR, FAR2}
    assert far_gateways([], LOCAL) == frozenset()


def unicast(*hops: NextHop, protocol: int = 3, dst: str = "0.0.0.0/0",
            ifindex: int | None = None) -> FibMatch:
    return FibMatch(N(dst), RTN_UNICAST, protocol, hops, ifindex)


@pytest.mark.parametrize("match, expected", [
    (unicast(NextHop(ROUTER, ETH0)), (NextHop(ROUTER, ETH0),)),               # default route
    (unicast(NextHop(ROUTER, ETH0), NextHop(OTHER_ROUTER, ETH0)),             # ECMP: both
     (NextHop(ROUTER, ETH0), NextHop(OTHER_ROUTER, ETH0))),
    (unicast(protocol=2, dst="192.168.4.0/24", ifindex=3), ()),               # on another link
    (None, None),                                                             # no route
    (FibMatch(N("192.168.4.0/24"), RTN_BLACKHOLE, 4), None),                  # a blackhole
    (unicast(NextHop(NEAR, ETH0), protocol=RTPROT_PIPIT, dst="192.168.4.0/26"), None),  # ours
])
def test_through_takes_the_kernels_gateways_and_never_pipits_own_routes(match, expected):
    assert through(match) == expected


def test_resolve_replaces_far_plain_hops_only():
    routes = by_dst(
        via("10.244.1.0/26", NEAR),
        via("10.244.2.0/26", FAR),
        via("10.244.3.0/26", FAR, FAR2),         # both far, through one router: one hop
        via("10.244.4.0/26", FAR, ifindex=7, onlink=True),  # encapsulated: left alone
        via("10.244.5.0/26", A("192.168.5.5")),  # nothing leads there: left for the kernel
        via("10.244.6.0/26", A("192.168.6.6")),  # on another link: left as it is
        blackhole("10.244.7.0/26"),
    )
    resolved = {FAR: (NextHop(ROUTER, ETH0),), FAR2: (NextHop(ROUTER, ETH0),),
                A("192.168.5.5"): None, A("192.168.6.6"): ()}
    assert resolve(routes, resolved) == by_dst(
        via("10.244.1.0/26", NEAR),
        via("10.244.2.0/26", ROUTER, ifindex=ETH0),
        via("10.244.3.0/26", ROUTER, ifindex=ETH0),
        via("10.244.4.0/26", FAR, ifindex=7, onlink=True),
        via("10.244.5.0/26", A("192.168.5.5")),
        via("10.244.6.0/26", A("192.168.6.6")),
        blackhole("10.244.7.0/26"),
    )


def test_resolve_keeps_a_near_hop_beside_a_resolved_one_and_spreads_over_ecmp_routers():
    routes = by_dst(via("10.244.3.0/26", FAR, NEAR))
    resolved = {FAR: (NextHop(ROUTER, ETH0), NextHop(OTHER_ROUTER, ETH0))}
    [route] = resolve(routes, resolved).values()
    assert set(route.nexthops) == {NextHop(NEAR), NextHop(ROUTER, ETH0),
                                   NextHop(OTHER_ROUTER, ETH0)}
    assert resolve(routes, {}) == routes
