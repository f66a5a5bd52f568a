"""An allocation block: the pure logic of handing out and taking back addresses in one CIDR.

Calico's block model: every address of the block has an ordinal; `allocations[ordinal]` is
None (free) or an index into `attributes` (who holds it); `unallocated` is the queue of free
ordinals, taken from the front and returned to the back, so the address freed longest ago is
reused first. Each allocation records the block's running sequence number, and a release that
names a sequence number frees the address only if it is still that same allocation.

The first address of a block of four or more is its gateway: never queued for allocation,
it is what pods with addresses in the block route through (the reference CNI plugins `ptp`
and `bridge` put it on the host side), as host-local keeps a subnet's first address. The
last is never queued either, as host-local keeps a subnet's last: pods get ADDRESS/blockSize,
so to every pod of the block it is the broadcast address of its subnet, and a pod holding it
could not be reached from them (a block stored by an older version may still list it as free:
`from_json` drops it; held, it is never queued again once released).

Calico's ipCooldownSeconds: a release made with the cooldown in force records when each
address was freed (`released_at`), and `assign` passes over the ones freed less than that long
ago (`cooling`), so a new pod does not get an address traffic for a pod just deleted may still
be sent to; an address asked for by value is given even while it cools down.

Functions never mutate their argument: they return a new Block.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network


# Secondary attributes of a pod's floating IP (Calico's floatingIPs): the pod's address it
# leads to, and the handle of the pod's attachment (whose life it shares).
FLOATING_FOR, ATTACHMENT = "floatingFor", "attachment"


def floating_target(secondary: Mapping[str, str]) -> IPv4Address | None:
    """The pod address a floating IP's allocation leads to; None for any other allocation
    (and for a value written by hand that is no address)."""
    text = secondary.get(FLOATING_FOR)
    try:
        return IPv4Address(text) if text else None
    except ValueError:
        return None


@dataclass(frozen=True)
class Attribute:
    handle_id: str
    secondary: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Block:
    cidr: IPv4Network
    affinity: str | None  # "host:<node>" or None
    allocations: tuple[int | None, ...]
    unallocated: tuple[int, ...]
    attributes: tuple[Attribute, ...] = ()
    sequence_number: int = 0
    seq_for_allocation: Mapping[int, int] = field(default_factory=dict)
    # free ordinals -> when they were released (Unix time), while a cooldown keeps them
    released_at: Mapping[int, float] = field(default_factory=dict)

    @property
    def free(self) -> int:
        return len(self.unallocated)

    @property
    def used(self) -> int:
        return sum(1 for i in self.allocations if i is not None)

    @property
    def capacity(self) -> int:
        return self.free + self.used

    @property
    def empty(self) -> bool:
        return all(i is None for i in self.allocations)

    @property
    def gateway(self) -> IPv4Address | None:
        """The reserved first address, if this block has one."""
        if self.allocations[0] is None and 0 not in self.unallocated:
            return self.cidr.network_address
        return None

    def reserved_as(self, address: IPv4Address) -> str:
        """What a reserved address of the block is ("the gateway", "the broadcast address"),
        or "" for one that is held or may be handed out."""
        ordinal = self.ordinal(address)
        if ordinal not in reserved_ordinals(len(self.allocations)) \
                or self.allocations[ordinal] is not None:
            return ""
        return "the gateway" if ordinal == 0 else "the broadcast address"

    @property
    def node(self) -> str | None:
        """The node this block is affine to, if any."""
        if self.affinity and self.affinity.startswith("host:"):
            return self.affinity[5:]
        return None

    def address(self, ordinal: int) -> IPv4Address:
        return self.cidr.network_address + ordinal

    def ordinal(self, address: IPv4Address) -> int:
        if address not in self.cidr:
            raise ValueError(f"{address} is not in block {self.cidr}")
        return int(address) - int(self.cidr.network_address)

    def holder(self, address: IPv4Address) -> Attribute | None:
        index = self.allocations[self.ordinal(address)]
        return None if index is None else self.attributes[index]

    def sequence_of(self, address: IPv4Address) -> int | None:
        return self.seq_for_allocation.get(self.ordinal(address))

    def handle_counts(self) -> Counter[str]:
        """How many addresses each handle holds in this block."""
        return Counter(self.attributes[i].handle_id for i in self.allocations if i is not None)


def affinity_for(node: str) -> str:
    return f"host:{node}"


GATEWAY_MIN_SIZE = 4  # blocks of /30 or larger keep their first address (the gateway) and last


def reserved_ordinals(size: int) -> tuple[int, ...]:
    """The ordinals a block of `size` addresses never hands out: its gateway and its
    broadcast address, in blocks of four or more."""
    return (0, size - 1) if size >= GATEWAY_MIN_SIZE else ()


def block_capacity(size: int) -> int:
    return size - len(reserved_ordinals(size))


def new_block(cidr: IPv4Network, node: str | None) -> Block:
    size = cidr.num_addresses
    reserved = reserved_ordinals(size)
    return Block(cidr=cidr, affinity=affinity_for(node) if node else None,
                 allocations=(None,) * size,
                 unallocated=tuple(o for o in range(size) if o not in reserved))


def cooling(block: Block, now: float, cooldown: int) -> frozenset[int]:
    """The free ordinals released less than `cooldown` seconds before `now`."""
    if not cooldown or not block.released_at:
        return frozenset()
    since = now - cooldown
    return frozenset(o for o, when in block.released_at.items() if when > since)


def _without(released_at: Mapping[int, float], ordinals: Iterable[int]) -> Mapping[int, float]:
    if not released_at:
        return released_at
    kept = dict(released_at)
    for ordinal in ordinals:
        kept.pop(ordinal, None)
    return kept


def assign(block: Block, count: int, handle_id: str,
           secondary: Mapping[str, str] | None = None,
           skip: frozenset[int] = frozenset()) -> tuple[Block, list[IPv4Address]]:
    """Take up to `count` free addresses, oldest-freed first, for one handle; never the
    ordinals in `skip` (reserved: ipam.reservation; cooling down), which keep their place in
    the queue."""
    if skip:
        take = tuple(o for o in block.unallocated if o not in skip)[:count]
        taken = set(take)
        left = tuple(o for o in block.unallocated if o not in taken)
    else:
        take, left = block.unallocated[:count], block.unallocated[count:]
    if not take:
        return block, []
    attributes = block.attributes + (Attribute(handle_id, dict(secondary or {})),)
    index = len(attributes) - 1
    allocations = list(block.allocations)
    seqs = dict(block.seq_for_allocation)
    seq = block.sequence_number
    for ordinal in take:
        allocations[ordinal] = index
        seqs[ordinal] = seq
        seq += 1
    updated = replace(block, allocations=tuple(allocations), unallocated=left,
                      attributes=attributes, sequence_number=seq, seq_for_allocation=seqs,
                      released_at=_without(block.released_at, take))
    return updated, [block.address(o) for o in take]


def assign_address(block: Block, address: IPv4Address, handle_id: str,
                   secondary: Mapping[str, str] | None = None) -> Block:
    """Take one given address for a handle; ValueError if it is not free (in use, or the
    block's gateway or broadcast address)."""
    ordinal = block.ordinal(address)
    if ordinal not in block.unallocated:
        reserved = block.reserved_as(address)
        what = f"{reserved} of block" if reserved else "already in use in block"
        raise ValueError(f"{address} is {what} {block.cidr}")
    attributes = block.attributes + (Attribute(handle_id, dict(secondary or {})),)
    allocations = list(block.allocations)
    allocations[ordinal] = len(attributes) - 1
    seqs = {**block.seq_for_allocation, ordinal: block.sequence_number}
    return replace(block, allocations=tuple(allocations),
                   unallocated=tuple(o for o in block.unallocated if o != ordinal),
                   attributes=attributes, sequence_number=block.sequence_number + 1,
                   seq_for_allocation=seqs,
                   released_at=_without(block.released_at, (ordinal,)))


@dataclass(frozen=True)
class Release:
    """One address to free; the release is refused (frees nothing) if `sequence` or `handle_id`
    is given and no longer matches the allocation."""
    address: IPv4Address
    sequence: int | None = None
    handle_id: str | None = None


def release(block: Block, releases: Iterable[Release], now: float | None = None,
            cooldown: int = 0) -> tuple[Block, list[IPv4Address], Counter[str]]:
    """Free the addresses that are allocated and match; returns (block, freed, freed per handle).
    Given `now`, what is freed is recorded as released then if a `cooldown` is in force, and
    the records it has outlived are dropped."""
    allocations = list(block.allocations)
    seqs = dict(block.seq_for_allocation)
    unallocated = list(block.unallocated)
    reserved = reserved_ordinals(len(allocations))
    freed: list[IPv4Address] = []
    queued: list[int] = []
    per_handle: Counter[str] = Counter()
    for r in releases:
        ordinal = block.ordinal(r.address)
        index = allocations[ordinal]
        if index is None:
            continue
        holder = block.attributes[index].handle_id
        if r.sequence is not None and seqs.get(ordinal) != r.sequence:
            continue
        if r.handle_id is not None and holder != r.handle_id:
            continue
        allocations[ordinal] = None
        seqs.pop(ordinal, None)
        if ordinal not in reserved:  # the broadcast address an older version handed out
            unallocated.append(ordinal)
            queued.append(ordinal)
        freed.append(r.address)
        per_handle[holder] += 1
    if not freed:
        return block, [], per_handle
    released_at = block.released_at
    if now is not None and (cooldown or released_at):
        released_at = {o: when for o, when in released_at.items() if when > now - cooldown}
        if cooldown:
            released_at.update(dict.fromkeys(queued, now))
    return _compact(replace(block, allocations=tuple(allocations), unallocated=tuple(unallocated),
                            seq_for_allocation=seqs, released_at=released_at)), freed, per_handle


def release_handle(block: Block, handle_id: str, now: float | None = None,
                   cooldown: int = 0) -> tuple[Block, list[IPv4Address]]:
    """Free every address the handle holds in this block (`now`, `cooldown`: as release's)."""
    held = [Release(block.address(o), handle_id=handle_id)
            for o, i in enumerate(block.allocations)
            if i is not None and block.attributes[i].handle_id == handle_id]
    updated, freed, _ = release(block, held, now, cooldown)
    return updated, freed


def addresses_of(block: Block, handle_id: str) -> list[IPv4Address]:
    return [block.address(o) for o, i in enumerate(block.allocations)
            if i is not None and block.attributes[i].handle_id == handle_id]


def _compact(block: Block) -> Block:
    """Drop attributes no allocation refers to any more, renumbering the rest."""
    in_use = sorted({i for i in block.allocations if i is not None})
    if len(in_use) == len(block.attributes):
        return block
    renumber = {old: new for new, old in enumerate(in_use)}
    return replace(block,
                   allocations=tuple(None if i is None else renumber[i] for i in block.allocations),
                   attributes=tuple(block.attributes[i] for i in in_use))


def to_json(block: Block) -> dict:
    return {
        "cidr": str(block.cidr),
        "affinity": block.affinity,
        "allocations": list(block.allocations),
        "unallocated": list(block.unallocated),
        "attributes": [{"handle_id": a.handle_id, "secondary": dict(a.secondary)}
                       for a in block.attributes],
        "sequenceNumber": block.sequence_number,
        "sequenceNumberForAllocation": {str(k): v for k, v in block.seq_for_allocation.items()},
        **({"releasedAt": {str(k): v for k, v in block.released_at.items()}}
           if block.released_at else {}),
    }


def from_json(value: Mapping) -> Block:
    reserved = reserved_ordinals(len(value["allocations"]))
    return Block(
        cidr=IPv4Network(value["cidr"]),
        affinity=value.get("affinity"),
        allocations=tuple(value["allocations"]),
        # without the broadcast address a block stored by an older version lists as free
        unallocated=tuple(o for o in value["unallocated"] if o not in reserved),
        attributes=tuple(Attribute(a["handle_id"], a.get("secondary") or {})
                         for a in value.get("attributes", ())),
        sequence_number=value.get("sequenceNumber", 0),
        seq_for_allocation={int(k): v for k, v in
                            (value.get("sequenceNumberForAllocation") or {}).items()},
        released_at={int(k): float(v) for k, v in (value.get("releasedAt") or {}).items()},
    )
