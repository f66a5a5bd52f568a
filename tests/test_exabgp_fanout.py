"""pipit-exabgp's fan-out changes (bgp_agent.exabgp_fanout) against ExaBGP's own code: matching
by address picks exactly the peers ExaBGP's regular expressions pick, in the same order; a
route whose next hop is not `self` is handed to every neighbour uncopied, one with `self` is
still copied and rewritten per neighbour. (The reflector end to end, real BIRD and FRR clients
receiving what it sends through pipit-exabgp: test_route_reflection.py.)"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from exabgp.bgp.message.update import Update
from exabgp.bgp.message.update.attribute.attributes import Attributes
from exabgp.bgp.neighbor import Neighbor
from exabgp.configuration.configuration import Configuration
from exabgp.environment import getenv
from exabgp.logger import log
from exabgp.protocol.ip import IP
from exabgp.reactor.api.command import announce, limit, rib
from exabgp.reactor.api.command.command import Command
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
               (Protocol, "new_update"), (Update, "_split_nlris")]
    originals = [getattr(owner, name) for owner, name in methods]
    commands = {api: dict(Command.callback[api]) for api in ("text", "json")}
    try:
        assert exabgp_fanout.apply() is None
        assert exabgp_fanout.apply() is None  # twice: still one layer
        for module in (limit, announce, rib):
            assert module.match_neighbors.__wrapped__ is ORIGINAL
        for (owner, name), original in zip(methods, originals):
            assert getattr(owner, name).__wrapped__ is original
        for name in ("announce attribute", "announce attributes"):
            assert Command.callback["text"][name].__wrapped__ is commands["text"][name]
    finally:
        for module in (limit, announce, rib):
            module.match_neighbors = ORIGINAL
        for (owner, name), original in zip(methods, originals):
            setattr(owner, name, original)
        for api, callbacks in commands.items():
            Command.callback[api].update(callbacks)


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


class Neighbour:
    """What Configuration.inject_change uses of a configured neighbour: its families, its
    outgoing RIB (ExaBGP's), remove_self (as pipit-exabgp installs it)."""
    remove_self = exabgp_fanout.sharing(exabgp_fanout.unwrapped(Neighbor.remove_self))

    def __init__(self, families):
        from types import SimpleNamespace

        from exabgp.rib.outgoing import OutgoingRIB
        self._families = families
        self.rib = SimpleNamespace(outgoing=OutgoingRIB(True, families))

    def families(self):
        return list(self._families)

    def ip_self(self, afi):
        return IP.create("10.77.0.1")


def rib_state(rib) -> tuple:
    """An outgoing RIB's queues and its record of what the peer has, by index and object."""
    def ids(table):
        return [(k, id(v)) for k, v in table.items()]
    return (ids(rib._new_nlri), ids(rib._new_attribute),
            {a: {f: ids(q) for f, q in by.items()} for a, by in rib._new_attr_af_nlri.items()},
            {f: ids(seen) for f, seen in rib._seen.items()})


def withdrawal(change):
    from copy import deepcopy

    from exabgp.bgp.message.action import Action
    gone = deepcopy(change)
    gone.nlri.action = Action.WITHDRAW
    return gone


def test_routes_go_into_each_named_neighbours_rib_as_exabgp_puts_them():
    from types import SimpleNamespace

    from exabgp.protocol.family import AFI, SAFI
    a = parsed_route(REFLECTED)
    a_again = parsed_route(REFLECTED)  # the same route and attributes: the peer has it
    a_moved = parsed_route(REFLECTED.replace("local-preference 100", "local-preference 50"))
    b = parsed_route("route 10.1.0.64/26 next-hop 10.77.1.6 originator-id 10.77.1.6")
    steps = [({0, 1}, a), ({0, 1}, b), ({0, 1, 2, 3}, a_again), ([1], a_moved), ([0], withdrawal(b)),
             ("drain", None), ({0, 1, 2}, a_again), ([0], b), ([9], a)]
    ribs = {}
    for inject in (exabgp_fanout.unwrapped(Configuration.inject_change),
                   exabgp_fanout.injecting(exabgp_fanout.unwrapped(Configuration.inject_change),
                                           exabgp_fanout.SharedInjection())):
        configuration = SimpleNamespace(neighbors={
            PEERS[i]: Neighbour([] if i == 3 else [(AFI.ipv4, SAFI.unicast)]) for i in range(4)})
        results, states = [], []
        for peers, change in steps:
            if peers == "drain":
                for neighbour in configuration.neighbors.values():
                    list(neighbour.rib.outgoing.updates(True))
                continue
            results.append(inject(configuration, [PEERS[i] for i in peers if i < 4], change))
            states.append([rib_state(n.rib.outgoing) for n in configuration.neighbors.values()])
        ribs[inject] = (results, states)
    (theirs, ours) = ribs.values()
    assert ours == theirs
    assert theirs[0] == [True, True, True, True, True, True, True, False]  # [9]: nobody


class Reactor:
    """What an API command's handler uses of ExaBGP's reactor: its peers, configuration (with
    Neighbour doubles holding ExaBGP's RIBs), the answers it gives and the work it schedules."""

    def __init__(self, inject_change):
        from types import SimpleNamespace

        from exabgp.protocol.family import AFI, SAFI
        ipv4 = [(AFI.ipv4, SAFI.unicast)]
        self.configuration = SimpleNamespace(
            neighbors={name: Neighbour([] if name == PEERS[3] else ipv4) for name in PEERS})
        self.configuration.inject_change = lambda peers, change: inject_change(
            self.configuration, peers, change)
        self.answers: list[str] = []
        self.processes = SimpleNamespace(answer_done=lambda s: self.answers.append("done"),
                                         answer_error=lambda s: self.answers.append("error"))
        self.asynchronous = SimpleNamespace(schedule=lambda s, line, work: self.work.append(work))
        self.work: list = []

    def peers(self, service):
        return list(self.configuration.neighbors)

    def run(self, handler, line: str) -> None:
        from exabgp.reactor.api import API
        handler(API(self), self, "test", line, False)
        for work in self.work:
            for _ in work:
                pass
        self.work = []

    def sent(self) -> list[bytes]:
        """The UPDATEs each neighbour's RIB gives now, as bytes."""
        from types import SimpleNamespace
        out = []
        for neighbour in self.configuration.neighbors.values():
            session = Recorded([], report_sent=False)
            session.neighbor.rib = SimpleNamespace(outgoing=neighbour.rib.outgoing)
            for _ in Protocol.new_update(session, True):
                pass
            out.append(b"".join(session.writes))
        return out


CLIENTS = " , ".join(f"neighbor {p.split()[1]}" for p in PEERS[:2])


DONE3 = ["done"] * 3


@pytest.mark.parametrize("commands, answers", [
    ([f"{CLIENTS} announce attributes next-hop 10.77.1.5 originator-id 10.77.1.5 "
      "cluster-list [ 244.0.0.1 ] local-preference 100 nlri 10.1.0.0/26 10.1.0.64/26 "
      "10.1.0.128/26",
      # again, one moved: the peers have two of them already
      f"{CLIENTS} announce attributes next-hop 10.77.1.5 originator-id 10.77.1.5 "
      "cluster-list [ 244.0.0.1 ] local-preference 100 nlri 10.1.0.0/26 10.1.1.0/26",
      # to a neighbour without the family, and one with
      "neighbor 10.77.2.5 , neighbor 10.77.1.6 announce attributes next-hop 10.77.1.5 "
      "nlri 10.1.2.0/26"], DONE3),
    (["neighbor 10.77.1.5 announce attributes next-hop 10.77.1.6 nlri 10.1.0.0/26 10.1.0.0/26",
      "neighbor 10.77.1.5 announce attributes next-hop self nlri 10.1.0.64/26",  # ExaBGP's way
      "neighbor 10.77.9.9 announce attributes next-hop 10.77.1.6 nlri 10.1.0.0/26",  # nobody
      "neighbor 10.77.1.5 announce attributes next-hop 10.77.1.6 nlri 10.1.0.0/33"],  # bad
     ["done", "done", "error", "error"]),
    # prefixes ExaBGP's parser takes or refuses, in the middle of a command
    ([f"{CLIENTS} announce attributes next-hop 10.77.1.5 nlri 10.1.0.0/26 10.1.0.77/26",
      f"{CLIENTS} announce attributes next-hop 10.77.1.5 nlri 10.1.0.0/26 10.1.0.64/33",
      f"{CLIENTS} announce attributes next-hop 10.77.1.5 nlri 10.1.0.0/26 10.1.999.0/26",
      f"{CLIENTS} announce attributes next-hop 10.77.1.5 nlri 10.1.0.0/26 10.1.3.1 "
      "10.1.4.0/32"],  # no mask: a host
     ["error", "error", "error", "done"]),
    # forms whose routes are not plain unicast: ExaBGP's own parser
    ([f"{CLIENTS} announce attributes next-hop 10.77.1.5 path-information 7 "
      "nlri 10.1.0.0/26 10.1.0.64/26",
      f"{CLIENTS} announce attributes next-hop 10.77.1.5 label 100 nlri 10.1.0.0/26 10.1.0.64/26",
      f"{CLIENTS} announce attributes next-hop 10.77.1.5 local-preference 200 med 5 "
      "community [ 64512:1 ] as-path [ 64513 ] origin incomplete nlri "
      + " ".join(f"10.2.{i // 4}.{i % 4 * 64}/26" for i in range(300))], DONE3),
])
def test_an_announce_attributes_command_does_what_exabgps_does(commands, answers):
    log.init(getenv())
    original = exabgp_fanout.unwrapped(Command.callback["text"]["announce attributes"])
    exabgp_inject = exabgp_fanout.unwrapped(Configuration.inject_change)
    shared = exabgp_fanout.SharedInjection()
    ours = exabgp_fanout.announcing_at_once(original, shared)
    results = []
    for handler, inject in ((original, exabgp_inject),
                            (ours, exabgp_fanout.injecting(exabgp_inject, shared))):
        reactor = Reactor(inject)
        steps = []
        for command in commands:
            reactor.run(handler, command)
            steps.append(([rib_state(n.rib.outgoing)[0] for n in
                           reactor.configuration.neighbors.values()], reactor.sent()))
        results.append((reactor.answers, [[[k for k, _ in rib] for rib in ribs]
                                          for ribs, _ in steps], [sent for _, sent in steps]))
    assert results[1] == results[0]
    assert results[0][0] == answers


@pytest.mark.parametrize("command, count", [  # count: the routes ExaBGP's parser makes
    ("announce attributes next-hop 10.77.1.5 originator-id 10.77.1.5 cluster-list [ 244.0.0.1 ] "
     "local-preference 100 nlri 10.1.0.0/26 10.1.0.64/26 10.1.0.0/26 0.0.0.0/0 10.1.0.7/32", 5),
    ("announce attributes next-hop 10.77.1.5 as-path [ 64513 64514 ] med 10 community "
     "[ 64512:1 64512:2 ] origin egp nlri 10.1.0.0/26 10.1.0.64/26", 2),
    ("announce attributes next-hop 10.77.1.5 nlri 10.1.0.0/26 10.1.0.77/26", 0),  # host bits
    ("announce attributes next-hop 10.77.1.5 nlri 10.1.0.0/26 10.1.0.0/15", 0),  # host bits
    ("announce attributes next-hop 10.77.1.5 nlri 10.1.0.0/26 10.1.0.128/25 10.0.0.0/8 "
     "0.0.0.0/0 255.255.255.255/32 10.1.0.0/16 192.168.0.0/32", 7),  # every length's mask
    ("announce attributes next-hop 10.77.1.5 nlri 10.1.0.0/26 10.1.0.1 10.1.0.64/26", 3),
    ("announce attributes next-hop 10.77.1.5 nlri 10.1.0.0/26 10.1.0.64/40", 0),
    ("announce attributes next-hop 10.77.1.5 label 100 nlri 10.1.0.0/26 10.1.0.64/26", 2),
    ("announce attributes next-hop 10.77.1.5 nlri 10.1.0.0/26", 1),
    ("announce attributes next-hop 10.77.1.5 nlri", 0),
])
def test_a_commands_routes_are_what_exabgps_parser_makes(command, count):
    from types import SimpleNamespace

    from exabgp.reactor.api import API
    log.init(getenv())
    api = API(SimpleNamespace(configuration=Configuration([])))
    theirs = api.api_attributes(command, [])
    ours = exabgp_fanout.routes_of_command(api, command, [])
    assert len(theirs) == count

    def described(change):
        nlri = change.nlri
        return (type(nlri), nlri.afi, nlri.safi, nlri.action, nlri.cidr.pack_nlri(),
                nlri.cidr.mask, type(nlri.cidr.mask), nlri.cidr.pack_ip(), str(nlri.cidr),
                nlri.nexthop.index(), change.index(), change.extensive(),
                change.attributes.index())
    assert [described(c) for c in ours] == [described(c) for c in theirs]
    # one attributes object and one next hop for all, as ExaBGP's parser shares them
    assert len({id(c.attributes) for c in ours}) == len({id(c.attributes) for c in theirs})
    assert len({id(c.nlri.nexthop) for c in ours}) == len({id(c.nlri.nexthop) for c in theirs})


def test_a_long_command_is_parsed_by_exabgp_for_its_first_prefix_only():
    from types import SimpleNamespace

    from exabgp.reactor.api import API
    log.init(getenv())
    api = API(SimpleNamespace(configuration=Configuration([])))
    parsed = []
    original = api.api_attributes
    api.api_attributes = lambda command, peers: parsed.append(command) or original(command, peers)
    prefixes = [f"10.2.{i // 4}.{i % 4 * 64}/26" for i in range(1000)]
    changes = exabgp_fanout.routes_of_command(
        api, "announce attributes next-hop 10.77.1.5 nlri " + " ".join(prefixes), [])
    assert parsed == ["announce attributes next-hop 10.77.1.5 nlri 10.2.0.0/26"]
    assert [str(c.nlri.cidr.prefix()) for c in changes] == prefixes


def update(withdrawn: bytes = b"", attributes: bytes = b"", nlri: bytes = b"") -> bytes:
    body = (len(withdrawn).to_bytes(2, "big") + withdrawn
            + len(attributes).to_bytes(2, "big") + attributes + nlri)
    return b"\xff" * 16 + (19 + len(body)).to_bytes(2, "big") + b"\x02" + body


ORIGIN_NEXT_HOP = bytes.fromhex("40010100" "4003040a4d0105")  # IGP, next hop 10.77.1.5
A_26 = bytes.fromhex("1a0a010000")  # 10.1.0.0/26


class Recorded:
    """What Protocol.new_update reads and writes of a session: its neighbour's outgoing RIB
    and API settings, the negotiated session, the peer's counters, and the socket, whose
    writes are recorded (each written at once)."""

    def __init__(self, changes, report_sent: bool):
        from collections import Counter
        from types import SimpleNamespace

        from exabgp.protocol.family import AFI, SAFI
        from exabgp.rib.outgoing import OutgoingRIB
        ipv4 = (AFI.ipv4, SAFI.unicast)
        rib = OutgoingRIB(True, [ipv4])
        for change in changes:
            rib.add_to_rib(change)
        self.neighbor = Settings({"group-updates": True}, rib=SimpleNamespace(outgoing=rib),
                                 api={"send-update": report_sent})
        self.negotiated = SimpleNamespace(
            families=[ipv4], msg_size=4096, addpath=SimpleNamespace(send=lambda afi, safi: False),
            cached_attributes=None, cached_wire=b"", **vars(session(64512, 64512)))
        self.peer = SimpleNamespace(stats=Counter())
        self.writes: list[bytes] = []
        self.reported: list[bytes] = []
        self.connection = SimpleNamespace(writer=self._writer, session=lambda: "test")

    def _writer(self, data):
        self.writes.append(data)
        yield True

    def _to_api(self, direction, message, raw):
        self.reported.append(raw)

    send = Protocol.send  # ExaBGP's, which its new_update calls per UPDATE


class Settings(dict):
    def __init__(self, items, **attributes):
        super().__init__(items)
        self.__dict__.update(attributes)


def reflected_routes(count: int, withdrawn: int = 0):
    """`count` routes from as many clients (one attribute set each, as a reflector's), then
    `withdrawn` withdrawals."""
    client = [f"10.77.{1 + n // 250}.{1 + n % 250}" for n in range(count)]
    changes = [parsed_route(f"route 10.{1 + n // 250}.{n % 250}.0/26 next-hop {client[n]} "
                            f"origin igp local-preference 100 originator-id {client[n]} "
                            "cluster-list 244.0.0.1")
               for n in range(count)]
    for change in changes[:withdrawn]:
        from copy import deepcopy

        from exabgp.bgp.message.action import Action
        gone = deepcopy(change)
        gone.nlri.action = Action.WITHDRAW
        changes.append(gone)
    return changes


def drain(new_update, session: Recorded) -> None:
    for _ in new_update(session, True):
        pass


@pytest.mark.parametrize("routes,withdrawn", [(1, 0), (400, 0), (1500, 0), (50, 20)])
def test_a_peers_updates_go_out_as_exabgp_sends_them_in_far_fewer_writes(routes, withdrawn):
    original = exabgp_fanout.unwrapped(Protocol.new_update)
    theirs = Recorded(reflected_routes(routes, withdrawn), report_sent=True)
    ours = Recorded(reflected_routes(routes, withdrawn), report_sent=True)
    drain(original, theirs)
    drain(exabgp_fanout.batched(original), ours)
    sent = b"".join(theirs.writes)
    assert b"".join(ours.writes) == sent  # the same bytes, in order
    updates = theirs.peer.stats["send-update"]
    assert len(theirs.writes) == updates >= routes - withdrawn  # ExaBGP: a write per UPDATE
    assert ours.peer.stats == theirs.peer.stats  # every UPDATE counted
    # ours: WRITE_SIZE bytes or more at a time (a whole UPDATE past it), the rest last
    assert len(ours.writes) <= len(sent) // exabgp_fanout.WRITE_SIZE + 1
    assert all(exabgp_fanout.WRITE_SIZE <= len(w) < exabgp_fanout.WRITE_SIZE + 4096
               for w in ours.writes[:-1])
    # ExaBGP reported every UPDATE to the API, ours the withdrawals, one per attribute set
    assert len(theirs.reported) == updates
    assert ours.reported == [raw for raw in theirs.reported if exabgp_fanout.withdraws(raw)]
    assert len(ours.reported) == withdrawn


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


def split_update(nlris):
    from exabgp.bgp.message.update.attribute.attributes import Attributes
    return Update(nlris, Attributes())


@given(st.lists(st.tuples(st.integers(0, 40), st.sampled_from(["announce", "withdraw"]),
                          st.sampled_from([None, None, None, 1, 2]), st.integers(24, 26)),
                max_size=40),
       st.randoms(use_true_random=False))
def test_an_updates_routes_are_sorted_into_the_order_exabgp_sorts_them(drawn, random):
    """Routes in any order, some of one prefix both announced and withdrawn, with or without
    path ids: the same route objects come out in the same order, none left out or added."""
    from copy import deepcopy

    from exabgp.bgp.message.action import Action
    nlris = []
    for n, action, path_id, length in drawn:  # lengths and addresses in any mix
        path = f" path-information 0.0.0.{path_id}" if path_id else ""
        nlri = parsed_route(f"route 10.{n % 3}.{n}.0/{length} next-hop 10.77.1.5"
                            + path).nlri
        if action == "withdraw":
            nlri = deepcopy(nlri)
            nlri.action = Action.WITHDRAW
        nlris.append(nlri)
    random.shuffle(nlris)
    negotiated = Recorded([], report_sent=False).negotiated
    ours = exabgp_fanout.split_sorted_once(exabgp_fanout.unwrapped(Update._split_nlris))
    theirs = exabgp_fanout.unwrapped(Update._split_nlris)
    mine, expected = ours(split_update(nlris), negotiated), theirs(split_update(nlris), negotiated)
    assert [id(n) for n in mine[0]] == [id(n) for n in expected[0]] and mine[1] == expected[1]


@pytest.mark.parametrize("other", ["an IPv6 route", "an IPv6 next hop",
                                   "IPv4 unicast not negotiated"])
def test_an_update_with_anything_but_negotiated_ipv4_unicast_routes_is_split_by_exabgp(other):
    nlris = [parsed_route(f"route 10.1.{n}.0/24 next-hop 10.77.1.5").nlri for n in (3, 1, 2)]
    negotiated = Recorded([], report_sent=False).negotiated
    if other == "an IPv6 route":
        nlris.append(parsed_route("route 2001:db8::/64 next-hop 2001:db8::1").nlri)
        from exabgp.protocol.family import AFI, SAFI
        negotiated.families = [*negotiated.families, (AFI.ipv6, SAFI.unicast)]
    elif other == "an IPv6 next hop":  # RFC 5549: it goes in an MP_REACH_NLRI
        nlris.append(parsed_route("route 10.1.9.0/24 next-hop 2001:db8::1").nlri)
    else:
        negotiated.families = []
    calls = []
    original = exabgp_fanout.unwrapped(Update._split_nlris)

    def theirs(update, negotiated):
        calls.append(update)
        return original(update, negotiated)
    update = split_update(nlris)
    assert exabgp_fanout.split_sorted_once(theirs)(update, negotiated) == original(update,
                                                                                  negotiated)
    assert calls == [update]  # ExaBGP's own split decided
