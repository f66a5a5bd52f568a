"""KernelRoutes and RouteTable against the real kernel, inside network namespaces the tests
create and remove (ipip.kernel_routes, ipip.route_table). test_routes has the pure parts."""

from __future__ import annotations

import errno
import json
from dataclasses import dataclass

import pytest

from ipip.kernel_routes import KernelRoutes
from ipip.route_table import RouteTable
from ipip.routes import RTPROT_PIPIT, NextHop, Route, diff
from lab.netns import Namespaces
from tests.route_support import GW1, GW2, GW3, A, N, blackhole, by_dst, via
from tests.helpers import sh

pytestmark = pytest.mark.netns

# --------------------------------------------------------------------------------------------
# Real kernel, in network namespaces

@dataclass
class RoutingNetns:
    """A node's network namespace: v0 (192.168.0.1/24) towards a peer namespace holding
    192.168.0.2-4, and tun0, an unaddressed device standing in for tunl0 / vxlan.pipit."""

    netns: str
    v0: int
    tun0: int

    def ip(self, *args: str) -> str:
        return sh("ip", "-n", self.netns, *args)

    def routes(self, *selector: str) -> list[dict]:
        return json.loads(self.ip("-j", "route", "show", *selector) or "[]")

    def pipit_routes(self) -> dict[str, dict]:
        return {r["dst"]: r for r in self.routes("table", "all", "proto", str(RTPROT_PIPIT))}

    def foreign_routes(self) -> list[dict]:
        """Everything in every table that is not Pipit's, IPv4 and IPv6."""
        return [r for r in self.routes("table", "all") if r.get("protocol") != str(RTPROT_PIPIT)]


@pytest.fixture
def routing_netns():
    """A node namespace with v0 towards a peer namespace and tun0 (RoutingNetns), removed
    afterwards."""
    with Namespaces() as namespaces:
        name, peer = namespaces.create("node"), namespaces.create("peer")
        for dev, peer_dev in (("v0", "p0"), ("tun0", "p1")):
            sh("ip", "-n", name, "link", "add", dev, "type", "veth",
               "peer", "name", peer_dev, "netns", peer)
            sh("ip", "-n", name, "link", "set", dev, "up")
            sh("ip", "-n", peer, "link", "set", peer_dev, "up")
        sh("ip", "-n", name, "addr", "add", "192.168.0.1/24", "dev", "v0")
        for address in ("192.168.0.2/24", "192.168.0.3/24", "192.168.0.4/24"):
            sh("ip", "-n", peer, "addr", "add", address, "dev", "p0")
        links = {link["ifname"]: link["ifindex"]
                 for link in json.loads(sh("ip", "-n", name, "-j", "link", "show"))}
        yield RoutingNetns(name, links["v0"], links["tun0"])


@pytest.fixture
def kernel(routing_netns):
    with KernelRoutes(routing_netns.netns) as kernel:
        yield kernel


def reconcile(kernel: KernelRoutes, desired: dict, table: int = 254):
    """One sync of a new RouteTable: dump, diff, apply (what an agent's first pass does)."""
    return RouteTable(kernel, table).sync(desired)


def add_foreign_routes(node: RoutingNetns) -> None:
    node.ip("route", "add", "10.9.0.0/24", "via", "192.168.0.2", "proto", "static")
    node.ip("route", "add", "10.9.1.0/24", "via", "192.168.0.3", "proto", "bird")  # 12
    node.ip("route", "add", "blackhole", "10.9.2.0/24", "proto", "static")
    node.ip("route", "add", "10.9.3.0/24", "via", "192.168.0.2", "proto", "static", "table", "1000")


def test_install_via_route(routing_netns, kernel):
    assert kernel.apply([via("10.1.0.0/26", GW1)]) == []
    assert routing_netns.routes("proto", "91") == [
        {"dst": "10.1.0.0/26", "gateway": "192.168.0.2", "dev": "v0", "flags": []}]
    assert routing_netns.routes("10.1.0.0/26")[0]["protocol"] == "91"


def test_ecmp_route_has_both_nexthops(routing_netns, kernel):
    assert kernel.apply([via("10.1.0.0/26", GW2, GW1)]) == []
    [route] = routing_netns.routes("proto", "91")
    assert [(hop["gateway"], hop["dev"]) for hop in route["nexthops"]] == [
        ("192.168.0.2", "v0"), ("192.168.0.3", "v0")]


