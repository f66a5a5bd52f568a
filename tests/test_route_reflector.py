"""The route reflector's pure core (route_reflector/): best path, reflection rules, loops,
sessions going down with and without graceful restart, incremental output and batching; then
properties against a small reference model of RFC 4456 kept here."""

from __future__ import annotations

import itertools
from dataclasses import fields, replace
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from route_reflector import (
    CLIENT,
    NON_CLIENT,
    Attributes,
    Batch,
    Reflector,
    Route,
    Update,
    batch,
    best_path,
    per_peer,
)

ROUTER_ID = IPv4Address("10.0.0.100")
CLUSTER_ID = IPv4Address("244.0.0.1")
OTHER_CLUSTER = IPv4Address("244.0.0.9")


def addr(i: int) -> IPv4Address:
    return IPv4Address(f"10.0.0.{i}")


def router_id(i: int) -> IPv4Address:
    """Peer i's BGP identifier: in the opposite order to the addresses, so that a test can
    tell which of the two tie-breaks decided."""
    return IPv4Address(f"10.9.0.{100 - i}")


def net(i: int) -> IPv4Network:
    """10.244.i.0/26 (for i < 256)."""
    return IPv4Network((int(IPv4Address("10.244.0.0")) + 256 * i, 26))


def route(peer: int, prefix: int = 1, **attributes) -> Route:
    attributes.setdefault("next_hop", addr(peer))
    attributes.setdefault("peer_router_id", router_id(peer))
    return Route(net(prefix), peer=addr(peer), **attributes)


def reflector(roles: dict[int, str], up=None, **options) -> Reflector:
    rr = Reflector(ROUTER_ID, CLUSTER_ID, **options)
    for i, role in roles.items():
        rr.add_peer(addr(i), role)
    rr.peers_up([addr(i) for i in (roles if up is None else up)])
    return rr


def sent(updates: list[Update]) -> dict[int, dict[int, Attributes | None]]:
    """per_peer() with small numbers for peers and prefixes."""
    return {int(p.packed[3]): {int(x.network_address.packed[2]): a for x, a in table.items()}
            for p, table in per_peer(updates).items()}


def reflected(r: Route) -> Attributes:
    """What a route goes out with, spelled out."""
    return Attributes(r.next_hop, r.as_path, r.communities, r.local_pref, r.med, r.origin,
                      r.originator_id or r.peer_router_id, (CLUSTER_ID, *r.cluster_list),
                      r.large_communities, r.extended_communities)


# ---------------------------------------------------------------------------------------------
# best path

# (why, attributes of peer 1's route, of peer 2's, the peer whose route is best)
BEST_PATH = [
    ("higher LOCAL_PREF wins over a shorter AS path",
     dict(local_pref=200, as_path=(1, 2, 3)), dict(local_pref=100), 1),
    ("no LOCAL_PREF counts as 100: it beats 99", dict(), dict(local_pref=99), 1),
    ("no LOCAL_PREF counts as 100: 101 beats it", dict(), dict(local_pref=101), 2),
    ("shorter AS path", dict(as_path=(65001, 65002)), dict(as_path=(65003,)), 2),
    ("igp before egp", dict(origin="egp"), dict(origin="igp"), 2),
    ("egp before incomplete", dict(origin="egp"), dict(origin="incomplete"), 1),
    ("lower MED from the same neighbouring AS",
     dict(as_path=(65001,), med=20), dict(as_path=(65001,), med=10), 2),
    ("MED not compared between neighbouring ASes: router id decides",
     dict(as_path=(65001,), med=10), dict(as_path=(65002,), med=20), 2),
    ("routes of our own AS (empty path) compare MED", dict(med=10), dict(med=5), 2),
    ("no MED counts as 0", dict(as_path=(65001,), med=1), dict(as_path=(65001,)), 2),
    ("lower router id (peer 2's is lower)", dict(), dict(), 2),
    ("ORIGINATOR_ID stands in for the router id",
     dict(originator_id=IPv4Address("10.9.0.1")), dict(), 1),
    ("the router id counts when the other has an ORIGINATOR_ID",
     dict(originator_id=IPv4Address("10.9.0.99")), dict(), 2),
    ("shorter CLUSTER_LIST with the same originator (before the peer address)",
     dict(originator_id=IPv4Address("10.5.5.5"), cluster_list=(OTHER_CLUSTER, OTHER_CLUSTER)),
     dict(originator_id=IPv4Address("10.5.5.5"), cluster_list=(OTHER_CLUSTER,)),
     2),
    ("lower peer address when all else is equal",
     dict(peer_router_id=IPv4Address("10.5.5.5")), dict(peer_router_id=IPv4Address("10.5.5.5")),
     1),
]


@pytest.mark.parametrize("why, one, two, winner", BEST_PATH, ids=[row[0] for row in BEST_PATH])
def test_best_path(why, one, two, winner):
    routes = [route(1, **one), route(2, **two)]
    assert best_path(routes).peer == addr(winner)
    assert best_path(routes[::-1]).peer == addr(winner)


