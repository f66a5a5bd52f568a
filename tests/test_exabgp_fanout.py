"""pipit-exabgp's fan-out changes (bgp_agent.exabgp_fanout) against ExaBGP's own code: matching
by address picks exactly the peers ExaBGP's regular expressions pick, in the same order; a
route whose next hop is not `self` is handed to every neighbour uncopied, one with `self` is
still copied and rewritten per neighbour. (The reflector end to end, real BIRD and FRR clients
receiving what it sends through pipit-exabgp: test_route_reflection.py.)"""

from __future__ import annotations

import pytest
from exabgp.bgp.message.update.attribute.attributes import Attributes
from exabgp.bgp.neighbor import Neighbor
from exabgp.configuration.configuration import Configuration
from exabgp.environment import getenv
from exabgp.logger import log
from exabgp.protocol.ip import IP
from exabgp.reactor.api.command import announce, limit, rib
from exabgp.reactor.api.command.limit import extract_neighbors
from exabgp.reactor.protocol import Protocol

from bgp_agent import exabgp_fanout

pytestmark = pytest.mark.unit

PEERS = [
    f"neighbor {address} local-ip 10.77.0.1 local-as 64512 peer-as {asn} router-id 10.77.0.1 "
    "family-allowed in-open"
    for address, asn in [("10.77.1.5", 64512), ("10.77.1.50", 64512), ("10.77.1.6", 64513),
                         ("10.77.2.5", 64512)]
]
ORIGINAL = exabgp_fanout.unwrapped(limit.match_neighbors)  # ExaBGP's own


@pytest.mark.parametrize("command", [
    "neighbor 10.77.1.5 announce route 10.1.0.0/26 next-hop 10.77.1.5",
    "neighbor 10.77.1.5 , neighbor 10.77.2.5 announce attributes next-hop 10.77.1.5 nlri "
    "10.1.0.0/26 10.1.0.64/26",
    "neighbor 10.77.2.5 , neighbor 10.77.1.5 , neighbor 10.77.1.5 withdraw attributes nlri "
    "10.1.0.0/26",  # the order is the peers', a repeat counts once
    "neighbor 10.77.1.50 announce route 10.1.0.0/26 next-hop 10.77.1.5",  # not 10.77.1.5
    "neighbor 10.77.9.9 announce route 10.1.0.0/26 next-hop 10.77.1.5",  # nobody
    "neighbor * announce route 10.1.0.0/26 next-hop 10.77.1.5",
    "neighbor 10.77.1.6 peer-as 64513 announce route 10.1.0.0/26 next-hop 10.77.1.5",
    "neighbor 10.77.1.6 peer-as 64512 announce route 10.1.0.0/26 next-hop 10.77.1.5",
    "neighbor 10.77.1.5 , neighbor 10.77.1.6 local-as 64512 announce eor ipv4 unicast",
    "announce route 10.1.0.0/26 next-hop 10.77.1.5",  # no selector: every peer
])
def test_matching_by_address_picks_what_exabgp_picks(command):
    descriptions, _ = extract_neighbors(command)
    fast = exabgp_fanout.matcher(ORIGINAL)
    assert fast(PEERS, descriptions) == ORIGINAL(PEERS, descriptions)


def test_plain_selectors_do_not_reach_the_regular_expressions():
    def refuse(peers, descriptions):
        raise AssertionError("ExaBGP's matching was used")
    descriptions, _ = extract_neighbors(  # 10.77.0.0 to 10.77.1.49
        " , ".join(f"neighbor 10.77.{i // 250}.{i % 250}" for i in range(300))
        + " announce attributes next-hop 10.77.1.5 nlri 10.1.0.0/26")
    picked = exabgp_fanout.matcher(refuse)(PEERS, descriptions)
    assert picked == [PEERS[0], PEERS[2]] == ORIGINAL(PEERS, descriptions)


def parsed_route(line: str):
    log.init(getenv())
    configuration = Configuration([])
    assert configuration.partial("static", line, "announce")
    (change,) = configuration.scope.pop_routes()
    return change


def neighbor(local: str) -> Neighbor:
    n = Neighbor()
    n["local-address"] = IP.create(local)
    return n


def test_a_route_with_its_own_next_hop_is_given_to_every_neighbour_uncopied():
    change = parsed_route("route 10.1.0.0/26 next-hop 10.77.1.5 origin igp")
    remove_self = exabgp_fanout.sharing(Neighbor.remove_self)
    given = [remove_self(neighbor(f"10.77.0.{i}"), change) for i in (1, 2)]
    assert all(g is change for g in given)
    assert str(change.nlri.nexthop) == "10.77.1.5"


