"""Deleting an IP pool safely against etcd (the rest of a pool's life is plain resource writes,
see pipitctl.resources; the pool itself is ipam.pool)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from ipaddress import IPv4Network

from ipam import block as blocks
from ipam import handle as handles
from ipam import keys
from ipam.errors import InUse, InvalidResource, NotFound
from ipam.pool import IPPool, pool_from_document, pool_to_document, read_pools
from ipam.release import stage_handle
from ipam.store import Entry, Store
from ipam.txn import TXN_KEY_BUDGET, Changes, transact

log = logging.getLogger(__name__)


@dataclass
class PoolDeletion:
    blocks_removed: int = 0
    addresses_released: int = 0


async def _blocks_in(store: Store, cidr: IPv4Network | None) -> list[IPv4Network]:
    if cidr is None:
        return []
    return [c for c in map(keys.block_cidr, await store.list_keys(keys.BLOCKS))
            if c.subnet_of(cidr)]


async def _stored_pool(store: Store, entry: Entry) -> tuple[IPPool | None, IPv4Network | None]:
    """The stored pool and the CIDR whose blocks are its; a pool that fails today's
    validation (written by hand or by an older version) is None, with its CIDR if one can
    still be read from it and no valid pool overlaps it (its blocks may be that pool's)."""
    try:
        pool = pool_from_document(entry.value)
        return pool, pool.cidr
    except InvalidResource:
        pass
    try:
        cidr = IPv4Network(entry.value["spec"]["cidr"], strict=False)
    except (TypeError, KeyError, ValueError):
        return None, None
    valid = [p for p, _ in read_pools(await store.list(keys.POOLS))]
    return None, None if any(p.cidr.overlaps(cidr) for p in valid) else cidr


async def addresses_in_use(store: Store, name: str) -> int:
    """Addresses in use in the pool's blocks (NotFound if there is no such pool)."""
    entry = await store.get(keys.pool_key(name))
    if entry is None:
        raise NotFound(f"IP pool {name!r} does not exist.")
    _, cidr = await _stored_pool(store, entry)
    found = await store.get_many(keys.block_key(c) for c in await _blocks_in(store, cidr))
    return sum(blocks.from_json(e.value).used for e in found.values() if e)


def in_use_refusal(name: str, in_use: int, nothing_deleted: bool = False) -> InUse:
    return InUse(f"IP pool {name!r} still has {in_use} address(es) in use"
                 f"{', so nothing was deleted' if nothing_deleted else ''}; release them "
                 "first or delete with --force.")


async def delete_pool(store: Store, name: str, force: bool = False) -> PoolDeletion:
    """Disable the pool, release every block affinity in it, then delete it. Refuses (writing
    nothing) while addresses are in use, unless forced, which releases them too. A stored
    pool that fails validation goes the same way, without the disabling write."""
    entry = await store.get(keys.pool_key(name))
    if entry is None:
        raise NotFound(f"IP pool {name!r} does not exist.")
    pool, cidr = await _stored_pool(store, entry)
    found = await store.get_many(keys.block_key(c) for c in await _blocks_in(store, cidr))
    in_use = sum(blocks.from_json(e.value).used for e in found.values() if e)
    if in_use and not force:
        raise in_use_refusal(name, in_use)
    # 1. Disable, so that no node allocates from it while its blocks go.
    if pool is not None and not pool.disabled:
        disabled = IPPool(**{**pool.__dict__, "disabled": True})
        result = await store.txn({entry.key: entry.mod_revision},
                                 {entry.key: pool_to_document(disabled)})
        if not result.succeeded:
            raise InUse(f"IP pool {name!r} changed while being deleted; run the delete again.")
        revision = result.revision
    else:
        revision = entry.mod_revision
    # 2. Remove its blocks and every affinity for them.
    outcome = PoolDeletion()
    affinity_keys = [k for k in await store.list_keys(keys.HOSTS)
                     if cidr is not None and keys.affinity_parts(k)[1].subnet_of(cidr)]
    for block_cidr in await _blocks_in(store, cidr):
        outcome.addresses_released += await transact(
            store, lambda changes, c=block_cidr: _remove_block(changes, c, force),
            f"removing block {block_cidr}")
        outcome.blocks_removed += 1
    for start in range(0, len(affinity_keys), TXN_KEY_BUDGET):  # etcd caps ops per txn
        await store.txn({}, delete=affinity_keys[start:start + TXN_KEY_BUDGET])
    # 3. Delete the pool itself.
    result = await store.txn({entry.key: revision}, delete=[entry.key])
    if not result.succeeded:
        raise InUse(f"IP pool {name!r} changed while being deleted; it is disabled now, run "
                    "the delete again.")
    log.info("deleted IP pool %s (%d blocks, %d addresses released)", name,
             outcome.blocks_removed, outcome.addresses_released)
    return outcome


async def _remove_block(changes: Changes, cidr: IPv4Network, force: bool) -> int:
    entry = await changes.get(keys.block_key(cidr))
    if entry is None:
        return 0
    block = blocks.from_json(entry.value)
    if block.used and not force:
        raise InUse(f"block {cidr} got {block.used} new address(es) while its pool was being "
                    "deleted; the pool is disabled now, release them or delete with --force.")
    counts = block.handle_counts()
    found = await changes.get_many(keys.handle_key(h) for h in counts)
    for handle_id in counts:
        held = found[keys.handle_key(handle_id)]
        if held is not None:
            handle = handles.from_json(held.value)
            stage_handle(changes, handles.remove(handle, str(cidr), handle.blocks.get(str(cidr), 0)))
    if block.node:
        changes.delete(keys.affinity_key(block.node, cidr))
    changes.delete(keys.block_key(cidr))
    return block.used