def test_always_compare_med_compares_across_neighbouring_ases():
    routes = [route(1, as_path=(65001,), med=10), route(2, as_path=(65002,), med=20)]
    assert best_path(routes).peer == addr(2)  # router id
    assert best_path(routes, always_compare_med=True).peer == addr(1)


def test_med_elimination_does_not_depend_on_order():
    """RFC 4271's example of why MED is not a total order: compared pair by pair in arrival
    order, the result depends on that order; eliminated as the RFC says, it does not."""
    routes = [route(1, as_path=(65001,), med=20, peer_router_id=IPv4Address("10.9.0.1")),
              route(2, as_path=(65002,), med=10, peer_router_id=IPv4Address("10.9.0.2")),
              route(3, as_path=(65001,), med=10, peer_router_id=IPv4Address("10.9.0.3"))]
    # 1 loses to 3 on MED (same AS); 2 and 3 are from different ASes: 2 on router id
    assert {best_path(order).peer for order in itertools.permutations(routes)} == {addr(2)}


def test_best_path_needs_a_route():
    with pytest.raises(ValueError):
        best_path([])


# ---------------------------------------------------------------------------------------------
# reflection rules

# (source role, target role, does the target get the source's route)
REFLECTION = [
    (CLIENT, CLIENT, True),
    (CLIENT, NON_CLIENT, True),
    (NON_CLIENT, CLIENT, True),
    (NON_CLIENT, NON_CLIENT, False),
]


@pytest.mark.parametrize("source, target, reflected_to_target", REFLECTION)
def test_who_gets_a_route(source, target, reflected_to_target):
    rr = reflector({1: source, 2: target})
    out = sent(rr.update(addr(1), [route(1)]))
    assert 1 not in out  # never back to the peer it came from
    assert (2 in out) == reflected_to_target
    # a peer coming up later gets the same answer in its full table
    late = reflector({1: source, 2: target}, up=[1])
    late.update(addr(1), [route(1)])
    assert (2 in sent(late.peer_up(addr(2)))) == reflected_to_target


def test_a_client_route_goes_to_everyone_else_a_non_client_route_to_clients():
    rr = reflector({1: CLIENT, 2: CLIENT, 3: NON_CLIENT, 4: NON_CLIENT})
    assert set(sent(rr.update(addr(1), [route(1, 1)]))) == {2, 3, 4}
    assert set(sent(rr.update(addr(3), [route(3, 2)]))) == {1, 2}


# (received attributes, what changes in the reflected ones)
ATTRIBUTES = [
    ("no ORIGINATOR_ID: the peer's router id", dict(),
     dict(originator_id=router_id(1), cluster_list=(CLUSTER_ID,))),
    ("an ORIGINATOR_ID is kept", dict(originator_id=IPv4Address("10.7.7.7")),
     dict(originator_id=IPv4Address("10.7.7.7"), cluster_list=(CLUSTER_ID,))),
    ("our cluster id goes first in CLUSTER_LIST",
     dict(originator_id=IPv4Address("10.7.7.7"), cluster_list=(OTHER_CLUSTER,)),
     dict(originator_id=IPv4Address("10.7.7.7"), cluster_list=(CLUSTER_ID, OTHER_CLUSTER))),
    ("next hop, AS path, LOCAL_PREF, MED, ORIGIN and communities as received",
     dict(next_hop=IPv4Address("192.168.7.7"), as_path=(65001, 65002), local_pref=300, med=7,
          origin="incomplete", communities=((64512, 100), (65000, 1))),
     dict(originator_id=router_id(1), cluster_list=(CLUSTER_ID,))),
    ("large and extended communities as received (RFC 8092, RFC 4360)",
     dict(large_communities=((4200000000, 1, 2),),
          extended_communities=(0x0002FDE800000001, 0x4300000000000000)),
     dict(originator_id=router_id(1), cluster_list=(CLUSTER_ID,),
          large_communities=((4200000000, 1, 2),),
          extended_communities=(0x0002FDE800000001, 0x4300000000000000))),
]


@pytest.mark.parametrize("why, received, changed", ATTRIBUTES, ids=[r[0] for r in ATTRIBUTES])
def test_reflected_attributes(why, received, changed):
    rr = reflector({1: CLIENT, 2: CLIENT})
    r = route(1, **received)
    expected = Attributes(r.next_hop, r.as_path, r.communities, r.local_pref, r.med, r.origin,
                          **changed)
    assert rr.update(addr(1), [r]) == [Update(frozenset({addr(2)}), net(1), expected)]


# (why, attributes of a received route that make it a loop)
LOOPS = [
    ("our cluster id in CLUSTER_LIST", dict(cluster_list=(CLUSTER_ID,))),
    ("our cluster id further down CLUSTER_LIST", dict(cluster_list=(OTHER_CLUSTER, CLUSTER_ID))),
    ("our router id as ORIGINATOR_ID", dict(originator_id=ROUTER_ID)),
]


