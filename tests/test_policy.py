"""Routing decisions as pure functions: peers, import policy, kernel routes, exports."""

from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from bgp_agent import policy
from bgp_agent.bgp_config import BGPConfig
from bgp_agent.kernel_routes import NextHop, Route
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


def node(name: str, address: str | None, as_number: int | None = None) -> NodeRecord:
    return NodeRecord(name, IPv4Interface(address) if address else None, as_number)


def test_mesh_is_every_other_node_with_an_address():
    me = node("a", "10.0.0.1/24")
    nodes = [me, node("b", "10.0.0.2/24", 65010), node("c", "10.0.0.3/24"), node("d", None)]
    neighbors = policy.mesh_neighbors(me, nodes, BGPConfig(node_mesh_hold_time=9))
    assert [(n.address, n.peer_as, n.name, n.hold_time) for n in neighbors] == [
        (B, 65010, "b", 9), (C, 64512, "c", 9)]
    assert all(n.local_address == A and n.local_as == 64512 for n in neighbors)
    assert policy.mesh_neighbors(me, nodes, BGPConfig(node_to_node_mesh=False)) == []


def test_mesh_peers_may_only_announce_pod_addresses():
    paths = {p: Path(p, B) for p in map(net, ["10.244.1.0/26", "10.244.9.7/32", "0.0.0.0/0",
                                              "192.168.0.0/24", "10.244.0.0/26"])}
    paths[net("10.244.2.0/26")] = Path(net("10.244.2.0/26"), B, as_path=(64512,))
    result = policy.import_routes(MESH, paths, POOLS, {net("10.244.0.0/26")}, 64512)
    assert set(result.accepted) == {net("10.244.1.0/26"), net("10.244.9.7/32")}
    assert result.rejected == {
        net("0.0.0.0/0"): "it is not inside an IP pool",
        net("192.168.0.0/24"): "it is not inside an IP pool",
        net("10.244.0.0/26"): "it is one of this node's own blocks",
        net("10.244.2.0/26"): "our own AS is in its AS path (a loop)",
    }


def test_a_tor_cannot_hijack_pod_addresses_unless_allowed():
    hijacks = ["10.244.0.0/16", "10.244.1.0/26", "10.244.1.5/32"]
    normal = ["0.0.0.0/0", "192.168.50.1/32", "10.0.0.0/8"]  # covering routes lose to blocks
    paths = {p: Path(p, TOR.address, as_path=(65001,)) for p in map(net, hijacks + normal)}
    result = policy.import_routes(TOR, paths, POOLS, set(), 64512)
    assert set(result.accepted) == set(map(net, normal))
    assert set(result.rejected) == set(map(net, hijacks))
    allowed = policy.import_routes(TOR, paths, POOLS, set(), 64512, allow_pool_prefixes=True)
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


def test_exports_own_blocks_and_borrowed_addresses_with_communities_for_external_peers():
    own = {net("10.244.0.0/26"), net("10.250.0.0/26")}
    borrowed = {IPv4Address("10.244.7.9")}
    prefixes = policy.exported_prefixes(own, borrowed, POOLS)
    assert prefixes == {net("10.244.0.0/26"), net("10.244.7.9/32")}  # quiet pool not exported
    exports = policy.announcements(prefixes, [MESH, TOR], BGPConfig(communities=((64512, 7),)))
    assert {a.communities for a in exports[B].values()} == {()}
    assert {a.communities for a in exports[TOR.address].values()} == {((64512, 7),)}
    assert set(exports[TOR.address]) == prefixes
