"""Crash safety of the two-phase block claim: a claim cut short after the pending affinity, or
after the block write, is finished or rolled back by the node's next request."""

from ipaddress import IPv4Network

import pytest

from ipam import keys
from ipam.allocator import IPAM
from ipam.block import addresses_of
from ipam.claim import BlockClaim, PoolChanged
from ipam.errors import DatastoreUnavailable
from ipam.pool import pool_from_document
from ipam.snapshot import check, load_snapshot
from tests.helpers import add_pool, with_store

CIDR = IPv4Network("10.30.0.64/28")
CIDR0 = IPv4Network("10.30.0.0/28")


async def interrupted_claim(store, node: str, steps: int) -> None:
    """Run the first `steps` steps of a real claim of CIDR for `node`, then stop (as if the
    process died there)."""
    entry = await store.get(keys.pool_key("p"))
    claim = BlockClaim(store, node, pool_from_document(entry.value), entry.mod_revision, CIDR)
    assert await claim.write_pending()
    if steps >= 2:
        assert await claim.write_block()


async def owners(store) -> dict:
    snap = await load_snapshot(store)
    assert check(snap) == [], check(snap)
    return {cidr: (block.node, snap.affinities.get((block.node, cidr)))
            for cidr, block in snap.blocks.items()}


def test_claim_cut_after_pending_affinity_is_completed(etcd):
    async def scenario(store):
        await add_pool(store, "p", "10.30.0.0/24", blockSize=28)
        await interrupted_claim(store, "n1", steps=1)
        snap = await load_snapshot(store)
        assert snap.affinities == {("n1", CIDR): "pending"} and snap.blocks == {}
        [address] = await IPAM(store).assign("n1", "pod")
        assert address in CIDR  # the finished claim is the node's block and serves it
        assert (await owners(store)) == {CIDR: ("n1", "confirmed")}
    with_store(etcd, scenario)


def test_claim_cut_after_block_write_is_confirmed(etcd):
    async def scenario(store):
        await add_pool(store, "p", "10.30.0.0/24", blockSize=28)
        await interrupted_claim(store, "n1", steps=2)
        snap = await load_snapshot(store)
        assert snap.affinities == {("n1", CIDR): "pending"} and snap.blocks[CIDR].node == "n1"
        [address] = await IPAM(store).assign("n1", "pod")
        assert address in CIDR
        assert (await owners(store)) == {CIDR: ("n1", "confirmed")}
    with_store(etcd, scenario)


def test_pending_claim_that_lost_the_block_is_rolled_back(etcd):
    async def scenario(store):
        await add_pool(store, "p", "10.30.0.0/24", blockSize=28)
        await interrupted_claim(store, "n1", steps=1)
        # Meanwhile n2 claims the very same block, completely.
        entry = await store.get(keys.pool_key("p"))
        won = await BlockClaim(store, "n2", pool_from_document(entry.value), entry.mod_revision,
                               CIDR).run()
        assert won is not None
        [address] = await IPAM(store).assign("n1", "pod")
        assert address not in CIDR
        result = await owners(store)
        assert result[CIDR] == ("n2", "confirmed")
        assert ("n1", CIDR) not in (await load_snapshot(store)).affinities
    with_store(etcd, scenario)


def test_pending_claim_in_a_disabled_pool_is_rolled_back(etcd):
    async def scenario(store):
        await add_pool(store, "p", "10.30.0.0/24", blockSize=28)
        await add_pool(store, "q", "10.31.0.0/24", blockSize=28)
        await interrupted_claim(store, "n1", steps=1)
        await add_pool(store, "p", "10.30.0.0/24", blockSize=28, disabled=True)
        [address] = await IPAM(store).assign("n1", "pod")
        assert address in IPv4Network("10.31.0.0/24")
        snap = await load_snapshot(store)
        assert ("n1", CIDR) not in snap.affinities and CIDR not in snap.blocks
        assert check(snap) == []
    with_store(etcd, scenario)


