"""Routes for the route tests, written the way `ip route` shows them."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from ipip.routes import NextHop, Route

A = IPv4Address
N = IPv4Network
GW1, GW2, GW3 = A("192.168.0.2"), A("192.168.0.3"), A("192.168.0.4")


def via(dst: str, *gateways: IPv4Address, ifindex: int | None = None, onlink: bool = False,
        table: int = 254) -> Route:
    return Route(N(dst), tuple(NextHop(gw, ifindex, onlink) for gw in gateways), table=table)


def blackhole(dst: str) -> Route:
    return Route(N(dst), blackhole=True)


def by_dst(*routes: Route) -> dict[IPv4Network, Route]:
    return {route.dst: route for route in routes}
