"""Giving addresses and blocks back: by address, by handle, and a node's block affinities.

Each change to a block and to the handles that held its addresses is one transaction, so an
address is never free in the block while its handle still counts it (or the reverse).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Container, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from ipam import block as blocks
from ipam import handle as handles
from ipam import keys
from ipam.block import ATTACHMENT, Block, Release
from ipam.errors import InUse
from ipam.handle import Handle
from ipam.store import Store
from ipam.txn import TXN_KEY_BUDGET, Changes, transact


def stage_block(changes: Changes, block: Block) -> None:
    """Write the block back; an empty block with no owner is deleted instead."""
    key = keys.block_key(block.cidr)
    if block.empty and block.node is None:
        changes.delete(key)
    else:
        changes.put(key, blocks.to_json(block))


def stage_handle(changes: Changes, handle: Handle) -> None:
    key = keys.handle_key(handle.handle_id)
    if handle.total:
        changes.put(key, handles.to_json(handle))
    else:
        changes.delete(key)


async def release_addresses(store: Store, releases: Iterable[Release]) -> list[IPv4Address]:
    """Free the given addresses (those that are allocated and still match); returns the freed."""
    cidrs = [keys.block_cidr(k) for k in await store.list_keys(keys.BLOCKS)]
    by_block: dict[IPv4Network, list[Release]] = defaultdict(list)
    for r in releases:
        cidr = next((c for c in cidrs if r.address in c), None)
        if cidr is not None:
            by_block[cidr].append(r)
    freed: list[IPv4Address] = []
    for cidr, group in by_block.items():
        async def decide(changes: Changes, cidr=cidr, group=group) -> list[IPv4Address]:
            entry = await changes.get(keys.block_key(cidr))
            if entry is None:
                return []
            updated, done, per_handle = blocks.release(blocks.from_json(entry.value), group)
            if not done:
                return []
            stage_block(changes, updated)
            await _stage_handle_counts(changes, cidr, per_handle)
            return done
        freed += await transact(store, decide, f"releasing addresses in {cidr}")
    return freed


async def _stage_handle_counts(changes: Changes, cidr: IPv4Network, per_handle) -> None:
    entries = await changes.get_many(keys.handle_key(h) for h in per_handle)
    for handle_id, count in per_handle.items():
        entry = entries[keys.handle_key(handle_id)]
        if entry is not None:
            stage_handle(changes, handles.remove(handles.from_json(entry.value), str(cidr), count))


async def release_handle(store: Store, handle_id: str) -> list[IPv4Address]:
    """Free every address a handle holds; an unknown handle frees nothing."""
    async def decide(changes: Changes) -> list[IPv4Address]:
        entry = await changes.get(keys.handle_key(handle_id))
        if entry is None:
            return []
        held = handles.from_json(entry.value).blocks
        block_keys = [keys.block_key(IPv4Network(c)) for c in held]
        freed: list[IPv4Address] = []
        for block_entry in (await changes.get_many(block_keys)).values():
            if block_entry is None:
                continue
            updated, done = blocks.release_handle(blocks.from_json(block_entry.value), handle_id)
            if done:
                stage_block(changes, updated)
                freed += done
        changes.delete(keys.handle_key(handle_id))  # it holds nothing now
        return freed
    return await transact(store, decide, f"releasing handle {handle_id}")


@dataclass
class AffinityRelease:
    released: list[IPv4Network] = field(default_factory=list)  # block gone with the affinity
    kept_in_use: list[IPv4Network] = field(default_factory=list)  # block stays, unowned


async def release_affinity(store: Store, node: str, cidr: IPv4Network,
                           require_empty: bool) -> AffinityRelease:
    """Drop a node's claim on a block: an empty block is deleted with it; a block still in use
    keeps its addresses without an owner (others may then use its free slots), unless
    require_empty, which refuses."""
    async def decide(changes: Changes) -> AffinityRelease:
        outcome = AffinityRelease()
        affinity_key = keys.affinity_key(node, cidr)
        found = await changes.get_many([affinity_key, keys.block_key(cidr)])
        block_entry = found[keys.block_key(cidr)]
        if found[affinity_key] is not None:
            changes.delete(affinity_key)
        if block_entry is None:
            return outcome
        block = blocks.from_json(block_entry.value)
        if block.node != node:
            return outcome
        if block.empty:
            changes.delete(keys.block_key(cidr))
            outcome.released.append(cidr)
        elif require_empty:
            raise InUse(f"block {cidr} of node {node} still has {block.used} addresses in use.")
        else:
            changes.put(keys.block_key(cidr), blocks.to_json(
                Block(**{**block.__dict__, "affinity": None})))
            outcome.kept_in_use.append(cidr)
        return outcome
    return await transact(store, decide, f"releasing block {cidr} of node {node}")


async def release_host_affinities(store: Store, node: str,
                                  require_empty: bool = False) -> AffinityRelease:
    """Release every block affinity of a node (for a node that leaves the cluster). With
    require_empty, a node with any address still in use keeps all its blocks."""
    total = AffinityRelease()
    cidrs = [keys.affinity_parts(k)[1] for k in await store.list_keys(keys.affinity_prefix(node))]
    if require_empty:
        found = await store.get_many(keys.block_key(c) for c in cidrs)
        in_use = sum(blocks.from_json(e.value).used for e in found.values()
                     if e and blocks.from_json(e.value).node == node)
        if in_use:
            raise InUse(f"node {node} still has {in_use} address(es) in use in its blocks.")
    for cidr in cidrs:
        one = await release_affinity(store, node, cidr, require_empty)
        total.released += one.released
        total.kept_in_use += one.kept_in_use
    return total


def stale_attachments(found: Iterable[Block], node: str, prefix: str,
                      valid: Container[str]) -> list[str]:
    """The handles a CNI GC releases: held on `node`, of the network whose handles start with
    `prefix` (ipam.cni.handle_prefix), and not among the runtime's `valid` attachments (a
    pod's floating IPs go with the attachment they belong to)."""
    return sorted({a.handle_id for block in found for a in block.attributes
                   if a.secondary.get("node") == node and a.handle_id.startswith(prefix)
                   and a.secondary.get(ATTACHMENT, a.handle_id) not in valid})


