"""End to end: a lab cluster (etcd, nodes as namespaces running pipit-agent and ExaBGP, pods
attached with the real ptp plugin) does what a user relies on. The tests share one lab and
run in order: mesh, foreign routes, agent restart, a node joining, a node leaving, switching
the pool's encapsulation, a VXLAN pool that selects no node, a mesh password."""

import ipaddress
import json
import os
import signal
import subprocess
import time

import pytest

from ipam.snapshot import Snapshot, load_snapshot, lookup
from ipam.store import EtcdConfig
from ipip import capability
from ipip.encap import IPIP
from lab import netns
from lab.cluster import Lab
from lab.process import alive, wait
from tests.helpers import assert_pods_reach_each_other, pinging, running_lab, with_store

pytestmark = [pytest.mark.slow, pytest.mark.lab]
FOREIGN = ["192.0.2.0/24 via 10.99.0.254 proto static", "198.51.100.0/24 via 10.99.0.254 proto 12",
           "blackhole 203.0.113.0/24"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with running_lab(tmp_path_factory.mktemp("lab"), "lab", node_count=3, pods_per_node=2,
                     hold_time=6, restart_time=20) as cluster:
        for node in cluster.nodes():  # routes of other daemons, which Pipit must never touch
            for route in FOREIGN:
                subprocess.run(["ip", "-n", cluster.node_ns(node), "route", "add", *route.split()],
                               check=True)
        yield cluster


def foreign_routes(lab: Lab, node: str) -> list[str]:
    out = subprocess.run(["ip", "-n", lab.node_ns(node), "route", "show"], capture_output=True,
                         text=True, check=True).stdout
    foreign = {"192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"}
    return sorted(line.strip() for line in out.splitlines() if set(line.split()) & foreign)


def own_blocks(lab: Lab, node: str) -> set[str]:
    return {p for p, hop in lab.pipit_routes(node).items() if hop == "blackhole"}


def peer_since(lab: Lab, node: str) -> dict[str, float]:
    return {p["name"]: p["since"] for p in lab.status(node)["peers"]}


def test_full_mesh_routes_every_pod_to_every_pod(lab):
    assert_pods_reach_each_other(lab)
    nodes = lab.nodes()
    for node in nodes:
        routes = lab.pipit_routes(node)
        own = own_blocks(lab, node)
        assert own, f"{node} has no blackhole for its own block"
        for other in set(nodes) - {node}:
            address = str(lab.node_ip(other))
            for block in own_blocks(lab, other):
                assert routes.get(block) == address, f"{node} lacks {block} via {other}"
        for pod in lab.all_pods():  # every pod address is inside a block routed somewhere
            assert any(ipaddress.ip_address(pod.address) in ipaddress.ip_network(p)
                       for p in routes)


EXPECTED_FOREIGN = ["192.0.2.0/24 via 10.99.0.254 dev eth0 proto static",
                    "198.51.100.0/24 via 10.99.0.254 dev eth0 proto bird",
                    "blackhole 203.0.113.0/24"]


def test_routes_of_other_daemons_are_untouched(lab):
    for node in lab.nodes():
        assert foreign_routes(lab, node) == EXPECTED_FOREIGN


def test_agent_sigkill_and_restart_changes_no_route_and_resets_no_session(lab):
    node = "n1"
    before_routes = {n: lab.pipit_routes(n) for n in lab.nodes()}
    before_since = {n: peer_since(lab, n) for n in lab.nodes()}
    lab.stop_agent(node, signal.SIGKILL)
    # While the agent is away, forwarding goes on.
    assert {n: lab.pipit_routes(n) for n in lab.nodes()} == before_routes
    lab.start_agent(node)
    wait(lambda: lab.status(node)["speakerConnected"], 30, "the restarted agent's speaker")
    lab.wait_mesh()
    assert {n: lab.pipit_routes(n) for n in lab.nodes()} == before_routes
    # Same sessions: every peer's "up since" is what it was (no reset on either side).
    assert {n: peer_since(lab, n) for n in lab.nodes()} == before_since
    assert_pods_reach_each_other(lab)
    for n in lab.nodes():
        assert foreign_routes(lab, n) == EXPECTED_FOREIGN


def test_exabgp_killed_costs_no_route_and_no_ping_while_its_agent_starts_another(lab):
    """The speaker dying is one process dying: the node keeps its kernel routes, the others
    keep its blocks through graceful restart, the agent starts a new ExaBGP, the sessions
    come back, and pods talking across the node lose nothing."""
    node = "n1"
    before = {n: lab.pipit_routes(n) for n in lab.nodes()}
    pid_file = lab.node_dir(node) / "exabgp" / "exabgp.pid"
    first = int(pid_file.read_text())
    since = peer_since(lab, node)
    with pinging(lab, "n2", node, seconds=6) as lost_in, \
            pinging(lab, node, "n3", seconds=6) as lost_out:
        os.kill(first, signal.SIGKILL)
        wait(lambda: int(pid_file.read_text()) != first, 20, "the agent's new ExaBGP")
        wait(lambda: (now := peer_since(lab, node)).keys() == since.keys()
             and all(now[p] != since[p] for p in since)
             and all(p["state"] == "up" for p in lab.status(node)["peers"]), 30,
             f"{node}'s sessions back, new ones")
        assert {n: lab.pipit_routes(n) for n in lab.nodes()} == before
    assert lost_in() == 0 and lost_out() == 0
    assert "ExaBGP (pid %d) exited" % first in (lab.node_dir(node) / "agent.log").read_text()


def test_a_gtsm_peer_leaves_the_mesh_sessions_other_nodes_open_to_this_one(lab, tmp_path):
    """ttlSecurity on a BGPPeer to an edge router (BIRD, `ttl security on`): its sessions come
    up, and the mesh sessions the other nodes open to this node (TTL 64) still come up when
    they start over: ExaBGP put GTSM's minimum TTL on the listening socket every neighbour
    shares, which dropped their SYNs (pipit-exabgp fix 6 checks each connection instead)."""
    from ipaddress import IPv4Interface

    from lab.routers import RouterPeer, RouterSpec, make_router
    edge_address = IPv4Interface("10.99.0.250/24")
    nodes = sorted(lab.nodes(), key=lab.node_ip)
    spec = RouterSpec("edge", edge_address.ip, 65100, tuple(
        RouterPeer(n, lab.node_ip(n), 64512, local_address=edge_address.ip, hold_time=9,
                   ttl_security=True) for n in nodes), kernel=False)
    edge = make_router("bird", spec, lab.attach("edge", edge_address), tmp_path / "edge")
    edge.start()
    peer = ("apiVersion: pipit.dev/v1\nkind: BGPPeer\nmetadata: {name: edge}\n"
            "spec: {peerIP: 10.99.0.250, asNumber: 65100, ttlSecurity: 1}\n")
    try:
        assert lab.pipitctl("apply", "-f", "-", input=peer).returncode == 0
        for node in nodes:
            wait(lambda node=node: edge.established(lab.node_ip(node)), 30,
                 f"the edge's GTSM session with {node}")
        middle = nodes[1]  # the lower node waits for it; it waits for the higher one
        since = peer_since(lab, middle)
        pid_file = lab.node_dir(middle) / "exabgp" / "exabgp.pid"
        first = int(pid_file.read_text())
        os.kill(first, signal.SIGKILL)
        wait(lambda: int(pid_file.read_text()) != first, 20, f"{middle}'s new ExaBGP")
        wait(lambda: (now := peer_since(lab, middle)).keys() == since.keys()
             and all(now[p] != since[p] for p in since)
             and all(p["state"] == "up" for p in lab.status(middle)["peers"]), 30,
             f"{middle}'s mesh and edge sessions back, new ones")
        assert_pods_reach_each_other(lab)
    finally:
        lab.pipitctl("delete", "bgppeer", "edge", "--skip-not-exists")
        edge.destroy()


def test_a_fourth_node_joins_and_is_reachable_from_all_pods(lab):
    lab.add_node("n4")
    lab.wait_mesh()
    pod = lab.add_pod("n4", "n4-p1")
    [block] = own_blocks(lab, "n4")
    assert ipaddress.ip_address(pod.address) in ipaddress.ip_network(block)
    for node in ("n1", "n2", "n3"):
        wait(lambda node=node: lab.pipit_routes(node).get(block) == "10.99.0.14", 20,
             f"{node} to learn {block}")
    assert_pods_reach_each_other(lab)


def test_a_node_leaving_is_forgotten_by_the_others_within_the_hold_time(lab):
    leaving = "n4"
    [block] = own_blocks(lab, leaving)
    lab.stop_agent(leaving, signal.SIGTERM)  # retires: withdraws, stops its ExaBGP
    assert not netns.pids(lab.node_ns(leaving)), "processes left on the node"
    others = ("n1", "n2", "n3")  # one wait for all: its deadline is the check
    wait(lambda: all(block not in lab.pipit_routes(node) for node in others),
         lab.hold_time + 2, f"n1, n2 and n3 to drop {block}")
    for node in others:
        assert foreign_routes(lab, node) == EXPECTED_FOREIGN
    lab.remove_node(leaving)
    assert leaving not in lab.nodes() and all(p.node != leaving for p in lab.all_pods())


def test_a_node_readdressed_is_followed_by_the_mesh_once_its_agent_restarts(lab):
    """An address given with --ip: a node whose address changes gets a restart of its agent
    as a DaemonSet gives it (SIGUSR1/`--sigterm exit`: ExaBGP and the kernel's routes left to
    the next agent), which registers the new address; every other node then peers with the
    new one and routes its blocks there, and no pod loses another."""
    node, new = "n3", ipaddress.IPv4Interface("10.99.0.33/24")
    old = lab.node_record(node)["address"]  # 10.99.0.13/24
    lab.stop_agent(node, signal.SIGUSR1)
    readdress(lab, node, old, new)
    lab.start_agent(node)
    assert_the_mesh_follows(lab, node, old, new)


def test_a_node_readdressed_is_followed_by_the_mesh_without_a_restart(lab):
    """An address detected (as calico-node looks again every AUTODETECT_POLL_INTERVAL): the
    running agent finds the new address, registers it and moves its sessions there; every
    other node follows and no pod loses another."""
    node, new = "n3", ipaddress.IPv4Interface("10.99.0.43/24")
    lab.stop_agent(node, signal.SIGUSR1)
    nodes = lab._state()["nodes"]
    nodes[node]["detect"] = "interface=eth0"
    lab._save(nodes=nodes)
    lab.start_agent(node)
    old, pid = lab.node_record(node)["address"], lab._agent_pid(node)
    readdress(lab, node, old, new)
    assert_the_mesh_follows(lab, node, old, new)
    assert lab._agent_pid(node) == pid and alive(pid)
    log = (lab.node_dir(node) / "agent.log").read_text()
    assert f"node {node} moves to its new address {new}" in log


def readdress(lab, node: str, old: str, new: ipaddress.IPv4Interface) -> None:
    """The node's address on the fabric changes (the old one removed first, as a DHCP
    renewal with a new lease would)."""
    ns = lab.node_ns(node)
    subprocess.run(["ip", "-n", ns, "addr", "del", old, "dev", "eth0"], check=True)
    subprocess.run(["ip", "-n", ns, "addr", "add", str(new), "dev", "eth0"], check=True)
    nodes = lab._state()["nodes"]
    nodes[node]["address"] = str(new)
    lab._save(nodes=nodes)


def assert_the_mesh_follows(lab, node: str, old: str, new: ipaddress.IPv4Interface) -> None:
    def stored() -> str:
        result = lab.pipitctl("get", "node", node, "-o", "json")
        return json.loads(result.stdout)["spec"]["bgp"]["ipv4Address"]
    wait(lambda: stored() == str(new), 30, f"{node}'s record in etcd to hold {new}")
    blocks = own_blocks(lab, node)
    others = [n for n in lab.nodes() if n != node]
    try:
        wait(lambda: all(lab.pipit_routes(n).get(b) == str(new.ip) for n in others
                         for b in blocks), 30, f"the other nodes to route {node}'s blocks to "
                                               f"{new.ip}")
    except TimeoutError as error:
        raise AssertionError(f"{error}:\n{lab_state(lab, node)}") from None

    def sessions(n: str) -> dict[str, str]:
        return {p["address"]: p["state"] for p in (lab.status(n) or {}).get("peers", [])}
    wait(lambda: all(sessions(n).get(str(new.ip)) == "up" for n in others)
         and all(sessions(node).get(str(lab.node_ip(n))) == "up" for n in others), 30,
         f"sessions between {node} at its new address and the others")
    assert all(old.split("/")[0] not in sessions(n) for n in others)  # the old peer is gone
    assert_pods_reach_each_other(lab)


def lab_state(lab, node: str) -> str:
    """What a failing lab test needs to be understood: every node's routes and sessions, and
    `node`'s log."""
    lines = []
    for n in lab.nodes():
        status = lab.status(n) or {}
        peers = [(p["address"], p["state"], p.get("received"), p.get("exported"))
                 for p in status.get("peers", [])]
        lines.append(f"{n}: routes {lab.pipit_routes(n)}; peers {peers}")
    log = (lab.node_dir(node) / "agent.log").read_text().splitlines()
    return "\n".join(lines + [f"{node}'s log:"] + log[-40:])


def ipam_snapshot(lab: Lab) -> Snapshot:
    return with_store(EtcdConfig((lab.etcd_host_endpoint,)), load_snapshot)


def holder(snap: Snapshot, address: str) -> str | None:
    """The handle holding an address in etcd (None: free)."""
    attribute = lookup(snap, ipaddress.IPv4Address(address)).holder
    return attribute.handle_id if attribute else None


def set_pool_mode(lab: Lab, **mode: str) -> None:
    spec = ", ".join(f"{k}: {v}" for k, v in mode.items())
    result = lab.pipitctl("apply", "-f", "-", input=(
        "apiVersion: pipit.dev/v1\nkind: IPPool\nmetadata: {name: default}\n"
        f"spec: {{cidr: 10.244.0.0/16, blockSize: 26, {spec}}}\n"))
    assert result.returncode == 0, result.stderr


def remote_route_devices(lab: Lab, node: str) -> set[str]:
    return {r.get("dev") for r in lab.kernel_routes(node) if r.get("type") != "blackhole"}


def vxlan_packets_on_the_fabric(lab: Lab, source, target) -> bool:
    """Whether a ping between two pods crosses the fabric bridge as VXLAN (UDP 4789)."""
    capture = subprocess.Popen([*netns.exec_prefix(lab.fabric), "tcpdump", "-i", "br0", "-c",
                                "1", "-n", "udp port 4789"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        wait(lambda: lab.ping(source, target) and capture.poll() is not None, 20,
             "a VXLAN packet on the fabric")
        return "4789" in capture.stdout.read() if capture.stdout else False
    finally:
        capture.kill()
        capture.wait()


def test_switching_encapsulation_on_a_live_lab_keeps_pods_connected(lab):
    nodes = lab.nodes()
    pods = lab.all_pods()
    # Never -> VXLAN: every route to another node's block moves onto vxlan.pipit.
    set_pool_mode(lab, vxlanMode="Always")
    for node in nodes:
        wait(lambda node=node: remote_route_devices(lab, node) == {"vxlan.pipit"}, 30,
             f"{node}'s routes to move onto vxlan.pipit")
        status = lab.status(node)["dataplane"]
        assert status["kinds"] == ["vxlan"] and status["vxlanTunnelAddress"]
        assert status["podMTU"] == 1450 and (lab.node_dir(node) / "pod-mtu").read_text() == "1450\n"
    assert_pods_reach_each_other(lab)
    a, b = next(p for p in pods if p.node == "n1"), next(p for p in pods if p.node == "n2")
    assert vxlan_packets_on_the_fabric(lab, a, b)
    vteps = {node: lab.status(node)["dataplane"]["vxlanTunnelAddress"] for node in nodes}
    snap = ipam_snapshot(lab)
    assert {node: holder(snap, vteps[node]) for node in nodes} == {
        node: f"vxlan-tunnel-addr-{node}" for node in nodes}
    # VXLAN -> Never: native again, the VTEP device gone and its address released.
    set_pool_mode(lab, vxlanMode="Never")
    for node in nodes:
        wait(lambda node=node: remote_route_devices(lab, node) == {"eth0"}, 30,
             f"{node}'s routes to go native")
        wait(lambda node=node: not netns.exists(lab.node_ns(node)) or subprocess.run(
            ["ip", "-n", lab.node_ns(node), "link", "show", "vxlan.pipit"],
            capture_output=True).returncode != 0, 30, f"{node}'s vxlan.pipit to go")
    shown = lab.pipitctl("get", "nodes", "-o", "yaml").stdout
    assert "ipv4VXLANTunnelAddr" not in shown

    def released() -> bool:  # no tunnel handle left, each node's tunnel address free
        snap = ipam_snapshot(lab)
        return (not [h for h in snap.handles if h.startswith("vxlan-tunnel-addr-")]
                and all(holder(snap, address) is None for address in vteps.values()))
    wait(released, 30, "the VXLAN tunnel addresses to be released")
    assert_pods_reach_each_other(lab)
    # IPIP: this machine's kernel has no ipip module, so the agents say so, naming the pool
    # (the IPIP dataplane itself is proven in a VM: tests/test_ipip_vm.py) and keep routing.
    set_pool_mode(lab, ipipMode="Always")
    if capability.kernel_supports(IPIP):  # another kernel: tunl0 carries the routes
        wait(lambda: remote_route_devices(lab, "n1") == {"tunl0"}, 30, "n1 to use tunl0")
    else:
        problems = wait(lambda: lab.status("n1")["dataplane"]["problems"], 30,
                        "n1 to say it cannot take up ipipMode")
        assert capability.message(IPIP, ["default"]) in problems
        assert all("ipip" in problem for problem in problems), problems
    assert_pods_reach_each_other(lab)
    set_pool_mode(lab, ipipMode="Never")
    for node in nodes:
        wait(lambda node=node: not lab.status(node)["dataplane"]["problems"], 30,
             f"{node} to forget ipip")
    assert_pods_reach_each_other(lab)


EDGE_POOL = """\
apiVersion: pipit.dev/v1
kind: IPPool
metadata: {name: edge}
spec: {cidr: 10.245.0.0/16, vxlanMode: Always, nodeSelector: "rack == 'nowhere'"}
"""


def dataplane_of(lab: Lab, node: str) -> dict:
    return (lab.status(node) or {}).get("dataplane") or {}


def test_a_vxlan_pool_that_selects_no_node_stops_no_node_from_routing(lab):
    def took_up_edge(node: str) -> dict | None:  # VXLAN in use: vxlan.pipit reaches its blocks
        dataplane = dataplane_of(lab, node)
        return dataplane if "vxlan" in dataplane.get("kinds", []) else None

    result = lab.pipitctl("apply", "-f", "-", input=EDGE_POOL)
    assert result.returncode == 0, result.stderr
    try:
        for node in lab.nodes():
            dataplane = wait(lambda node=node: took_up_edge(node), 30,
                             f"{node} to take up pool edge")
            assert not dataplane["problems"], f"{node}: {dataplane['problems']}"
        assert_pods_reach_each_other(lab)
    finally:
        result = lab.pipitctl("delete", "ippool", "edge")
        assert result.returncode == 0, result.stderr
    for node in lab.nodes():
        wait(lambda node=node: not dataplane_of(lab, node).get("kinds"), 30,
             f"{node} to forget pool edge")


VTEP_POOL = """\
apiVersion: pipit.dev/v1
kind: IPPool
metadata: {name: a-vteps}
spec: {cidr: 10.246.0.0/24, blockSize: 29, vxlanMode: Always, allowedUses: [Tunnel]}
"""


def test_vteps_come_from_a_tunnel_only_pool_and_pods_never_do(lab):
    """Calico's allowedUses: with a VXLAN pool for tunnel addresses only, every node's VTEP
    address comes from it, while the pods keep theirs from the default pool (Never: native)
    and reach each other; the pool deleted, the VTEPs go and their addresses are freed."""
    vteps = ipaddress.IPv4Network("10.246.0.0/24")
    result = lab.pipitctl("apply", "-f", "-", input=VTEP_POOL)
    assert result.returncode == 0, result.stderr
    try:
        addresses = {}
        for node in lab.nodes():
            addresses[node] = wait(
                lambda node=node: dataplane_of(lab, node).get("vxlanTunnelAddress"), 30,
                f"{node}'s VTEP address")
            assert ipaddress.IPv4Address(addresses[node]) in vteps
        snap = ipam_snapshot(lab)
        assert {node: holder(snap, a) for node, a in addresses.items()} == {
            node: f"vxlan-tunnel-addr-{node}" for node in addresses}
        assert not [p for p in lab.all_pods()
                    if ipaddress.IPv4Interface(p.address).ip in vteps]
        assert_pods_reach_each_other(lab)
    finally:
        result = lab.pipitctl("delete", "ippool", "a-vteps", "--force")
        assert result.returncode == 0, result.stderr
    for node in lab.nodes():
        wait(lambda node=node: not dataplane_of(lab, node).get("kinds"), 30,
             f"{node} to forget its VTEP")


def bgp_segments(lab: Lab, node: str, directory, count: int = 6) -> list[str]:
    """BGP segments with data (keepalives every hold_time / 3) on the node's fabric link,
    as tcpdump prints them: their TCP options show a TCP MD5 signature as `md5`."""
    from tests.ipip_support import Capture
    directory.mkdir(parents=True, exist_ok=True)
    with Capture(lab.node_ns(node), "eth0", directory) as wire:
        wait(lambda: wire.path.exists() and wire.path.stat().st_size > 24 + 100 * count,
             lab.hold_time * 2, f"{count} BGP segments on {node}'s link")
    return wire.packets("tcp port 179 and tcp[tcpflags] & tcp-push != 0")


def mesh_up_since(lab: Lab, moment: float, of: set[str] | None = None) -> bool:
    """Every session between the lab's nodes up, those of the nodes `of` (default: all) again
    since `moment` (a node that left earlier may still have a record, and a session that
    stays down)."""
    nodes = set(lab.nodes())
    for n in nodes:
        peers = {p["name"]: p for p in (lab.status(n) or {}).get("peers", [])}
        if not all(o in peers and peers[o]["state"] == "up" and (
                peers[o]["since"] > moment or not {n, o} & (nodes if of is None else of))
                for o in nodes - {n}):
            return False
    return True


def bgp_signed_everywhere(lab: Lab, node: str, directory, signed: bool, timeout: float
                          ) -> list[str]:
    """Capture windows of the node's BGP segments until one holds only signed ones (or only
    unsigned ones): while the agents take a new password up one after the other, a session
    can come up the old way for a moment and be closed again. The last window."""
    windows = iter(range(1000))

    def settled():
        segments = bgp_segments(lab, node, directory / f"window-{next(windows)}")
        if segments and all(("md5" in s) == signed for s in segments):
            return segments
        return None
    return wait(settled, timeout, f"{node}'s BGP segments all {'un' if not signed else ''}"
                                  "signed")


def test_a_mesh_password_signs_every_mesh_session_and_taking_it_away_unsigns_them(lab, tmp_path):
    """nodeMeshPassword, as Calico's: every mesh session carries a TCP MD5 signature (seen on
    the wire), the mesh comes back up with it and pods still reach each other; without it the
    sessions are plain again."""
    secret = lab.directory / "mesh.secret"  # the lab's agents share one file system
    secret.write_text("mesh-md5-secret\n")
    shown = lab.pipitctl("get", "bgpconfig", "default", "-o", "json")
    assert shown.returncode == 0, shown.stderr
    config = json.loads(shown.stdout)
    config["metadata"].pop("resourceVersion", None)
    signed = json.loads(json.dumps(config))
    signed["spec"]["nodeMeshPassword"] = {"file": str(secret)}

    def reconnected_since(moment: float) -> bool:
        return mesh_up_since(lab, moment)

    def sessions() -> str:
        return "; ".join(f"{n}: " + ", ".join(
            f"{p['name']} {p['state']} since {p['since']:.1f} {p['reason']}".strip()
            for p in (lab.status(n) or {}).get("peers", [])) for n in lab.nodes())

    before = time.time()
    result = lab.pipitctl("apply", "-f", "-", input=json.dumps(signed))
    assert result.returncode == 0, result.stderr
    try:
        try:
            wait(lambda: reconnected_since(before), 90, "every mesh session to come up signed")
        except TimeoutError:
            raise AssertionError(f"applied at {before:.1f}; sessions: {sessions()}") from None
        bgp_signed_everywhere(lab, "n1", tmp_path / "signed", True, 60)
        wait(lambda: reconnected_since(before), 30, "every mesh session up, signed")
        assert_pods_reach_each_other(lab)
    finally:
        moment = time.time()
        result = lab.pipitctl("apply", "-f", "-", input=json.dumps(config))
        assert result.returncode == 0, result.stderr
    wait(lambda: reconnected_since(moment), 90, "every mesh session to come up unsigned")
    bgp_signed_everywhere(lab, "n1", tmp_path / "unsigned", False, 60)
    wait(lambda: reconnected_since(moment), 30, "every mesh session up, unsigned")


def listening(lab: Lab, node: str, port: int) -> bool:
    out = subprocess.run(["ip", "netns", "exec", lab.node_ns(node), "ss", "-Hltn",
                          f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return bool(out.strip())


def test_a_nodes_own_listen_port_is_where_it_listens_and_the_mesh_connects(lab):
    """Calico's node-specific BGPConfiguration (node.<name>) with listenPort: n2's ExaBGP
    listens there and no longer on 179, every mesh session comes back (the others connect to
    n2 there) and pods reach each other; deleted, n2 is back on the cluster's port."""
    moment = time.time()
    result = lab.pipitctl("apply", "-f", "-", input="apiVersion: pipit.dev/v1\n"
                          "kind: BGPConfiguration\nmetadata: {name: node.n2}\n"
                          "spec: {listenPort: 1179}\n")
    assert result.returncode == 0, result.stderr
    try:
        wait(lambda: listening(lab, "n2", 1179) and not listening(lab, "n2", 179)
             and mesh_up_since(lab, moment, {"n2"}), 90,
             "n2 to listen on 1179 and its mesh sessions to come back")
        assert all(listening(lab, n, 179) for n in set(lab.nodes()) - {"n2"})
        assert_pods_reach_each_other(lab)
    finally:
        moment = time.time()
        lab.pipitctl("delete", "bgpconfig", "node.n2")
    wait(lambda: listening(lab, "n2", 179) and mesh_up_since(lab, moment, {"n2"}), 90,
         "n2 back on port 179 with its mesh sessions")