@pytest.mark.parametrize("why, loop", LOOPS, ids=[r[0] for r in LOOPS])
def test_a_route_that_loops_is_ignored_and_replaces_the_previous_one(why, loop):
    rr = reflector({1: NON_CLIENT, 2: CLIENT})
    assert rr.update(addr(1), [route(1, **loop)]) == []
    assert rr.best(net(1)) is None and rr.peers()[addr(1)].looped == 1
    assert sent(rr.update(addr(1), [route(1)])) == {2: {1: reflected(route(1))}}
    assert rr.peers()[addr(1)].looped == 0
    # the looped announcement replaces the good route: a withdrawal
    assert sent(rr.update(addr(1), [route(1, **loop)])) == {2: {1: None}}
    assert rr.received(addr(1)) == {}


def test_routes_that_do_not_loop_are_kept():
    rr = reflector({1: NON_CLIENT, 2: CLIENT})
    fine = route(1, originator_id=IPv4Address("10.7.7.7"), cluster_list=(OTHER_CLUSTER,))
    assert sent(rr.update(addr(1), [fine])) == {2: {1: reflected(fine)}}


def test_a_peer_gets_nothing_for_a_prefix_whose_best_route_may_not_go_to_it():
    """Non-clients 2 and 3 had client 1's route; then non-client 2's route becomes best,
    which a non-client may not get and which never goes back to 2: both get a withdrawal,
    not a second-best."""
    rr = reflector({1: CLIENT, 2: NON_CLIENT, 3: NON_CLIENT})
    rr.update(addr(1), [route(1)])
    better = route(2, local_pref=200)
    assert sent(rr.update(addr(2), [better])) == {1: {1: reflected(better)}, 2: {1: None},
                                                   3: {1: None}}


# ---------------------------------------------------------------------------------------------
# incremental output

OTHER_VALUES = {"next_hop": IPv4Address("10.0.9.9"), "as_path": (65001,),
                "communities": ((64512, 1),), "local_pref": 200, "med": 5, "origin": "egp",
                "originator_id": IPv4Address("10.0.9.8"), "cluster_list": (OTHER_CLUSTER,),
                "large_communities": ((64512, 1, 2),), "extended_communities": (0x0002FDE800000001,),
                "peer_router_id": IPv4Address("10.0.9.7")}


@pytest.mark.parametrize("name", [f.name for f in fields(Route) if f.name not in ("prefix", "peer")])
def test_routes_differing_in_any_attribute_are_reflected_each_with_its_own(name):
    """The reflector hands consecutive routes that share their attributes, object for object,
    one Attributes object (batching then groups them without hashing each): one attribute
    apart, each must still go out with its own."""
    first = route(1, 1)
    second = replace(first, prefix=net(2), **{name: OTHER_VALUES[name]})
    out = reflector({1: CLIENT, 2: CLIENT}).update(addr(1), [first, second])
    assert [u.attributes for u in out] == [reflected(first), reflected(second)]
    assert out[0].attributes != out[1].attributes


def test_routes_sharing_their_attributes_share_one_attributes_object():
    first = route(1, 1, as_path=(65001,), local_pref=200)
    rest = [replace(first, prefix=net(i)) for i in range(2, 6)]
    out = reflector({1: CLIENT, 2: CLIENT}).update(addr(1), [first, *rest])
    assert {id(u.attributes) for u in out} == {id(out[0].attributes)}
    assert out[0].attributes == reflected(first)


def test_only_changes_are_sent():
    rr = reflector({1: CLIENT, 2: CLIENT, 3: NON_CLIENT})
    assert sent(rr.update(addr(1), [route(1)])) == {2: {1: reflected(route(1))},
                                                   3: {1: reflected(route(1))}}
    assert rr.update(addr(1), [route(1)]) == []  # the same route again
    assert rr.update(addr(1), withdraw=[net(9)]) == []  # a prefix it never sent
    assert rr.update(addr(2), [route(2, local_pref=50)]) == []  # not the best: nobody hears
    # the best route's attributes change: everyone who has it gets the new ones
    changed = route(1, med=5)
    assert sent(rr.update(addr(1), [changed])) == {2: {1: reflected(changed)},
                                                   3: {1: reflected(changed)}}
    # the best withdrawn: the next best goes out, to peer 1 too, and not back to peer 2
    assert sent(rr.update(addr(1), withdraw=[net(1)])) == {
        1: {1: reflected(route(2, local_pref=50))}, 2: {1: None},
        3: {1: reflected(route(2, local_pref=50))}}


def test_a_withdrawal_goes_only_to_peers_that_had_the_route():
    rr = reflector({1: NON_CLIENT, 2: CLIENT, 3: NON_CLIENT})
    rr.update(addr(1), [route(1)])
    assert rr.update(addr(1), withdraw=[net(1)]) == [Update(frozenset({addr(2)}), net(1), None)]


def test_the_best_moving_to_a_peer_with_the_same_reflected_attributes_is_no_news():
    """Two non-clients reflecting the same originator's route with the same attributes:
    which of them is best changes nothing for peers that had it."""
    same = dict(originator_id=IPv4Address("10.7.7.7"), next_hop=IPv4Address("10.0.0.50"),
                peer_router_id=IPv4Address("10.5.5.5"))
    rr = reflector({1: NON_CLIENT, 2: NON_CLIENT, 3: CLIENT})
    rr.update(addr(1), [route(1, **same)])
    assert sent(rr.update(addr(2), [route(2, **same)])) == {}  # peer 1 (lower address) stays best
    # peer 1's goes: peer 2's is best; client 3 has it already; non-client 1 may not get it
    assert sent(rr.update(addr(1), withdraw=[net(1)])) == {}
    assert rr.best(net(1)).peer == addr(2)


