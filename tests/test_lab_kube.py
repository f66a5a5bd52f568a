"""End to end with Kubernetes (`pipitctl lab up --kubernetes`): real etcd, agents, ExaBGP and
kernels, tests/fakekube as the API server, pipit-controller with a short grace period. In
order: the nodes report their network available; an annotation picks the pool; a pod
restarted under its name keeps working while its old address is collected; a pod deleted
without a CNI DEL has its address freed; the controller killed mid-GC and restarted releases
nothing twice and nothing live; a Local service's /32s come from the node holding its
endpoint, at an edge router, and Calico's other service rules (single addresses,
serviceLoadBalancerAggregation, the exclusion label) hold there; a floating IP reaches its pod
from everywhere and moves with it; a deleted Node's blocks, addresses and record go."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import sys
import subprocess
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from ipam.snapshot import check, load_snapshot
from ipam.store import EtcdConfig
from lab import netns
from lab.cluster import Lab, Pod
from lab.cni import Attachment
from lab.kube import POD_NAMESPACE
from lab.process import wait
from tests.helpers import with_store
from tests.ipip_support import flow, udp_echo
from tests.sentences import one_sentence

pytestmark = [pytest.mark.slow, pytest.mark.lab]
GRACE = "4s"
EXCLUDED = "node.kubernetes.io/exclude-from-external-load-balancers"


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


@contextlib.contextmanager
def edge_router(lab: Lab, directory):
    """An edge router (BIRD, in the fabric) peering with every node through a BGPPeer; the
    BGPConfiguration as it was and the BGPPeer are put back at the end."""
    from lab.kube import API_ADDRESS
    from lab.routers import RouterPeer, RouterSpec, make_router

    edge_address = IPv4Address(API_ADDRESS)  # the fabric's own address
    spec = RouterSpec("edge", edge_address, EDGE_AS, tuple(
        RouterPeer(n, lab.node_ip(n), 64512, local_address=edge_address, hold_time=9)
        for n in sorted(lab.nodes())), kernel=False)
    edge = make_router("bird", spec, lab.fabric, directory / "edge").start()
    shown = lab.pipitctl("get", "bgpconfig", "default", "-o", "json")
    config = json.loads(shown.stdout) if shown.returncode == 0 else {
        "apiVersion": "pipit.dev/v1", "kind": "BGPConfiguration",
        "metadata": {"name": "default"}, "spec": {}}
    config["metadata"].pop("resourceVersion", None)
    peer = {"apiVersion": "pipit.dev/v1", "kind": "BGPPeer", "metadata": {"name": "edge"},
            "spec": {"peerIP": str(edge_address), "asNumber": EDGE_AS}}
    try:
        apply(lab, peer)
        yield edge, config
    finally:
        lab.pipitctl("delete", "bgppeer", "edge", "--skip-not-exists")
        lab.pipitctl("apply", "-f", "-", input=json.dumps(config))
        edge.destroy()


def apply(lab: Lab, document: dict) -> None:
    result = lab.pipitctl("apply", "-f", "-", input=json.dumps(document))
    assert result.returncode == 0, result.stderr


def with_spec(config: dict, **fields) -> dict:
    changed = json.loads(json.dumps(config))
    changed["spec"].update(fields)
    return changed


def balancer(name: str, cluster_ip: str, policy: str) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": POD_NAMESPACE},
            "spec": {"type": "LoadBalancer", "clusterIP": cluster_ip,
                     "clusterIPs": [cluster_ip], "externalTrafficPolicy": policy,
                     "ports": [{"port": 80, "protocol": "TCP"}]}}


def endpoints_on(service: str, node: str) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service}-1", "namespace": POD_NAMESPACE,
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "ports": [{"port": 80, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.244.0.9"], "nodeName": node,
                           "conditions": {"ready": True}}]}


def delete_services(kube, *names: str) -> None:
    for name in names:
        kube.kubectl("delete", "endpointslice", f"{name}-1", "-n", POD_NAMESPACE,
                     "--ignore-not-found")
        kube.kubectl("delete", "service", name, "-n", POD_NAMESPACE, "--ignore-not-found")


def test_a_local_service_is_announced_by_the_nodes_holding_its_endpoints(lab, tmp_path):
    """An edge router (BIRD, in the fabric) peers with every node. With service ranges in the
    BGPConfiguration, every node announces the ranges, and only the node holding an endpoint
    of a service with externalTrafficPolicy Local announces its cluster IP and load-balancer
    IP as /32s (Calico's rule); the endpoint moving moves them; the service deleted, they go."""
    kube, nodes = lab.kube(), sorted(lab.nodes())
    cluster_ip, balancer_ip = "10.96.0.20", "198.18.100.5"

    def edge_routes(edge, expected: dict[str, set]) -> bool:
        table = edge.routes()
        return all(prefix in table and table[prefix].next_hop in via
                   for prefix, via in ((IPv4Network(p), v) for p, v in expected.items()))

    everyone = {lab.node_ip(n) for n in nodes}
    ranges = {"10.96.0.0/12": everyone, "198.18.100.0/24": everyone}
    local = [f"{cluster_ip}/32", f"{balancer_ip}/32"]
    with edge_router(lab, tmp_path) as (edge, config):
        try:
            apply(lab, with_spec(config, **SERVICES))
            kube.apply(balancer("shop", cluster_ip, "Local"))
            kube.set_status("service", "shop",
                            {"loadBalancer": {"ingress": [{"ip": balancer_ip}]}}, POD_NAMESPACE)
            kube.apply(endpoints_on("shop", nodes[0]))
            first = {lab.node_ip(nodes[0])}
            wait(lambda: edge_routes(edge, {**ranges, **{p: first for p in local}}), 60,
                 f"the edge to route the ranges to every node and the /32s to {nodes[0]}")
            kube.apply(endpoints_on("shop", nodes[1]))  # the endpoint moved
            second = {lab.node_ip(nodes[1])}
            wait(lambda: edge_routes(edge, {p: second for p in local}), 60,
                 f"the /32s to move to {nodes[1]}")
            kube.kubectl("delete", "service", "shop", "-n", POD_NAMESPACE)
            wait(lambda: not {IPv4Network(p) for p in local} & set(edge.routes()), 60,
                 "the /32s to be withdrawn with the service")
            assert edge_routes(edge, ranges)
            assert all(lab.status(n)["servicesWatched"] for n in nodes)
            # the ranges gone, the nodes stop watching every Service and EndpointSlice
            apply(lab, config)
            for n in nodes:
                wait(lambda n=n: not lab.status(n)["servicesWatched"], 60,
                     f"{n} to stop following Services")
            wait(lambda: not {IPv4Network(p) for p in ranges} & set(edge.routes()), 60,
                 "the ranges to be withdrawn")
        finally:
            delete_services(kube, "shop")


def test_single_addresses_disaggregated_balancers_and_excluded_nodes_follow_calico(lab,
                                                                                   tmp_path):
    """Calico's other service rules, at the edge router, per node: a load-balancer IP given
    as a single address (a /32 entry) is not announced whole, but every node announces it for
    the Cluster service holding it; with serviceLoadBalancerAggregation Disabled the
    load-balancer range is not announced either, and every node announces a Cluster service's
    /32s while it has a ready endpoint anywhere; a node labelled
    node.kubernetes.io/exclude-from-external-load-balancers=true announces no service address
    (the label reaches its record through the controller), and announces again once it goes."""
    kube, nodes = lab.kube(), sorted(lab.nodes())
    single, pooled = "198.18.101.7", "198.18.100.6"

    def from_each(edge, node_names) -> dict[str, set[IPv4Network]]:
        return {n: set(edge.routes_of(n)) for n in node_names}

    def announced(edge, expected: dict[str, set[str]]) -> bool:
        found = from_each(edge, expected)
        return all(found[n] & SEEN == {IPv4Network(p) for p in e} for n, e in expected.items())

    SEEN = {IPv4Network(p) for p in ("10.96.0.0/12", "198.18.100.0/24", f"{single}/32",
                                     f"{pooled}/32", "10.96.0.30/32", "10.96.0.31/32")}
    with edge_router(lab, tmp_path) as (edge, config):
        try:
            apply(lab, with_spec(config, serviceClusterIPs=[{"cidr": "10.96.0.0/12"}],
                                 serviceLoadBalancerIPs=[{"cidr": "198.18.100.0/24"},
                                                         {"cidr": f"{single}/32"}]))
            for name, cluster_ip, address in (("till", "10.96.0.30", single),
                                              ("cart", "10.96.0.31", pooled)):
                kube.apply(balancer(name, cluster_ip, "Cluster"))
                kube.set_status("service", name,
                                {"loadBalancer": {"ingress": [{"ip": address}]}}, POD_NAMESPACE)
            kube.apply(endpoints_on("cart", nodes[0]))
            # till (no endpoint, but a single address): its /32s from every node; cart inside
            # the range, which every node announces
            aggregated = {"10.96.0.0/12", "198.18.100.0/24", f"{single}/32", "10.96.0.30/32"}
            wait(lambda: announced(edge, {n: aggregated for n in nodes}), 60,
                 "every node to announce the ranges and till's /32s, not the single address "
                 "as a range")
            apply(lab, with_spec(config, serviceClusterIPs=[{"cidr": "10.96.0.0/12"}],
                                 serviceLoadBalancerIPs=[{"cidr": "198.18.100.0/24"},
                                                         {"cidr": f"{single}/32"}],
                                 serviceLoadBalancerAggregation="Disabled"))
            disaggregated = {"10.96.0.0/12", f"{single}/32", "10.96.0.30/32",
                             f"{pooled}/32", "10.96.0.31/32"}
            wait(lambda: announced(edge, {n: disaggregated for n in nodes}), 60,
                 "every node to announce cart's /32s in place of the load-balancer range")
            kube.kubectl("label", "node", nodes[1], f"{EXCLUDED}=true", "--overwrite")
            wait(lambda: announced(edge, {nodes[0]: disaggregated, nodes[1]: set()}), 60,
                 f"{nodes[1]}, excluded, to announce no service address")
            assert not lab.status(nodes[1])["servicesWatched"]
            shown = lab.pipitctl("node", "status", "--socket",
                                 str(lab.status_socket(nodes[1]))).stdout
            assert f"Service addresses: none announced, the node is labelled {EXCLUDED}=true." \
                in shown
            kube.kubectl("label", "node", nodes[1], f"{EXCLUDED}-")
            wait(lambda: announced(edge, {n: disaggregated for n in nodes}), 60,
                 f"{nodes[1]} to announce them again once the label is gone")
        finally:
            kube.kubectl("label", "node", nodes[1], f"{EXCLUDED}-", check=False)
            delete_services(kube, "till", "cart")


def test_a_load_balancer_service_gets_an_address_that_the_nodes_announce(lab, tmp_path):
    """Calico's LoadBalancer IP pools: pipit-controller gives a LoadBalancer service an
    address of the pool in its status (held in IPAM, `ipam check` clean, an Event says so),
    the nodes announce it to the edge router (serviceLoadBalancerAggregation Disabled: its
    /32, from every node); an annotation naming no pool is a Warning Event and changes
    nothing, one asking for an address moves it there, and deleting the service frees it."""
    kube, nodes = lab.kube(), sorted(lab.nodes())
    pool = IPv4Network("198.18.100.0/26")
    handle = f"lb.{POD_NAMESPACE}.cart"

    def ingress() -> list[str]:
        found = kube.get("service", "cart", POD_NAMESPACE) or {}
        return [i.get("ip") for i in ((found.get("status") or {}).get("loadBalancer") or {})
                .get("ingress") or []]

    def announced_by_every_node(address: str) -> bool:
        return all(IPv4Network(f"{address}/32") in edge.routes_of(n) for n in nodes)

    def events(reason: str) -> str:
        listed = kube.kubectl("get", "events", "-n", POD_NAMESPACE, "-o", "json",
                              "--field-selector", f"involvedObject.name=cart,reason={reason}")
        return " ".join(e["message"] for e in json.loads(listed.stdout)["items"])

    with edge_router(lab, tmp_path) as (edge, config):
        try:
            apply(lab, {"apiVersion": "pipit.dev/v1", "kind": "IPPool",
                        "metadata": {"name": "public"},
                        "spec": {"cidr": str(pool), "blockSize": 28,
                                 "allowedUses": ["LoadBalancer"]}})
            apply(lab, with_spec(config, serviceLoadBalancerIPs=[{"cidr": "198.18.100.0/24"}],
                                 serviceLoadBalancerAggregation="Disabled"))
            kube.apply(balancer("cart", "10.96.0.40", "Cluster"))
            kube.apply(endpoints_on("cart", nodes[0]))
            [given] = wait(lambda: ingress() or None, 60, "cart to get a load-balancer address")
            assert IPv4Address(given) in pool
            assert snapshot(lab).handles[handle] and check(snapshot(lab)) == []
            wait(lambda: announced_by_every_node(given), 60,
                 f"every node to announce {given} to the edge")
            assert "Assigned load-balancer address" in events("LoadBalancerAddressAssigned")
            # a request that cannot be met: one sentence on the service, its address kept
            service = balancer("cart", "10.96.0.40", "Cluster")
            service["metadata"]["annotations"] = {"pipit.dev/ipv4pools": '["nope"]'}
            kube.apply(service)
            message = wait(lambda: events("NoLoadBalancerAddress"), 60,
                           "a warning event on cart")
            assert "IP pool 'nope' does not exist" in message
            assert ingress() == [given]
            asked = "198.18.100.20"
            service["metadata"]["annotations"] = {"pipit.dev/loadBalancerIPs": f'["{asked}"]'}
            kube.apply(service)
            wait(lambda: ingress() == [asked], 60, f"cart's address to move to {asked}")
            wait(lambda: announced_by_every_node(asked) and not any(
                IPv4Network(f"{given}/32") in edge.routes_of(n) for n in nodes), 60,
                 f"the nodes to announce {asked} in place of {given}")
            kube.kubectl("delete", "service", "cart", "-n", POD_NAMESPACE)
            wait(lambda: handle not in snapshot(lab).handles, 60, "cart's address to be freed")
            assert check(snapshot(lab)) == []
        finally:
            delete_services(kube, "cart")
            wait(lambda: handle not in snapshot(lab).handles, 60, "cart's address to be freed")
            lab.pipitctl("delete", "ippool", "public")


def test_a_floating_ip_reaches_its_pod_from_everywhere_and_moves_with_it(lab):
    """Calico's floatingIPs annotation: the address is held in IPAM for the pod, reached
    (DNAT on its node) from a pod on another node, one on the same node, the node itself and
    the pod itself; freed with the pod; given to another pod of the same node, then to one on
    the other node (its /32 borrowed from the first node's block), and reached there. One UDP
    flow (the same source port throughout) follows it each time: the nodes forget what they
    tracked of it when the floating IP leads elsewhere, or somewhere at last."""
    floating = "10.246.0.10"
    annotations = {"cni.projectcalico.org/floatingIPs": f'["{floating}"]'}
    near, far = pod_by_name(lab, "n1-p1"), pod_by_name(lab, "n2-p1")
    answered = f"{floating} {far.address}"  # from the floating IP, which saw far's own address
    apply(lab, {"apiVersion": "pipit.dev/v1", "kind": "IPPool", "metadata": {"name": "fip"},
                "spec": {"cidr": "10.246.0.0/24", "blockSize": 28, "nodeSelector": "!all()"}})
    try:
        first = lab.add_pod("n1", "fip-1", annotations=annotations)
        front = Pod("the floating IP", "n1", first.netns, floating)
        for source in (far, near, first):  # the last: a pod reaching itself (hairpin)
            wait(lambda: lab.ping(source, front), 30, f"{source.name} to reach {floating}")
        wait(lambda: netns.ping(lab.node_ns("n1"), floating, "-q").returncode == 0, 30,
             f"n1 itself to reach {floating}")  # past the blackhole of the block holding it
        assert check(snapshot(lab)) == []
        with udp_echo(first.netns):
            wait(lambda: flow(far.netns, floating) == answered, 30, "the flow to fip-1")
        lab.remove_pod("fip-1")
        wait(lambda: not lab.ping(far, front), 30, f"{floating} to stop answering")
        assert flow(far.netns, floating) == "none"  # n1 tracks it now as leading nowhere
        for name, node in (("fip-2", "n1"), ("fip-3", "n2")):  # another pod; another node
            pod = lab.add_pod(node, name, annotations=annotations)
            with udp_echo(pod.netns):
                for source in (near, far, pod):
                    wait(lambda: lab.ping(source, front), 30, f"{source.name} to reach "
                         f"{floating} at {name}")
                wait(lambda: flow(far.netns, floating) == answered, 30, f"the flow to {name}")
            lab.remove_pod(name)
    finally:
        for name in ("fip-1", "fip-2", "fip-3"):
            lab.remove_pod(name)
        wait(lambda: not any(h.startswith("pipit.lab-fip") for h in snapshot(lab).handles), 30,
             "the floating IPs to be freed")
        lab.pipitctl("delete", "ippool", "fip", "--force")


def test_node_diags_collects_the_node_and_the_cluster(lab, tmp_path):
    """`pipitctl node diags` on n1, as an operator runs it on the host: one archive, only
    root's to read, with the agent's status, Pipit's routes, ExaBGP's configuration, every
    resource and a clean IPAM check; nothing missing."""
    import tarfile
    lab.wait_mesh()
    node_dir = lab.node_dir("n1")

    def diags(directory) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*netns.exec_prefix(lab.node_ns("n1")), sys.executable, "-m", "pipitctl", "node",
             "diags", "--dir", str(directory), "--state-dir", str(node_dir),
             "--socket", str(lab.status_socket("n1")), "--etcd-endpoints", lab.etcd_endpoint],
            cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=120)
    one_sentence(diags("/proc"), "cannot write /proc/pipit-diags-", "--dir")
    result = diags(tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    [path] = tmp_path.glob("pipit-diags-*.tar.gz")
    assert result.stdout == f"Diagnostics written to {path}\n"
    assert path.stat().st_mode & 0o777 == 0o600
    with tarfile.open(path) as archive:
        files = {Path(m.name).name: archive.extractfile(m).read().decode()
                 for m in archive.getmembers()}
    assert {"version.txt", "node-status.json", "checksystem.txt", "sysctl.txt", "links.json",
            "addresses.json", "routes.json", "neighbours.json", "nat.nft", "exabgp.conf",
            "resources.yaml", "ipam-check.json"} <= set(files)
    assert "errors.txt" not in files
    status = json.loads(files["node-status.json"])
    assert [(p["name"], p["state"]) for p in status["peers"]] == [("n2", "up")]
    assert any(r.get("protocol") == "91" or r.get("protocol") == 91
               for r in json.loads(files["routes.json"])), "no route of Pipit's"
    assert "neighbor " in files["exabgp.conf"]
    assert json.loads(files["ipam-check.json"])["problems"] == []
    assert "kind: IPPool" in files["resources.yaml"]


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
