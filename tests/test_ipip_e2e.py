"""End to end on this machine's kernel, in namespaces the tests create: VXLAN (Always across
subnets, CrossSubnet inside one), the pod MTU, natOutgoing, and a Never -> VXLAN -> Never
switch. Each node is programmed the way the agent does it: dataplane.prepare, routes from
policy.kernel_routes with encap.route_next_hop written by KernelRoutes, dataplane.retire.
Captures on the underlay show what really went over the wire.

IPIP needs a kernel with the ipip module: test_ipip_vm.py boots one."""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Network

import pytest
from pyroute2 import IPRoute

from bgp_agent import policy
from ipip.kernel_routes import KernelRoutes
from ipip.route_table import RouteTable
from bgp_agent.model import Path as BGPPath
from ipam.pool import IPPool
from ipip import dataplane, encap, nat
from ipip.encap import VXLAN, VXLAN_DEVICE, RemoteVTEP
from lab.netns import Namespaces
from tests.ipip_support import Capture, Node, Pod, Underlay, exists, ping, pipit_routes, wait_ping

pytestmark = [pytest.mark.slow, pytest.mark.netns]

POOL = IPv4Network("10.244.0.0/16")
BLOCK_A, BLOCK_B = IPv4Network("10.244.1.0/26"), IPv4Network("10.244.2.0/26")
VTEP_A, VTEP_B = IPv4Address("10.244.1.1"), IPv4Address("10.244.2.1")


def pool(vxlan_mode: str = "Never", nat_outgoing: bool = False) -> IPPool:
    return IPPool("default", POOL, vxlan_mode=vxlan_mode, nat_outgoing=nat_outgoing)


@pytest.fixture
def namespaces():
    with Namespaces() as ns:
        yield ns


@pytest.fixture
def underlay(namespaces) -> Underlay:
    return Underlay(namespaces)


class Cluster:
    """Two nodes with one block and one pod each, programmed from a list of pools."""

    def __init__(self, a: Node, b: Node, pod_a: Pod, pod_b: Pod):
        self.a, self.b, self.pod_a, self.pod_b = a, b, pod_a, pod_b
        self.blocks = {a.ns: BLOCK_A, b.ns: BLOCK_B}
        self.vteps = {a.ns: VTEP_A, b.ns: VTEP_B}
        self.prepared: dict[str, dataplane.Prepared] = {}

    def remote_vtep(self, node: Node) -> RemoteVTEP:
        return RemoteVTEP(node.ip, self.vteps[node.ns], encap.vtep_mac(node.ns))

    def program(self, pools: list[IPPool], mtu_override: int | None = None) -> None:
        for me, other in ((self.a, self.b), (self.b, self.a)):
            kinds = frozenset(encap.kinds_in_use(pools))
            desired = dataplane.Desired(
                local=me.address, kinds=kinds,
                vtep_address=self.vteps[me.ns] if VXLAN in kinds else None,
                vtep_mac=encap.vtep_mac(me.ns), vteps=(self.remote_vtep(other),),
                mtu_override=mtu_override)
            with IPRoute(netns=me.ns, flags=0) as ipr:
                prepared = dataplane.prepare(ipr, desired)
            block = self.blocks[other.ns]
            accepted = {other.ip: {block: BGPPath(block, other.ip)}}
            routes = policy.kernel_routes(
                accepted, [self.blocks[me.ns]],
                next_hop=encap.route_next_hop(pools, me.address, prepared.devices,
                                              desired.vteps))
            with KernelRoutes(me.ns) as kernel:
                assert RouteTable(kernel).sync(routes).errors == []
            with IPRoute(netns=me.ns, flags=0) as ipr:
                dataplane.retire(ipr, desired)
            nat.apply(pools, netns=me.ns)
            self.prepared[me.ns] = prepared


def two_subnets(underlay: Underlay) -> tuple[Cluster, str]:
    """Nodes in 192.168.1.0/24 and 192.168.2.0/24 behind a router that knows no pod address:
    only encapsulated pod traffic gets across. Returns the cluster and the router."""
    router = underlay.router()
    a = underlay.node("a", "192.168.1.10/24", router=router, router_if="to-a")
    b = underlay.node("b", "192.168.2.10/24", router=router, router_if="to-b")
    return Cluster(a, b, underlay.pod(a, "10.244.1.2"), underlay.pod(b, "10.244.2.2")), router


def one_subnet(underlay: Underlay) -> Cluster:
    a = underlay.node("c", "192.168.3.10/24")
    b = underlay.node("d", "192.168.3.11/24")
    underlay.join(a, b)
    return Cluster(a, b, underlay.pod(a, "10.244.1.2"), underlay.pod(b, "10.244.2.2"))


def test_vxlan_always_carries_pod_traffic_across_subnets_in_udp_4789(underlay, tmp_path):
    cluster, router = two_subnets(underlay)
    cluster.program([pool(vxlan_mode="Always")])
    assert pipit_routes(cluster.a.ns) == [
        f"blackhole {BLOCK_A}",
        f"{BLOCK_B} via {VTEP_B} dev {VXLAN_DEVICE} onlink",
    ]
    with Capture(router, "to-a", tmp_path) as underlay_a:
        wait_ping(cluster.pod_a, cluster.pod_b.address)
        assert ping(cluster.pod_a, cluster.pod_b.address, count=3).returncode == 0
    vxlan = underlay_a.packets("udp dst port 4789")
    assert len(vxlan) >= 8  # 4 requests and 4 replies at least
    # Outer: node to node, VNI 4096; inner: pod to pod.
    assert all(re.search(r"IP 192\.168\.[12]\.10\.\d+ > 192\.168\.[12]\.10\.4789: VXLAN.*"
                         r"vni 4096 \| IP 10\.244\.[12]\.2 > 10\.244\.[12]\.2: ICMP", p)
               for p in vxlan), vxlan
    assert underlay_a.count("icmp") == 0  # no pod packet travelled bare


