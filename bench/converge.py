"""Convergence: time from a node's block claim to the route in every other node's kernel, on a
3-node lab, and each agent's memory (RSS).

    sudo .venv/bin/python -m bench.converge [--claims 50]

Each claim is an allocation on n1 from a pool of /32 blocks, so every one claims a new block.
The clock starts when the allocation returns (the claim and the allocation are committed to
etcd) and stops at the kernel timestamp `ip -ts monitor route` prints in the other nodes'
namespaces for the new route. Reference in the same run: an etcd put until a watcher on
another connection has it, the floor of any etcd-driven design. Goals: p99 <= 100 ms; agent
RSS <= 60 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

from ipam.allocator import IPAM
from ipam.store import EtcdConfig, Store
from lab import netns
from lab.cluster import Lab
from lab.process import wait_async

POOL = """\
apiVersion: pipit.dev/v1
kind: IPPool
metadata: {name: bench}
spec: {cidr: 10.250.0.0/16, blockSize: 32}
"""
_LINE = re.compile(r"^\[(?P<ts>[^\]]+)\]\s*(?P<dst>[\d.]+(?:/\d+)?) .*proto 91")


class RouteMonitor:
    """`ip -ts monitor route` in a namespace: when each Pipit route first appeared."""

    def __init__(self, ns: str):
        self.seen: dict[str, float] = {}
        self.process = subprocess.Popen([*netns.exec_prefix(ns), "ip", "-ts", "monitor",
                                         "route"], stdout=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            match = _LINE.match(line)
            if match and not line.startswith("Deleted"):
                dst = match["dst"] if "/" in match["dst"] else match["dst"] + "/32"
                stamp = datetime.fromisoformat(match["ts"]).timestamp()
                self.seen.setdefault(dst, stamp)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def claims(lab: Lab, count: int, monitors: list[RouteMonitor]) -> list[float]:
    latencies = []
    async with Store(EtcdConfig(endpoints=(lab.etcd_host_endpoint,))) as store:
        ipam = IPAM(store)
        for i in range(count):
            [address] = await ipam.assign("n1", f"bench-{i}", pools=["bench"])
            start = time.time()
            prefix = f"{address}/32"
            await wait_async(lambda: all(prefix in m.seen for m in monitors), 10,
                             f"{prefix} to reach every node", interval=0.002)
            latencies.append(max(m.seen[prefix] for m in monitors) - start)
    return latencies


async def watch_reference(lab: Lab, count: int) -> list[float]:
    """The floor of any etcd-driven design: a put on one connection until a watcher on
    another connection has it."""
    latencies = []
    async with Store(EtcdConfig(endpoints=(lab.etcd_host_endpoint,))) as store, \
            Store(EtcdConfig(endpoints=(lab.etcd_host_endpoint,))) as watcher:
        _, revision = await watcher.list_with_revision("/bench/")
        seen: dict[str, float] = {}

        async def follow():
            async for changes in watcher.watch("/bench/", revision + 1):
                for key, _ in changes:
                    seen.setdefault(key, time.time())
        task = asyncio.create_task(follow())
        try:
            for i in range(count):
                key = f"/bench/{i}"
                start = time.time()
                await store.put(key, {"i": i})
                await wait_async(lambda: key in seen or task.done(), 10,
                                 f"the watcher to see {key}", interval=0.0005)
                if key not in seen:  # the watch ended
                    task.result()  # its error, if it failed
                    raise RuntimeError(f"the etcd watch ended before {key} arrived")
                latencies.append(seen[key] - start)
        finally:
            task.cancel()
    return latencies


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claims", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pipit-bench-") as tmp:
        netns.remove_leftovers("pipit-bench-")  # of benches that died; never a running one's
        lab = Lab(directory=Path(tmp), prefix=f"pipit-bench-pid{os.getpid()}-",
                  log=lambda *a: None)
        monitors = []
        try:
            lab.up(node_count=3, pods_per_node=0)
            result = lab.pipitctl("apply", "-f", "-", input=POOL)
            assert result.returncode == 0, result.stderr
            lab.pipitctl("ipam", "configure", "--max-blocks-per-host", "1000")
            monitors = [RouteMonitor(lab.node_ns(n)) for n in ("n2", "n3")]
            asyncio.run(claims(lab, 5, monitors))  # warm-up
            measured = asyncio.run(claims(lab, args.claims, monitors))
            reference = asyncio.run(watch_reference(lab, args.claims))
            agents = {n: lab._state()["nodes"][n]["pid"] for n in lab.nodes()}
            rss = {n: rss_mib(pid) for n, pid in agents.items()}
        finally:
            for monitor in monitors:
                monitor.close()
            lab.down()
    ms = [x * 1000 for x in measured]
    ref = [x * 1000 for x in reference]
    print(f"block claim on n1 -> route in the kernels of n2 and n3, {len(ms)} claims, 3 nodes")
    print(f"{'':30} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}")
    for name, values in (("claim -> both kernels", ms), ("reference: etcd put -> watch", ref)):
        print(f"{name:30} " + " ".join(f"{percentile(values, p):7.1f}ms" for p in (50, 90, 99))
              + f" {max(values):7.1f}ms")
    print(f"p50 ratio to the etcd-watch floor: {statistics.median(ms) / max(statistics.median(ref), 0.01):.1f}x")
    print("agent RSS: " + ", ".join(f"{n} {v:.1f} MiB" for n, v in rss.items()))
    print(f"goals: p99 <= 100 ms -> {'met' if percentile(ms, 99) <= 100 else 'MISSED'}; "
          f"RSS <= 60 MiB -> {'met' if max(rss.values()) <= 60 else 'MISSED'}")


if __name__ == "__main__":
    main()
