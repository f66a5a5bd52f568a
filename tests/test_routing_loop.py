"""The routing loop (bgp_agent.routing.Router) on its own: the cluster's state in an in-memory
store, peers played through an in-memory speaker, routes in an in-memory kernel behind the
real RouteTable, time from a clock the test moves. Each pass is run by the test (reconcile).
The same loop against real ExaBGP, BIRD, etcd and kernels: test_speaker, test_tor, test_lab."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import replace
from contextlib import asynccontextmanager
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from bgp_agent import routing
from bgp_agent.bgp_peer import peer_from_spec, peer_to_document
from bgp_agent.model import Announcement, Path
from bgp_agent.node import NodeRecord, node_to_document
from bgp_agent.reflection import RESYNC_SECONDS
from bgp_agent.routing import STARTUP_GRACE_SECONDS, Router
from ipam import block as blocks
from ipam import keys
from ipam.pool import pool_from_spec, pool_to_document
from ipam.resource import make_document
from ipip.route_table import RouteTable
from ipip import recursive
from ipip.route_netlink import RTN_UNICAST
from ipip.routes import FibMatch, NextHop, Route
from lab.process import wait_async
from pipitctl.node_status import render
from tests.doubles import Clock, HeldSpeaker, MemoryKernel, MemorySpeaker, MemoryStore

A, N = IPv4Address, IPv4Network
ME = NodeRecord("n1", IPv4Interface("10.0.0.1/24"))
CLUSTER_ID = A("244.0.0.1")
RR1 = NodeRecord("rr1", IPv4Interface("10.0.0.11/24"), route_reflector_cluster_id=CLUSTER_ID)
RR2 = NodeRecord("rr2", IPv4Interface("10.0.0.12/24"), route_reflector_cluster_id=CLUSTER_ID)
N1, R2 = A("10.0.0.1"), A("10.0.0.12")
N2, N3 = A("10.0.0.2"), A("10.0.0.3")
TOR = A("10.0.0.254")
OWN_BLOCK = N("10.244.0.0/26")
BLOCK2, BLOCK3 = N("10.244.1.0/26"), N("10.244.2.0/26")


def via(prefix: IPv4Network, *gateways: IPv4Address) -> Route:
    return Route(prefix, tuple(NextHop(g) for g in gateways))


class Cluster:
    """Nodes n1 (this one), n2 and n3 in a mesh; or, with `reflector`, this node is rr1, a
    route reflector, n1-n3 its clients and rr2 a fellow reflector (mesh off, one BGPPeer
    peering every node with every reflector)."""

    def __init__(self, kernel_routes=(), reflector: bool = False, speaker=None):
        self.store = MemoryStore()
        self.speaker = speaker or MemorySpeaker()
        self.kernel = MemoryKernel(kernel_routes)
        self.clock = Clock()
        me = replace(RR1, labels={"route-reflector": "true"}) if reflector else ME
        self.router = Router(self.store, me, self.speaker, RouteTable(self.kernel,
                                                                      clock=self.clock),
                             clock=self.clock)
        self.store.put(keys.pool_key("default"), pool_to_document(
            pool_from_spec("default", {"cidr": "10.244.0.0/16"})))
        for name, address in (("n1", "10.0.0.1/24"), ("n2", "10.0.0.2/24"),
                              ("n3", "10.0.0.3/24")):
            self.add_node(name, address)
        if reflector:
            for record in (RR1, RR2):
                self.add_node(record.name, str(record.address), record.route_reflector_cluster_id)
            self.store.put(keys.resource_key("bgpconfig", "default"), make_document(
                "BGPConfiguration", "default", {"nodeToNodeMeshEnabled": False}))
            self.add_peer("to-rr", nodeSelector="all()",
                          peerSelector="route-reflector == 'true'")
        else:
            self.claim(OWN_BLOCK)
        self.claim(BLOCK2, "n2")

    def add_node(self, name: str, address: str, cluster_id=None, labels=None) -> None:
        labels = {"route-reflector": "true"} if cluster_id else (labels or {})
        self.store.put(keys.node_key(name), node_to_document(NodeRecord(
            name, IPv4Interface(address), labels=labels,
            route_reflector_cluster_id=cluster_id)))

    def claim(self, cidr: IPv4Network, node: str = "n1") -> None:
        self.store.put(keys.block_key(cidr), blocks.to_json(blocks.new_block(cidr, node)))
        self.store.put(keys.affinity_key(node, cidr), {"state": "confirmed"})

    def add_peer(self, name: str, **spec) -> None:
        self.store.put(keys.resource_key("bgppeers", name),
                       peer_to_document(peer_from_spec(name, spec)))

    async def sync(self) -> None:
        """Let the mirrors take in what the test wrote, then one pass."""
        await self.store.settled()
        await self.router.reconcile()

    def peer(self, address: IPv4Address) -> dict:
        return next(p for p in self.router.status.to_json()["peers"]
                    if p["address"] == str(address))

    def settle_peers(self, *addresses: IPv4Address) -> None:
        for address in addresses:
            self.speaker.up(address)
            self.speaker.end_of_rib(address)


@asynccontextmanager
async def running(cluster: Cluster):
    tasks = [asyncio.create_task(m.run()) for m in cluster.router.mirrors]
    try:
        await asyncio.gather(*(m.ready.wait() for m in cluster.router.mirrors))
        yield cluster
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run(test):
    """An async test body run on its own loop (no plugin needed)."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return wrapper


