"""A soak: pods come and go on three nodes for minutes while one agent is SIGKILLed and
restarted and etcd is paused; at the end etcd is consistent (`ipam check` clean), the
addresses in use are exactly the live pods', every kernel holds exactly the routes etcd says
it should, and every pod still reaches every other."""

from __future__ import annotations

import itertools
import os
import random
import signal
import threading
import time
from collections import Counter

import pytest

from ipam.snapshot import check, load_snapshot
from ipam.store import EtcdConfig
from lab.cluster import Lab
from lab.process import wait
from tests.helpers import running_lab, with_store

SECONDS = float(os.environ.get("PIPIT_SOAK_SECONDS", "150"))
pytestmark = [pytest.mark.soak, pytest.mark.timeout(SECONDS + 600)]
PODS_PER_NODE = 4


def churn(lab: Lab, node: str, stop: threading.Event, tally: Counter) -> None:
    """Keep PODS_PER_NODE pods on the node, one coming and one going at a time: add one
    when below, else remove the oldest."""
    numbers = itertools.count()
    mine: list[str] = []
    failed: list[str] = []  # pods whose ADD failed: DELed until that works, as a runtime does
    while not stop.is_set() or failed:
        try:
            if failed:
                lab.remove_pod(failed[0], node)
                failed.pop(0)
            elif len(mine) < PODS_PER_NODE:
                name = f"{node}-s{next(numbers)}"
                failed.append(name)
                lab.add_pod(node, name)
                failed.remove(name)
                mine.append(name)
                tally["added"] += 1
            else:  # a DEL that failed is made again, as the kubelet does, until it works
                lab.remove_pod(mine[0])
                mine.pop(0)
                tally["removed"] += 1
        except Exception as error:  # the agent killed or etcd paused: the pod is tried again
            tally[f"failed: {type(error).__name__}"] += 1
            time.sleep(0.2)


def faults(lab: Lab, stop: threading.Event, tally: Counter) -> None:
    """Every ~20 s, in turn: SIGKILL one agent and start it again; pause etcd for 3 s."""
    etcd_pid = lab.etcd_pid()
    for turn in itertools.count():
        if stop.wait(20):
            return
        if turn % 2 == 0:
            node = random.choice(lab.nodes())
            lab.stop_agent(node, signal.SIGKILL)
            lab.start_agent(node)
            tally["agent killed"] += 1
        else:
            os.kill(etcd_pid, signal.SIGSTOP)
            time.sleep(3)
            os.kill(etcd_pid, signal.SIGCONT)
            tally["etcd paused"] += 1


def routes_match_etcd(lab: Lab, etcd: EtcdConfig) -> bool:
    snap = with_store(etcd, load_snapshot)
    owners = {cidr: block.node for cidr, block in snap.blocks.items() if block.node}
    addresses = {n: lab.node_ip(n)
                 for n in lab.nodes()}
    for node in lab.nodes():
        want = {str(cidr): "blackhole" if owner == node else str(addresses[owner])
                for cidr, owner in owners.items()}
        if lab.pipit_routes(node) != want:
            return False
    return True


def diagnose(lab: Lab, name: str) -> str:
    import subprocess
    pod = next(p for p in lab.all_pods() if p.name == name)
    node_ns = lab.node_ns(pod.node)

    def run(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True).stdout.strip()
    return "\n".join([
        f"{name} on {pod.node} has {pod.address}",
        "pod: " + run("ip", "-n", pod.netns, "-br", "addr"),
        "pod routes: " + run("ip", "-n", pod.netns, "route"),
        "node: route get " + run("ip", "-n", node_ns, "route", "get", pod.address),
        "node routes to it: " + run("ip", "-n", node_ns, "route", "show", "match", pod.address),
        "node addrs with it: " + run("sh", "-c", f"ip -n {node_ns} -br addr | grep -F "
                                     f"'{pod.address}/' || true"),
    ])


def test_pods_churn_through_agent_kills_and_etcd_pauses(tmp_path_factory):
    with running_lab(tmp_path_factory.mktemp("soak"), "soak", node_count=3, pods_per_node=0,
                     hold_time=6, restart_time=20) as lab:
        etcd = EtcdConfig.from_options(lab.etcd_host_endpoint)
        stop, tally = threading.Event(), Counter()
        workers = [threading.Thread(target=churn, args=(lab, n, stop, tally))
                   for n in lab.nodes()]
        workers.append(threading.Thread(target=faults, args=(lab, stop, tally)))
        for worker in workers:
            worker.start()
        try:
            stop.wait(SECONDS)
        finally:
            stop.set()
            for worker in workers:
                worker.join(timeout=120)
        print(f"\nsoak of {SECONDS:g} s: {dict(tally)}")
        assert tally["added"] > 0 and tally["agent killed"] > 0 and tally["etcd paused"] > 0
        lab.wait_mesh()
        snap = with_store(etcd, load_snapshot)
        assert check(snap) == []
        pods = lab.all_pods()
        shared = {a: [p.name for p in pods if p.address == a]
                  for a, n in Counter(p.address for p in pods).items() if n > 1}
        assert not shared, f"pods that share an address: {shared}"
        holders = {str(block.address(o)): block.attributes[i].handle_id
                   for block in snap.blocks.values()
                   for o, i in enumerate(block.allocations) if i is not None}
        assert holders == {p.address: f"pipit.lab-{p.name}.eth0" for p in pods}
        wait(lambda: routes_match_etcd(lab, etcd), 60, "every kernel to hold etcd's routes")
        matrix = lab.ping_matrix(timeout=20)
        lost = sorted({b for (a, b), ok in matrix.items() if not ok})
        assert not lost, f"pods others cannot reach: {lost}\n" + "\n".join(
            diagnose(lab, name) for name in lost[:3])