def test_blackhole(routing_netns, kernel):
    assert kernel.apply([blackhole("10.1.0.0/26")]) == []
    assert routing_netns.routes("proto", "91") == [
        {"type": "blackhole", "dst": "10.1.0.0/26", "flags": []}]


def test_onlink_via_device(routing_netns, kernel):
    # tun0 has no address in 172.16/12: without onlink the kernel would refuse this gateway.
    onlink = [via("10.1.0.0/26", A("172.16.0.1"), ifindex=routing_netns.tun0, onlink=True),
              via("10.1.1.0/26", A("172.16.0.1"), A("172.16.0.2"), ifindex=routing_netns.tun0,
                  onlink=True)]
    assert kernel.apply(onlink) == []
    routes = routing_netns.pipit_routes()
    assert routes["10.1.0.0/26"] == {
        "dst": "10.1.0.0/26", "gateway": "172.16.0.1", "dev": "tun0", "flags": ["onlink"]}
    hops = routes["10.1.1.0/26"]["nexthops"]
    assert [(hop["gateway"], hop["dev"], hop["flags"]) for hop in hops] == [
        ("172.16.0.1", "tun0", ["onlink"]), ("172.16.0.2", "tun0", ["onlink"])]
    assert kernel.dump() == by_dst(*onlink)


def test_lookup_answers_the_kernels_route_to_an_address_whoever_installed_it(routing_netns,
                                                                            kernel):
    """What `ip route get fibmatch` shows: the route of any protocol that carries the
    address's traffic, its gateways with their device; None where nothing leads."""
    routing_netns.ip("route", "add", "default", "via", "192.168.0.2")
    routing_netns.ip("route", "add", "10.9.0.0/24", "nexthop", "via", "192.168.0.3",
                     "nexthop", "via", "192.168.0.4")
    routing_netns.ip("route", "add", "unreachable", "10.9.1.0/24")
    assert kernel.apply([via("10.1.0.0/26", GW1)]) == []
    v0 = routing_netns.v0

    far = kernel.lookup(A("198.51.100.7"))
    assert (far.dst, far.kind, far.nexthops) == (N("0.0.0.0/0"), 1, (NextHop(GW1, v0),))
    assert far.protocol != RTPROT_PIPIT
    ecmp = kernel.lookup(A("10.9.0.1"))
    assert (ecmp.dst, ecmp.nexthops) == (N("10.9.0.0/24"), (NextHop(GW2, v0), NextHop(GW3, v0)))
    link = kernel.lookup(A("192.168.0.9"))
    assert (link.dst, link.nexthops, link.ifindex) == (N("192.168.0.0/24"), (), v0)
    ours = kernel.lookup(A("10.1.0.5"))
    assert (ours.dst, ours.protocol, ours.nexthops) == (N("10.1.0.0/26"), RTPROT_PIPIT,
                                                       (NextHop(GW1, v0),))
    assert kernel.lookup(A("10.9.1.1")) is None
    routing_netns.ip("route", "del", "default")
    assert kernel.lookup(A("198.51.100.7")) is None


def test_replace_changes_a_route_in_place(routing_netns, kernel):
    assert kernel.apply([via("10.1.0.0/26", GW1), via("10.1.1.0/26", GW1)]) == []
    assert kernel.apply([via("10.1.0.0/26", GW2), blackhole("10.1.1.0/26")]) == []
    routes = routing_netns.pipit_routes()
    assert routes["10.1.0.0/26"]["gateway"] == "192.168.0.3"
    assert routes["10.1.1.0/26"]["type"] == "blackhole"
    assert len(routing_netns.routes("10.1.0.0/26")) == 1


def test_dump_after_apply_equals_desired(routing_netns, kernel):
    desired = by_dst(
        via("10.1.0.0/26", GW1, ifindex=routing_netns.v0),
        via("10.1.1.0/26", GW1, GW2, GW3, ifindex=routing_netns.v0),
        via("10.1.2.0/26", A("172.16.0.9"), ifindex=routing_netns.tun0, onlink=True),
        blackhole("10.1.3.0/26"),
        blackhole("10.2.0.0/16"),
        via("10.1.4.0/32", GW1, ifindex=routing_netns.v0),
    )
    assert kernel.apply(desired.values()) == []
    assert kernel.dump() == desired
    # Without devices the routes differ from the dump, but diff sees nothing to do.
    no_devices = by_dst(via("10.1.0.0/26", GW1), via("10.1.1.0/26", GW3, GW2, GW1))
    assert reconcile(kernel, no_devices).replaced == 0
    assert diff(no_devices, kernel.dump()) == ([], [])