def test_a_peer_that_comes_up_gets_its_whole_table():
    rr = reflector({1: CLIENT, 2: NON_CLIENT, 3: CLIENT, 4: NON_CLIENT}, up=[1, 2])
    rr.update(addr(1), [route(1, 1), route(1, 2)])
    rr.update(addr(2), [route(2, 3)])
    assert sent(rr.peer_up(addr(3))) == {3: {1: reflected(route(1, 1)), 2: reflected(route(1, 2)),
                                             3: reflected(route(2, 3))}}
    assert sent(rr.peer_up(addr(4))) == {4: {1: reflected(route(1, 1)), 2: reflected(route(1, 2))}}
    # several at once: one update per prefix for all of them
    rr.peer_down(addr(3), now=0)
    rr.peer_down(addr(4), now=0)
    both = rr.peers_up([addr(3), addr(4)])
    assert len(both) == 3
    assert sent(both) == {3: {1: reflected(route(1, 1)), 2: reflected(route(1, 2)),
                              3: reflected(route(2, 3))},
                          4: {1: reflected(route(1, 1)), 2: reflected(route(1, 2))}}
    for peer in (3, 4):  # what advertised() says they hold
        assert {int(p.network_address.packed[2]): a
                for p, a in rr.advertised(addr(peer)).items()} == sent(both)[peer]


def test_nothing_is_sent_to_a_peer_that_is_down():
    rr = reflector({1: CLIENT, 2: CLIENT, 3: CLIENT}, up=[1, 2])
    assert set(sent(rr.update(addr(1), [route(1)]))) == {2}
    assert rr.full_table(addr(3)) == [] and rr.advertised(addr(3)) == {}


# ---------------------------------------------------------------------------------------------
# sessions going down, graceful restart

def test_a_session_that_ends_withdraws_everything_the_peer_sent():
    rr = reflector({1: CLIENT, 2: CLIENT, 3: CLIENT})
    rr.update(addr(1), [route(1, 1), route(1, 2)])
    rr.update(addr(3), [route(3, 2, local_pref=50)])
    out = sent(rr.peer_down(addr(1), now=0))
    # prefix 1 is gone; prefix 2 falls back to peer 3's route (to 1? it is down: no)
    assert out == {2: {1: None, 2: reflected(route(3, 2, local_pref=50))}, 3: {1: None, 2: None}}
    assert rr.received(addr(1)) == {}


# (why, how it went down, are its routes kept)
DOWN = [
    ("graceful restart, no NOTIFICATION", dict(graceful_restart=True, restart_time=120), True),
    ("graceful restart but a NOTIFICATION",
     dict(graceful_restart=True, restart_time=120, notification=True), False),
    ("no graceful restart", dict(graceful_restart=False, restart_time=120), False),
    ("graceful restart with restart time 0", dict(graceful_restart=True, restart_time=0), False),
]


@pytest.mark.parametrize("why, how, kept", DOWN, ids=[r[0] for r in DOWN])
def test_graceful_restart_keeps_routes_only_without_a_notification(why, how, kept):
    rr = reflector({1: CLIENT, 2: CLIENT})
    rr.update(addr(1), [route(1)])
    out = rr.peer_down(addr(1), now=1000, **how)
    if kept:
        assert out == [] and rr.best(net(1)) == route(1)
        assert rr.peers()[addr(1)].stale == 1 and rr.next_deadline() == 1120
    else:
        assert sent(out) == {2: {1: None}} and rr.next_deadline() is None


def test_stale_routes_not_re_sent_go_at_end_of_rib():
    rr = reflector({1: CLIENT, 2: CLIENT})
    rr.update(addr(1), [route(1, 1), route(1, 2), route(1, 3)])
    assert rr.waiting_for_end_of_rib() == {addr(1), addr(2)}
    rr.end_of_rib(addr(2))
    rr.peer_down(addr(1), now=0, graceful_restart=True, restart_time=120)
    assert rr.peer_up(addr(1)) == []
    assert rr.waiting_for_end_of_rib() == {addr(1)}
    assert rr.update(addr(1), [route(1, 1)]) == []  # re-sent unchanged: nothing to say
    changed = route(1, 2, med=9)
    assert sent(rr.update(addr(1), [changed])) == {2: {2: reflected(changed)}}
    assert rr.peers()[addr(1)].stale == 1  # prefix 3, not re-sent yet
    assert sent(rr.end_of_rib(addr(1))) == {2: {3: None}}
    assert rr.peers()[addr(1)].stale == 0 and rr.next_deadline() is None
    assert rr.waiting_for_end_of_rib() == frozenset()


