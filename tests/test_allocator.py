"""The allocator against a real etcd: what a node gets, borrowing, limits, releases, pools."""

import asyncio
from ipaddress import IPv4Address, IPv4Network

import pytest

from ipam import block as blocks
from ipam import keys
from ipam.allocator import IPAM
from ipam.config import IPAMConfig, config_to_document
from ipam.errors import InUse, InvalidResource, NotFound, PoolExhausted
from ipam.pool import pool_from_spec, search_start
from ipam.pool_delete import delete_pool
from ipam.release import release_addresses, release_host_affinities
from ipam.block import Release
from ipam.snapshot import check, load_snapshot
from ipam.store import Store
from tests.helpers import add_pool, with_store
from tests.sentences import one_sentence


async def configure(store: Store, **settings) -> None:
    await store.put(keys.IPAM_CONFIG, config_to_document(IPAMConfig(**settings)))


async def register_node(store: Store, node: str, labels: dict) -> None:
    await store.put(keys.node_key(node), {"apiVersion": "pipit.dev/v1", "kind": "Node",
                                          "metadata": {"name": node, "labels": labels},
                                          "spec": {}})


async def assert_consistent(store: Store) -> None:
    problems = check(await load_snapshot(store))
    assert problems == [], problems


def test_assign_records_block_affinity_handle_and_attributes(etcd):
    async def scenario(store):
        await add_pool(store, "p", "10.10.0.0/24", blockSize=28)
        ipam = IPAM(store)
        got = await ipam.assign("n1", "pod-a", 2, {"namespace": "ns", "pod": "a"})
        assert len(set(got)) == 2 and all(a in IPv4Network("10.10.0.0/24") for a in got)
        snap = await load_snapshot(store)
        [(cidr, block)] = snap.blocks.items()
        assert block.node == "n1" and snap.affinities[("n1", cidr)] == "confirmed"
        # The node's search starts where its name points, so nodes spread over the pool.
        pool = pool_from_spec("p", {"cidr": "10.10.0.0/24", "blockSize": 28})
        assert cidr == pool.block(search_start(pool, "n1"))
        assert snap.handles["pod-a"].blocks == {str(cidr): 2}
        holder = block.holder(got[0])
        assert holder.handle_id == "pod-a"
        assert dict(holder.secondary) == {"node": "n1", "namespace": "ns", "pod": "a"}
        assert await ipam.addresses("pod-a") == sorted(got)
        await assert_consistent(store)
    with_store(etcd, scenario)


def test_concurrent_requests_on_one_node_are_batched(etcd):
    async def scenario(store):
        await add_pool(store, "p", "10.11.0.0/22", blockSize=26)
        ipam = IPAM(store)
        results = await asyncio.gather(*(ipam.assign("n1", f"pod-{i}") for i in range(100)))
        addresses = [a for r in results for a in r]
        assert len(addresses) == len(set(addresses)) == 100
        # 100 requests cost a handful of transactions, not 100 (batches of up to 50).
        assert ipam.transactions <= 4
        freed = await asyncio.gather(*(ipam.release("n1", f"pod-{i}") for i in range(100)))
        assert sorted(a for f in freed for a in f) == sorted(addresses)
        snap = await load_snapshot(store)
        assert snap.handles == {} and all(b.empty for b in snap.blocks.values())
        await assert_consistent(store)
    with_store(etcd, scenario)


def test_release_of_unknown_handle_frees_nothing_and_succeeds(etcd):
    async def scenario(store):
        await add_pool(store, "p", "10.12.0.0/24")
        ipam = IPAM(store)
        kept = await ipam.assign("n1", "keep")
        assert await ipam.release("n1", "never-assigned") == []
        assert await ipam.addresses("keep") == kept
    with_store(etcd, scenario)


