"""The agent with the Kubernetes API (tests/fakekube) and a real etcd: pools and addresses
chosen by namespace and pod annotations at CNI ADD (bad ones fail naming the annotation and
leave nothing allocated), the node's identity from its Node (name, labels, annotations,
kubernetes-internal-ip), and NetworkUnavailable set to False once, never flipped back."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from ipaddress import IPv4Address, IPv4Interface

import pytest

from bgp_agent import health, kube_node
from bgp_agent.agent import parse_args
from bgp_agent.kube_api import KubeAPI
from bgp_agent.node import InterfaceAddress
from ipam import block as blocks
from ipam import cni, keys
from ipam.errors import InvalidResource
from ipam.snapshot import load_snapshot
from ipam.store import Store
from lab.agent import AgentProcess
from lab.process import wait
from tests.fakekube.resources import NAMESPACES, NODES, PODS
from tests.helpers import add_pool, run, started_now, with_store

pytestmark = pytest.mark.kube

NETWORK = {"cniVersion": "1.0.0", "name": "pipit-net", "type": "ptp",
           "ipam": {"type": "pipit-ipam", "pools": ["default"]}}


def namespace(name: str, annotations: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "annotations": annotations or {}}}


def pod(name: str, annotations: dict | None = None, node: str = "node-1") -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "annotations": annotations or {}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]}}


def add(socket_path, ns: str, name: str, container: str | None = None) -> dict:
    """A CNI ADD through the Python plugin, as the runtime makes it for a pod."""
    config = {**NETWORK, "ipam": {**NETWORK["ipam"], "socket": str(socket_path)}}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": container or f"c-{ns}-{name}",
           "CNI_IFNAME": "eth0", "CNI_NETNS": "/var/run/netns/x",
           "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}"}
    try:
        return cni.run("ADD", env, json.dumps(config))
    except cni.CNIError as error:
        return {"code": error.code, "msg": error.msg}


@pytest.fixture
def kube_agent(fakekube, etcd, short_dir):
    fakekube.store.create(NODES, None, {"apiVersion": "v1", "kind": "Node",
                                        "metadata": {"name": "node-1"}})
    with_store(etcd, lambda s: add_pool(s, "default", "10.30.0.0/24", blockSize=28))
    with_store(etcd, lambda s: add_pool(s, "blue", "10.31.0.0/24", blockSize=28,
                                        nodeSelector="!all()"))
    with_store(etcd, lambda s: add_pool(s, "green", "10.32.0.0/24", blockSize=28))
    kubeconfig = fakekube.write_kubeconfig(short_dir / "kubeconfig")
    agent = AgentProcess("node-1", short_dir / "ipam.sock", etcd.endpoints,
                         short_dir / "agent.log", extra_args=["--kubeconfig", str(kubeconfig)])
    with agent:
        yield agent


def address_of(result: dict) -> IPv4Address:
    return IPv4Interface(result["ips"][0]["address"]).ip


def handles(etcd) -> set[str]:
    return set(with_store(etcd, load_snapshot).handles)


def test_annotations_choose_the_pool_and_the_address(fakekube, etcd, kube_agent):
    store = fakekube.store
    store.create(NAMESPACES, None, namespace("plain"))
    store.create(NAMESPACES, None, namespace("team", {"pipit.dev/ipv4pools": '["blue"]'}))
    store.create(PODS, "plain", pod("web"))
    store.create(PODS, "team", pod("api"))
    store.create(PODS, "team", pod("db", {"pipit.dev/ipv4pools": '["10.32.0.0/24"]'}))
    store.create(PODS, "team", pod("fixed", {"pipit.dev/ip-addrs": '["10.31.0.77"]'}))
    socket = kube_agent.socket_path
    assert address_of(add(socket, "plain", "web")) in IPv4Interface("10.30.0.0/24").network
    # the namespace's pool, although its nodeSelector selects no node
    assert address_of(add(socket, "team", "api")) in IPv4Interface("10.31.0.0/24").network
    # the pod's annotation wins over its namespace's; a pool named by its CIDR
    assert address_of(add(socket, "team", "db")) in IPv4Interface("10.32.0.0/24").network
    # exactly the address asked for (its block claimed for this node)
    assert address_of(add(socket, "team", "fixed")) == IPv4Address("10.31.0.77")
    # a pod created just now (not yet in the agent's cache) is looked up directly
    store.create(PODS, "team", pod("late", {"pipit.dev/ipv4pools": '["green"]'}))
    assert address_of(add(socket, "team", "late")) in IPv4Interface("10.32.0.0/24").network
    # IPv4 asked for by Calico's ipFamilies is what Pipit gives
    store.create(PODS, "team", pod("four", {"cni.projectcalico.org/ipFamilies": '["IPv4"]'}))
    assert address_of(add(socket, "team", "four")) in IPv4Interface("10.31.0.0/24").network
    # Calico's names for the annotations (a cluster moving from Calico keeps them)
    store.create(NAMESPACES, None, namespace("moved", {"cni.projectcalico.org/ipv4pools":
                                                       '["blue"]'}))
    store.create(PODS, "moved", pod("api"))
    store.create(PODS, "moved", pod("fixed", {"cni.projectcalico.org/ipAddrs": '["10.31.0.78"]'}))
    store.create(PODS, "moved", pod("db", {"cni.projectcalico.org/ipv4pools": '["green"]'}))
    assert address_of(add(socket, "moved", "api")) in IPv4Interface("10.31.0.0/24").network
    assert address_of(add(socket, "moved", "fixed")) == IPv4Address("10.31.0.78")
    assert address_of(add(socket, "moved", "db")) in IPv4Interface("10.32.0.0/24").network


def test_a_pools_namespace_selector_picks_the_pods_of_the_namespaces_it_matches(
        fakekube, etcd, kube_agent):
    """Calico's namespaceSelector: with a CNI configuration that names no pool, a pod of a
    namespace labelled team=a gets its address from the pool selecting that namespace, one of
    another namespace from the pool selecting it; the labels are the namespace's own."""
    async def pools(store):
        await add_pool(store, "default", "10.30.0.0/24", blockSize=28,
                       namespaceSelector="!has(team)")
        await add_pool(store, "green", "10.32.0.0/24", blockSize=28,
                       namespaceSelector="team == 'b'")
        await add_pool(store, "team-a", "10.33.0.0/24", blockSize=28,
                       namespaceSelector="team == 'a'")
    with_store(etcd, pools)
    store = fakekube.store
    store.create(NAMESPACES, None, {**namespace("alpha"), "metadata": {
        "name": "alpha", "labels": {"team": "a"}}})
    store.create(NAMESPACES, None, namespace("plain"))
    store.create(PODS, "alpha", pod("web"))
    store.create(PODS, "plain", pod("web"))
    config = {**NETWORK, "ipam": {"type": "pipit-ipam", "socket": str(kube_agent.socket_path)}}

    def added(ns: str) -> IPv4Address:
        env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": f"c-{ns}", "CNI_IFNAME": "eth0",
               "CNI_NETNS": "/var/run/netns/x",
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME=web"}
        return address_of(cni.run("ADD", env, json.dumps(config)))
    assert added("alpha") in IPv4Interface("10.33.0.0/24").network
    assert added("plain") in IPv4Interface("10.30.0.0/24").network


