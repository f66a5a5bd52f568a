"""Routing decisions as pure functions: peers, import policy, kernel routes, exports."""

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from bgp_agent import policy
from bgp_agent.status import DropWatch, md5_diagnosis, ttl_diagnosis
from bgp_agent.bgp_config import BGPConfig
from bgp_agent.bgp_peer import BGPPeer, peer_from_spec
from bgp_agent.md5_password import PasswordRef, PasswordUnavailable
from ipip.routes import NextHop, Route
from bgp_agent.model import Neighbor, Path
from bgp_agent.node import NodeRecord
from ipam.pool import pool_from_spec

A, B, C = (IPv4Address(f"10.0.0.{i}") for i in (1, 2, 3))
POOLS = [pool_from_spec("default", {"cidr": "10.244.0.0/16"}),
         pool_from_spec("quiet", {"cidr": "10.250.0.0/24", "disableBGPExport": True})]
MESH = Neighbor(B, 64512, A, 64512, kind="mesh", name="b")
TOR = Neighbor(IPv4Address("10.0.0.254"), 65001, A, 64512, kind="global", name="tor")


def net(text: str) -> IPv4Network:
    return IPv4Network(text)


def node_record(name: str, address: str | None, as_number: int | None = None) -> NodeRecord:
    return NodeRecord(name, IPv4Interface(address) if address else None, as_number)


def test_mesh_is_every_other_node_with_an_address():
    me = node_record("a", "10.0.0.1/24")
    nodes = [me, node_record("b", "10.0.0.2/24", 65010), node_record("c", "10.0.0.3/24"),
             node_record("d", None)]
    neighbors = policy.mesh_neighbors(me, nodes, BGPConfig(node_mesh_hold_time=9))
    assert [(n.address, n.peer_as, n.name, n.hold_time) for n in neighbors] == [
        (B, 65010, "b", 9), (C, 64512, "c", 9)]
    assert all(n.local_address == A and n.local_as == 64512 for n in neighbors)
    assert policy.mesh_neighbors(me, nodes, BGPConfig(node_to_node_mesh=False)) == []
    # every node listens on the cluster's listenPort, so that is where mesh peers connect
    moved = policy.mesh_neighbors(me, nodes, BGPConfig(listen_port=1179))
    assert {(n.listen_port, n.peer_port) for n in moved} == {(1179, 1179)}
    # a node's own listenPort (node.<name> BGPConfiguration): it listens there, and the
    # others connect to it there
    own = BGPConfig(listen_port=1179, node_listen_ports=(("a", 1180), ("c", 1181)))
    assert [(n.name, n.listen_port, n.peer_port) for n in policy.mesh_neighbors(
        me, nodes, own)] == [("b", 1180, 1179), ("c", 1180, 1181)]


def test_a_bgp_peer_to_a_node_without_a_port_connects_where_that_node_listens():
    """Calico's rule: peerIP without a port, when it and asNumber are a node's, goes to that
    node's listenPort (its own, else the cluster's); a port written out, or any other
    router, as given (none: 179)."""
    me = node_record("a", "10.0.0.1/24")
    nodes = [me, node_record("b", "10.0.0.2/24", 65010), node_record("c", "10.0.0.3/24")]
    config = BGPConfig(listen_port=1179, node_listen_ports=(("c", 1181),))

    def port(peer_ip: str, as_number: int) -> int:
        peer = peer_from_spec("p", {"peerIP": peer_ip, "asNumber": as_number})
        [neighbor] = policy.select_neighbors(me, nodes, replace(config, node_to_node_mesh=False),
                                             [peer], lambda ref: "").neighbors
        return neighbor.peer_port

    assert port("10.0.0.2", 65010) == 1179  # b: the cluster's listenPort
    assert port("10.0.0.3", 64512) == 1181  # c: its own
    assert port("10.0.0.3:179", 64512) == 179  # written out
    assert port("10.0.0.3", 65099) == 179  # another AS at that address: not the node
    assert port("10.0.0.9", 64512) == 179  # a router


