"""Claiming a block for a node, in Calico's two phases, each step one compare-and-swap:

1. write a `pending` affinity for (node, block)  - a pending affinity is never announced;
2. create the block, affine to the node, only if the affinity is still pending and the pool
   unchanged;
3. flip the affinity to `confirmed`.

A process that dies between the steps leaves a pending affinity, with or without the block.
`settle_affinity` (run before a node allocates) finishes such a claim or rolls it back, so no
block is ever owned twice or used without an owner.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from ipaddress import IPv4Network

from ipam import block as blocks
from ipam import keys
from ipam.pool import IPPool, read_pools
from ipam.release import release_affinity
from ipam.store import Entry, Store

log = logging.getLogger(__name__)

PENDING, CONFIRMED, PENDING_DELETION = "pending", "confirmed", "pendingDeletion"


class PoolChanged(Exception):
    """The pool changed since the claimer read it: nothing was claimed; read it again."""


@dataclass
class BlockClaim:
    store: Store
    node: str
    pool: IPPool
    pool_revision: int
    cidr: IPv4Network
    affinity_revision: int = 0
    block_revision: int = 0

    @property
    def affinity_key(self) -> str:
        return keys.affinity_key(self.node, self.cidr)

    @property
    def block_key(self) -> str:
        return keys.block_key(self.cidr)

    async def write_pending(self) -> bool:
        result = await self.store.txn({self.affinity_key: 0},
                                      {self.affinity_key: {"state": PENDING}})
        if result.succeeded:
            self.affinity_revision = result.revision
        return result.succeeded

    async def write_block(self) -> bool:
        """Create the block; False (and the pending affinity removed) if someone else has it."""
        new = blocks.to_json(blocks.new_block(self.cidr, self.node))
        result = await self.store.txn(
            {self.affinity_key: self.affinity_revision, self.block_key: 0,
             keys.pool_key(self.pool.name): self.pool_revision},
            {self.block_key: new})
        if result.succeeded:
            self.block_revision = result.revision
            return True
        existing = result.current.get(self.block_key)
        if existing and blocks.from_json(existing.value).node == self.node:
            return True  # finished by a concurrent settle of our own node
        await self.roll_back()
        pool = result.current.get(keys.pool_key(self.pool.name))
        if existing is None and (pool.mod_revision if pool else 0) != self.pool_revision:
            raise PoolChanged(self.pool.name)
        return False

    async def confirm(self) -> tuple[blocks.Block, int] | None:
        return await confirm_affinity(self.store, self.node, self.cidr, self.affinity_revision,
                                      self.block_revision)

    async def roll_back(self) -> None:
        await self.store.txn({self.affinity_key: self.affinity_revision}, {},
                             [self.affinity_key])

    async def run(self) -> tuple[blocks.Block, int] | None:
        """All three steps; the block as it stands (empty, unless another node borrowed from
        it meanwhile) and its revision, or None if we lost the race."""
        if not await self.write_pending():
            return None
        if not await self.write_block():
            return None
        return await self.confirm()


async def confirm_affinity(store: Store, node: str, cidr: IPv4Network, affinity_revision: int,
                           block_revision: int = 0) -> tuple[blocks.Block, int] | None:
    """Flip a pending affinity to confirmed; the block and its mod_revision if the node owns
    it now. With `block_revision` (the block as this process just created it) a block nobody
    touched since needs no extra read; one that changed meanwhile (another node borrowed from
    it) is read again, and that is the block returned: its allocations are not free."""
    affinity_key, block_key = keys.affinity_key(node, cidr), keys.block_key(cidr)
    confirmed = {affinity_key: {"state": CONFIRMED}}
    if block_revision:
        result = await store.txn({affinity_key: affinity_revision, block_key: block_revision},
                                 confirmed)
        if result.succeeded:
            return blocks.new_block(cidr, node), block_revision
    result = await store.txn({affinity_key: affinity_revision}, confirmed)
    if not result.succeeded:
        current = result.current[affinity_key]
        if not current or current.value.get("state") != CONFIRMED:
            return None
    entry = await store.get(block_key)
    block = blocks.from_json(entry.value) if entry is not None else None
    return (block, entry.mod_revision) if block is not None and block.node == node else None


async def settle_affinity(store: Store, node: str, affinity: Entry,
                          block_entry: Entry | None) -> tuple[blocks.Block, int] | None:
    """Bring one of the node's affinities to a final state; returns the block and its
    mod_revision if the node owns it afterwards (its affinity confirmed), else None."""
    _, cidr = keys.affinity_parts(affinity.key)
    state = affinity.value.get("state")
    owner = blocks.from_json(block_entry.value).node if block_entry else None
    delete_affinity = ({affinity.key: affinity.mod_revision}, {}, [affinity.key])

    if state == CONFIRMED:
        if owner == node:
            return blocks.from_json(block_entry.value), block_entry.mod_revision
        log.warning("node %s: affinity for %s has no block of its own; removing it", node, cidr)
        await store.txn(*delete_affinity)
        return None

    if state == PENDING:
        if block_entry is None:
            found = await _pool_for_block(store, cidr)
            if found is None:
                log.info("node %s: rolling back claim of %s (its pool is gone or disabled)",
                         node, cidr)
                await store.txn(*delete_affinity)
                return None
            claim = BlockClaim(store, node, *found, cidr, affinity.mod_revision)
            log.info("node %s: completing interrupted claim of %s", node, cidr)
            if not await claim.write_block():
                return None
            return await claim.confirm()
        if owner != node:
            log.info("node %s: rolling back claim of %s (owned by %s)", node, cidr, owner)
            await store.txn(*delete_affinity)
            return None
        return await confirm_affinity(store, node, cidr, affinity.mod_revision)

    if state == PENDING_DELETION:
        # A release of this affinity was interrupted: finish it.
        await release_affinity(store, node, cidr, require_empty=False)
        return None

    log.warning("node %s: affinity %s has unknown state %r; leaving it", node, cidr, state)
    return None


async def _pool_for_block(store: Store, cidr: IPv4Network) -> tuple[IPPool, int] | None:
    """The enabled pool this block belongs to, if any, with its mod_revision."""
    for pool, revision in read_pools(await store.list(keys.POOLS)):
        if cidr.subnet_of(pool.cidr) and pool.block_size == cidr.prefixlen and not pool.disabled:
            return pool, revision
    return None
