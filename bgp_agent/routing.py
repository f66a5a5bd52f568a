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
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from bgp_agent import policy
from bgp_agent.bgp_config import BGPConfig, config_from_spec
from bgp_agent.bgp_peer import PasswordRef, peer_from_document, resolve_password
from bgp_agent.encapsulation import Encapsulation
from ipip.kernel_routes import KernelRoutes, NextHop, Route, RouteError, diff
from bgp_agent.model import Neighbor, Path, PeerState
from bgp_agent.node import NodeRecord, node_from_document
from bgp_agent.speaker import SpeakerError
from ipam import block as blocks
from ipam import keys
from ipam.mirror import Mirror
from ipam.pool import pool_from_document
from ipam.resource import read_document
from ipam.store import Entry, Store

log = logging.getLogger(__name__)

BGP_CONFIG_PREFIX = keys.resource_prefix("bgpconfig")
BGP_PEERS_PREFIX = keys.resource_prefix("bgppeers")
RESYNC_SECONDS = 60.0  # full kernel dump-and-diff, to repair routes someone else removed
DIAGNOSE_SECONDS = 3.0  # how often to look again at why a session is not up (MD5 counters)
STARTUP_GRACE_SECONDS = 120.0  # after a start, learned routes stay until every peer sent its table
NETSTAT = "/proc/net/netstat"
MD5_COUNTERS = ("TCPMD5Failure", "TCPMD5NotFound", "TCPMD5Unexpected")
NOTIFICATION = re.compile(r"notification (sent|received) \(\d+,\d+\)")  # ExaBGP's words


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
    state: str = "idle"  # ExaBGP's up | down | idle, or skipped | disabled (Pipit's own)
    since: float = 0.0
    reason: str = ""
    received: int = 0
    accepted: int = 0
    rejected: int = 0
    exported: int = 0
    stale: int = 0  # routes kept from a peer restarting gracefully
    rejected_reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class Status:
    node: str
    address: str = ""
    as_number: int = 0
    peers: list[PeerStatus] = field(default_factory=list)
    kernel_routes: int = 0
    blackholes: int = 0
    exported: int = 0
    last_error: str = ""
    last_error_at: float = 0.0
    speaker_connected: bool = False
    dataplane: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "node": self.node, "address": self.address, "asNumber": self.as_number,
            "speakerConnected": self.speaker_connected,
            "kernelRoutes": self.kernel_routes, "blackholes": self.blackholes,
            "exported": self.exported, "lastError": self.last_error,
            "lastErrorAt": self.last_error_at, "dataplane": self.dataplane,
            "peers": [{
                "address": str(p.neighbor.address), "asNumber": p.neighbor.peer_as,
                "type": p.neighbor.kind, "name": p.neighbor.name, "state": p.state,
                "since": p.since, "reason": p.reason, "received": p.received,
                "accepted": p.accepted, "rejected": p.rejected, "exported": p.exported,
                "stale": p.stale, "rejectedReasons": p.rejected_reasons,
                "maxPrefixes": p.neighbor.max_prefixes,
                "password": p.neighbor.password is not None,
            } for p in self.peers],
        }


@dataclass(frozen=True)
class _Disabled:
    """A peer disconnected for sending more than maxPrefixes: kept out of ExaBGP's
    configuration while its BGPPeer stays as it was (Calico/BIRD `receive limit ... action
    disable`). Changing the BGPPeer, or restarting the agent, lets it try again."""
    neighbor: Neighbor
    reason: str
    since: float
    received: int


def read_md5_counters(path: str = NETSTAT) -> dict[str, int]:
    """The kernel's TCP MD5 counters of this network namespace (TcpExt in /proc/net/netstat):
    segments dropped for a wrong signature, a missing one, or one nobody expected."""
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines, lines[1:]):
        if names.startswith("TcpExt:") and values.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:]))
            return {k: int(table[k]) for k in MD5_COUNTERS if k in table}
    return {}


@dataclass
class _Retained:
    """Routes of a peer that went down after negotiating graceful restart: still forwarded
    until it is back and has re-sent its table, or its restart time has passed."""
    paths: dict[IPv4Network, Path]
    until: float