@run
async def test_log_severity_screen_sets_the_agents_log_level_and_unset_gives_it_back():
    """Calico's logSeverityScreen in the BGPConfiguration: the agent logs at that level from
    the next pass; taken out, at the level it started with."""
    import logging
    root = logging.getLogger()
    started = root.level
    try:
        root.setLevel("WARNING")
        c = Cluster()
        async with running(c):
            await c.sync()
            assert root.level == logging.WARNING
            config = keys.resource_key("bgpconfig", "default")
            c.store.put(config, make_document("BGPConfiguration", "default",
                                              {"logSeverityScreen": "Debug"}))
            await c.sync()
            assert root.level == logging.DEBUG
            c.store.put(config, make_document("BGPConfiguration", "default",
                                              {"logSeverityScreen": "Fatal"}))
            await c.sync()
            assert root.level == logging.CRITICAL
            c.store.put(config, make_document("BGPConfiguration", "default", {}))
            await c.sync()
            assert root.level == logging.WARNING
            # Calico's node-specific BGPConfiguration: this node's wins over the default's;
            # another node's is not this one's
            mine = keys.resource_key("bgpconfig", f"node.{ME.name}")
            other = keys.resource_key("bgpconfig", "node.elsewhere")
            c.store.put(other, make_document("BGPConfiguration", "node.elsewhere",
                                             {"logSeverityScreen": "Debug"}))
            c.store.put(config, make_document("BGPConfiguration", "default",
                                              {"logSeverityScreen": "Error"}))
            await c.sync()
            assert root.level == logging.ERROR
            c.store.put(mine, make_document("BGPConfiguration", f"node.{ME.name}",
                                            {"logSeverityScreen": "Info"}))
            await c.sync()
            assert root.level == logging.INFO
            assert c.router.config().log_severity == "Error"  # the cluster's stays the default
            c.store.delete(mine)
            await c.sync()
            assert root.level == logging.ERROR
    finally:
        root.setLevel(started)


def test_the_status_names_the_node_and_its_address_before_the_first_pass():
    """`pipitctl node status` asked while the agent has just started (the status socket opens
    before the routing loop's first pass) shows what the node registered, not an empty
    address."""
    status = Cluster().router.status.to_json()
    assert (status["node"], status["address"]) == (ME.name, str(ME.address))