# etcd's word: b owns 10.244.1.0/26 and holds 10.244.9.7 (borrowed from c's block)
OWNERSHIP = policy.Ownership(
    blocks={net("10.244.1.0/26"): ("b", B), net("10.244.2.0/26"): ("b", B),
            net("10.244.9.0/26"): ("c", C), net("10.244.3.0/26"): ("c", C)},
    borrowed={IPv4Address("10.244.9.7"): ("b", B)})


def mixed_paths() -> dict[IPv4Network, Path]:
    """Routes of every verdict from the mesh peer b, with `own` = 10.244.0.0/26."""
    paths = {p: Path(p, B) for p in map(net, ["10.244.1.0/26", "10.244.9.7/32", "0.0.0.0/0",
                                              "10.244.0.0/26", "10.244.3.0/26"])}
    paths[net("10.244.2.0/26")] = Path(net("10.244.2.0/26"), B, as_path=(64512,))
    return paths


def test_a_pass_keeps_the_verdicts_of_the_very_routes_decided_before(monkeypatch):
    paths, own = mixed_paths(), {net("10.244.0.0/26")}
    first = policy.import_routes(MESH, paths, POOLS, own, 64512, OWNERSHIP)
    decided = []
    rejection = policy._rejection
    monkeypatch.setattr(policy, "_rejection", lambda *a: decided.append(a[1]) or rejection(*a))
    # the same Paths again, one replaced, one new, one gone: only the replaced and the new
    # are decided again, and the result is what a first pass would give
    later = dict(paths)
    later[net("10.244.3.0/26")] = Path(net("10.244.3.0/26"), C)  # now from its owner c
    later[net("10.244.5.0/26")] = Path(net("10.244.5.0/26"), B)
    del later[net("0.0.0.0/0")]
    again = policy.import_routes(MESH, later, POOLS, own, 64512, OWNERSHIP, previous=first)
    assert sorted(decided) == [net("10.244.3.0/26"), net("10.244.5.0/26")]
    fresh = policy.import_routes(MESH, later, POOLS, own, 64512, OWNERSHIP)
    assert (again.accepted, again.rejected) == (fresh.accepted, fresh.rejected)
    assert net("10.244.3.0/26") in again.accepted and net("0.0.0.0/0") not in again.accepted


@pytest.mark.parametrize("change", ["ownership", "own blocks", "pools", "neighbour", "as"])
def test_any_other_input_changed_decides_every_route_again(change):
    paths, own, ownership, pools, neighbor, my_as = (
        mixed_paths(), {net("10.244.0.0/26")}, OWNERSHIP, POOLS, MESH, 64512)
    first = policy.import_routes(neighbor, paths, pools, own, my_as, ownership)
    if change == "ownership":  # 10.244.1.0/26 moved from b to c
        ownership = policy.Ownership({**OWNERSHIP.blocks, net("10.244.1.0/26"): ("c", C)},
                                     OWNERSHIP.borrowed)
    elif change == "own blocks":
        own = {net("10.244.1.0/26")}
    elif change == "pools":
        pools = POOLS[1:]  # 10.244.0.0/16 gone
    elif change == "neighbour":
        neighbor = replace(MESH, allow_pool_prefixes=True)
    else:  # the node's AS: its sessions' local AS with it
        my_as, neighbor = 64513, replace(MESH, local_as=64513)
    again = policy.import_routes(neighbor, paths, pools, own, my_as, ownership, previous=first)
    fresh = policy.import_routes(neighbor, paths, pools, own, my_as, ownership)
    assert (again.accepted, again.rejected) == (fresh.accepted, fresh.rejected)
    assert (again.accepted, again.rejected) != (first.accepted, first.rejected)


