"""Encapsulation end to end as `pipit-agent` wires it, on this machine's kernel, in namespaces
the tests create: each node runs the agent (ExaBGP spawned, the node-to-node mesh, etcd
through its unix socket), pods are attached by the real `ptp` plugin with pipit-ipam through
the conflist the agent writes, and the pool is changed with `pipitctl` while they run. What
is checked is what the agents did: their routes and devices, the pod MTU they publish (and
`--mtu`), their natOutgoing table, and captures of what really went over the wire.

    two subnets:  node a 192.168.1.10/24 - [router] - 192.168.2.10/24 node b
                                              |
                                    203.0.113.10/24 "internet" (outside every pool)
    CrossSubnet:  node c 192.168.3.10/24 -+
                                          +- [bridge, router] - 192.168.4.10/24 node e
                  node d 192.168.3.11/24 -+

The routers know no pod address (until a test routes blocks on one, as a ToR that learned them
would): between subnets only encapsulated pod traffic gets across.
IPIP needs a kernel with the ipip module: test_ipip_vm.py boots one.
"""

from __future__ import annotations

import json
import re
import subprocess
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from ipip.encap import VXLAN_DEVICE
from lab import netns
from lab.agent import NodeAgentProcess
from lab.cni import Attachment, CNIRuntime, NetworkConfig, ipv4_only_iptables
from lab.etcd import EtcdServer
from lab.process import kill, wait
from tests.cni_support import short_temp_dir
from tests.ipip_support import (
    Capture,
    Node,
    Pod,
    Underlay,
    exists,
    ip,
    ping,
    pipit_routes,
    wait_ping,
)
from tests.pipitctl_support import ok, pipitctl, pool_yaml

pytestmark = [pytest.mark.slow, pytest.mark.netns]

POOL = "10.244.0.0/16"
BLOCK_SIZE = 26
VXLAN_OVERHEAD = 50


class AgentCluster:
    """etcd and a pipit-agent on each node of an underlay; pods attached through the conflist
    each agent writes. `close()` stops the agents (retiring them) and kills whatever still runs
    in the nodes' namespaces."""

    def __init__(self, underlay: Underlay, directory: Path, cni_bin: Path):
        self.underlay, self.directory, self.cni_bin = underlay, directory, cni_bin
        self.etcd = EtcdServer(data_dir=directory / "etcd", unix_socket=True)
        self.nodes: dict[str, Node] = {}
        self.agents: dict[str, NodeAgentProcess] = {}

    def start(self, nodes: dict[str, Node], pool: dict, *agent_args: str) -> AgentCluster:
        self.etcd.start()
        self.pipitctl("apply", "-f", "-", input=pool_yaml("default", cidr=POOL,
                                                          blockSize=BLOCK_SIZE, **pool))
        for name, node in nodes.items():
            self.nodes[name] = node
            self.agents[name] = NodeAgentProcess(
                name, node.ns, self.directory / name, f"unix://{self.etcd.data_dir}/etcd.sock:0",
                extra_args=["--ip", str(node.address), "--cni-conf-file",
                            str(self.conflist(name)), *agent_args]).start(timeout=60)
        wait(lambda: all(self.meshed(name) for name in self.agents), 90,
             "every node's BGP sessions to establish")
        wait(lambda: all(self.conflist(name).exists() for name in self.agents), 60,
             "every agent's conflist")
        return self

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop(timeout=30)
        for node in self.nodes.values():  # an ExaBGP a stuck agent left behind
            for pid in netns.pids(node.ns):
                kill(pid)
        self.etcd.destroy()

    def pipitctl(self, *args: str, input: str | None = None) -> str:
        return ok(pipitctl(*args, input=input, endpoints=self.etcd.endpoint))

    def conflist(self, name: str) -> Path:
        return self.directory / name / "net.d" / "10-pipit.conflist"

    def meshed(self, name: str) -> bool:
        status = self.agents[name].status() or {}
        peers = [p for p in status.get("peers", []) if p["state"] != "skipped"]
        return len(peers) == len(self.agents) - 1 and all(p["state"] == "up" for p in peers)

    def pod(self, name: str) -> Pod:
        """A pod on node `name`, attached as a runtime would with the agent's conflist."""
        ns = self.underlay.namespaces.create("pod")
        runtime = CNIRuntime(self.cni_bin, netns=self.nodes[name].ns,
                             cache_dir=self.directory / name / "cni",
                             env=ipv4_only_iptables(self.directory / "shim"))
        result = runtime.add(NetworkConfig.load(self.conflist(name)),
                             Attachment(f"pod-{ns}", netns.path_of(ns), "eth0"))
        return Pod(ns, IPv4Interface(result["ips"][0]["address"]).ip, self.nodes[name])

    def patch_pool(self, **spec) -> None:
        self.pipitctl("patch", "ippool", "default", "-p", json.dumps({"spec": spec}))

    def record(self, name: str) -> dict:
        return json.loads(self.pipitctl("get", "node", name, "-o", "json"))["spec"]

    def pod_mtu(self, name: str) -> int:
        published = int((self.directory / name / "pod-mtu").read_text())
        conflist = json.loads(self.conflist(name).read_text())
        assert conflist["plugins"][0]["mtu"] == published, conflist
        return published


