"""The encapsulation dataplane's kernel edges on this machine's kernel, in namespaces the tests
create: vxlan.pipit and its neighbour / FDB entries, uplink MTU detection, Pipit's nftables
table, the capability probe, and prepare / retire. tunl0 needs the ipip module, which this
kernel lacks: test_ipip_vm.py covers it, and here the missing module must be said clearly."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from ipam.pool import IPPool
from ipip import capability, conntrack, dataplane, encap, links, nat, tunnel, vxlan
from ipip.encap import IPIP, VXLAN, VXLAN_DEVICE, RemoteVTEP
from ipip.mtu import uplink
from lab.netns import Namespaces, ping
from tests.ipip_support import ECHO_PORT, flow, forwarding, ip, run, udp_echo, veth

pytestmark = pytest.mark.netns

LOCAL = IPv4Interface("192.168.1.10/24")
MAC = encap.vtep_mac("node-a")
PEER_1 = RemoteVTEP(IPv4Address("192.168.1.11"), IPv4Address("10.244.2.1"), "02:00:00:00:00:01")
PEER_2 = RemoteVTEP(IPv4Address("192.168.2.12"), IPv4Address("10.244.3.1"), "02:00:00:00:00:02")


@pytest.fixture
def ipip_node_netns():
    """A node namespace whose eth0 (MTU 9000) holds LOCAL."""
    with Namespaces() as namespaces:
        ns = namespaces.create("node")
        ip(ns, "link", "add", "eth0", "mtu", "9000", "type", "veth", "peer", "name", "peer0")
        ip(ns, "addr", "add", str(LOCAL), "dev", "eth0")
        ip(ns, "link", "set", "eth0", "up")
        yield ns


def ipr_in(ns: str) -> IPRoute:
    return IPRoute(netns=ns, flags=0)  # flags=0: never create the namespace


def link_json(ns: str, name: str) -> dict:
    return json.loads(ip(ns, "-j", "-d", "addr", "show", "dev", name))[0]


def vxlan_device(**changes) -> vxlan.Device:
    settings = dict(local=LOCAL.ip, vtep=IPv4Address("10.244.1.1"), mac=MAC, mtu=8950)
    return vxlan.Device(**{**settings, **changes})


def test_uplink_is_the_interface_holding_the_node_address(ipip_node_netns):
    with ipr_in(ipip_node_netns) as ipr:
        found = uplink(ipr, LOCAL.ip)
        assert (found.name, found.mtu) == ("eth0", 9000)
        with pytest.raises(LookupError, match="no interface holds the node address 10.9.9.9"):
            uplink(ipr, IPv4Address("10.9.9.9"))


def test_vxlan_device_is_created_as_asked_and_left_alone_when_right(ipip_node_netns):
    with ipr_in(ipip_node_netns) as ipr:
        index = vxlan.ensure(ipr, vxlan_device())
        assert vxlan.ensure(ipr, vxlan_device()) == index
    info = link_json(ipip_node_netns, VXLAN_DEVICE)
    data = info["linkinfo"]["info_data"]
    assert (data["id"], data["port"], data["local"], data["learning"]) == \
        (4096, 4789, "192.168.1.10", False)
    assert (info["address"], info["mtu"], "UP" in info["flags"]) == (MAC, 8950, True)
    assert [(a["local"], a["prefixlen"]) for a in info["addr_info"] if a["family"] == "inet"] \
        == [("10.244.1.1", 32)]


def test_vxlan_device_changes_in_place_or_is_recreated(ipip_node_netns):
    with ipr_in(ipip_node_netns) as ipr:
        index = vxlan.ensure(ipr, vxlan_device())
        # MTU, MAC and VTEP address change in place ...
        assert vxlan.ensure(ipr, vxlan_device(mtu=1400, mac="02:00:00:00:00:99",
                                              vtep=IPv4Address("10.244.1.5"))) == index
        ip(ipip_node_netns, "addr", "add", "10.9.9.9/32", "dev", VXLAN_DEVICE)  # stale: removed
        assert vxlan.ensure(ipr, vxlan_device(mtu=1400, mac="02:00:00:00:00:99",
                                              vtep=IPv4Address("10.244.1.5"))) == index
        info = link_json(ipip_node_netns, VXLAN_DEVICE)
        assert (info["mtu"], info["address"]) == (1400, "02:00:00:00:00:99")
        assert [a["local"] for a in info["addr_info"] if a["family"] == "inet"] == ["10.244.1.5"]
        # ... a new local address needs a new device.
        ip(ipip_node_netns, "addr", "add", "192.168.1.20/24", "dev", "eth0")
        assert vxlan.ensure(ipr, vxlan_device(local=IPv4Address("192.168.1.20"))) != index
    data = link_json(ipip_node_netns, VXLAN_DEVICE)["linkinfo"]["info_data"]
    assert data["local"] == "192.168.1.20"


def neighbours(ns: str) -> set[tuple[str, str, str]]:
    entries = json.loads(ip(ns, "-j", "neigh", "show", "dev", VXLAN_DEVICE))
    return {(e["dst"], e["lladdr"], ",".join(e["state"])) for e in entries}


def fdb(ns: str) -> set[tuple[str, str]]:
    entries = json.loads(run("bridge", "-n", ns, "-j", "fdb", "show", "dev", VXLAN_DEVICE).stdout)
    return {(e["mac"], e["dst"]) for e in entries if "dst" in e}


def test_vtep_entries_are_exactly_the_wanted_set(ipip_node_netns):
    with ipr_in(ipip_node_netns) as ipr:
        index = vxlan.ensure(ipr, vxlan_device())
        vxlan.set_vteps(ipr, index, [PEER_1, PEER_2])
        assert neighbours(ipip_node_netns) == {("10.244.2.1", "02:00:00:00:00:01", "PERMANENT"),
                                    ("10.244.3.1", "02:00:00:00:00:02", "PERMANENT")}
        assert fdb(ipip_node_netns) == {("02:00:00:00:00:01", "192.168.1.11"),
                             ("02:00:00:00:00:02", "192.168.2.12")}
        # peer 2 leaves, peer 1 moves to a new node address, a stray entry appears
        ip(ipip_node_netns, "neigh", "add", "10.244.7.7", "lladdr", "02:00:00:00:00:77", "dev",
           VXLAN_DEVICE)
        moved = RemoteVTEP(IPv4Address("192.168.1.99"), PEER_1.address, PEER_1.mac)
        vxlan.set_vteps(ipr, index, [moved])
        assert neighbours(ipip_node_netns) == {("10.244.2.1", "02:00:00:00:00:01", "PERMANENT")}
        assert fdb(ipip_node_netns) == {("02:00:00:00:00:01", "192.168.1.99")}
        vxlan.set_vteps(ipr, index, [])
        assert neighbours(ipip_node_netns) == set() and fdb(ipip_node_netns) == set()


def test_prepare_and_retire_vxlan(ipip_node_netns):
    desired = dataplane.Desired(local=LOCAL, kinds=frozenset({VXLAN}),
                                vtep_address=IPv4Address("10.244.1.1"), vtep_mac=MAC,
                                vteps=(PEER_1,))
    with ipr_in(ipip_node_netns) as ipr:
        prepared = dataplane.prepare(ipr, desired)
        assert prepared.devices.tunl0 is None and prepared.devices.vxlan is not None
        assert (prepared.uplink.name, prepared.pod_mtu) == ("eth0", 9000 - 50)
        assert link_json(ipip_node_netns, VXLAN_DEVICE)["mtu"] == 8950
        dataplane.retire(ipr, desired)  # still wanted: kept
        assert links.lookup(ipr, VXLAN_DEVICE) == prepared.devices.vxlan
        dataplane.retire(ipr, dataplane.Desired(local=LOCAL))
        assert links.lookup(ipr, VXLAN_DEVICE) is None
        # nothing to encapsulate: pods get the uplink's MTU, or the override
        assert dataplane.prepare(ipr, dataplane.Desired(local=LOCAL)).pod_mtu == 9000
        assert dataplane.prepare(ipr, dataplane.Desired(
            local=LOCAL, mtu_override=1400)).pod_mtu == 1400


def nft_tables(ns: str) -> list[str]:
    return run("ip", "netns", "exec", ns, "nft", "list", "tables").stdout.split("\n")[:-1]


def nft_table(ns: str) -> str:
    return run("ip", "netns", "exec", ns, "nft", "list", "table", "ip", "pipit-nat").stdout


def test_nat_table_is_rewritten_whole_and_nothing_else_is_touched(ipip_node_netns):
    run("ip", "netns", "exec", ipip_node_netns, "nft", "add table inet someone-else; "
        "add chain inet someone-else c { type filter hook forward priority 0; }")
    pools = [IPPool("a", IPv4Network("10.244.0.0/16"), nat_outgoing=True),
             IPPool("b", IPv4Network("10.10.0.0/16"))]
    nat.apply(pools, netns=ipip_node_netns)
    nat.apply(pools, netns=ipip_node_netns)  # idempotent
    assert "elements = { 10.244.0.0/16 }" in nft_table(ipip_node_netns)
    run("ip", "netns", "exec", ipip_node_netns, "nft", "add rule ip pipit-nat postrouting counter")
    nat.apply([IPPool("a", IPv4Network("10.244.0.0/16"), nat_outgoing=True)], netns=ipip_node_netns)
    table = nft_table(ipip_node_netns)
    assert "10.10.0.0/16" not in table and "counter" not in table  # rewritten whole
    nat.apply(pools[1:], netns=ipip_node_netns)  # no natOutgoing pool left: no table
    assert nft_tables(ipip_node_netns) == ["table inet someone-else"]
    nat.remove(netns=ipip_node_netns)  # already gone: fine
    assert nft_tables(ipip_node_netns) == ["table inet someone-else"]


# -- floating IPs -----------------------------------------------------------------------------
#
#   client eth0 192.168.50.2/24 --- eth0 192.168.50.1/24 [node] cali-pod --- eth0 [pod]
#   (routes the floating addresses                 (/32 route to the pod,    10.244.1.5/32,
#    via the node)                                  proxy ARP, forwarding)   default via node
#
# Nothing holds the floating addresses: only the node's DNAT makes them answer. A UDP echo in
# the pod answers each datagram with the source address it saw.

POD, CLIENT, NODE_ADDRESS = IPv4Address("10.244.1.5"), "192.168.50.2", "192.168.50.1"
FLOATING_LOW, FLOATING_HIGH = IPv4Address("10.244.9.8"), IPv4Address("10.244.9.9")
FLOATING = {FLOATING_HIGH: POD, FLOATING_LOW: POD}
ECHO_CLIENT = f"""\
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.5)
deadline = time.monotonic() + 5
while time.monotonic() < deadline:
    s.sendto(b"?", (sys.argv[1], {ECHO_PORT}))
    try:
        data, peer = s.recvfrom(100)
    except socket.timeout:
        continue
    print(peer[0], data.decode())
    break
