"""pipit-exabgp: nine changes to how ExaBGP 5.0 hands one API command to many neighbours, which
is what a reflector's batched commands are (`neighbor A , neighbor B , ... announce attributes
... nlri ...` to every client at once). Same results, far less work per neighbour:

1. Which peers a command names. ExaBGP matches every peer's name against every `neighbor X`
   of the command with a regular expression built for that pair: a command to 200 clients of
   a 200-client reflector is 40,000 searches (half of the reflector's ExaBGP time in
   bench.rr). A command whose selectors are all a plain `neighbor <address>` is now matched
   by address in one pass over the peers (same peers, same order); any other form (`local-as
   ...`, `neighbor *`) goes to ExaBGP's own matching.
2. One route given to many neighbours was deep-copied once per neighbour
   (`Neighbor.remove_self` copies before it looks whether the next hop is `self`), and every
   copy then worked out its own index and text. The copy is needed only to write that
   neighbour's own address into it. For a route whose next hop is not `self` (everything a
   reflector sends: it keeps the next hop), every neighbour's outgoing RIB now holds the same
   change (`remove_self` copies only for `self`; an API command's routes go into the RIBs by
   3 and 8, without it): nothing changes a change once it is in a RIB (a withdrawal is made
   on a copy, `exabgp.rib.outgoing.OutgoingRIB.del_from_rib`), nor its attributes (packed
   per session, never cached by session).
3. Putting a route into each named neighbour's outgoing RIB (`Configuration.inject_change`)
   looked each configured neighbour up in the command's list of peers (200 x 200 comparisons
   per route) and then, per neighbour, worked out the route's family (a new object each
   time, four times), its indexes, and built a throw-away dict per call: half of the
   reflector's ExaBGP time for 5000 prefixes among 50 clients. The peers are a set; what
   depends only on the route is worked out once; a shared route (2) goes into each RIB by
   `SharedInjection`, which makes ExaBGP's `OutgoingRIB.add_to_rib` changes, no more.
4. The path attributes of one route were packed again for every neighbour's UPDATE. They are
   packed once per kind of session (the local and peer AS, 4-octet AS and AIGP, all that an
   attribute's encoding depends on) and kept on the attributes object, which ExaBGP already
   treats as settled once a route is in a RIB (it keeps its index and text the same way).
   Attributes with a next hop `self` are packed per session as before.
5. Every UPDATE sent was parsed back and written to the bridge as JSON (`api { send { update;
   } }`), which the bridge reads only to see withdrawals leave (a retirement waits for
   them): a reflector's cold start is tens of thousands of announcements, parsed and encoded
   for nothing (as much CPU as sending them, and as much again in the bridge). An UPDATE
   that withdraws nothing (no withdrawn routes, no MP_UNREACH_NLRI) is now sent without
   being reported; withdrawals are reported as before.
6. Each UPDATE was written to the peer's socket on its own: a reflector's routes mostly
   differ in their ORIGINATOR_ID, so a client catching up gets one small UPDATE per route
   (a cold start of 200 clients is ~60,000 of them, each a send() and a turn of the peer's
   loop, and as many reads for the client). The UPDATEs of one pass over a peer's outgoing
   RIB are now written up to WRITE_SIZE bytes at a time: the same bytes in the same order.
7. Every peer's UPDATEs were built from its own outgoing RIB: the routes sorted, each
   prefix packed, the messages framed, once per peer for the same routes (31 % of the
   reflector's ExaBGP time for 5000 prefixes among 50 clients). A command's routes are the
   same objects in every neighbour's RIB (2), so the peers a command named mostly find the
   same group of routes with the same attributes: the UPDATEs built for one peer are kept
   (`SharedUpdates`) and reused for the next whose group is the same objects, in the same
   order, on the same kind of session.
8. An `announce attributes ... nlri ...` command put its routes into the RIBs one route per
   step of ExaBGP's API work (50 steps per turn of its loop, each turn running every peer),
   and formatted a log line per route naming every neighbour of the command, logged or not.
   Its routes (one attributes object, one next hop) now go into each neighbour's RIB with one
   dict update (`SharedInjection`, as 3), in one step, and the log line is made only if it
   is logged. And its routes are parsed as ExaBGP would, without its tokeniser (~11 us a
   prefix, twice the rest): the attributes and the first prefix by ExaBGP's parser, the other
   prefixes as ExaBGP's own `attributes` parser builds each one from the first
   (`routes_of_command`); a command whose prefixes are not all plain IPv4 `a.b.c.d/n`, or
   whose route carries labels, a route distinguisher or a path id, is parsed ExaBGP's way.

9. Each UPDATE's routes were sorted with NLRI.__lt__, which works out both routes' index (a
   family object, the packed prefix) for every comparison, and each route's family was made
   again to see it negotiated: ~10 % of a reflector's ExaBGP time for 5000 prefixes between
   two clients. A group of plain IPv4 unicast routes (`INET`, announced with an IPv4 next hop
   or withdrawn) on a session that negotiated IPv4 unicast is sorted on each route's index
   worked out once (`Update._split_nlris`), or, when no route carries a path id, on its
   packed prefix alone (what follows the family and the path id in the index, which they
   then all share; half the cost): the same routes in the same order, stable as ExaBGP's
   sort is; any other group is split ExaBGP's way.

`apply()` installs them all, only into the releases they were written against (5.0.x, as
bgp_agent.exabgp_reactor).
"""

