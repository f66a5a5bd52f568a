"""Graceful restart on the receiving side (RFC 4724): the routes of a peer whose session was
lost are still forwarded until it is back and has re-sent its table (End-of-RIB), or its
restart time has passed.

A session ended by a NOTIFICATION (a hold timer that expired, a reset, a refusal) is not a
restart: its routes go at once, and if such an end is learned after the routes were kept (a
first "down" without, then one with a NOTIFICATION), they go then. So a peer reported down
after a NOTIFICATION never has stale routes.

When our own speaker restarted (a new ExaBGP knows nothing of the old sessions), this node
is the restarting speaker and keeps forwarding for its own restart time, if the old session
had graceful restart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from bgp_agent.model import DEFAULT_RESTART_TIME, Neighbor, Path, PeerState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Retained:
    paths: Mapping[IPv4Network, Path]
    until: float  # on the retention's clock
    why: str


def retention_time(now: PeerState | None, before: PeerState | None,
                   neighbor: Neighbor | None) -> tuple[int, str]:
    """How long to keep a lost session's routes (0: not at all), and why. `now` is the peer's
    state after the loss (None: unknown, the speaker restarted or the session was reset and
    is back), `before` its state while it was up."""
    if neighbor is None:
        return 0, "no longer a neighbour"
    if now is not None and now.state == "down":
        if now.graceful_restart and not now.notification:
            return now.restart_time or neighbor.restart_time or DEFAULT_RESTART_TIME, now.reason
        return 0, now.reason
    if before is not None and before.graceful_restart and neighbor.restart_time:
        return neighbor.restart_time, "the session was lost"
    return 0, "session lost"


class GracefulRestart:
    """Follows the sessions pass by pass; `received()` gives every neighbour's routes with
    those kept for a restarting peer. Time comes from `clock` (seconds, monotonic)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._retained: dict[IPv4Address, Retained] = {}
        self._last_up: set[IPv4Address] = set()
        self._last_state: dict[IPv4Address, PeerState] = {}
        self._last_received: dict[IPv4Address, Mapping[IPv4Network, Path]] = {}

    def stale(self, address: IPv4Address) -> int:
        retained = self._retained.get(address)
        return len(retained.paths) if retained else 0

    def received(self, neighbors: Iterable[Neighbor], peers: Mapping[IPv4Address, PeerState],
                 received: Mapping[IPv4Address, Mapping[IPv4Network, Path]]
                 ) -> tuple[dict[IPv4Address, dict[IPv4Network, Path]], list[float]]:
        """Each neighbour's routes: what its current session sent (copies, safe to hand to a
        thread), plus what is kept from a session it lost. Also the times at which a kept
        table started now runs out (for a pass then)."""
        now = self.clock()
        by_address = {n.address: n for n in neighbors}
        up = {a for a, p in peers.items() if p.state == "up"}
        deadlines = []
        # Sessions lost since the last pass: down now, or down and up again in between (a new
        # "since"): the new session starts with an empty table either way.
        reset = {a for a in up & self._last_up
                 if a in self._last_state and peers[a].since != self._last_state[a].since}
        for address in (self._last_up - up) | reset:
            hold, why = retention_time(None if address in reset else peers.get(address),
                                       self._last_state.get(address), by_address.get(address))
            kept = self._last_received.get(address)
            if hold and kept:
                self._retained[address] = Retained(dict(kept), now + hold, why)
                deadlines.append(now + hold)
                log.info("peer %s down (%s); keeping its %d routes for up to %d s (graceful "
                         "restart)", address, why, len(kept), hold)
        self._last_up = up
        self._last_state = dict(peers)
        result: dict[IPv4Address, dict[IPv4Network, Path]] = {}
        last_received: dict[IPv4Address, Mapping[IPv4Network, Path]] = {}  # current peers only
        for address in by_address:
            state = peers.get(address)
            fresh = dict(received.get(address, {})) if address in up else {}
            retained = self._retained.get(address)
            if retained is not None:
                if self._ends(address, retained, state, now):
                    del self._retained[address]
                else:
                    fresh = {**retained.paths, **fresh}
            result[address] = fresh
            if address in up:
                # the speaker's own table, not a copy: it follows every update until the
                # session drops (then the speaker lets go of it), so what is kept for a
                # graceful restart is what the peer had when it went, even if its last
                # withdrawals and the drop arrive between two passes
                last_received[address] = received.get(address, {})
            elif address in self._last_received:
                last_received[address] = self._last_received[address]
        self._last_received = last_received
        for address in set(self._retained) - set(by_address):
            del self._retained[address]  # no longer a neighbour at all
        return result, deadlines

    @staticmethod
    def _ends(address: IPv4Address, retained: Retained, state: PeerState | None,
              now: float) -> bool:
        if now >= retained.until:
            log.info("peer %s did not come back within its restart time; dropping its %d "
                     "kept routes", address, len(retained.paths))
            return True
        if state is not None and state.state == "up" and state.end_of_rib:
            return True  # back, and its table is complete
        if state is not None and state.state == "down" and state.notification:
            log.info("peer %s: %s; dropping its %d kept routes (a NOTIFICATION ends graceful "
                     "restart)", address, state.reason, len(retained.paths))
            return True
        return False
