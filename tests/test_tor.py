"""Peering with the fabric, end to end, against real routers in network namespaces.

The lab's rack topology (lab/cluster.py): the node-to-node mesh is off; two racks, each with
two nodes (AS 65000+r) and a top-of-rack router (AS 65100+r) that announces a default route
and its loopback 192.0.2.<r>; the ToRs peer with each other. Every node peers eBGP with its
rack's ToR through one BGPPeer per rack (nodeSelector rack == 'r<r>', TCP MD5 password from a
mounted secret). Pod blocks are never accepted from a ToR (allowPoolPrefixes is off), so the
nodes reach other racks' pods through the ToR's default route, and the ToRs route them with
the blocks they learned from the nodes.

One BIRD lab runs every scenario in order (topology, status, live peer changes, hijacks,
maxPrefixes, MD5, graceful restart); FRR and GoBGP each get a lab of their own for the
topology and the hijacks.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Network

import pytest
import yaml

from lab import netns
from lab.cluster import COMMUNITY, POOL, Lab, tor_address, tor_loopback, tor_uplink
from lab.process import wait  # returns what the condition returned
from tests.helpers import assert_pods_reach_each_other, running_lab

pytestmark = [pytest.mark.slow, pytest.mark.lab]

PASSWORD = "s3cret-md5"
N = IPv4Network
TOR_ROUTES = {"default", "192.0.2.1", "192.0.2.2"}  # what a node should learn from its ToR


@contextmanager
def rack_lab(tmp_path_factory, router: str):
    with running_lab(tmp_path_factory.mktemp(f"racks-{router}"), router, node_count=4,
                     pods_per_node=1, healthy=True, hold_time=6, restart_time=8,
                     topology="racks", router=router, password=PASSWORD) as lab:
        yield lab


@pytest.fixture(scope="module")
def bird_lab(tmp_path_factory):
    with rack_lab(tmp_path_factory, "bird") as lab:
        yield lab


# --------------------------------------------------------------------------------------------
# Looking at the lab

def address(lab: Lab, node: str) -> IPv4Address:
    return lab.node_ip(node)


def block_of(lab: Lab, node: str) -> IPv4Network:
    [block] = [N(dst) for dst, hop in lab.pipit_routes(node).items() if hop == "blackhole"]
    return block


def tor_peer(lab: Lab, node: str) -> dict:
    [peer] = [p for p in lab.status(node)["peers"] if p["name"] == f"tor-r{lab.node_rack(node)}"]
    return peer


def settled_counts(lab: Lab, node: str) -> dict | None:
    """The ToR peer's status once it accepted the ToR's three routes and every other
    prefix it received counts as rejected."""
    peer = tor_peer(lab, node)
    return peer if peer["accepted"] == 3 and peer["received"] == 3 + peer["rejected"] else None


def apply_rack_peer(lab: Lab, rack: int, **spec) -> None:
    """Apply rack r's BGPPeer as the lab makes it, with `spec`'s fields changed."""
    result = lab.pipitctl("apply", "-f", "-", input=lab.tor_peer_document(rack, **spec))
    assert result.returncode == 0, result.stderr


def pod_of(lab: Lab, node: str):
    return next(p for p in lab.all_pods() if p.node == node)


def ping(lab: Lab, source_node: str, target: str) -> bool:
    return netns.ping(pod_of(lab, source_node).netns, target, "-q").returncode == 0


def node_sees_only_its_tor_routes(lab: Lab, node: str) -> bool:
    tor = str(tor_address(lab.node_rack(node)))
    want = {**{dst: tor for dst in TOR_ROUTES}, str(block_of(lab, node)): "blackhole"}
    return lab.pipit_routes(node) == want


# --------------------------------------------------------------------------------------------
# Checks every router must pass

def check_topology(lab: Lab) -> None:
    nodes = lab.nodes()
    blocks = {n: block_of(lab, n) for n in nodes}
    # Each ToR learned every block: its own rack's from the nodes, the other rack's from the
    # other ToR; the routes are in its kernel, so it forwards pod traffic.
    for rack, router in lab.routers.items():
        def learned(rack=rack, router=router) -> bool:
            table = router.routes()
            for n, block in blocks.items():
                via = (address(lab, n) if lab.node_rack(n) == rack
                       else tor_uplink(3 - rack).ip)
                if block not in table or table[block].next_hop != via:
                    return False
            return True
        wait(learned, 30, f"tor{rack} to learn every node's block")
        kernel = subprocess.run(["ip", "-n", lab.tor_ns(rack), "route"], capture_output=True,
                                text=True, check=True).stdout
        for block in blocks.values():
            assert str(block) in kernel, f"tor{rack}'s kernel lacks {block}"
    # Each node's kernel holds what its ToR announced (default route, both loopbacks) and no
    # pod route but its own blackhole: other nodes' blocks come inside the pool, refused.
    for n in nodes:
        wait(lambda n=n: node_sees_only_its_tor_routes(lab, n), 30,
             f"{n} to hold exactly its ToR's routes")
        peer = wait(lambda n=n: settled_counts(lab, n), 30,
                    f"{n}'s status to count what its ToR sent")
        assert (peer["type"], peer["state"], peer["asNumber"]) == (
            "node", "up", 65100 + lab.node_rack(n))
        assert set(peer["rejectedReasons"]) <= {
            "it is inside an IP pool (only nodes announce pod addresses)",
            "it is one of this node's own blocks"}  # FRR sends a node's own block back
    assert_pods_reach_each_other(lab)
    assert ping(lab, "n1", str(tor_loopback(2).network_address))  # the other ToR's loopback


def check_hijacks(lab: Lab) -> None:
    """tor1 announces the whole pool, a prefix inside it and a more-specific of n2's block:
    no node installs any of them (each counts as rejected), and pods still reach each other.
    (n2 is in tor1's rack: tor1 itself forwards by n2's real block, so the fabric stays
    sound; a more-specific of another rack's block would hijack the other ToR, which trusts
    tor1, and that is the fabric's business.)"""
    tor = lab.routers[1]
    n2_block = block_of(lab, "n2")
    hijacks = [N(POOL), N("10.244.250.0/24"), N((n2_block.network_address, 28))]
    before = {n: tor_peer(lab, n) for n in lab.nodes()}
    tor.originate([*tor.spec.originate, *hijacks])
    try:
        for n in lab.nodes():
            wait(lambda n=n: tor_peer(lab, n)["rejected"] == before[n]["rejected"] + 3, 30,
                 f"{n} to receive and reject the hijacks")
            peer = tor_peer(lab, n)
            assert peer["accepted"] == 3 and peer["state"] == "up"
            assert node_sees_only_its_tor_routes(lab, n)
            assert not {str(h) for h in hijacks} & set(lab.pipit_routes(n))
        assert_pods_reach_each_other(lab)
    finally:
        tor.originate([p for p in tor.spec.originate if p not in hijacks])
    for n in lab.nodes():
        wait(lambda n=n: tor_peer(lab, n)["rejected"] == before[n]["rejected"], 30,
             f"{n} to see the hijacks withdrawn")


# --------------------------------------------------------------------------------------------
# BIRD: every scenario

def test_bird_tors_route_pods_between_racks(bird_lab):
    check_topology(bird_lab)
    # the nodes' blocks reach the ToR with the configured community
    tor1 = bird_lab.routers[1]
    block = block_of(bird_lab, "n1")
    community = tuple(int(x) for x in COMMUNITY.split(":"))
    assert tor1.routes()[block].communities == (community,)
    assert tor1.routes()[block].as_path == (65001,)


def test_node_status_shows_every_peer_with_type_state_and_counts(bird_lab):
    result = bird_lab.pipitctl("node", "status", "--socket",
                               str(bird_lab.status_socket("n3")))
    # (pipitctl reads the socket directly: no etcd involved)
    assert result.returncode == 0, result.stderr
    line = next(l for l in result.stdout.splitlines() if l.startswith("10.99.2.1 "))
    peer = tor_peer(bird_lab, "n3")
    assert re.search(rf"10\.99\.2\.1\s+node specific\s+tor-r2\s+65102\s+up\s+\d\d:\d\d:\d\d\s+-\s+"
                     rf"{peer['received']}\s+3\s+{peer['rejected']}\s+1\s+Established", line), line
    assert "rejected: it is inside an IP pool" in line


def test_peers_are_followed_live_without_touching_the_other_sessions(bird_lab):
    lab = bird_lab
    since = {n: tor_peer(lab, n)["since"] for n in lab.nodes()}

    def extra(**spec) -> str:
        return yaml.safe_dump({"apiVersion": "pipit.dev/v1", "kind": "BGPPeer",
                               "metadata": {"name": "extra"},
                               "spec": {"peerIP": "10.99.1.250", "asNumber": 65200, **spec}})

    def extra_on(n) -> dict | None:
        return next((p for p in lab.status(n)["peers"] if p["name"] == "extra"), None)

    assert lab.pipitctl("apply", "-f", "-", input=extra()).returncode == 0  # global
    for n in lab.nodes():
        wait(lambda n=n: extra_on(n) is not None, 20, f"{n} to add the global peer")
        # nothing answers at 10.99.1.250: the speaker has the session, not yet up (not one
        # Pipit itself skipped or disabled)
        assert extra_on(n)["type"] == "global" and extra_on(n)["state"] in ("idle", "down")
        assert "neighbor 10.99.1.250 {" in (lab.node_dir(n) / "exabgp" / "exabgp.conf").read_text()
    config = lab.node_dir("n1") / "exabgp" / "exabgp.conf"
    assert lab.pipitctl("apply", "-f", "-", input=extra(holdTime=30, node="n1")).returncode == 0
    wait(lambda: "hold-time 30;" in config.read_text(), 20, "n1 to reconfigure the peer")
    for n in ("n2", "n3", "n4"):
        wait(lambda n=n: extra_on(n) is None, 20, f"{n} to drop the now node-specific peer")
    assert extra_on("n1")["type"] == "node"
    # changing the ToR's BGPPeer in what only the agent uses resets nothing either
    apply_rack_peer(lab, 1, maxPrefixes=1000)
    assert lab.pipitctl("delete", "bgppeer", "extra").returncode == 0
    wait(lambda: extra_on("n1") is None, 20, "n1 to drop the deleted peer")
    assert "10.99.1.250" not in config.read_text()
    assert {n: tor_peer(lab, n)["since"] for n in lab.nodes()} == since
    assert all(tor_peer(lab, n)["state"] == "up" for n in lab.nodes())


def test_bird_hijacks_never_reach_a_kernel(bird_lab):
    check_hijacks(bird_lab)


def test_allow_pool_prefixes_lets_nodes_learn_the_blocks_from_their_tor(bird_lab):
    """The opt-in: with allowPoolPrefixes rack 1's nodes take the pod blocks from the ToR;
    with an AS per rack, n2's block comes back with n1's own AS in its path, accepted only
    with numAllowedLocalASNumbers. Neither setting touches the session."""
    lab = bird_lab
    since = tor_peer(lab, "n1")["since"]
    blocks = {n: str(block_of(lab, n)) for n in lab.nodes()}
    tor = str(tor_address(1))
    try:
        apply_rack_peer(lab, 1, allowPoolPrefixes=True, numAllowedLocalASNumbers=0)
        wait(lambda: lab.pipit_routes("n1").get(blocks["n3"]) == tor, 30, "n1 to learn n3's block")
        assert lab.pipit_routes("n1").get(blocks["n4"]) == tor
        assert blocks["n2"] not in lab.pipit_routes("n1")
        reasons = tor_peer(lab, "n1")["rejectedReasons"]
        assert reasons == {"our own AS is in its AS path (a loop)": 1}
        apply_rack_peer(lab, 1, allowPoolPrefixes=True)  # numAllowedLocalASNumbers: 1
        wait(lambda: blocks["n2"] in lab.pipit_routes("n1"), 30, "n1 to learn n2's block")
        assert tor_peer(lab, "n1")["rejected"] == 0
        assert tor_peer(lab, "n1")["since"] == since
        assert_pods_reach_each_other(lab)
    finally:
        apply_rack_peer(lab, 1)
    wait(lambda: node_sees_only_its_tor_routes(lab, "n1"), 30, "n1 to forget the blocks")


def test_bgp_filters_choose_what_a_rack_takes_from_its_tor_and_gives_it(bird_lab):
    """Calico's BGPFilter on rack 1's BGPPeer: its nodes take only the default route from the
    ToR (the loopbacks rejected by the filter, the pod blocks still by Pipit's own rule),
    n2's block is held back from the ToR, which withdraws it, and n1's goes prepended and
    tagged (an Accept's operations); the sessions stay up throughout.
    The filter cannot be deleted while the peer names it; without it, all is as before."""
    lab, tor = bird_lab, bird_lab.routers[1]
    since = tor_peer(lab, "n1")["since"]
    n1_block, n2_block = block_of(lab, "n1"), block_of(lab, "n2")
    tor_filter = yaml.safe_dump({
        "apiVersion": "pipit.dev/v1", "kind": "BGPFilter", "metadata": {"name": "rack1"},
        "spec": {"importV4": [{"action": "Accept", "matchOperator": "Equal",
                               "cidr": "0.0.0.0/0"},
                              {"action": "Reject", "matchOperator": "In",
                               "cidr": "192.0.2.0/24"}],
                 "exportV4": [{"action": "Reject", "matchOperator": "Equal",
                               "cidr": str(n2_block)},
                              {"action": "Accept", "matchOperator": "Equal",
                               "cidr": str(n1_block), "operations": [
                                   {"prependASPath": {"prefix": [65001, 65001]}},
                                   {"addCommunity": {"value": "65535:7"}}]}]}})
    default_only = {"default": str(tor_address(1))}
    applied = lab.pipitctl("apply", "-f", "-", input=f"---\n{tor_filter}" +
                           lab.tor_peer_document(1, filters=["rack1"]))
    assert applied.returncode == 0, applied.stderr
    try:
        for n in ("n1", "n2"):
            wait(lambda n=n: {d: h for d, h in lab.pipit_routes(n).items() if h != "blackhole"}
                 == default_only, 30, f"{n} to hold only the ToR's default route")
        wait(lambda: n2_block not in tor.routes(), 30, "tor1 to lose n2's block")
        # n1's block prepended (before n1's own AS, which eBGP adds) and tagged
        wait(lambda: tor.routes()[n1_block].as_path == (65001, 65001, 65001), 30,
             "tor1 to see n1's block prepended")
        cluster = tuple(int(x) for x in COMMUNITY.split(":"))
        assert tor.routes()[n1_block].communities == tuple(sorted((cluster, (65535, 7))))
        peer = tor_peer(lab, "n1")
        assert peer["filters"] == ["rack1"] and peer["since"] == since
        assert peer["rejectedReasons"]["BGPFilter 'rack1' rejects it (importV4 rule 2)"] == 2
        assert "it is inside an IP pool (only nodes announce pod addresses)" in \
            peer["rejectedReasons"]
        out = lab.pipitctl("node", "status", "--socket", str(lab.status_socket("n1"))).stdout
        assert "(BGPFilters: rack1)" in out
        refused = lab.pipitctl("delete", "bgpfilter", "rack1")
        assert refused.returncode != 0 and "BGPPeer 'tor-r1'" in refused.stderr
    finally:
        apply_rack_peer(lab, 1)
    wait(lambda: n2_block in tor.routes(), 30, "tor1 to learn n2's block again")
    wait(lambda: tor.routes()[n1_block].as_path == (65001,), 30, "n1's block as it was")
    for n in ("n1", "n2"):
        wait(lambda n=n: node_sees_only_its_tor_routes(lab, n), 30, f"{n} to take it all again")
    assert lab.pipitctl("delete", "bgpfilter", "rack1").returncode == 0
    assert tor_peer(lab, "n1")["since"] == since
    assert_pods_reach_each_other(lab)


def test_ttl_security_keeps_a_tor_without_gtsm_out_and_lets_one_with_it_in(bird_lab):
    """Calico's ttlSecurity (GTSM, RFC 5082) on rack 2's BGPPeer: tor2 without GTSM (its
    segments come with TTL 1 or 64) holds no session with n3 or n4, whichever side connects,
    and node status says why; with BIRD's `ttl security on` they come up and route as
    before; both off again, as before."""
    lab, tor = bird_lab, bird_lab.routers[2]
    rack = ("n3", "n4")

    def down_for_ttl(n: str) -> bool:
        peer = tor_peer(lab, n)
        return peer["state"] != "up" and "GTSM" in peer["reason"]

    def routing(n: str) -> bool:
        return tor_peer(lab, n)["state"] == "up" and node_sees_only_its_tor_routes(lab, n)

    try:
        apply_rack_peer(lab, 2, ttlSecurity=1)
        for n in rack:
            wait(lambda n=n: down_for_ttl(n), 60, f"{n}'s session to stay down for its TTL")
        assert "below 255, the least ttlSecurity 1 accepts" in tor_peer(lab, "n3")["reason"]
        tor.change_peers([address(lab, n) for n in rack], ttl_security=True)
        for n in rack:
            wait(lambda n=n: routing(n), 60, f"{n} to peer with tor2 under GTSM")
        assert tor_peer(lab, "n3")["ttlSecurity"] == 1
        assert_pods_reach_each_other(lab)
    finally:
        apply_rack_peer(lab, 2)
        tor.change_peers([address(lab, n) for n in rack], ttl_security=False)
    for n in rack:
        wait(lambda n=n: routing(n), 60, f"{n} to peer with tor2 without GTSM again")


def test_local_as_number_lets_a_rack_peer_as_another_as(bird_lab):
    """Calico's localASNumber on rack 1's BGPPeer: n1 and n2 peer with tor1 as AS 65011 (tor1
    expecting it), their blocks reach tor1 with that AS in the path and pods still reach
    each other; then back to their own AS."""
    lab, tor = bird_lab, bird_lab.routers[1]
    rack, own_as = ("n1", "n2"), tor_peer(bird_lab, "n1")["localAsNumber"]
    nodes = [address(lab, n) for n in rack]

    def peering_as(local_as: int) -> bool:
        table = tor.routes()
        return all(tor_peer(lab, n)["state"] == "up"
                   and tor_peer(lab, n)["localAsNumber"] == local_as
                   and table.get(block_of(lab, n)) is not None
                   and table[block_of(lab, n)].as_path == (local_as,) for n in rack)

    try:
        apply_rack_peer(lab, 1, localASNumber=65011)
        tor.change_peers(nodes, peer_as=65011)
        wait(lambda: peering_as(65011), 60, "rack 1 to peer with tor1 as AS 65011")
        out = lab.pipitctl("node", "status", "--socket", str(lab.status_socket("n1"))).stdout
        assert "(peering as AS 65011)" in out
        for n in rack:
            wait(lambda n=n: node_sees_only_its_tor_routes(lab, n), 30, f"{n}'s ToR routes")
        assert_pods_reach_each_other(lab)
    finally:
        apply_rack_peer(lab, 1)
        tor.change_peers(nodes, peer_as=own_as)
    wait(lambda: peering_as(own_as), 60, "rack 1 to peer with tor1 as its own AS again")


def test_reachable_by_lets_a_rack_peer_with_its_tor_s_loopback(bird_lab):
    """Calico's reachableBy on rack 2's BGPPeer: n3 and n4 peer with tor2's loopback
    192.0.2.2, which no link of theirs reaches and which tor2 itself announces, through a /32
    route via tor2's address on the rack network that the agent holds over the learned one;
    the rack routes as before, node status says how the peer is reached; then back."""
    lab, tor = bird_lab, bird_lab.routers[2]
    rack = ("n3", "n4")
    nodes = [address(lab, n) for n in rack]
    loopback, gateway = tor_loopback(2).network_address, tor_address(2)

    def peering_with(peer_ip: IPv4Address) -> bool:
        return all(tor_peer(lab, n)["state"] == "up" and tor_peer(lab, n)["address"] ==
                   str(peer_ip) and node_sees_only_its_tor_routes(lab, n) for n in rack)

    try:
        apply_rack_peer(lab, 2, peerIP=str(loopback), reachableBy=str(gateway))
        tor.change_peers(nodes, local_address=loopback)
        wait(lambda: peering_with(loopback), 60, "rack 2 to peer with tor2's loopback")
        for n in rack:  # the way to the loopback is the agent's route, not tor2's, and the
            # routes tor2 sends with the loopback as next hop go that way
            assert lab.pipit_routes(n)[str(loopback)] == str(gateway)
            assert tor_peer(lab, n)["reachableBy"] == str(gateway)
            assert lab.status(n)["underlay"] == {str(loopback): [str(gateway)]}
        out = lab.pipitctl("node", "status", "--socket", str(lab.status_socket("n3"))).stdout
        assert f"(reached via {gateway})" in out
        check_topology(lab)
        assert_pods_reach_each_other(lab)
    finally:
        apply_rack_peer(lab, 2)
        tor.change_peers(nodes, local_address=gateway)
    wait(lambda: peering_with(gateway), 60, "rack 2 to peer with tor2's address again")


def test_service_ranges_are_announced_to_the_tors_by_every_node_and_then_withdrawn(bird_lab):
    """serviceClusterIPs and serviceLoadBalancerIPs (Calico's): every node announces them to
    its ToR, so each ToR routes them to its own rack's nodes (kube-proxy answers them on
    each), a prefixAdvertisement adding its community to the one range it holds; no node
    takes them back into its kernel; taken out, they are withdrawn."""
    lab = bird_lab
    services = {N("10.96.0.0/12"), N("198.18.100.0/24")}
    shown = lab.pipitctl("get", "bgpconfig", "default", "-o", "json")
    assert shown.returncode == 0, shown.stderr
    config = json.loads(shown.stdout)
    config["metadata"].pop("resourceVersion", None)
    announced = json.loads(json.dumps(config))
    announced["spec"].update(serviceClusterIPs=[{"cidr": "10.96.0.0/12"}],
                             serviceLoadBalancerIPs=[{"cidr": "198.18.100.0/24"}],
                             # Calico's named communities and per-prefix advertisements
                             prefixAdvertisements=[{"cidr": "10.96.0.0/12",
                                                    "communities": ["services"]}])
    announced["spec"]["communities"].append({"name": "services", "value": "64512:200"})

    def tor_routes_them(rack: int) -> bool:
        table = lab.routers[rack].routes()
        rack_nodes = {address(lab, n) for n in lab.nodes() if lab.node_rack(n) == rack}
        return all(s in table and table[s].next_hop in rack_nodes for s in services)

    assert lab.pipitctl("apply", "-f", "-", input=json.dumps(announced)).returncode == 0
    try:
        for rack in lab.routers:
            wait(lambda rack=rack: tor_routes_them(rack), 30,
                 f"tor{rack} to route the service ranges to its rack's nodes")
        for n in lab.nodes():
            assert node_sees_only_its_tor_routes(lab, n)
        table, cluster = lab.routers[1].routes(), tuple(int(x) for x in COMMUNITY.split(":"))
        assert table[N("10.96.0.0/12")].communities == (cluster, (64512, 200))
        assert table[N("198.18.100.0/24")].communities == (cluster,)
        assert table[block_of(lab, "n1")].communities == (cluster,)
        out = lab.pipitctl("node", "status", "--socket", str(lab.status_socket("n1"))).stdout
        assert ("Service addresses announced to external peers: 10.96.0.0/12, "
                "198.18.100.0/24.") in out
        assert_pods_reach_each_other(lab)
    finally:
        assert lab.pipitctl("apply", "-f", "-", input=json.dumps(config)).returncode == 0
    for rack, router in lab.routers.items():
        wait(lambda router=router: not services & set(router.routes()), 30,
             f"tor{rack} to see the service ranges withdrawn")


def test_a_nodes_own_prefix_advertisements_tag_its_block_at_its_tor(bird_lab):
    """Calico's node-specific prefixAdvertisements (BGPConfiguration node.<name>): n1's own,
    over the whole pool, tag n1's block at its ToR with n1's community and no other node's
    block; deleted, n1's block goes with the cluster's community alone again."""
    lab = bird_lab
    cluster = tuple(int(x) for x in COMMUNITY.split(":"))
    own = {"apiVersion": "pipit.dev/v1", "kind": "BGPConfiguration",
           "metadata": {"name": "node.n1"},
           "spec": {"communities": [{"name": "n1", "value": "64512:301"}],
                    "prefixAdvertisements": [{"cidr": POOL, "communities": ["n1"]}]}}

    def communities(node: str) -> tuple | None:
        route = lab.routers[lab.node_rack(node)].routes().get(block_of(lab, node))
        return route and route.communities

    result = lab.pipitctl("apply", "-f", "-", input=json.dumps(own))
    assert result.returncode == 0, result.stderr
    try:
        wait(lambda: communities("n1") == (cluster, (64512, 301)), 30,
             "n1's ToR to see n1's block with n1's community")
        assert all(communities(n) == (cluster,) for n in lab.nodes() if n != "n1")
    finally:
        result = lab.pipitctl("delete", "bgpconfig", "node.n1")
        assert result.returncode == 0, result.stderr
    wait(lambda: communities("n1") == (cluster,), 30,
         "n1's ToR to see n1's block with the cluster's community alone")


def test_a_tor_sending_more_than_max_prefixes_is_disconnected_and_stays_down(bird_lab):
    lab, tor2 = bird_lab, bird_lab.routers[2]
    received = tor_peer(lab, "n3")["received"]
    apply_rack_peer(lab, 2, maxPrefixes=received + 2)
    flood = [N(f"198.18.{i}.0/24") for i in range(3)]
    tor2.originate([*tor2.spec.originate, *flood])
    try:
        for n in ("n3", "n4"):
            wait(lambda n=n: tor_peer(lab, n)["state"] == "disabled", 30,
                 f"{n} to disconnect its ToR")
            peer = tor_peer(lab, n)
            assert peer["reason"] == (f"disconnected: it sent {received + 3} prefixes, more "
                                      f"than its maxPrefixes {received + 2}; it stays down "
                                      "until its BGPPeer changes")
            log = (lab.node_dir(n) / "agent.log").read_text()
            assert f"more than its maxPrefixes {received + 2}; disconnecting it" in log
            # the ToR sees the session go and our routes withdrawn; nothing learned stays
            wait(lambda n=n: not tor2.established(address(lab, n))
                 and block_of(lab, n) not in tor2.routes(), 30, f"tor2 to lose {n}")
            assert not TOR_ROUTES & set(lab.pipit_routes(n))
        # BIRD keeps trying to connect; the node refuses, also after a pass that reconfigured
        # its speaker (a peer added for n3 alone, where nothing answers)
        disabled_since = tor_peer(lab, "n3")["since"]
        assert lab.pipitctl("apply", "-f", "-", input=yaml.safe_dump({
            "apiVersion": "pipit.dev/v1", "kind": "BGPPeer", "metadata": {"name": "poke"},
            "spec": {"peerIP": "10.99.2.250", "asNumber": 65200, "node": "n3"}})).returncode == 0
        wait(lambda: any(p["name"] == "poke" for p in lab.status("n3")["peers"]), 20,
             "n3 to take up peer poke")
        protocol = next(p.name for p in tor2.spec.peers if p.address == address(lab, "n3"))
        since = tor2.protocol(protocol).since
        ended = wait(lambda: (info := tor2.protocol(protocol)).since != since and info, 60,
                     "tor2's next attempt to connect to n3 to end")  # timed out or refused
        assert not ended.established and not tor2.established(address(lab, "n3")), ended
        # never let in (and disconnected again) meanwhile: the same disabling as before
        assert (tor_peer(lab, "n3")["state"], tor_peer(lab, "n3")["since"]) == (
            "disabled", disabled_since)
    finally:
        tor2.originate([p for p in tor2.spec.originate if p not in flood])
        lab.pipitctl("delete", "bgppeer", "poke", "--skip-not-exists")
    # changing the BGPPeer lets it come back
    apply_rack_peer(lab, 2)
    lab.wait_mesh()
    for n in ("n3", "n4"):
        wait(lambda n=n: node_sees_only_its_tor_routes(lab, n), 30, f"{n}'s routes back")
    assert_pods_reach_each_other(lab)


def segments_dropped(peer: dict) -> int:
    """How many segments the kernel dropped for TCP MD5, as the peer's reason says (0: none)."""
    found = re.search(r"the kernel dropped (\d+) segment", peer["reason"])
    return int(found[1]) if found else 0


def test_md5_wrong_or_missing_password_never_establishes_and_status_says_why(bird_lab):
    lab = bird_lab
    secret = lab.secrets_dir / "tor"
    (secret / "wrong").write_text("not-the-password\n")
    cases = [({"secretKeyRef": {"name": "tor", "key": "wrong"}}, "the passwords differ"),
             (None, "the peer signs with TCP MD5 but no password is set here")]
    try:
        for password, why in cases:
            apply_rack_peer(lab, 1, password=password)
            for n in ("n1", "n2"):
                wait(lambda n=n: why in tor_peer(lab, n)["reason"], 30,
                     f"{n}'s status to say why the session is down")
                # the session stays down while the kernel keeps dropping the peer's
                # segments: wait for more of them dropped (another attempt), then look
                dropped = segments_dropped(tor_peer(lab, n))
                wait(lambda n=n: segments_dropped(tor_peer(lab, n)) > dropped, 30,
                     f"the kernel of {n} to drop more of the ToR's segments")
                assert tor_peer(lab, n)["state"] in ("idle", "down")
                assert not lab.routers[1].established(address(lab, n))
            out = lab.pipitctl("node", "status", "--socket", str(lab.status_socket("n1")))
            assert why in out.stdout
    finally:
        apply_rack_peer(lab, 1)
    lab.wait_mesh()  # the right password establishes again
    for n in ("n1", "n2"):
        wait(lambda n=n: node_sees_only_its_tor_routes(lab, n), 30, f"{n}'s routes back")
        assert tor_peer(lab, n)["reason"] == ""


def test_a_tor_gone_silent_is_dropped_when_the_hold_timer_expires(bird_lab):
    lab, tor1 = bird_lab, bird_lab.routers[1]
    os.kill(tor1.process.pid, signal.SIGSTOP)  # alive, connected, and saying nothing
    try:
        for n in ("n1", "n2"):
            wait(lambda n=n: tor_peer(lab, n)["state"] == "down", lab.hold_time + 10,
                 f"{n}'s hold timer to expire")
            assert tor_peer(lab, n)["reason"] == "notification sent (4,0)"
            # no graceful restart after a NOTIFICATION: what the ToR sent is gone at once
            assert tor_peer(lab, n)["stale"] == 0
            assert not TOR_ROUTES & set(lab.pipit_routes(n))
        out = lab.pipitctl("node", "status", "--socket", str(lab.status_socket("n1"))).stdout
        assert "Idle: notification sent (4,0): hold timer expired" in out
    finally:
        os.kill(tor1.process.pid, signal.SIGCONT)
    lab.wait_mesh()
    for n in ("n1", "n2"):
        wait(lambda n=n: node_sees_only_its_tor_routes(lab, n), 30, f"{n}'s routes back")


def test_graceful_restart_keeps_routes_while_exabgp_restarts(bird_lab):
    lab, tor1 = bird_lab, bird_lab.routers[1]
    n1, block = address(lab, "n1"), block_of(lab, "n1")
    target = pod_of(lab, "n1").address
    kernel_before = lab.pipit_routes("n1")
    wait(lambda: ping(lab, "n3", target), 10, "the first ping")
    # a pod in the other rack pings n1's pod all along (6 s, more than the restart takes)
    pinger = subprocess.Popen([*netns.exec_prefix(pod_of(lab, "n3").netns), "ping", "-i",
                               "0.05", "-c", "120", "-W", "1", "-q", target],
                              stdout=subprocess.PIPE, text=True)
    try:
        pid = int((lab.node_dir("n1") / "exabgp" / "exabgp.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        # BIRD notices the session gone and keeps n1's block as a graceful-restart helper
        wait(lambda: not tor1.established(n1), 10, "tor1 to lose n1's session")
        assert block in tor1.routes(), "tor1 dropped n1's block instead of keeping it"
        assert lab.pipit_routes("n1") == kernel_before  # n1 keeps what it learned, too
        # the agent starts a new ExaBGP; the session comes back with the same routes
        wait(lambda: tor1.established(n1) and tor_peer(lab, "n1")["state"] == "up", 30,
             "n1's session to come back")
        wait(lambda: tor_peer(lab, "n1")["stale"] == 0, 30, "n1 to drop its stale copy")
        assert lab.pipit_routes("n1") == kernel_before
    finally:
        output = pinger.communicate(timeout=30)[0]
    assert " 120 received, 0% packet loss" in output, output  # not one packet lost
    assert_pods_reach_each_other(lab)


def test_graceful_restart_is_bounded_by_the_restart_time(bird_lab):
    lab, tor1 = bird_lab, bird_lab.routers[1]
    n2, block = address(lab, "n2"), block_of(lab, "n2")
    pid = int((lab.node_dir("n2") / "exabgp" / "exabgp.pid").read_text())
    lab.stop_agent("n2", signal.SIGKILL)  # no agent: nobody restarts ExaBGP
    os.kill(pid, signal.SIGKILL)
    wait(lambda: not tor1.established(n2), 10, "tor1 to lose n2's session")
    assert block in tor1.routes()  # kept while n2 may come back...
    wait(lambda: block not in tor1.routes(), lab.restart_time + 10,
         "tor1 to drop n2's block once the restart time is over")  # ...but not for ever
    assert str(block) not in subprocess.run(["ip", "-n", lab.tor_ns(1), "route"],
                                            capture_output=True, text=True).stdout
    lab.start_agent("n2")
    lab.wait_mesh()
    wait(lambda: block in tor1.routes(), 30, "n2's block to be back")
    assert_pods_reach_each_other(lab)


# --------------------------------------------------------------------------------------------
# FRR and GoBGP as the ToR

@pytest.mark.parametrize("router", ["frr", "gobgp"])
def test_other_routers_as_the_tor(tmp_path_factory, router):
    with rack_lab(tmp_path_factory, router) as lab:
        check_topology(lab)
        check_hijacks(lab)