def test_dump_reads_other_tables_and_reuses_given_networks(routing_netns, kernel):
    in_table = via("10.1.0.0/26", GW1, ifindex=routing_netns.v0, table=1000)
    assert kernel.apply([in_table, via("10.1.1.0/26", GW1)]) == []
    assert kernel.dump(1000) == by_dst(in_table)
    assert kernel.dump(2000) == {}  # no such table
    prefix = N("10.1.1.0/26")
    [dumped] = kernel.dump(reuse=[prefix])
    assert dumped is prefix


def test_reconcile_adds_replaces_and_removes_stale_routes(routing_netns, kernel):
    assert kernel.apply([via("10.1.0.0/26", GW1), via("10.1.1.0/26", GW1),
                         via("10.1.2.0/26", GW1)]) == []
    desired = by_dst(via("10.1.0.0/26", GW1), via("10.1.1.0/26", GW2), blackhole("10.1.3.0/26"))
    stats = reconcile(kernel, desired)
    assert (stats.resynced, stats.added, stats.replaced, stats.deleted) == (True, 1, 1, 1)
    assert stats.errors == []
    assert sorted(routing_netns.pipit_routes()) == ["10.1.0.0/26", "10.1.1.0/26", "10.1.3.0/26"]
    assert diff(desired, kernel.dump()) == ([], [])
    again = reconcile(kernel, desired)
    assert (again.added, again.replaced, again.deleted) == (0, 0, 0)


def test_other_protocols_routes_are_never_touched(routing_netns, kernel):
    add_foreign_routes(routing_netns)
    before = routing_netns.foreign_routes()
    assert {r["dst"]: r["protocol"] for r in before if r["dst"].startswith("10.9.")} == {
        "10.9.0.0/24": "static", "10.9.1.0/24": "bird",
        "10.9.2.0/24": "static", "10.9.3.0/24": "static"}

    assert kernel.dump() == {}
    assert kernel.dump(1000) == {}
    assert kernel.apply([via("10.1.0.0/26", GW1), blackhole("10.1.1.0/26")]) == []
    assert reconcile(kernel, by_dst(via("10.1.0.0/26", GW2))).errors == []
    # Deleting a prefix another protocol holds: nothing of ours there, so nothing happens.
    foreign = [via("10.9.0.0/24", GW1), via("10.9.1.0/24", GW2), blackhole("10.9.2.0/24"),
               via("10.9.3.0/24", GW1, table=1000)]
    assert kernel.apply(delete=foreign) == []
    assert reconcile(kernel, {}).deleted == 1
    assert reconcile(kernel, {}, table=1000).deleted == 0
    assert routing_netns.foreign_routes() == before
    assert routing_netns.pipit_routes() == {}


def test_reconcile_does_not_overwrite_another_protocols_route_for_the_same_prefix(routing_netns,
                                                                                   kernel):
    add_foreign_routes(routing_netns)
    before = routing_netns.foreign_routes()
    desired = by_dst(via("10.9.0.0/24", GW3), via("10.9.1.0/24", GW3), via("10.1.0.0/26", GW1))
    stats = reconcile(kernel, desired)
    assert sorted((str(e.route.dst), e.op, e.errno) for e in stats.errors) == [
        ("10.9.0.0/24", "add", errno.EEXIST), ("10.9.1.0/24", "add", errno.EEXIST)]
    assert routing_netns.foreign_routes() == before
    assert sorted(routing_netns.pipit_routes()) == ["10.1.0.0/26"]


def test_a_refused_route_is_reported_and_the_rest_applied(routing_netns, kernel):
    unreachable = via("10.1.1.0/26", A("172.16.0.1"))  # not on any link, and not onlink
    missing_device = via("10.1.3.0/26", GW1, ifindex=999)
    routes = [via("10.1.0.0/26", GW1), unreachable, via("10.1.2.0/26", GW2), missing_device]
    errors = kernel.apply(routes)
    assert [(e.route, e.op, e.errno) for e in errors] == [
        (unreachable, "replace", errno.ENETUNREACH), (missing_device, "replace", errno.ENETUNREACH)]
    assert errors[0].message  # the kernel's reason, via extended ACK
    assert "10.1.1.0/26" in str(errors[0])
    assert sorted(routing_netns.pipit_routes()) == ["10.1.0.0/26", "10.1.2.0/26"]


