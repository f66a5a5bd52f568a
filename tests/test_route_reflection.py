"""Route reflectors end to end (lab topology rr): nodes whose only sessions are to two
reflectors reach each other's pods, whether the reflectors are Pipit's (`pipit-rr`) or BIRD 2
listening on port 1179; a reflector killed costs no ping and no route; both killed, routes
are held for the graceful-restart time; a BIRD client of Pipit's reflectors learns the pod
blocks; a cluster moves from the mesh to reflectors without losing a ping; a client peering
with only part of a cluster's reflectors is warned about."""

from __future__ import annotations

import json
import os
import signal
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from lab import netns
from lab.bird import Bird, BirdPeer, bgp_config
from lab.cluster import CLUSTER_ID, Lab
from lab.process import wait
from tests.helpers import assert_pods_reach_each_other, pinging, running_lab

pytestmark = [pytest.mark.slow, pytest.mark.lab]
HOLD, RESTART = 6, 20


def three_node_lab(tmp_path_factory, name: str, **options):
    """A running lab of three nodes with one pod each (a context manager)."""
    return running_lab(tmp_path_factory.mktemp(name), name, node_count=3, pods_per_node=1,
                       hold_time=HOLD, restart_time=RESTART, **options)


@pytest.fixture(scope="module")
def rr_lab(tmp_path_factory):
    with three_node_lab(tmp_path_factory, "rr", topology="rr") as lab:
        yield lab


def address(lab: Lab, node: str) -> IPv4Address:
    return lab.node_ip(node)


def learned(lab: Lab, node: str) -> dict[str, str]:
    return {p: hop for p, hop in lab.pipit_routes(node).items() if hop != "blackhole"}


def kill_node(lab: Lab, node: str) -> None:
    """Everything running in the node's namespace dies at once (the machine is gone)."""
    for pid in netns.pids(lab.node_ns(node)):
        os.kill(pid, signal.SIGKILL)


def test_clients_of_two_pipit_reflectors_reach_every_pod(rr_lab):
    assert_pods_reach_each_other(rr_lab)
    for node in rr_lab.workers():
        status = rr_lab.status(node)
        assert {p["name"] for p in status["peers"]} == {"rr1", "rr2"}
        assert status["warnings"] == []
        routes = learned(rr_lab, node)
        assert len(routes) == 2  # the two other nodes' blocks, next hop the owner
        assert set(routes.values()) == {str(address(rr_lab, n))
                                        for n in rr_lab.workers() if n != node}
    reflector = rr_lab.status("rr1")
    assert reflector["routeReflectorClusterId"] == CLUSTER_ID
    assert reflector["kernelRoutes"] == 0  # pipit-rr programs no routes
    clients = {p["name"]: p["rrClient"] for p in reflector["peers"]}
    assert clients == {"n1": True, "n2": True, "n3": True, "rr2": False}
    out = rr_lab.pipitctl("node", "status", "--socket", str(rr_lab.status_socket("n1"))).stdout
    assert "Route reflectors: rr1, rr2." in out


def peer_status(lab, node: str, peer: str) -> dict:
    return next((p for p in lab.status(node)["peers"] if p["name"] == peer), {})


