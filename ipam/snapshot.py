"""A consistent read of all IPAM state, and the pure reports built from it: usage per pool and
block, who holds an address, and the consistency check (`pipitctl ipam show / check`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from ipam import block as blocks
from ipam import handle as handles
from ipam import keys
from ipam.block import Attribute, Block
from ipam.errors import PipitError
from ipam.handle import Handle
from ipam.pool import LOAD_BALANCER_NODE, IPPool, pool_from_document, pool_of
from ipam.store import Store


@dataclass
class Snapshot:
    pools: list[IPPool] = field(default_factory=list)
    blocks: dict[IPv4Network, Block] = field(default_factory=dict)
    affinities: dict[tuple[str, IPv4Network], str] = field(default_factory=dict)  # -> state
    handles: dict[str, Handle] = field(default_factory=dict)
    nodes: set[str] = field(default_factory=set)  # registered node records
    # node record -> the Kubernetes Node it belongs to (spec.orchRefs), None outside Kubernetes
    kubernetes_nodes: dict[str, str | None] = field(default_factory=dict)
    revision: int = 0
    malformed: list[str] = field(default_factory=list)  # keys whose value cannot be read


async def load_snapshot(store: Store) -> Snapshot:
    """Everything under /pipit/ in one range read (one etcd revision, so it is consistent)."""
    snap = Snapshot()
    entries = await store.list(keys.ROOT)
    for entry in entries:
        snap.revision = max(snap.revision, entry.mod_revision)
        try:
            _add(snap, entry.key, entry.value)
        except (PipitError, KeyError, TypeError, ValueError, AttributeError):
            snap.malformed.append(entry.key)
    snap.pools.sort(key=lambda p: p.name)
    return snap


def _add(snap: Snapshot, key: str, value) -> None:
    if key.startswith(keys.POOLS):
        snap.pools.append(pool_from_document(value))
    elif key.startswith(keys.BLOCKS):
        block = blocks.from_json(value)
        snap.blocks[block.cidr] = block
    elif key.startswith(keys.HOSTS):
        snap.affinities[keys.affinity_parts(key)] = value["state"]
    elif key.startswith(keys.HANDLES):
        handle = handles.from_json(value)
        snap.handles[handle.handle_id] = handle
    elif key.startswith(keys.NODES):
        name = key.removeprefix(keys.NODES)
        snap.nodes.add(name)
        refs = (value.get("spec") or {}).get("orchRefs") or []
        snap.kubernetes_nodes[name] = next((r.get("nodeName") for r in refs
                                            if r.get("orchestrator") == "k8s"), None)


@dataclass(frozen=True)
class Usage:
    total: int
    used: int

    @property
    def free(self) -> int:
        return self.total - self.used

    @property
    def percent(self) -> float:
        return 100.0 * self.used / self.total if self.total else 0.0


def pool_usage(snap: Snapshot, pool: IPPool) -> Usage:
    used = sum(b.used for c, b in snap.blocks.items() if c.subnet_of(pool.cidr))
    return Usage(pool.capacity, used)


def blocks_of(snap: Snapshot, pool: IPPool) -> list[Block]:
    return [b for c, b in sorted(snap.blocks.items()) if c.subnet_of(pool.cidr)]


@dataclass(frozen=True)
class AddressInfo:
    address: IPv4Address
    pool: IPPool | None
    block: Block | None
    holder: Attribute | None
    sequence: int | None


def lookup(snap: Snapshot, address: IPv4Address) -> AddressInfo:
    pool = pool_of(snap.pools, address)
    block = next((b for c, b in snap.blocks.items() if address in c), None)
    if block is None:
        return AddressInfo(address, pool, None, None, None)
    return AddressInfo(address, pool, block, block.holder(address), block.sequence_of(address))


@dataclass
class Problem:
    kind: str  # leaked-address | orphan-handle | affinity-without-block | ...
    subject: str
    detail: str


def check(snap: Snapshot) -> list[Problem]:
    """Everything that is inconsistent between blocks, handles, affinities, pools and nodes."""
    problems: list[Problem] = []
    add = lambda kind, subject, detail: problems.append(Problem(kind, subject, detail))  # noqa: E731
    for key in snap.malformed:
        add("malformed", key, f"the value at {key} cannot be read; fix or delete it")
    # Addresses per handle and block as the blocks see them.
    held: dict[str, Counter[str]] = {}
    for cidr, block in sorted(snap.blocks.items()):
        for handle_id, count in block.handle_counts().items():
            held.setdefault(handle_id, Counter())[str(cidr)] += count
        if pool_of(snap.pools, cidr.network_address) is None:
            add("block-outside-pools", str(cidr), f"block {cidr} ({block.used} in use) lies in no "
                "pool")
        node = block.node
        if node is not None:
            state = snap.affinities.get((node, cidr))
            if state != "confirmed":
                add("block-without-affinity", str(cidr),
                    f"block {cidr} says it belongs to {node}, but that node's affinity is "
                    f"{state or 'missing'}")
            if snap.nodes and node not in snap.nodes and node != LOAD_BALANCER_NODE:
                add("block-of-unknown-node", str(cidr),
                    f"block {cidr} belongs to node {node}, which is not registered")
    for handle_id, per_block in sorted(held.items()):
        handle = snap.handles.get(handle_id)
        for cidr, count in sorted(per_block.items()):
            recorded = handle.blocks.get(cidr, 0) if handle else 0
            if recorded < count:
                add("leaked-address", handle_id,
                    f"{count - recorded} address(es) in {cidr} are held by handle {handle_id}, "
                    "which does not count them")
    for handle_id, handle in sorted(snap.handles.items()):
        for cidr, count in sorted(handle.blocks.items()):
            actual = held.get(handle_id, Counter())[cidr]
            if actual < count:
                add("orphan-handle", handle_id,
                    f"handle {handle_id} counts {count} address(es) in {cidr}, the block has "
                    f"{actual}")
    owners: dict[IPv4Network, list[str]] = {}
    for (node, cidr), state in sorted(snap.affinities.items()):
        block = snap.blocks.get(cidr)
        if block is None:
            add("affinity-without-block", f"{node}/{cidr}",
                f"node {node} has a {state} affinity for {cidr}, which has no block")
        elif block.node != node:
            add("affinity-not-owner", f"{node}/{cidr}",
                f"node {node} has a {state} affinity for {cidr}, owned by "
                f"{block.node or 'nobody'}")
        if state == "confirmed":
            owners.setdefault(cidr, []).append(node)
    for cidr, nodes in sorted(owners.items()):
        if len(nodes) > 1:
            add("block-owned-twice", str(cidr), f"block {cidr} is claimed by {', '.join(nodes)}")
    return problems
