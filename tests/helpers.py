"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from ipaddress import IPv4Network
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ipam import keys
from ipam.pool import pool_from_spec, pool_to_document
from ipam.store import EtcdConfig, Store

if TYPE_CHECKING:
    from lab.agent import AgentProcess
    from lab.cluster import Lab


ALLOW_SKIP = "PIPIT_TEST_ALLOW_SKIP"


def require(present, missing: str) -> None:
    """Fail the test (or skip it, locally with PIPIT_TEST_ALLOW_SKIP=1, never when CI=true)
    if a real part it needs is not `present`; `missing` says what and how to get it."""
    if present:
        return
    if os.environ.get(ALLOW_SKIP) == "1" and os.environ.get("CI", "").lower() != "true":
        pytest.skip(missing)
    pytest.fail(f"{missing} (set {ALLOW_SKIP}=1 to skip such tests locally)", pytrace=False)


def run(coro):
    return asyncio.run(coro)


async def add_pool(store: Store, name: str, cidr: str, **spec) -> None:
    pool = pool_from_spec(name, {"cidr": cidr, **spec})
    await store.put(keys.pool_key(name), pool_to_document(pool))


def with_store(config: EtcdConfig, scenario: Callable[[Store], Awaitable]):
    """Run `scenario(store)` on a fresh connection in a fresh event loop."""
    async def main():
        async with Store(config) as store:
            return await scenario(store)
    return asyncio.run(main())


@contextmanager
def running_lab(directory: Path, name: str, *, node_count: int = 3, pods_per_node: int = 2,
                healthy: bool = False, **options) -> Iterator[Lab]:
    """A lab cluster keeping its state in `directory`, its namespaces named
    <TEST_PREFIX>pid<pid>-<name>-..., brought up with `node_count` nodes of `pods_per_node`
    pods each (with `healthy`, `up` must report every agent answering and every pod reaching
    every other), and taken down again whatever happens. `options` go to Lab (hold_time,
    topology, chart...)."""
    from lab import netns
    from lab.cluster import Lab
    lab = Lab(directory=directory, prefix=f"{netns.TEST_PREFIX}pid{os.getpid()}-{name}-",
              log=lambda *a: None, **options)
    try:
        up = lab.up(node_count=node_count, pods_per_node=pods_per_node)
        if healthy:
            assert up, "the lab's pods cannot reach each other"
        yield lab
    finally:
        lab.down()


def assert_pods_reach_each_other(lab: Lab) -> None:
    """Every pod of a lab pings every other pod."""
    matrix = lab.ping_matrix(timeout=20)
    failed = [pair for pair, ok in matrix.items() if not ok]
    assert not failed, f"pods that cannot reach each other: {failed}"


def blocks(count: int, second_octet: int = 1) -> list[IPv4Network]:
    """`count` distinct /26s from 10.<second_octet>.0.0 on (1024 per /16, then the next)."""
    return [IPv4Network((0x0A000000 + (second_octet << 16) + 64 * i, 26)) for i in range(count)]


def sh(*args: str) -> str:
    """A command's output; it must succeed."""
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


@contextmanager
def pinging(lab: Lab, source: str, target: str, seconds: float):
    """A ping every 50 ms from `source`'s pod to `target`'s pod while the block runs; yields
    a function that gives the number of lost replies once the ping ended."""
    from lab import netns
    pods = {p.node: p for p in lab.all_pods()}
    count = int(seconds / 0.05)
    process = subprocess.Popen([*netns.exec_prefix(pods[source].netns), "ping", "-i", "0.05",
                                "-c", str(count), "-W", "1", "-q", pods[target].address],
                               stdout=subprocess.PIPE, text=True)
    result = {}

    def lost() -> int:
        out = result.get("out", "")
        sent_line = next(line for line in out.splitlines() if "packets transmitted" in line)
        sent, received = (int(sent_line.split()[i]) for i in (0, 3))
        return sent - received
    try:
        yield lost
    finally:
        result["out"] = process.communicate(timeout=seconds + 30)[0]


def fill_etcd(endpoint: str) -> None:
    """Write 100 KB values under /junk/ until etcd is full (its NOSPACE alarm raised: it then
    takes reads and deletes, no other write)."""
    value = "x" * 100_000
    for n in range(1000):
        result = subprocess.run(["etcdctl", "--endpoints", endpoint, "put", f"/junk/{n}"],
                                input=value, capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            assert "database space exceeded" in result.stderr, result.stderr
            return
    raise AssertionError(f"etcd at {endpoint} took 100 MB and is still not full")


def free_etcd(endpoint: str) -> None:
    """What an operator does for a full etcd: delete what filled it, compact the history,
    defragment, disarm the alarm."""
    def etcdctl(*args: str) -> str:
        return sh("etcdctl", "--endpoints", endpoint, *args)
    etcdctl("del", "--prefix", "/junk/")
    revision = json.loads(etcdctl("endpoint", "status", "-w", "json"))[0]["Status"]["header"][
        "revision"]
    etcdctl("compact", str(revision))
    etcdctl("defrag")
    etcdctl("alarm", "disarm")


@contextmanager
def started_now(agent: AgentProcess):
    """The agent's process, not waiting for its IPAM socket (an agent waiting for etcd or
    the Kubernetes API serves none yet); killed at the end."""
    agent.start(answering=False)
    try:
        yield agent.process
    finally:
        agent.kill()