def test_borrows_from_other_nodes_blocks_unless_strict(etcd):
    """maxBlocksPerHost > 0 without strictAffinity is meaningful in Pipit (Calico refuses it):
    past its limit a node borrows."""
    async def scenario(store):
        # two blocks of 6 (+ gateway and broadcast address)
        await add_pool(store, "p", "10.13.0.0/28", blockSize=29)
        await configure(store, max_blocks_per_host=1)
        ipam = IPAM(store)
        own = await ipam.assign("n1", "a", 6)
        other = await ipam.assign("n2", "b", 1)  # n2 claims the second block
        borrowed = await ipam.assign("n1", "c", 2)
        n2_block = IPv4Network((other[0], 29), strict=False)
        assert all(a in n2_block for a in borrowed) and not set(borrowed) & set(own + other)
        snap = await load_snapshot(store)
        assert snap.blocks[n2_block].node == "n2"  # borrowing does not change the owner
        assert snap.handles["c"].blocks == {str(n2_block): 2}
        await configure(store, max_blocks_per_host=1, strict_affinity=True)
        strict = IPAM(store)
        with pytest.raises(PoolExhausted, match="strictAffinity"):
            await strict.assign("n1", "d")
        assert "d" not in (await load_snapshot(store)).handles
        await assert_consistent(store)
    with_store(etcd, scenario)


def test_max_blocks_per_host_zero_means_twenty(etcd):
    async def scenario(store):
        await add_pool(store, "p", "10.14.0.0/24", blockSize=32)  # one address per block
        await configure(store, strict_affinity=True, max_blocks_per_host=0)
        ipam = IPAM(store)
        got = await ipam.assign("n1", "twenty", 20)
        assert len(got) == 20
        with pytest.raises(PoolExhausted, match=r"holds 20 blocks \(maxBlocksPerHost 20\)"):
            await ipam.assign("n1", "one-more")
    with_store(etcd, scenario)


def test_request_larger_than_what_is_left_takes_nothing(etcd):
    async def scenario(store):
        await add_pool(store, "p", "10.15.0.0/28", blockSize=28)
        ipam = IPAM(store)
        await ipam.assign("n1", "first", 10)  # of 14: the gateway and broadcast are not given
        before = await load_snapshot(store)
        with pytest.raises(PoolExhausted):
            await ipam.assign("n1", "too-many", 5)
        after = await load_snapshot(store)
        assert after.blocks == before.blocks and after.handles == before.handles
        assert len(await ipam.assign("n1", "fits", 4)) == 4
    with_store(etcd, scenario)


def spread(count: int) -> list[IPv4Address]:
    """`count` addresses of 10.50.0.0/16, each in a /29 block of its own."""
    return [IPv4Address(f"10.50.{i // 32}.{(i % 32) * 8 + 1}") for i in range(count)]


def test_addresses_in_more_blocks_than_a_transaction_takes_are_refused_claiming_nothing(etcd):
    """Asked for by value (ip-addrs, floating IPs), addresses in a hundred blocks and more
    would need a transaction etcd refuses (--max-txn-ops), after claiming every block: one
    sentence instead, before anything is claimed."""
    async def scenario(store):
        await add_pool(store, "p", "10.50.0.0/16", blockSize=29)
        ipam = IPAM(store)
        with pytest.raises(InvalidResource, match="the 300 addresses asked for lie in more "
                                                  "blocks than one etcd transaction can take"):
            await ipam.assign("n1", "wide", addresses=spread(300))
        snap = await load_snapshot(store)
        assert snap.blocks == {} and snap.affinities == {} and snap.handles == {}
        assert len(await ipam.assign("n1", "widest", addresses=spread(105))) == 105
    with_store(etcd, scenario)


