"""A leak GC pass (pipit-controller's, without the API server) over 10,000 allocations on 100
nodes with 1 % leaked, against one raw compare-and-swap transaction per address, measured in
the same run on one private etcd server.

    python -m bench.gc [--nodes 100] [--per-node 100] [--leaked 0.01] [--rounds 3]

The pass: one range read of all IPAM state (ipam.snapshot), the decisions (ipam.gc.plan, pure)
and the releases (ipam.release.release_leaks: several handles per transaction, each address
re-validated by its sequence number). The leaked pods' nodes exist, so the pass runs twice,
the second past the grace period (the first only records candidates). Reference: sequential
CAS transactions (compare mod_revision, put a value the size of a half-full /26 block), one
per leaked address: what releasing each address alone costs at the least.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

from bench.ipam import raw_cas_rate, sample_block_value
from ipam import gc, keys
from ipam.allocator import IPAM
from ipam.gc import Cluster, Pod
from ipam.release import release_leaks
from ipam.snapshot import load_snapshot
from ipam.store import EtcdConfig, Store
from lab.etcd import EtcdServer
from tests.helpers import add_pool


class CountingStore(Store):
    """A Store that counts the transactions that write (Txn with puts or deletes)."""
    writes = 0

    async def txn(self, expect, put={}, delete=(), **options):
        self.writes += 1
        return await super().txn(expect, put, delete, **options)


async def populate(store: Store, nodes: int, per_node: int, round_: int) -> dict:
    ipam = IPAM(store)
    addresses = {}

    async def one(node: str, i: int) -> None:
        name = f"r{round_}-{node}-p{i}"
        [address] = await ipam.assign(node, f"net.{name}.eth0",
                                      attributes={"namespace": "bench", "pod": name})
        addresses[name] = (node, address)
    for n in range(nodes):
        node = f"r{round_}-n{n}"
        await store.put(keys.node_key(node), {
            "apiVersion": "pipit.dev/v1", "kind": "Node", "metadata": {"name": node},
            "spec": {"bgp": {}, "orchRefs": [{"orchestrator": "k8s", "nodeName": node}]}})
        await asyncio.gather(*(one(node, i) for i in range(per_node)))
    return addresses


async def gc_pass(store: CountingStore, cluster: Cluster, state: gc.State, now: float,
                  grace: float) -> tuple[gc.State, int, float, float, float]:
    """(next state, handles released, seconds for the whole pass, in plan(), releasing)."""
    start = time.perf_counter()
    snap = await load_snapshot(store)
    planned = time.perf_counter()
    result = gc.plan(snap, cluster, state, now, grace)
    plan_seconds = time.perf_counter() - planned
    releasing = time.perf_counter()
    released = await release_leaks(store, result.leaks) if result.leaks else []
    end = time.perf_counter()
    return result.state, len(released), end - start, plan_seconds, end - releasing


async def main(args) -> None:
    rows = []
    with EtcdServer() as etcd:
        async with CountingStore(EtcdConfig(endpoints=(etcd.endpoint,))) as store:
            await add_pool(store, "bench", "10.64.0.0/10", blockSize=26)
            value = sample_block_value()
            for round_ in range(args.rounds):
                stale = [k for k in await store.list_keys(keys.ROOT)
                         if not k.startswith(keys.POOLS)]
                for start in range(0, len(stale), 100):  # etcd's limit per transaction
                    await store.txn({}, delete=stale[start:start + 100])
                addresses = await populate(store, args.nodes, args.per_node, round_)
                names = sorted(addresses)
                random.Random(round_).shuffle(names)
                leaked = set(names[:int(len(names) * args.leaked)])
                pods = {("bench", name): Pod("bench", name, node, frozenset({address}))
                        for name, (node, address) in addresses.items() if name not in leaked}
                cluster = Cluster(frozenset(n for n, _ in addresses.values()), pods)
                state, _, first_seconds, _, _ = await gc_pass(store, cluster, gc.State(), 0.0,
                                                           60.0)
                store.writes = 0
                state, released, seconds, plan_seconds, release_seconds = await gc_pass(
                    store, cluster, state, 60.0, 60.0)
                writes = store.writes
                assert released == len(leaked), (released, len(leaked))
                raw_rate = await raw_cas_rate(store, len(leaked), value)
                rows.append((len(addresses), released, seconds, plan_seconds, first_seconds,
                             writes, len(leaked) / raw_rate, release_seconds))
    total, released = rows[0][0], rows[0][1]
    seconds = statistics.median(r[2] for r in rows)
    plan_seconds = statistics.median(r[3] for r in rows)
    first = statistics.median(r[4] for r in rows)
    writes = statistics.median(r[5] for r in rows)
    raw = statistics.median(r[6] for r in rows)
    ratio = statistics.median(r[2] / r[6] for r in rows)
    release = statistics.median(r[7] for r in rows)
    release_ratio = statistics.median(r[7] / r[6] for r in rows)
    print(f"etcd 3.4 on loopback; {total} allocations on {args.nodes} nodes, {released} "
          f"leaked; medians of {args.rounds} rounds")
    print(f"{'measure':58} {'value':>10}")
    print(f"{'GC pass that releases the leaks (snapshot, plan, release)':58} "
          f"{seconds * 1000:8.0f} ms")
    print(f"{'  of which plan() (pure)':58} {plan_seconds * 1000:8.0f} ms")
    print(f"{'  of which the releases (release_leaks)':58} {release * 1000:8.0f} ms")
    print(f"{'GC pass that only records candidates':58} {first * 1000:8.0f} ms")
    print(f"{'raw CAS, one per leaked address (reference)':58} {raw * 1000:8.0f} ms")
    print(f"{'etcd write transactions per released address':58} "
          f"{writes / released:10.3f}   (reference 1.000)")
    print(f"{'time per released address, whole GC pass vs raw CAS':58} {ratio:9.2f}x")
    print(f"{'time per released address, the releases vs raw CAS':58} {release_ratio:9.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--per-node", type=int, default=100)
    parser.add_argument("--leaked", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