def block_of(pod: Pod) -> IPv4Network:
    return IPv4Network(f"{pod.address}/{BLOCK_SIZE}", strict=False)


def link_mtu(ns: str, device: str) -> int:
    return json.loads(ip(ns, "-j", "link", "show", device))[0]["mtu"]


def vxlan_route(pod: Pod, cluster: AgentCluster, name: str) -> str:
    return f"{block_of(pod)} via {cluster.record(name)['ipv4VXLANTunnelAddr']} " \
           f"dev {VXLAN_DEVICE} onlink"


def wait_routes(ns: str, expected: list[str], what: str) -> None:
    """Until the node's Pipit routes are `expected` (in any order)."""
    try:
        wait(lambda: sorted(pipit_routes(ns)) == sorted(expected), 60, what)
    except TimeoutError:
        assert sorted(pipit_routes(ns)) == sorted(expected), what


def nat_table(ns: str) -> bool:
    return subprocess.run([*netns.exec_prefix(ns), "nft", "list", "table", "ip", "pipit-nat"],
                          capture_output=True).returncode == 0


def reaches(source: Pod, target) -> None:
    """`source` gets a reply from `target` (once the routes are there), then three in a row:
    packets enough for a capture around it to count on."""
    wait_ping(source, target, timeout=60)
    result = ping(source, target, count=3)
    assert result.returncode == 0, result.stdout + result.stderr


def mtu_is_the_largest_that_crosses(pod_a: Pod, pod_b: Pod, router: str, router_if: str,
                                    pod_mtu: int, directory: Path) -> None:
    """A full-size packet crosses whole (DF set), inside VXLAN of 50 more bytes, and one byte
    more is refused at the pod itself."""
    icmp_payload = pod_mtu - 20 - 8  # IPv4 and ICMP headers
    with Capture(router, router_if, directory) as wire:
        fits = ping(pod_a, pod_b.address, size=icmp_payload, df=True, count=3)
        too_big = ping(pod_a, pod_b.address, size=icmp_payload + 1, df=True)
    assert fits.returncode == 0, fits.stdout + fits.stderr
    assert too_big.returncode != 0
    assert re.search(rf"mtu ?= ?{pod_mtu}\b", too_big.stdout + too_big.stderr), too_big.stdout
    assert wire.count(f"udp dst port 4789 and ip[2:2] == {pod_mtu + VXLAN_OVERHEAD}") >= 2
    assert wire.count("ip[6:2] & 0x3fff != 0") == 0  # no fragments


# --------------------------------------------------------------------------------------------
# Two subnets behind a router: VXLAN Always with natOutgoing, then CrossSubnet without it