def delete(socket_path, ns: str, name: str) -> None:
    config = {**NETWORK, "ipam": {**NETWORK["ipam"], "socket": str(socket_path)}}
    cni.run("DEL", {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": f"c-{ns}-{name}",
                    "CNI_IFNAME": "eth0", "CNI_NETNS": "/var/run/netns/x"}, json.dumps(config))


def test_floating_ips_are_held_for_the_pod_and_go_with_it(fakekube, etcd, kube_agent):
    """Calico's floatingIPs (and Pipit's name): held in IPAM under a handle of their own,
    recording the pod address they lead to; the CNI result names only the pod's own address;
    a DEL frees both."""
    fakekube.store.create(NAMESPACES, None, namespace("team"))
    fakekube.store.create(PODS, "team", pod("web", {
        "cni.projectcalico.org/floatingIPs": '["10.31.0.90", "10.31.0.91"]'}))
    result = add(kube_agent.socket_path, "team", "web")
    [own] = [IPv4Interface(ip["address"]).ip for ip in result["ips"]]
    assert own in IPv4Interface("10.30.0.0/24").network
    snap = with_store(etcd, load_snapshot)
    attachment = cni.handle_id("pipit-net", "c-team-web", "eth0")
    floating = cni.floating_handle(attachment)
    held = {a.handle_id: a.secondary for b in snap.blocks.values() for a in b.attributes}
    assert held[floating]["floatingFor"] == str(own)
    assert held[floating]["attachment"] == attachment
    assert held[floating]["node"] == "node-1" and held[floating]["pod"] == "web"
    assert sorted(a for b in snap.blocks.values() for a in blocks.addresses_of(b, floating)) \
        == [IPv4Address("10.31.0.90"), IPv4Address("10.31.0.91")]
    assert add(kube_agent.socket_path, "team", "web") == result  # again: the same, nothing more
    delete(kube_agent.socket_path, "team", "web")
    assert handles(etcd) == set()
    # a pod without floating IPs, and one with them whose DEL reaches an agent started since
    fakekube.store.create(PODS, "team", pod("db"))
    add(kube_agent.socket_path, "team", "db")
    result = add(kube_agent.socket_path, "team", "web")
    kube_agent.restart()
    delete(kube_agent.socket_path, "team", "web")
    delete(kube_agent.socket_path, "team", "db")
    assert handles(etcd) == set()