def test_stale_routes_go_when_the_restart_time_has_passed():
    rr = reflector({1: CLIENT, 2: CLIENT})
    rr.update(addr(1), [route(1)])
    rr.peer_down(addr(1), now=100, graceful_restart=True, restart_time=30)
    assert rr.expire(129.9) == []
    assert sent(rr.expire(130)) == {2: {1: None}}
    assert rr.expire(200) == [] and rr.received(addr(1)) == {}


def test_the_restart_time_keeps_running_after_the_peer_is_back_until_end_of_rib():
    rr = reflector({1: CLIENT, 2: CLIENT})
    rr.update(addr(1), [route(1, 1), route(1, 2)])
    rr.peer_down(addr(1), now=100, graceful_restart=True, restart_time=30)
    rr.peer_up(addr(1))
    rr.update(addr(1), [route(1, 1)])
    assert sent(rr.expire(130)) == {2: {2: None}}  # the re-sent route stays
    assert rr.best(net(1)) == route(1, 1)


def test_a_notification_reported_later_drops_kept_routes():
    rr = reflector({1: CLIENT, 2: CLIENT})
    rr.update(addr(1), [route(1)])
    rr.peer_down(addr(1), now=0, graceful_restart=True, restart_time=120)
    assert rr.peer_down(addr(1), now=1, graceful_restart=True, restart_time=120) == []
    assert sent(rr.peer_down(addr(1), now=2, notification=True)) == {2: {1: None}}


def test_a_second_graceful_loss_before_end_of_rib_keeps_everything_with_a_new_deadline():
    rr = reflector({1: CLIENT, 2: CLIENT})
    rr.update(addr(1), [route(1, 1), route(1, 2)])
    rr.peer_down(addr(1), now=0, graceful_restart=True, restart_time=30)
    rr.peer_up(addr(1))
    rr.update(addr(1), [route(1, 3)])
    rr.peer_down(addr(1), now=20, graceful_restart=True, restart_time=30)
    assert rr.peers()[addr(1)].stale == 3 and rr.expire(30) == []
    assert set(sent(rr.expire(50))[2]) == {1, 2, 3}


def test_removing_a_peer_withdraws_its_routes_stale_ones_too():
    rr = reflector({1: CLIENT, 2: CLIENT})
    rr.update(addr(1), [route(1)])
    rr.peer_down(addr(1), now=0, graceful_restart=True, restart_time=120)
    assert sent(rr.remove_peer(addr(1))) == {2: {1: None}}
    assert addr(1) not in rr.peers() and rr.next_deadline() is None
    assert rr.remove_peer(addr(1)) == []


def test_a_new_role_changes_who_gets_what():
    rr = reflector({1: NON_CLIENT, 2: NON_CLIENT, 3: CLIENT})
    rr.update(addr(1), [route(1, 1)])
    rr.update(addr(3), [route(3, 3)])
    # peer 2 becomes a client: it gets non-client 1's route (it had client 3's already)
    assert sent(rr.add_peer(addr(2), CLIENT)) == {2: {1: reflected(route(1, 1))}}
    assert sent(rr.add_peer(addr(2), NON_CLIENT)) == {2: {1: None}}  # and back
    # peer 1 becomes a client: its route goes to non-client 2 too; 1 had 3's already
    assert sent(rr.add_peer(addr(1), CLIENT)) == {2: {1: reflected(route(1, 1))}}
    assert rr.add_peer(addr(1), CLIENT) == []  # the same role again


# ---------------------------------------------------------------------------------------------
# misuse

def test_misuse_is_refused_without_changing_anything():
    rr = reflector({1: CLIENT, 2: CLIENT}, up=[1])
    with pytest.raises(ValueError, match="role"):
        rr.add_peer(addr(3), "server")
    with pytest.raises(ValueError, match="not a peer"):
        rr.update(addr(9), [route(9)])
    with pytest.raises(ValueError, match="not up"):
        rr.update(addr(2), [route(2)])
    with pytest.raises(ValueError, match="given as one of"):
        rr.update(addr(1), [route(1, 1), route(2, 2)])
    assert rr.received(addr(1)) == {}
    with pytest.raises(ValueError, match="already up"):
        rr.peer_up(addr(1))
    with pytest.raises(ValueError, match="not up"):
        rr.end_of_rib(addr(2))
    with pytest.raises(ValueError, match="origin"):
        route(1, origin="bgp")


# ---------------------------------------------------------------------------------------------
# batching

A1, A2 = (reflected(route(1)), reflected(route(2)))
P1, P2, P3 = addr(1), addr(2), addr(3)

