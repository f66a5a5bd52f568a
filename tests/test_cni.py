"""Pod addresses through CNI, end to end: the reference plugins (ptp, bridge, portmap) run by
lab.cni inside a node namespace, pipit-ipam asking a real pipit-agent, the agent writing to a
real etcd; pods are network namespaces. What etcd (and `pipitctl ipam show`) says is compared
with what is configured inside the pods."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Interface, IPv4Network

import pytest

from ipam.cni import handle_id
from ipam.snapshot import check
from ipam.store import EtcdConfig
from lab.cni import Attachment, CNIError, CNIRuntime, NetworkConfig, ipv4_only_iptables
from lab import netns
from lab.process import wait
from lab.netns import Namespaces, addresses, exec_prefix
from tests.cni_support import (
    DEFAULT_POOL,
    NS_PREFIX,
    CNINode,
    add_pools,
    holder,
    holdings,
    ip_of,
    new_container_id,
    pipitctl_in_use,
    pod_name,
    snapshot,
    start_agent,
    used,
)
from tests.sentences import one_sentence

pytestmark = pytest.mark.netns

POOL = IPv4Network(DEFAULT_POOL[1])


@pytest.fixture
def namespaces():
    """Namespaces (pipit-t-...) made by the test, removed afterwards."""
    with Namespaces(NS_PREFIX) as ns:
        yield ns


@pytest.fixture
def cni_node(etcd, cni_bin, namespaces, short_dir) -> CNINode:
    """Node `node-1`: a namespace, a pipit-agent on the shared (wiped) etcd, a CNI runtime that
    runs the plugins inside the namespace."""
    add_pools(etcd, DEFAULT_POOL)
    netns = namespaces.create("node")
    agent = start_agent(etcd, short_dir)
    try:
        runtime = CNIRuntime(cni_bin, netns=netns, cache_dir=short_dir / "cni",
                             env=ipv4_only_iptables(short_dir / "shim"))
        yield CNINode(etcd, netns, agent, runtime, namespaces)
    finally:
        agent.stop()


def assert_pods_talk(a: Attachment, b: Attachment, ip_a: IPv4Interface, ip_b: IPv4Interface):
    for source, target in ((a, ip_b), (b, ip_a)):
        result = netns.ping(pod_name(source), target.ip, reply_wait=5)
        assert result.returncode == 0, f"{pod_name(source)} cannot ping {target}: {result.stdout}"


def assert_attached(node: CNINode, net: NetworkConfig, pod: Attachment,
                    result: dict) -> IPv4Interface:
    """The pod has the result's address on eth0; etcd says its handle holds it; the gateway
    is its block's first address."""
    ip = ip_of(result)
    assert ip.ip in POOL, result
    block = IPv4Network((ip.ip, DEFAULT_POOL[2]["blockSize"]), strict=False)
    assert ip.network == block
    assert result["ips"][0]["gateway"] == str(block.network_address)
    assert addresses(pod_name(pod)) == [str(ip)]
    assert holder(snapshot(node.etcd), ip) == handle_id(net.name, pod.container_id, pod.ifname)
    return ip


def assert_all_free(node: CNINode, pods: list[Attachment], pool: str = "default") -> None:
    snap = snapshot(node.etcd)
    for pod in pods:
        assert holdings(snap, pod.container_id) == []
    assert used(snap, pool) == 0
    assert snap.handles == {}
    assert check(snap) == []
    assert pipitctl_in_use(node.etcd, pool) == 0


# --------------------------------------------------------------------------------------------
# Namespaces


def test_leftover_namespaces_of_dead_runs_go_and_others_stay():
    dead = subprocess.Popen(["true"])
    dead.wait()
    # a prefix of this run's own: other runs' leftovers (also dead ones) are not this test's
    prefix = f"{netns.TEST_PREFIX}pid{os.getpid()}-leftovers-"
    mine = f"{prefix}pid{os.getpid()}-keep-1"  # this process's: alive
    crashed = f"{prefix}pid{dead.pid}-pod-1"
    foreign = f"{prefix}{dead.pid}-not-ours"  # same prefix, another tool's naming
    left_running = None
    try:
        netns.create(mine, crashed, foreign)
        left_running = subprocess.Popen([*exec_prefix(crashed), "sleep", "600"],
                                        start_new_session=True)
        wait(lambda: netns.pids(crashed), 10, "sleep to run in the namespace")
        assert netns.remove_leftovers(prefix) == [crashed]
        assert netns.exists(mine) and netns.exists(foreign) and not netns.exists(crashed)
        assert left_running.wait(10) == -signal.SIGKILL  # what ran inside went with it
    finally:
        if left_running is not None and left_running.poll() is None:
            left_running.kill()
            left_running.wait()
        netns.delete(mine, crashed, foreign)