@pytest.mark.parametrize("annotations, code, words", [
    ({"pipit.dev/ipv4pools": "blue"}, 7, "annotation pipit.dev/ipv4pools of pod team/bad is "
                                         "not JSON"),
    ({"pipit.dev/ipv4pools": '["nope"]'}, 101, "annotation pipit.dev/ipv4pools of pod team/bad:"
                                               " IP pool 'nope' does not exist"),
    ({"pipit.dev/ipv4pools": '["10.99.0.0/24"]'}, 101, "no IP pool has the CIDR 10.99.0.0/24"),
    ({"pipit.dev/ip-addrs": '["10.40.0.1"]'}, 7, "annotation pipit.dev/ip-addrs of pod team/bad:"
                                                 " 10.40.0.1 is not in any IP pool"),
    ({"pipit.dev/ip-addrs": '["10.31.0.77"]'}, 7, "10.31.0.77 is already in use in block "
                                                  "10.31.0.64/28"),
    ({"pipit.dev/ip-addrs": '["10.31.0.81", "10.31.0.64"]'}, 7, "10.31.0.64 is the gateway of"),
    ({"pipit.dev/ip-addrs": '["10.31.0.79"]'}, 7, "10.31.0.79 is the broadcast address of"),
    ({"pipit.dev/ip-addrs": '["ten"]'}, 7, "'ten' is not an IPv4 address"),
    ({"cni.projectcalico.org/ipAddrs": '["10.40.0.1"]'}, 7,
     "annotation cni.projectcalico.org/ipAddrs of pod team/bad: 10.40.0.1 is not in any IP pool"),
    ({"pipit.dev/ipv4pools": '["blue"]', "cni.projectcalico.org/ipv4pools": '["green"]'}, 7,
     "pod team/bad has both annotations pipit.dev/ipv4pools and cni.projectcalico.org/ipv4pools"),
    ({"cni.projectcalico.org/ipAddrsNoIpam": '["10.31.0.90"]'}, 7,
     "annotation cni.projectcalico.org/ipAddrsNoIpam of pod team/bad is not supported"),
    # Calico's annotations asking for what Pipit does not do
    ({"cni.projectcalico.org/ipv6pools": '["default-ipv6-ippool"]'}, 7,
     "annotation cni.projectcalico.org/ipv6pools of pod team/bad is not supported: Pipit is "
     "IPv4 only for now"),
    ({"cni.projectcalico.org/ipFamilies": '["IPv4", "IPv6"]'}, 7,
     "annotation cni.projectcalico.org/ipFamilies of pod team/bad is not supported"),
    ({"cni.projectcalico.org/hwAddr": "02:00:00:00:00:01"}, 7, "does not set a pod's MAC"),
    ({"qos.projectcalico.org/ingressBandwidth": "10M"}, 7,
     "annotation qos.projectcalico.org/ingressBandwidth of pod team/bad is not supported: "
     "Pipit does not shape pods' traffic"),
    # floating IPs: the pod's own address goes too when they cannot be had
    ({"pipit.dev/floating-ips": '["10.40.0.1"]'}, 7, "annotation pipit.dev/floating-ips of "
                                                     "pod team/bad: 10.40.0.1 is not in any "
                                                     "IP pool"),
    ({"cni.projectcalico.org/floatingIPs": '["10.31.0.77"]'}, 7,
     "annotation cni.projectcalico.org/floatingIPs of pod team/bad: 10.31.0.77 is already in "
     "use in block 10.31.0.64/28"),
    ({"cni.projectcalico.org/floatingIPs": '["1.2.3"]'}, 7, "'1.2.3' is not an IPv4 address"),
    ({"pipit.dev/ip-addrs": '["10.31.0.81"]', "pipit.dev/floating-ips": '["10.31.0.81"]'}, 7,
     "annotation pipit.dev/floating-ips of pod team/bad: 10.31.0.81 is also the pod's own "
     "address (annotation pipit.dev/ip-addrs of pod team/bad)"),
    ({"pipit.dev/floating-ips": '["10.31.0.82"]',
      "cni.projectcalico.org/floatingIPs": '["10.31.0.83"]'}, 7,
     "pod team/bad has both annotations pipit.dev/floating-ips and "
     "cni.projectcalico.org/floatingIPs"),
])
def test_bad_annotations_fail_the_add_naming_them_and_leave_nothing(
        fakekube, etcd, kube_agent, annotations, code, words):
    fakekube.store.create(NAMESPACES, None, namespace("team"))
    fakekube.store.create(PODS, "team", pod("fixed", {"pipit.dev/ip-addrs": '["10.31.0.77"]'}))
    assert address_of(add(kube_agent.socket_path, "team", "fixed")) == IPv4Address("10.31.0.77")
    before = handles(etcd)
    fakekube.store.create(PODS, "team", pod("bad", annotations))
    answer = add(kube_agent.socket_path, "team", "bad")
    assert answer["code"] == code and words in answer["msg"], answer
    assert handles(etcd) == before