"""


@dataclass
class FloatingLab:
    node: str
    pod: str
    client: str


@pytest.fixture
def floating_lab():
    with Namespaces() as namespaces:
        lab = FloatingLab(namespaces.create("node"), namespaces.create("pod"),
                          namespaces.create("client"))
        forwarding(lab.node)
        veth(lab.node, "eth0", lab.client, "eth0")
        ip(lab.node, "addr", "add", f"{NODE_ADDRESS}/24", "dev", "eth0")
        ip(lab.node, "route", "add", "default", "via", CLIENT)  # the node's way out
        ip(lab.client, "addr", "add", f"{CLIENT}/24", "dev", "eth0")
        for floating in FLOATING:
            ip(lab.client, "route", "add", f"{floating}/32", "via", NODE_ADDRESS)
        veth(lab.node, "cali-pod", lab.pod, "eth0")  # as Calico: no address on the node's end
        run("ip", "netns", "exec", lab.node, "sysctl", "-qw", "net.ipv4.conf.cali-pod.proxy_arp=1")
        ip(lab.node, "route", "add", f"{POD}/32", "dev", "cali-pod")
        ip(lab.pod, "addr", "add", f"{POD}/32", "dev", "eth0")
        ip(lab.pod, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
        ip(lab.pod, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
        with udp_echo(lab.pod):
            yield lab


def echo(ns: str, target: object) -> tuple[str, str]:
    """(the reply's source, the source the pod's echo saw) of one UDP exchange from `ns`."""
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", ECHO_CLIENT,
                          str(target)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout, f"no UDP echo from {target}: {out.stderr}"
    replied_from, seen = out.stdout.split()
    return replied_from, seen


def answers(ns: str, target: object) -> bool:
    """One ping, two seconds for the reply; the reply must come from `target` itself."""
    result = ping(ns, target, reply_wait=2, timeout=10)
    return result.returncode == 0 and f"from {target}:" in result.stdout


PLAIN_POOL = IPPool("pods", IPv4Network("10.244.0.0/16"))
NAT_POOL = IPPool("pods", IPv4Network("10.244.0.0/16"), nat_outgoing=True)


def test_floating_ip_reaches_its_pod_from_outside_and_from_the_node(floating_lab):
    lab = floating_lab
    assert not answers(lab.client, FLOATING_HIGH)  # nothing holds it
    nat.apply([PLAIN_POOL], floating=FLOATING, netns=lab.node)
    assert nft_tables(lab.node) == ["table ip pipit-nat"]
    # from elsewhere (prerouting): the pod sees the client itself, the client the floating IP
    assert answers(lab.client, FLOATING_HIGH) and answers(lab.client, FLOATING_LOW)
    assert echo(lab.client, FLOATING_HIGH) == (str(FLOATING_HIGH), CLIENT)
    assert echo(lab.client, FLOATING_LOW) == (str(FLOATING_LOW), CLIENT)
    # from the node's own processes (output)
    assert answers(lab.node, FLOATING_HIGH)
    assert echo(lab.node, FLOATING_HIGH) == (str(FLOATING_HIGH), NODE_ADDRESS)
    # the pod's own traffic keeps its address: the client sees 10.244.1.5, which it cannot
    # answer (no natOutgoing, and only the floating addresses route via the node)
    assert not answers(lab.pod, CLIENT)


def test_floating_ip_hairpin_comes_from_the_pods_lowest_floating_address(floating_lab):
    lab = floating_lab
    nat.apply([PLAIN_POOL], floating=FLOATING, netns=lab.node)
    assert answers(lab.pod, FLOATING_HIGH) and answers(lab.pod, FLOATING_LOW)
    assert echo(lab.pod, FLOATING_HIGH) == (str(FLOATING_HIGH), str(FLOATING_LOW))
    assert echo(lab.pod, FLOATING_LOW) == (str(FLOATING_LOW), str(FLOATING_LOW))


def test_floating_ips_go_with_the_rewrite_and_the_table_with_the_last(floating_lab):
    lab = floating_lab
    nat.apply([PLAIN_POOL], floating=FLOATING, netns=lab.node)
    assert answers(lab.client, FLOATING_HIGH) and answers(lab.client, FLOATING_LOW)
    nat.apply([PLAIN_POOL], floating={FLOATING_HIGH: POD}, netns=lab.node)
    assert answers(lab.client, FLOATING_HIGH) and not answers(lab.client, FLOATING_LOW)
    assert echo(lab.pod, FLOATING_HIGH) == (str(FLOATING_HIGH), str(FLOATING_HIGH))  # now lowest
    nat.apply([PLAIN_POOL], floating={}, netns=lab.node)
    assert nft_tables(lab.node) == []
    assert not answers(lab.client, FLOATING_HIGH) and not answers(lab.node, FLOATING_HIGH)


def entries_to(ns: str, address: IPv4Address) -> int:
    from pyroute2.conntrack import Conntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple
    table = Conntrack(netns=ns, flags=0)
    try:
        return len(list(table.dump_entries(tuple_orig=NFCTAttrTuple(daddr=str(address)))))
    finally:
        table.close()


def test_a_flow_to_a_floating_ip_that_leads_elsewhere_now_is_forgotten(floating_lab):
    """The kernel keeps a flow's NAT in its conntrack entry: a UDP stream to a floating IP
    taken away kept reaching the pod (and refreshed its entry with every datagram), and one
    seen before a floating IP came kept missing it, until the agent forgets the entries of the
    floating IPs that lead elsewhere; others are kept."""
    lab = floating_lab
    nat.apply([PLAIN_POOL], floating=FLOATING, netns=lab.node)
    assert flow(lab.client, FLOATING_LOW) == f"{FLOATING_LOW} {CLIENT}"
    assert flow(lab.client, FLOATING_HIGH) == f"{FLOATING_HIGH} {CLIENT}"
    after = {FLOATING_HIGH: POD}
    nat.apply([PLAIN_POOL], floating=after, netns=lab.node)
    assert not answers(lab.client, FLOATING_LOW)  # a new flow: no longer rewritten
    assert flow(lab.client, FLOATING_LOW) == f"{FLOATING_LOW} {CLIENT}"  # the old one: still
    kept = entries_to(lab.node, FLOATING_HIGH)
    assert conntrack.moved(FLOATING, after) == [FLOATING_LOW]
    assert conntrack.forget([FLOATING_LOW], netns=lab.node) >= 1  # and the ping's
    assert flow(lab.client, FLOATING_LOW) == "none"
    assert entries_to(lab.node, FLOATING_HIGH) == kept >= 1
    assert flow(lab.client, FLOATING_HIGH) == f"{FLOATING_HIGH} {CLIENT}"
    # and the other way: the flow seen while the address led nowhere (sent back out) keeps
    # going there once it leads to the pod again, until forgotten
    nat.apply([PLAIN_POOL], floating=FLOATING, netns=lab.node)
    assert flow(lab.client, FLOATING_LOW) == "none"
    assert conntrack.moved(after, FLOATING) == [FLOATING_LOW]
    assert conntrack.forget([FLOATING_LOW], netns=lab.node) >= 1
    assert flow(lab.client, FLOATING_LOW) == f"{FLOATING_LOW} {CLIENT}"


def test_floating_ips_and_nat_outgoing_together(floating_lab):
    lab = floating_lab
    nat.apply([NAT_POOL], floating=FLOATING, netns=lab.node)
    table = nft_table(lab.node)
    assert "ip saddr @nat-pools ip daddr != @all-pools masquerade" in table
    assert "elements = { 10.244.0.0/16 }" in table and "@floating-ips" in table
    # natOutgoing: the pod reaches the client as the node (the client has no route to the pod)
    assert answers(lab.pod, CLIENT)
    # floating IPs: still no SNAT on the way in, hairpin still the lowest floating address
    assert echo(lab.client, FLOATING_HIGH) == (str(FLOATING_HIGH), CLIENT)
    assert echo(lab.node, FLOATING_HIGH) == (str(FLOATING_HIGH), NODE_ADDRESS)
    assert echo(lab.pod, FLOATING_HIGH) == (str(FLOATING_HIGH), str(FLOATING_LOW))
    # no floating IPs left: natOutgoing's table as it always was
    nat.apply([NAT_POOL], floating={}, netns=lab.node)
    assert "floating" not in nft_table(lab.node) and answers(lab.pod, CLIENT)
    assert not answers(lab.client, FLOATING_HIGH)


def test_checksystem_says_what_this_kernel_does_and_what_needs_what_it_lacks():
    """`pipitctl node checksystem`, run in a namespace of the test's own: every check done for
    real and nothing left behind (no table, no device); what is missing named with what needs
    it, and exit 1."""
    with Namespaces() as namespaces:
        ns = namespaces.create("host")
        result = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "pipitctl",
                                 "node", "checksystem"], cwd=Path(__file__).parent.parent,
                                capture_output=True, text=True, timeout=60)
        rows = {cells[0]: cells[2] for line in result.stdout.splitlines()[1:]
                if len(cells := re.split(r"\s{2,}", line.strip())) == 3}
        has_ipip = capability.kernel_supports(IPIP)
        assert rows == {
            "ipip tunnels": "OK" if has_ipip else
            "MISSING: the ipip module is not available (modprobe ipip)",
            "vxlan tunnels": "OK", "nftables NAT": "OK", "conntrack over netlink": "OK",
            "TCP MD5 signatures": "OK"}, result.stdout
        if has_ipip:
            assert result.returncode == 0 and "does everything Pipit asks" in result.stdout
        else:
            assert result.returncode == 1
            assert result.stderr == ("Error: this host lacks ipip tunnels: pools with ipipMode "
                                     "Always or CrossSubnet cannot be used on it.\n")
        assert nft_tables(ns) == []
        assert [link["ifname"] for link in json.loads(ip(ns, "-j", "link", "show"))] == ["lo"]


def test_vxlan_is_supported_by_this_kernel():
    assert capability.kernel_supports(VXLAN)


def test_probe_leaves_no_device_behind():
    """Probed from a namespace of this test's own (as an agent probes from its node's), not
    the machine's, whose devices other runs change meanwhile."""
    with Namespaces() as namespaces:
        ns = namespaces.create("probe")
        before = run("ip", "-n", ns, "-o", "link").stdout
        probe = ("from ipip import capability; from ipip.encap import IPIP, VXLAN; "
                 "print(capability.kernel_supports(VXLAN), capability.kernel_supports(IPIP))")
        result = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", probe],
                                capture_output=True, text=True, timeout=60,
                                cwd=Path(__file__).resolve().parents[1])
        assert result.stdout.split()[:1] == ["True"], result  # the vxlan probe made one
        assert run("ip", "-n", ns, "-o", "link").stdout == before


