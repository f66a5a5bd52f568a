"""BGPFilter (Calico's resource): the rules by table, what they do to a peer's imports and
exports (Pipit's own import rules still apply after an Accept), to what a reflector reflects,
and pipitctl as users run it against a real etcd. The BIRD ToR lab (test_tor.py) checks them
on real sessions."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest
import yaml

from bgp_agent import policy
from bgp_agent.bgp_config import BGPConfig
from bgp_agent.bgp_filter import (EXPORT, IMPORT, Export, decide, export, filter_from_spec,
                                  filter_to_document, import_rejection)
from bgp_agent.bgp_peer import BGPPeer, check_peer, peer_from_spec
from bgp_agent.model import Neighbor, Path, PeerState
from bgp_agent.node import NodeRecord
from bgp_agent.reflection import Reflection
from ipam.errors import InvalidResource
from ipam.pool import IPPool
from tests.pipitctl_support import ok, snapshot
from tests.sentences import one_sentence

A, N = IPv4Address, IPv4Network


def rules(direction: str, *entries: dict):
    return filter_from_spec("f", {direction: list(entries)})


# --------------------------------------------------------------------------------------------
# Rules (pure)

@pytest.mark.parametrize("rule, prefix, ibgp, remote, communities, as_path, matches", [
    ({"matchOperator": "Equal", "cidr": "10.0.0.0/8"}, "10.0.0.0/8", False, True, (), (), True),
    ({"matchOperator": "Equal", "cidr": "10.0.0.0/8"}, "10.0.0.0/9", False, True, (), (), False),
    ({"matchOperator": "NotEqual", "cidr": "10.0.0.0/8"}, "10.0.0.0/9", False, True, (), (), True),
    ({"matchOperator": "In", "cidr": "10.0.0.0/8"}, "10.0.0.0/8", False, True, (), (), True),
    ({"matchOperator": "In", "cidr": "10.0.0.0/8"}, "10.9.9.0/24", False, True, (), (), True),
    ({"matchOperator": "In", "cidr": "10.0.0.0/8"}, "11.0.0.0/24", False, True, (), (), False),
    ({"matchOperator": "In", "cidr": "10.0.0.0/8"}, "0.0.0.0/0", False, True, (), (), False),
    ({"matchOperator": "NotIn", "cidr": "10.0.0.0/8"}, "11.0.0.0/24", False, True, (), (),
     True),
    ({"matchOperator": "In", "cidr": "10.0.0.0/8", "prefixLength": {"min": 16, "max": 24}},
     "10.1.0.0/16", False, True, (), (), True),
    ({"matchOperator": "In", "cidr": "10.0.0.0/8", "prefixLength": {"min": 16, "max": 24}},
     "10.1.1.0/25", False, True, (), (), False),
    ({"matchOperator": "In", "cidr": "10.0.0.0/8", "prefixLength": {"min": 16, "max": 24}},
     "10.0.0.0/8", False, True, (), (), False),
    ({"matchOperator": "NotIn", "cidr": "10.0.0.0/8", "prefixLength": {"max": 24}},
     "10.1.1.0/25", False, True, (), (), True),
    ({"matchOperator": "In", "cidr": "10.0.0.0/8", "prefixLength": {"min": 2}},  # min < /8
     "10.0.0.0/8", False, True, (), (), True),
    ({"peerType": "iBGP"}, "10.0.0.0/8", True, True, (), (), True),
    ({"peerType": "iBGP"}, "10.0.0.0/8", False, True, (), (), False),
    ({"peerType": "eBGP"}, "10.0.0.0/8", False, True, (), (), True),
    ({"source": "RemotePeers"}, "10.0.0.0/8", False, False, (), (), False),
    ({"source": "RemotePeers"}, "10.0.0.0/8", False, True, (), (), True),
    ({"communities": {"values": ["65000:100"]}}, "10.0.0.0/8", False, True, ((65000, 100),),
     (), True),
    ({"communities": {"values": ["65000:100"]}}, "10.0.0.0/8", False, True, ((65000, 101),),
     (), False),
    ({"asPathPrefix": [65001, 65002]}, "10.0.0.0/8", False, True, (), (65001, 65002, 7), True),
    ({"asPathPrefix": [65001, 65002]}, "10.0.0.0/8", False, True, (), (65001,), False),
    ({"asPathPrefix": [65001]}, "10.0.0.0/8", False, True, (), (7, 65001), False),
    ({"matchOperator": "In", "cidr": "10.0.0.0/8", "peerType": "eBGP",
      "asPathPrefix": ["1.10"]}, "10.1.0.0/16", False, True, (), (65546,), True),
    ({}, "0.0.0.0/0", True, False, (), (), True),  # no condition: every route
])
def test_a_rule_matches_when_everything_it_names_holds(rule, prefix, ibgp, remote,
                                                       communities, as_path, matches):
    [parsed] = rules(IMPORT, {"action": "Reject", **rule}).import_rules
    assert parsed.matches(N(prefix), ibgp, remote, communities, as_path) is matches


def test_the_first_matching_rule_decides_across_the_filters_in_the_peers_order():
    allow = filter_from_spec("allow", {IMPORT: [
        {"action": "Accept", "matchOperator": "Equal", "cidr": "0.0.0.0/0"}]})
    deny = filter_from_spec("deny", {IMPORT: [
        {"action": "Reject", "matchOperator": "In", "cidr": "192.0.2.0/24"},
        {"action": "Reject"}]})
    assert import_rejection([allow, deny], N("0.0.0.0/0"), False, (), ()) == ""
    assert import_rejection([allow, deny], N("192.0.2.1/32"), False, (), ()) == (
        "BGPFilter 'deny' rejects it (importV4 rule 1)")
    assert import_rejection([allow, deny], N("198.51.100.0/24"), False, (), ()) == (
        "BGPFilter 'deny' rejects it (importV4 rule 2)")
    assert import_rejection([deny, allow], N("0.0.0.0/0"), False, (), ()) != ""
    assert decide([allow], IMPORT, N("10.0.0.0/8"), False, True) is None  # no rule: no say
    assert decide([allow], EXPORT, N("0.0.0.0/0"), False, False) is None  # import rules only
    assert export([deny], N("192.0.2.1/32"), False, False).sent  # (no export rule)


def test_an_accepts_operations_add_communities_and_prepend_in_calicos_order():
    tagged = filter_from_spec("tag", {EXPORT: [
        {"action": "Accept", "matchOperator": "In", "cidr": "10.244.0.0/16", "operations": [
            {"prependASPath": {"prefix": [65001, 65002]}},
            {"addCommunity": {"value": "64512:7"}},
            {"addCommunity": {"value": "4200000000:1:2"}},
            {"prependASPath": {"prefix": [65003]}},
            {"addCommunity": {"value": "64512:7"}}]},
        {"action": "Accept", "matchOperator": "Equal", "cidr": "10.96.0.0/12"}]})
    assert export([tagged], N("10.244.1.0/26"), False, False) == Export(
        True, ((64512, 7),), ((4200000000, 1, 2),), (65003, 65001, 65002))
    assert export([tagged], N("10.96.0.0/12"), False, False) == Export(True)  # as it is
    assert export([tagged], N("10.97.0.0/16"), False, False) == Export(True)  # no rule


def test_a_filter_document_reads_back_as_it_was_written():
    spec = {EXPORT: [{"action": "Reject", "cidr": "10.97.0.0/16", "matchOperator": "In",
                      "prefixLength": {"min": 16, "max": 28}, "source": "RemotePeers",
                      "peerType": "eBGP", "communities": {"values": ["64512:7"]},
                      "asPathPrefix": [65001]},
                     {"action": "Accept", "operations": [
                         {"prependASPath": {"prefix": [65001, 65001]}},
                         {"addCommunity": {"value": "64512:9"}}]}],
            IMPORT: [{"action": "Accept", "cidr": "0.0.0.0/0", "matchOperator": "Equal"},
                     {"action": "Reject"}]}
    document = filter_to_document(filter_from_spec("f", spec))
    assert document["kind"] == "BGPFilter" and document["spec"] == spec
    # the default bounds are not written out
    plain = filter_from_spec("f", {IMPORT: [{"action": "Reject", "cidr": "10.0.0.0/8",
                                             "matchOperator": "In"}]})
    assert filter_to_document(plain)["spec"][IMPORT] == [
        {"action": "Reject", "cidr": "10.0.0.0/8", "matchOperator": "In"}]
    # Calico's empty IPv6 lists are fine
    assert filter_from_spec("f", {"importV6": [], "exportV6": []}).import_rules == ()


@pytest.mark.parametrize("spec, facts", [
    ({IMPORT: [{"action": "Drop"}]}, ["importV4 rule 1", "Drop", "Accept or Reject"]),
    ({IMPORT: [{}]}, ["action", "Accept or Reject"]),
    ({IMPORT: [{"action": "Accept", "cidr": "10.0.0.0/8"}]}, ["cidr and matchOperator"]),
    ({IMPORT: [{"action": "Accept", "matchOperator": "In"}]}, ["cidr and matchOperator"]),
    ({IMPORT: [{"action": "Accept", "cidr": "10.0.0.1/8", "matchOperator": "In"}]},
     ["host bits", "10.0.0.0/8"]),
    ({IMPORT: [{"action": "Accept", "cidr": "fd00::/8", "matchOperator": "In"}]}, ["IPv6"]),
    ({IMPORT: [{"action": "Accept", "cidr": "ten", "matchOperator": "In"}]}, ["'ten'"]),
    ({IMPORT: [{"action": "Accept", "cidr": "10.0.0.0/8", "matchOperator": "Within"}]},
     ["Within", "Equal, NotEqual, In, NotIn"]),
    ({IMPORT: [{"action": "Accept", "cidr": "10.0.0.0/24", "matchOperator": "In",
                "prefixLength": {"max": 16}}]}, ["max 16", "10.0.0.0/24", "nothing"]),
    ({IMPORT: [{"action": "Accept", "cidr": "10.0.0.0/8", "matchOperator": "In",
                "prefixLength": {"min": 24, "max": 16}}]}, ["min 24", "max 16"]),
    ({IMPORT: [{"action": "Accept", "cidr": "10.0.0.0/8", "matchOperator": "In",
                "prefixLength": {"min": 33}}]}, ["min 33", "0-32"]),
    ({IMPORT: [{"action": "Accept", "cidr": "10.0.0.0/8", "matchOperator": "Equal",
                "prefixLength": {"min": 9}}]}, ["In or NotIn"]),
    ({IMPORT: [{"action": "Accept", "prefixLength": {"min": 9}}]}, ["needs a cidr"]),
    ({IMPORT: [{"action": "Accept", "source": "Local"}]}, ["RemotePeers"]),
    ({IMPORT: [{"action": "Accept", "peerType": "ebgp"}]}, ["eBGP or iBGP"]),
    ({IMPORT: [{"action": "Accept", "communities": {"values": ["1:2", "3:4"]}}]},
     ["exactly one"]),
    ({IMPORT: [{"action": "Accept", "communities": {"values": ["1:2:3"]}}]},
     ["large community"]),
    ({IMPORT: [{"action": "Accept", "communities": {"values": ["70000:1"]}}]}, ["70000:1"]),
    ({IMPORT: [{"action": "Accept", "asPathPrefix": []}]}, ["asPathPrefix"]),
    ({IMPORT: [{"action": "Accept", "asPathPrefix": [23456]}]}, ["23456", "AS_TRANS"]),
    ({EXPORT: [{"action": "Reject", "interface": "*.calico"}]}, ["interface", "not supported"]),
    ({EXPORT: [{"action": "Accept", "priority": 512}]}, ["priority", "not supported"]),
    ({EXPORT: [{"action": "Reject", "operations": [{"addCommunity": {"value": "1:2"}}]}]},
     ["operations go with action Accept"]),
    ({IMPORT: [{"action": "Accept", "operations": [{"addCommunity": {"value": "1:2"}}]}]},
     ["operations on import are not supported"]),
    ({EXPORT: [{"action": "Accept", "operations": [{"setPriority": {"value": 5}}]}]},
     ["operation 1", "setPriority is not supported"]),
    ({EXPORT: [{"action": "Accept", "operations": [{"addCommunity": {"value": "1:2"},
                                                    "prependASPath": {"prefix": [1]}}]}]},
     ["operation 1", "exactly one"]),
    ({EXPORT: [{"action": "Accept", "operations": [{"prependASPath": {"prefix": []}}]}]},
     ["operation 1", "1-10 AS numbers"]),
    ({EXPORT: [{"action": "Accept", "operations": [{"addCommunity": {"value": "1"}}]}]},
     ["operation 1", "community '1'"]),
    ({EXPORT: [{"action": "Accept", "operations": [{"prependASPath": {"prefix": [1]}}] * 11}]},
     ["1-10 operations"]),
    ({"importV6": [{"action": "Reject"}]}, ["importV6", "IPv4 only"]),
    ({IMPORT: "reject all"}, ["list of rules"]),
    ({IMPORT: ["Reject"]}, ["importV4 rule 1", "mapping"]),
    ({EXPORT: [{"action": "Reject", "cdir": "10.0.0.0/8"}]}, ["unknown field 'cdir'"]),
    ({"import": []}, ["unknown spec field 'import'"]),
])
def test_a_bad_filter_is_one_sentence(spec, facts):
    with pytest.raises(InvalidResource) as error:
        filter_from_spec("tor-in", spec)
    one_sentence(str(error.value), "BGPFilter 'tor-in'", *facts)


def test_a_peer_names_its_filters_once_each_and_only_filters_that_exist():
    spec = {"peerIP": "10.0.0.1", "asNumber": 65001}
    assert peer_from_spec("tor", {**spec, "filters": ["a", "b"]}).filters == ("a", "b")
    for filters, fact in ((["a", "a"], "'a' twice"), ("a", "list"), (["A_B"], "valid")):
        with pytest.raises(InvalidResource) as error:
            peer_from_spec("tor", {**spec, "filters": filters})
        one_sentence(str(error.value), "BGPPeer 'tor'", fact)
    peer = peer_from_spec("tor", {**spec, "filters": ["a", "b"]})
    check_peer(peer, [], [], ["a", "b"])
    with pytest.raises(InvalidResource) as error:
        check_peer(peer, [], [], ["a"])
    one_sentence(str(error.value), "BGPPeer 'tor'", "'b'", "does not exist")


# --------------------------------------------------------------------------------------------
# Imports and exports

POOL = IPPool(name="default", cidr=N("10.244.0.0/16"))
TOR = A("192.168.1.1")


def tor(*filters, peer_as: int = 65100) -> Neighbor:
    return Neighbor(TOR, peer_as, A("192.168.1.10"), 64512, kind="node", name="tor",
                    filters=tuple(filters))


def test_import_filters_reject_first_and_an_accept_does_not_lift_pipits_own_rules():
    only_default = filter_from_spec("only-default", {IMPORT: [
        {"action": "Accept", "matchOperator": "Equal", "cidr": "0.0.0.0/0"},
        {"action": "Accept", "matchOperator": "In", "cidr": "10.244.0.0/16"},
        {"action": "Reject"}]})
    paths = {N(p): Path(N(p), TOR) for p in ("0.0.0.0/0", "192.0.2.1/32", "10.244.3.0/26")}
    result = policy.import_routes(tor(only_default), paths, [POOL], set(), 64512)
    assert set(result.accepted) == {N("0.0.0.0/0")}
    assert result.rejected == {
        N("192.0.2.1/32"): "BGPFilter 'only-default' rejects it (importV4 rule 3)",
        # accepted by the filter, refused by Pipit: pod addresses only from their node
        N("10.244.3.0/26"): "it is inside an IP pool (only nodes announce pod addresses)"}
    # without the filter, as before
    assert set(policy.import_routes(tor(), paths, [POOL], set(), 64512).accepted) == {
        N("0.0.0.0/0"), N("192.0.2.1/32")}
    # a verdict kept from the pass before is not kept across a change of filters
    before = policy.import_routes(tor(), paths, [POOL], set(), 64512)
    again = policy.import_routes(tor(only_default), paths, [POOL], set(), 64512,
                                 previous=before)
    assert set(again.accepted) == {N("0.0.0.0/0")}


def test_export_filters_hold_back_what_they_reject_by_peer_type():
    no_services_to_ebgp = filter_from_spec("no-lb", {EXPORT: [
        {"action": "Accept", "matchOperator": "In", "cidr": "10.97.0.0/16",
         "peerType": "iBGP"},
        {"action": "Reject", "matchOperator": "In", "cidr": "10.97.0.0/16"},
        {"action": "Reject", "source": "RemotePeers"}]})  # a node's own routes: not remote
    blocks = [N("10.244.1.0/26")]
    services = [N("10.96.0.0/12"), N("10.97.0.0/16")]
    ebgp, ibgp = tor(no_services_to_ebgp), tor(no_services_to_ebgp, peer_as=64512)
    plain = Neighbor(A("192.168.1.2"), 65100, A("192.168.1.10"), 64512, kind="node")
    out = policy.announcements(blocks, [ebgp, plain], BGPConfig(), services)
    assert set(out[TOR]) == {N("10.244.1.0/26"), N("10.96.0.0/12")}
    assert set(out[A("192.168.1.2")]) == {*blocks, *services}
    out = policy.announcements(blocks, [ibgp], BGPConfig(), services)
    assert set(out[TOR]) == {*blocks, *services}


def test_an_export_accept_prepends_and_tags_the_nodes_own_routes():
    """After the filter, the cluster's communities are added too (Calico's order)."""
    prepend = filter_from_spec("backup-path", {EXPORT: [
        {"action": "Accept", "matchOperator": "In", "cidr": "10.244.0.0/16", "operations": [
            {"prependASPath": {"prefix": [64512, 64512]}},
            {"addCommunity": {"value": "65535:666"}}]}]})
    config = BGPConfig(communities=((64512, 100),))
    out = policy.announcements([N("10.244.1.0/26")], [tor(prepend)], config,
                               [N("10.96.0.0/12")])[TOR]
    block, services = out[N("10.244.1.0/26")], out[N("10.96.0.0/12")]
    # to this eBGP peer the node's own AS first (ExaBGP sends a given path as it is)
    assert (block.as_path, block.communities) == ((64512, 64512, 64512),
                                                  ((64512, 100), (65535, 666)))
    assert (services.as_path, services.communities) == ((), ((64512, 100),))
    ibgp = replace(tor(prepend), peer_as=64512)
    out = policy.announcements([N("10.244.1.0/26")], [ibgp], config, [])[TOR]
    assert out[N("10.244.1.0/26")].as_path == (64512, 64512)


def test_a_peer_naming_a_filter_that_is_gone_runs_without_it_and_the_status_says_so():
    me = NodeRecord("n1", address=IPv4Interface("192.168.1.10/24"))
    peer = BGPPeer("tor", TOR, 65100, filters=("kept", "gone"))
    kept = filter_from_spec("kept", {IMPORT: [{"action": "Reject"}]})
    selection = policy.select_neighbors(me, [me], BGPConfig(), [peer], lambda ref: "",
                                        {"kept": kept})
    [neighbor] = selection.neighbors
    assert neighbor.filters == (kept,)
    assert selection.warnings == ["BGPPeer 'tor' names BGPFilter 'gone', which is not there "
                                  "or not valid: its sessions run without it"]


# --------------------------------------------------------------------------------------------
# A reflector's members

RR, CLUSTER = A("10.0.0.100"), A("244.0.0.1")
CLIENTS = [A(f"10.0.0.{i}") for i in (1, 2, 3)]
BLOCKS = [N(f"10.244.{i}.0/26") for i in range(2)]


def members(filtered_by=()) -> list[Neighbor]:
    return [Neighbor(a, 64512, RR, 64512, kind="node", rr_client=True,
                     filters=tuple(filtered_by) if a == CLIENTS[1] else ())
            for a in CLIENTS]


def held(tables: dict, sends) -> dict:
    """What each member holds after the sends (as the speaker would)."""
    for send in sends:
        for address in send.neighbors:
            table = tables.setdefault(address, {})
            for prefix in send.prefixes:
                table.pop(prefix, None)
            for announced in send.routes:
                table[announced.prefix] = announced
    return tables


def test_a_reflector_reflects_past_a_members_export_filter_and_follows_its_changes():
    no_first = filter_from_spec("no-first", {EXPORT: [
        {"action": "Reject", "matchOperator": "Equal", "cidr": str(BLOCKS[0]),
         "source": "RemotePeers"}]})
    reflection = Reflection(RR, CLUSTER, 64512)
    peers = {a: PeerState(a, "up", since=1.0, router_id=a) for a in CLIENTS}
    accepted = {CLIENTS[0]: {b: Path(b, CLIENTS[0]) for b in BLOCKS}}
    tables = held({}, reflection.sends(reflection.step(members([no_first]), peers, accepted,
                                                       now=0)))
    assert set(tables[CLIENTS[1]]) == {BLOCKS[1]}
    assert set(tables[CLIENTS[2]]) == set(BLOCKS)
    assert not reflection.reflects(CLIENTS[1], BLOCKS[0])
    assert reflection.reflects(CLIENTS[2], BLOCKS[0])
    assert reflection.check(tables, now=0) == []  # what the speaker holds is what it wants
    # the filter goes: the next pass's check gives the member the route
    assert reflection.step(members(), peers, accepted, now=1) == []
    assert reflection.due_check(1)
    tables = held(tables, reflection.check(tables, now=1))
    assert set(tables[CLIENTS[1]]) == set(BLOCKS)
    # and back: taken from it again
    reflection.step(members([no_first]), peers, accepted, now=2)
    assert reflection.due_check(2)
    tables = held(tables, reflection.check(tables, now=2))
    assert set(tables[CLIENTS[1]]) == {BLOCKS[1]}


def test_a_reflector_sends_a_member_its_filters_operations_and_the_others_the_route_as_is():
    prepend = filter_from_spec("prepend", {EXPORT: [
        {"action": "Accept", "source": "RemotePeers", "operations": [
            {"prependASPath": {"prefix": [64512]}}, {"addCommunity": {"value": "64512:5"}},
            {"addCommunity": {"value": "4200000000:1:2"}}]}]})
    reflection = Reflection(RR, CLUSTER, 64512)
    peers = {a: PeerState(a, "up", since=1.0, router_id=a) for a in CLIENTS}
    accepted = {CLIENTS[0]: {b: Path(b, CLIENTS[0], communities=((1, 1),),
                                     large_communities=((1, 1, 1),),
                                     extended_communities=(0x0002FDE800000007,))
                             for b in BLOCKS}}
    tables = held({}, reflection.sends(reflection.step(members([prepend]), peers, accepted,
                                                       now=0)))
    changed, plain = tables[CLIENTS[1]][BLOCKS[0]], tables[CLIENTS[2]][BLOCKS[0]]
    assert (changed.as_path, changed.communities) == ((64512,), ((1, 1), (64512, 5)))
    assert changed.large_communities == ((1, 1, 1), (4200000000, 1, 2))
    assert (plain.as_path, plain.communities, plain.large_communities) == (
        (), ((1, 1),), ((1, 1, 1),))
    assert changed.extended_communities == plain.extended_communities == (0x0002FDE800000007,)
    assert changed.originator_id == plain.originator_id == CLIENTS[0]  # reflected all the same
    assert reflection.check(tables, now=0) == []
    assert reflection.reflects(CLIENTS[1], BLOCKS[0])


# --------------------------------------------------------------------------------------------
# pipitctl

FILTER = """apiVersion: pipit.dev/v1
kind: BGPFilter
metadata: {name: tor-in}
spec:
  importV4:
    - {action: Accept, matchOperator: Equal, cidr: 0.0.0.0/0}
    - {action: Reject}
