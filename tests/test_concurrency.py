"""Several node processes racing on one small pool: no address twice, nothing leaked, every
block owned exactly as its affinity says."""

import asyncio
import multiprocessing

import pytest

from ipam.allocator import IPAM
from ipam.snapshot import check, load_snapshot
from ipam.store import EtcdConfig, Store
from tests.helpers import add_pool, with_store

NODES = 4
IN_FLIGHT = 8  # concurrent requests per node process, like pods starting together


def node_process(endpoint: str, node: str, per_node: int, start, results) -> None:
    try:
        asyncio.run(allocate_then_release(endpoint, node, per_node, start, results))
    except BaseException as error:
        results.put((node, error))  # report, and break the barrier so nobody waits for us
        start.abort()
        raise


async def allocate_then_release(endpoint: str, node: str, per_node: int, start, results):
    async with Store(EtcdConfig(endpoints=(endpoint,))) as store:
        ipam = IPAM(store)
        start.wait()
        got = []
        for first in range(0, per_node, IN_FLIGHT):
            handles = [f"{node}-pod-{i}" for i in range(first, min(first + IN_FLIGHT,
                                                                     per_node))]
            for addresses in await asyncio.gather(*(ipam.assign(node, h) for h in handles)):
                got.extend(str(a) for a in addresses)
        results.put((node, got))
        start.wait()  # everyone has allocated: now release it all, racing again
        for first in range(0, per_node, IN_FLIGHT):
            await asyncio.gather(*(ipam.release(node, f"{node}-pod-{i}")
                                   for i in range(first, min(first + IN_FLIGHT, per_node))))


@pytest.mark.parametrize("cidr, block_size, per_node", [
    # 32 blocks of 62 (+ gateway and broadcast address) = 1984 addresses for 1960 pods:
    # blocks are fought over until none is left, then the last addresses come from whichever
    # block has room.
    ("10.40.0.0/21", 26, 490),
    # One block for everyone: one node owns it, the others borrow; all write the same key.
    ("10.41.0.0/24", 24, 60),
], ids=["1960-pods-in-1984", "one-shared-block"])
def test_node_processes_racing_on_one_small_pool(etcd, cidr, block_size, per_node):
    with_store(etcd, lambda store: add_pool(store, "small", cidr, blockSize=block_size))
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(NODES + 1)
    results = context.Queue()
    processes = [context.Process(target=node_process,
                                 args=(etcd.endpoints[0], f"node-{n}", per_node, start, results))
                 for n in range(NODES)]
    for p in processes:
        p.start()
    try:
        start.wait(timeout=60)
        allocated = dict(results.get(timeout=300) for _ in processes)
        failed = {node: got for node, got in allocated.items() if isinstance(got, BaseException)}
        assert not failed, failed

        async def inspect(store):
            return await load_snapshot(store)
        snap = with_store(etcd, inspect)
        everything = [a for got in allocated.values() for a in got]
        assert len(everything) == NODES * per_node
        assert len(set(everything)) == len(everything), "an address was handed out twice"
        assert check(snap) == [], check(snap)
        assert sum(b.used for b in snap.blocks.values()) == NODES * per_node  # no leak
        holders = {str(b.address(o)): b.attributes[i] for b in snap.blocks.values()
                   for o, i in enumerate(b.allocations) if i is not None}
        borrowed = sum(1 for b in snap.blocks.values() for i in b.allocations
                       if i is not None and b.attributes[i].secondary["node"] != b.node)
        print(f"{borrowed} addresses were borrowed from other nodes' blocks")
        for node, got in allocated.items():  # each address is held by the pod that got it
            for i, address in enumerate(got):
                assert holders[address].handle_id == f"{node}-pod-{i}"
                assert holders[address].secondary["node"] == node
        start.wait(timeout=60)
        for p in processes:
            p.join(timeout=300)
            assert p.exitcode == 0
        snap = with_store(etcd, inspect)
        assert check(snap) == [], check(snap)
        assert snap.handles == {} and all(b.used == 0 for b in snap.blocks.values())
        for cidr, block in snap.blocks.items():
            assert block.node is not None and snap.affinities[(block.node, cidr)] == "confirmed"
    finally:
        for p in processes:
            if p.is_alive():
                p.kill()