async def release_leaks(store: Store, leaks: Iterable, budget: int = TXN_KEY_BUDGET // 2
                        ) -> list[str]:
    """Release leaked handles (ipam.gc.Leak: a handle and every address it holds, each with
    its sequence number), several per transaction. Each handle goes whole or not at all: if
    any of its addresses is no longer that allocation (freed, given to someone else) or it
    holds addresses the leak does not name, the handle is left alone. Returns the handles
    released; running it again releases nothing twice."""
    pending = list(leaks)
    released: list[str] = []
    while pending:
        batch, keys_used = [], 0
        while pending:
            cost = 1 + max(1, len(pending[0].blocks))
            if batch and keys_used + cost > budget:
                break
            batch.append(pending.pop(0))
            keys_used += cost
        released += await transact(store, lambda changes, batch=batch: _decide_leaks(
            changes, batch), f"releasing {len(batch)} leaked handle(s)")
    return released


async def _decide_leaks(changes: Changes, batch: list) -> list[str]:
    handle_entries = await changes.get_many(keys.handle_key(leak.handle_id) for leak in batch)
    cidrs = {c: None for leak in batch for c in getattr(leak, "blocks", ())}
    for entry in handle_entries.values():
        if entry is not None:
            for text in handles.from_json(entry.value).blocks:
                cidrs[IPv4Network(text)] = None
    block_entries = await changes.get_many(keys.block_key(c) for c in cidrs)
    current = {keys.block_cidr(k): blocks.from_json(e.value)
               for k, e in block_entries.items() if e is not None}
    done: list[str] = []
    for leak in batch:
        named = {r.address for r in leak.releases}
        held = [a for block in current.values()
                for a in blocks.addresses_of(block, leak.handle_id)]
        if not held or set(held) != named:
            continue  # released already, or changed since the snapshot: not ours to judge
        trial = dict(current)
        for cidr, block in current.items():
            group = [r for r in leak.releases if r.address in cidr]
            if group:
                updated, freed, _ = blocks.release(block, group)
                if len(freed) != len(group):
                    break  # an address is another allocation now
                trial[cidr] = updated
        else:
            current = trial
            done.append(leak.handle_id)
    for cidr, block in current.items():
        if block_entries[keys.block_key(cidr)].value != blocks.to_json(block):
            stage_block(changes, block)
    for handle_id in done:
        changes.delete(keys.handle_key(handle_id))
    return done