def test_errors_across_many_batches_are_all_reported(routing_netns):
    good = [Route(N((0x0A000000 + i * 64, 26)), (NextHop(GW1),)) for i in range(300)]
    bad = [Route(N((0x0B000000 + i * 64, 26)), (NextHop(A("172.16.0.1")),)) for i in range(300)]
    mixed = [route for pair in zip(good, bad) for route in pair]  # every batch ends with a failure
    with KernelRoutes(routing_netns.netns, batch=16) as kernel:
        errors = kernel.apply(mixed)
        assert [e.route for e in errors] == bad
        assert set(kernel.dump()) == {r.dst for r in good}
    # full default-size batches of nothing but errors
    with KernelRoutes(routing_netns.netns) as kernel:
        assert [e.route for e in kernel.apply(bad * 10)] == bad * 10


def test_many_routes_round_trip(routing_netns, kernel):
    desired = by_dst(*(Route(N((0x0A000000 + i * 64, 26)), (NextHop((GW1, GW2)[i % 2]),))
                       for i in range(5000)))
    stats = reconcile(kernel, desired)
    assert (stats.added, stats.errors) == (5000, [])
    assert diff(desired, kernel.dump()) == ([], [])
    assert len(routing_netns.routes("proto", "91")) == 5000
    assert reconcile(kernel, {}).deleted == 5000
    assert routing_netns.pipit_routes() == {}


def test_routes_go_to_the_named_namespace_only(routing_netns, kernel):
    def in_root_namespace():
        return sh("ip", "route", "show", "table", "all", "10.254.77.0/26")

    before = in_root_namespace()
    assert kernel.apply([via("10.254.77.0/26", GW1)]) == []
    assert in_root_namespace() == before
    assert list(routing_netns.pipit_routes()) == ["10.254.77.0/26"]


def test_unknown_namespace_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="network namespace 'pipit-t-none' does not exist"):
        KernelRoutes("pipit-t-none")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_route_table_diffs_against_what_it_applied_and_resyncs_on_time(routing_netns, kernel):
    clock = Clock()
    table = RouteTable(kernel, resync_seconds=60, clock=clock)
    desired = by_dst(via("10.1.0.0/26", GW1), via("10.1.1.0/26", GW2), blackhole("10.1.2.0/26"))
    first = table.sync(desired)
    assert (first.resynced, first.added, first.errors) == (True, 3, [])
    assert table.applied == desired
    routing_netns.ip("route", "del", "10.1.1.0/26", "proto", "91")  # someone else removes one
    clock.now += 59
    again = table.sync(desired)
    assert (again.resynced, again.changes) == (False, 0)  # a pass costs only its changes
    assert "10.1.1.0/26" not in routing_netns.pipit_routes()
    clock.now += 1
    repaired = table.sync(desired)
    assert (repaired.resynced, repaired.added) == (True, 1)
    assert sorted(routing_netns.pipit_routes()) == ["10.1.0.0/26", "10.1.1.0/26", "10.1.2.0/26"]
    assert table.sync(desired, resync=True).resynced  # asked for


def test_route_table_retries_a_refused_route_and_keeps_unlisted_routes_when_asked(routing_netns,
                                                                                   kernel):
    table = RouteTable(kernel)
    unreachable = via("10.1.1.0/26", A("192.168.5.1"))  # not on any link yet
    desired = by_dst(via("10.1.0.0/26", GW1), unreachable, blackhole("10.1.2.0/26"))
    stats = table.sync(desired)
    assert [(e.route, e.op) for e in stats.errors] == [(unreachable, "add")]
    assert stats.added == 2 and unreachable.dst not in table.applied
    routing_netns.ip("addr", "add", "192.168.5.9/24", "dev", "v0")  # now it can be installed
    retried = table.sync(desired)
    assert (retried.resynced, retried.added, retried.errors) == (False, 1, [])
    assert sorted(routing_netns.pipit_routes()) == ["10.1.0.0/26", "10.1.1.0/26", "10.1.2.0/26"]
    # keep_unlisted: learned routes that are no longer desired stay, blackholes go
    kept = table.sync({}, keep_unlisted=True)
    assert kept.deleted == 1
    assert sorted(routing_netns.pipit_routes()) == ["10.1.0.0/26", "10.1.1.0/26"]
    assert table.sync({}).deleted == 2
    assert routing_netns.pipit_routes() == {}