# (why, updates in order, expected batches as (peers, attributes, prefixes))
BATCHES = [
    ("one attribute set for one group of peers: one batch",
     [Update(frozenset({P2, P3}), net(1), A1), Update(frozenset({P2, P3}), net(2), A1)],
     {(frozenset({P2, P3}), A1, (net(1), net(2)))}),
    ("another attribute set, another batch",
     [Update(frozenset({P2, P3}), net(1), A1), Update(frozenset({P2, P3}), net(2), A2)],
     {(frozenset({P2, P3}), A1, (net(1),)), (frozenset({P2, P3}), A2, (net(2),))}),
    ("peers that each came up get one batch together",
     [Update(frozenset({P2}), net(1), A1), Update(frozenset({P3}), net(1), A1),
      Update(frozenset({P2}), net(2), A1), Update(frozenset({P3}), net(2), A1)],
     {(frozenset({P2, P3}), A1, (net(1), net(2)))}),
    ("a later withdrawal wins",
     [Update(frozenset({P2, P3}), net(1), A1), Update(frozenset({P2, P3}), net(1), None)],
     {(frozenset({P2, P3}), None, (net(1),))}),
    ("a later update wins peer by peer",
     [Update(frozenset({P2, P3}), net(1), A1), Update(frozenset({P3}), net(1), None),
      Update(frozenset({P1}), net(1), A2)],
     {(frozenset({P2}), A1, (net(1),)), (frozenset({P3}), None, (net(1),)),
      (frozenset({P1}), A2, (net(1),))}),
    ("no peers, no batch", [Update(frozenset(), net(1), A1)], set()),
]


@pytest.mark.parametrize("why, updates, expected", BATCHES, ids=[r[0] for r in BATCHES])
def test_batch(why, updates, expected):
    assert {(b.peers, b.attributes, b.prefixes) for b in batch(updates)} == expected


def test_batches_are_split_at_max_prefixes():
    updates = [Update(frozenset({P2}), net(i), A1) for i in range(5)]
    assert [b.prefixes for b in batch(updates, max_prefixes=2)] == [
        (net(0), net(1)), (net(2), net(3)), (net(4),)]
    with pytest.raises(ValueError):
        batch(updates, max_prefixes=0)


def test_a_client_group_gets_one_batch_per_attribute_set():
    """50 clients, 100 prefixes each: 50 batches (one per source), not one per prefix or peer."""
    rr = reflector({i: CLIENT for i in range(1, 51)})
    out = []
    for i in range(1, 51):
        out += rr.update(addr(i), [route(i, prefix=100 * i + j) for j in range(100)])
    batches = batch(out)
    assert len(batches) == 50
    assert {len(b.prefixes) for b in batches} == {100} and {len(b.peers) for b in batches} == {49}


def apply(tables: dict, updates) -> None:
    """Updates (or batches) applied to per-peer tables, as a peer would see them."""
    for u in updates:
        prefixes = u.prefixes if isinstance(u, Batch) else (u.prefix,)
        for peer in u.peers:
            table = tables.setdefault(peer, {})
            for prefix in prefixes:
                if u.attributes is None:
                    table.pop(prefix, None)
                else:
                    table[prefix] = u.attributes


update_lists = st.lists(st.builds(
    Update, st.frozensets(st.sampled_from([P1, P2, P3]), max_size=3),
    st.sampled_from([net(1), net(2), net(3)]), st.sampled_from([A1, A2, None])), max_size=12)


@given(update_lists, st.integers(1, 3))
def test_batches_have_the_effect_of_the_updates_in_order(updates, max_prefixes):
    one_by_one, batched = {}, {}
    apply(one_by_one, updates)
    apply(batched, batch(updates, max_prefixes))
    assert {p: t for p, t in batched.items() if t} == {p: t for p, t in one_by_one.items() if t}
    pairs = [(peer, prefix) for b in batch(updates) for peer in b.peers for prefix in b.prefixes]
    assert len(pairs) == len(set(pairs))  # each (peer, prefix) once: any order will do


# ---------------------------------------------------------------------------------------------
# properties against a reference model

PEERS = [1, 2, 3, 4]
PREFIXES = [1, 2, 3]
routes_of = st.builds(
    dict,
    local_pref=st.sampled_from([None, 100, 200]),
    as_path=st.sampled_from([(), (65001,), (65002,), (65001, 65003)]),
    med=st.sampled_from([None, 0, 5]),
    origin=st.sampled_from(["igp", "incomplete"]),
    originator_id=st.sampled_from([None, IPv4Address("10.9.0.97"), IPv4Address("10.9.0.90"),
                                   ROUTER_ID]),
    cluster_list=st.sampled_from([(), (OTHER_CLUSTER,), (CLUSTER_ID,)]),
    next_hop=st.sampled_from([IPv4Address("10.0.0.50"), IPv4Address("10.0.0.51")]),
)


def reference_best(routes: list[Route], always_compare_med: bool) -> Route:
    """RFC 4271 §9.1.2.2 + RFC 4456 §9, written as the RFC's list of eliminations."""
    def keep_lowest(candidates, key):
        lowest = min(map(key, candidates))
        return [r for r in candidates if key(r) == lowest]

    def neighbour_as(r):
        return r.as_path[0] if r.as_path else "local"

    candidates = keep_lowest(routes, lambda r: -(100 if r.local_pref is None else r.local_pref))
    candidates = keep_lowest(candidates, lambda r: len(r.as_path))
    candidates = keep_lowest(candidates, lambda r: ["igp", "egp", "incomplete"].index(r.origin))
    candidates = [r for r in candidates
                  if not any((r2.med or 0) < (r.med or 0) for r2 in candidates
                             if always_compare_med or neighbour_as(r2) == neighbour_as(r))]
    candidates = keep_lowest(candidates, lambda r: int(r.originator_id or r.peer_router_id))
    candidates = keep_lowest(candidates, lambda r: len(r.cluster_list))
    return min(candidates, key=lambda r: int(r.peer))


