"""The protocol between pipit-agent (its ExaBGP speaker) and pipit-exabgp-bridge, which both
import: message forms, line reading, and the one table type both ends keep.

JSON objects, one per line, over a unix socket (the agent listens, the bridge connects).
Addresses and prefixes are strings.

Bridge to agent, first on every connection:
    {"type": "hello", "protocol": 3, "bridge_pid": 12, "exabgp_pid": 11, "digest": "ab12.."|null}
        digest: the configuration the bridge last saw ExaBGP apply (see exabgp_config)
    {"type": "snapshot-begin"}
    state messages (below) for everything the bridge knows: peers, received, announced
    {"type": "snapshot-end"}
then live, in the order things happen, the state messages:
    {"type": "peer", "address": A, "state": "up"|"down"|"idle", "since": 1.7e9, "reason": "...",
     "notification": bool, "graceful_restart": bool, "restart_time": 120, "router_id": A|null,
     "end_of_rib": bool, "extra": {...}}
        sent when the state, reason or End-of-RIB flag changes; an "up" with a new "since" is a
        new session (drop what the old one sent). On "down" the peer's received routes are
        gone (ExaBGP sends no withdrawals, trap 4); `notification` says the session ended
        with a NOTIFICATION (which ends graceful restart, RFC 4724), graceful_restart and
        restart_time are from the last OPEN exchange. ExaBGP's "connected" is not reported: it
        repeats every second while a peer refuses (trap 5).
    {"type": "received", "peer": A, "groups": [Group...], "withdraw": [prefix...]}
    {"type": "announced", "neighbors": [A...], "groups": [Group...]}
    {"type": "withdrawn", "neighbors": [A...], "prefixes": [prefix...]}
        ExaBGP accepted these for every neighbour listed (one message per command, however
        many neighbours it named; protocol 2 sent one per neighbour, `"neighbor": A`, and
        protocols 2 and 3 listed routes one by one, `"announce"`/`"routes": [Path...]`: both
        still read)
    {"type": "forget", "peer": A}          no longer configured: drop everything about it
and the answers and notices:
    {"type": "done", "id": N, "output": [...]} / {"type": "error", "id": N, "message": "..."}
    {"type": "exabgp-shutdown"}

Agent to bridge (executed one at a time, in order; each answered by done/error with its id):
    {"id": N, "op": "announce", "neighbors": [A...], "groups": [Group...]}
    {"id": N, "op": "withdraw", "neighbors": [A...], "prefixes": [prefix...]}
        the same routes to (or from) every neighbour listed, in one ExaBGP command per
        attribute set (a reflector's fan-out)
    {"id": N, "op": "eor", "neighbor": A}            send End-of-RIB (ExaBGP runs manual-eor)
    {"id": N, "op": "clear", "neighbor": A}          withdraw everything sent to one neighbour
    {"id": N, "op": "reload", "digest": D, "neighbors": [A...], "renewed": [A...],
     "timeout": 30}
        reload ExaBGP's configuration and answer only once ExaBGP shows it applied;
        `renewed` (optional) are neighbours the reload makes a different peer inside ExaBGP
        (a new local address, AS or router id): what was sent to the old one is gone with
        it, and reported withdrawn once the reload is applied
    {"id": N, "op": "retire", "timeout": 30}
        withdraw this node's own routes (next hop self) from every neighbour and answer once
        the withdrawals left; what it reflects stays
    {"id": N, "op": "command", "line": "show neighbor summary"}     raw, output in the reply
A Path / Announcement is the model's dataclass as an object, empty and None fields left out.
Routes travel in groups of consecutive routes with the same attributes (a reflector's
commands and ExaBGP's UPDATEs are such groups), their attributes written and read once:
    Group: {"attributes": <Path / Announcement without "prefix">, "prefixes": [prefix...]}
An error reply still comes after the announced/withdrawn messages for the lines ExaBGP took.

Each state message has a dataclass here; `RouteTables.apply(message)` is how both ends change
their tables, so the agent's copy is the bridge's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from functools import cached_property, lru_cache
from ipaddress import IPv4Address, IPv4Network
from operator import attrgetter
from socket import AF_INET, inet_pton

from bgp_agent.model import Announcement, Path, PeerState, with_prefix

log = logging.getLogger(__name__)

PROTOCOL = 4  # 2: announce/withdraw to several neighbours, the eor op, peer notification;
#               3: announced/withdrawn name several neighbours; 4: routes in groups
CHUNK = 1000  # routes per snapshot message
LINE_LIMIT = 64 * 2**20  # longest line either side accepts


# --------------------------------------------------------------------------------------------
# JSON forms of the model types

# Parsed forms are kept and handed out again: a table's addresses repeat (next hops,
# originators, cluster ids) and its prefixes come back (received, announced to other peers,
# reported announced); parsing them was most of what reading a message cost.
address_of = lru_cache(maxsize=2**14)(IPv4Address)
_LENGTHS = {str(n): n for n in range(33)}


class Prefix(IPv4Network):
    """An IPv4Network that works out its hash and its text once. Every table is keyed by
    prefix, and IPv4Network works its hash out again at every lookup (two Python calls: a
    sixth of a reflector agent's time), and its text each time it is written (in Python,
    octet by octet); this one keeps them (parse_prefix gives it the text it was read from).
    Equal to, hashing as and written as the IPv4Network of the same prefix, so either finds
    the other in a table."""

    _hash = cached_property(IPv4Network.__hash__)
    _text = cached_property(IPv4Network.__str__)

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        return self._text

    def __repr__(self) -> str:
        return f"IPv4Network('{self}')"


# The netmasks of lengths 0-30, as IPv4Network shares them (its _make_netmask cache); /31 and
# /32 networks also get a `hosts` of their own from IPv4Network.__init__
_NETMASKS = {n: IPv4Network._make_netmask(n)[0] for n in range(31)}
_new = object.__new__


def parse_prefix(text: str) -> IPv4Network:
    """IPv4Network(text) (as a Prefix), four times as fast for the form every table uses
    (`a.b.c.d/n`): the address read by the C library's inet_pton (which, as ipaddress,
    refuses leading zeros), the network given the three attributes IPv4Network.__init__ would
    give it (its address, its netmask, its length; /31 and /32 are built by it). Anything
    else, and every error, is ipaddress's own."""
    address, _, length = text.partition("/") if isinstance(text, str) else ("", "", "")
    n = _LENGTHS.get(length)
    try:
        value = None if n is None else int.from_bytes(inet_pton(AF_INET, address), "big")
    except OSError:
        value = None  # not an address
    if value is None:
        return Prefix(text)  # ipaddress's result, or its error in its own words
    netmask = _NETMASKS.get(n)
    if netmask is None:  # /31, /32 (host bits set: ipaddress's error, as for the text)
        prefix = Prefix((value, n))
    elif value & netmask._ip != value:
        return Prefix(text)  # host bits set: ipaddress's error
    else:
        network = _new(IPv4Address)
        network._ip = value
        prefix = _new(Prefix)
        prefix.network_address, prefix.netmask, prefix._prefixlen = network, netmask, n
        prefix._hash = hash(value ^ netmask._ip)  # as IPv4Network.__hash__ works it out
    prefix._text = text  # as ipaddress writes it: no leading zeros, n in 0-32
    return prefix