def test_block_write_refuses_after_the_pool_changed(etcd):
    async def scenario(store):
        await add_pool(store, "p", "10.30.0.0/24", blockSize=28)
        entry = await store.get(keys.pool_key("p"))
        claim = BlockClaim(store, "n1", pool_from_document(entry.value), entry.mod_revision, CIDR)
        assert await claim.write_pending()
        await add_pool(store, "p", "10.30.0.0/24", blockSize=28, disabled=True)
        with pytest.raises(PoolChanged):
            await claim.write_block()
        assert await store.snapshot(keys.HOSTS) == {} and await store.snapshot(keys.BLOCKS) == {}
    with_store(etcd, scenario)


def test_a_claim_is_confirmed_even_if_another_node_borrowed_from_the_new_block(etcd):
    only = IPv4Network("10.31.0.0/28")  # a pool of one block: n2 can only borrow from it

    async def scenario(store):
        await add_pool(store, "one", str(only), blockSize=28)
        entry = await store.get(keys.pool_key("one"))
        claim = BlockClaim(store, "n1", pool_from_document(entry.value), entry.mod_revision, only)
        assert await claim.write_pending() and await claim.write_block()
        # Between the block write and the confirmation, another node borrows from the block.
        [borrowed] = await IPAM(store).assign("n2", "borrower")
        assert borrowed in only
        block, revision = await claim.confirm()
        assert block.holder(borrowed).handle_id == "borrower"  # not handed out as free
        assert revision == (await store.get(keys.block_key(only))).mod_revision
        assert (await owners(store)) == {only: ("n1", "confirmed")}
    with_store(etcd, scenario)


def test_a_claim_borrowed_from_before_its_confirmation_never_gives_the_address_again(
        etcd, monkeypatch):
    """The allocator's path through the same race: the claiming node then allocates from the
    block it claimed, and must neither get nor overwrite the address the other node borrowed."""
    only = IPv4Network("10.31.0.0/28")

    async def scenario(store):
        await add_pool(store, "one", str(only), blockSize=28)
        write_block = BlockClaim.write_block

        async def borrowed_meanwhile(claim):  # the real write, then another node borrows
            written = await write_block(claim)
            await IPAM(store).assign("n2", "borrower")
            return written

        monkeypatch.setattr(BlockClaim, "write_block", borrowed_meanwhile)
        ipam = IPAM(store)
        [first] = await ipam.assign("n1", "pod-1")
        monkeypatch.setattr(BlockClaim, "write_block", write_block)
        [second] = await ipam.assign("n1", "pod-2")
        snap = await load_snapshot(store)
        assert check(snap) == []
        block = snap.blocks[only]
        [borrowed] = addresses_of(block, "borrower")
        assert addresses_of(block, "pod-1") == [first] and addresses_of(block, "pod-2") == [second]
        assert len({borrowed, first, second}) == 3
    with_store(etcd, scenario)


def test_a_claim_cut_by_etcd_going_away_is_settled_by_the_same_agent_s_next_request(etcd):
    """etcd fails the confirming write (a leader dies): that ADD fails, and the running agent's
    next request finishes the claim rather than serving from a view that never saw it."""
    async def scenario(store):
        await add_pool(store, "p", "10.30.0.0/28", blockSize=28)  # one block: it must be ours
        real_txn = store.txn

        async def txn(compare, puts, deletes=(), **options):
            if any(v == {"state": "confirmed"} for v in puts.values()):
                store.txn = real_txn  # only this once
                raise DatastoreUnavailable("etcd is unavailable: the leader died")
            return await real_txn(compare, puts, deletes, **options)

        store.txn = txn
        ipam = IPAM(store)
        with pytest.raises(DatastoreUnavailable):
            await ipam.assign("n1", "first")
        assert (await load_snapshot(store)).affinities == {("n1", CIDR0): "pending"}
        [address] = await ipam.assign("n1", "second")
        assert address in CIDR0
        assert (await owners(store)) == {CIDR0: ("n1", "confirmed")}
    with_store(etcd, scenario)
