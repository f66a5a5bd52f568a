"""The route reflector's pure core (`route_reflector/`): CPU time of the workloads of issue 11,
with no BGP, no ExaBGP and no I/O.

    python -m bench.rr_core [--repeat 5] [--clients 200] [--prefixes 5000]

This one prints no reference and no ratio: it measures only the part in Python that the
reflector adds between received UPDATEs and the batched commands (Adj-RIB-In, best path,
reflection, fan-out, batching), so that its share of the end-to-end figure against BIRD
(bench/rr.py, measured with BIRD in the same run) is known. Best of --repeat runs each:

- cold resync, all at once: --clients clients come up together, each then sends its 1-2
  blocks (alternately) in one UPDATE and End-of-RIB; everything is batched once at the end;
- cold resync, one by one: the same clients come up one after another, each getting the
  table so far and then sending its blocks (each call's output batched on its own);
- N prefixes x {2, 50} clients: the clients are up, the prefixes arrive spread evenly over
  them (one UPDATE per client) and are reflected to all the others; batched once;
- one change at --clients clients: a new block on one client, reflected to all the others
  and batched (the per-change cost in a node join), median of 200.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network

from route_reflector import CLIENT, Reflector, Route, batch

ROUTER_ID = IPv4Address("10.0.255.1")
CLUSTER_ID = IPv4Address("244.0.0.1")
BLOCK_BASE = int(IPv4Address("10.244.0.0"))


def client(i: int) -> IPv4Address:
    return IPv4Address(int(IPv4Address("10.1.0.0")) + i + 1)


def block(i: int) -> IPv4Network:
    return IPv4Network((BLOCK_BASE + i * 64, 26))


def routes_of(peer: IPv4Address, blocks: range) -> list[Route]:
    return [Route(block(b), peer, local_pref=100, peer=peer, peer_router_id=peer)
            for b in blocks]


def reflector(clients: list[IPv4Address]) -> Reflector:
    rr = Reflector(ROUTER_ID, CLUSTER_ID)
    for peer in clients:
        rr.add_peer(peer, CLIENT)
    return rr


def blocks_per_client(count: int) -> list[range]:
    """1 and 2 blocks alternately."""
    ranges, start = [], 0
    for i in range(count):
        n = 1 + i % 2
        ranges.append(range(start, start + n))
        start += n
    return ranges


def cold_all_at_once(clients: int) -> tuple[float, str]:
    peers = [client(i) for i in range(clients)]
    routes = [routes_of(p, r) for p, r in zip(peers, blocks_per_client(clients))]
    rr = reflector(peers)
    start = time.perf_counter()
    out = rr.peers_up(peers)
    for peer, sent in zip(peers, routes):
        out += rr.update(peer, sent)
        out += rr.end_of_rib(peer)
    batches = batch(out)
    seconds = time.perf_counter() - start
    return seconds, f"{len(out)} updates, {len(batches)} batches"


def cold_one_by_one(clients: int) -> tuple[float, str]:
    peers = [client(i) for i in range(clients)]
    routes = [routes_of(p, r) for p, r in zip(peers, blocks_per_client(clients))]
    rr = reflector(peers)
    lines = 0
    start = time.perf_counter()
    for peer, sent in zip(peers, routes):
        lines += len(batch(rr.peer_up(peer)))
        lines += len(batch(rr.update(peer, sent) + rr.end_of_rib(peer)))
    seconds = time.perf_counter() - start
    return seconds, f"{lines} batches"


def spread(prefixes: int, clients: int) -> tuple[float, str]:
    peers = [client(i) for i in range(clients)]
    per = -(-prefixes // clients)
    routes = [routes_of(p, range(i * per, min(prefixes, (i + 1) * per)))
              for i, p in enumerate(peers)]
    rr = reflector(peers)
    rr.peers_up(peers)
    start = time.perf_counter()
    out = []
    for peer, sent in zip(peers, routes):
        out += rr.update(peer, sent)
    batches = batch(out)
    seconds = time.perf_counter() - start
    fan_out = sum(len(b.peers) * len(b.prefixes) for b in batches)
    return seconds, f"{len(batches)} batches, {fan_out} peer-prefixes"


def one_change(clients: int, changes: int = 200) -> tuple[float, str]:
    peers = [client(i) for i in range(clients)]
    rr = reflector(peers)
    rr.peers_up(peers)
    for peer, blocks in zip(peers, blocks_per_client(clients)):
        rr.update(peer, routes_of(peer, blocks))
    extra = Route(block(10**5), peers[0], peer=peers[0], peer_router_id=peers[0])
    times = []
    for i in range(changes):
        start = time.perf_counter()
        if i % 2 == 0:
            batch(rr.update(peers[0], [extra]))
        else:
            batch(rr.update(peers[0], withdraw=[extra.prefix]))
        times.append(time.perf_counter() - start)
    return statistics.median(times), f"median of {changes}, max {max(times) * 1e3:.2f} ms"


def best_of(repeat: int, run: Callable[[], tuple[float, str]]) -> tuple[float, str]:
    return min((run() for _ in range(repeat)), key=lambda r: r[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--prefixes", type=int, default=5000)
    args = parser.parse_args()
    workloads = [
        (f"cold resync, {args.clients} clients x 1-2 blocks, all at once",
         lambda: cold_all_at_once(args.clients)),
        (f"cold resync, {args.clients} clients x 1-2 blocks, one by one",
         lambda: cold_one_by_one(args.clients)),
        (f"{args.prefixes} prefixes x 2 clients", lambda: spread(args.prefixes, 2)),
        (f"{args.prefixes} prefixes x 50 clients", lambda: spread(args.prefixes, 50)),
        (f"one new block at {args.clients} clients", lambda: one_change(args.clients)),
    ]
    print(f"route_reflector core, pure Python, best of {args.repeat} (no reference: see --help)")
    for name, run in workloads:
        seconds, detail = best_of(args.repeat, run)
        print(f"  {name:<55} {seconds * 1e3:9.2f} ms   {detail}")


if __name__ == "__main__":
    main()