prefix_of = lru_cache(maxsize=2**15)(parse_prefix)
# and the other way: a reflector's messages name its ~200 clients again and again, and a
# route's prefix is written out again at each step (announced, a command, reported back)
text_of = lru_cache(maxsize=2**14)(str)
prefix_text = lru_cache(maxsize=2**15)(str)


def optional_address(value) -> IPv4Address | None:
    """address_of(value), or None for None."""
    return None if value is None else address_of(value)


def _text(value: IPv4Address | None) -> str | None:
    return None if value is None else str(value)


def _attributes_to_json(route: Path | Announcement, out: dict) -> dict:
    """The path attributes Path and Announcement share, into `out`: empty and None left out,
    and the origin when it is igp."""
    if route.as_path:
        out["as_path"] = list(route.as_path)
    if route.communities:
        out["communities"] = [list(c) for c in route.communities]
    if route.local_pref is not None:
        out["local_pref"] = route.local_pref
    if route.med is not None:
        out["med"] = route.med
    if route.origin != "igp":
        out["origin"] = route.origin
    if route.originator_id is not None:
        out["originator_id"] = str(route.originator_id)
    if route.cluster_list:
        out["cluster_list"] = [str(a) for a in route.cluster_list]
    if route.large_communities:
        out["large_communities"] = [list(c) for c in route.large_communities]
    if route.extended_communities:
        out["extended_communities"] = list(route.extended_communities)
    return out