@run
async def test_a_new_address_in_the_nodes_own_record_waits_for_a_new_routing_pass():
    """The agent's sessions and ExaBGP's router id are the registered address's: its record
    readdressed in etcd (the agent registering a detected address, or a hand edit) changes
    nothing in this pass's sessions; a new pass takes it up (a reconfiguration half-way,
    while the agent moved to the new address, left a peer without the node's routes)."""
    async with running(Cluster()) as c:
        await c.sync()
        assert {n.local_address for n in c.speaker.neighbors} == {A("10.0.0.1")}
        c.add_node("n1", "10.0.0.9/24", labels={"zone": "z1"})
        await c.sync()
        assert {n.local_address for n in c.speaker.neighbors} == {A("10.0.0.1")}
        assert c.router.node_record().labels == {"zone": "z1"}  # the rest is taken up
        assert c.router.status.to_json()["address"] == "10.0.0.1/24"


@run
async def test_a_node_whose_address_a_pool_holds_is_warned_about_in_its_status():
    """An address stored before pools were checked (or a pool made by hand) keeps working, as
    an upgrade must, but `node status` says what is wrong until it is fixed."""
    async with running(Cluster()) as c:
        await c.sync()
        assert c.router.status.to_json()["warnings"] == []
        c.store.put(keys.pool_key("wide"), pool_to_document(
            pool_from_spec("wide", {"cidr": "10.0.0.0/16"})))
        await c.sync()
        assert c.router.status.to_json()["warnings"] == [
            "node n1: its address 10.0.0.1 is inside IPPool 'wide' (10.0.0.0/16): a pod could "
            "be given it, and the routes to the pool's blocks would take traffic meant for the "
            "node; give the node an address outside every pool (meanwhile an IPReservation "
            "of 10.0.0.1 keeps it from pods)"]
        c.store.delete(keys.pool_key("wide"))
        await c.sync()
        assert c.router.status.to_json()["warnings"] == []


@run
async def test_own_blocks_borrowed_addresses_and_owners_follow_etcd_between_passes():
    """Worked out once per change of etcd's tables, not per pass: the same answer while they
    stay, a new one as soon as a block, an affinity, a borrowed address or a node changes."""
    async with running(Cluster()) as c:
        router = c.router
        await c.store.settled()
        own, borrowed, owners = router.own_blocks(), router.borrowed(), router.ownership()
        assert own == {OWN_BLOCK} and borrowed == set()
        assert router.own_blocks() is own and router.ownership() is owners  # nothing changed
        fresh = N("10.244.7.0/26")
        c.store.put(keys.block_key(fresh), blocks.to_json(blocks.new_block(fresh, "n1")))
        await c.store.settled()
        assert router.own_blocks() == {OWN_BLOCK}  # its affinity not confirmed yet
        c.store.put(keys.affinity_key("n1", fresh), {"state": "confirmed"})
        await c.store.settled()
        assert router.own_blocks() == {OWN_BLOCK, fresh}
        lent = blocks.assign_address(blocks.new_block(BLOCK2, "n2"), BLOCK2[5], "h",
                                     {"node": "n1"})
        c.store.put(keys.block_key(BLOCK2), blocks.to_json(lent))
        await c.store.settled()
        assert router.borrowed() == {BLOCK2[5]}
        assert router.ownership().borrowed[BLOCK2[5]] == ("n1", A("10.0.0.1"))
        c.add_node("n1", "10.0.0.9/24")
        await c.store.settled()
        assert router.ownership().borrowed[BLOCK2[5]] == ("n1", A("10.0.0.9"))
        c.store.delete(keys.block_key(fresh))
        await c.store.settled()
        assert router.own_blocks() == {OWN_BLOCK}


@run
async def test_mesh_routes_are_imported_announced_and_end_of_rib_follows_the_table():
    async with running(Cluster()) as c:
        await c.sync()
        assert [n.address for n in c.speaker.neighbors] == [N2, N3]
        assert c.kernel.routes == {OWN_BLOCK: Route(OWN_BLOCK, blackhole=True)}
        c.settle_peers(N2, N3)
        c.speaker.send(N2, Path(BLOCK2, N2))
        await c.sync()
        assert c.kernel.routes[BLOCK2] == via(BLOCK2, N2)
        assert set(c.speaker.announced[N2]) == {OWN_BLOCK}
        assert c.speaker.end_of_rib_sent == [N2, N3]  # once per session, after our table
        await c.sync()
        assert c.speaker.end_of_rib_sent == [N2, N3]
        c.speaker.down(N2)
        c.speaker.up(N2)  # a new session gets our table and End-of-RIB again
        await c.sync()
        assert c.speaker.end_of_rib_sent == [N2, N3, N2]


