"""This node as a route reflector (RFC 4456): the pure core of route_reflector fed, pass by
pass, with what each of the node's iBGP sessions sent and the import policy accepted, and its
output turned into announcements the speaker sends in batches (one ExaBGP command per
attribute set for every peer that gets it).

Which peers take part, and as what, is the selection's (policy.select_neighbors: a same-AS
peer with an empty or other cluster id is a client, one of the same cluster id a non-client).
eBGP peers (a ToR) take no part: their routes are not reflected.

The core keeps what it sent; the speaker's tables say what ExaBGP holds. They are compared
in full once after a start (an agent restart finds ExaBGP's Adj-RIB-Out from before: routes
no longer right are withdrawn), after a failed send, and every RESYNC_SECONDS.

A member's BGPFilters (its BGPPeer's) act on what is reflected to it after the core: a route
their export rules reject goes to it as a withdrawal instead, one an Accept's operations
change goes to it on its own (the core's fan-out is the same for every member, and most have
none); so does a member's nextHopMode Self (our address as next hop); a change of either
compares every table with the speaker's at that pass.

A pass hands the core only what changed in a peer's accepted routes since the pass before on
the same session (a route that is not the very Path of then, a prefix gone); a new session,
or a peer first seen, gets its whole table given.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network

from bgp_agent import bgp_filter
from bgp_agent.model import Announcement, Neighbor, Path, PeerState, with_prefix
from route_reflector import CLIENT, NON_CLIENT, Attributes, Reflector, Route, Update, batch

log = logging.getLogger(__name__)

RESYNC_SECONDS = 60.0


@dataclass(frozen=True)
class Send:
    """Announce `routes` to every neighbour of `neighbors`, or withdraw `prefixes` from them."""
    neighbors: tuple[IPv4Address, ...]
    routes: tuple[Announcement, ...] = ()
    prefixes: tuple[IPv4Network, ...] = ()


def announcement(prefix: IPv4Network, attributes: Attributes) -> Announcement:
    return Announcement(prefix, next_hop=attributes.next_hop, communities=attributes.communities,
                        as_path=attributes.as_path, local_pref=attributes.local_pref,
                        med=attributes.med, originator_id=attributes.originator_id,
                        cluster_list=attributes.cluster_list, origin=attributes.origin,
                        large_communities=attributes.large_communities,
                        extended_communities=attributes.extended_communities)


def route(path: Path, peer: IPv4Address, router_id: IPv4Address) -> Route:
    return Route(path.prefix, path.next_hop, path.as_path, path.communities, path.local_pref,
                 path.med, path.origin, path.originator_id, path.cluster_list,
                 path.large_communities, path.extended_communities, peer=peer,
                 peer_router_id=router_id)


def reflected(announced: Announcement) -> bool:
    """A route this node reflects, not one of its own: its own go with next hop self."""
    return announced.next_hop is not None


class Reflection:
    def __init__(self, router_id: IPv4Address, cluster_id: IPv4Address, local_as: int):
        self.core = Reflector(router_id, cluster_id)
        self.local_as = local_as
        self._seen: dict[IPv4Address, PeerState] = {}  # each peer's state at the last pass
        # each up peer's accepted routes as given to the core at the last pass, with the
        # session (its "since") and router id they were given for
        self._fed: dict[IPv4Address, tuple[tuple, Mapping[IPv4Network, Path]]] = {}
        self._check_at = 0.0  # when to compare with the speaker's tables in full
        self._filters: dict[IPv4Address, tuple] = {}  # members with BGPFilters: theirs
        # members whose BGPPeer's nextHopMode is Self: sent our address as next hop
        self._next_hop_self: frozenset[IPv4Address] = frozenset()
        self._shaped: frozenset[IPv4Address] = frozenset()  # members of either

    @property
    def cluster_id(self) -> IPv4Address:
        return self.core.cluster_id

    def members(self, neighbors: Iterable[Neighbor]) -> dict[IPv4Address, str]:
        """The neighbours that take part, and their roles."""
        return {n.address: CLIENT if n.rr_client else NON_CLIENT for n in neighbors
                if n.peer_as == self.local_as and n.local_as == self.local_as}

    def step(self, neighbors: Iterable[Neighbor], peers: Mapping[IPv4Address, PeerState],
             accepted: Mapping[IPv4Address, Mapping[IPv4Network, Path]], now: float
             ) -> list[Update]:
        """One pass: sessions that came, went or finished their table, what each sent; the
        updates to send (in order)."""
        core, out = self.core, []
        neighbors = list(neighbors)
        members = self.members(neighbors)
        filters = {n.address: n.filters for n in neighbors
                   if n.filters and n.address in members}
        next_hop_self = frozenset(n.address for n in neighbors
                                  if n.next_hop_self and n.address in members)
        if filters != self._filters or next_hop_self != self._next_hop_self:
            self._filters, self._next_hop_self = filters, next_hop_self
            self._shaped = frozenset(filters) | next_hop_self
            self._check_at = 0.0  # what they are sent changed: compare at this pass
        for address in set(core.peers()) - set(members):
            out += core.remove_peer(address)
            self._seen.pop(address, None)
            self._fed.pop(address, None)
        for address, role in members.items():
            out += core.add_peer(address, role)
        known = core.peers()
        coming: list[IPv4Address] = []
        for address in members:
            state, before = peers.get(address), self._seen.get(address)
            up = state is not None and state.state == "up"
            was_up = known[address].up
            if was_up and (not up or (before is not None and state.since != before.since)):
                # down now, or down and back between two passes (then the old session's
                # graceful restart applies)
                lost = state if state is not None and not up else before
                out += core.peer_down(address, now=now,
                                      graceful_restart=bool(lost and lost.graceful_restart),
                                      notification=bool(lost and not up and lost.notification),
                                      restart_time=lost.restart_time if lost else 0)
                was_up = False
                self._fed.pop(address, None)
            elif not up and state is not None and state.notification:
                out += core.peer_down(address, now=now, notification=True)  # learnt later
            if up and not was_up:
                coming.append(address)
            if state is not None:
                self._seen[address] = state
        out += core.peers_up(coming)
        for address in members:
            state = peers.get(address)
            if state is None or state.state != "up":
                continue
            router_id = state.router_id or address
            out += self._feed(address, (state.since, router_id), accepted.get(address, {}))
            if state.end_of_rib and not known[address].end_of_rib:
                out += core.end_of_rib(address)
        out += core.expire(now)
        return out

    def _feed(self, address: IPv4Address, session: tuple,
              table: Mapping[IPv4Network, Path]) -> list[Update]:
        """Give the core the peer's accepted routes: on the session fed at the last pass,
        only what differs from then (a route that is not the very Path given then, a prefix
        no longer there: a pass over thousands of routes, a few new, makes a few Routes),
        else the whole table."""
        fed, (router_id,) = self._fed.get(address), session[1:]
        self._fed[address] = session, dict(table)  # (a caller may change its own)
        if fed is None or fed[0] != session:
            return self.core.set_table(address, {p: route(path, address, router_id)
                                                 for p, path in table.items()})
        last = fed[1]
        changed, kept = [], 0
        for prefix, path in table.items():
            before = last.get(prefix)
            if before is not path:
                changed.append(route(path, address, router_id))
            if before is not None:
                kept += 1
        gone = [p for p in last if p not in table] if kept < len(last) else []
        return self.core.update(address, changed, gone)

    def sends(self, updates: Iterable[Update]) -> list[Send]:
        """The updates as the speaker sends them: one command per attribute set and group of
        peers, withdrawals first."""
        announce, withdraw = [], []
        if self._shaped:
            updates = self._filtered(updates)
        for part in batch(updates):
            neighbors = tuple(sorted(part.peers))
            if part.attributes is None:
                withdraw.append(Send(neighbors, prefixes=part.prefixes))
            else:
                first = announcement(part.prefixes[0], part.attributes)
                routes = (first, *(with_prefix(first, p) for p in part.prefixes[1:]))
                announce.append(Send(neighbors, routes=routes))
        return withdraw + announce

    def _exported(self, address: IPv4Address, prefix: IPv4Network,
                  attributes: Attributes) -> Attributes | None:
        """The attributes the member is sent a reflected route with past its filters (if
        any): None if they hold it back, changed by an Accept's operations; with our own
        address as next hop for a member whose nextHopMode is Self."""
        filters = self._filters.get(address)
        if filters:
            verdict = bgp_filter.export(filters, prefix, True, True, attributes.communities,
                                        attributes.as_path)
            if not verdict.sent:
                return None
            if verdict.changes:
                attributes = replace(
                    attributes, as_path=(*verdict.prepend, *attributes.as_path),
                    communities=tuple(dict.fromkeys((*attributes.communities,
                                                     *verdict.communities))),
                    large_communities=tuple(dict.fromkeys((*attributes.large_communities,
                                                           *verdict.large_communities))))
        if address in self._next_hop_self:
            attributes = replace(attributes, next_hop=self.core.router_id)
        return attributes

    def _filtered(self, updates: Iterable[Update]) -> list[Update]:
        """The updates past the members' filters: a route one holds back withdrawn from that
        member instead (it may hold it from before, under attributes they let through), one
        an operation changes sent to that member on its own."""
        out = []
        for update in updates:
            if update.attributes is None or not self._shaped & update.peers:
                out.append(update)
                continue
            by_attributes: dict[Attributes | None, set[IPv4Address]] = {}
            for address in update.peers:
                by_attributes.setdefault(
                    self._exported(address, update.prefix, update.attributes), set()
                ).add(address)
            out += [Update(frozenset(peers), update.prefix, attributes)
                    for attributes, peers in by_attributes.items()]
        return out

    def reflects(self, address: IPv4Address, prefix: IPv4Network) -> bool:
        """Whether the member is sent a reflected route for the prefix."""
        if not self.core.sends(address, prefix):
            return False
        return address not in self._filters or self._exported(
            address, prefix, self.core.reflected(prefix)) is not None

    def due_check(self, now: float) -> bool:
        return now >= self._check_at

    def check_again(self, when: float) -> None:
        """Compare with the speaker's tables at `when` (a send failed)."""
        self._check_at = min(self._check_at, when)

    def check(self, announced: Mapping[IPv4Address, Mapping[IPv4Network, Announcement]],
              now: float) -> list[Send]:
        """What to send so that every member holds exactly what the core says it was sent;
        after a start, a failed send (check_again) and every RESYNC_SECONDS."""
        self._check_at = now + RESYNC_SECONDS
        fixes: list[Send] = []
        for address, peer in self.core.peers().items():
            if not peer.up:
                continue
            want = {}
            for p, a in self.core.advertised(address).items():
                exported = self._exported(address, p, a)
                if exported is not None:
                    want[p] = announcement(p, exported)
            have = {p: a for p, a in announced.get(address, {}).items() if reflected(a)}
            wrong = tuple(a for p, a in want.items() if have.get(p) != a)
            extra = tuple(p for p in have if p not in want)
            if extra:
                fixes.append(Send((address,), prefixes=extra))
            if wrong:
                fixes.append(Send((address,), routes=wrong))
        if fixes:
            log.info("reflection: %d corrections to what the speaker holds", len(fixes))
        return fixes

    def next_deadline(self) -> float | None:
        return self.core.next_deadline()

    def waiting_for_end_of_rib(self) -> bool:
        return bool(self.core.waiting_for_end_of_rib())