def reference_tables(roles, up, ribs, always_compare_med) -> dict[IPv4Address, dict]:
    """What every up peer should hold, from the Adj-RIBs-In alone."""
    by_prefix: dict[IPv4Network, list[Route]] = {}
    for rib in ribs.values():
        for prefix, r in rib.items():
            by_prefix.setdefault(prefix, []).append(r)
    best = {p: reference_best(rs, always_compare_med) for p, rs in by_prefix.items()}
    return {peer: {p: reflected(r) for p, r in best.items()
                   if r.peer != peer and CLIENT in (roles[r.peer], roles[peer])}
            for peer in up}


@given(st.lists(st.tuples(st.sampled_from(PEERS), st.sampled_from(PREFIXES), routes_of),
                max_size=12, unique_by=lambda t: (t[0], t[1])), st.randoms())
def test_the_tables_do_not_depend_on_arrival_order(announcements, random):
    roles = {1: CLIENT, 2: CLIENT, 3: NON_CLIENT, 4: NON_CLIENT}
    shuffled = list(announcements)
    random.shuffle(shuffled)
    results = []
    for order in (announcements, shuffled):
        rr = reflector(roles)
        for peer, prefix, attributes in order:
            rr.update(addr(peer), [route(peer, prefix, **attributes)])
        results.append((rr.loc_rib(), {addr(p): rr.advertised(addr(p)) for p in roles}))
    assert results[0] == results[1]