@pytest.mark.parametrize("inline", [True, False])  # a small table in the loop, a big one not
@run
async def test_an_import_that_policy_rejects_is_not_installed_and_says_why(inline, monkeypatch):
    monkeypatch.setattr(routing, "INLINE_IMPORT_ROUTES", 10_000 if inline else 0)
    async with running(Cluster()) as c:
        c.settle_peers(N2, N3)
        outside, own = Path(N("192.168.7.0/24"), N2), Path(OWN_BLOCK, N2)
        c.speaker.send(N2, outside, own, Path(BLOCK2, N2))
        c.speaker.send(N3, Path(BLOCK3, N3))  # n3 announces a block etcd does not give it
        await c.sync()
        assert N("192.168.7.0/24") not in c.kernel.routes
        assert c.kernel.routes[OWN_BLOCK].blackhole  # our own block stays ours
        assert BLOCK3 not in c.kernel.routes
        assert c.peer(N2)["rejectedReasons"] == {"it is not inside an IP pool": 1,
                                                  "it is one of this node's own blocks": 1}
        assert (c.peer(N2)["accepted"], c.peer(N2)["rejected"]) == (1, 2)
        assert c.peer(N3)["rejectedReasons"] == {"no node owns it in etcd": 1}
        c.claim(BLOCK3, "n3")  # etcd catches up: the next pass takes it
        await c.sync()
        assert c.kernel.routes[BLOCK3] == via(BLOCK3, N3)


@run
async def test_a_peer_over_its_max_prefixes_is_disconnected_until_its_bgppeer_changes():
    async with running(Cluster()) as c:
        c.add_peer("tor", peerIP=str(TOR), asNumber=65001, maxPrefixes=2)
        await c.sync()
        assert TOR in {n.address for n in c.speaker.neighbors}
        c.settle_peers(N2, N3, TOR)
        c.speaker.send(TOR, *(Path(N(f"192.168.{i}.0/24"), TOR) for i in range(3)))
        await c.sync()
        assert TOR not in {n.address for n in c.speaker.neighbors}
        assert c.peer(TOR)["state"] == "disabled"
        assert "more than its maxPrefixes 2" in c.peer(TOR)["reason"]
        assert not any(r.dst.subnet_of(N("192.168.0.0/16")) for r in c.kernel.routes.values())
        await c.sync()  # it stays out
        assert TOR not in {n.address for n in c.speaker.neighbors}
        c.add_peer("tor", peerIP=str(TOR), asNumber=65001, maxPrefixes=10)
        await c.sync()
        assert TOR in {n.address for n in c.speaker.neighbors}


@run
async def test_learned_routes_stay_through_the_start_up_grace_until_every_peer_has_sent_its_table():
    left_over = via(BLOCK3, N3)  # in the kernel from before the agent restarted
    async with running(Cluster([left_over])) as c:
        c.speaker.connected = False
        await c.sync()
        assert c.kernel.routes[BLOCK3] == left_over  # nothing known yet: kept
        c.speaker.connected = True
        c.settle_peers(N2)  # n3 not up yet
        await c.sync()
        assert c.kernel.routes[BLOCK3] == left_over  # still in the grace
        c.settle_peers(N3)  # n3 back, without that block
        await c.sync()
        assert BLOCK3 not in c.kernel.routes


@run
async def test_the_start_up_grace_ends_on_time_even_if_a_peer_never_comes():
    async with running(Cluster([via(BLOCK3, N3)])) as c:
        c.settle_peers(N2)
        await c.sync()
        assert BLOCK3 in c.kernel.routes
        c.clock.advance(STARTUP_GRACE_SECONDS)
        await c.sync()
        assert BLOCK3 not in c.kernel.routes


async def _a_peer_with_routes(c: Cluster) -> None:
    c.settle_peers(N2, N3)
    c.speaker.send(N2, Path(BLOCK2, N2))
    await c.sync()
    assert BLOCK2 in c.kernel.routes