def test_mesh_peers_may_only_announce_pod_addresses_they_own():
    paths = {p: Path(p, B) for p in map(net, ["10.244.1.0/26", "10.244.9.7/32", "0.0.0.0/0",
                                              "192.168.0.0/24", "10.244.0.0/26",
                                              "10.244.3.0/26", "10.244.5.0/26"])}
    paths[net("10.244.2.0/26")] = Path(net("10.244.2.0/26"), B, as_path=(64512,))
    result = policy.import_routes(MESH, paths, POOLS, {net("10.244.0.0/26")}, 64512, OWNERSHIP)
    assert set(result.accepted) == {net("10.244.1.0/26"), net("10.244.9.7/32")}
    assert result.rejected == {
        net("0.0.0.0/0"): "it is not inside an IP pool",
        net("192.168.0.0/24"): "it is not inside an IP pool",
        net("10.244.0.0/26"): "it is one of this node's own blocks",
        net("10.244.2.0/26"): "our own AS is in its AS path (a loop)",
        net("10.244.3.0/26"): "its next hop 10.0.0.2 is not node c (10.0.0.3), which owns it",
        net("10.244.5.0/26"): "no node owns it in etcd",
    }


def test_a_same_as_reflector_may_reflect_pod_routes_only_as_etcd_says():
    """A BIRD or FRR route reflector in the cluster's AS needs no allowPoolPrefixes, and no
    same-AS speaker can announce or reflect someone else's block."""
    reflector = Neighbor(IPv4Address("10.0.0.250"), 64512, A, 64512, kind="global", name="rr")
    reflected = dict(originator_id=B, cluster_list=(IPv4Address("244.0.0.1"),))
    paths = {
        net("10.244.1.0/26"): Path(net("10.244.1.0/26"), B, **reflected),  # b's, from b
        net("10.244.9.7/32"): Path(net("10.244.9.7/32"), B, **reflected),  # b's borrowed one
        net("10.244.3.0/26"): Path(net("10.244.3.0/26"), B, **reflected),  # c's block via b
        net("10.244.2.0/26"): Path(net("10.244.2.0/26"), B, originator_id=C),  # c says b's
        net("10.244.5.0/26"): Path(net("10.244.5.0/26"), reflector.address),  # nobody's
        net("0.0.0.0/0"): Path(net("0.0.0.0/0"), reflector.address),  # a ToR's, reflected
    }
    result = policy.import_routes(reflector, paths, POOLS, set(), 64512, OWNERSHIP)
    assert set(result.accepted) == {net("10.244.1.0/26"), net("10.244.9.7/32"),
                                    net("0.0.0.0/0")}
    assert result.rejected == {
        net("10.244.3.0/26"): "its next hop 10.0.0.2 is not node c (10.0.0.3), which owns it",
        net("10.244.2.0/26"): "its originator 10.0.0.3 is not node b (10.0.0.2), which owns it",
        net("10.244.5.0/26"): "no node owns it in etcd",
    }
    # an eBGP peer still gets no pod routes at all, owner or not
    external = replace(reflector, peer_as=65001)
    assert set(policy.import_routes(external, paths, POOLS, set(), 64512, OWNERSHIP).accepted
               ) == {net("0.0.0.0/0")}


def test_a_tor_cannot_hijack_pod_addresses_unless_allowed():
    hijacks = ["10.244.0.0/16", "10.244.1.0/26", "10.244.1.5/32"]
    normal = ["0.0.0.0/0", "192.168.50.1/32", "10.0.0.0/8"]  # covering routes lose to blocks
    paths = {p: Path(p, TOR.address, as_path=(65001,)) for p in map(net, hijacks + normal)}
    result = policy.import_routes(TOR, paths, POOLS, set(), 64512)
    assert set(result.accepted) == set(map(net, normal))
    assert set(result.rejected) == set(map(net, hijacks))
    allowed = policy.import_routes(replace(TOR, allow_pool_prefixes=True), paths, POOLS, set(),
                                   64512)
    assert set(allowed.accepted) == set(paths)