def path_to_json(path: Path) -> dict:
    return _attributes_to_json(path, {"prefix": str(path.prefix), "next_hop": str(path.next_hop)})


def path_from_json(d: dict) -> Path:
    return Path(
        prefix=prefix_of(d["prefix"]), next_hop=address_of(d["next_hop"]),
        as_path=tuple(d.get("as_path", ())), communities=tuple(map(tuple, d.get("communities", ()))),
        local_pref=d.get("local_pref"), med=d.get("med"), origin=d.get("origin", "igp"),
        originator_id=optional_address(d.get("originator_id")),
        cluster_list=tuple(map(address_of, d.get("cluster_list", ()))),
        large_communities=tuple(map(tuple, d.get("large_communities", ()))),
        extended_communities=tuple(d.get("extended_communities", ())))


def announcement_to_json(route: Announcement) -> dict:
    out = {"prefix": str(route.prefix)}
    if route.next_hop is not None:
        out["next_hop"] = str(route.next_hop)
    return _attributes_to_json(route, out)


def announcement_from_json(d: dict) -> Announcement:
    return Announcement(
        prefix=prefix_of(d["prefix"]), next_hop=optional_address(d.get("next_hop")),
        communities=tuple(map(tuple, d.get("communities", ()))), as_path=tuple(d.get("as_path", ())),
        local_pref=d.get("local_pref"), med=d.get("med"),
        originator_id=optional_address(d.get("originator_id")),
        cluster_list=tuple(map(address_of, d.get("cluster_list", ()))),
        large_communities=tuple(map(tuple, d.get("large_communities", ()))),
        origin=d.get("origin", "igp"),
        extended_communities=tuple(d.get("extended_communities", ())))


ATTRIBUTES = {kind: tuple(f.name for f in fields(kind) if f.name != "prefix")
              for kind in (Path, Announcement)}  # in field order, after the prefix (first)


_ATTRIBUTE_VALUES = {kind: attrgetter(*names) for kind, names in ATTRIBUTES.items()}


def same_attributes(a: Path | Announcement, b: Path | Announcement) -> bool:
    """Whether two routes of one kind differ in their prefix only (their attribute values
    taken and compared as tuples: in C, each value by identity first)."""
    return _ATTRIBUTE_VALUES[type(a)](a) == _ATTRIBUTE_VALUES[type(b)](b)


def groups_to_json(routes: Iterable[Path | Announcement],
                   to_json: Callable[[Path | Announcement], dict]) -> list[dict]:
    """Routes as groups of consecutive routes with the same attributes, each attribute set
    encoded (by `to_json`, path_to_json or announcement_to_json) once."""
    groups: list[dict] = []
    previous = None
    for route in routes:
        if previous is None or not same_attributes(route, previous):
            attributes = to_json(route)
            del attributes["prefix"]
            prefixes: list[str] = []
            groups.append({"attributes": attributes, "prefixes": prefixes})
            previous = route
        prefixes.append(prefix_text(route.prefix))
    return groups