def test_a_wide_request_among_others_waits_for_a_transaction_of_its_own(etcd):
    """Addresses in a hundred blocks, asked for or freed in the same batch as many others:
    the others go first, without overflowing the transaction (etcd refused it, failing
    every request of the batch)."""
    async def scenario(store):
        await add_pool(store, "p", "10.50.0.0/16", blockSize=29)
        ipam = IPAM(store, batch_limit=100)
        results = await asyncio.gather(  # one batch, but not one transaction
            *(ipam.assign("n1", f"pod-{i}", addresses=spread(200)[104 + i:105 + i])
              for i in range(40)),
            ipam.assign("n1", "wide", addresses=spread(104)))
        assert sorted(a for r in results for a in r) == spread(144)
        assert ipam.transactions == 2
        # and freeing it, among others asking: the same
        results = await asyncio.gather(
            *(ipam.assign("n1", f"pod-{i}", addresses=spread(200)[144 + i:145 + i])
              for i in range(40)),
            ipam.release("n1", "wide"))
        assert sorted(a for r in results for a in r) == spread(184)[:104] + spread(184)[144:]
        assert ipam.transactions == 4
        await assert_consistent(store)
        await assert_consistent(store)
    with_store(etcd, scenario)


def test_pool_choice_follows_node_selector_and_names(etcd):
    async def scenario(store):
        await add_pool(store, "rack-a", "10.16.0.0/24", nodeSelector="rack == 'a'")
        await add_pool(store, "rack-b", "10.16.1.0/24", nodeSelector="rack == 'b'")
        await register_node(store, "na", {"rack": "a"})
        await register_node(store, "nb", {"rack": "b"})
        ipam = IPAM(store)
        [a] = await ipam.assign("na", "pa")
        [b] = await ipam.assign("nb", "pb")
        assert a in IPv4Network("10.16.0.0/24") and b in IPv4Network("10.16.1.0/24")
        # A pool the request names serves it even where its selector does not reach.
        [x] = await ipam.assign("na", "px", pools=["rack-b"])
        assert x in IPv4Network("10.16.1.0/24")
        with pytest.raises(NotFound, match="'nope' does not exist"):
            await ipam.assign("na", "py", pools=["nope"])
        with pytest.raises(NotFound) as refused:  # saying why each pool does not
            await ipam.assign("nc", "pz")
        one_sentence(refused.value, "no enabled IP pool selects node nc for pod addresses "
                     "(pool 'rack-a': nodeSelector \"rack == 'a'\" does not select the node; "
                     "'rack-b': nodeSelector \"rack == 'b'\" does not select the node)")
    with_store(etcd, scenario)


def test_a_pool_selecting_no_node_serves_only_the_requests_that_name_it(etcd):
    """Calico's manual-only pool: `nodeSelector: "!all()"` keeps it out of every automatic
    choice, and a CNI config (or annotation) that names it still gets addresses from it."""
    async def scenario(store):
        await add_pool(store, "default", "10.17.0.0/24", blockSize=28)
        await add_pool(store, "manual", "10.17.1.0/24", blockSize=28, nodeSelector="!all()")
        await register_node(store, "n1", {})
        ipam = IPAM(store)
        [auto] = await ipam.assign("n1", "auto")
        assert auto in IPv4Network("10.17.0.0/24")
        asked = await ipam.assign("n1", "asked", 2, pools=["manual"])
        assert all(a in IPv4Network("10.17.1.0/24") for a in asked)
        # The node owns that block now, but requests that name no pool still avoid it.
        more = [(await ipam.assign("n1", f"auto-{i}"))[0] for i in range(20)]
        assert not [a for a in more if a in IPv4Network("10.17.1.0/24")]
        await assert_consistent(store)
        await add_pool(store, "off", "10.17.2.0/24", blockSize=28, disabled=True)
        with pytest.raises(PoolExhausted, match="'off' is disabled"):
            await ipam.assign("n1", "never", pools=["off"])
    with_store(etcd, scenario)