def test_kernel_routes_best_path_ecmp_and_blackholes():
    block = net("10.244.1.0/26")
    accepted = {
        B: {block: Path(block, B), net("0.0.0.0/0"): Path(net("0.0.0.0/0"), B, as_path=(1, 2))},
        C: {block: Path(block, C), net("0.0.0.0/0"): Path(net("0.0.0.0/0"), C, as_path=(3,))},
    }
    routes = policy.kernel_routes(accepted, {net("10.244.0.0/26")})
    assert routes[block] == Route(block, (NextHop(B), NextHop(C)))  # equal: both (ECMP)
    assert routes[net("0.0.0.0/0")] == Route(net("0.0.0.0/0"), (NextHop(C),))  # shorter path
    assert routes[net("10.244.0.0/26")] == Route(net("10.244.0.0/26"), blackhole=True)


def test_a_reachable_by_peer_gets_a_route_over_any_learned_one():
    """Calico's reachableBy: the node routes the peer's address through the gateway given,
    whatever BGP says of it (here the peer announces its own loopback, the session's
    address: installed, the session would ride on a route it carries)."""
    loopback = IPv4Address("192.0.2.2")
    gateway = IPv4Address("10.0.0.254")
    tor = replace(TOR, address=loopback, reachable_by=gateway)
    assert policy.peer_routes([MESH, TOR]) == {}
    static = policy.peer_routes([MESH, tor])
    assert static == {net("192.0.2.2/32"): Route(net("192.0.2.2/32"), (NextHop(gateway),))}
    accepted = {loopback: {net("192.0.2.2/32"): Path(net("192.0.2.2/32"), loopback),
                           net("0.0.0.0/0"): Path(net("0.0.0.0/0"), loopback)}}
    routes = policy.kernel_routes(accepted, set(), static=static)
    assert routes[net("192.0.2.2/32")] == static[net("192.0.2.2/32")]
    assert routes[net("0.0.0.0/0")] == Route(net("0.0.0.0/0"), (NextHop(loopback),))
    assert policy.kernel_routes({}, set(), static=static) == static


def test_exports_own_blocks_and_borrowed_addresses_with_communities_to_every_peer():
    """The configured communities go to other nodes too (Calico's export filter adds them on
    every session), so a reflector passes them on; the service ranges only outside."""
    own = {net("10.244.0.0/26"), net("10.250.0.0/26")}
    borrowed = {IPv4Address("10.244.7.9")}
    prefixes = policy.exported_prefixes(own, borrowed, POOLS)
    assert prefixes == {net("10.244.0.0/26"), net("10.244.7.9/32")}  # quiet pool not exported
    services = [net("10.96.0.0/12")]
    exports = policy.announcements(prefixes, [MESH, TOR], BGPConfig(communities=((64512, 7),)),
                                   services)
    assert {a.communities for a in exports[B].values()} == {((64512, 7),)}
    assert {a.communities for a in exports[TOR.address].values()} == {((64512, 7),)}
    assert set(exports[TOR.address]) == prefixes | set(services)
    assert set(exports[B]) == prefixes


# --------------------------------------------------------------------------------------------
# Sessions: the mesh, BGPPeers, and which one wins

def peer(name: str, address: str | None, as_number: int = 65101, **spec) -> BGPPeer:
    if address is None:  # a peerSelector peer: no address, no AS
        return peer_from_spec(name, spec)
    return peer_from_spec(name, {"peerIP": address, "asNumber": as_number, **spec})


def no_password(ref):
    raise AssertionError(f"no password should be read, asked for {ref}")