def routes_from_groups(groups: list, from_json: Callable[[dict], Path | Announcement]) -> list:
    """The routes of groups_to_json's groups, each group's attributes decoded once (by
    `from_json`, path_from_json or announcement_from_json)."""
    routes: list = []
    for group in groups:
        first, *rest = group["prefixes"]
        template = from_json({**group["attributes"], "prefix": first})
        routes.append(template)
        routes.extend(with_prefix(template, prefix_of(p)) for p in rest)
    return routes


def peer_to_json(peer: PeerState) -> dict:
    return {"address": str(peer.address), "state": peer.state, "since": peer.since,
            "reason": peer.reason, "notification": peer.notification,
            "graceful_restart": peer.graceful_restart, "restart_time": peer.restart_time,
            "router_id": _text(peer.router_id), "end_of_rib": peer.end_of_rib,
            "extra": peer.extra}


def peer_from_json(d: dict) -> PeerState:
    return PeerState(address=IPv4Address(d["address"]), state=d["state"], since=d["since"],
                     reason=d["reason"], notification=bool(d.get("notification", False)),
                     graceful_restart=d["graceful_restart"], restart_time=d["restart_time"],
                     router_id=optional_address(d.get("router_id")), end_of_rib=d["end_of_rib"],
                     extra=d.get("extra") or {})


# --------------------------------------------------------------------------------------------
# State messages

@dataclass(frozen=True)
class PeerChanged:
    peer: PeerState


@dataclass(frozen=True)
class Received:
    peer: IPv4Address
    announce: tuple[Path, ...] = ()
    withdraw: tuple[IPv4Network, ...] = ()


@dataclass(frozen=True)
class Announced:
    neighbors: tuple[IPv4Address, ...]
    routes: tuple[Announcement, ...]


@dataclass(frozen=True)
class Withdrawn:
    neighbors: tuple[IPv4Address, ...]
    prefixes: tuple[IPv4Network, ...]


@dataclass(frozen=True)
class Forget:
    peer: IPv4Address


StateMessage = PeerChanged | Received | Announced | Withdrawn | Forget
STATE_TYPES = ("peer", "received", "announced", "withdrawn", "forget")


def encode(message: StateMessage) -> dict:
    if isinstance(message, PeerChanged):
        return {"type": "peer", **peer_to_json(message.peer)}
    if isinstance(message, Received):
        return {"type": "received", "peer": str(message.peer),
                "groups": groups_to_json(message.announce, path_to_json),
                "withdraw": [prefix_text(p) for p in message.withdraw]}
    if isinstance(message, Announced):
        return {"type": "announced", "neighbors": [text_of(n) for n in message.neighbors],
                "groups": groups_to_json(message.routes, announcement_to_json)}
    if isinstance(message, Withdrawn):
        return {"type": "withdrawn", "neighbors": [text_of(n) for n in message.neighbors],
                "prefixes": [prefix_text(p) for p in message.prefixes]}
    return {"type": "forget", "peer": str(message.peer)}


def decode(d: dict) -> StateMessage:
    """A state message from its JSON form (d["type"] in STATE_TYPES); KeyError / ValueError
    on malformed input."""
    kind = d["type"]
    if kind == "peer":
        return PeerChanged(peer_from_json(d))
    if kind == "received":
        return Received(IPv4Address(d["peer"]), routes_of(d, "announce", path_from_json),
                        tuple(map(prefix_of, d["withdraw"])))
    if kind == "announced":
        return Announced(_neighbors(d), routes_of(d, "routes", announcement_from_json))
    if kind == "withdrawn":
        return Withdrawn(_neighbors(d), tuple(map(prefix_of, d["prefixes"])))
    if kind == "forget":
        return Forget(IPv4Address(d["peer"]))
    raise ValueError(f"{kind!r} is not a state message")


def routes_of(d: dict, listed: str, from_json: Callable[[dict], Path | Announcement]) -> tuple:
    """The routes of a message or request: its "groups", or as protocols 2 and 3 listed them,
    one by one under `listed`."""
    if "groups" in d:
        return tuple(routes_from_groups(d["groups"], from_json))
    return tuple(map(from_json, d[listed]))


