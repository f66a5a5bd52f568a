"""Pipit's routes as data: a route, its next hops, a route the kernel refused, and the diff
that turns one table into another. Pure; ipip.route_netlink encodes them, ipip.kernel_routes
sends them, ipip.route_table keeps them applied.

Every route Pipit installs carries its own routing protocol number, RTPROT_PIPIT. That number
is how the agent finds its routes again after a restart (the kernel filters a dump by it) and
how a delete is kept from ever removing a route another daemon owns (the kernel matches it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

# Pipit's routing protocol number (rtm_protocol). The kernel interprets only 0-4; 91 is in
# none of linux/rtnetlink.h, iproute2's rt_protos (bird is 12: the lab's ToR BIRD) or FRR's
# 186-197. `ip route show proto 91` lists Pipit's routes.
RTPROT_PIPIT = 91

MAIN_TABLE = 254


@dataclass(frozen=True, slots=True)
class NextHop:
    """One next hop. `ifindex=None` lets the kernel pick the device; `onlink` (IPIP / VXLAN:
    `via <ip> dev tunl0 onlink`) needs a device."""

    gateway: IPv4Address
    ifindex: int | None = None
    onlink: bool = False

    def __post_init__(self) -> None:
        if self.onlink and self.ifindex is None:
            raise ValueError(f"next hop {self.gateway} is onlink but names no device (ifindex)")


def _nexthop_order(nexthop: NextHop) -> tuple[int, int, bool]:
    return int(nexthop.gateway), -1 if nexthop.ifindex is None else nexthop.ifindex, nexthop.onlink


@dataclass(frozen=True, slots=True)
class Route:
    """A route Pipit owns: `dst` via `nexthops` (several = ECMP multipath) or a blackhole."""

    dst: IPv4Network
    nexthops: tuple[NextHop, ...] = ()
    blackhole: bool = False
    table: int = MAIN_TABLE

    def __post_init__(self) -> None:
        if bool(self.nexthops) == self.blackhole:
            raise ValueError(
                f"route {self.dst} needs next hops or blackhole=True, not both or neither")
        # Canonical order, so that two routes with the same next hops compare equal.
        if len(self.nexthops) > 1 or not isinstance(self.nexthops, tuple):
            object.__setattr__(self, "nexthops", tuple(sorted(self.nexthops, key=_nexthop_order)))

    def __str__(self) -> str:
        if self.blackhole:
            return f"blackhole {self.dst}"
        hops = " ".join(
            f"via {nh.gateway}" + (f" dev #{nh.ifindex}" if nh.ifindex is not None else "")
            + (" onlink" if nh.onlink else "")
            for nh in self.nexthops
        )
        return f"{self.dst} {hops}"


@dataclass(frozen=True, slots=True)
class FibMatch:
    """The kernel's route that carries traffic to one address (`ip route get fibmatch`), any
    protocol's: its prefix, type (RTN_*), protocol, next hops (each with its device) and, for
    a route straight onto a link (no gateway), that link's device."""

    dst: IPv4Network
    kind: int
    protocol: int
    nexthops: tuple[NextHop, ...] = ()
    ifindex: int | None = None


@dataclass(frozen=True, slots=True)
class RouteError:
    """A route the kernel refused; the routes around it were still applied."""

    route: Route
    op: str  # "add", "replace" or "delete"
    errno: int
    message: str = ""  # the kernel's extended ack text, when it gave one

    def __str__(self) -> str:
        text = f"{self.op} {self.route}: {os.strerror(self.errno)}"
        return f"{text} ({self.message})" if self.message else text


def satisfies(want: Route, have: Route | None) -> bool:
    """Whether `have`, the kernel's route for the same prefix, is what `want` asks for. The
    kernel reports the device it resolved for every next hop, so a wanted next hop without a
    device matches any."""
    if have is None or want.blackhole != have.blackhole or want.table != have.table:
        return False
    if len(want.nexthops) != len(have.nexthops):
        return False
    for w, h in zip(want.nexthops, have.nexthops):
        if w is not h and not (
            w.gateway == h.gateway
            and w.onlink == h.onlink
            and (w.ifindex is None or w.ifindex == h.ifindex)
        ):
            return False
    return True


def diff(
    desired: Mapping[IPv4Network, Route], actual: Mapping[IPv4Network, Route]
) -> tuple[list[Route], list[Route]]:
    """(routes to install or replace, routes to delete) to turn `actual` into `desired`."""
    to_replace = [route for dst, route in desired.items() if not satisfies(route, actual.get(dst))]
    to_delete = [route for dst, route in actual.items() if dst not in desired]
    return to_replace, to_delete