def test_a_bird_client_of_the_reflectors_learns_every_block(rr_lab, tmp_path):
    bird_address = IPv4Interface("10.99.0.250/24")
    ns = rr_lab.attach("bird", bird_address)
    rr_lab.pipitctl("apply", "-f", "-", input="""\
apiVersion: pipit.dev/v1
kind: BGPPeer
metadata: {name: bird-client}
spec: {peerIP: 10.99.0.250, asNumber: 64512, nodeSelector: route-reflector == 'true'}
""")
    peers = [BirdPeer(name, address(rr_lab, name), 64512) for name in ("rr1", "rr2")]
    bird = Bird("client", bgp_config(bird_address.ip, bird_address.ip, 64512, peers),
                netns=ns, directory=tmp_path / "bird").start()
    try:
        blocks = {IPv4Network(p) for n in rr_lab.workers()
                  for p, hop in rr_lab.pipit_routes(n).items() if hop == "blackhole"}
        wait(lambda: blocks <= set(bird.routes()), 30, "BIRD to learn every block")
        for prefix, route in bird.routes().items():
            if prefix in blocks:  # reflected with the owner as next hop
                owner = next(n for n in rr_lab.workers()
                             if rr_lab.pipit_routes(n).get(str(prefix)) == "blackhole")
                assert route.via == address(rr_lab, owner)
        for reflector in ("rr1", "rr2"):  # BIRD may have learnt it all through one of them
            wait(lambda: peer_status(rr_lab, reflector, "bird-client").get("state") == "up",
                 30, f"{reflector}'s session with the BIRD client")
            assert peer_status(rr_lab, reflector, "bird-client")["rrClient"]
        # A BGPFilter on the session: the reflectors reflect all but one worker's block to it
        held_back = min(blocks)
        applied = rr_lab.pipitctl("apply", "-f", "-", input=f"""\
apiVersion: pipit.dev/v1
kind: BGPFilter
metadata: {{name: not-one}}
spec:
  exportV4: [{{action: Reject, matchOperator: Equal, cidr: {held_back}, source: RemotePeers}}]
---
apiVersion: pipit.dev/v1
kind: BGPPeer
metadata: {{name: bird-client}}
spec: {{peerIP: 10.99.0.250, asNumber: 64512, nodeSelector: route-reflector == 'true',
        filters: [not-one]}}
""")
        assert applied.returncode == 0, applied.stderr
        wait(lambda: held_back not in bird.routes(), 30, "BIRD to lose the filtered block")
        assert blocks - {held_back} <= set(bird.routes())
        # its sessions start over: each reflector sends its whole table again, past the filter
        since = {r: peer_status(rr_lab, r, "bird-client")["since"] for r in ("rr1", "rr2")}
        bird.birdc("restart", "all")
        wait(lambda: all(peer_status(rr_lab, r, "bird-client")["since"] != since[r] and
                         peer_status(rr_lab, r, "bird-client")["state"] == "up"
                         for r in ("rr1", "rr2")) and blocks - {held_back} <= set(bird.routes()),
             30, "BIRD's new sessions to take the reflected blocks again")
        assert held_back not in bird.routes()
        for reflector in ("rr1", "rr2"):
            assert not rr_lab.status(reflector).get("lastError"), rr_lab.status(reflector)
        # nextHopMode Self (Calico's): the reflectors reflect every block to it with their own
        # address as next hop; these, pipit-rr, program no routes, and say so
        applied = rr_lab.pipitctl("apply", "-f", "-", input="""\
apiVersion: pipit.dev/v1
kind: BGPPeer
metadata: {name: bird-client}
spec: {peerIP: 10.99.0.250, asNumber: 64512, nodeSelector: route-reflector == 'true',
       nextHopMode: Self}
""")
        assert applied.returncode == 0, applied.stderr
        reflectors = {address(rr_lab, r) for r in ("rr1", "rr2")}
        wait(lambda: blocks <= set(bird.routes()) and all(
            bird.routes()[b].via in reflectors for b in blocks), 30,
             "BIRD to take every block with a reflector as next hop")
        for reflector in ("rr1", "rr2"):
            assert peer_status(rr_lab, reflector, "bird-client")["nextHopSelf"]
            assert any("nextHopMode Self sends bird-client this reflector's address" in w
                       for w in rr_lab.status(reflector)["warnings"])
    finally:
        bird.destroy()
        rr_lab.pipitctl("delete", "bgppeer", "bird-client")
        rr_lab.pipitctl("delete", "bgpfilter", "not-one")