from __future__ import annotations

import re
from functools import lru_cache
from socket import inet_aton

FIXED_RELEASES = ("5.0.",)


def plain_addresses(descriptions) -> set[str] | None:
    """The addresses of a command's neighbour selectors if each is a plain `neighbor
    <address>`, else None (ExaBGP's matching decides)."""
    wanted = set()
    for description in descriptions:
        if len(description) != 1:
            return None
        words = description[0].split()
        if len(words) != 2 or words[0] != "neighbor" or words[1] == "*":
            return None
        wanted.add(words[1])
    return wanted


def peer_address(name: str) -> str | None:
    """The peer address in an ExaBGP peer name (`neighbor <address> local-ip ...`)."""
    words = name.split(" ", 2)
    return words[1] if len(words) > 1 and words[0] == "neighbor" else None


def matcher(original):
    """ExaBGP's match_neighbors(peers, descriptions) with the by-address fast path."""
    def match_neighbors(peers, descriptions):
        wanted = plain_addresses(descriptions) if descriptions else None
        if wanted is None:
            return original(peers, descriptions)
        return [name for name in peers if peer_address(name) in wanted]
    match_neighbors.__wrapped__ = original
    return match_neighbors


def sharing(original):
    """ExaBGP's Neighbor.remove_self(change), which copies, called only when the change's next
    hop is `self`; any other change is given to the neighbour as it is."""
    def remove_self(neighbor, change):
        if not change.nlri.nexthop.SELF:
            return change
        return original(neighbor, change)
    remove_self.__wrapped__ = original
    return remove_self


