"""End to end with Kubernetes (`pipitctl lab up --kubernetes`): real etcd, agents, ExaBGP and
kernels, tests/fakekube as the API server, pipit-controller with a short grace period. In
order: the nodes report their network available; an annotation picks the pool; a pod
restarted under its name keeps working while its old address is collected; a pod deleted
without a CNI DEL has its address freed; the controller killed mid-GC and restarted releases
nothing twice and nothing live; a Local service's /32s come from the node holding its
endpoint, at an edge router; a deleted Node's blocks, addresses and record go."""

from __future__ import annotations

import ipaddress
import json
import os

import pytest

from ipam.snapshot import check, load_snapshot
from ipam.store import EtcdConfig
from lab import netns
from lab.cluster import Lab
from lab.cni import Attachment
from lab.kube import POD_NAMESPACE
from lab.process import wait
from tests.helpers import with_store

pytestmark = [pytest.mark.slow, pytest.mark.lab]
GRACE = "4s"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    cluster = Lab(directory=tmp_path_factory.mktemp("klab"),
                  prefix=f"{netns.TEST_PREFIX}pid{os.getpid()}-klab-",
                  hold_time=6, restart_time=20, log=lambda *a: None, kubernetes=True)
    cluster.kube().grace = GRACE
    try:
        assert cluster.up(node_count=2, pods_per_node=2)
        yield cluster
    finally:
        cluster.down()


def snapshot(lab: Lab):
    return with_store(EtcdConfig((lab.etcd_host_endpoint,)), load_snapshot)


def handle(pod_container: str) -> str:
    return f"pipit.{pod_container}.eth0"


def pod_by_name(lab: Lab, name: str):
    return next(p for p in lab.all_pods() if p.name == name)


def test_nodes_report_their_network_available(lab):
    kube = lab.kube()
    for node in lab.nodes():
        def available(node=node):
            conditions = (kube.get("node", node) or {}).get("status", {}).get("conditions", [])
            return any(c["type"] == "NetworkUnavailable" and c["status"] == "False"
                       for c in conditions)
        wait(available, 30, f"{node}'s NetworkUnavailable to be False")
    snap = snapshot(lab)
    assert snap.kubernetes_nodes == {"n1": "n1", "n2": "n2"}


def test_an_annotation_picks_the_pool(lab):
    result = lab.pipitctl("apply", "-f", "-", input="""\
apiVersion: pipit.dev/v1
kind: IPPool
metadata: {name: blue}
spec: {cidr: 10.245.0.0/16, blockSize: 26, nodeSelector: "!all()"}
""")
    assert result.returncode == 0, result.stderr
    pod = lab.add_pod("n1", "blue-1", annotations={"pipit.dev/ipv4pools": '["blue"]'})
    assert ipaddress.IPv4Address(pod.address) in ipaddress.IPv4Network("10.245.0.0/16")
    other = pod_by_name(lab, "n2-p1")
    wait(lambda: lab.ping(other, pod), 30, "n2-p1 to reach the blue pod")


def test_a_pod_restarted_under_its_name_keeps_working(lab):
    """The pod's sandbox dies without a DEL and a new one starts: a new container ID, a new
    address; the old address is collected after the grace period, the new one stays."""
    old = pod_by_name(lab, "n1-p1")
    ns = f"{lab.prefix}n1-p1-again"
    netns.create(ns)
    result = lab.runtime("n1").add(lab.network("n1"), Attachment(
        container_id="lab-n1-p1-again", netns=netns.path_of(ns),
        args=(("K8S_POD_NAMESPACE", POD_NAMESPACE), ("K8S_POD_NAME", "n1-p1"))))
    new_address = result["ips"][0]["address"].split("/")[0]
    assert new_address != old.address
    lab.kube().pod_started("n1-p1", new_address)
    wait(lambda: handle("lab-n1-p1") not in snapshot(lab).handles, 60,
         "the old sandbox's address to be collected")
    assert handle("lab-n1-p1-again") in snapshot(lab).handles
    from lab.cluster import Pod
    restarted = Pod("n1-p1", "n1", ns, new_address)
    wait(lambda: lab.ping(pod_by_name(lab, "n2-p1"), restarted), 30, "the restarted pod")


def test_a_pod_deleted_without_del_is_freed_after_the_grace(lab):
    lab.kube().kubectl("delete", "pod", "n2-p2", "-n", POD_NAMESPACE)
    assert handle("lab-n2-p2") in snapshot(lab).handles  # not at once: the grace period
    wait(lambda: handle("lab-n2-p2") not in snapshot(lab).handles, 60,
         "n2-p2's address to be freed")


def test_the_controller_killed_mid_gc_releases_nothing_twice_or_live(lab):
    kube = lab.kube()
    for name in ("gc-1", "gc-2", "gc-3"):
        lab.add_pod("n2", name)
    live = {h for h in snapshot(lab).handles if "gc-" not in h}
    for name in ("gc-1", "gc-2", "gc-3"):
        kube.kubectl("delete", "pod", name, "-n", POD_NAMESPACE)
    kube.stop_controller(9)
    kube.start_controller()
    wait(lambda: not any("gc-" in h for h in snapshot(lab).handles), 60,
         "the deleted pods' addresses to be freed by the new controller")
    snap = snapshot(lab)
    assert live <= set(snap.handles)  # nothing live was taken
    assert check(snap) == []  # and nothing was released twice (counts agree)


EDGE_AS = 65100
SERVICES = {"serviceClusterIPs": [{"cidr": "10.96.0.0/12"}],
            "serviceLoadBalancerIPs": [{"cidr": "198.18.100.0/24"}]}