@pytest.mark.skipif(capability.kernel_supports(IPIP),
                    reason="this kernel has ipip (test_ipip_vm.py covers IPIP)")
def test_missing_ipip_is_said_in_one_sentence_at_start_up_and_by_tunl0(ipip_node_netns):
    pools = [IPPool("edge", IPv4Network("10.1.0.0/16"), ipip_mode="Always"),
             IPPool("plain", IPv4Network("10.2.0.0/16"))]
    assert capability.check(pools) == [capability.message(IPIP, ["edge"])]
    with ipr_in(ipip_node_netns) as ipr, pytest.raises(links.DataplaneError, match="ipip module"):
        tunnel.ensure(ipr, IPv4Address("10.1.0.1"), 1480)
    with ipr_in(ipip_node_netns) as ipr:
        tunnel.disable(ipr)  # nothing to disable: fine
        # The agent's pass goes on without tunl0: VXLAN still set up, the error reported.
        prepared = dataplane.prepare(ipr, dataplane.Desired(
            local=LOCAL, kinds=frozenset({IPIP, VXLAN}), tunnel_address=IPv4Address("10.1.0.1"),
            vtep_mac=MAC))
    assert prepared.devices.tunl0 is None and prepared.devices.vxlan is not None
    assert len(prepared.errors) == 1 and "ipip module" in prepared.errors[0]
    # known missing (the agent's capability check said so): not tried, so not said again;
    # the pod MTU still leaves room for IPIP, for when the module comes
    with ipr_in(ipip_node_netns) as ipr:
        known = dataplane.prepare(ipr, dataplane.Desired(
            local=LOCAL, kinds=frozenset({IPIP, VXLAN}), tunnel_address=IPv4Address("10.1.0.1"),
            vtep_mac=MAC, unsupported=frozenset({IPIP})))
    assert known.errors == () and known.devices.tunl0 is None and known.devices.vxlan
    assert known.pod_mtu == prepared.pod_mtu