@pytest.fixture(scope="class")
def two_subnets(cni_bin):
    """Nodes a and b behind the router, the "internet" beside them, a pod on each node; the
    pool VXLAN Always with natOutgoing."""
    with netns.Namespaces() as namespaces, short_temp_dir() as directory:
        underlay = Underlay(namespaces)
        router = underlay.router()
        a = underlay.node("a", "192.168.1.10/24", router=router, router_if="to-a")
        b = underlay.node("b", "192.168.2.10/24", router=router, router_if="to-b")
        internet = underlay.node("internet", "203.0.113.10/24", router=router,
                                 router_if="to-net")
        cluster = AgentCluster(underlay, directory, cni_bin)
        try:
            cluster.start({"a": a, "b": b}, {"vxlanMode": "Always", "natOutgoing": True})
            pod_a, pod_b = cluster.pod("a"), cluster.pod("b")
            yield cluster, router, internet, pod_a, pod_b
        finally:
            cluster.close()


class TestTwoSubnets:
    def test_vxlan_always_routes_through_the_vteps_the_agents_recorded(self, two_subnets):
        cluster, _, _, pod_a, pod_b = two_subnets
        for me, other, mine, theirs in (("a", "b", pod_a, pod_b), ("b", "a", pod_b, pod_a)):
            record = cluster.record(me)
            assert IPv4Network(POOL).supernet_of(IPv4Network(record["ipv4VXLANTunnelAddr"]))
            assert record["vxlanTunnelMACAddr"]
            wait_routes(cluster.nodes[me].ns, [f"blackhole {block_of(mine)}",
                                               vxlan_route(theirs, cluster, other)],
                        f"node {me}'s routes")
            device = json.loads(ip(cluster.nodes[me].ns, "-j", "-d", "link", "show",
                                   VXLAN_DEVICE))[0]
            assert device["address"] == record["vxlanTunnelMACAddr"]
            assert device["linkinfo"]["info_data"]["local"] == str(cluster.nodes[me].ip)

    def test_pod_traffic_crosses_the_router_in_udp_4789_only(self, two_subnets, tmp_path):
        cluster, router, _, pod_a, pod_b = two_subnets
        with Capture(router, "to-a", tmp_path) as underlay_a:
            reaches(pod_a, pod_b.address)
        vxlan = underlay_a.packets("udp dst port 4789")
        assert len(vxlan) >= 6  # 4 requests and 4 replies at least, less a late one or two
        nodes, pods = (re.escape(str(n.ip)) for n in cluster.nodes.values()), \
            (re.escape(str(p.address)) for p in (pod_a, pod_b))
        node_re, pod_re = "|".join(nodes), "|".join(pods)
        # Outer: node to node, VNI 4096; inner: pod to pod.
        assert all(re.search(rf"IP ({node_re})\.\d+ > ({node_re})\.4789: VXLAN.*vni 4096 \| "
                             rf"IP ({pod_re}) > ({pod_re}): ICMP", p) for p in vxlan), vxlan
        assert underlay_a.count("icmp") == 0  # no pod packet travelled bare

    def test_the_published_pod_mtu_is_the_largest_that_crosses_the_tunnel(self, two_subnets,
                                                                          tmp_path):
        cluster, router, _, pod_a, pod_b = two_subnets
        expected = 1500 - VXLAN_OVERHEAD  # the uplink's, less VXLAN's headers
        for name in cluster.nodes:
            assert cluster.pod_mtu(name) == expected
            assert link_mtu(cluster.nodes[name].ns, VXLAN_DEVICE) == expected
        assert link_mtu(pod_a.ns, "eth0") == expected  # ptp took it from the conflist
        wait_ping(pod_a, pod_b.address, timeout=60)
        mtu_is_the_largest_that_crosses(pod_a, pod_b, router, "to-a", expected, tmp_path)

    def test_nat_outgoing_masquerades_pods_leaving_every_pool_but_not_pod_to_pod(
            self, two_subnets, tmp_path):
        cluster, _, internet, pod_a, pod_b = two_subnets
        node_a = cluster.nodes["a"]
        assert nat_table(node_a.ns)
        with Capture(internet.ns, "eth0", tmp_path) as outside, \
                Capture(pod_b.ns, "eth0", tmp_path) as at_pod_b:
            reaches(pod_a, internet.ip)
            reaches(pod_a, pod_b.address)
        assert outside.count(f"icmp and src {node_a.ip} and dst {internet.ip}") >= 1
        assert outside.count(f"net {POOL}") == 0  # no pod address reached the outside
        assert at_pod_b.count(f"icmp and src {pod_a.address}") >= 1
        assert at_pod_b.count(f"icmp and src {node_a.ip}") == 0

    def test_nat_outgoing_goes_with_the_pool(self, two_subnets, tmp_path):
        """Changes the pool: the last test of the class."""
        cluster, _, internet, pod_a, _ = two_subnets
        cluster.patch_pool(natOutgoing=False)
        for name, node in cluster.nodes.items():
            wait(lambda: not nat_table(node.ns), 60, f"node {name} to drop its NAT table")
        with Capture(internet.ns, "eth0", tmp_path) as outside:
            assert ping(pod_a, internet.ip, count=3).returncode != 0  # no way back to a pod
        assert outside.count(f"icmp and src {pod_a.address} and dst {internet.ip}") >= 1