"""
PEER = """apiVersion: pipit.dev/v1
kind: BGPPeer
metadata: {name: tor}
spec: {peerIP: 192.168.1.1, asNumber: 65100, filters: [tor-in]}
"""


def test_pipitctl_applies_shows_and_deletes_a_filter_only_once_no_peer_names_it(etcd, ctl):
    before = snapshot(etcd)
    one_sentence(ctl("apply", "-f", "-", input=PEER), "BGPPeer 'tor'", "'tor-in'",
                 "does not exist")
    assert snapshot(etcd) == before
    assert ok(ctl("apply", "-f", "-", input=PEER + "---\n" + FILTER)).splitlines() == [
        "bgpfilter 'tor-in' created", "bgppeer 'tor' created"]  # the filter first, in one go
    table = ok(ctl("get", "bgpfilters")).splitlines()
    assert [line.split() for line in table] == [["NAME", "RULES"],
                                                ["tor-in", "2", "import,", "0", "export"]]
    shown = yaml.safe_load(ok(ctl("get", "filter", "tor-in", "-o", "yaml")))
    assert shown["spec"] == yaml.safe_load(FILTER)["spec"]
    assert "tor-in" in ok(ctl("get", "bgppeers", "-o", "wide"))
    before = snapshot(etcd)
    one_sentence(ctl("delete", "bgpfilter", "tor-in"), "bgpfilter 'tor-in'",
                 "BGPPeer 'tor'", "nothing was deleted")
    assert snapshot(etcd) == before
    ok(ctl("apply", "-f", "-", input=PEER.replace(", filters: [tor-in]", "")))
    ok(ctl("delete", "bgpfilter", "tor-in"))
    assert ok(ctl("get", "bgpfilters")).splitlines()[1:] == []
    # one input deleting both, the filter first: the peer goes first
    ok(ctl("apply", "-f", "-", input=FILTER + "---\n" + PEER))
    assert ok(ctl("delete", "-f", "-", input=FILTER + "---\n" + PEER)).splitlines() == [
        "bgppeer 'tor' deleted", "bgpfilter 'tor-in' deleted"]


def test_pipitctl_refuses_a_bad_filter_in_one_sentence_writing_nothing(etcd, ctl):
    before = snapshot(etcd)
    one_sentence(ctl("apply", "-f", "-", input=FILTER.replace("{action: Reject}",
                                                              "{action: Drop}")),
                 "BGPFilter 'tor-in'", "importV4 rule 2", "Accept or Reject")
    assert snapshot(etcd) == before