def test_vxlan_cross_subnet_is_native_inside_one_subnet(underlay, tmp_path):
    cluster = one_subnet(underlay)
    cluster.program([pool(vxlan_mode="CrossSubnet")])
    assert pipit_routes(cluster.a.ns) == [
        f"blackhole {BLOCK_A}",
        f"{BLOCK_B} via {cluster.b.ip} dev eth0",
    ]
    with Capture(cluster.a.ns, "eth0", tmp_path) as wire:
        wait_ping(cluster.pod_a, cluster.pod_b.address)
        assert ping(cluster.pod_a, cluster.pod_b.address, count=3).returncode == 0
    assert wire.count("udp port 4789") == 0
    assert wire.count(f"icmp and src {cluster.pod_a.address} and dst {cluster.pod_b.address}") >= 4


def test_vxlan_cross_subnet_encapsulates_between_subnets(underlay, tmp_path):
    cluster, router = two_subnets(underlay)
    cluster.program([pool(vxlan_mode="CrossSubnet")])
    with Capture(router, "to-b", tmp_path) as underlay_b:
        wait_ping(cluster.pod_a, cluster.pod_b.address)
    assert underlay_b.count("udp dst port 4789") >= 2
    assert underlay_b.count("icmp") == 0


@pytest.mark.parametrize("override, expected", [(None, 1500 - 50), (1400, 1400)])
def test_published_pod_mtu_is_the_largest_that_crosses_the_tunnel(underlay, tmp_path, override,
                                                                  expected):
    """The pods' own interfaces keep the uplink's MTU (1500), so what stops a packet one byte
    over the published pod MTU is the path: vxlan.pipit's MTU, applied by the dataplane."""
    cluster, router = two_subnets(underlay)
    cluster.program([pool(vxlan_mode="Always")], mtu_override=override)
    pod_mtu = cluster.prepared[cluster.a.ns].pod_mtu
    assert pod_mtu == expected
    wait_ping(cluster.pod_a, cluster.pod_b.address)
    icmp_payload = pod_mtu - 20 - 8  # IPv4 and ICMP headers
    with Capture(router, "to-a", tmp_path) as wire:
        fits = ping(cluster.pod_a, cluster.pod_b.address, size=icmp_payload, df=True)
        too_big = ping(cluster.pod_a, cluster.pod_b.address, size=icmp_payload + 1, df=True)
    assert fits.returncode == 0, fits.stdout + fits.stderr
    assert too_big.returncode != 0
    assert re.search(rf"mtu ?= ?{pod_mtu}\b", too_big.stdout + too_big.stderr), too_big.stdout
    # The full-size packet crossed the underlay whole, with its 50 bytes of VXLAN headers.
    assert wire.count(f"udp dst port 4789 and ip[2:2] == {pod_mtu + 50}") >= 2
    assert wire.count("ip[6:2] & 0x3fff != 0") == 0  # no fragments


def test_nat_outgoing_masquerades_pods_leaving_all_pools_but_not_pod_to_pod(underlay, tmp_path):
    cluster, router = two_subnets(underlay)
    internet = underlay.node("internet", "203.0.113.10/24", router=router, router_if="to-net")
    cluster.program([pool(vxlan_mode="Always", nat_outgoing=True)])
    with Capture(internet.ns, "eth0", tmp_path) as outside, \
            Capture(cluster.pod_b.ns, "eth0", tmp_path) as at_pod_b:
        wait_ping(cluster.pod_a, internet.ip)
        wait_ping(cluster.pod_a, cluster.pod_b.address)
    assert outside.count(f"icmp and src {cluster.a.ip} and dst {internet.ip}") >= 1
    assert outside.count("net 10.244.0.0/16") == 0  # no pod address reached the outside
    assert at_pod_b.count(f"icmp and src {cluster.pod_a.address}") >= 1
    assert at_pod_b.count(f"icmp and src {cluster.a.ip}") == 0


def test_switching_never_vxlan_never_reprograms_routes_and_devices(underlay, tmp_path):
    """The dataplane half of a live mode switch (the agent's loop drives the same calls)."""
    cluster = one_subnet(underlay)
    native = f"{BLOCK_B} via {cluster.b.ip} dev eth0"
    for mode, route, encapsulated in (
            ("Never", native, False),
            ("Always", f"{BLOCK_B} via {VTEP_B} dev {VXLAN_DEVICE} onlink", True),
            ("Never", native, False)):
        cluster.program([pool(vxlan_mode=mode)])
        assert pipit_routes(cluster.a.ns)[1] == route
        assert exists(cluster.a.ns, VXLAN_DEVICE) == encapsulated
        with Capture(cluster.a.ns, "eth0", tmp_path) as wire:
            wait_ping(cluster.pod_a, cluster.pod_b.address)
        assert (wire.count("udp dst port 4789") > 0) == encapsulated, mode