# --------------------------------------------------------------------------------------------
# ptp, bridge, portmap


def test_ptp_pods_get_pool_addresses_talk_to_each_other_and_give_them_back(cni_node):
    net = cni_node.network("ptp")
    a, b = cni_node.new_pods(2)
    ip_a = assert_attached(cni_node, net, a, cni_node.runtime.add(net, a))
    ip_b = assert_attached(cni_node, net, b, cni_node.runtime.add(net, b))
    assert ip_a != ip_b
    assert pipitctl_in_use(cni_node.etcd, "default") == 2
    assert_pods_talk(a, b, ip_a, ip_b)
    cni_node.runtime.check(net, a)
    cni_node.runtime.check(net, b)

    cni_node.runtime.delete(net, a)
    cni_node.runtime.delete(net, b)
    assert addresses(pod_name(a)) == [] and addresses(pod_name(b)) == []
    snap = snapshot(cni_node.etcd)
    assert holder(snap, ip_a) is None and holder(snap, ip_b) is None
    assert_all_free(cni_node, [a, b])


def test_add_twice_for_one_container_gives_the_same_address(cni_node):
    net = cni_node.network("ptp")
    (pod,) = cni_node.new_pods(1)
    first = ip_of(cni_node.runtime.add(net, pod))
    # ptp delegates ADD to pipit-ipam; a repeated delegation (a retried ADD) for the same
    # container and interface must answer with the address it already has, not a second one.
    config = cni_node.runtime.plugin_config(net, net.plugins[0], pod)
    again = cni_node.runtime.exec_plugin("pipit-ipam", "ADD", config, pod)
    assert IPv4Interface(again["ips"][0]["address"]) == first
    assert used(snapshot(cni_node.etcd), "default") == 1
    assert addresses(pod_name(pod)) == [str(first)]
    cni_node.runtime.check(net, pod)
    cni_node.runtime.delete(net, pod)
    assert_all_free(cni_node, [pod])


def test_del_of_an_unknown_container_succeeds(cni_node):
    net = cni_node.network("ptp")
    (pod,) = cni_node.new_pods(1)
    cni_node.runtime.delete(net, pod)  # never added: nothing cached, no veth, no handle
    cni_node.runtime.delete(net, Attachment(new_container_id(), "", "eth0"))  # netns gone too
    assert_all_free(cni_node, [pod])


def test_bridge_pods_get_pool_addresses_and_talk_through_the_gateway_bridge(cni_node):
    bridge = f"pipit-br-{new_container_id()[:6]}"
    net = cni_node.network("bridge", bridge=bridge, isGateway=True)
    a, b = cni_node.new_pods(2)
    ip_a = assert_attached(cni_node, net, a, cni_node.runtime.add(net, a))
    ip_b = assert_attached(cni_node, net, b, cni_node.runtime.add(net, b))
    gateway = IPv4Interface(f"{ip_a.network.network_address}/{ip_a.network.prefixlen}")
    assert addresses(cni_node.netns, bridge) == [str(gateway)]
    assert_pods_talk(a, b, ip_a, ip_b)
    # the bridge is the pods' gateway
    assert netns.ping(pod_name(a), gateway.ip, reply_wait=5).returncode == 0
    cni_node.runtime.check(net, a)
    cni_node.runtime.check(net, b)
    cni_node.runtime.delete(net, b)
    cni_node.runtime.delete(net, a)
    assert addresses(pod_name(a)) == [] and addresses(pod_name(b)) == []
    assert_all_free(cni_node, [a, b])


SERVE = """
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", 80))
server.listen()
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    conn.sendall(sys.argv[1].encode())
    conn.close()
"""

FETCH = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as conn:
    print(conn.recv(100).decode())
