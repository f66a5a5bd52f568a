"""IPAM allocation rate against raw etcd compare-and-swap transactions, measured in one run on
one private etcd server.

    python -m bench.ipam [--allocations 2000]

Reference: sequential CAS transactions (compare mod_revision, put a value the size of a
half-full /26 block) on one key: the ceiling for anything that writes a block per change.
Also measured: 64 naive writers doing read-modify-CAS on one key (what unbatched concurrent
allocation on one node collapses into).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from ipaddress import IPv4Network

from ipam import block as blocks
from ipam.allocator import IPAM
from ipam.store import EtcdConfig, Store
from lab.etcd import EtcdServer
from tests.helpers import add_pool

KEY = "/bench/cas"


def sample_block_value() -> dict:
    block = blocks.new_block(IPv4Network("10.0.0.0/26"), "bench-node")
    for i in range(32):
        block, _ = blocks.assign(block, 1, f"k8s-pod-network.{i:064x}"[:80],
                                 {"node": "bench-node", "namespace": "default",
                                  "pod": f"web-{i}"})
    return blocks.to_json(block)


async def raw_cas_rate(store: Store, count: int, value: dict) -> float:
    revision = await store.put(KEY, value)
    start = time.perf_counter()
    for _ in range(count):
        result = await store.txn({KEY: revision}, {KEY: value})
        assert result.succeeded
        revision = result.revision
    return count / (time.perf_counter() - start)


async def naive_concurrent_cas_rate(store: Store, writers: int, seconds: float,
                                    value: dict) -> float:
    """Each writer: read the key, CAS it, retry on conflict. Successes per second."""
    await store.put(KEY, value)
    successes = 0
    deadline = time.perf_counter() + seconds

    async def writer():
        nonlocal successes
        while time.perf_counter() < deadline:
            entry = await store.get(KEY)
            if (await store.txn({KEY: entry.mod_revision}, {KEY: value})).succeeded:
                successes += 1
    start = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    return successes / (time.perf_counter() - start)


async def sequential_rate(ipam: IPAM, node: str, count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        await ipam.assign(node, f"seq-{node}-{i}", attributes={"namespace": "default",
                                                              "pod": f"web-{i}"})
    return count / (time.perf_counter() - start)


async def concurrent_rate(ipam: IPAM, node: str, count: int, width: int) -> float:
    start = time.perf_counter()
    for first in range(0, count, width):
        await asyncio.gather(*(ipam.assign(node, f"conc-{node}-{i}")
                               for i in range(first, min(first + width, count))))
    return count / (time.perf_counter() - start)


async def burst_latencies(ipam: IPAM, node: str, width: int) -> list[float]:
    """`width` requests at once; how long each waited for its address."""
    async def one(i):
        start = time.perf_counter()
        await ipam.assign(node, f"burst-{node}-{i}")
        return time.perf_counter() - start
    return list(await asyncio.gather(*(one(i) for i in range(width))))


async def main(args) -> None:
    with EtcdServer() as etcd:
        async with Store(EtcdConfig(endpoints=(etcd.endpoint,))) as store:
            # A pool big enough that no run ever waits on exhaustion; a warm-up claims blocks.
            await add_pool(store, "bench", "10.96.0.0/12", blockSize=26)
            await store.put("/pipit/resources/ipamconfig/default", {
                "apiVersion": "pipit.dev/v1", "kind": "IPAMConfiguration",
                "metadata": {"name": "default"},
                "spec": {"strictAffinity": False, "maxBlocksPerHost": 1000}})
            value = sample_block_value()
            ipam = IPAM(store)
            await concurrent_rate(ipam, "warm", 200, 50)
            await raw_cas_rate(store, 200, value)

            # Alternate reference and subject in rounds so that machine noise hits both alike.
            raws, seqs = [], []
            per_round = max(1, args.allocations // args.rounds)
            for r in range(args.rounds):
                raws.append(await raw_cas_rate(store, per_round, value))
                seqs.append(await sequential_rate(ipam, f"node-seq-{r}", per_round))
            raw, seq = statistics.median(raws), statistics.median(seqs)
            ratio = statistics.median(s / r for s, r in zip(seqs, raws))
            naive = await naive_concurrent_cas_rate(store, 64, 3.0, value)
            conc = await concurrent_rate(ipam, "node-conc", args.allocations * 4, 64)
            burst = await burst_latencies(ipam, "node-burst", 100)

    print(f"etcd 3.4 on loopback; sequential: {args.rounds} alternating rounds of "
          f"{args.allocations // args.rounds}, medians")
    print(f"{'measure':52} {'per s':>9} {'vs raw CAS':>11}")
    rows = [
        ("raw etcd CAS txn, sequential (reference)", raw),
        ("IPAM assign, sequential, one node", seq),
        ("naive read-modify-CAS, 64 concurrent on one key", naive),
        ("IPAM assign, 64 concurrent on one node (batched)", conc),
    ]
    for name, rate in rows:
        print(f"{name:52} {rate:9.0f} {rate / raw:10.2f}x")
    print(f"100 concurrent requests on one node: all served in {max(burst) * 1000:.0f} ms "
          f"(median wait {statistics.median(burst) * 1000:.0f} ms)")
    print(f"median per-round ratio, sequential IPAM / raw CAS: {ratio:.2f}x")
    print(f"goals: sequential >= 0.80x raw CAS -> {'met' if ratio >= 0.8 else 'MISSED'}; "
          f"100 concurrent within 1 s -> {'met' if max(burst) <= 1.0 else 'MISSED'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allocations", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    asyncio.run(main(parser.parse_args()))