def test_allowed_uses_and_manual_pools_keep_pods_and_tunnels_apart(etcd):
    """Calico's allowedUses and assignmentMode: a Tunnel-only pool gives tunnel addresses
    (named or not) and never a pod's; a Workload-only one the reverse; a Manual pool only
    what names it. The same allocator, one after the other, with a warm cache."""
    async def scenario(store):
        await add_pool(store, "pods", "10.18.0.0/24", blockSize=28, allowedUses=["Workload"])
        await add_pool(store, "tunnels", "10.18.1.0/24", blockSize=28, allowedUses=["Tunnel"])
        await add_pool(store, "manual", "10.18.2.0/24", blockSize=28, assignmentMode="Manual")
        await add_pool(store, "public", "10.18.3.0/24", blockSize=28,
                       allowedUses=["LoadBalancer"])
        await register_node(store, "n1", {})
        ipam = IPAM(store)
        pods = [(await ipam.assign("n1", f"pod-{i}"))[0] for i in range(20)]
        assert all(a in IPv4Network("10.18.0.0/24") for a in pods)
        [tunnel] = await ipam.assign("n1", "ipip-tunnel-addr-n1", pools=["tunnels"],
                                     use="Tunnel")
        assert tunnel in IPv4Network("10.18.1.0/24")
        [auto_tunnel] = await ipam.assign("n1", "vxlan-tunnel-addr-n1", use="Tunnel")
        assert auto_tunnel in IPv4Network("10.18.1.0/24")
        with pytest.raises(PoolExhausted, match="'tunnels' does not give pod addresses"):
            await ipam.assign("n1", "pod-x", pools=["tunnels"])
        with pytest.raises(PoolExhausted, match="'pods' does not give tunnel addresses"):
            await ipam.assign("n1", "tunnel-x", pools=["pods"], use="Tunnel")
        [asked] = await ipam.assign("n1", "asked", pools=["manual"])
        assert asked in IPv4Network("10.18.2.0/24")
        # an address asked for by value goes by the same rule (no block claimed for it)
        with pytest.raises(InvalidResource, match="10.18.3.5 is in IP pool 'public', which "
                                                  "gives no pod addresses"):
            await ipam.assign("n1", "pod-y", addresses=[IPv4Address("10.18.3.5")])
        with pytest.raises(InvalidResource, match="gives no load-balancer addresses"):
            await ipam.assign("load-balancer", "lb.web.shop", use="LoadBalancer",
                              addresses=[IPv4Address("10.18.0.200")])
        assert await ipam.assign("load-balancer", "lb.web.shop", use="LoadBalancer",
                                 addresses=[IPv4Address("10.18.3.5")]) == [
            IPv4Address("10.18.3.5")]
        await assert_consistent(store)
        assert not any(n == "n1" and c in IPv4Network("10.18.3.0/24")
                       for n, c in (await load_snapshot(store)).affinities)
    with_store(etcd, scenario)


def test_disabling_a_pool_stops_allocation_even_with_a_warm_cache(etcd):
    async def scenario(store):
        await add_pool(store, "p", "10.17.0.0/24")
        ipam = IPAM(store, refresh_seconds=3600)
        await ipam.assign("n1", "before")
        await add_pool(store, "p", "10.17.0.0/24", disabled=True)
        with pytest.raises(NotFound, match="no enabled IP pool"):
            await ipam.assign("n1", "after")
        assert "after" not in (await load_snapshot(store)).handles
    with_store(etcd, scenario)


def test_a_pool_edited_under_a_warm_cache_still_serves_new_blocks(etcd):
    async def scenario(store):
        await add_pool(store, "p", "10.17.0.0/24", blockSize=30)  # 2 addresses per block
        ipam = IPAM(store, refresh_seconds=3600)
        await ipam.assign("n1", "first", 2)  # fills the first block; the view is cached
        await add_pool(store, "p", "10.17.0.0/24", blockSize=30, natOutgoing=True)
        got = await ipam.assign("n1", "second", 2)  # needs a new block: the claim sees the
        assert len(got) == 2                        # pool changed, and decides again
        await assert_consistent(store)
    with_store(etcd, scenario)


