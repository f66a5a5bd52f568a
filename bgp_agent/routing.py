"""The agent's routing loop: from the cluster's state in etcd and what BGP peers tell us, to
the BGP sessions and announcements of this node and the routes in its kernel.

Every change (a node joins, a block is claimed, a peer announces or goes down) wakes one
reconcile pass that recomputes the desired state with the pure functions of policy.py and
applies only the difference: to ExaBGP through the Speaker, to the kernel through
KernelRoutes. Nothing is applied for a peer until the Speaker has its state (after an agent
restart the bridge's snapshot arrives first), so a restart changes nothing that was right.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from bgp_agent import policy
from bgp_agent.bgp_config import BGPConfig, config_from_spec
from bgp_agent.kernel_routes import KernelRoutes, Route, RouteError, diff
from bgp_agent.model import Neighbor, Path
from bgp_agent.node import NodeRecord, node_from_document
from ipam import block as blocks
from ipam import keys
from ipam.mirror import Mirror
from ipam.pool import pool_from_document
from ipam.resource import read_document
from ipam.store import Entry, Store

log = logging.getLogger(__name__)

BGP_CONFIG_PREFIX = keys.resource_prefix("bgpconfig")
RESYNC_SECONDS = 60.0  # full kernel dump-and-diff, to repair routes someone else removed


@dataclass(frozen=True)
class BlockSummary:
    """What the agent needs of a block: its owner and the addresses this node holds in it."""
    cidr: IPv4Network
    node: str | None
    mine: frozenset[IPv4Address]


def summarize(node: str):
    def decode(entry: Entry) -> BlockSummary:
        block = blocks.from_json(entry.value)
        mine = frozenset(block.address(o) for o, i in enumerate(block.allocations)
                         if i is not None and block.attributes[i].secondary.get("node") == node)
        return BlockSummary(block.cidr, block.node, mine)
    return decode


def decode_bgp_config(entry: Entry) -> BGPConfig:
    document = read_document(entry.value)
    return config_from_spec(document.name, dict(document.spec))


@dataclass
class PeerStatus:
    neighbor: Neighbor
    state: str = "idle"
    since: float = 0.0
    reason: str = ""
    received: int = 0
    accepted: int = 0
    rejected: int = 0
    exported: int = 0
    stale: int = 0  # routes kept from a peer restarting gracefully


@dataclass
class Status:
    node: str
    address: str = ""
    as_number: int = 0
    peers: dict[IPv4Address, PeerStatus] = field(default_factory=dict)
    kernel_routes: int = 0
    blackholes: int = 0
    exported: int = 0
    last_error: str = ""
    last_error_at: float = 0.0
    speaker_connected: bool = False

    def to_json(self) -> dict:
        return {
            "node": self.node, "address": self.address, "asNumber": self.as_number,
            "speakerConnected": self.speaker_connected,
            "kernelRoutes": self.kernel_routes, "blackholes": self.blackholes,
            "exported": self.exported, "lastError": self.last_error,
            "lastErrorAt": self.last_error_at,
            "peers": [{
                "address": str(p.neighbor.address), "asNumber": p.neighbor.peer_as,
                "type": p.neighbor.kind, "name": p.neighbor.name, "state": p.state,
                "since": p.since, "reason": p.reason, "received": p.received,
                "accepted": p.accepted, "rejected": p.rejected, "exported": p.exported,
                "stale": p.stale,
            } for p in self.peers.values()],
        }


@dataclass
class _Retained:
    """Routes of a peer that went down after negotiating graceful restart: still forwarded
    until it is back and has re-sent its table, or its restart time has passed."""
    paths: dict[IPv4Network, Path]
    until: float


class Router:
    def __init__(self, store: Store, me: NodeRecord, speaker, kernel: KernelRoutes,
                 startup_grace: float = 120.0):
        self.store = store
        self.me = me
        self.speaker = speaker
        self.kernel = kernel
        self.changed = asyncio.Event()
        self.status = Status(node=me.name)
        self.nodes = Mirror(store, keys.NODES, lambda e: node_from_document(e.value),
                            self.changed)
        self.pools = Mirror(store, keys.POOLS, lambda e: pool_from_document(e.value),
                            self.changed)
        self.bgp_config = Mirror(store, BGP_CONFIG_PREFIX, decode_bgp_config, self.changed)
        self.affinities = Mirror(store, keys.affinity_prefix(me.name),
                                 lambda e: e.value.get("state"), self.changed)
        self.blocks = Mirror(store, keys.BLOCKS, summarize(me.name), self.changed)
        self._mirrors = (self.nodes, self.pools, self.bgp_config, self.affinities, self.blocks)
        self._neighbors: list[Neighbor] | None = None
        self._last_received: dict[IPv4Address, dict[IPv4Network, Path]] = {}
        self._last_up: set[IPv4Address] = set()
        self._retained: dict[IPv4Address, _Retained] = {}
        self._applied: dict[IPv4Network, Route] | None = None  # what the kernel holds of ours
        self._resync_at = 0.0
        self._grace_until = time.monotonic() + startup_grace

    # -- inputs ------------------------------------------------------------------------

    def config(self) -> BGPConfig:
        return next(iter(self.bgp_config.items.values()), BGPConfig())

    def node_record(self) -> NodeRecord:
        return self.nodes.items.get(keys.node_key(self.me.name), self.me)

    def own_blocks(self) -> set[IPv4Network]:
        """Blocks this node owns with a confirmed affinity (a pending claim is not announced)."""
        confirmed = {keys.affinity_parts(k)[1] for k, state in self.affinities.items.items()
                     if state == "confirmed"}
        return {b.cidr for b in self.blocks.items.values()
                if b.node == self.me.name and b.cidr in confirmed}

    def borrowed(self) -> set[IPv4Address]:
        return {a for b in self.blocks.items.values() if b.node != self.me.name for a in b.mine}

    # -- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        tasks = [asyncio.create_task(m.run()) for m in self._mirrors]
        try:
            await asyncio.gather(*(m.ready.wait() for m in self._mirrors))
            log.info("cluster state loaded; routing")
            while True:
                await self.changed.wait()
                self.changed.clear()
                try:
                    await self.reconcile()
                except Exception as error:  # keep routing; say what went wrong
                    log.exception("reconcile failed")
                    self._error(f"reconcile failed: {error}")
        finally:
            for task in tasks:
                task.cancel()

    def _error(self, message: str) -> None:
        self.status.last_error = message
        self.status.last_error_at = time.time()

    def _wake_at(self, when: float) -> None:
        delay = max(0.0, when - time.monotonic())
        asyncio.get_running_loop().call_later(delay, self.changed.set)

    async def reconcile(self) -> None:
        me, config, pools = self.node_record(), self.config(), list(self.pools.items.values())
        my_as = policy.local_as(me, config)
        neighbors = policy.mesh_neighbors(me, self.nodes.items.values(), config)
        if neighbors != self._neighbors:
            await self.speaker.set_neighbors(neighbors)
            self._neighbors = neighbors
        own = self.own_blocks()
        self.status.address = str(me.address or "")
        self.status.as_number = my_as
        self.status.speaker_connected = self.speaker.connected
        if not self.speaker.connected:
            # Without the speaker's state, what peers sent is unknown: keep the kernel as it
            # is, except for our own blackholes.
            await self._program_kernel({}, own, learned_known=False)
            self._update_status(neighbors, {}, {})
            return
        received = self._received_with_retention(neighbors)
        imports = {n.address: policy.import_routes(n, received.get(n.address, {}), pools, own,
                                                   my_as) for n in neighbors}
        accepted = {address: result.accepted for address, result in imports.items()}
        await self._program_kernel(accepted, own, learned_known=True)
        exports = policy.announcements(
            policy.exported_prefixes(own, self.borrowed(), pools), neighbors, config)
        await self._announce(exports)
        self._update_status(neighbors, imports, exports)

    def _received_with_retention(self, neighbors: list[Neighbor]
                                 ) -> dict[IPv4Address, dict[IPv4Network, Path]]:
        now = time.monotonic()
        peers = self.speaker.peers
        up = {a for a, p in peers.items() if p.state == "up"}
        for address in self._last_up - up:  # went down since the last pass
            state = peers.get(address)
            if state is not None and state.graceful_restart and self._last_received.get(address):
                hold = state.restart_time or 120
                self._retained[address] = _Retained(dict(self._last_received[address]),
                                                    now + hold)
                self._wake_at(now + hold)
                log.info("peer %s down (%s); keeping its %d routes for up to %d s (graceful "
                         "restart)", address, state.reason, len(self._last_received[address]),
                         hold)
        self._last_up = up
        received: dict[IPv4Address, dict[IPv4Network, Path]] = {}
        for neighbor in neighbors:
            address = neighbor.address
            fresh = dict(self.speaker.received.get(address, {})) if address in up else {}
            retained = self._retained.get(address)
            if retained is not None:
                state = peers.get(address)
                if now >= retained.until or (address in up and state and state.end_of_rib):
                    del self._retained[address]
                else:
                    fresh = {**retained.paths, **fresh}
            received[address] = fresh
            if address in up:
                self._last_received[address] = dict(self.speaker.received.get(address, {}))
        for address in set(self._retained) - {n.address for n in neighbors}:
            del self._retained[address]  # no longer a neighbour at all
        return received

    async def _program_kernel(self, accepted: Mapping[IPv4Address, Mapping[IPv4Network, Path]],
                              own: set[IPv4Network], learned_known: bool) -> None:
        now = time.monotonic()
        if self._applied is None or now >= self._resync_at:
            self._applied = await asyncio.to_thread(self.kernel.dump)
            self._resync_at = now + RESYNC_SECONDS
            self._wake_at(self._resync_at)
        desired = policy.kernel_routes(accepted, own)
        to_replace, to_delete = diff(desired, self._applied)
        in_grace = now < self._grace_until and not self._all_peers_settled()
        if not learned_known or in_grace:
            # Do not withdraw learned routes we cannot vouch for yet (agent just started,
            # speaker not connected): only blackholes of blocks we no longer own go.
            to_delete = [r for r in to_delete if r.blackhole]
            if not learned_known:
                to_replace = [r for r in to_replace if r.blackhole]
        if in_grace:
            self._wake_at(self._grace_until)
        if to_replace or to_delete:
            new = [r for r in to_replace if r.dst not in self._applied]
            changed = [r for r in to_replace if r.dst in self._applied]
            errors = await asyncio.to_thread(self.kernel.apply, changed, to_delete, add=new)
            failed = {e.route.dst for e in errors}
            for route in to_delete:
                if route.dst not in failed:
                    self._applied.pop(route.dst, None)
            for route in to_replace:
                if route.dst not in failed:
                    self._applied[route.dst] = route
            if errors:
                self._report_kernel_errors(errors)
        self.status.kernel_routes = sum(1 for r in self._applied.values() if not r.blackhole)
        self.status.blackholes = sum(1 for r in self._applied.values() if r.blackhole)

    def _all_peers_settled(self) -> bool:
        neighbors = self._neighbors or []
        peers = self.speaker.peers
        return all(peers.get(n.address) is not None and peers[n.address].state == "up"
                   and peers[n.address].end_of_rib for n in neighbors)

    def _report_kernel_errors(self, errors: list[RouteError]) -> None:
        for error in errors[:5]:
            log.warning("kernel refused %s", error)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        self._error(f"kernel refused {errors[0]}{more}")

    async def _announce(self, exports: Mapping[IPv4Address, Mapping]) -> None:
        peers = self.speaker.peers
        for address, wanted in exports.items():
            state = peers.get(address)
            if state is None or state.state != "up":
                continue  # announced once the session is up (ExaBGP keeps adj-rib-out)
            have = self.speaker.announced.get(address, {})
            changed = [a for p, a in wanted.items() if have.get(p) != a]
            gone = [p for p in have if p not in wanted]
            if changed:
                await self.speaker.announce(address, changed)
            if gone:
                await self.speaker.withdraw(address, gone)

    def _update_status(self, neighbors: list[Neighbor], imports: Mapping, exports: Mapping
                       ) -> None:
        peers = {}
        for neighbor in neighbors:
            state = self.speaker.peers.get(neighbor.address)
            result = imports.get(neighbor.address)
            retained = self._retained.get(neighbor.address)
            peers[neighbor.address] = PeerStatus(
                neighbor=neighbor,
                state=state.state if state else "idle",
                since=state.since if state else 0.0,
                reason=state.reason if state else "",
                received=len(self.speaker.received.get(neighbor.address, {})),
                accepted=len(result.accepted) if result else 0,
                rejected=len(result.rejected) if result else 0,
                exported=len(self.speaker.announced.get(neighbor.address, {})),
                stale=len(retained.paths) if retained else 0,
            )
        self.status.peers = peers
        self.status.exported = len(next(iter(exports.values()), {})) if exports else 0
