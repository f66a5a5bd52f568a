"""Turning a list of updates (what the reflector's calls returned, in order, possibly many
calls' worth) into what to send: per peer, or in batches of one attribute set for one group
of peers, the shape of ExaBGP's fastest command,

    neighbor A , neighbor B announce attributes <attributes> nlri P1 P2 ...
    neighbor A , neighbor B withdraw attributes nlri P1 P2 ...
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from route_reflector.route import Attributes, Update

MAX_PREFIXES = 1000  # per batch: bgp_agent.exabgp_bridge.BATCH, far below ExaBGP's 1 MiB line


@dataclass(frozen=True, slots=True)
class Batch:
    """Announce `prefixes` with `attributes` to every peer of `peers`, or withdraw them when
    `attributes` is None."""
    peers: frozenset[IPv4Address]
    attributes: Attributes | None
    prefixes: tuple[IPv4Network, ...]


def per_peer(updates: Iterable[Update]) -> dict[IPv4Address, dict[IPv4Network, Attributes | None]]:
    """The net effect of `updates` on each peer: per prefix, the attributes it was last
    announced with, or None if it was last withdrawn."""
    result: dict[IPv4Address, dict[IPv4Network, Attributes | None]] = {}
    for update in updates:
        for peer in update.peers:
            result.setdefault(peer, {})[update.prefix] = update.attributes
    return result


def batch(updates: Iterable[Update], max_prefixes: int = MAX_PREFIXES) -> list[Batch]:
    """The net effect of `updates` (later ones win, peer by peer) in as few batches as it takes:
    one per distinct (peers, attributes), split every `max_prefixes`. Every (peer, prefix) is
    in at most one batch, so the batches may be sent in any order."""
    if max_prefixes < 1:
        raise ValueError("max_prefixes must be at least 1")
    by_prefix: dict[IPv4Network, Update | list[Update]] = {}
    for update in updates:
        if not update.peers:
            continue
        seen = by_prefix.setdefault(update.prefix, update)
        if seen is update:
            continue
        if isinstance(seen, list):
            seen.append(update)
        else:
            by_prefix[update.prefix] = [seen, update]
    groups: dict[tuple[frozenset[IPv4Address], Attributes | None], list[IPv4Network]] = {}
    for prefix, seen in by_prefix.items():
        if not isinstance(seen, list):  # the common case: one fan-out per prefix
            groups.setdefault((seen.peers, seen.attributes), []).append(prefix)
            continue
        for peers, attributes in _last_per_peer(seen):
            groups.setdefault((peers, attributes), []).append(prefix)
    return [Batch(peers, attributes, tuple(prefixes[i:i + max_prefixes]))
            for (peers, attributes), prefixes in groups.items()
            for i in range(0, len(prefixes), max_prefixes)]


def _last_per_peer(updates: list[Update]) -> list[tuple[frozenset[IPv4Address], Attributes | None]]:
    """For several updates of one prefix: which peers end with which attributes."""
    if all(u.peers is updates[-1].peers or u.peers <= updates[-1].peers for u in updates):
        return [(updates[-1].peers, updates[-1].attributes)]  # the last covers all before it
    covered: set[IPv4Address] = set()
    final: dict[Attributes | None, set[IPv4Address]] = {}
    for update in reversed(updates):
        fresh = update.peers - covered
        if fresh:
            final.setdefault(update.attributes, set()).update(fresh)
            covered |= fresh
    return [(frozenset(peers), attributes) for attributes, peers in final.items()]