def test_peers_are_the_mesh_global_peers_and_the_ones_picking_this_node():
    me = NodeRecord("a", IPv4Interface("10.0.0.1/24"), 65001, labels={"rack": "r1"})
    nodes = [me, node_record("b", "10.0.0.2/24"), node_record("c", "10.0.0.3/24")]
    peers = [peer("tor", "10.0.0.254", holdTime=9, maxPrefixes=50, allowPoolPrefixes=True,
                  numAllowedLocalASNumbers=1),
             peer("rack1", "10.0.1.254", nodeSelector="rack == 'r1'"),
             peer("rack2", "10.0.2.254", nodeSelector="rack == 'r2'"),
             peer("mine", "10.0.3.254", node="a"), peer("theirs", "10.0.4.254", node="b")]
    selection = policy.select_neighbors(me, nodes, BGPConfig(), peers, no_password)
    assert [(str(n.address), n.kind, n.name) for n in selection.neighbors] == [
        ("10.0.0.2", "mesh", "b"), ("10.0.0.3", "mesh", "c"),
        ("10.0.0.254", "global", "tor"), ("10.0.1.254", "node", "rack1"),
        ("10.0.3.254", "node", "mine")]
    tor = selection.neighbors[2]
    assert (tor.local_as, tor.local_address, tor.peer_as) == (65001, A, 65101)
    assert (tor.hold_time, tor.max_prefixes, tor.allow_pool_prefixes, tor.allowed_local_as) \
        == (9, 50, True, 1)
    assert selection.skipped == []
    mesh_off = policy.select_neighbors(me, nodes, BGPConfig(node_to_node_mesh=False), peers,
                                       no_password)
    assert {n.kind for n in mesh_off.neighbors} == {"global", "node"}


def test_an_explicit_peer_wins_over_the_mesh_and_the_most_specific_peer_wins():
    me = node_record("a", "10.0.0.1/24")
    nodes = [me, node_record("b", "10.0.0.2/24")]
    peers = [peer("z-global", "10.0.0.2", 64512), peer("for-a", "10.0.0.2", 64512, node="a"),
             peer("b-global", "10.0.0.9"), peer("a-global", "10.0.0.9")]
    selection = policy.select_neighbors(me, nodes, BGPConfig(), peers, no_password)
    assert [(str(n.address), n.name) for n in selection.neighbors] == [
        ("10.0.0.2", "for-a"), ("10.0.0.9", "a-global")]
    assert {(s.name, s.kind, s.reason) for s in selection.skipped} == {
        ("z-global", "global", "BGPPeer 'for-a' already peers with this address"),
        ("b-global", "global", "BGPPeer 'a-global' already peers with this address"),
        ("b", "mesh", "node b is peered through BGPPeer 'for-a' instead")}


def test_a_peer_at_this_nodes_own_address_or_without_its_password_is_skipped():
    me = node_record("a", "10.0.0.1/24")
    peers = [peer("rr", "10.0.0.1", 64512),  # the other nodes' reflector: this node itself
             peer("tor", "10.0.0.254", password={"file": "/missing"}),
             peer("ok", "10.0.0.253", password={"secretKeyRef": {"name": "s", "key": "k"}})]

    def password(ref):
        if ref.file:
            raise PasswordUnavailable(f"the password ({ref}) cannot be read")
        return "s3cret"
    selection = policy.select_neighbors(me, [me], BGPConfig(), peers, password)
    assert [(n.name, n.password) for n in selection.neighbors] == [("ok", "s3cret")]
    assert [(s.name, s.reason) for s in selection.skipped] == [
        ("rr", "its peerIP is this node's own address"),
        ("tor", "the password (file:/missing) cannot be read")]
    assert policy.select_neighbors(node_record("x", None), [], BGPConfig(), peers,
                                   password).neighbors == []


def test_the_mesh_password_signs_every_mesh_session_or_none_goes_up_without_it():
    me, b, c = (node_record(n, f"10.0.0.{i}/24") for i, n in ((1, "a"), (2, "b"), (3, "c")))
    config = BGPConfig(node_mesh_password=PasswordRef(secret="bgp", key="mesh"))
    tor = peer("tor", "10.0.0.3", password={"file": "/etc/tor"})  # c through a BGPPeer

    def password(ref):
        return "tor-secret" if ref.file else "mesh-secret"
    selection = policy.select_neighbors(me, [me, b, c], config, [tor], password)
    assert [(n.name, n.kind, n.password) for n in selection.neighbors] == [
        ("b", "mesh", "mesh-secret"), ("tor", "global", "tor-secret")]
    assert policy.select_neighbors(me, [me, b], BGPConfig(), [], password
                                   ).neighbors[0].password is None

    def unreadable(ref):
        raise PasswordUnavailable(f"the password ({ref}) cannot be read")
    selection = policy.select_neighbors(me, [me, b, c], config, [], unreadable)
    assert selection.neighbors == []
    assert [(s.name, s.kind, s.reason) for s in selection.skipped] == [
        (name, "mesh", "nodeMeshPassword: the password (secret:bgp/mesh) cannot be read")
        for name in ("b", "c")]