@run
async def test_a_peer_restarting_gracefully_keeps_its_routes_until_its_restart_time():
    async with running(Cluster()) as c:
        await _a_peer_with_routes(c)
        c.speaker.down(N2, "closing connection")
        await c.sync()
        assert c.kernel.routes[BLOCK2] == via(BLOCK2, N2)
        assert (c.peer(N2)["state"], c.peer(N2)["stale"]) == ("down", 1)
        c.clock.advance(119)
        await c.sync()
        assert BLOCK2 in c.kernel.routes
        c.clock.advance(1)
        await c.sync()
        assert BLOCK2 not in c.kernel.routes and c.peer(N2)["stale"] == 0


@run
async def test_a_peer_back_from_a_restart_replaces_its_kept_routes_at_end_of_rib():
    async with running(Cluster()) as c:
        await _a_peer_with_routes(c)
        c.speaker.down(N2)
        await c.sync()
        c.speaker.up(N2)
        await c.sync()
        assert BLOCK2 in c.kernel.routes and c.peer(N2)["stale"] == 1  # table not complete
        c.speaker.end_of_rib(N2)  # back, without that block
        await c.sync()
        assert BLOCK2 not in c.kernel.routes and c.peer(N2)["stale"] == 0


@pytest.mark.parametrize("order", ["at once", "learned later"])
@run
async def test_a_notification_ends_graceful_restart_and_no_stale_routes_are_reported(order):
    """A hold timer that expired ends with our NOTIFICATION: no restart is coming. Also when
    the NOTIFICATION is only learned after a first "down" (the flaky ToR test's case)."""
    async with running(Cluster()) as c:
        await _a_peer_with_routes(c)
        if order == "learned later":
            c.speaker.down(N2, "closing connection")
            await c.sync()
            assert c.peer(N2)["stale"] == 1
        c.speaker.down(N2, "notification sent (4,0)", notification=True)
        await c.sync()
        assert c.peer(N2)["state"] == "down" and c.peer(N2)["stale"] == 0
        assert BLOCK2 not in c.kernel.routes


@run
async def test_a_peer_that_is_removed_loses_its_session_and_its_routes():
    async with running(Cluster()) as c:
        await _a_peer_with_routes(c)
        c.store.delete(keys.node_key("n2"))
        await c.sync()
        assert [n.address for n in c.speaker.neighbors] == [N3]
        assert BLOCK2 not in c.kernel.routes
        assert all(p["address"] != str(N2) for p in c.router.status.to_json()["peers"])


@run
async def test_a_route_the_kernel_refuses_is_reported_and_tried_again():
    async with running(Cluster()) as c:
        c.kernel.refuse.add(BLOCK2)
        c.settle_peers(N2, N3)
        c.speaker.send(N2, Path(BLOCK2, N2))
        await c.sync()
        assert BLOCK2 not in c.kernel.routes
        assert "kernel refused add 10.244.1.0/26 via 10.0.0.2" in c.router.status.last_error
        c.kernel.refuse.clear()
        await c.sync()  # the next pass, without a resync
        assert c.kernel.routes[BLOCK2] == via(BLOCK2, N2)
        assert c.kernel.dumps == 1