def test_a_route_with_next_hop_self_is_still_copied_and_rewritten_per_neighbour():
    change = parsed_route("route 10.1.0.64/26 next-hop self")
    remove_self = exabgp_fanout.sharing(Neighbor.remove_self)
    first, second = (remove_self(neighbor(f"10.77.0.{i}"), change) for i in (1, 2))
    assert first is not change and second is not change
    assert (str(first.nlri.nexthop), str(second.nlri.nexthop)) == ("10.77.0.1", "10.77.0.2")
    assert change.nlri.nexthop.SELF  # the command's own change is left as it was


def test_apply_installs_each_change_once_into_every_place_that_uses_it():
    methods = [(Neighbor, "remove_self"), (Configuration, "inject_change"), (Attributes, "pack"),
               (Protocol, "send")]
    originals = [getattr(owner, name) for owner, name in methods]
    try:
        assert exabgp_fanout.apply() is None
        assert exabgp_fanout.apply() is None  # twice: still one layer
        for module in (limit, announce, rib):
            assert module.match_neighbors.__wrapped__ is ORIGINAL
        for (owner, name), original in zip(methods, originals):
            assert getattr(owner, name).__wrapped__ is original
    finally:
        for module in (limit, announce, rib):
            module.match_neighbors = ORIGINAL
        for (owner, name), original in zip(methods, originals):
            setattr(owner, name, original)


def session(local_as: int, peer_as: int, asn4: bool = True):
    """What packing path attributes reads of ExaBGP's Negotiated."""
    from types import SimpleNamespace

    from exabgp.bgp.message.open.asn import ASN
    return SimpleNamespace(local_as=ASN(local_as), peer_as=ASN(peer_as), asn4=asn4, aigp=False)


REFLECTED = ("route 10.1.0.0/26 next-hop 10.77.1.5 origin igp local-preference 100 "
             "originator-id 10.77.1.5 cluster-list 244.0.0.1 as-path [ 64999 70000 ]")


def test_attributes_are_packed_once_per_kind_of_session_and_as_exabgp_packs_them():
    calls = []

    def counting(attributes, negotiated, with_default=True):
        calls.append(negotiated)
        return Attributes.pack(attributes, negotiated, with_default)
    pack = exabgp_fanout.packed_once(counting)
    attributes = parsed_route(REFLECTED).attributes
    kinds = [session(64512, 64512), session(64512, 64513), session(64512, 64512, asn4=False)]
    for _ in range(3):  # three rounds of every kind: packed once per kind
        for kind in kinds:
            assert pack(attributes, kind) == Attributes.pack(attributes, kind)
    assert calls == kinds
    assert len({pack(attributes, kind) for kind in kinds}) == 3  # they do differ


def test_attributes_with_next_hop_self_are_packed_per_session():
    calls = []

    def counting(attributes, negotiated, with_default=True):
        calls.append(negotiated)
        return b"per session"
    pack = exabgp_fanout.packed_once(counting)
    attributes = parsed_route("route 10.1.0.64/26 next-hop self").attributes
    pack(attributes, session(64512, 64512))
    pack(attributes, session(64512, 64512))
    assert len(calls) == 2


def test_routes_are_injected_with_the_peers_as_a_set():
    seen = []
    inject = exabgp_fanout.to_set(lambda configuration, peers, change: seen.append(peers))
    inject(None, PEERS, "change")
    assert seen == [set(PEERS)]


def update(withdrawn: bytes = b"", attributes: bytes = b"", nlri: bytes = b"") -> bytes:
    body = (len(withdrawn).to_bytes(2, "big") + withdrawn
            + len(attributes).to_bytes(2, "big") + attributes + nlri)
    return b"\xff" * 16 + (19 + len(body)).to_bytes(2, "big") + b"\x02" + body


ORIGIN_NEXT_HOP = bytes.fromhex("40010100" "4003040a4d0105")  # IGP, next hop 10.77.1.5
A_26 = bytes.fromhex("1a0a010000")  # 10.1.0.0/26


@pytest.mark.parametrize("raw,reported", [
    (update(attributes=ORIGIN_NEXT_HOP, nlri=A_26), False),  # an announcement
    (update(withdrawn=A_26), True),
    (update(attributes=bytes.fromhex("800f03000201")), True),  # MP_UNREACH_NLRI (IPv6)
    (update(attributes=bytes.fromhex("900f0003000201") + ORIGIN_NEXT_HOP), True),  # extended
    (update(), False),  # IPv4 End-of-RIB: nothing withdrawn
    (update(attributes=bytes.fromhex("4001")), True),  # cut short: reported, as ExaBGP did
    (b"\xff" * 16 + b"\x00\x13\x04", True),  # not an UPDATE
])
def test_only_updates_that_withdraw_are_reported_as_sent(raw, reported):
    assert exabgp_fanout.withdraws(raw) is reported