def _neighbors(d: dict) -> tuple[IPv4Address, ...]:
    """An announced/withdrawn message's neighbours (protocol 2 named one, as "neighbor")."""
    if "neighbors" in d:
        if not isinstance(d["neighbors"], list):
            raise ValueError("neighbors is not a list")
        return tuple(map(address_of, d["neighbors"]))
    return (address_of(d["neighbor"]),)


@dataclass
class RouteTables:
    """What ExaBGP said, as one end of the bridge knows it: each peer's session, the routes
    each peer sent us, and what ExaBGP accepted to send each neighbour."""
    peers: dict[IPv4Address, PeerState] = field(default_factory=dict)
    received: dict[IPv4Address, dict[IPv4Network, Path]] = field(default_factory=dict)
    announced: dict[IPv4Address, dict[IPv4Network, Announcement]] = field(default_factory=dict)
    # of `announced`, the prefixes of this node's own routes (next hop self), per neighbour:
    # a reflector's own are a few among the many it reflects
    own: dict[IPv4Address, set[IPv4Network]] = field(default_factory=dict)

    def apply(self, message: StateMessage) -> None:
        if isinstance(message, PeerChanged):
            peer = message.peer
            old = self.peers.get(peer.address)
            self.peers[peer.address] = peer
            if peer.state != "up":
                self.received.pop(peer.address, None)
            elif old is None or old.state != "up" or old.since != peer.since:
                self.received[peer.address] = {}  # a new session
        elif isinstance(message, Received):
            table = self.received.setdefault(message.peer, {})
            for prefix in message.withdraw:
                table.pop(prefix, None)
            for path in message.announce:
                table[path.prefix] = path
        elif isinstance(message, Announced):
            routes = {route.prefix: route for route in message.routes}
            mine = [p for p, route in routes.items() if route.next_hop is None]
            for neighbor in message.neighbors:
                self.announced.setdefault(neighbor, {}).update(routes)
                own = self.own.get(neighbor)
                if own and len(mine) < len(routes):  # a prefix of ours now reflected?
                    # (own is a few prefixes, the message may be thousands: look up own's)
                    own.difference_update([p for p in own if p in routes
                                           and routes[p].next_hop is not None])
                if mine:
                    self.own.setdefault(neighbor, set()).update(mine)
        elif isinstance(message, Withdrawn):
            gone = None
            for neighbor in message.neighbors:
                table = self.announced.get(neighbor, {})
                for prefix in message.prefixes:
                    table.pop(prefix, None)
                own = self.own.get(neighbor)
                if own:
                    gone = set(message.prefixes) if gone is None else gone
                    own.difference_update([p for p in own if p in gone])
                if not table:
                    self.announced.pop(neighbor, None)
                    self.own.pop(neighbor, None)
        else:
            for table in (self.peers, self.received, self.announced, self.own):
                table.pop(message.peer, None)

    def snapshot(self) -> Iterator[StateMessage]:
        """State messages that rebuild these tables from empty tables."""
        for peer in self.peers.values():
            yield PeerChanged(peer)
        for address, paths in self.received.items():
            listed = tuple(paths.values())
            for i in range(0, len(listed), CHUNK):
                yield Received(address, listed[i:i + CHUNK])
        for address, routes in self.announced.items():
            listed = tuple(routes.values())
            for i in range(0, len(listed), CHUNK):
                yield Announced((address,), listed[i:i + CHUNK])


# --------------------------------------------------------------------------------------------
# Lines

async def read_lines(reader: asyncio.StreamReader, source: str,
                     logger: logging.Logger = log) -> AsyncIterator[bytes]:
    """The lines `reader` gives until EOF; a line longer than LINE_LIMIT (the readers' limit)
    is logged, naming `source`, and skipped."""
    while True:
        try:
            raw = await reader.readline()
        except ValueError:
            logger.error("skipped a line longer than %d bytes from %s", LINE_LIMIT, source)
            continue
        if not raw:
            return
        yield raw