def test_a_namespace_asking_for_ipv6_pools_fails_its_pods_adds(fakekube, etcd, kube_agent):
    fakekube.store.create(NAMESPACES, None, namespace("v6", {
        "cni.projectcalico.org/ipv6pools": '["default-ipv6-ippool"]'}))
    fakekube.store.create(PODS, "v6", pod("web"))
    answer = add(kube_agent.socket_path, "v6", "web")
    assert answer["code"] == 7 and answer["msg"].startswith(
        "annotation cni.projectcalico.org/ipv6pools of namespace v6 is not supported"), answer
    assert handles(etcd) == set()


def test_the_node_name_comes_from_nodename_then_the_host_name(monkeypatch):
    monkeypatch.setenv("NODENAME", "from-spec")
    assert parse_args([]).node == "from-spec"
    assert parse_args(["--node", "given"]).node == "given"
    monkeypatch.delenv("NODENAME")
    import socket
    assert parse_args([]).node == socket.gethostname()


def test_the_load_balancers_virtual_node_is_no_node_name(capsys):
    """`load-balancer` is where LoadBalancer services' addresses are allocated (Calico's
    name): an agent under that name would take them for its own."""
    with pytest.raises(SystemExit) as exited:
        parse_args(["--node", "load-balancer"])
    assert exited.value.code == 2
    assert "node name 'load-balancer' is where load-balancer addresses are allocated" in \
        capsys.readouterr().err


def node_object(annotations=None, labels=None, internal="10.0.0.11") -> dict:
    return {"metadata": {"name": "k1", "labels": labels or {}, "annotations": annotations or {}},
            "status": {"addresses": [{"type": "Hostname", "address": "k1"},
                                     {"type": "InternalIP", "address": internal}]}}


def agent_args(*argv: str) -> argparse.Namespace:
    return parse_args(["--node", "k1", *argv])