def test_a_pool_enabled_under_a_warm_cache_serves_the_next_request(etcd):
    """A refusal is confirmed on fresh reads: the pool created (or enabled) since the view was
    cached serves the request, instead of "no enabled IP pool" until the view is refreshed."""
    async def scenario(store):
        await add_pool(store, "old", "10.17.0.0/24")
        ipam = IPAM(store, refresh_seconds=3600)
        await ipam.assign("n1", "before")
        await add_pool(store, "old", "10.17.0.0/24", disabled=True)
        with pytest.raises(NotFound, match="no enabled IP pool"):
            await ipam.assign("n1", "refused")
        await add_pool(store, "new", "10.18.0.0/24")
        [got] = await ipam.assign("n1", "after")
        assert got in IPv4Network("10.18.0.0/24")
        await assert_consistent(store)
    with_store(etcd, scenario)


def test_an_address_asked_for_in_a_pool_made_under_a_warm_cache_is_given(etcd):
    """A pod's (or a Service's) own address in a pool created, enabled or opened to its use
    since the view was cached: granted at once, not refused until the view is refreshed; and
    a refusal that fresh reads confirm still stands, with nothing written."""
    async def scenario(store):
        await add_pool(store, "old", "10.17.0.0/24")
        ipam = IPAM(store, refresh_seconds=3600)
        await ipam.assign("n1", "before")
        await add_pool(store, "new", "10.18.0.0/24")
        assert await ipam.assign("n1", "created", addresses=[IPv4Address("10.18.0.9")]) == [
            IPv4Address("10.18.0.9")]
        await add_pool(store, "off", "10.19.0.0/24", disabled=True)
        await ipam.assign("n1", "warm")  # the view knows "off" as disabled
        await add_pool(store, "off", "10.19.0.0/24")
        assert await ipam.assign("n1", "enabled", addresses=[IPv4Address("10.19.0.9")]) == [
            IPv4Address("10.19.0.9")]
        with pytest.raises(InvalidResource, match="not in any IP pool"):
            await ipam.assign("n1", "nowhere", addresses=[IPv4Address("10.20.0.9")])
        with pytest.raises(InvalidResource, match="already"):
            await ipam.assign("n1", "twice", addresses=[IPv4Address("10.19.0.9")])
        handles = (await load_snapshot(store)).handles
        assert "nowhere" not in handles and "twice" not in handles
        await assert_consistent(store)
    with_store(etcd, scenario)


def test_an_address_given_back_is_not_handed_out_again_within_the_cooldown(etcd):
    """Calico's ipCooldownSeconds: a pod's address given back waits that long before another
    pod gets it (traffic for the pod deleted may still come); the refusal says why; once the
    cooldown has passed it is handed out; an address asked for by value is given at once."""
    now = [1_000_000.0]

    async def scenario(store):
        await configure(store, strict_affinity=True, max_blocks_per_host=1,
                        ip_cooldown_seconds=60)
        await add_pool(store, "p", "10.17.0.0/24", blockSize=29)  # 6 addresses a block
        ipam = IPAM(store, refresh_seconds=3600, clock=lambda: now[0])
        got = [a for i in range(6) for a in await ipam.assign("n1", f"pod{i}")]
        await ipam.release("n1", "pod0")
        with pytest.raises(PoolExhausted) as refused:
            await ipam.assign("n1", "next")
        assert "1 of its addresses were given back less than ipCooldownSeconds 60 ago" in \
            str(refused.value)
        now[0] += 59
        with pytest.raises(PoolExhausted):
            await ipam.assign("n1", "next")
        now[0] += 1
        assert await ipam.assign("n1", "next") == [got[0]]
        await ipam.release("n1", "pod1")
        assert await ipam.assign("n1", "fixed", addresses=[got[1]]) == [got[1]]
        await assert_consistent(store)
    with_store(etcd, scenario)