def test_tunl0_name_taken_by_another_kind_is_refused(ipip_node_netns):
    ip(ipip_node_netns, "link", "add", "tunl0", "type", "veth", "peer", "name", "tunl0-peer")
    with ipr_in(ipip_node_netns) as ipr, \
            pytest.raises(links.DataplaneError, match="not an ipip tunnel"):
        tunnel.ensure(ipr, None, 1480)



@pytest.mark.skipif(capability.kernel_supports(IPIP),
                    reason="this kernel has ipip (test_ipip_vm.py covers IPIP)")
def test_an_agent_whose_pool_needs_ipip_the_kernel_lacks_says_so_once(tmp_path):
    """The agent's status names the missing module in one sentence, not twice (once from the
    capability check, again from tunl0 failing to be made); routes go native meanwhile."""
    from lab.agent import NodeAgentProcess
    from lab.etcd import EtcdServer
    from lab.process import wait
    from tests.speaker_support import network

    state = tmp_path / "s"  # unix socket paths stay short
    state.mkdir()
    pool = ("apiVersion: pipit.dev/v1\nkind: IPPool\nmetadata: {name: edge}\n"
            "spec: {cidr: 10.244.0.0/16, blockSize: 26, ipipMode: Always}\n")
    with EtcdServer(data_dir=tmp_path / "etcd", unix_socket=True) as etcd, network(1) as net:
        subprocess.run([str(Path(sys.executable).parent / "pipitctl"), "--etcd-endpoints",
                        etcd.endpoint, "apply", "-f", "-"], input=pool, text=True, check=True,
                       capture_output=True)
        agent = NodeAgentProcess("node-1", net.node, state,
                                 f"unix://{tmp_path / 'etcd'}/etcd.sock:0",
                                 extra_args=["--ip", "10.99.1.1/24"])
        with agent:
            def problems():
                return ((agent.status() or {}).get("dataplane") or {}).get("problems")
            said = wait(problems, 30, "the dataplane's problems in the status")
    assert len(said) == 1 and "ipip" in said[0] and "edge" in said[0], said