def test_a_local_service_is_announced_by_the_nodes_holding_its_endpoints(lab, tmp_path):
    """An edge router (BIRD, in the fabric) peers with every node. With service ranges in the
    BGPConfiguration, every node announces the ranges, and only the node holding an endpoint
    of a service with externalTrafficPolicy Local announces its cluster IP and load-balancer
    IP as /32s (Calico's rule); the endpoint moving moves them; the service deleted, they go."""
    from ipaddress import IPv4Address, IPv4Network

    from lab.kube import API_ADDRESS
    from lab.routers import RouterPeer, RouterSpec, make_router

    kube, nodes = lab.kube(), sorted(lab.nodes())
    edge_address = IPv4Address(API_ADDRESS)  # the fabric's own address
    spec = RouterSpec("edge", edge_address, EDGE_AS, tuple(
        RouterPeer(n, lab.node_ip(n), 64512, local_address=edge_address, hold_time=9)
        for n in nodes), kernel=False)
    edge = make_router("bird", spec, lab.fabric, tmp_path / "edge").start()
    shown = lab.pipitctl("get", "bgpconfig", "default", "-o", "json")
    config = json.loads(shown.stdout) if shown.returncode == 0 else {
        "apiVersion": "pipit.dev/v1", "kind": "BGPConfiguration",
        "metadata": {"name": "default"}, "spec": {}}
    config["metadata"].pop("resourceVersion", None)
    with_ranges = json.loads(json.dumps(config))
    with_ranges["spec"].update(SERVICES)
    peer = {"apiVersion": "pipit.dev/v1", "kind": "BGPPeer", "metadata": {"name": "edge"},
            "spec": {"peerIP": str(edge_address), "asNumber": EDGE_AS}}
    cluster_ip, balancer_ip = "10.96.0.20", "198.18.100.5"
    service = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "shop", "namespace": POD_NAMESPACE},
               "spec": {"type": "LoadBalancer", "clusterIP": cluster_ip,
                        "clusterIPs": [cluster_ip], "externalTrafficPolicy": "Local",
                        "ports": [{"port": 80, "protocol": "TCP"}]}}

    def endpoints_on(node: str) -> dict:
        return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "shop-1", "namespace": POD_NAMESPACE,
                             "labels": {"kubernetes.io/service-name": "shop"}},
                "addressType": "IPv4", "ports": [{"port": 80, "protocol": "TCP"}],
                "endpoints": [{"addresses": ["10.244.0.9"], "nodeName": node,
                               "conditions": {"ready": True}}]}

    def edge_routes(expected: dict[str, set]) -> bool:
        table = edge.routes()
        return all(prefix in table and table[prefix].next_hop in via
                   for prefix, via in ((IPv4Network(p), v) for p, v in expected.items()))

    everyone = {lab.node_ip(n) for n in nodes}
    ranges = {"10.96.0.0/12": everyone, "198.18.100.0/24": everyone}
    local = [f"{cluster_ip}/32", f"{balancer_ip}/32"]
    try:
        for document in (peer, with_ranges):
            result = lab.pipitctl("apply", "-f", "-", input=json.dumps(document))
            assert result.returncode == 0, result.stderr
        kube.apply(service)
        kube.set_status("service", "shop", {"loadBalancer": {"ingress": [{"ip": balancer_ip}]}},
                        POD_NAMESPACE)
        kube.apply(endpoints_on(nodes[0]))
        first = {lab.node_ip(nodes[0])}
        wait(lambda: edge_routes({**ranges, **{p: first for p in local}}), 60,
             f"the edge to route the ranges to every node and the /32s to {nodes[0]}")
        kube.apply(endpoints_on(nodes[1]))  # the endpoint moved
        second = {lab.node_ip(nodes[1])}
        wait(lambda: edge_routes({p: second for p in local}), 60,
             f"the /32s to move to {nodes[1]}")
        kube.kubectl("delete", "service", "shop", "-n", POD_NAMESPACE)
        wait(lambda: not {IPv4Network(p) for p in local} & set(edge.routes()), 60,
             "the /32s to be withdrawn with the service")
        assert edge_routes(ranges)
        assert all(lab.status(n)["servicesWatched"] for n in nodes)
        # the ranges gone, the nodes stop watching every Service and EndpointSlice
        assert lab.pipitctl("apply", "-f", "-", input=json.dumps(config)).returncode == 0
        for n in nodes:
            wait(lambda n=n: not lab.status(n)["servicesWatched"], 60,
                 f"{n} to stop following Services")
        wait(lambda: not {IPv4Network(p) for p in ranges} & set(edge.routes()), 60,
             "the ranges to be withdrawn")
    finally:
        kube.kubectl("delete", "endpointslice", "shop-1", "-n", POD_NAMESPACE, "--ignore-not-found")
        kube.kubectl("delete", "service", "shop", "-n", POD_NAMESPACE, "--ignore-not-found")
        lab.pipitctl("delete", "bgppeer", "edge", "--skip-not-exists")
        lab.pipitctl("apply", "-f", "-", input=json.dumps(config))
        edge.destroy()


def test_a_deleted_node_is_cleaned_up(lab):
    lab.remove_node("n2")  # its agent retires, its namespaces go (etcd keeps its state)
    kube = lab.kube()
    kube.kubectl("delete", "node", "n2")  # and its last pod, as Kubernetes' pod GC does
    kube.kubectl("delete", "pod", "n2-p1", "-n", POD_NAMESPACE)

    def cleaned():
        snap = snapshot(lab)
        return ("n2" not in snap.nodes and not any(n == "n2" for n, _ in snap.affinities)
                and not any(b.node == "n2" for b in snap.blocks.values())
                and not any("n2-" in h for h in snap.handles))
    wait(cleaned, 60, "n2's blocks, addresses and record to go")
    assert check(snapshot(lab)) == []