def test_a_service_range_is_never_taken_from_a_peer_but_a_covering_route_is():
    """Another node's service announcement coming back through the fabric must not route
    service addresses away from this node's kube-proxy."""
    service = net("10.96.0.0/12")
    paths = {prefix: Path(prefix, IPv4Address("10.0.0.254"), as_path=(65101, 65002))
             for prefix in (service, net("10.96.1.0/24"), net("0.0.0.0/0"), net("10.0.0.0/8"))}
    result = policy.import_routes(TOR, paths, POOLS, set(), 64512, services=(service,))
    assert set(result.accepted) == {net("0.0.0.0/0"), net("10.0.0.0/8")}
    assert result.rejected == {
        prefix: "it is inside service range 10.96.0.0/12 (kube-proxy serves it on this node)"
        for prefix in (service, net("10.96.1.0/24"))}
    assert set(policy.import_routes(TOR, paths, POOLS, set(), 64512).accepted) == set(paths)


def test_our_own_as_may_come_back_as_often_as_the_peer_allows():
    rack_tor = Neighbor(IPv4Address("10.0.0.254"), 65101, A, 65001, kind="node", name="tor",
                        allowed_local_as=1, allow_pool_prefixes=True)
    paths = {net("10.244.1.0/26"): Path(net("10.244.1.0/26"), B, as_path=(65101, 65001)),
             net("10.244.2.0/26"): Path(net("10.244.2.0/26"), B,
                                        as_path=(65101, 65001, 65001))}
    result = policy.import_routes(rack_tor, paths, POOLS, set(), 65001)
    assert set(result.accepted) == {net("10.244.1.0/26")}  # pool prefixes allowed by the peer
    assert result.rejected == {net("10.244.2.0/26"): "our own AS is in its AS path (a loop)"}
    strict = policy.import_routes(TOR, paths, POOLS, set(), 65001)
    assert set(strict.rejected) == set(paths)


def test_max_prefixes_counts_everything_received():
    limited = Neighbor(IPv4Address("10.0.0.254"), 65101, A, 64512, max_prefixes=10)
    assert policy.over_limit(limited, 10) == ""
    assert policy.over_limit(limited, 11) == "it sent 11 prefixes, more than its maxPrefixes 10"
    assert policy.over_limit(TOR, 100000) == ""  # 0: no limit


def test_a_peers_local_as_number_is_the_as_of_its_sessions():
    """Calico's localASNumber: the session's local AS; a route carrying it is a loop as one
    carrying the node's own, and a peer in it is an iBGP peer (pod routes checked against
    etcd, not refused as from an external router)."""
    me = NodeRecord("n1", address=IPv4Interface("10.0.0.1/24"))
    peer = BGPPeer("tor", IPv4Address("10.0.0.254"), 65011, local_as_number=65011)
    [session] = policy.select_neighbors(me, [me], BGPConfig(), [peer], lambda ref: "").neighbors
    assert (session.local_as, session.peer_as) == (65011, 65011)
    block = net("10.244.1.0/26")
    paths = {net("0.0.0.0/0"): Path(net("0.0.0.0/0"), session.address, as_path=(65011,)),
             block: Path(block, session.address)}
    result = policy.import_routes(session, paths, POOLS, set(), 64512, OWNERSHIP)
    assert result.rejected[net("0.0.0.0/0")] == "our own AS is in its AS path (a loop)"
    assert result.rejected[block].startswith("its next hop 10.0.0.254 is not node b")
    ebgp = replace(session, peer_as=65100)
    assert policy.import_routes(ebgp, paths, POOLS, set(), 64512, OWNERSHIP).rejected[block] == (
        "it is inside an IP pool (only nodes announce pod addresses)")


