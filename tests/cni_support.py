"""Helpers shared by the CNI tests (test_cni.py, test_cni_plugin.py and the others that run
pipit-ipam): a pipit-agent per test, a node with its pods, and ways to look at what etcd and
`pipitctl` say about a container's addresses. Their fixtures (short_dir, cni_bin) are in
conftest.py; test_cni.py's node (cni_node) is in test_cni.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

from ipam.snapshot import Snapshot, load_snapshot, pool_usage
from ipam.store import EtcdConfig
from lab.agent import AgentProcess
from lab.cni import (
    Attachment,
    CNIRuntime,
    Invocation,
    NetworkConfig,
    parse_output,
)
from lab.netns import Namespaces, path_of
from tests.helpers import add_pool, with_store

ROOT = Path(__file__).resolve().parent.parent
NS_PREFIX = "pipit-t-"
NODE = "node-1"
DEFAULT_POOL = ("default", "10.244.0.0/22", {"blockSize": 26})  # four /26 blocks
NET = "pipit-net"


@contextmanager
def short_temp_dir() -> Iterator[Path]:
    """A temp dir with a short path (unix socket paths are limited to 107 bytes), removed
    afterwards."""
    path = Path(tempfile.mkdtemp(prefix=NS_PREFIX, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Plugin:
    """pipit-ipam called directly (CNI_PATH, stdin and the environment exactly as given)."""

    def __init__(self, bin_dir: Path, agent: AgentProcess | None = None,
                 socket: str | Path | None = None):
        self.runtime = CNIRuntime(bin_dir)
        self.path = self.runtime.find("pipit-ipam")
        self.agent = agent
        self.socket = str(socket or agent.socket_path)

    def config(self, version: str = "1.0.0", name: str = NET, **ipam) -> dict:
        return {"cniVersion": version, "name": name, "type": "ptp",
                "ipam": {"type": "pipit-ipam", "socket": self.socket, **ipam}}

    def raw(self, command: str | None, stdin: bytes, container_id: str | None = "c1",
            ifname: str | None = "eth0", netns: str | None = "/var/run/netns/x",
            **extra: str) -> Invocation:
        env = self.runtime.environment(command or "")
        if command is None:
            del env["CNI_COMMAND"]
        for name, value in (("CNI_CONTAINERID", container_id), ("CNI_IFNAME", ifname),
                            ("CNI_NETNS", netns)):
            if value is not None:
                env[name] = value
        env.update(extra)
        return self.runtime.invoke(self.path, env, stdin)

    def __call__(self, command: str, config: dict, container_id: str = "c1",
                 ifname: str = "eth0", **extra: str) -> dict | None:
        run = self.raw(command, json.dumps(config).encode(), container_id, ifname, **extra)
        return parse_output(run, "pipit-ipam", command)


def start_agent(etcd: EtcdConfig, directory: Path, node: str = NODE,
                extra_args: tuple[str, ...] = ()) -> AgentProcess:
    return AgentProcess(node, directory / f"{node}.sock", etcd.endpoints,
                        directory / f"{node}.log", extra_args=extra_args).start()


def add_pools(etcd: EtcdConfig, *pools: tuple[str, str, dict]) -> None:
    async def scenario(store):
        for name, cidr, spec in pools:
            await add_pool(store, name, cidr, **spec)
    with_store(etcd, scenario)


def snapshot(etcd: EtcdConfig) -> Snapshot:
    return with_store(etcd, load_snapshot)


def holdings(snap: Snapshot, container_id: str) -> list[str]:
    """Everything in etcd that still refers to the container: handles and block entries."""
    found = [f"handle {h}" for h in snap.handles if f".{container_id}." in h]
    for block in snap.blocks.values():
        for ordinal, index in enumerate(block.allocations):
            if index is None:
                continue
            attribute = block.attributes[index]
            if (attribute.secondary.get("containerID") == container_id
                    or f".{container_id}." in attribute.handle_id):
                found.append(f"{block.address(ordinal)} held by {attribute.handle_id}")
    return found


def used(snap: Snapshot, pool: str) -> int:
    return next(pool_usage(snap, p).used for p in snap.pools if p.name == pool)


def holder(snap: Snapshot, address: str | IPv4Address) -> str | None:
    """The handle holding an address according to etcd (None: free)."""
    address = IPv4Address(str(address).split("/")[0])
    for cidr, block in snap.blocks.items():
        if address in cidr:
            attribute = block.holder(address)
            return attribute.handle_id if attribute else None
    return None


def pipitctl_in_use(etcd: EtcdConfig, pool: str) -> int:
    """IN USE of a pool as `pipitctl ipam show` prints it (the real CLI, in a subprocess)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPIT_ETCD_")}
    out = subprocess.run([sys.executable, "-m", "pipitctl", "ipam", "show", "--etcd-endpoints",
                          ",".join(etcd.endpoints)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = re.split(r"\s{2,}", lines[0].strip())
    for line in lines[1:]:
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] == pool:
            return int(cells[header.index("IN USE")])
    raise AssertionError(f"pool {pool} is not in `pipitctl ipam show`:\n{out.stdout}")


def new_container_id() -> str:
    return uuid.uuid4().hex


@dataclass
class CNINode:
    """One node: its namespace, its agent, a CNI runtime that runs plugins inside it."""
    etcd: EtcdConfig
    netns: str
    agent: AgentProcess
    runtime: CNIRuntime
    namespaces: Namespaces
    pods: list[str] = field(default_factory=list)

    @property
    def socket(self) -> str:
        return str(self.agent.socket_path)

    def ipam(self, **extra) -> dict:
        return {"type": "pipit-ipam", "socket": self.socket, **extra}

    def network(self, plugin: str = "ptp", name: str = "pipit-net", version: str = "1.0.0",
                ipam: dict | None = None, **fields) -> NetworkConfig:
        return NetworkConfig.load({"cniVersion": version, "name": name, "plugins": [
            {"type": plugin, "ipam": ipam or self.ipam(), **fields}]})

    def new_pods(self, count: int) -> list[Attachment]:
        names = self.namespaces.create_many("pod", count)
        self.pods += names
        return [Attachment(new_container_id(), path_of(n), "eth0",
                           (("IgnoreUnknown", "1"), ("K8S_POD_NAMESPACE", "default"),
                            ("K8S_POD_NAME", n))) for n in names]


def pod_name(attachment: Attachment) -> str:
    return os.path.basename(attachment.netns)


def ip_of(result: dict) -> IPv4Interface:
    (ip,) = result["ips"]
    return IPv4Interface(ip["address"])
