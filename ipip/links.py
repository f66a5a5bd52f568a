"""Small pyroute2 helpers shared by the tunnel devices: find a link, set its state and MTU,
and make its IPv4 addresses exactly a given set. Each change is made only when the kernel
differs, so a reconcile pass that changes nothing sends no writes."""

from __future__ import annotations

import socket
from collections.abc import Iterable
from ipaddress import IPv4Interface

IFF_UP = 0x1


class DataplaneError(RuntimeError):
    """The kernel cannot be brought to the wanted state; the text is one sentence for a person."""


def lookup(ipr, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def link(ipr, index: int):
    return ipr.get_links(index)[0]


def set_state(ipr, index: int, *, up: bool, mtu: int | None = None,
              mac: str | None = None) -> None:
    current = link(ipr, index)
    changes: dict = {}
    if mtu is not None and current.get("IFLA_MTU") != mtu:
        changes["mtu"] = mtu
    if mac is not None and (current.get("IFLA_ADDRESS") or "").lower() != mac.lower():
        changes["address"] = mac
    if bool(current["flags"] & IFF_UP) != up:
        changes["state"] = "up" if up else "down"
    if changes:
        ipr.link("set", index=index, **changes)


def addresses(ipr, index: int) -> set[IPv4Interface]:
    return {IPv4Interface((entry.get("IFA_ADDRESS"), entry["prefixlen"]))
            for entry in ipr.get_addr(family=socket.AF_INET, index=index)}


def set_addresses(ipr, index: int, wanted: Iterable[IPv4Interface]) -> None:
    """Make the device's IPv4 addresses exactly `wanted` (the device is Pipit's: any other
    address on it is stale)."""
    wanted = set(wanted)
    have = addresses(ipr, index)
    for address in have - wanted:
        ipr.addr("del", index=index, address=str(address.ip), prefixlen=address.network.prefixlen)
    for address in wanted - have:
        ipr.addr("add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen)