# --------------------------------------------------------------------------------------------
# CrossSubnet: c and d on one LAN, e behind the router; --mtu 1400; then Always, then Never

MTU = 1400  # --mtu of these agents


@pytest.fixture(scope="class")
def cross_subnet(cni_bin):
    """Nodes c and d on one bridge of the router (192.168.3.0/24), e behind it
    (192.168.4.0/24), agents with --mtu 1400, a pod on each node; the pool VXLAN
    CrossSubnet."""
    with netns.Namespaces() as namespaces, short_temp_dir() as directory:
        underlay = Underlay(namespaces)
        router = underlay.router()
        underlay.lan(router, "br0", "192.168.3.1/24")
        c = underlay.node("c", "192.168.3.10/24", router=router, router_if="to-c", bridge="br0")
        d = underlay.node("d", "192.168.3.11/24", router=router, router_if="to-d", bridge="br0")
        e = underlay.node("e", "192.168.4.10/24", router=router, router_if="to-e")
        cluster = AgentCluster(underlay, directory, cni_bin)
        try:
            cluster.start({"c": c, "d": d, "e": e}, {"vxlanMode": "CrossSubnet"},
                          "--mtu", str(MTU))
            yield cluster, router, {name: cluster.pod(name) for name in cluster.nodes}
        finally:
            cluster.close()