@run
async def test_a_next_hop_on_no_link_goes_via_the_kernels_route_to_it(monkeypatch):
    """n4 is in another subnet and the pool has no encapsulation: the kernel would refuse
    `via 10.0.1.4`, so its block goes via the router the kernel reaches 10.0.1.4 by (BIRD's
    `gateway recursive`, as in Calico); when that route changes, between passes, a pass
    follows."""
    monkeypatch.setattr(recursive, "UNDERLAY_CHECK_SECONDS", 0.01)
    far, block4, eth0 = A("10.0.1.4"), N("10.244.3.0/26"), 2
    async with running(Cluster()) as c:
        c.add_node("n4", "10.0.1.4/24")
        c.claim(block4, "n4")
        c.kernel.underlay[far] = FibMatch(N("0.0.0.0/0"), RTN_UNICAST, 3, (NextHop(TOR, eth0),))
        c.settle_peers(N2, N3, far)
        c.speaker.send(N2, Path(BLOCK2, N2))
        c.speaker.send(far, Path(block4, far))
        await c.sync()
        assert c.kernel.routes[block4] == Route(block4, (NextHop(TOR, eth0),))
        assert c.kernel.routes[BLOCK2] == via(BLOCK2, N2)  # on the node's network: no lookup
        assert c.kernel.lookups == [far]
        status = c.router.status.to_json()
        assert status["underlay"] == {"10.0.1.4": ["10.0.0.254"]}
        assert "Next hops on none of this node's links: 10.0.1.4 via 10.0.0.254." in \
            render(status)

        follower = asyncio.create_task(c.router._follow_underlay())
        try:
            c.router.changed.clear()
            other = A("10.0.0.253")
            c.kernel.underlay[far] = FibMatch(N("10.0.1.0/24"), RTN_UNICAST, 3,
                                              (NextHop(other, eth0),))
            await wait_async(c.router.changed.is_set, 5, "a pass after the route to n4 moved")
            await c.sync()
            assert c.kernel.routes[block4] == Route(block4, (NextHop(other, eth0),))
            del c.kernel.underlay[far]  # nothing leads there now: the kernel is left to refuse
            await c.sync()
            assert c.kernel.routes[block4] == via(block4, far)
            assert "10.0.1.4 (no route leads there)" in render(c.router.status.to_json())
        finally:
            follower.cancel()


# --------------------------------------------------------------------------------------------
# As a route reflector (RFC 4456 in route_reflector, driven by bgp_agent.reflection)

def reflected_to(c: Cluster, peer: IPv4Address) -> dict[IPv4Network, object]:
    return {p: a for p, a in c.speaker.announced.get(peer, {}).items() if a.next_hop}


@run
async def test_a_reflector_reflects_a_clients_routes_to_everyone_and_a_non_clients_to_clients():
    async with running(Cluster(reflector=True)) as c:
        await c.sync()
        assert {n.address: n.rr_client for n in c.speaker.neighbors} == {
            N1: True, N2: True, N3: True, R2: False}
        c.settle_peers(N1, N2, N3, R2)
        c.speaker.send(N2, Path(BLOCK2, N2))  # a client's block
        c.claim(BLOCK3, "n3")
        c.speaker.send(R2, Path(BLOCK3, N3, originator_id=N3, cluster_list=(CLUSTER_ID,)))
        await c.sync()
        # n2's block goes to the other clients and to rr2, not back to n2, with n2 as its
        # originator and our cluster id; next hop kept
        for peer in (N1, N3, R2):
            route = reflected_to(c, peer)[BLOCK2]
            assert (route.next_hop, route.originator_id, route.cluster_list) == (
                N2, N2, (CLUSTER_ID,))
        assert BLOCK2 not in reflected_to(c, N2)
        # what came from rr2 carries our own cluster id: a loop, reflected to nobody
        assert all(BLOCK3 not in reflected_to(c, p) for p in (N1, N2, N3, R2))
        c.speaker.send(R2, Path(BLOCK3, N3, originator_id=N3,
                                cluster_list=(A("244.0.0.9"),)))  # another cluster's
        await c.sync()
        # a non-client's route goes to the clients only (n3 drops its own by ORIGINATOR_ID)
        assert all(reflected_to(c, p)[BLOCK3].next_hop == N3 for p in (N1, N2, N3))
        assert BLOCK3 not in reflected_to(c, R2)


@run
async def test_a_route_reflected_in_the_pass_of_the_periodic_check_is_sent_once():
    """The full check compares with what the speaker holds after the pass's own sends: before
    them, everything the pass reflects looks missing and went out twice."""
    async with running(Cluster(reflector=True)) as c:
        c.settle_peers(N1, N2, N3, R2)
        await c.sync()
        c.clock.advance(RESYNC_SECONDS)  # the check is due in the next pass
        c.speaker.send(N2, Path(BLOCK2, N2))
        await c.sync()
        sent = [peer for peer, prefix in c.speaker.announcements_sent if prefix == BLOCK2]
        assert sorted(sent) == sorted([N1, N3, R2])


