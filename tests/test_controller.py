"""pipit-controller against tests/fakekube and a real etcd: node deletion, leak GC with its
grace period, label sync, API server restarts and etcd outages, and the Lease (two processes,
one leads; the leader killed mid-work, the other takes over and releases nothing twice)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from bgp_agent.kube_api import KubeAPI
from bgp_agent.node import NodeRecord, node_from_document, register
from controller.ipam_gc import IPAMCollector
from controller.main import Controller
from ipam import keys
from ipam.allocator import IPAM
from ipam.snapshot import check, load_snapshot
from ipam.store import EtcdConfig, Store
from lab.etcd import free_port
from lab.process import stop_group, wait, wait_async
from tests.fakekube.resources import NODES, PODS
from tests.helpers import add_pool, with_store

pytestmark = pytest.mark.kube
ROOT = Path(__file__).resolve().parent.parent


def kube_node(name: str, labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name,
                                                             "labels": labels or {}}}


def kube_pod(name: str, node: str, ips=(), namespace: str = "ns") -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
            "status": {"podIPs": [{"ip": str(ip)} for ip in ips]}}


async def cluster_with_pods(store: Store, fakekube, nodes=("n1", "n2"), pods_per_node=2):
    """Node records (of Kubernetes Nodes), a pool, and pods with their addresses, in etcd and
    in the fake API server alike. Returns {pod name: address}."""
    await add_pool(store, "default", "10.20.0.0/16", blockSize=26)
    ipam = IPAM(store)
    create_namespace(fakekube, "ns")
    addresses = {}
    for index, node in enumerate(nodes):
        fakekube.store.create(NODES, None, kube_node(node, {"zone": f"z{index}"}))
        await register(store, NodeRecord(node, kubernetes_node=node))
        for p in range(pods_per_node):
            name = f"{node}-p{p}"
            [address] = await ipam.assign(node, f"net.{name}.eth0",
                                          attributes={"namespace": "ns", "pod": name})
            create_pod(fakekube, kube_pod(name, node, [address]))
            addresses[name] = address
    await ipam.assign("n1", "ipip-tunnel-addr-n1", attributes={"type": "ipip-tunnel"})
    return ipam, addresses


def create_namespace(fakekube, name: str) -> None:
    from tests.fakekube.resources import NAMESPACES
    try:
        fakekube.store.create(NAMESPACES, None, {"apiVersion": "v1", "kind": "Namespace",
                                                 "metadata": {"name": name}})
    except Exception:
        pass  # there already


def create_pod(fakekube, pod: dict) -> None:
    """Create, then report its addresses on /status (as the kubelet does)."""
    meta = pod["metadata"]
    fakekube.store.create(PODS, meta["namespace"], pod)
    fakekube.store.patch(PODS, meta["namespace"], meta["name"],
                         lambda p: {**p, "status": pod["status"]}, subresource="status")


def api_of(fakekube, tmp_path) -> KubeAPI:
    return KubeAPI.connect(str(fakekube.write_kubeconfig(tmp_path / "kubeconfig")))


async def in_use(store: Store) -> set[str]:
    snap = await load_snapshot(store)
    return set(snap.handles)


def test_a_deleted_node_and_a_deleted_pod_are_cleaned_up(fakekube, etcd, tmp_path):
    api = api_of(fakekube, tmp_path)

    async def scenario(store):
        ipam, addresses = await cluster_with_pods(store, fakekube)
        controller = Controller(store, api, grace=3600.0)
        task = asyncio.create_task(controller.run())
        try:
            await wait_async(lambda: controller.passes >= 1, 20, "a first pass")
            assert await in_use(store) == {"net.n1-p0.eth0", "net.n1-p1.eth0", "net.n2-p0.eth0",
                                           "net.n2-p1.eth0", "ipip-tunnel-addr-n1"}
            # the Node n1 is deleted (Kubernetes' pod GC deletes its pods)
            fakekube.store.delete(NODES, None, "n1")
            for name in ("n1-p0", "n1-p1"):
                fakekube.store.delete(PODS, "ns", name)

            async def n1_gone():
                return (await store.get(keys.node_key("n1"))) is None
            await wait_async(n1_gone, 20, "n1's record to go")
            snap = await load_snapshot(store)
            assert set(snap.handles) == {"net.n2-p0.eth0", "net.n2-p1.eth0"}
            assert {n for n, _ in snap.affinities} == {"n2"}
            assert not any(b.node == "n1" for b in snap.blocks.values())
            assert check(snap) == []
            # a pod deleted without a CNI DEL, its node still there: kept within the grace
            fakekube.store.delete(PODS, "ns", "n2-p0")
            passes = controller.passes
            await wait_async(lambda: controller.passes > passes, 20, "a pass after the deletion")
            assert "net.n2-p0.eth0" in await in_use(store)
            assert controller.collector.state.candidates
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        # past the grace period (the collector's clock moved on): released, the rest kept
        controller.collector.clock = lambda: 10**9
        await controller.collector.run_pass(controller.cluster())
        assert await in_use(store) == {"net.n2-p1.eth0"}
        return True
    assert with_store(etcd, scenario)


def test_a_node_deleted_from_kubernetes_is_kept_while_its_agent_runs(fakekube, etcd, tmp_path,
                                                                      caplog):
    """`kubectl delete node` on a live node (its kubelet registers it again): cleaning it up
    would take its pods' addresses, blocks and routes while its agent carries on. All of it
    kept until the agent has stopped (given its name claim up)."""
    from bgp_agent.name_claim import Holder, release, take
    api = api_of(fakekube, tmp_path)

    async def scenario(store):
        await cluster_with_pods(store, fakekube)
        claim = await take(store, "n1", Holder("boot/net:1", "host1", 77, "2026-12-05T05:00Z"))
        fakekube.store.delete(NODES, None, "n1")
        controller = Controller(store, api, grace=3600.0)
        with caplog.at_level(logging.WARNING, logger="controller.ipam_gc"):
            await controller.collector.run_pass(controller.cluster())
        assert await store.get(keys.node_key("n1")) is not None
        snap = await load_snapshot(store)
        assert {n for n, _ in snap.affinities} == {"n1", "n2"}
        assert "ipip-tunnel-addr-n1" in snap.handles  # its tunnel address too
        assert ("node n1 is gone from Kubernetes but its agent still runs, on host host1 "
                "(pid 77") in caplog.text
        await release(store, claim)  # the agent stopped
        await controller.collector.run_pass(controller.cluster())
        assert await store.get(keys.node_key("n1")) is None
        return True
    assert with_store(etcd, scenario)


def test_a_pod_with_another_address_and_the_informers_lag(fakekube, etcd, tmp_path):
    """A pod restarted under its name has a new address: the old one goes after the grace;
    a pod the informer has not seen yet (created after its list) is asked for directly and
    its address kept."""
    api = api_of(fakekube, tmp_path)

    async def scenario(store):
        ipam, addresses = await cluster_with_pods(store, fakekube, nodes=("n1",))
        [new] = await ipam.assign("n1", "net.n1-p0-again.eth0",
                                  attributes={"namespace": "ns", "pod": "n1-p0"})
        fakekube.store.patch(PODS, "ns", "n1-p0", lambda p: {**p, "status": {
            "podIPs": [{"ip": str(new)}]}}, subresource="status")
        now = [0.0]
        collector = IPAMCollector(store, api, grace=60.0, clock=lambda: now[0])
        from ipam.gc import Cluster, pod_from_json
        pods = {("ns", "n1-p0"): pod_from_json(fakekube.store.get(PODS, "ns", "n1-p0"))}
        stale = Cluster(frozenset({"n1"}), pods)  # n1-p1 not in the (lagging) view
        first = await collector.run_pass(stale)
        assert first.released == [] and first.waiting == 2
        now[0] = 61.0
        second = await collector.run_pass(stale)
        assert second.released == ["net.n1-p0.eth0"]  # n1-p1 exists when asked directly
        assert "net.n1-p1.eth0" in await in_use(store)
        assert "net.n1-p0-again.eth0" in await in_use(store)
        return True
    assert with_store(etcd, scenario)


def test_labels_follow_the_kubernetes_node(fakekube, etcd, tmp_path):
    api = api_of(fakekube, tmp_path)

    async def scenario(store):
        await register(store, NodeRecord("n1", labels={"rack": "a"}, kubernetes_node="n1"))
        await register(store, NodeRecord("outside", labels={"rack": "b"}))
        fakekube.store.create(NODES, None, kube_node("n1", {"topology.kubernetes.io/zone":
                                                           "z1", "gpu": "yes"}))
        controller = Controller(store, api, grace=3600.0)
        task = asyncio.create_task(controller.run())

        async def labels(name):
            entry = await store.get(keys.node_key(name))
            return dict(node_from_document(entry.value).labels)
        try:
            await wait_async(lambda: controller.passes >= 1, 20, "a first pass")
            assert await labels("n1") == {"rack": "a", "topology.kubernetes.io/zone": "z1",
                                          "gpu": "yes"}
            fakekube.store.patch(NODES, None, "n1", lambda n: {**n, "metadata": {
                **n["metadata"], "labels": {"topology.kubernetes.io/zone": "z2"}}})

            async def moved():
                return await labels("n1") == {"rack": "a", "topology.kubernetes.io/zone": "z2"}
            await wait_async(moved, 20, "the zone label to follow")
            assert await labels("outside") == {"rack": "b"}
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return True
    assert with_store(etcd, scenario)


def failed_passes() -> float:
    """GC passes that failed in this process (pipit_controller_gc_passes_total, error)."""
    from prometheus_client import REGISTRY
    return REGISTRY.get_sample_value("pipit_controller_gc_passes_total",
                                     {"result": "error"}) or 0.0


def test_survives_an_api_server_restart_and_an_etcd_outage(fakekube, own_etcd, tmp_path):
    api = api_of(fakekube, tmp_path)
    config = EtcdConfig((own_etcd.endpoint,), timeout=2.0)

    async def scenario(store):
        await cluster_with_pods(store, fakekube, nodes=("n1", "n2"), pods_per_node=1)
        controller = Controller(store, api, grace=3600.0)
        task = asyncio.create_task(controller.run())
        try:
            await wait_async(lambda: controller.passes >= 1, 20, "a first pass")
            failed = failed_passes()
            fakekube.stop()
            own_etcd.stop()
            fakekube.store.delete(NODES, None, "n2")
            fakekube.store.delete(PODS, "ns", "n2-p0")
            fakekube.store.compact()
            fakekube.start()
            await wait_async(lambda: "n2" not in controller.nodes.items, 30,
                             "the informer to see n2 gone")
            await wait_async(lambda: failed_passes() > failed, 30,
                             "a pass to fail against the stopped etcd")
            assert not task.done()
            own_etcd.start()

            async def n2_gone():
                return (await store.get(keys.node_key("n2"))) is None
            await wait_async(n2_gone, 60, "n2's record to go")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert "net.n2-p0.eth0" not in await in_use(store)
        return True
    assert with_store(config, scenario)


def controller_process(fakekube, etcd, tmp_path, name: str, grace: str = "1h",
                       metrics_port: int | None = None):
    log = open(tmp_path / f"{name}.log", "ab")
    metrics = ["--metrics-address", f"127.0.0.1:{metrics_port}"] if metrics_port else []
    return subprocess.Popen(
        [sys.executable, "-m", "controller.main", "--kubeconfig",
         str(fakekube.write_kubeconfig(tmp_path / "kubeconfig")), "--etcd-endpoints",
         etcd.endpoints[0], "--identity", name, "--lease-duration", "3s",
         "--gc-grace-period", grace, "--log-level", "DEBUG", *metrics],
        cwd=ROOT, stdout=log, stderr=log, start_new_session=True)


def test_one_instance_leads_and_another_takes_over_when_it_dies(fakekube, etcd, tmp_path):
    from tests.fakekube.resources import find
    leases = find("coordination.k8s.io", "v1", "leases")

    def holder():
        try:
            return fakekube.store.get(leases, "kube-system", "pipit-controller")["spec"][
                "holderIdentity"]
        except Exception:
            return None

    with_store(etcd, lambda store: cluster_with_pods(store, fakekube, nodes=("n1",)))
    a = controller_process(fakekube, etcd, tmp_path, "a")
    b, port = None, free_port()
    try:
        wait(lambda: holder() == "a", 30, "a to lead")
        b = controller_process(fakekube, etcd, tmp_path, "b", metrics_port=port)
        # b waits: it never takes the Lease while a renews it
        wait(lambda: "waiting to lead" in (tmp_path / "b.log").read_text(), 30, "b to wait")
        assert holder() == "a"
        fakekube.store.delete(NODES, None, "n1")  # and its pods with it (Kubernetes' pod GC)
        for name in ("n1-p0", "n1-p1"):
            fakekube.store.delete(PODS, "ns", name)
        stop_group(a, 9)  # killed, perhaps mid-pass: b takes over once the Lease runs out
        wait(lambda: holder() == "b", 30, "b to take over")

        def cleaned():
            snap = with_store(etcd, load_snapshot)
            return not snap.handles and not snap.affinities and "n1" not in snap.nodes
        wait(cleaned, 30, "n1 to be cleaned up by b")
        assert check(with_store(etcd, load_snapshot)) == []
        from tests.metrics_support import scrape
        found = scrape(f"http://127.0.0.1:{port}/metrics")  # b's counters say what it did
        assert found[("pipit_controller_cleaned_nodes_total", ())] == 1
        assert found[("pipit_controller_leader", ())] == 1
        assert found[("pipit_controller_gc_passes_total", (("result", "ok"),))] >= 1
        assert stop_group(b) == 0  # SIGTERM: a clean stop gives the Lease up
        assert holder() is None
    finally:
        stop_group(a, 9)
        if b is not None:
            stop_group(b, 9)


def test_ipam_check_reports_addresses_no_pod_claims(fakekube, etcd, tmp_path):
    """Issue 15, defect 2: an address held although its pod is gone (an ADD that failed after
    its transaction committed, a missed DEL) is invisible to the etcd-only check; with the
    pods to compare with, `ipam check` reports it."""
    import os
    _, addresses = with_store(etcd, lambda store: cluster_with_pods(store, fakekube,
                                                                    nodes=("n1",)))
    fakekube.store.delete(PODS, "ns", "n1-p0")
    kubeconfig = fakekube.write_kubeconfig(tmp_path / "kubeconfig")
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}

    def check_cli(*extra):
        return subprocess.run([sys.executable, "-m", "pipitctl", "--etcd-endpoints",
                               etcd.endpoints[0], "ipam", "check", *extra], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
    plain = check_cli()
    assert plain.returncode == 0, plain.stdout + plain.stderr
    compared = check_cli("--kubeconfig", str(kubeconfig))
    assert compared.returncode == 1
    assert "address-without-pod" in compared.stdout and "net.n1-p0.eth0" in compared.stdout
    assert f"{addresses['n1-p0']} (node n1): pod ns/n1-p0 does not exist" in compared.stdout
    assert "against 1 pods: 1 problem(s) found" in compared.stdout
    assert "n1-p1" not in compared.stdout