class TestCrossSubnet:
    def test_native_inside_the_subnet_and_vxlan_across_it(self, cross_subnet, tmp_path):
        cluster, router, pods = cross_subnet
        c, d = cluster.nodes["c"], cluster.nodes["d"]
        wait_routes(c.ns, [f"blackhole {block_of(pods['c'])}",
                           f"{block_of(pods['d'])} via {d.ip} dev eth0",
                           vxlan_route(pods["e"], cluster, "e")],
                    "node c's native route to d's block and VXLAN route to e's")
        with Capture(c.ns, "eth0", tmp_path) as wire:
            reaches(pods["c"], pods["d"].address)
        assert wire.count("udp port 4789") == 0
        assert wire.count(f"icmp and src {pods['c'].address} and dst {pods['d'].address}") >= 3
        with Capture(router, "to-e", tmp_path) as underlay_e:
            reaches(pods["c"], pods["e"].address)
        assert underlay_e.count("udp dst port 4789") >= 6
        assert underlay_e.count("icmp") == 0

    def test_the_mtu_flag_sets_the_pod_and_tunnel_mtu(self, cross_subnet, tmp_path):
        cluster, router, pods = cross_subnet
        for name, node in cluster.nodes.items():
            assert cluster.pod_mtu(name) == MTU
            assert link_mtu(node.ns, VXLAN_DEVICE) == MTU
            assert link_mtu(pods[name].ns, "eth0") == MTU
        wait_ping(pods["c"], pods["e"].address, timeout=60)
        mtu_is_the_largest_that_crosses(pods["c"], pods["e"], router, "to-e", MTU, tmp_path)

    def test_switching_to_always_and_to_never_rewires_routes_and_devices(self, cross_subnet,
                                                                        tmp_path):
        """Changes the pool: the last test of the class."""
        cluster, router, pods = cross_subnet
        c, d = cluster.nodes["c"], cluster.nodes["d"]
        own = f"blackhole {block_of(pods['c'])}"

        cluster.patch_pool(vxlanMode="Always")
        wait_routes(c.ns, [own, vxlan_route(pods["d"], cluster, "d"),
                           vxlan_route(pods["e"], cluster, "e")],
                    "node c's routes through d's and e's VTEPs")
        with Capture(c.ns, "eth0", tmp_path) as wire:
            reaches(pods["c"], pods["d"].address)
        assert wire.count("udp dst port 4789") >= 6
        assert wire.count(f"icmp and src {pods['c'].address}") == 0

        cluster.patch_pool(vxlanMode="Never")
        router_c = "192.168.3.1"  # e is on none of c's links: its block goes via c's router
        wait_routes(c.ns, [own, f"{block_of(pods['d'])} via {d.ip} dev eth0",
                           f"{block_of(pods['e'])} via {router_c} dev eth0"],
                    "node c's native routes to d's block, and to e's via its router")
        wait(lambda: not exists(c.ns, VXLAN_DEVICE), 60, f"node c to remove {VXLAN_DEVICE}")
        with Capture(c.ns, "eth0", tmp_path) as wire:
            reaches(pods["c"], pods["d"].address)
        assert wire.count("udp port 4789") == 0
        assert wire.count(f"icmp and src {pods['c'].address}") >= 3

        self.across_the_router_once_it_knows_the_blocks(cluster, router, pods, tmp_path)
        self.the_route_follows_the_kernels_way_to_the_far_node(cluster, pods)

    @staticmethod
    def across_the_router_once_it_knows_the_blocks(cluster, router, pods, tmp_path):
        """Pods in two subnets without encapsulation reach each other when the router between
        them routes their blocks (a ToR that learned them over BGP; here by hand)."""
        c, e = cluster.nodes["c"], cluster.nodes["e"]
        ip(router, "route", "add", str(block_of(pods["c"])), "via", str(c.ip))
        ip(router, "route", "add", str(block_of(pods["e"])), "via", str(e.ip))
        wait_routes(e.ns, [f"blackhole {block_of(pods['e'])}",
                           f"{block_of(pods['c'])} via 192.168.4.1 dev eth0",
                           f"{block_of(pods['d'])} via 192.168.4.1 dev eth0"],
                    "node e's routes to c's and d's blocks via its router")
        with Capture(router, "to-e", tmp_path) as underlay_e:
            reaches(pods["c"], pods["e"].address)
        assert underlay_e.count("udp port 4789") == 0
        assert underlay_e.count(f"icmp and src {pods['c'].address} and "
                                f"dst {pods['e'].address}") >= 3

    @staticmethod
    def the_route_follows_the_kernels_way_to_the_far_node(cluster, pods):
        """A new route on c to e's address (a router failing over, an operator's change)
        moves c's route to e's block with it, without any BGP change; and back."""
        c, d, e = cluster.nodes["c"], cluster.nodes["d"], cluster.nodes["e"]
        expected = [f"blackhole {block_of(pods['c'])}",
                    f"{block_of(pods['d'])} via {d.ip} dev eth0"]
        ip(c.ns, "route", "add", f"{e.ip}/32", "via", str(d.ip))
        wait_routes(c.ns, expected + [f"{block_of(pods['e'])} via {d.ip} dev eth0"],
                    "node c's route to e's block via d, its new way to e")
        reaches(pods["c"], pods["e"].address)  # d forwards it to the router
        ip(c.ns, "route", "del", f"{e.ip}/32")
        wait_routes(c.ns, expected + [f"{block_of(pods['e'])} via 192.168.3.1 dev eth0"],
                    "node c's route to e's block back via its router")
