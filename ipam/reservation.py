"""IP reservations (Calico's IPReservation): addresses of the pools that IPAM must not hand out
on its own, such as a router's, a VIP's or a node's own address that lies inside a pool.

They are consulted for every automatic assignment (a pod's, a tunnel's): a reserved address is
skipped and a block whose every address is reserved is not claimed. As in Calico, an address
in use when its reservation is made keeps its holder (nothing is released), and a pod that
asks for a given address (the `ipAddrs` annotation) gets it, reserved or not.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from ipam.block import reserved_ordinals
from ipam.errors import InvalidResource, PipitError
from ipam.resource import SpecReader, make_document, read_document, shown, with_metadata

log = logging.getLogger(__name__)
KIND = "IPReservation"
_FIELDS = {"reservedCIDRs"}


@dataclass(frozen=True)
class IPReservation:
    name: str
    cidrs: tuple[IPv4Network, ...]
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)


_EXPECTED = "an address or a CIDR such as 10.244.0.7 or 10.244.1.0/28"


def _parse_cidr(text: object, read: SpecReader) -> IPv4Network:
    if not isinstance(text, str):
        raise read.fail(f"reservedCIDRs holds {shown(text)}, which is not {_EXPECTED}.")
    return read.ipv4_network("reservedCIDRs entry", text, _EXPECTED)


def reservation_from_spec(name: str, spec: Mapping) -> IPReservation:
    """Build a reservation from its resource spec; any problem is one InvalidResource
    sentence."""
    read = SpecReader(KIND, name, spec, _FIELDS)
    entries = spec.get("reservedCIDRs")
    if not isinstance(entries, list) or not entries:
        raise read.fail("spec.reservedCIDRs must list at least one address or CIDR (for "
                        "example [10.244.0.7, 10.244.1.0/28]).")
    return IPReservation(name, tuple(dict.fromkeys(_parse_cidr(e, read) for e in entries)))


def reservation_to_document(reservation: IPReservation) -> dict:
    spec = {"reservedCIDRs": [str(c) if c.prefixlen < 32 else str(c.network_address)
                              for c in reservation.cidrs]}
    return make_document(KIND, reservation.name, spec, reservation.labels,
                         reservation.annotations)


def reservation_from_document(doc: Mapping) -> IPReservation:
    document = read_document(doc)
    if document.kind != KIND:
        raise InvalidResource(f"{document.kind} {document.name!r} is not an {KIND}.")
    return with_metadata(reservation_from_spec(document.name, dict(document.spec)), document)


def read_reservations(entries) -> list[IPReservation]:
    """The valid reservations among stored entries; an invalid one (written by hand) is logged
    and left out."""
    found = []
    for entry in entries:
        try:
            found.append(reservation_from_document(entry.value))
        except PipitError as error:
            log.warning("ignoring the IP reservation at %s: %s", entry.key, error)
    return found


@dataclass(frozen=True)
class Reserved:
    """Every reserved range, as integer (first, last) pairs: what the allocator asks."""
    ranges: tuple[tuple[int, int], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def holds(self, address: IPv4Address) -> bool:
        value = int(address)
        return any(first <= value <= last for first, last in self.ranges)

    def ordinals(self, block: IPv4Network) -> frozenset[int]:
        """The ordinals of `block` that are reserved."""
        start = int(block.network_address)
        end = start + block.num_addresses - 1
        found: set[int] = set()
        for first, last in self.ranges:
            if first <= end and last >= start:
                found.update(range(max(first, start) - start, min(last, end) - start + 1))
        return frozenset(found)

    def covers(self, block: IPv4Network) -> bool:
        """Whether no address of `block` that IPAM could hand out is left unreserved."""
        if not self.ranges:
            return False
        size = block.num_addresses
        return set(range(size)) - set(reserved_ordinals(size)) <= self.ordinals(block)


def reserved_by(reservations: Iterable[IPReservation]) -> Reserved:
    return Reserved(tuple(sorted({(int(c.network_address), int(c.broadcast_address))
                                  for r in reservations for c in r.cidrs})))


def reservations_holding(reservations: Iterable[IPReservation],
                         address: IPv4Address) -> list[str]:
    """The names of the reservations that hold `address`."""
    return sorted(r.name for r in reservations if any(address in c for c in r.cidrs))