@run
async def test_a_clients_session_loss_withdraws_or_keeps_its_routes_as_graceful_restart_says():
    async with running(Cluster(reflector=True)) as c:
        c.settle_peers(N1, N2, N3, R2)
        c.speaker.send(N2, Path(BLOCK2, N2))
        await c.sync()
        assert BLOCK2 in reflected_to(c, N1)
        c.speaker.down(N2, "closing connection")  # it negotiated graceful restart
        await c.sync()
        assert BLOCK2 in reflected_to(c, N1)  # kept, stale
        c.speaker.down(N2, "notification received (6,2)", notification=True)
        await c.sync()
        assert BLOCK2 not in reflected_to(c, N1)


@run
async def test_a_restarted_reflector_withdraws_what_it_no_longer_reflects_and_holds_its_end_of_rib():
    async with running(Cluster(reflector=True)) as c:
        stale = N("10.244.9.0/26")  # sent by the reflector before the agent restarted
        c.settle_peers(N1, N3, R2)
        c.speaker.up(N2)  # n2 is still sending its table
        c.speaker.announced[N1] = {stale: Announcement(stale, next_hop=N2)}
        await c.sync()
        assert stale not in c.speaker.announced[N1]
        assert c.speaker.end_of_rib_sent == []  # n2 has not finished: no End-of-RIB yet
        c.speaker.send(N2, Path(BLOCK2, N2))
        c.speaker.end_of_rib(N2)
        await c.sync()
        assert BLOCK2 in reflected_to(c, N1)
        assert sorted(c.speaker.end_of_rib_sent) == sorted([N1, N2, N3, R2])


@run
async def test_a_reflector_withdraws_its_own_block_once_gone_and_keeps_what_it_reflects():
    mine = N("10.244.5.0/26")
    async with running(Cluster(reflector=True)) as c:
        c.settle_peers(N1, N2, N3, R2)
        c.claim(mine, "rr1")
        c.speaker.send(N2, Path(BLOCK2, N2))
        await c.sync()
        assert all(c.speaker.announced[p][mine].next_hop is None for p in (N1, N2, N3, R2))
        assert BLOCK2 in reflected_to(c, N1)
        c.claim(mine, "n3")  # the block is n3's now
        await c.sync()
        assert all(mine not in c.speaker.announced[p] for p in (N1, N2, N3, R2))
        assert BLOCK2 in reflected_to(c, N1) and BLOCK2 in reflected_to(c, N3)


@run
async def test_a_reflectors_pass_does_not_wait_for_the_last_ones_sends_and_asks_after_them():
    """Routes keep arriving while ExaBGP sends the last pass's: the next pass runs and asks
    for its own, after those (in order: what is asked of a peer later goes after)."""
    async with running(Cluster(reflector=True, speaker=HeldSpeaker())) as c:
        c.settle_peers(N1, N2, N3, R2)
        await c.sync()
        c.speaker.send(N2, Path(BLOCK2, N2))
        await c.sync()
        c.claim(BLOCK3, "n3")
        await c.store.settled()
        c.speaker.send(N3, Path(BLOCK3, N3))
        await c.sync()  # returns with the first pass's sends still unanswered
        assert not reflected_to(c, N1)
        assert c.speaker.requests == [
            *[("announce", n, BLOCK2) for n in sorted((N1, N3, R2))],
            *[("announce", n, BLOCK3) for n in sorted((N1, N2, R2))]]
        c.speaker.release()
        assert set(reflected_to(c, N1)) == {BLOCK2, BLOCK3}