class SharedInjection:
    """Putting shared routes (2) into the outgoing RIB of every neighbour a command names: the
    changes ExaBGP's Configuration.inject_change and OutgoingRIB.add_to_rib (5.0) make one
    route and one neighbour at a time, made with what depends only on the routes worked out
    once (3), and for a group of routes with one attribute set, next hop and family (an
    `announce attributes ... nlri ...`: 8), with one dict update per neighbour."""

    def __init__(self):
        from exabgp.bgp.message.action import Action
        from exabgp.logger import log
        self.WITHDRAW, self.ANNOUNCE, self.log = Action.WITHDRAW, Action.ANNOUNCE, log

    def inject(self, configuration, peers, changes: list) -> bool | None:
        """Into the RIB of each configured neighbour named in `peers` (in configuration
        order); whether any took them. None, having done nothing, unless the changes are
        one group: next hop not `self` (copied per neighbour: ExaBGP's way), one attributes
        object, next hop, family and action, each prefix once."""
        first = changes[0].nlri
        if first.nexthop.SELF:
            return None
        attributes, action = changes[0].attributes, first.action
        afi, safi, next_hop_index = first.afi, first.safi, first.nexthop.index()
        batch = {}
        for change in changes:
            nlri = change.nlri
            if (change.attributes is not attributes or nlri.action != action
                    or nlri.afi != afi or nlri.safi != safi or nlri.nexthop.SELF
                    or nlri.nexthop.index() != next_hop_index):
                return None
            batch[change.index()] = change
        if len(batch) != len(changes):
            return None  # a prefix twice: ExaBGP's order decides which stays
        family = first.family().afi_safi()
        attributes_index = attributes.index()
        if not isinstance(peers, (set, frozenset)):
            peers = set(peers)
        taken = False
        for name, neighbor in configuration.neighbors.items():
            if name not in peers:
                continue
            if family not in neighbor._families:  # families() is a copy of it
                for change in changes:
                    self.log.error(lambda name=name, change=change: (
                        f"the route family ({change.nlri.short()}) is not configured on "
                        f"neighbor {name}"), "configuration")
                continue
            self.add(neighbor.rib.outgoing, batch, family, attributes, attributes_index,
                     next_hop_index, action)
            taken = True
        return taken

    def add(self, rib, batch: dict, family, attributes, attributes_index, next_hop_index,
            action) -> None:
        """add_to_rib(change) for each change of `batch` (index -> change, one group): skip a
        route the peer already has with the same attributes and next hop (in_cache), queue
        the rest by attributes, family and index, remember them as seen (update_cache)."""
        fresh = batch
        if rib.cache and action != self.WITHDRAW:
            seen = rib._seen.get(family)
            if seen and not seen.keys().isdisjoint(batch):
                fresh = {index: change for index, change in batch.items()
                         if not self._has(seen.get(index), attributes_index, next_hop_index)}
                if not fresh:
                    return
        by_family = rib._new_attr_af_nlri.get(attributes_index)
        if by_family is None:
            by_family = rib._new_attr_af_nlri[attributes_index] = {}
        queued = by_family.get(family)
        if queued is None:
            queued = by_family[family] = {}
        queued.update(fresh)
        rib._new_nlri.update(fresh)
        rib._new_attribute[attributes_index] = attributes
        if rib.cache:
            if action == self.ANNOUNCE:
                rib._seen.setdefault(family, {}).update(fresh)
            elif family in rib._seen:
                seen = rib._seen[family]
                for index in fresh:
                    seen.pop(index, None)

    @staticmethod
    def _has(cached, attributes_index, next_hop_index) -> bool:
        return (cached is not None and cached.attributes.index() == attributes_index
                and cached.nlri.nexthop.index() == next_hop_index)


def injecting(original, shared: SharedInjection):
    """Configuration.inject_change(peers, change) (3): by `shared` unless the change's next
    hop is `self`, then ExaBGP's own, given `peers` as a set."""
    def inject_change(configuration, peers, change):
        taken = shared.inject(configuration, peers, [change])
        if taken is None:
            return original(configuration, peers if isinstance(peers, (set, frozenset))
                            else set(peers), change)
        return taken
    inject_change.__wrapped__ = original
    return inject_change


PLAIN_IPV4_PREFIX = re.compile(r"(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
                               r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)/(?:3[0-2]|[12]?\d)")


def routes_of_command(api, command: str, peers) -> list:
    """What ExaBGP's `api.api_attributes(command, peers)` gives for an `announce attributes
    <attributes> nlri <prefix> ...` command (8): the command with its first prefix parsed by
    ExaBGP, the other prefixes added as its `attributes` parser adds them (a new INET of the
    first's family sharing its attributes and next hop, with the prefix's CIDR, made as its
    prefix() makes it, ~5 us a prefix quicker). Anything but plain IPv4 prefixes on a plain
    unicast route, or a prefix with host bits set, goes to ExaBGP's parser whole."""
    from exabgp.bgp.message import Action
    from exabgp.bgp.message.update.nlri.cidr import CIDR
    from exabgp.bgp.message.update.nlri.inet import INET
    from exabgp.bgp.message.update.nlri.qualifier import PathInfo
    from exabgp.protocol.family import AFI
    from exabgp.rib.change import Change

    head, nlri, tail = command.partition(" nlri ")
    prefixes = tail.split()
    if (not nlri or len(prefixes) < 2
            or not all(PLAIN_IPV4_PREFIX.fullmatch(p) for p in prefixes)):
        return api.api_attributes(command, peers)
    first = api.api_attributes(f"{head} nlri {prefixes[0]}", peers)
    if len(first) != 1:  # not one route: an error, or a form this does not know
        return api.api_attributes(command, peers)
    template = first[0].nlri
    if (type(template) is not INET or template.afi != AFI.ipv4
            or template.path_info is not PathInfo.NOPATH):
        return api.api_attributes(command, peers)
    attributes, next_hop = first[0].attributes, template.nexthop
    afi, safi = template.afi, template.safi
    changes = first
    for text in prefixes[1:]:
        # ExaBGP's prefix() for a plain prefix (the pattern checked its octets and length):
        # the address packed, the length as its cached NetMask, host bits refused
        address, _, length = text.partition("/")
        packed, mask = inet_aton(address), _netmask(length)
        if int.from_bytes(packed, "big") & ((1 << (32 - mask)) - 1):
            return api.api_attributes(command, peers)  # host bits: its parser says so
        change = Change(INET(afi, safi, Action.UNSET), attributes)
        change.nlri.cidr = CIDR(packed, mask)
        change.nlri.nexthop = next_hop
        changes.append(change)
    return changes