def test_reflected_routes_keep_their_communities(rr_lab, tmp_path):
    """RFC 4456: a reflector passes a route on with its attributes as received. A BIRD
    client's route carrying standard, large and extended communities reaches another BIRD
    client through Pipit's reflectors with all three; and the nodes' blocks reach it with the
    cluster's communities, which nodes send to their reflectors too (as Calico's)."""
    prefix = IPv4Network("198.51.100.0/24")
    clients = {"birda": IPv4Interface("10.99.0.251/24"), "birdb": IPv4Interface("10.99.0.252/24")}
    peers = [BirdPeer(name, address(rr_lab, name), 64512) for name in ("rr1", "rr2")]
    birds = []
    shown = rr_lab.pipitctl("get", "bgpconfig", "default", "-o", "json")
    assert shown.returncode == 0, shown.stderr
    bgp_configuration = json.loads(shown.stdout)
    bgp_configuration["metadata"].pop("resourceVersion", None)
    tagged = json.loads(json.dumps(bgp_configuration))
    tagged["spec"]["communities"] = ["64512:77", "64512:1:77"]
    applied = rr_lab.pipitctl("apply", "-f", "-", input=json.dumps(tagged))
    assert applied.returncode == 0, applied.stderr
    try:
        for name, interface in clients.items():
            applied = rr_lab.pipitctl("apply", "-f", "-", input=f"""\
apiVersion: pipit.dev/v1
kind: BGPPeer
metadata: {{name: {name}}}
spec: {{peerIP: {interface.ip}, asNumber: 64512, nodeSelector: route-reflector == 'true'}}
""")
            assert applied.returncode == 0, applied.stderr
            ns = rr_lab.attach(name, interface)
            config = bgp_config(interface.ip, interface.ip, 64512, peers,
                                static_routes=[prefix] if name == "birda" else [],
                                static_attributes="bgp_community.add((64512, 5)); "
                                "bgp_large_community.add((4200000000, 1, 2)); "
                                "bgp_ext_community.add((rt, 64512, 7)); "
                                "bgp_ext_community.add((ro, 64512, 9));")
            birds.append(Bird(name, config, netns=ns, directory=tmp_path / name).start())
        wait(lambda: prefix in birds[1].routes(), 30, "birdb to learn birda's route")
        route = birds[1].routes()[prefix]
        assert route.via == clients["birda"].ip
        assert route.communities == ((64512, 5),)
        assert route.large_communities == ((4200000000, 1, 2),)
        assert set(route.extended_communities) == {("rt", "64512", "7"), ("ro", "64512", "9")}
        blocks = {IPv4Network(p) for n in rr_lab.workers()
                  for p, hop in rr_lab.pipit_routes(n).items() if hop == "blackhole"}

        def tagged_blocks() -> bool:
            table = birds[1].routes()
            return all(b in table and table[b].communities == ((64512, 77),)
                       and table[b].large_communities == ((64512, 1, 77),) for b in blocks)
        wait(tagged_blocks, 30, "birdb to learn every block with the cluster's communities")
    finally:
        restored = rr_lab.pipitctl("apply", "-f", "-", input=json.dumps(bgp_configuration))
        assert restored.returncode == 0, restored.stderr
        for bird in birds:
            bird.destroy()
        for name in clients:
            rr_lab.pipitctl("delete", "bgppeer", name)


def test_a_client_peering_with_part_of_a_cluster_is_warned(rr_lab):
    documents = """\
apiVersion: pipit.dev/v1
kind: BGPPeer
metadata: {name: to-reflectors}
spec: {nodeSelector: node != 'n1', peerSelector: route-reflector == 'true'}
---
apiVersion: pipit.dev/v1
kind: BGPPeer
metadata: {name: n1-to-rr1}
spec: {nodeSelector: node == 'n1', peerSelector: node == 'rr1'}
"""
    assert rr_lab.pipitctl("apply", "-f", "-", input=documents).returncode == 0
    try:
        wait(lambda: rr_lab.status("n1")["warnings"], 20, "n1's warning")
        [warning] = rr_lab.status("n1")["warnings"]
        assert "peers with rr1 but not rr2 of route reflector cluster 244.0.0.1" in warning
        out = rr_lab.pipitctl("node", "status", "--socket",
                              str(rr_lab.status_socket("n1"))).stdout
        assert "Warning: this node peers with rr1 but not rr2" in out
    finally:
        rr_lab.pipitctl("delete", "bgppeer", "n1-to-rr1")
        rr_lab.pipitctl("apply", "-f", "-", input="".join(rr_lab.reflector_peer_documents()))
        rr_lab.wait_mesh()
    assert rr_lab.status("n1")["warnings"] == []