class Router:
    def __init__(self, store: Store, me: NodeRecord, speaker, kernel: KernelRoutes,
                 secrets_dir: str | None = None, encapsulation: Encapsulation | None = None):
        self.store = store
        self.me = me
        self.speaker = speaker
        self.kernel = kernel
        self.encapsulation = encapsulation
        self.changed = asyncio.Event()
        self.status = Status(node=me.name)
        self.nodes = Mirror(store, keys.NODES, lambda e: node_from_document(e.value),
                            self.changed)
        self.pools = Mirror(store, keys.POOLS, lambda e: pool_from_document(e.value),
                            self.changed)
        self.bgp_config = Mirror(store, BGP_CONFIG_PREFIX, decode_bgp_config, self.changed)
        self.bgp_peers = Mirror(store, BGP_PEERS_PREFIX, lambda e: peer_from_document(e.value),
                                self.changed)
        self.affinities = Mirror(store, keys.affinity_prefix(me.name),
                                 lambda e: e.value.get("state"), self.changed)
        self.blocks = Mirror(store, keys.BLOCKS, summarize(me.name), self.changed)
        self._mirrors = (self.nodes, self.pools, self.bgp_config, self.bgp_peers,
                         self.affinities, self.blocks)
        self.secrets_dir = secrets_dir
        self._skipped: list[policy.Skipped] = []
        self._disabled: dict[IPv4Address, _Disabled] = {}
        self._last_state: dict[IPv4Address, PeerState] = {}
        self._md5_base: dict[IPv4Address, tuple[Neighbor, dict[str, int]]] = {}
        self._diagnose_at = 0.0
        self._eor_sent: dict[IPv4Address, float] = {}  # peer -> session (since) it went to
        self._neighbors: list[Neighbor] | None = None
        self._last_received: dict[IPv4Address, dict[IPv4Network, Path]] = {}
        self._last_up: set[IPv4Address] = set()
        self._retained: dict[IPv4Address, _Retained] = {}
        self._applied: dict[IPv4Network, Route] | None = None  # what the kernel holds of ours
        self._resync_at = 0.0
        self._grace_until = time.monotonic() + STARTUP_GRACE_SECONDS
        self._grace_wake_set = False  # the pass at the end of the grace is scheduled

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

    def _password(self, ref: PasswordRef) -> str:
        return resolve_password(ref, self.secrets_dir)

    def _select(self, me: NodeRecord, config: BGPConfig) -> list[Neighbor]:
        """The neighbours ExaBGP should have: the selection, minus peers disabled for
        exceeding maxPrefixes (a disabled peer whose BGPPeer changed may try again)."""
        selection = policy.select_neighbors(me, self.nodes.items.values(), config,
                                            self.bgp_peers.items.values(), self._password)
        self._skipped = selection.skipped
        wanted = {n.address: n for n in selection.neighbors}
        for address, disabled in list(self._disabled.items()):
            if wanted.get(address) != disabled.neighbor:
                log.info("peer %s (%s) changed or left: no longer disabled", address,
                         disabled.neighbor.name)
                del self._disabled[address]
        return [n for n in selection.neighbors if n.address not in self._disabled]

    def _enforce_limits(self, neighbors: list[Neighbor]) -> bool:
        """Disable every up peer that sent more prefixes than its maxPrefixes; True if any."""
        tripped = False
        for neighbor in neighbors:
            state = self.speaker.peers.get(neighbor.address)
            count = len(self.speaker.received.get(neighbor.address, {}))
            reason = policy.over_limit(neighbor, count)
            if reason and state is not None and state.state == "up":
                log.warning("peer %s (%s): %s; disconnecting it. It stays down until its "
                            "BGPPeer changes or the agent restarts", neighbor.address,
                            neighbor.name, reason)
                self._disabled[neighbor.address] = _Disabled(
                    neighbor, f"disconnected: {reason}; it stays down until its BGPPeer "
                              "changes", time.time(), count)
                self._error(f"peer {neighbor.address} ({neighbor.name}) disconnected: {reason}")
                tripped = True
        return tripped

    async def reconcile(self) -> None:
        me, config, pools = self.node_record(), self.config(), list(self.pools.items.values())
        my_as = policy.local_as(me, config)
        neighbors = self._select(me, config)
        if self.speaker.connected and self._enforce_limits(neighbors):
            neighbors = [n for n in neighbors if n.address not in self._disabled]
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
        received = self._received_with_retention(neighbors)  # copies: safe in a thread
        # The table-wide computations run in a worker thread: with many routes they take
        # long enough (~1 s at 100k) to stall the agent's IPAM service and its BGP bridge.
        imports = await asyncio.to_thread(policy.import_all, neighbors, received, pools, own,
                                          my_as)
        accepted = {address: result.accepted for address, result in imports.items()}
        next_hop = policy.native
        if self.encapsulation is not None:  # tunnel devices up before routes use them
            next_hop = await self.encapsulation.prepare(me, pools, self.nodes.items.values())
        await self._program_kernel(accepted, own, learned_known=True, next_hop=next_hop)
        if self.encapsulation is not None:  # and devices no pool needs go after the routes
            await self.encapsulation.retire()
        exports = policy.announcements(
            policy.exported_prefixes(own, self.borrowed(), pools), neighbors, config)
        await self._announce(exports)
        self._update_status(neighbors, imports, exports)
        if self.encapsulation is not None:
            self.status.dataplane = self.encapsulation.status.to_json()

    def _received_with_retention(self, neighbors: list[Neighbor]
                                 ) -> dict[IPv4Address, dict[IPv4Network, Path]]:
        now = time.monotonic()
        peers = self.speaker.peers
        up = {a for a, p in peers.items() if p.state == "up"}
        by_address = {n.address: n for n in neighbors}
        # Sessions lost since the last pass: down now, or down and up again in between (a new
        # "since"): the new session starts with an empty table either way.
        reset = {a for a in up & self._last_up
                 if a in self._last_state and peers[a].since != self._last_state[a].since}
        for address in (self._last_up - up) | reset:
            hold, why = self._retention(None if address in reset else peers.get(address),
                                        self._last_state.get(address), by_address.get(address))
            if hold and self._last_received.get(address):
                self._retained[address] = _Retained(dict(self._last_received[address]),
                                                    now + hold)
                self._wake_at(now + hold)
                log.info("peer %s down (%s); keeping its %d routes for up to %d s (graceful "
                         "restart)", address, why, len(self._last_received[address]), hold)
        self._last_up = up
        self._last_state = {a: p for a, p in peers.items()}
        received: dict[IPv4Address, dict[IPv4Network, Path]] = {}
        last_received: dict[IPv4Address, dict[IPv4Network, Path]] = {}  # current peers only
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
                # the speaker's own table, not a copy: it follows every update until the
                # session drops (then the speaker lets go of it), so what is kept for a
                # graceful restart is what the peer had when it went, even if its last
                # withdrawals and the drop arrive between two passes
                last_received[address] = self.speaker.received.get(address, {})
            elif address in self._last_received:
                last_received[address] = self._last_received[address]
        self._last_received = last_received
        for address in set(self._retained) - set(by_address):
            del self._retained[address]  # no longer a neighbour at all
        return received

    @staticmethod
    def _retention(now: PeerState | None, before: PeerState | None,
                   neighbor: Neighbor | None) -> tuple[int, str]:
        """How long to keep a lost session's routes, and why. The peer went down after
        negotiating graceful restart, without a NOTIFICATION: its restart time. Our own
        ExaBGP restarted (the new one knows nothing of the old session): we are the
        restarting speaker and keep forwarding for our own restart time, if the old session
        had graceful restart."""
        if neighbor is None:
            return 0, "no longer a neighbour"
        if now is not None and now.state == "down":
            # a NOTIFICATION (hold timer expired, a reset, a refusal) ends graceful restart:
            # only a session that just dropped is a peer restarting (RFC 4724)
            if now.graceful_restart and not NOTIFICATION.search(now.reason):
                return now.restart_time or neighbor.restart_time or 120, now.reason
            return 0, now.reason
        if before is not None and before.graceful_restart and neighbor.restart_time:
            # no "down" to read: our ExaBGP restarted, or the session was reset and is back
            return neighbor.restart_time, "the session was lost"
        return 0, "session lost"

    async def _program_kernel(self, accepted: Mapping[IPv4Address, Mapping[IPv4Network, Path]],
                              own: set[IPv4Network], learned_known: bool,
                              next_hop: Callable[[Path], NextHop] = policy.native) -> None:
        now = time.monotonic()
        resync = self._applied is None or now >= self._resync_at

        def compute() -> tuple[dict[IPv4Network, Route], tuple[list[Route], list[Route]]]:
            desired = policy.kernel_routes(accepted, own, next_hop)
            # a resync dumps the kernel's table, reusing the desired prefixes' objects
            actual = self.kernel.dump(reuse=desired.keys()) if resync else self._applied
            return actual, diff(desired, actual)

        self._applied, (to_replace, to_delete) = await asyncio.to_thread(compute)
        if resync:
            self._resync_at = now + RESYNC_SECONDS
            self._wake_at(self._resync_at)
        if now < self._grace_until and self._all_peers_settled():
            self._grace_until = 0.0  # start-up is over: from now on a lost peer's routes go
        in_grace = now < self._grace_until
        if not learned_known or in_grace:
            # Do not withdraw learned routes we cannot vouch for yet (agent just started,
            # speaker not connected): only blackholes of blocks we no longer own go.
            to_delete = [r for r in to_delete if r.blackhole]
            if not learned_known:
                to_replace = [r for r in to_replace if r.blackhole]
        if in_grace and not self._grace_wake_set:  # one pass when the grace ends
            self._wake_at(self._grace_until)
            self._grace_wake_set = True
        if to_replace or to_delete:
            _, errors = await asyncio.to_thread(self.kernel.apply_diff, to_replace, to_delete,
                                                self._applied)
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
            if self._eor_sent.get(address) != state.since:
                # ExaBGP runs with manual-eor: End-of-RIB goes out after our table, so a peer
                # keeping our routes through a graceful restart never flushes them early
                try:
                    await self.speaker.command(f"neighbor {address} announce eor ipv4 unicast")
                    self._eor_sent[address] = state.since
                except SpeakerError as error:  # the session went down meanwhile: next pass
                    log.warning("could not send End-of-RIB to %s: %s", address, error)
        for address in set(self._eor_sent) - set(exports):
            del self._eor_sent[address]

    def _md5_reason(self, neighbor: Neighbor, counters: dict[str, int]) -> str:
        """Why a session that is not up may be failing, from the kernel's TCP MD5 counters
        (they count for the whole network namespace, not per peer)."""
        base = self._md5_base.get(neighbor.address)
        if base is None or base[0] != neighbor:
            self._md5_base[neighbor.address] = (neighbor, counters)
            return ""
        grown = {k: counters.get(k, 0) - base[1].get(k, 0) for k in MD5_COUNTERS}
        return policy.md5_diagnosis(neighbor.password is not None, grown)

    def _update_status(self, neighbors: list[Neighbor], imports: Mapping, exports: Mapping
                       ) -> None:
        peers = []
        counters = read_md5_counters() if neighbors else {}
        not_up = False
        for neighbor in neighbors:
            state = self.speaker.peers.get(neighbor.address)
            result = imports.get(neighbor.address)
            retained = self._retained.get(neighbor.address)
            reason = state.reason if state else ""
            if state is not None and state.state == "up":
                self._md5_base[neighbor.address] = (neighbor, counters)
            else:
                not_up = True
                diagnosis = self._md5_reason(neighbor, counters)
                if diagnosis:
                    reason = diagnosis + (f" (the last session ended: {reason})" if reason
                                          else "")
            rejected_reasons: dict[str, int] = {}
            for why in (result.rejected.values() if result else ()):
                rejected_reasons[why] = rejected_reasons.get(why, 0) + 1
            peers.append(PeerStatus(
                neighbor=neighbor,
                state=state.state if state else "idle",
                since=state.since if state else 0.0,
                reason=reason,
                received=len(self.speaker.received.get(neighbor.address, {})),
                accepted=len(result.accepted) if result else 0,
                rejected=len(result.rejected) if result else 0,
                exported=len(self.speaker.announced.get(neighbor.address, {})),
                stale=len(retained.paths) if retained else 0,
                rejected_reasons=rejected_reasons,
            ))
        for disabled in self._disabled.values():
            peers.append(PeerStatus(neighbor=disabled.neighbor, state="disabled",
                                    since=disabled.since, reason=disabled.reason,
                                    received=disabled.received))
        for skipped in self._skipped:
            peers.append(PeerStatus(
                neighbor=Neighbor(skipped.address, skipped.peer_as,
                                  self.me.address.ip if self.me.address else skipped.address,
                                  0, kind=skipped.kind, name=skipped.name),
                state="skipped", reason=skipped.reason))
        for address in set(self._md5_base) - {n.address for n in neighbors}:
            del self._md5_base[address]
        self.status.peers = sorted(peers, key=lambda p: (p.neighbor.address, p.state))
        self.status.exported = len(next(iter(exports.values()), {})) if exports else 0
        if not_up and time.monotonic() >= self._diagnose_at:
            self._diagnose_at = time.monotonic() + DIAGNOSE_SECONDS
            self._wake_at(self._diagnose_at)