@lru_cache(maxsize=None)
def _netmask(length: str):
    """ExaBGP's NetMask of an IPv4 prefix length, as its prefix() makes it (a cached object)."""
    from exabgp.protocol.family import AFI
    from exabgp.protocol.ip.netmask import NetMask
    return NetMask.create(length, AFI.ipv4)


def announcing_at_once(original, shared: SharedInjection):
    """ExaBGP's `announce attributes <attributes> nlri <prefix> ...` command
    (reactor.api.command.announce.announce_attributes) with its routes put into the RIBs by
    `shared` at once (8): ExaBGP injects them one route per step of its API work, 50 steps per
    turn of its loop, and formats a log line per route naming every neighbour (200 for a
    reflector's command) whether it logs or not. The same answers, the same RIBs; the log
    line made only if it is logged. Anything `shared` does not take goes ExaBGP's way."""
    from exabgp.bgp.message import Action
    from exabgp.reactor.api.command import announce
    from exabgp.reactor.api.command.limit import extract_neighbors

    def added(peers, change) -> None:
        """ExaBGP's log line for a route the command added (API.log_message), made only if
        it is logged."""
        shared.log.info(lambda: f"route added to {', '.join(peers) if peers else 'all peers'}"
                        f" : {change.extensive()}", "processes", "INFO")

    def announce_attributes(self, reactor, service, line, use_json):
        def callback():
            try:
                descriptions, command = extract_neighbors(line)
                peers = announce.match_neighbors(reactor.peers(service), descriptions)
                if not peers:
                    self.log_failure(f"no neighbor matching the command : {command}")
                    reactor.processes.answer_error(service)
                    yield True
                    return
                changes = routes_of_command(self, command, peers)
                if not changes:
                    self.log_failure(f"command could not parse route in : {command}")
                    reactor.processes.answer_error(service)
                    yield True
                    return
                for change in changes:
                    change.nlri.action = Action.ANNOUNCE
                if shared.inject(reactor.configuration, peers, changes) is None:
                    for change in changes:  # ExaBGP's way
                        reactor.configuration.inject_change(peers, change)
                        added(peers, change)
                        yield False
                else:
                    for change in changes:
                        added(peers, change)
                    yield False
                reactor.processes.answer_done(service)
            except (ValueError, IndexError):
                self.log_failure("issue parsing the route")
                reactor.processes.answer_error(service)
                yield True
        reactor.asynchronous.schedule(service, line, callback())
        return True
    announce_attributes.__wrapped__ = original
    announce_attributes.func_name = getattr(original, "func_name", "announce_attributes")
    return announce_attributes


PACKED = "_pipit_packed"  # the attribute of an Attributes object holding its packed forms


def packed_once(original):
    """Attributes.pack(negotiated, with_default) computed once per kind of session."""
    from exabgp.bgp.message.update.attribute import Attribute
    next_hop_code = Attribute.CODE.NEXT_HOP

    def pack(attributes, negotiated, with_default=True):
        next_hop = attributes.get(next_hop_code)
        if next_hop is not None and getattr(next_hop, "SELF", False):
            return original(attributes, negotiated, with_default)
        key = (negotiated.local_as, negotiated.peer_as, negotiated.asn4, negotiated.aigp,
               with_default)
        cache = attributes.__dict__.get(PACKED)
        if cache is None:
            cache = attributes.__dict__[PACKED] = {}
        packed = cache.get(key)
        if packed is None:
            packed = cache[key] = original(attributes, negotiated, with_default)
        return packed
    pack.__wrapped__ = original
    return pack