"""


def test_conflist_ptp_and_portmap_maps_a_host_port_to_the_pod(cni_node):
    net = NetworkConfig.load({"cniVersion": "1.0.0", "name": "pipit-ports", "plugins": [
        {"type": "ptp", "ipam": cni_node.ipam()},
        {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
    ]})
    web, client = cni_node.new_pods(2)
    web = Attachment(web.container_id, web.netns, web.ifname, web.args, {"portMappings": [
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]})
    result = cni_node.runtime.add(net, web)
    ip = assert_attached(cni_node, net, web, result)
    cni_node.runtime.add(net, client)
    cni_node.runtime.check(net, web)
    cni_node.runtime.check(net, client)
    rules = cni_node.namespaces.run(cni_node.netns, "iptables-save", "-t", "nat").stdout
    assert f"--to-destination {ip.ip}:80" in rules

    server = subprocess.Popen([*exec_prefix(pod_name(web)), sys.executable, "-c", SERVE,
                               "hello from web"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "listening"
        host = str(ip.network.network_address)  # a node address (ptp's host-side gateway)
        for source in (cni_node.netns, pod_name(client)):  # from the node and from another pod
            got = subprocess.run([*exec_prefix(source), sys.executable, "-c", FETCH, host,
                                  "8080"], capture_output=True, text=True, timeout=30)
            assert got.stdout.strip() == "hello from web", (source, got.stderr)
    finally:
        server.kill()
        server.wait()

    cni_node.runtime.delete(net, web)
    cni_node.runtime.delete(net, client)
    rules = cni_node.namespaces.run(cni_node.netns, "iptables-save", "-t", "nat").stdout
    assert str(ip.ip) not in rules
    assert_all_free(cni_node, [web, client], "default")


# --------------------------------------------------------------------------------------------
# Errors through ptp: the code of pipit-ipam reaches the runtime, nothing is left behind


def host_veths(node: CNINode) -> list[str]:
    out = node.namespaces.run(node.netns, "ip", "-o", "link", "show", "type", "veth").stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]


def assert_failed_cleanly(node: CNINode, net: NetworkConfig, pod: Attachment, code: int,
                          *facts: str, etcd_up: bool = True) -> CNIError:
    before = host_veths(node)
    with pytest.raises(CNIError) as caught:
        node.runtime.add(net, pod, cleanup_on_failure=False)  # the plugins alone must clean up
    error = caught.value
    assert error.code == code, error
    one_sentence(error.msg, *facts, max_length=299)
    assert addresses(pod_name(pod)) == []
    assert host_veths(node) == before
    if etcd_up:  # (else the caller looks once etcd is back)
        assert holdings(snapshot(node.etcd), pod.container_id) == []
    return error


def test_errors_through_ptp_carry_pipit_codes_and_leave_nothing(cni_node, etcd):
    add_pools(etcd, ("tiny", "10.245.0.0/30", {"blockSize": 30}))  # 2 usable addresses
    pods = cni_node.new_pods(6)

    missing = cni_node.network("ptp", ipam=cni_node.ipam(pools=["nope"]))
    assert_failed_cleanly(cni_node, missing, pods[0], 101, "IP pool 'nope' does not exist")

    unknown = cni_node.network("ptp", ipam=cni_node.ipam(subnet="10.0.0.0/8"))
    assert_failed_cleanly(cni_node, unknown, pods[0], 2, "'subnet'")

    tiny = cni_node.network("ptp", ipam=cni_node.ipam(pools=["tiny"]))
    for pod in pods[1:3]:
        cni_node.runtime.add(tiny, pod)
    error = assert_failed_cleanly(cni_node, tiny, pods[3], 100, "'tiny'")
    assert "cannot provide" in error.msg

    snap = snapshot(etcd)
    assert used(snap, "tiny") == 2 and used(snap, "default") == 0
    for pod in (pods[0], pods[3]):
        assert holdings(snap, pod.container_id) == []
    for pod in pods[1:3]:
        cni_node.runtime.delete(tiny, pod)

    cni_node.agent.stop()
    error = assert_failed_cleanly(cni_node, cni_node.network("ptp"), pods[5], 11, "pipit-agent",
                                  cni_node.socket)
    assert "is it running" in error.msg
    cni_node.agent.start()
    assert_all_free(cni_node, pods, "tiny")


def test_etcd_down_means_try_again_and_the_agent_recovers_without_restart(
        own_etcd, cni_bin, namespaces, short_dir):
    etcd = EtcdConfig(endpoints=(own_etcd.endpoint,))
    add_pools(etcd, DEFAULT_POOL)
    netns = namespaces.create("node")
    agent = start_agent(etcd, short_dir)
    try:
        runtime = CNIRuntime(cni_bin, netns=netns, env=ipv4_only_iptables(short_dir / "shim"))
        node = CNINode(etcd, netns, agent, runtime, namespaces)
        net = node.network("ptp")
        warm, during, after = node.new_pods(3)
        node.runtime.add(net, warm)  # the agent has its view of etcd cached

        own_etcd.stop()
        assert_failed_cleanly(node, net, during, 11, "etcd", own_etcd.endpoint,
                              etcd_up=False)
        assert node.agent.running  # it reports the outage, it does not die of it

        own_etcd.start()
        assert holdings(snapshot(etcd), during.container_id) == []
        # The same agent process serves again once its etcd connection is back.
        result = retry_until_added(node, net, after, deadline=30.0)
        assert_attached(node, net, after, result)
        assert agent.running
        for pod in (warm, after):
            node.runtime.delete(net, pod)
        assert_all_free(node, [warm, during, after])
    finally:
        agent.stop()


def retry_until_added(node: CNINode, net: NetworkConfig, pod: Attachment, deadline: float) -> dict:
    def added() -> dict | None:
        try:
            return node.runtime.add(net, pod, cleanup_on_failure=False)
        except CNIError as error:
            if error.code != 11:
                raise
            return None  # try again later

    return wait(added, deadline, f"{pod.container_id} to be added", interval=0.1)


# --------------------------------------------------------------------------------------------
# STATUS and GC through the runtime (CNI 1.1: the reference plugins 1.1.1 predate it, so the
# 1.1.0 lists here run pipit-ipam itself, as a 1.1 main plugin would delegate to it)


def ipam_list(node: CNINode, name: str = "pipit-net") -> NetworkConfig:
    return NetworkConfig.load({"cniVersion": "1.1.0", "name": name, "plugins": [
        {"type": "pipit-ipam", "ipam": node.ipam()}]})


def test_status_is_ok_with_the_agent_up_and_50_without_it(cni_node):
    cni_node.runtime.status(ipam_list(cni_node))
    cni_node.agent.stop()
    with pytest.raises(CNIError) as caught:
        cni_node.runtime.status(ipam_list(cni_node))
    assert caught.value.code == 50
    assert "pipit-agent is not reachable" in caught.value.msg
    cni_node.agent.start()  # the agent back: STATUS is ok again
    cni_node.runtime.status(ipam_list(cni_node))


def test_gc_releases_only_the_stale_attachments_of_that_network(cni_node):
    net_a, net_b = cni_node.network("ptp", name="net-a"), cni_node.network("ptp", name="net-b")
    keep, stale, other = cni_node.new_pods(3)
    ips = {pod.container_id: ip_of(cni_node.runtime.add(net, pod))
           for net, pod in ((net_a, keep), (net_a, stale), (net_b, other))}

    # Stage 1 (libcni): cached attachments of net-a missing from the valid list are DELeted.
    cni_node.runtime.gc(net_a, [keep])
    assert addresses(pod_name(stale)) == []
    assert addresses(pod_name(keep)) == [str(ips[keep.container_id])]
    snap = snapshot(cni_node.etcd)
    assert holdings(snap, stale.container_id) == []
    assert holder(snap, ips[keep.container_id]) is not None
    assert holder(snap, ips[other.container_id]) is not None

    # Stage 2 (GC command): a runtime that lost its cache (node reboot) still gets the
    # addresses back from pipit-ipam, for its network only.
    again = cni_node.new_pods(1)[0]
    ips[again.container_id] = ip_of(cni_node.runtime.add(net_a, again))
    cni_node.runtime.cache.remove(net_a, again)
    cni_node.runtime.gc(ipam_list(cni_node, "net-a"), [keep])
    snap = snapshot(cni_node.etcd)
    assert holdings(snap, again.container_id) == []
    assert holder(snap, ips[keep.container_id]) == handle_id("net-a", keep.container_id, "eth0")
    assert holder(snap, ips[other.container_id]) == handle_id("net-b", other.container_id,
                                                              "eth0")
    cni_node.runtime.delete(net_a, keep)
    cni_node.runtime.delete(net_b, other)
    assert_all_free(cni_node, [keep, stale, other, again])


# --------------------------------------------------------------------------------------------
# Many pods at once, and an agent crash in the middle of them


def plugin_processes() -> int:
    """pipit-ipam processes running now."""
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                count += b"pipit-ipam" in f.read()
        except OSError:
            continue
    return count


def add_all(node: CNINode, net: NetworkConfig, pods: list[Attachment],
            on_success=None) -> dict[str, dict | CNIError]:
    def one(pod: Attachment):
        try:
            result = node.runtime.add(net, pod, cleanup_on_failure=False)
        except CNIError as error:
            return pod.container_id, error
        if on_success:
            on_success()
        return pod.container_id, result
    with ThreadPoolExecutor(len(pods)) as pool:
        return dict(pool.map(one, pods))


def test_a_burst_of_100_pods_gets_100_distinct_addresses_and_gives_them_all_back(cni_node):
    net = cni_node.network("ptp")
    pods = cni_node.new_pods(100)
    outcomes = add_all(cni_node, net, pods)
    failures = {c: o for c, o in outcomes.items() if isinstance(o, CNIError)}
    assert failures == {}
    ips = {c: ip_of(r) for c, r in outcomes.items()}
    assert len(set(ips.values())) == 100
    snap = snapshot(cni_node.etcd)
    assert used(snap, "default") == 100
    for pod in pods:
        assert addresses(pod_name(pod)) == [str(ips[pod.container_id])]
        assert holder(snap, ips[pod.container_id]) == handle_id(net.name, pod.container_id,
                                                                "eth0")
    assert check(snap) == []

    with ThreadPoolExecutor(len(pods)) as pool:
        list(pool.map(lambda pod: cni_node.runtime.delete(net, pod), pods))
    assert_all_free(cni_node, pods)


def test_agent_killed_mid_burst_loses_no_address_and_the_failed_adds_succeed_after_restart(
        cni_node):
    net = cni_node.network("ptp")
    pods = cni_node.new_pods(100)
    outcomes = add_all(cni_node, net, pods[:15])  # these complete before the crash
    # Freeze the agent, start the other 85 ADDs, and kill it once they are all waiting on it:
    # the crash lands with every one of them in flight, whatever the machine's speed.
    os.kill(cni_node.agent.pid, signal.SIGSTOP)
    with ThreadPoolExecutor(1) as background:
        rest = background.submit(add_all, cni_node, net, pods[15:])
        wait(lambda: plugin_processes() >= 85 or rest.done(), 60,
                 "85 pipit-ipam calls waiting on the frozen agent")
        cni_node.agent.kill()
        outcomes.update(rest.result())
    failed = [p for p in pods if isinstance(outcomes[p.container_id], CNIError)]
    succeeded = [p for p in pods if p not in failed]
    assert len(succeeded) == 15 and len(failed) == 85, "the agent was not killed mid-burst"
    for pod in failed:
        assert outcomes[pod.container_id].code == 11, outcomes[pod.container_id]

    cni_node.agent.start()
    snap = snapshot(cni_node.etcd)
    assert check(snap) == []
    for pod in succeeded:  # every success still holds its address
        ip = ip_of(outcomes[pod.container_id])
        assert addresses(pod_name(pod)) == [str(ip)]
        assert holder(snap, ip) == handle_id(net.name, pod.container_id, "eth0")
    for pod in failed:  # a failed ADD configured nothing (ptp asks IPAM first)
        assert addresses(pod_name(pod)) == [], pod.container_id

    retried = add_all(cni_node, net, failed)
    assert [o for o in retried.values() if isinstance(o, CNIError)] == []
    outcomes.update(retried)
    ips = {c: ip_of(r) for c, r in outcomes.items()}
    assert len(set(ips.values())) == 100
    snap = snapshot(cni_node.etcd)
    assert check(snap) == [] and used(snap, "default") == 100
    for pod in pods:
        assert addresses(pod_name(pod)) == [str(ips[pod.container_id])]
        assert holder(snap, ips[pod.container_id]) == handle_id(net.name, pod.container_id,
                                                                "eth0")
    with ThreadPoolExecutor(len(pods)) as pool:
        list(pool.map(lambda pod: cni_node.runtime.delete(net, pod), pods))
    assert_all_free(cni_node, pods)