def test_identity_from_the_node(monkeypatch):
    local = [InterfaceAddress("eth0", IPv4Interface("10.0.0.11/24")),
             InterfaceAddress("eth1", IPv4Interface("192.168.5.2/24"))]
    monkeypatch.setattr(kube_node, "local_addresses", lambda: local)
    node = node_object({"pipit.dev/as-number": "1.10",
                        "pipit.dev/route-reflector-cluster-id": "244.0.0.1"},
                       {"topology.kubernetes.io/zone": "z1"})
    me = kube_node.identity(agent_args("--ip-autodetection-method", "kubernetes-internal-ip",
                                       "--labels", "rack=a"), node, {"rack": "a"})
    assert me.address == IPv4Interface("10.0.0.11/24")  # with its interface's prefix
    assert me.as_number == 65546 and str(me.route_reflector_cluster_id) == "244.0.0.1"
    assert me.labels == {"topology.kubernetes.io/zone": "z1", "rack": "a"}
    assert me.kubernetes_node == "k1"
    # flags win over annotations; the address annotation over autodetection
    node = node_object({"pipit.dev/ipv4-address": "192.168.5.2/24",
                        "pipit.dev/as-number": "65001"})
    me = kube_node.identity(agent_args("--as", "65002"), node, {})
    assert me.address == IPv4Interface("192.168.5.2/24") and me.as_number == 65002
    with pytest.raises(InvalidResource, match="annotation pipit.dev/ipv4-address '10.0.0.11' "
                                              "is not an IPv4 address with its prefix length"):
        kube_node.identity(agent_args(), node_object({"pipit.dev/ipv4-address": "10.0.0.11"}),
                           {})
    with pytest.raises(InvalidResource, match="no IPv4 address on this node matches"):
        kube_node.identity(agent_args("--ip-autodetection-method", "kubernetes-internal-ip"),
                           node_object(internal="10.7.7.7"), {})


def test_each_address_check_reads_the_node_again(fakekube, tmp_path, monkeypatch):
    """kubernetes-internal-ip follows the Node: its InternalIP changed (the node re-addressed),
    the next check (agent.address_change) finds the interface holding the new one; a Node
    gone is one sentence (the agent keeps its address, saying so)."""
    local = [InterfaceAddress("eth0", IPv4Interface("10.0.0.11/24")),
             InterfaceAddress("eth1", IPv4Interface("10.0.0.12/24"))]
    monkeypatch.setattr(kube_node, "local_addresses", lambda: local)
    api = KubeAPI.connect(str(fakekube.write_kubeconfig(tmp_path / "kubeconfig")))
    fakekube.store.create(NODES, None, {"apiVersion": "v1", "kind": "Node",
                                        "metadata": {"name": "k1"}})

    def internal(address: str) -> None:
        fakekube.store.patch(NODES, None, "k1", lambda n: {**n, "status": {"addresses": [
            {"type": "InternalIP", "address": address}]}}, subresource="status")

    async def scenario():
        internal("10.0.0.11")
        kube = kube_node.AgentKubernetes(api, await kube_node.read_node(api, "k1"))
        args = agent_args("--ip-autodetection-method", "kubernetes-internal-ip")
        assert kube.identity(args, {}).address == IPv4Interface("10.0.0.11/24")
        internal("10.0.0.12")
        assert kube.identity(args, {}).address == IPv4Interface("10.0.0.11/24")  # as read
        await kube.refresh()
        assert kube.identity(args, {}).address == IPv4Interface("10.0.0.12/24")
        fakekube.store.delete(NODES, None, "k1")
        with pytest.raises(InvalidResource, match="Kubernetes has no Node 'k1'"):
            await kube.refresh()
        await kube.close()
    asyncio.run(scenario())


def test_network_unavailable_is_set_false_once(fakekube, tmp_path):
    api = KubeAPI.connect(str(fakekube.write_kubeconfig(tmp_path / "kubeconfig")))
    ready = {"type": "Ready", "status": "True", "reason": "KubeletReady"}
    fakekube.store.create(NODES, None, {"apiVersion": "v1", "kind": "Node",
                                        "metadata": {"name": "n1"}})
    fakekube.store.patch(NODES, None, "n1", lambda n: {**n, "status": {"conditions": [
        ready, {"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated"}]}},
        subresource="status")

    async def scenario():
        programmed = asyncio.Event()
        task = asyncio.create_task(kube_node.mark_network_available(api, "n1", programmed))
        await asyncio.sleep(0.2)
        assert not task.done()  # nothing before the routes are programmed
        programmed.set()
        await asyncio.wait_for(task, 10)
        node = fakekube.store.get(NODES, None, "n1")
        conditions = {c["type"]: c for c in node["status"]["conditions"]}
        assert conditions["NetworkUnavailable"]["status"] == "False"
        assert conditions["Ready"] == ready  # merged by type, the others kept
        version = node["metadata"]["resourceVersion"]
        # an agent restart: already False, nothing written
        await asyncio.wait_for(kube_node.mark_network_available(api, "n1", programmed), 10)
        assert fakekube.store.get(NODES, None, "n1")["metadata"]["resourceVersion"] == version
    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------
