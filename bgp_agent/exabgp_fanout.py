"""pipit-exabgp: five changes to how ExaBGP 5.0 hands one API command to many neighbours, which
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
   change: nothing changes a change once it is in a RIB (a withdrawal is made on a copy,
   `exabgp.rib.outgoing.OutgoingRIB.del_from_rib`), nor its attributes (packed per session,
   never cached by session).
3. Which neighbours get a route: `Configuration.inject_change` looked each configured
   neighbour up in the command's list of peers, a list: 200 x 200 comparisons per route. It
   is given a set.
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

`apply()` installs them all, only into the releases they were written against (5.0.x, as
bgp_agent.exabgp_reactor).
"""

from __future__ import annotations

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


def to_set(original):
    """Configuration.inject_change(peers, change) with `peers` as a set."""
    def inject_change(configuration, peers, change):
        return original(configuration, peers if isinstance(peers, (set, frozenset))
                        else set(peers), change)
    inject_change.__wrapped__ = original
    return inject_change


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


def reporting_withdrawals(original):
    """Protocol.send(raw) reporting to the API only the UPDATEs that withdraw."""
    def send(protocol, raw):
        if withdraws(raw):
            return original(protocol, raw)
        protocol.peer.stats["send-update"] += 1  # as ExaBGP counts every one
        return protocol.connection.writer(raw)
    send.__wrapped__ = original
    return send


def unwrapped(function):
    return getattr(function, "__wrapped__", function)


def apply() -> str | None:
    """Install them into ExaBGP. None if done, else why not."""
    from exabgp.bgp.message.update.attribute.attributes import Attributes
    from exabgp.bgp.neighbor import Neighbor
    from exabgp.configuration.configuration import Configuration
    from exabgp.reactor.api.command import announce, limit, rib
    from exabgp.reactor.protocol import Protocol
    from exabgp.version import release
    if not release.startswith(FIXED_RELEASES):
        return f"ExaBGP {release} is not a release these changes were written for"
    fast = matcher(unwrapped(limit.match_neighbors))
    for module in (limit, announce, rib):  # each imported the function by name
        module.match_neighbors = fast
    Neighbor.remove_self = sharing(unwrapped(Neighbor.remove_self))
    Configuration.inject_change = to_set(unwrapped(Configuration.inject_change))
    Attributes.pack = packed_once(unwrapped(Attributes.pack))
    Protocol.send = reporting_withdrawals(unwrapped(Protocol.send))
    return None
