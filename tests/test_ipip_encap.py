"""The encapsulation dataplane's pure parts: which pool decides, next hops for Never / Always /
CrossSubnet with IPIP and VXLAN, tunnel address pools and handles, VTEP MACs, MTU arithmetic,
the natOutgoing ruleset and the capability sentence. No I/O."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bgp_agent import policy
from ipip.routes import NextHop, Route
from bgp_agent.model import Path
from ipam.pool import IPPool
from ipip import capability, conntrack, encap, mtu, nat
from ipip.encap import (
    ALWAYS,
    CROSS_SUBNET,
    IPIP,
    NATIVE,
    NEVER,
    VXLAN,
    Devices,
    Encap,
    RemoteVTEP,
)

A, N = IPv4Address, IPv4Network
LOCAL = IPv4Interface("192.168.1.10/24")
SAME_SUBNET, OTHER_SUBNET = A("192.168.1.11"), A("192.168.2.10")
DEVICES = Devices(tunl0=7, vxlan=9)
VTEPS = {gw: RemoteVTEP(gw, A(f"10.244.{i}.1"), f"02:00:00:00:00:0{i}")
         for i, gw in enumerate((SAME_SUBNET, OTHER_SUBNET), start=1)}


def pool(name: str, cidr: str, ipip: str = NEVER, vxlan: str = NEVER, **more) -> IPPool:
    return IPPool(name, N(cidr), ipip_mode=ipip, vxlan_mode=vxlan, **more)


# -- which encapsulation ----------------------------------------------------------------------

def test_the_pool_holding_a_prefix_decides_its_encapsulation():
    pools = [pool("plain", "10.1.0.0/16"), pool("tunnel", "10.2.0.0/16", ipip=ALWAYS),
             pool("overlay", "10.3.0.0/16", vxlan=CROSS_SUBNET)]
    assert encap.encapsulation_for(pools, N("10.1.4.0/26")) == NATIVE
    assert encap.encapsulation_for(pools, N("10.2.4.0/26")) == Encap(IPIP, ALWAYS)
    assert encap.encapsulation_for(pools, N("10.3.4.7/32")) == Encap(VXLAN, CROSS_SUBNET)
    assert encap.encapsulation_for(pools, N("172.16.0.0/24")) == NATIVE  # outside every pool


@pytest.mark.parametrize("kind, mode", [(None, ALWAYS), (IPIP, NEVER), ("gre", ALWAYS),
                                        (IPIP, "Sometimes")])
def test_invalid_encapsulations_are_refused(kind, mode):
    with pytest.raises(ValueError):
        Encap(kind, mode)


@pytest.mark.parametrize("mode, remote, expected", [
    (NEVER, OTHER_SUBNET, False),
    (ALWAYS, SAME_SUBNET, True),
    (ALWAYS, OTHER_SUBNET, True),
    (CROSS_SUBNET, SAME_SUBNET, False),
    (CROSS_SUBNET, OTHER_SUBNET, True),
])
def test_cross_subnet_encapsulates_only_outside_the_nodes_own_subnet(mode, remote, expected):
    how = NATIVE if mode == NEVER else Encap(IPIP, mode)
    assert encap.encapsulates(how, LOCAL, remote) is expected


# -- next hops --------------------------------------------------------------------------------

@pytest.mark.parametrize("how, gateway, expected", [
    (NATIVE, OTHER_SUBNET, NextHop(OTHER_SUBNET)),
    (Encap(IPIP, ALWAYS), SAME_SUBNET, NextHop(SAME_SUBNET, 7, onlink=True)),
    (Encap(IPIP, CROSS_SUBNET), SAME_SUBNET, NextHop(SAME_SUBNET)),
    (Encap(IPIP, CROSS_SUBNET), OTHER_SUBNET, NextHop(OTHER_SUBNET, 7, onlink=True)),
    (Encap(VXLAN, ALWAYS), SAME_SUBNET, NextHop(A("10.244.1.1"), 9, onlink=True)),
    (Encap(VXLAN, CROSS_SUBNET), SAME_SUBNET, NextHop(SAME_SUBNET)),
    (Encap(VXLAN, CROSS_SUBNET), OTHER_SUBNET, NextHop(A("10.244.2.1"), 9, onlink=True)),
])
def test_next_hop_per_mode(how, gateway, expected):
    assert encap.next_hop(how, LOCAL, gateway, DEVICES, VTEPS) == expected


def test_without_its_device_or_the_remote_vtep_the_next_hop_stays_native():
    assert encap.next_hop(Encap(IPIP, ALWAYS), LOCAL, OTHER_SUBNET, Devices(vxlan=9)) == \
        NextHop(OTHER_SUBNET)
    assert encap.next_hop(Encap(VXLAN, ALWAYS), LOCAL, OTHER_SUBNET, DEVICES, {}) == \
        NextHop(OTHER_SUBNET)


def test_route_next_hop_plugs_into_policy_kernel_routes():
    pools = [pool("tunnel", "10.2.0.0/16", ipip=CROSS_SUBNET),
             pool("overlay", "10.3.0.0/16", vxlan=ALWAYS), pool("plain", "10.1.0.0/16")]
    accepted = {gw: {N(f"10.{p}.{i}.0/26"): Path(N(f"10.{p}.{i}.0/26"), gw) for p in (1, 2, 3)}
                for i, gw in enumerate((SAME_SUBNET, OTHER_SUBNET), start=1)}
    routes = policy.kernel_routes(accepted, [N("10.1.9.0/26")], next_hop=encap.route_next_hop(
        pools, LOCAL, DEVICES, VTEPS.values()))
    tunl0 = lambda gw: (NextHop(gw, 7, onlink=True),)  # noqa: E731
    assert routes == {
        N("10.1.1.0/26"): Route(N("10.1.1.0/26"), (NextHop(SAME_SUBNET),)),
        N("10.1.2.0/26"): Route(N("10.1.2.0/26"), (NextHop(OTHER_SUBNET),)),
        N("10.2.1.0/26"): Route(N("10.2.1.0/26"), (NextHop(SAME_SUBNET),)),
        N("10.2.2.0/26"): Route(N("10.2.2.0/26"), tunl0(OTHER_SUBNET)),
        N("10.3.1.0/26"): Route(N("10.3.1.0/26"), (NextHop(A("10.244.1.1"), 9, onlink=True),)),
        N("10.3.2.0/26"): Route(N("10.3.2.0/26"), (NextHop(A("10.244.2.1"), 9, onlink=True),)),
        N("10.1.9.0/26"): Route(N("10.1.9.0/26"), blackhole=True),
    }


# -- devices and tunnel addresses -------------------------------------------------------------

def test_devices_are_needed_for_every_pool_that_uses_them_selected_or_not():
    pools = [pool("a", "10.1.0.0/16", ipip=CROSS_SUBNET, node_selector="rack == 'x'"),
             pool("b", "10.2.0.0/16", disabled=True, vxlan=ALWAYS), pool("c", "10.3.0.0/16")]
    assert encap.kinds_in_use(pools) == {IPIP, VXLAN}
    assert encap.kinds_in_use(pools[2:]) == set()


def test_tunnel_address_comes_from_enabled_pools_that_select_the_node_by_name():
    pools = [pool("z-ipip", "10.1.0.0/16", ipip=ALWAYS),
             pool("a-ipip", "10.2.0.0/16", ipip=CROSS_SUBNET, node_selector="rack == 'x'"),
             pool("off", "10.3.0.0/16", ipip=ALWAYS, disabled=True),
             pool("vx", "10.4.0.0/16", vxlan=ALWAYS)]
    assert [p.name for p in encap.tunnel_pools(pools, {"rack": "x"}, IPIP)] == ["a-ipip", "z-ipip"]
    assert [p.name for p in encap.tunnel_pools(pools, {"rack": "y"}, IPIP)] == ["z-ipip"]
    assert [p.name for p in encap.tunnel_pools(pools, {}, VXLAN)] == ["vx"]
    assert encap.tunnel_pools(pools[2:3], {}, IPIP) == []  # the address is released


def test_tunnel_handles_are_calicos():
    assert encap.tunnel_handle(IPIP, "n1") == "ipip-tunnel-addr-n1"
    assert encap.tunnel_handle(VXLAN, "n1") == "vxlan-tunnel-addr-n1"
    with pytest.raises(ValueError):
        encap.tunnel_handle("gre", "n1")


@given(st.text(min_size=1, max_size=63))
def test_vtep_mac_is_stable_unicast_and_locally_administered(node):
    mac = encap.vtep_mac(node)
    assert mac == encap.vtep_mac(node)
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01
    assert len(bytes.fromhex(mac.replace(":", ""))) == 6


def test_vtep_macs_differ_between_nodes():
    assert len({encap.vtep_mac(f"node-{i}") for i in range(1000)}) == 1000


# -- MTU --------------------------------------------------------------------------------------

def test_mtu_subtracts_the_encapsulation_overhead():
    assert mtu.tunnel_mtu(1500, IPIP) == 1480
    assert mtu.tunnel_mtu(9000, VXLAN) == 8950
    assert mtu.pod_mtu(1500, set()) == 1500
    assert mtu.pod_mtu(1500, {IPIP}) == 1480
    assert mtu.pod_mtu(1500, {IPIP, VXLAN}) == 1450  # the smallest over what is in use


def test_mtu_override_wins_and_nonsense_is_refused():
    assert mtu.tunnel_mtu(1500, IPIP, override=1400) == 1400
    assert mtu.pod_mtu(1500, {VXLAN}, override=1400) == 1400
    with pytest.raises(ValueError, match="below 576"):
        mtu.pod_mtu(600, {VXLAN})


def test_publish_writes_the_number(tmp_path):
    mtu.publish(tmp_path / "run" / "mtu", 1450)
    mtu.publish(tmp_path / "run" / "mtu", 1480)
    assert (tmp_path / "run" / "mtu").read_text() == "1480\n"
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["mtu"]


# -- natOutgoing ------------------------------------------------------------------------------

def test_nat_ruleset_masquerades_nat_pools_to_outside_all_pools():
    text = nat.ruleset([pool("out", "10.244.0.0/16", nat_outgoing=True),
                        pool("old", "10.9.0.0/16", nat_outgoing=True, disabled=True),
                        pool("inner", "10.100.0.0/16")])
    assert text.startswith("table ip pipit-nat\ndelete table ip pipit-nat\ntable ip pipit-nat {")
    assert "elements = { 10.9.0.0/16, 10.244.0.0/16 }" in text  # nat-pools, disabled included
    assert "elements = { 10.9.0.0/16, 10.100.0.0/16, 10.244.0.0/16 }" in text  # all-pools
    assert "ip saddr @nat-pools ip daddr != @all-pools masquerade" in text


def test_nat_ruleset_without_nat_pools_only_removes_the_table():
    assert nat.ruleset([pool("inner", "10.100.0.0/16")]) == \
        "table ip pipit-nat\ndelete table ip pipit-nat\n"


def test_nat_ruleset_lists_floating_ips_sorted_and_is_the_same_for_equal_inputs():
    many = {IPv4Address(f"10.244.{9 + i % 3}.{200 - i}"): IPv4Address(f"10.244.1.{i % 4 + 1}")
            for i in range(12)}
    shuffled = dict(sorted(many.items(), key=lambda item: hash(str(item[0]))))
    pods = [pool("pods", "10.244.0.0/16")]
    text = nat.ruleset(pods, many)
    assert text == nat.ruleset(pods, shuffled) == nat.ruleset(pods, dict(many))
    lines = text.splitlines()
    dnat = lines[lines.index("    map floating-ips {") + 2].strip()  # after its type line
    listed = [IPv4Address(pair.split(" : ")[0]) for pair in
              dnat.removeprefix("elements = { ").removesuffix(" }").split(", ")]
    assert listed == sorted(many)  # address order: 10.244.9.x before 10.244.10.x
    lowest = {pod: min(e for e, p in many.items() if p == pod) for pod in many.values()}
    assert ("elements = { " + ", ".join(f"{pod} . {pod} : {lowest[pod]}" for pod in
                                        sorted(lowest)) + " }") in text
    assert "dnat to ip daddr map @floating-ips" in text and "masquerade" not in text
    # floating IPs alone make the table; natOutgoing alone is as it always was
    assert nat.ruleset(pods, {}) == "table ip pipit-nat\ndelete table ip pipit-nat\n"
    assert "floating" not in nat.ruleset([pool("pods", "10.244.0.0/16", nat_outgoing=True)])


def test_the_flows_forgotten_are_those_of_floating_ips_gone_moved_or_new():
    a, b, c, d = (IPv4Address(f"10.244.9.{i}") for i in (1, 2, 3, 4))
    pod1, pod2 = IPv4Address("10.244.1.5"), IPv4Address("10.244.1.6")
    assert conntrack.moved({a: pod1, b: pod1, c: pod1}, {a: pod1, b: pod2, d: pod2}) == [b, c, d]
    assert conntrack.moved({}, {a: pod1}) == [a] and conntrack.moved({a: pod1}, {a: pod1}) == []


# -- capability -------------------------------------------------------------------------------

def test_capability_sentence_names_the_module_and_the_pools():
    pools = [pool("edge", "10.1.0.0/16", ipip=ALWAYS), pool("rack", "10.2.0.0/16",
             ipip=CROSS_SUBNET), pool("vx", "10.3.0.0/16", vxlan=ALWAYS), pool("p", "10.4.0.0/16")]
    assert capability.check(pools, supports=lambda kind: kind == VXLAN) == [
        "This kernel cannot create ipip tunnels (the ipip module is not available), which IP "
        "pools 'edge' and 'rack' need for ipipMode: load it with 'modprobe ipip' or set their "
        "ipipMode to Never."]
    assert capability.check(pools, supports=lambda kind: kind == IPIP) == [
        "This kernel cannot create vxlan tunnels (the vxlan module is not available), which IP "
        "pool 'vx' needs for vxlanMode: load it with 'modprobe vxlan' or set its vxlanMode to "
        "Never."]
    assert capability.check(pools, supports=lambda kind: True) == []
    asked = []
    assert capability.check(pools[3:], supports=asked.append) == [] and asked == []
