"""The README's main job until the lab cluster exists: a local etcd, a pool, some pods'
addresses, and what `pipitctl` shows about them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ipam.allocator import IPAM
from ipam.store import EtcdConfig, Store
from lab.etcd import EtcdServer

POOLS = """\
apiVersion: pipit.dev/v1
kind: IPPool
metadata: {name: default}
spec: {cidr: 10.244.0.0/22, blockSize: 26, natOutgoing: true}
"""


def pipitctl(*args: str, env: dict) -> None:
    print(f"\n$ pipitctl {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "pipitctl", *args], env=env, check=False)


async def start_pods(endpoint: str) -> None:
    async with Store(EtcdConfig(endpoints=(endpoint,))) as store:
        ipam = IPAM(store)
        for node in ("node-a", "node-b", "node-c"):
            results = await asyncio.gather(*(
                ipam.assign(node, f"demo.{node}.pod-{i}",
                            attributes={"namespace": "demo", "pod": f"{node}-pod-{i}"})
                for i in range(10 if node == "node-a" else 5)))
            print(f"{node}: 10 pods started at once got "
                  f"{', '.join(str(a[0]) for a in results[:3])}, ... "
                  f"({ipam.transactions} etcd transactions so far)")
        await ipam.release("node-a", "demo.node-a.pod-0")
        print("node-a: pod-0 deleted, its address released")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="pipit-demo-") as tmp, \
            EtcdServer(data_dir=Path(tmp) / "etcd") as etcd:
        print(f"etcd running at {etcd.endpoint}")
        env = {**os.environ, "PIPIT_ETCD_ENDPOINTS": etcd.endpoint}
        pools = Path(tmp) / "pools.yaml"
        pools.write_text(POOLS)
        pipitctl("apply", "-f", str(pools), env=env)
        pipitctl("get", "ippools", "-o", "wide", env=env)
        asyncio.run(start_pods(etcd.endpoint))
        pipitctl("ipam", "show", "--show-blocks", env=env)
        pipitctl("ipam", "show", "--ip", "10.244.0.1", env=env)
        pipitctl("ipam", "check", env=env)


if __name__ == "__main__":
    main()