def test_without_auto_allocated_blocks_a_node_uses_the_blocks_addresses_asked_for_claimed(
        etcd):
    """Calico's autoAllocateBlocks false (with strictAffinity): a node claims no block by
    itself; an address asked for by value claims its block, whose other addresses then serve
    the node's automatic assignments."""
    async def scenario(store):
        await configure(store, strict_affinity=True, auto_allocate_blocks=False)
        await add_pool(store, "p", "10.17.0.0/24", blockSize=29)
        ipam = IPAM(store)
        with pytest.raises(PoolExhausted) as refused:
            await ipam.assign("n1", "first")
        assert "claims no more by itself (autoAllocateBlocks is false" in str(refused.value)
        assert await store.list_keys(keys.BLOCKS) == []
        fixed = IPv4Address("10.17.0.10")
        assert await ipam.assign("n1", "fixed", addresses=[fixed]) == [fixed]
        got = [a for i in range(5) for a in await ipam.assign("n1", f"pod{i}")]
        assert all(a in IPv4Network("10.17.0.8/29") for a in got) and fixed not in got
        with pytest.raises(PoolExhausted):  # the block is full, and no other is claimed
            await ipam.assign("n1", "more")
        assert len(await store.list_keys(keys.BLOCKS)) == 1
        await assert_consistent(store)
    with_store(etcd, scenario)


def test_two_allocators_sharing_blocks_never_hand_out_an_address_twice(etcd):
    async def scenario(store):
        await add_pool(store, "p", "10.18.0.0/28", blockSize=28)
        mine = IPAM(store, refresh_seconds=3600)
        first = await mine.assign("n1", "a", 4)  # warms mine's cache of the block
        other = IPAM(store)
        await configure(store, max_blocks_per_host=1)
        borrowed = await other.assign("n2", "b", 4)  # n2 borrows from n1's cached block
        more = await mine.assign("n1", "c", 4)  # mine's cached block is stale: must not reuse
        everything = first + borrowed + more
        assert len(set(everything)) == 12
        await assert_consistent(store)
    with_store(etcd, scenario)


def test_release_by_address_updates_the_handle_and_honours_sequence(etcd):
    async def scenario(store):
        await add_pool(store, "p", "10.19.0.0/24")
        older = IPAM(store, refresh_seconds=3600)  # its view of the block: before a and b
        await older.assign("n1", "first")
        ipam = IPAM(store)
        a, b = await ipam.assign("n1", "pod", 2)
        snap = await load_snapshot(store)
        block = next(iter(snap.blocks.values()))
        stale = block.sequence_of(a) + 1000
        assert await release_addresses(store, [Release(a, sequence=stale)]) == []
        assert await release_addresses(store, [Release(a, sequence=block.sequence_of(a))]) == [a]
        assert await ipam.addresses("pod") == [b]
        assert (await load_snapshot(store)).handles["pod"].total == 1
        await assert_consistent(store)
        # The allocators' cached views are now stale (ipam's holds a, older's holds neither
        # a nor b); their next requests must still be right.
        [c] = await ipam.assign("n1", "next")
        got = await older.assign("n1", "later", 2)  # its view offers a and b first
        assert b not in got and c not in got and len(set(got)) == 2
        snap = await load_snapshot(store)
        holders = {x: snap.blocks[block.cidr].holder(x).handle_id for x in (b, c, *got)}
        assert holders == {b: "pod", c: "next", **{x: "later" for x in got}}
        await assert_consistent(store)
    with_store(etcd, scenario)


def test_releasing_a_nodes_affinities(etcd):
    async def scenario(store):
        await add_pool(store, "p", "10.20.0.0/26", blockSize=28)
        ipam = IPAM(store)
        await ipam.assign("gone", "h1", 20)  # two blocks: one full, one with 5 in use
        await ipam.release("gone", "h1")
        [kept] = await ipam.assign("gone", "h2")
        with pytest.raises(InUse):
            await release_host_affinities(store, "gone", require_empty=True)
        result = await release_host_affinities(store, "gone")
        assert len(result.released) == 1 and len(result.kept_in_use) == 1
        snap = await load_snapshot(store)
        assert not any(node == "gone" for node, _ in snap.affinities)
        [block] = snap.blocks.values()
        assert block.node is None and block.holder(kept).handle_id == "h2"
        await assert_consistent(store)
        # The unowned block's free addresses can be borrowed; when it empties, it goes away.
        await configure(store, max_blocks_per_host=1)
        await IPAM(store).release("other", "h2")
        assert (await load_snapshot(store)).blocks == {}
    with_store(etcd, scenario)