def test_md5_counters_say_why_a_session_does_not_come_up():
    nothing = {"TCPMD5Failure": 0, "TCPMD5NotFound": 0, "TCPMD5Unexpected": 0}
    assert md5_diagnosis(True, nothing) == ""
    assert "passwords differ" in md5_diagnosis(True, {**nothing, "TCPMD5Failure": 3})
    assert "the peer sends no TCP MD5 signature" in md5_diagnosis(
        True, {**nothing, "TCPMD5NotFound": 1})
    assert "no password is set here" in md5_diagnosis(
        False, {**nothing, "TCPMD5Unexpected": 2})
    assert md5_diagnosis(False, {**nothing, "TCPMD5Failure": 5}) == ""


def test_ttl_drops_say_why_a_session_under_gtsm_does_not_come_up():
    assert ttl_diagnosis(0, {"TCPMinTTLDrop": 4}) == ""  # no GTSM: not ours
    assert ttl_diagnosis(2, {"TCPMinTTLDrop": 0}) == ""
    assert ttl_diagnosis(2, {"TCPMinTTLDrop": 3}) == (
        "the peer's segments arrive with a TTL below 254, the least ttlSecurity 2 accepts: it "
        "does not run GTSM (BIRD: ttl security on) or is more than 2 hops away (the kernel "
        "dropped 3 segments)")
    # the watch: growth since the neighbour last changed, MD5 first
    watch, tor = DropWatch(), Neighbor(IPv4Address("10.0.0.254"), 65101, A, 64512,
                                      ttl_security=1)
    assert watch.diagnose(tor, False, {"TCPMinTTLDrop": 10}) == ""
    assert "more than 1 hop away (the kernel dropped 1 segment)" in watch.diagnose(
        tor, False, {"TCPMinTTLDrop": 11})
    assert watch.diagnose(tor, True, {"TCPMinTTLDrop": 12}) == ""


# --------------------------------------------------------------------------------------------
# Route reflectors (Calico's model): who peers with whom, and as what

RR = IPv4Address("244.0.0.1")


def reflector(name: str, address: str, cluster=RR, **labels) -> NodeRecord:
    return NodeRecord(name, IPv4Interface(address), route_reflector_cluster_id=cluster,
                      labels={"route-reflector": "true", **labels})


CLUSTER = [node_record("a", "10.0.0.1/24"), node_record("b", "10.0.0.2/24"),
           node_record("c", "10.0.0.3/24", 65010),
           reflector("rr1", "10.0.0.11/24"), reflector("rr2", "10.0.0.12/24"),
           reflector("rr3", "10.0.0.13/24", IPv4Address("244.0.0.2"))]
TO_REFLECTORS = peer("to-rr", None, peerSelector="route-reflector == 'true'",
                     nodeSelector="all()")


def sessions(name: str, peers=(), mesh=True) -> dict[str, tuple[str, bool]]:
    me = next(n for n in CLUSTER if n.name == name)
    selection = policy.select_neighbors(me, CLUSTER, BGPConfig(node_to_node_mesh=mesh),
                                        list(peers), lambda ref: "")
    return {n.name: (n.kind, n.rr_client) for n in selection.neighbors}


def test_of_two_nodes_only_the_one_with_the_higher_address_connects():
    """ExaBGP on both ends of a collision drops both connections: two nodes that connect at
    the same moment could keep doing so for ever (seen in the lab). One side waits."""
    me = node_record("b", "10.0.0.2/24")
    nodes = [node_record("a", "10.0.0.1/24"), me, node_record("c", "10.0.0.3/24")]
    passive = {n.name: n.passive for n in policy.mesh_neighbors(me, nodes, BGPConfig())}
    assert passive == {"a": False, "c": True}