UPDATE = 2  # the BGP message type
MP_UNREACH_NLRI = 15  # the path attribute type
HEADER = 19  # marker, length, type


def withdraws(raw: bytes) -> bool:
    """Whether a BGP message (header included) is an UPDATE that withdraws anything: routes
    in its Withdrawn Routes field or an MP_UNREACH_NLRI attribute. Anything that cannot be
    read as an UPDATE counts as withdrawing (it is reported, as ExaBGP always did)."""
    if len(raw) < HEADER + 4 or raw[18] != UPDATE:
        return True
    withdrawn = int.from_bytes(raw[19:21], "big")
    if withdrawn:
        return True
    at = HEADER + 2 + withdrawn
    end = at + 2 + int.from_bytes(raw[at:at + 2], "big")
    at += 2
    while at + 3 <= end:
        flags, code = raw[at], raw[at + 1]
        if flags & 0x10:  # extended length
            length, at = int.from_bytes(raw[at + 2:at + 4], "big"), at + 4
        else:
            length, at = raw[at + 2], at + 3
        if code == MP_UNREACH_NLRI:
            return True
        at += length
    return at != end  # attributes that do not add up: report it


WRITE_SIZE = 2**16  # bytes of UPDATEs written to a peer's socket at once
SHARED_ROUTES = 2**16  # routes the UPDATEs kept for other peers refer to, in all


class SharedUpdates:
    """The UPDATEs built for a group of IPv4 unicast routes, kept for the other peers that send
    the same group (7). A group is known by the identity of its attributes and routes: the
    entry holds them, so no other object can take their ids while it is kept. Nothing changes
    a route or its attributes once it is in a RIB (2, 4). The oldest groups go first once
    the kept ones refer to more than `budget` routes."""

    def __init__(self, budget: int = SHARED_ROUTES):
        from exabgp.protocol.family import AFI, SAFI
        self.budget = budget
        self.kept: dict[tuple, tuple[object, list, list[bytes]]] = {}
        self.routes = 0
        self.ipv4, self.unicast = AFI.ipv4, SAFI.unicast

    def messages(self, update, negotiated, include_withdraw: bool, build):
        """`build(update, negotiated, include_withdraw)`'s UPDATEs, built once per group."""
        ipv4, unicast, nlris = self.ipv4, self.unicast, update.nlris
        key = (id(update.attributes), tuple(map(id, nlris)), include_withdraw,
               negotiated.local_as, negotiated.peer_as, negotiated.asn4, negotiated.aigp,
               negotiated.msg_size, tuple(negotiated.families),
               negotiated.addpath.send(ipv4, unicast))
        kept = self.kept.get(key)
        if kept is not None:
            return kept[2]
        built = list(build(update, negotiated, include_withdraw))
        if all(n.afi == ipv4 and n.safi == unicast for n in nlris):
            self.kept[key] = (update.attributes, nlris, built)
            self.routes += len(nlris)
            while self.routes > self.budget:
                _, dropped, _ = self.kept.pop(next(iter(self.kept)))
                self.routes -= len(dropped)
        return built