def test_delete_pool_refuses_while_in_use_and_force_cleans_up(etcd):
    async def scenario(store):
        await add_pool(store, "p", "10.21.0.0/24", blockSize=28)
        await add_pool(store, "q", "10.22.0.0/24", blockSize=28)
        ipam = IPAM(store)
        await ipam.assign("n1", "in-p", 3, pools=["p"])
        [in_q] = await ipam.assign("n1", "in-q", pools=["q"])
        before = await store.snapshot()
        with pytest.raises(InUse, match="3 address"):
            await delete_pool(store, "p")
        assert await store.snapshot() == before
        result = await delete_pool(store, "p", force=True)
        assert result.addresses_released == 3
        snap = await load_snapshot(store)
        assert [p.name for p in snap.pools] == ["q"]
        assert "in-p" not in snap.handles and await ipam.addresses("in-q") == [in_q]
        assert all(cidr.subnet_of(IPv4Network("10.22.0.0/24")) for _, cidr in snap.affinities)
        await assert_consistent(store)
    with_store(etcd, scenario)


def test_delete_of_an_unused_pool_releases_its_empty_blocks(etcd):
    async def scenario(store):
        await add_pool(store, "p", "10.23.0.0/24", blockSize=28)
        ipam = IPAM(store)
        await ipam.assign("n1", "h", 1)
        await ipam.release("n1", "h")
        await delete_pool(store, "p")
        assert await store.snapshot() == {}
    with_store(etcd, scenario)


def test_stored_block_json_matches_the_block_model(etcd):
    async def scenario(store):
        await add_pool(store, "p", "10.24.0.0/24", blockSize=29)
        [a] = await IPAM(store).assign("n1", "h")
        [entry] = await store.list(keys.BLOCKS)
        block = blocks.from_json(entry.value)
        assert entry.value["affinity"] == "host:n1" and block.holder(a).handle_id == "h"
        assert block.ordinal(a) not in entry.value["unallocated"]
        assert entry.value["sequenceNumberForAllocation"] == {str(block.ordinal(a)): 0}
    with_store(etcd, scenario)


def test_reuse_answers_with_the_addresses_a_handle_already_holds(etcd):
    async def scenario(store):
        await add_pool(store, "p", "10.25.0.0/24")
        ipam = IPAM(store)
        first = await ipam.assign("n1", "pod", reuse=True)
        assert await ipam.assign("n1", "pod", reuse=True) == first
        # Concurrent repeats in one batch, and a fresh allocator (agent restarted), agree.
        again = await asyncio.gather(*(ipam.assign("n1", "pod", reuse=True) for _ in range(5)))
        assert all(a == first for a in again)
        assert await IPAM(store).assign("n1", "pod", reuse=True) == first
        assert (await load_snapshot(store)).handles["pod"].total == 1
        fresh = await asyncio.gather(*(ipam.assign("n1", "new", reuse=True) for _ in range(5)))
        assert all(a == fresh[0] for a in fresh)
        assert (await load_snapshot(store)).handles["new"].total == 1
        await ipam.release("n1", "pod")
        # released, the handle holds nothing: reuse gets it a new address, really held
        again = await ipam.assign("n1", "pod", reuse=True)
        assert len(again) == 1 and await IPAM(store).addresses("pod") == again
        assert (await load_snapshot(store)).handles["pod"].total == 1
        await assert_consistent(store)
    with_store(etcd, scenario)
