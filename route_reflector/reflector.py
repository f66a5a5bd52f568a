"""The reflector's state: peers and their roles, an Adj-RIB-In per peer, the best route per
prefix; every call that changes them returns the updates that keep each peer's table equal to
what the reflection rules say it should hold. See the package docstring for how to drive it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from route_reflector.best_path import best_path
from route_reflector.reflection import CLIENT, ROLES, looped, reflected, reflects
from route_reflector.route import Attributes, Route, Update

TARGETS_CACHE_LIMIT = 4096  # sources whose fan-out set is kept (cleared when a peer changes)


class _Prefix:
    """One prefix's routes, one per peer, and the best of them as last sent (mutable,
    internal; kept together so that a change hashes the prefix, which ipaddress does in
    Python, as few times as it can)."""
    __slots__ = ("prefix", "routes", "best", "attributes")

    def __init__(self, prefix: IPv4Network):
        self.prefix = prefix
        self.routes: dict[IPv4Address, Route] = {}
        self.best: Route | None = None
        self.attributes: Attributes | None = None  # the best route's, as reflected


@dataclass(frozen=True, slots=True)
class Peer:
    """A peer as the reflector sees it (for status)."""
    address: IPv4Address
    role: str
    up: bool
    received: int  # routes in its Adj-RIB-In, stale ones included
    stale: int  # kept from a lost session (graceful restart), not yet re-sent
    stale_until: float | None  # when those go, on the caller's clock
    looped: int  # routes it sent that were ignored as loops
    end_of_rib: bool  # it sent End-of-RIB since its session came up


class Reflector:
    """RFC 4456 route reflection for one cluster, over internal (same-AS) peers only."""

    def __init__(self, router_id: IPv4Address, cluster_id: IPv4Address, *,
                 always_compare_med: bool = False):
        self.router_id = router_id
        self.cluster_id = cluster_id
        self.always_compare_med = always_compare_med
        self._roles: dict[IPv4Address, str] = {}
        self._up: frozenset[IPv4Address] = frozenset()
        self._up_clients: frozenset[IPv4Address] = frozenset()
        self._received: dict[IPv4Address, dict[IPv4Network, Route]] = {}  # Adj-RIB-In per peer
        self._prefixes: dict[IPv4Network, _Prefix] = {}  # the same per prefix, and Loc-RIB
        self._stale: dict[IPv4Address, set[IPv4Network]] = {}
        self._stale_until: dict[IPv4Address, float] = {}
        self._looped: dict[IPv4Address, set[IPv4Network]] = {}
        self._end_of_rib: set[IPv4Address] = set()
        self._targets: dict[IPv4Address, frozenset[IPv4Address]] = {}
        self._last_reflected: tuple[Route, Attributes] | None = None  # see _reflected

    # ----------------------------------------------------------------------------------------
    # what it holds

    def peers(self) -> dict[IPv4Address, Peer]:
        return {a: Peer(a, role, a in self._up, len(self._received[a]),
                        len(self._stale.get(a, ())), self._stale_until.get(a),
                        len(self._looped.get(a, ())), a in self._end_of_rib)
                for a, role in self._roles.items()}

    def received(self, peer: IPv4Address) -> Mapping[IPv4Network, Route]:
        """The peer's Adj-RIB-In (stale routes included; looped ones are not kept)."""
        return self._received.get(peer, {})

    def best(self, prefix: IPv4Network) -> Route | None:
        state = self._prefixes.get(prefix)
        return state.best if state else None

    def reflected(self, prefix: IPv4Network) -> Attributes | None:
        """The attributes the prefix's best route is reflected with (None: no route)."""
        state = self._prefixes.get(prefix)
        return state.attributes if state else None

    def loc_rib(self) -> dict[IPv4Network, Route]:
        return {p.prefix: p.best for p in self._prefixes.values() if p.best is not None}

    def advertised(self, peer: IPv4Address) -> dict[IPv4Network, Attributes]:
        """What the peer has been sent, if it is up: its whole table as the rules give it."""
        return {u.prefix: u.attributes for u in self.full_table(peer)}

    def sends(self, peer: IPv4Address, prefix: IPv4Network) -> bool:
        """Whether the peer, up, is sent a route for the prefix (its best route goes to it)."""
        state = self._prefixes.get(prefix)
        return (peer in self._up and state is not None and state.best is not None
                and peer in self._fan_out(state.best.peer))

    def full_table(self, peer: IPv4Address) -> list[Update]:
        """Updates that give an up peer its whole table (e.g. after the speaker restarted)."""
        return self._tables([peer]) if peer in self._up else []

    def waiting_for_end_of_rib(self) -> frozenset[IPv4Address]:
        """Up peers that have not finished sending their table since their session came up."""
        return self._up - self._end_of_rib

    def next_deadline(self) -> float | None:
        """When expire() next has something to do (stale routes run out), on the caller's clock."""
        return min(self._stale_until.values(), default=None)

    # ----------------------------------------------------------------------------------------
    # peers

    def add_peer(self, peer: IPv4Address, role: str) -> list[Update]:
        """A configured peer (its session not up yet), or a new role for a known one."""
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
        old = self._roles.get(peer)
        if old is None:
            self._roles[peer] = role
            self._received[peer] = {}
            return []
        if old == role:
            return []
        # The role decides who gets what (not which route is best): compare each best route's
        # fan-out before and after.
        best = [p for p in self._prefixes.values() if p.best is not None]
        before = [self._fan_out(p.best.peer) for p in best]
        self._roles[peer] = role
        self._peers_changed()
        out: list[Update] = []
        for p, old_targets in zip(best, before):
            new_targets = self._fan_out(p.best.peer)
            if old_targets != new_targets:
                self._send(out, old_targets - new_targets, p.prefix, None)
                self._send(out, new_targets - old_targets, p.prefix, p.attributes)
        return out

    def remove_peer(self, peer: IPv4Address) -> list[Update]:
        """No longer a peer: everything it sent goes, stale routes too."""
        if peer not in self._roles:
            return []
        self._set_up([peer], False)
        out = self._drop(peer, list(self._received[peer]))
        del self._roles[peer], self._received[peer]
        self._looped.pop(peer, None)
        self._peers_changed()
        return out

    def peer_up(self, peer: IPv4Address) -> list[Update]:
        return self.peers_up([peer])

    def peers_up(self, peers: Iterable[IPv4Address]) -> list[Update]:
        """Sessions that became Established: each gets the whole table (one update per prefix
        for all of them). Routes kept from a lost session stay until it re-sends its table."""
        peers = list(dict.fromkeys(peers))
        for peer in peers:
            self._require(peer)
            if peer in self._up:
                raise ValueError(f"peer {peer} is already up (report it down first)")
        self._set_up(peers, True)
        return self._tables(peers)

    def peer_down(self, peer: IPv4Address, *, now: float, graceful_restart: bool = False,
                  notification: bool = False, restart_time: float = 0) -> list[Update]:
        """The session ended (or a second report on an ended one). Its routes go (implicit
        withdraw), unless the peer negotiated graceful restart, the session did not end with a
        NOTIFICATION and restart_time > 0: then they stay, stale, until `now + restart_time`.
        A NOTIFICATION learnt later (another call) drops kept routes."""
        self._require(peer)
        if peer not in self._up:
            if notification and self._stale.get(peer):
                return self._drop(peer, list(self._stale[peer]))
            return []
        self._set_up([peer], False)
        self._looped.pop(peer, None)
        received = self._received[peer]
        if graceful_restart and not notification and restart_time > 0 and received:
            self._stale[peer] = set(received)
            self._stale_until[peer] = now + restart_time
            return []
        return self._drop(peer, list(received))

    # ----------------------------------------------------------------------------------------
    # routes

    def update(self, peer: IPv4Address, announce: Iterable[Route] = (),
               withdraw: Iterable[IPv4Network] = ()) -> list[Update]:
        """An UPDATE from an up peer: prefixes it withdraws, then routes it announces (each
        replacing its previous route for that prefix; a prefix twice: the last one counts).
        Routes that loop are ignored (and replace, so withdraw, what the peer had sent for
        their prefix)."""
        self._require(peer)
        if peer not in self._up:
            raise ValueError(f"peer {peer} is not up")
        announce = list(announce)
        for route in announce:
            if route.peer != peer:
                raise ValueError(f"a route of peer {route.peer} given as one of {peer}")
        received = self._received[peer]
        stale = self._stale.get(peer)
        loops = self._looped.setdefault(peer, set())
        changed: list[_Prefix] = []
        for prefix in withdraw:
            if stale:
                stale.discard(prefix)
            if loops:
                loops.discard(prefix)
            forgotten = self._forget(peer, received, prefix)
            if forgotten:
                changed.append(forgotten)
        for route in announce:
            prefix = route.prefix
            if stale:
                stale.discard(prefix)
            if looped(route, self.router_id, self.cluster_id):
                loops.add(prefix)
                forgotten = self._forget(peer, received, prefix)
                if forgotten:
                    changed.append(forgotten)
                continue
            if loops:
                loops.discard(prefix)
            # (every dict operation hashes the prefix in Python, ipaddress's __hash__: one
            # setdefault where the prefix is new)
            old = received.setdefault(prefix, route)
            if old is not route:
                if old == route:
                    continue
                received[prefix] = route
            state = self._prefixes.get(prefix)
            if state is None:
                state = self._prefixes[prefix] = _Prefix(prefix)
            state.routes[peer] = route
            changed.append(state)
        if stale is not None and not stale:
            self._no_stale(peer)
        return self._select(changed)

    def set_table(self, peer: IPv4Address, routes: Mapping[IPv4Network, Route]) -> list[Update]:
        """The peer's current session holds exactly `routes` (a whole table, as a pass-based
        caller sees it): one update() with the difference. Stale routes it does not hold stay
        stale."""
        self._require(peer)
        stale = self._stale.get(peer, ())
        gone = [p for p in self._received[peer] if p not in routes and p not in stale]
        gone += [p for p in self._looped.get(peer, ()) if p not in routes]
        return self.update(peer, routes.values(), gone)

    def end_of_rib(self, peer: IPv4Address) -> list[Update]:
        """The peer finished sending its table: stale routes it did not re-send go."""
        self._require(peer)
        if peer not in self._up:
            raise ValueError(f"peer {peer} is not up")
        self._end_of_rib.add(peer)
        return self._drop(peer, list(self._stale.get(peer, ())))

    def expire(self, now: float) -> list[Update]:
        """Stale routes whose restart time has passed by `now` go."""
        out: list[Update] = []
        for peer, until in list(self._stale_until.items()):
            if until <= now:
                out += self._drop(peer, list(self._stale[peer]))
        return out

    # ----------------------------------------------------------------------------------------
    # internals

    def _require(self, peer: IPv4Address) -> None:
        if peer not in self._roles:
            raise ValueError(f"{peer} is not a peer of this reflector")

    def _set_up(self, peers: list[IPv4Address], up: bool) -> None:
        if up:
            self._up = self._up.union(peers)
        else:
            self._up = self._up.difference(peers)
            self._end_of_rib.difference_update(peers)
        self._peers_changed()

    def _peers_changed(self) -> None:
        self._up_clients = frozenset(p for p in self._up if self._roles[p] == CLIENT)
        self._targets.clear()

    def _fan_out(self, source: IPv4Address) -> frozenset[IPv4Address]:
        """The up peers a best route from `source` goes to."""
        targets = self._targets.get(source)
        if targets is None:
            everyone = self._up if self._roles[source] == CLIENT else self._up_clients
            targets = everyone - {source} if source in everyone else everyone
            if len(self._targets) >= TARGETS_CACHE_LIMIT:
                self._targets.clear()
            self._targets[source] = targets
        return targets

    def _tables(self, peers: list[IPv4Address]) -> list[Update]:
        """Whole tables for `peers`: per best route, one update to those of them it goes to."""
        if not peers:
            return []  # (a pass with no session come up: not a walk over every prefix)
        new = frozenset(peers)
        by_source: dict[IPv4Address, frozenset[IPv4Address]] = {}
        out = []
        for state in self._prefixes.values():
            if state.best is None:
                continue
            source = state.best.peer
            targets = by_source.get(source)
            if targets is None:
                role = self._roles[source]
                targets = by_source[source] = frozenset(
                    p for p in new if p != source and reflects(role, self._roles[p]))
            if targets:
                out.append(Update(targets, state.prefix, state.attributes))
        return out

    def _forget(self, peer: IPv4Address, received: dict[IPv4Network, Route],
                prefix: IPv4Network) -> _Prefix | None:
        """Take the peer's route for the prefix out; the prefix's state if it had one."""
        if received.pop(prefix, None) is None:
            return None
        state = self._prefixes[prefix]
        del state.routes[peer]
        return state

    def _no_stale(self, peer: IPv4Address) -> None:
        self._stale.pop(peer, None)
        self._stale_until.pop(peer, None)

    def _drop(self, peer: IPv4Address, prefixes: list[IPv4Network]) -> list[Update]:
        """Remove these routes of the peer (stale or not)."""
        received = self._received[peer]
        stale = self._stale.get(peer)
        changed = []
        for prefix in prefixes:
            if stale:
                stale.discard(prefix)
            forgotten = self._forget(peer, received, prefix)
            if forgotten:
                changed.append(forgotten)
        if stale is not None and not stale:
            self._no_stale(peer)
        return self._select(changed)

    def _select(self, changed: Iterable[_Prefix]) -> list[Update]:
        """Best path again for each changed prefix; the updates for what changed."""
        out: list[Update] = []
        for state in changed:  # a prefix twice: the second time, nothing has changed
            old, old_attributes = state.best, state.attributes
            if not state.routes:
                if old is not None:
                    state.best = state.attributes = None
                    self._send(out, self._fan_out(old.peer), state.prefix, None)
                self._prefixes.pop(state.prefix, None)
                continue
            route = best_path(state.routes.values(), self.always_compare_med)
            if route is old:
                continue
            attributes = self._reflected(route)
            state.best, state.attributes = route, attributes
            targets = self._fan_out(route.peer)
            if old is None:
                self._send(out, targets, state.prefix, attributes)
                continue
            old_targets = self._fan_out(old.peer)
            if old_targets is not targets:
                self._send(out, old_targets - targets, state.prefix, None)
            if attributes == old_attributes:
                self._send(out, targets - old_targets, state.prefix, attributes)
            else:
                self._send(out, targets, state.prefix, attributes)
        return out

    def _reflected(self, route: Route) -> Attributes:
        """reflected(route), the same object as for the route before when the two share
        their attributes, object for object (a peer's routes of one UPDATE do): batching
        groups prefixes by attributes, and hashing and comparing equal but distinct ones
        (their addresses hash in Python) was most of a big pass's grouping."""
        last = self._last_reflected
        if last is not None:
            other = last[0]
            if (route.next_hop is other.next_hop and route.as_path is other.as_path
                    and route.communities is other.communities
                    and route.local_pref is other.local_pref and route.med is other.med
                    and route.origin is other.origin
                    and route.originator_id is other.originator_id
                    and route.cluster_list is other.cluster_list
                    and route.large_communities is other.large_communities
                    and route.extended_communities is other.extended_communities
                    and route.peer_router_id is other.peer_router_id):
                return last[1]
        attributes = reflected(route, self.cluster_id)
        self._last_reflected = route, attributes
        return attributes

    @staticmethod
    def _send(out: list[Update], peers: frozenset[IPv4Address], prefix: IPv4Network,
              attributes: Attributes | None) -> None:
        if peers:
            out.append(Update(peers, prefix, attributes))