class ReflectorMachine(RuleBasedStateMachine):
    """Random sessions and routes; after every step, what each up peer has been sent (the
    updates applied one by one, and batched) equals what the reference says it should hold
    given the Adj-RIBs-In kept here, every update was news to its peer, and nothing went to a
    peer that was down."""

    always_compare_med = False

    def __init__(self):
        super().__init__()
        self.rr = Reflector(ROUTER_ID, CLUSTER_ID, always_compare_med=self.always_compare_med)
        self.now = 0.0
        self.roles: dict[IPv4Address, str] = {}
        self.up: set[IPv4Address] = set()
        self.ribs: dict[IPv4Address, dict[IPv4Network, Route]] = {}
        self.stale: dict[IPv4Address, set[IPv4Network]] = {}
        self.deadline: dict[IPv4Address, float] = {}
        self.sent: dict[IPv4Address, dict] = {}
        self.sent_batched: dict[IPv4Address, dict] = {}

    # the model

    def receive(self, updates: list[Update]) -> None:
        for peer, changes in per_peer(updates).items():
            assert peer in self.up, f"{peer} is down but was sent {changes}"
            had = self.sent.get(peer, {})
            for prefix, attributes in changes.items():
                assert had.get(prefix) != attributes, "an update that changes nothing"
        apply(self.sent, updates)
        apply(self.sent_batched, batch(updates, max_prefixes=2))

    def drop(self, peer, prefixes) -> None:
        for prefix in list(prefixes):
            self.ribs[peer].pop(prefix, None)
            self.stale.get(peer, set()).discard(prefix)
        if not self.stale.get(peer):
            self.stale.pop(peer, None)
            self.deadline.pop(peer, None)

    def accept(self, peer, r: Route) -> None:
        if r.originator_id == ROUTER_ID or CLUSTER_ID in r.cluster_list:
            self.ribs[peer].pop(r.prefix, None)
        else:
            self.ribs[peer][r.prefix] = r
        self.stale.get(peer, set()).discard(r.prefix)
        self.drop(peer, [])  # no stale routes left: no deadline

    def session_ended(self, peer) -> None:
        self.up.discard(peer)
        self.sent.pop(peer, None)
        self.sent_batched.pop(peer, None)

    def pick(self, data, peers):
        return data.draw(st.sampled_from(sorted(peers)))

    # the steps

    @initialize(roles=st.lists(st.sampled_from([CLIENT, NON_CLIENT]), min_size=4, max_size=4),
                up=st.sets(st.sampled_from(PEERS), min_size=2))
    def start(self, roles, up):
        for peer, role in zip(PEERS, roles):
            self.add_peer(peer, role)
        self.up |= {addr(p) for p in up}
        self.receive(self.rr.peers_up(addr(p) for p in sorted(up)))

    @rule(peer=st.sampled_from(PEERS), role=st.sampled_from([CLIENT, NON_CLIENT]))
    def add_peer(self, peer, role):
        self.receive(self.rr.add_peer(addr(peer), role))
        self.roles[addr(peer)] = role
        self.ribs.setdefault(addr(peer), {})

    @precondition(lambda self: self.roles)
    @rule(data=st.data())
    def remove_peer(self, data):
        peer = self.pick(data, self.roles)
        self.session_ended(peer)
        self.receive(self.rr.remove_peer(peer))
        self.drop(peer, list(self.ribs[peer]))
        del self.roles[peer], self.ribs[peer]

    @precondition(lambda self: set(self.roles) - self.up)
    @rule(data=st.data())
    def peers_up(self, data):
        peers = data.draw(st.sets(st.sampled_from(sorted(set(self.roles) - self.up)), min_size=1))
        self.up |= peers
        self.receive(self.rr.peers_up(sorted(peers)))

    @precondition(lambda self: self.roles)
    @rule(data=st.data(), graceful_restart=st.booleans(), notification=st.booleans(),
          restart_time=st.sampled_from([0, 5, 30]))
    def peer_down(self, data, graceful_restart, notification, restart_time):
        peer = self.pick(data, self.roles)
        was_up = peer in self.up
        self.session_ended(peer)
        self.receive(self.rr.peer_down(peer, now=self.now, graceful_restart=graceful_restart,
                                       notification=notification, restart_time=restart_time))
        if was_up:
            if graceful_restart and not notification and restart_time and self.ribs[peer]:
                self.stale[peer] = set(self.ribs[peer])
                self.deadline[peer] = self.now + restart_time
            else:
                self.drop(peer, list(self.ribs[peer]))
        elif notification:
            self.drop(peer, list(self.stale.get(peer, ())))

    @precondition(lambda self: self.up)
    @rule(data=st.data(), prefix=st.sampled_from(PREFIXES), attributes=routes_of)
    def announce(self, data, prefix, attributes):
        peer = self.pick(data, self.up)
        r = route(int(peer.packed[3]), prefix, **attributes)
        self.receive(self.rr.update(peer, [r]))
        self.accept(peer, r)

    @precondition(lambda self: self.up)
    @rule(data=st.data(), prefix=st.sampled_from(PREFIXES))
    def withdraw(self, data, prefix):
        peer = self.pick(data, self.up)
        self.receive(self.rr.update(peer, withdraw=[net(prefix)]))
        self.drop(peer, [net(prefix)])

    @precondition(lambda self: self.up)
    @rule(data=st.data(), withdrawn=st.lists(st.sampled_from(PREFIXES), max_size=2),
          announced=st.lists(st.tuples(st.sampled_from(PREFIXES), routes_of), max_size=3))
    def one_update_of_several(self, data, withdrawn, announced):
        """Withdrawals first, then announcements in order, a prefix maybe more than once."""
        peer = self.pick(data, self.up)
        routes = [route(int(peer.packed[3]), p, **a) for p, a in announced]
        self.receive(self.rr.update(peer, routes, [net(p) for p in withdrawn]))
        self.drop(peer, [net(p) for p in withdrawn])
        for r in routes:
            self.accept(peer, r)

    @precondition(lambda self: self.up)
    @rule(data=st.data(),
          table=st.dictionaries(st.sampled_from(PREFIXES), routes_of, max_size=3))
    def whole_table(self, data, table):
        peer = self.pick(data, self.up)
        routes = {net(p): route(int(peer.packed[3]), p, **a) for p, a in table.items()}
        self.receive(self.rr.set_table(peer, routes))
        stale = self.stale.get(peer, set())
        self.drop(peer, [p for p in self.ribs[peer] if p not in routes and p not in stale])
        for r in routes.values():
            self.accept(peer, r)

    @precondition(lambda self: self.up)
    @rule(data=st.data())
    def end_of_rib(self, data):
        peer = self.pick(data, self.up)
        self.receive(self.rr.end_of_rib(peer))
        self.drop(peer, list(self.stale.get(peer, ())))

    @rule(seconds=st.sampled_from([1, 10, 40]))
    def time_passes(self, seconds):
        self.now += seconds
        self.receive(self.rr.expire(self.now))
        for peer, until in list(self.deadline.items()):
            if until <= self.now:
                self.drop(peer, list(self.stale[peer]))

    # what must hold

    @invariant()
    def every_peer_holds_what_the_rules_give_it(self):
        expected = reference_tables(self.roles, self.up, self.ribs, self.always_compare_med)
        for peer in self.up:
            assert self.sent.get(peer, {}) == expected[peer]
            assert self.sent_batched.get(peer, {}) == expected[peer]
            assert self.rr.advertised(peer) == expected[peer]
        assert set(self.sent) <= self.up

    @invariant()
    def the_reflector_holds_the_adj_ribs_in(self):
        peers = self.rr.peers()
        assert set(peers) == set(self.roles)
        for a, rib in self.ribs.items():
            assert dict(self.rr.received(a)) == rib
            assert peers[a].up == (a in self.up)
            assert peers[a].stale == len(self.stale.get(a, ()))
        assert self.rr.next_deadline() == min(self.deadline.values(), default=None)


class ReflectorMachineAlwaysCompareMed(ReflectorMachine):
    always_compare_med = True


MACHINE_SETTINGS = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestReflectorMachine = ReflectorMachine.TestCase
TestReflectorMachine.settings = MACHINE_SETTINGS
TestReflectorMachineAlwaysCompareMed = ReflectorMachineAlwaysCompareMed.TestCase
TestReflectorMachineAlwaysCompareMed.settings = MACHINE_SETTINGS
