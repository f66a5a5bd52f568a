"""The node as a route reflector, pass by pass (bgp_agent.reflection): a pass gives the core
only what changed since the pass before, and that must leave every peer with what giving it
the whole tables would."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from hypothesis import given, settings
from hypothesis import strategies as st

from bgp_agent.model import Neighbor, Path, PeerState
from bgp_agent.reflection import Reflection, route
from route_reflector import CLIENT, NON_CLIENT, Reflector
from tests.test_bgp_filter import held
from tests.test_route_reflector import apply

ME, CLUSTER = IPv4Address("10.0.0.100"), IPv4Address("244.0.0.1")
PEERS = [IPv4Address(f"10.0.0.{i}") for i in (1, 2, 3)]
NEIGHBORS = [Neighbor(a, 64512, ME, 64512, kind="node", rr_client=a != PEERS[2])
             for a in PEERS]
PREFIXES = [IPv4Network(f"10.244.{i}.0/26") for i in range(4)]
ATTRIBUTES = [{}, {"local_pref": 200}, {"as_path": (65001,)}, {"cluster_list": (CLUSTER,)}]


def up(address: IPv4Address, since: float = 1.0) -> PeerState:
    return PeerState(address, "up", since=since, router_id=address)


# A pass: for each peer, each prefix absent (None), kept as the very Path of the pass before
# ("same"), or a new Path with one of ATTRIBUTES; sometimes a peer's session is new.
passes = st.lists(st.tuples(
    st.lists(st.lists(st.sampled_from([None, "same", 0, 1, 2, 3]), min_size=len(PREFIXES),
                      max_size=len(PREFIXES)), min_size=len(PEERS), max_size=len(PEERS)),
    st.sampled_from([None, *range(len(PEERS))])), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(passes)
def test_passes_of_changes_leave_every_peer_what_whole_tables_would(script):
    reflection = Reflection(ME, CLUSTER, 64512)
    reference = Reflector(ME, CLUSTER)
    for n in NEIGHBORS:
        reference.add_peer(n.address, CLIENT if n.rr_client else NON_CLIENT)
    reference.peers_up(PEERS)
    sent, expected = {}, {}
    since = {a: 1.0 for a in PEERS}
    tables: dict[IPv4Address, dict[IPv4Network, Path]] = {a: {} for a in PEERS}
    for choices, reset in script:
        for address, row in zip(PEERS, choices):
            table = {}
            for prefix, choice in zip(PREFIXES, row):
                if choice == "same" and prefix in tables[address]:
                    table[prefix] = tables[address][prefix]  # the very object
                elif choice not in (None, "same"):
                    table[prefix] = Path(prefix, address, **ATTRIBUTES[choice])
            tables[address] = table
        if reset is not None:  # down and back between two passes, no graceful restart
            address = PEERS[reset]
            since[address] += 1
            apply(expected, reference.peer_down(address, now=0))
            apply(expected, reference.peers_up([address]))
        apply(sent, reflection.step(NEIGHBORS, {a: up(a, since[a]) for a in PEERS},
                                    {a: dict(t) for a, t in tables.items()}, now=0))
        for address in PEERS:
            apply(expected, reference.set_table(
                address, {p: route(path, address, address)
                          for p, path in tables[address].items()}))
        assert {p: t for p, t in sent.items() if t} == {p: t for p, t in expected.items() if t}
        for address in PEERS:
            assert reflection.core.received(address) == reference.received(address)


def test_a_table_the_caller_changes_in_place_is_still_read_in_full():
    reflection = Reflection(ME, CLUSTER, 64512)
    peers = {a: up(a) for a in PEERS}
    table = {PREFIXES[0]: Path(PREFIXES[0], PEERS[0])}
    accepted = {PEERS[0]: table}
    reflection.step(NEIGHBORS, peers, accepted, now=0)
    table[PREFIXES[1]] = Path(PREFIXES[1], PEERS[0])  # the same dict, one more route
    updates = reflection.step(NEIGHBORS, peers, accepted, now=0)
    assert {u.prefix for u in updates} == {PREFIXES[1]}
    assert set(reflection.core.received(PEERS[0])) == {PREFIXES[0], PREFIXES[1]}


def test_a_member_with_next_hop_self_is_sent_the_reflector_as_next_hop_and_follows_changes():
    """BGPPeer nextHopMode Self (Calico's): that member gets every reflected route with the
    reflector's address as next hop, the others with the owner's (Auto, Keep); the mode
    changed, the next pass's check sends the member its routes again."""
    reflection = Reflection(ME, CLUSTER, 64512)
    peers = {a: up(a) for a in PEERS}
    accepted = {PEERS[0]: {p: Path(p, PEERS[0]) for p in PREFIXES[:2]}}

    def members(self_for=()):
        return [Neighbor(a, 64512, ME, 64512, kind="node", rr_client=True,
                         next_hop_self=a in self_for) for a in PEERS]

    tables = held({}, reflection.sends(reflection.step(members([PEERS[1]]), peers, accepted,
                                                       now=0)))
    assert {a.next_hop for a in tables[PEERS[1]].values()} == {ME}
    assert {a.next_hop for a in tables[PEERS[2]].values()} == {PEERS[0]}
    assert {a.originator_id for a in tables[PEERS[1]].values()} == {PEERS[0]}
    assert reflection.check(tables, now=0) == []
    assert reflection.step(members(), peers, accepted, now=1) == []
    assert reflection.due_check(1)
    tables = held(tables, reflection.check(tables, now=1))
    assert {a.next_hop for a in tables[PEERS[1]].values()} == {PEERS[0]}
    assert reflection.check(tables, now=2) == []
