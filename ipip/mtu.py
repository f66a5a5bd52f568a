"""MTUs: the uplink's, what the tunnel devices get, and what pods get (published for the CNI
configuration). The arithmetic is pure; `uplink` reads the kernel through a pyroute2 IPRoute
the caller opened in the node's network namespace."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from ipip.encap import OVERHEAD

MIN_MTU = 576  # the smallest IPv4 datagram every host must accept (RFC 791)


def tunnel_mtu(uplink_mtu: int, kind: str, override: int | None = None) -> int:
    """The MTU of this encapsulation's device: the uplink's minus the overhead, or `override`."""
    return _checked(override if override is not None else uplink_mtu - OVERHEAD[kind])


def pod_mtu(uplink_mtu: int, kinds: Iterable[str], override: int | None = None) -> int:
    """The MTU pods get: a pod does not know which of its peers are reached through which
    encapsulation, so it is the smallest over every encapsulation in use (the uplink's when
    none is), or `override`."""
    overhead = max((OVERHEAD[kind] for kind in kinds), default=0)
    return _checked(override if override is not None else uplink_mtu - overhead)


def _checked(mtu: int) -> int:
    if mtu < MIN_MTU:
        raise ValueError(f"MTU {mtu} is below {MIN_MTU}, the least IPv4 allows; check the "
                         "uplink's MTU or the configured override.")
    return mtu


@dataclass(frozen=True)
class Uplink:
    index: int
    name: str
    mtu: int


def uplink(ipr, address: IPv4Address) -> Uplink:
    """The interface that holds the node's underlay `address`, and its MTU."""
    for entry in ipr.get_addr(family=socket.AF_INET, address=str(address)):
        index = entry["index"]
        link = ipr.get_links(index)[0]
        return Uplink(index, link.get("IFLA_IFNAME"), link.get("IFLA_MTU"))
    raise LookupError(f"no interface holds the node address {address}, so its MTU is unknown.")


def publish(path: str | os.PathLike, mtu: int) -> None:
    """Write the pod MTU where the CNI configuration reads it (a number and a newline),
    atomically: a reader sees the old value or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(f"{mtu}\n")
    os.replace(temp, path)