def test_reflectors_join_no_mesh_and_mesh_among_their_cluster():
    # the mesh skips reflectors; reflectors of one cluster id peer as non-clients
    assert sessions("a") == {"b": ("mesh", False), "c": ("mesh", False)}
    assert sessions("rr1") == {"rr2": ("reflector", False)}
    assert sessions("rr3") == {}
    assert sessions("a", mesh=False) == {}


def test_a_peer_selector_peers_every_node_with_every_reflector_both_ways():
    assert sessions("a", [TO_REFLECTORS], mesh=False) == {
        "rr1": ("reflector", False), "rr2": ("reflector", False), "rr3": ("reflector", False)}
    # reversePeering Auto: the reflector side comes from the same resource; a node of the
    # same AS with no cluster id, or another one, is a client; another AS is no client
    assert sessions("rr1", [TO_REFLECTORS], mesh=False) == {
        "a": ("peer-node", True), "b": ("peer-node", True), "c": ("peer-node", False),
        "rr2": ("reflector", False), "rr3": ("reflector", True)}
    manual = peer("to-rr", None, peerSelector="route-reflector == 'true'",
                  nodeSelector="!has(route-reflector)", reversePeering="Manual")
    assert sessions("rr1", [manual], mesh=False) == {"rr2": ("reflector", False)}
    assert sessions("b", [manual], mesh=False) == {
        "rr1": ("reflector", False), "rr2": ("reflector", False), "rr3": ("reflector", False)}


def test_mesh_and_reflectors_coexist_during_a_migration():
    assert sessions("a", [TO_REFLECTORS]) == {
        "b": ("mesh", False), "c": ("mesh", False), "rr1": ("reflector", False),
        "rr2": ("reflector", False), "rr3": ("reflector", False)}


def test_a_peer_ip_wins_over_a_session_between_nodes():
    explicit = peer("rr1-explicit", "10.0.0.11", 64512, nodeSelector="all()")
    me = CLUSTER[0]
    selection = policy.select_neighbors(me, CLUSTER, BGPConfig(node_to_node_mesh=False),
                                        [TO_REFLECTORS, explicit], lambda ref: "")
    [rr1] = [n for n in selection.neighbors if n.address == IPv4Address("10.0.0.11")]
    assert (rr1.kind, rr1.name) == ("node", "rr1-explicit")
    assert [s.reason for s in selection.skipped] == [
        "node rr1 is peered through BGPPeer 'rr1-explicit' instead"]


def test_peer_selector_refusals():
    import pytest
    from ipam.errors import InvalidResource
    for spec, fact in (
            ({"peerSelector": "all()", "peerIP": "10.0.0.9"}, "either peerIP or peerSelector"),
            ({"peerSelector": "all()", "asNumber": 64512}, "asNumber goes with peerIP"),
            ({"peerSelector": "rack ==="}, "peerSelector"),
            ({"peerSelector": "all()", "reversePeering": "Sometimes"}, "Auto or Manual"),
            ({"peerIP": "10.0.0.9", "asNumber": 1, "reversePeering": "Auto"}, "peerSelector")):
        with pytest.raises(InvalidResource, match=fact):
            peer_from_spec("p", spec)
    from bgp_agent.bgp_peer import check_peer
    itself = peer_from_spec("self", {"node": "rr1", "peerSelector": "route-reflector == 'x'"})
    with pytest.raises(InvalidResource, match="pick only node rr1, which cannot peer with "
                                              "itself"):
        check_peer(itself, [], [replace(CLUSTER[3], labels={"route-reflector": "x"})])


def test_a_cluster_id_is_an_ipv4_address():
    import pytest
    from bgp_agent.node import node_from_document, node_to_document, parse_cluster_id
    from ipam.errors import InvalidResource
    assert parse_cluster_id("244.0.0.1", "x") == RR
    for bad in ("244.0.0", "1", "not-an-id", "::1", 7):
        with pytest.raises(InvalidResource, match="routeReflectorClusterID"):
            parse_cluster_id(bad, "x")
    stored = node_from_document(node_to_document(CLUSTER[3]))
    assert stored.route_reflector_cluster_id == RR