# The API away when the agent starts: waited for, as etcd is

def waiting_agent(fakekube, etcd, directory) -> AgentProcess:
    """An agent with the API, probes and a CNI configuration, not started yet (started_now()
    does not wait for its IPAM socket: waiting for the API, it serves none)."""
    fakekube.store.create(NODES, None, {"apiVersion": "v1", "kind": "Node",
                                        "metadata": {"name": "node-1"}})
    kubeconfig = fakekube.write_kubeconfig(directory / "kubeconfig")
    return AgentProcess("node-1", directory / "ipam.sock", etcd.endpoints,
                        directory / "agent.log", extra_args=[
                            "--kubeconfig", str(kubeconfig),
                            "--health-listen", f"unix:{directory}/health.sock",
                            "--cni-conf-file", str(directory / "net.d" / "10-pipit.conflist")])


def node_record(etcd, name: str):
    return run(_read(etcd, keys.node_key(name)))


async def _read(config, key: str):
    async with Store(config) as store:
        return await store.get(key)


def logged(agent: AgentProcess, words: str):
    return lambda: words in agent.log_path.read_text()


def test_an_agent_started_before_the_api_waits_for_it_then_serves(fakekube, etcd, short_dir):
    """A node rebooted with its control plane: the agent does not exit into the kubelet's
    restart back-off (minutes without networking for new pods) because the API server came
    up a little later."""
    listen = health.Listen(path=str(short_dir / "health.sock"))
    conflist = short_dir / "net.d" / "10-pipit.conflist"
    agent = waiting_agent(fakekube, etcd, short_dir)
    fakekube.stop()
    with started_now(agent) as process:
        wait(logged(agent, "Node node-1 not read yet, trying again: cannot reach the Kubernetes "
                    f"API at {fakekube.url}"), 20, "the agent saying it waits")
        code, body = health.get(listen, "/readyz", timeout=10)
        assert code == 503
        assert "[-]start failed: waiting for the Kubernetes API: cannot reach" in body
        assert health.get(listen, "/livez")[0] == 200  # waiting is no reason to restart it
        assert process.poll() is None
        assert not agent.socket_path.exists() and not conflist.exists()
        assert node_record(etcd, "node-1") is None
        fakekube.fail(503, times=1, path="/nodes/node-1")  # starting: answers 503 first
        fakekube.start()
        wait(conflist.exists, 30, "the conflist, once the Node is read and the node registered")
        assert node_record(etcd, "node-1") is not None
        assert "Node node-1 read: the Kubernetes API answered after" in agent.log_path.read_text()
        wait(lambda: health.get(listen, "/readyz")[0] == 200, 20, "ready")
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0


def test_sigterm_while_waiting_for_the_api_exits_having_written_nothing(
        fakekube, etcd, short_dir):
    agent = waiting_agent(fakekube, etcd, short_dir)
    fakekube.stop()
    with started_now(agent) as process:
        wait(logged(agent, "not read yet"), 20, "the agent saying it waits")
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    fakekube.start()
    assert node_record(etcd, "node-1") is None
    assert not (short_dir / "net.d").exists() and not (short_dir / "health.sock").exists()


def test_an_api_refusing_the_agent_ends_it_in_one_sentence(fakekube, etcd, short_dir):
    """Its credentials or RBAC are wrong: asking again will not help."""
    agent = waiting_agent(fakekube, etcd, short_dir)
    fakekube.fail(403, times=None, path="/nodes/node-1", message='nodes "node-1" is forbidden')
    with started_now(agent) as process:
        assert process.wait(60) == 1
    text = agent.log_path.read_text()
    assert f"the Kubernetes API at {fakekube.url} answered HTTP 403: nodes " in text
    assert "trying again" not in text
    assert node_record(etcd, "node-1") is None