@run
async def test_a_block_of_the_reflector_that_another_node_took_is_not_withdrawn_after_its_route():
    """The block's new owner's route, reflected, replaces the reflector's own in ExaBGP; a
    withdrawal of the reflector's own asked after it (its answer not in yet) would take it
    away from the peers."""
    mine = N("10.244.5.0/26")
    async with running(Cluster(reflector=True, speaker=HeldSpeaker())) as c:
        c.settle_peers(N1, N2, N3, R2)
        c.claim(mine, "rr1")
        await c.sync()
        assert all(c.speaker.announced[p][mine].next_hop is None for p in (N1, N2, N3, R2))
        c.claim(mine, "n3")
        c.speaker.send(N3, Path(mine, N3))
        await c.sync()
        withdrawn = {n for kind, n, p in c.speaker.requests if (kind, p) == ("withdraw", mine)}
        assert withdrawn == {N3}  # n3 is not sent its own route back: ours goes from it
        c.speaker.release()
        assert all(c.speaker.announced[p][mine].next_hop == N3 for p in (N1, N2, R2))
        assert mine not in c.speaker.announced[N3]


@run
async def test_a_reflected_send_that_fails_is_made_good_a_second_later():
    async with running(Cluster(reflector=True, speaker=HeldSpeaker())) as c:
        c.settle_peers(N1, N2, N3, R2)
        await c.sync()
        c.speaker.send(N2, Path(BLOCK2, N2))
        await c.sync()
        c.router.changed.clear()  # (the test runs the passes; nothing else sets it now)
        c.speaker.fail()  # the session to ExaBGP went down meanwhile, say
        await asyncio.wait_for(c.router.changed.wait(), 5)  # the failure lands, wakes a pass
        await c.sync()
        assert not c.speaker.held  # nothing asked again yet
        c.clock.advance(1.0)
        checking = asyncio.create_task(c.sync())  # against what the speaker holds, it waits
        await wait_async(lambda: c.speaker.held, 5, "the check's sends")  # for what it asks
        assert sorted(c.speaker.requests[3:]) == sorted(
            ("announce", n, BLOCK2) for n in (N1, N3, R2))
        c.speaker.release()
        await asyncio.wait_for(checking, 5)
        assert BLOCK2 in reflected_to(c, N1) and BLOCK2 in reflected_to(c, N3)
        assert not c.router.reflection.due_check(c.clock())  # the next in a minute


@run
async def test_end_of_rib_is_asked_of_every_peer_at_once():
    """Not one peer after another, each waiting for the last one's answer: a reflector's
    hundreds of clients held its pass (and so every route it reflects next) for ~0.3 s."""
    async with running(Cluster(reflector=True, speaker=HeldSpeaker(hold_end_of_rib=True))) as c:
        c.settle_peers(N1, N2, N3, R2)
        passing = asyncio.create_task(c.sync())
        await wait_async(lambda: len(c.speaker.held) == 4 or passing.done(), 2,
                         "every End-of-RIB asked")
        assert len(c.speaker.held) == 4 and c.speaker.end_of_rib_sent == []  # none answered
        c.speaker.release()
        await asyncio.wait_for(passing, 5)
        assert sorted(c.speaker.end_of_rib_sent) == sorted([N1, N2, N3, R2])
        await c.sync()
        assert len(c.speaker.end_of_rib_sent) == 4  # once per session


@run
async def test_a_reflector_that_stops_reflecting_withdraws_what_it_reflected():
    async with running(Cluster(reflector=True)) as c:
        c.settle_peers(N1, N2, N3, R2)
        c.speaker.send(N2, Path(BLOCK2, N2))
        await c.sync()
        assert BLOCK2 in reflected_to(c, N1)
        c.add_node("rr1", "10.0.0.11/24")  # its cluster id removed
        await c.sync()
        assert c.router.reflection is None
        assert all(not reflected_to(c, p) for p in c.speaker.announced)


@run
async def test_the_node_counts_as_programmed_once_a_pass_knew_what_its_peers_sent():
    async with running(Cluster()) as c:
        c.speaker.connected = False
        await c.sync()
        assert not c.router.programmed.is_set()  # blackholes only: nothing learned known yet
        c.speaker.connected = True
        c.kernel.refuse.add(BLOCK2)  # a refused route is reported, it does not hold it back
        c.settle_peers(N2, N3)
        c.speaker.send(N2, Path(BLOCK2, N2))
        await c.sync()
        assert c.router.programmed.is_set()