def batched(original, shared: SharedUpdates | None = None):
    """Protocol.new_update(include_withdraw), ExaBGP's sending of a peer's pending routes, with
    the UPDATEs written WRITE_SIZE bytes at a time (6), only those that withdraw reported to
    the API (5), and, given `shared`, those of a group of routes other peers also send built
    once (7). ExaBGP calls Protocol.send from here only, one UPDATE at a time."""
    from exabgp.bgp.message import _NOP
    from exabgp.bgp.message.direction import Direction
    from exabgp.bgp.message.update import Update
    from exabgp.logger import log
    from exabgp.reactor.protocol import _UPDATE

    def write(protocol, chunk):
        for _ in protocol.connection.writer(b"".join(chunk)):
            yield _NOP  # as ExaBGP: a step of the writer (True or False) is a NOP

    def new_update(protocol, include_withdraw):
        neighbor, negotiated, stats = protocol.neighbor, protocol.negotiated, protocol.peer.stats
        report = neighbor.api.get("send-update", False)
        chunk, size, number = [], 0, 0
        for update in neighbor.rib.outgoing.updates(neighbor["group-updates"]):
            if shared is not None and type(update) is Update:
                messages = shared.messages(update, negotiated, include_withdraw, Update.messages)
            else:
                messages = update.messages(negotiated, include_withdraw)
            for raw in messages:
                number += 1
                stats["send-update"] += 1  # as ExaBGP counts every one
                if report and withdraws(raw):
                    protocol._to_api("send", Update.unpack_message(raw[19:], Direction.OUT,
                                                                   negotiated), raw)
                chunk.append(raw)
                size += len(raw)
                if size >= WRITE_SIZE:
                    yield from write(protocol, chunk)
                    chunk, size = [], 0
        if chunk:
            yield from write(protocol, chunk)
        if number:
            log.debug(lambda: ">> %d UPDATE(s)" % number, protocol.connection.session())
        yield _UPDATE
    new_update.__wrapped__ = original
    return new_update


def split_sorted_once(original):
    """Update._split_nlris (9): plain IPv4 unicast routes sorted on their index (their packed
    prefix when none has a path id), each worked out once; any other group by `original`."""
    from exabgp.bgp.message.action import Action
    from exabgp.bgp.message.update.nlri.inet import INET
    from exabgp.bgp.message.update.nlri.qualifier import PathInfo
    from exabgp.protocol.family import AFI, SAFI
    ipv4, unicast, family = AFI.ipv4, SAFI.unicast, (AFI.ipv4, SAFI.unicast)
    announce, withdraw, index = Action.ANNOUNCE, Action.WITHDRAW, INET.index
    no_path = PathInfo.NOPATH

    def _split_nlris(self, negotiated):
        nlris = self.nlris
        if family in negotiated.families and all(
                type(n) is INET and n.afi == ipv4 and n.safi == unicast
                and (n.action == withdraw or n.action == announce and n.nexthop.afi == ipv4)
                for n in nlris):
            # the index is the family's, the path id's, then the packed prefix: without path
            # ids, the packed prefix alone orders them the same (and costs half as much)
            if all(n.path_info is no_path for n in nlris):
                return sorted(nlris, key=_packed_prefix), {}
            return sorted(nlris, key=index), {}
        return original(self, negotiated)
    _split_nlris.__wrapped__ = original
    return _split_nlris


def _packed_prefix(nlri) -> bytes:
    return nlri.cidr.pack_nlri()


def unwrapped(function):
    return getattr(function, "__wrapped__", function)


def apply() -> str | None:
    """Install them into ExaBGP. None if done, else why not."""
    from exabgp.bgp.message.update import Update
    from exabgp.bgp.message.update.attribute.attributes import Attributes
    from exabgp.bgp.neighbor import Neighbor
    from exabgp.configuration.configuration import Configuration
    from exabgp.reactor.api.command import announce, limit, rib
    from exabgp.reactor.api.command.command import Command
    from exabgp.reactor.protocol import Protocol
    from exabgp.version import release
    if not release.startswith(FIXED_RELEASES):
        return f"ExaBGP {release} is not a release these changes were written for"
    fast = matcher(unwrapped(limit.match_neighbors))
    for module in (limit, announce, rib):  # each imported the function by name
        module.match_neighbors = fast
    Neighbor.remove_self = sharing(unwrapped(Neighbor.remove_self))
    shared = SharedInjection()
    Configuration.inject_change = injecting(unwrapped(Configuration.inject_change), shared)
    for name in ("announce attribute", "announce attributes"):
        for api in ("text", "json"):
            if name in Command.callback[api]:
                Command.callback[api][name] = announcing_at_once(
                    unwrapped(Command.callback[api][name]), shared)
    Attributes.pack = packed_once(unwrapped(Attributes.pack))
    Protocol.new_update = batched(unwrapped(Protocol.new_update), SharedUpdates())
    Update._split_nlris = split_sorted_once(unwrapped(Update._split_nlris))
    return None