def test_a_reflector_killed_costs_no_route_and_no_ping(rr_lab):
    before = {n: learned(rr_lab, n) for n in rr_lab.workers()}
    with pinging(rr_lab, "n1", "n3", seconds=HOLD + 6) as lost:
        kill_node(rr_lab, "rr1")
        # the clients notice (the TCP session is gone) and go on through rr2
        wait(lambda: all(next(p for p in rr_lab.status(n)["peers"] if p["name"] == "rr1")
                         ["state"] != "up" for n in rr_lab.workers()), HOLD + 10,
             "the clients to lose rr1")
        for node in rr_lab.workers():
            assert learned(rr_lab, node) == before[node]
    assert lost() == 0
    rr_lab.start_agent("rr1")
    rr_lab.wait_mesh()
    assert {n: learned(rr_lab, n) for n in rr_lab.workers()} == before


def test_both_reflectors_killed_routes_are_held_for_the_restart_time(rr_lab):
    before = {n: learned(rr_lab, n) for n in rr_lab.workers()}
    for reflector in ("rr1", "rr2"):
        kill_node(rr_lab, reflector)
    wait(lambda: all(p["state"] != "up" for n in rr_lab.workers()
                     for p in rr_lab.status(n)["peers"]), HOLD + 10, "every session to drop")
    # held: graceful restart, for the reflectors' advertised restart time
    assert {n: learned(rr_lab, n) for n in rr_lab.workers()} == before
    assert all(sum(p["stale"] for p in rr_lab.status(n)["peers"]) for n in rr_lab.workers())
    wait(lambda: not any(learned(rr_lab, n) for n in rr_lab.workers()), RESTART + 15,
         "the held routes to go once the restart time has passed")
    for reflector in ("rr1", "rr2"):
        rr_lab.start_agent(reflector)
    rr_lab.wait_mesh()
    wait(lambda: {n: learned(rr_lab, n) for n in rr_lab.workers()} == before, 30,
         "the routes to come back")


def test_clients_of_bird_reflectors_on_port_1179_take_the_pod_routes(tmp_path_factory):
    """A plain BGPPeer (peerIP with a port, the nodes' own AS, no allowPoolPrefixes): the
    reflected blocks are accepted because etcd says who owns them."""
    with three_node_lab(tmp_path_factory, "birdrr", topology="rr", reflector="bird") as lab:
        assert_pods_reach_each_other(lab)
        for node in lab.workers():
            peers = lab.status(node)["peers"]
            assert {(p["name"], p["rejected"]) for p in peers} == {("rr1", 0), ("rr2", 0)}
            assert len(learned(lab, node)) == 2


def test_a_mesh_moves_to_reflectors_without_losing_a_ping(tmp_path_factory):
    with three_node_lab(tmp_path_factory, "move") as lab:
        with pinging(lab, "n1", "n3", seconds=25) as lost:
            for k in (1, 2):  # reflectors join; the mesh and the reflectors coexist
                lab.add_node(f"rr{k}", 1000 + k, reflector=True)
            lab.topology = "rr"
            assert lab.pipitctl("apply", "-f", "-",
                                input="".join(lab.reflector_peer_documents())).returncode == 0
            wait(lambda: all({"rr1", "rr2"} <= {p["name"] for p in lab.status(n)["peers"]
                                                if p["state"] == "up"}
                             for n in lab.workers()), 30, "every node to peer with rr1 and rr2")
            assert lab.pipitctl("apply", "-f", "-", input="""\
apiVersion: pipit.dev/v1
kind: BGPConfiguration
metadata: {name: default}
spec: {nodeToNodeMeshEnabled: false}
""").returncode == 0
            lab._save(topology="rr")
            lab.wait_mesh()  # only the reflectors left
        assert lost() == 0
        assert_pods_reach_each_other(lab)
