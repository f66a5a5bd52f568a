"""The agent's routing loop: from the cluster's state in etcd and what BGP peers tell us, to
the BGP sessions and announcements of this node and the routes in its kernel.

Every change (a node joins, a block is claimed, a peer announces or goes down) wakes one
reconcile pass: select the neighbours, import what they sent (policy.py, pure), program the
kernel (ipip.route_table), announce. Only differences are applied: to BGP through a Speaker
(bgp_agent.model; ExaBGP is the backend), to the kernel through the RouteTable. Nothing is
applied for a peer until the speaker has its state (after an agent restart the bridge's
snapshot arrives first), so a restart changes nothing that was right.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from types import MappingProxyType
from typing import TYPE_CHECKING

from bgp_agent import policy, service_addresses
from bgp_agent.bgp_config import (LOG_SEVERITIES, BGPConfig, NodeBGPConfig, config_from_spec,
                                  for_node)
from bgp_agent.bgp_filter import filter_from_document
from bgp_agent.bgp_peer import peer_from_document
from bgp_agent.md5_password import PasswordRef, resolve_password
from bgp_agent.node_dataplane import NodeDataplane
from bgp_agent.metrics import (
    KERNEL_ROUTE_CHANGES,
    KERNEL_ROUTE_ERRORS,
    RECONCILE_PASSES,
    RECONCILE_SECONDS,
)
from bgp_agent.model import Neighbor, Path, Speaker, SpeakerError
from bgp_agent.node import NodeRecord, node_from_document
from bgp_agent.reflection import Reflection, Send
from bgp_agent.retention import GracefulRestart
from bgp_agent.status import DropWatch, PeerStatus, Status, read_drop_counters
from ipip import recursive
from ipip.route_table import RouteTable
from ipip.routes import NextHop, Route, RouteError
from ipam import block as blocks
from ipam import keys
from ipam.mirror import Mirror
from ipam.pool import node_in_pool, pool_from_document
from ipam.resource import read_document
from ipam.store import Entry, Store

if TYPE_CHECKING:
    from bgp_agent.kube_services import NodeServices

log = logging.getLogger(__name__)

BGP_CONFIG_PREFIX = keys.resource_prefix("bgpconfig")
BGP_PEERS_PREFIX = keys.resource_prefix("bgppeers")
BGP_FILTERS_PREFIX = keys.resource_prefix("bgpfilters")
DIAGNOSE_SECONDS = 3.0  # how often to look again at why a session is not up (drop counters)
STARTUP_GRACE_SECONDS = 120.0  # after a start, learned routes stay until every peer sent its table
# a reflector's passes whose sends may still await ExaBGP's answers while the next one runs
REFLECTED_IN_FLIGHT = 4
# Import policy over at most this many received routes runs in the loop itself: handing it to
# a thread and back costs more than the work (a route decided before costs ~0.2 us), and the
# longest it can hold the loop (every route new, ~5 us each) stays near 50 ms.
INLINE_IMPORT_ROUTES = 10_000


_NO_FLOATING: Mapping = MappingProxyType({})  # what most blocks have: one shared, not one each


@dataclass(frozen=True)
class BlockSummary:
    """What the agent needs of a block: its owner, the addresses other nodes borrowed from it
    (address -> the node holding it), how many addresses each node holds in it, and its pods'
    floating IPs (address -> the node holding it and the pod address it leads to)."""
    cidr: IPv4Network
    node: str | None
    borrowers: Mapping[IPv4Address, str]
    held: Mapping[str, int]
    floating: Mapping[IPv4Address, tuple[str, IPv4Address]]


def summarize(entry: Entry) -> BlockSummary:
    block = blocks.from_json(entry.value)
    borrowers: dict[IPv4Address, str] = {}
    held: dict[str, int] = {}
    floating: dict[IPv4Address, tuple[str, IPv4Address]] = {}
    for ordinal, index in enumerate(block.allocations):
        if index is not None:
            secondary = block.attributes[index].secondary
            holder = secondary.get("node")
            if holder:
                held[holder] = held.get(holder, 0) + 1
            if holder and holder != block.node:
                borrowers[block.address(ordinal)] = holder
            target = blocks.floating_target(secondary)
            if holder and target:
                floating[block.address(ordinal)] = holder, target
    return BlockSummary(block.cidr, block.node, borrowers, held, floating or _NO_FLOATING)


def decode_bgp_config(entry: Entry) -> BGPConfig | NodeBGPConfig:
    document = read_document(entry.value)
    return config_from_spec(document.name, dict(document.spec))


@dataclass(frozen=True)
class _Disabled:
    """A peer disconnected for sending more than maxPrefixes: kept out of ExaBGP's
    configuration while its BGPPeer stays as it was (Calico/BIRD `receive limit ... action
    disable`). Changing the BGPPeer, or restarting the agent, lets it try again."""
    neighbor: Neighbor
    reason: str
    since: float
    received: int


class Router:
    """select → import → program the kernel → announce, on every change. `clock` (monotonic
    seconds) times the start-up grace, graceful restart, resyncs and diagnoses; a test may
    pass its own and call reconcile() itself."""

    def __init__(self, store: Store, me: NodeRecord, speaker: Speaker,
                 routes: RouteTable | None,
                 secrets_dir: str | None = None, dataplane: NodeDataplane | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.me = me
        self.speaker = speaker
        self.routes = routes
        self.dataplane = dataplane
        self.clock = clock
        self.changed = asyncio.Event()
        # set after the first pass that programmed the kernel knowing what peers sent (the
        # agent then reports the node ready, and its network available to Kubernetes)
        self.programmed = asyncio.Event()
        self.status = Status(node=me.name, address=str(me.address or ""))  # before any pass
        self.nodes = Mirror(store, keys.NODES, lambda e: node_from_document(e.value),
                            self.changed)
        self.pools = Mirror(store, keys.POOLS, lambda e: pool_from_document(e.value),
                            self.changed)
        self.bgp_config = Mirror(store, BGP_CONFIG_PREFIX, decode_bgp_config, self.changed)
        self.bgp_peers = Mirror(store, BGP_PEERS_PREFIX, lambda e: peer_from_document(e.value),
                                self.changed)
        self.bgp_filters = Mirror(store, BGP_FILTERS_PREFIX,
                                  lambda e: filter_from_document(e.value), self.changed)
        self.affinities = Mirror(store, keys.affinity_prefix(me.name),
                                 lambda e: e.value.get("state"), self.changed)
        self.blocks = Mirror(store, keys.BLOCKS, summarize, self.changed)
        self.mirrors = (self.nodes, self.pools, self.bgp_config, self.bgp_peers,
                        self.bgp_filters, self.affinities, self.blocks)
        self.secrets_dir = secrets_dir
        self.graceful_restart = GracefulRestart(clock)
        self.reflection: Reflection | None = None  # while this node is a route reflector
        self._in_flight: list[asyncio.Future] = []  # its passes' sends, each: all taken?
        self._imports: dict[IPv4Address, policy.ImportResult] = {}  # the last pass's
        # what is worked out of etcd's tables, and the generations of the mirrors it was of
        self._derived: dict[str, tuple[tuple[int, ...], object]] = {}
        self.drops = DropWatch()
        self._skipped: list[policy.Skipped] = []
        self._selection_warnings: list[str] = []
        self._disabled: dict[IPv4Address, _Disabled] = {}
        self._diagnose_at = 0.0
        self._eor_sent: dict[IPv4Address, float] = {}  # peer -> session (since) it went to
        self._neighbors: list[Neighbor] | None = None
        self._grace_until = clock() + STARTUP_GRACE_SECONDS
        self._grace_wake_set = False  # the pass at the end of the grace is scheduled
        # for health checks: when the pass that runs now started (None between passes)
        self.pass_started: float | None = None
        # next hops on none of the node's links (ipip.recursive), as of the last pass: each
        # gateway, and what the kernel's route to it resolved to
        self._underlay: dict[IPv4Address, tuple[NextHop, ...] | None] = {}
        self._watch_underlay = asyncio.Event()  # set while there are far next hops
        # the cluster's Services and EndpointSlices (kube_services), with the Kubernetes API
        self.node_services: NodeServices | None = None
        self._kernel_lock = asyncio.Lock()  # the route table's socket: one thread at a time
        self._start_log_level = logging.getLevelName(logging.getLogger().level)

    # -- inputs ------------------------------------------------------------------------

    def config(self) -> BGPConfig:
        """The cluster's BGPConfiguration ("default"; none: the defaults), with the nodes'
        own listenPorts (node.<name>)."""
        configs = list(self.bgp_config.items.values())
        config = next((c for c in configs if isinstance(c, BGPConfig)), BGPConfig())
        ports = tuple(sorted((c.node, c.listen_port) for c in configs
                             if isinstance(c, NodeBGPConfig) and c.listen_port is not None))
        return replace(config, node_listen_ports=ports) if ports else config

    def node_config(self, node: str) -> NodeBGPConfig | None:
        """The node's own BGPConfiguration (node.<name>), if it has one."""
        return next((c for c in self.bgp_config.items.values()
                     if isinstance(c, NodeBGPConfig) and c.node == node), None)

    def node_record(self) -> NodeRecord:
        """This node's record as etcd has it (its labels, AS, cluster id may change while the
        agent runs), with the address the agent registered and runs its speaker on: a new
        address is taken up by a new routing pass (agent.address_change), never half-way
        through this one (its ExaBGP sessions and router id are the old address's)."""
        stored = self.nodes.items.get(keys.node_key(self.me.name), self.me)
        return (stored if stored.address == self.me.address
                else replace(stored, address=self.me.address))

    def _derive(self, name: str, mirrors: tuple[Mirror, ...], read):
        """read(), worked out again only once one of `mirrors` changed: passes come often,
        each went over every block in etcd (tens of thousands in a large cluster)."""
        generations = tuple(m.generation for m in mirrors)
        kept = self._derived.get(name)
        if kept is None or kept[0] != generations:
            kept = self._derived[name] = generations, read()
        return kept[1]

    def own_blocks(self) -> frozenset[IPv4Network]:
        """Blocks this node owns with a confirmed affinity (a pending claim is not announced)."""
        return self._derive("own blocks", (self.affinities, self.blocks), self._read_own_blocks)

    def _read_own_blocks(self) -> frozenset[IPv4Network]:
        confirmed = {keys.affinity_parts(k)[1] for k, state in self.affinities.items.items()
                     if state == "confirmed"}
        return frozenset(b.cidr for b in self.blocks.items.values()
                         if b.node == self.me.name and b.cidr in confirmed)

    def borrowed(self) -> frozenset[IPv4Address]:
        """Addresses this node holds in other nodes' blocks."""
        return self._derive("borrowed", (self.blocks,), lambda: frozenset(
            a for b in self.blocks.items.values() for a, holder in b.borrowers.items()
            if holder == self.me.name))

    def floating_ips(self) -> dict[IPv4Address, IPv4Address]:
        """The floating IPs of this node's pods: address -> the pod's own address."""
        return self._derive("floating", (self.blocks,), lambda: {
            a: target for b in self.blocks.items.values()
            for a, (holder, target) in b.floating.items() if holder == self.me.name})

    def ipam_usage(self) -> dict[str, dict[str, int]]:
        """This node's blocks and the addresses it holds, per pool (for metrics)."""
        pools = list(self.pools.items.values())
        own = self.own_blocks()
        usage: dict[str, dict[str, int]] = {"blocks": {}, "addresses": {}}
        for block in list(self.blocks.items.values()):
            pool = next((p.name for p in pools if p.holds(block.cidr)), None)
            if pool is None:
                continue
            if block.cidr in own:
                usage["blocks"][pool] = usage["blocks"].get(pool, 0) + 1
            held = block.held.get(self.me.name, 0)
            if held:
                usage["addresses"][pool] = usage["addresses"].get(pool, 0) + held
        return usage

    def ownership(self) -> policy.Ownership:
        """Which node's address may announce each block and borrowed address (etcd's word);
        the same object while the blocks and nodes are (import_all keeps its verdicts)."""
        return self._derive("ownership", (self.blocks, self.nodes), self._read_ownership)

    def _read_ownership(self) -> policy.Ownership:
        address = {n.name: n.address.ip for n in self.nodes.items.values() if n.address}
        owners, holders = {}, {}
        for block in self.blocks.items.values():
            if block.node is not None:
                owners[block.cidr] = (block.node, address.get(block.node))
            for borrowed, holder in block.borrowers.items():
                holders[borrowed] = (holder, address.get(holder))
        return policy.Ownership(owners, holders)

    # -- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        tasks = [asyncio.create_task(m.run()) for m in self.mirrors]
        tasks.append(asyncio.create_task(self._follow_underlay()))
        try:
            await asyncio.gather(*(m.ready.wait() for m in self.mirrors))
            log.info("cluster state loaded; routing")
            while True:
                await self.changed.wait()
                self.changed.clear()
                started = time.monotonic()
                self.pass_started = self.clock()
                try:
                    await self.reconcile()
                    RECONCILE_PASSES.labels("ok").inc()
                except Exception as error:  # keep routing; say what went wrong
                    log.exception("reconcile failed")
                    self._error(f"reconcile failed: {error}")
                    RECONCILE_PASSES.labels("error").inc()
                finally:
                    self.pass_started = None
                RECONCILE_SECONDS.observe(time.monotonic() - started)
        finally:
            for task in tasks + self._in_flight:
                task.cancel()

    def _error(self, message: str) -> None:
        self.status.last_error = message
        self.status.last_error_at = time.time()

    def _wake_at(self, when: float) -> None:
        delay = max(0.0, when - self.clock())
        asyncio.get_running_loop().call_later(delay, self.changed.set)

    def _password(self, ref: PasswordRef) -> str:
        return resolve_password(ref, self.secrets_dir)

    def _select(self, me: NodeRecord, config: BGPConfig) -> list[Neighbor]:
        """The neighbours the speaker should have: the selection, minus peers disabled for
        exceeding maxPrefixes (a disabled peer whose BGPPeer changed may try again)."""
        filters = {f.name: f for f in self.bgp_filters.items.values()}
        selection = policy.select_neighbors(me, self.nodes.items.values(), config,
                                            self.bgp_peers.items.values(), self._password,
                                            filters)
        self._skipped = selection.skipped
        self._selection_warnings = selection.warnings
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

    def _follow_log_severity(self, config: BGPConfig, own: NodeBGPConfig | None) -> None:
        """The agent's log level as logSeverityScreen says (Calico's): the node's own
        BGPConfiguration's, else the default's, else as it started (--log-level)."""
        source = own if own is not None and own.log_severity is not None else config
        level = LOG_SEVERITIES.get(source.log_severity or "", self._start_log_level)
        root = logging.getLogger()
        if logging.getLevelName(root.level) != level:
            root.setLevel(level)
            log.warning("log level now %s (BGPConfiguration %s logSeverityScreen %s)", level,
                        source.name, source.log_severity or "unset")

    async def reconcile(self) -> None:
        me, pools = self.node_record(), list(self.pools.items.values())
        own_config = self.node_config(me.name)
        config = for_node(self.config(), own_config)
        self._follow_log_severity(config, own_config)
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
            await self._program_kernel({}, own, learned_known=False,
                                       static=self._static_routes(neighbors))
            self._update_status(neighbors, {}, {})
            return
        received, deadlines = self.graceful_restart.received(
            neighbors, self.speaker.peers, self.speaker.received)  # copies: safe in a thread
        for deadline in deadlines:
            self._wake_at(deadline)
        # With many routes the table-wide computations run in a worker thread: they take long
        # enough (~1 s at 100k) to stall the agent's IPAM service and its BGP bridge. Up to
        # INLINE_IMPORT_ROUTES, here: the hand-off would cost more than the work.
        work = (neighbors, received, pools, own, my_as, self.ownership(), self._imports,
                config.service_prefixes)
        if sum(map(len, received.values())) <= INLINE_IMPORT_ROUTES:
            imports = policy.import_all(*work)
        else:
            imports = await asyncio.to_thread(policy.import_all, *work)
        self._imports = imports
        accepted = {address: result.accepted for address, result in imports.items()}
        await self._reflect(me, my_as, neighbors, accepted)
        next_hop = policy.native
        if self.dataplane is not None:  # tunnel devices up before routes use them
            next_hop = await self.dataplane.prepare(me, pools, self.nodes.items.values(),
                                                    self.floating_ips())
        if await self._program_kernel(accepted, own, learned_known=True, next_hop=next_hop,
                                      local=me.address, static=self._static_routes(neighbors)):
            self.programmed.set()
        if self.dataplane is not None:  # and devices no pool needs go after the routes
            await self.dataplane.retire()
        # a dedicated reflector (no route table) runs no kube-proxy, and a node labelled
        # exclude-from-external-load-balancers is left out by choice: they announce no services
        excluded = service_addresses.excluded(me.labels)
        announcing = self.routes is not None and bool(config.service_prefixes) and not excluded
        services = config.announced_service_ranges if announcing else ()
        if announcing and self.node_services is not None:
            self.node_services.start(self.changed)
            per_service = self.node_services.prefixes(me.name, config.service_ranges,
                                                      config.aggregate_balancers)
            services = (*services, *sorted((per_service or frozenset()) - set(services)))
        elif self.node_services is not None and self.node_services.running:
            log.info("no service range left, or this node is excluded from announcing them: no "
                     "longer following Services and EndpointSlices")
            await self.node_services.close()
        self.status.services = [str(p) for p in services]
        self.status.services_excluded = bool(config.service_prefixes) and excluded
        self.status.services_watched = bool(self.node_services and self.node_services.running)
        exports = policy.announcements(
            policy.exported_prefixes(own, self.borrowed(), pools), neighbors, config, services)
        await self._announce(exports)
        self._update_status(neighbors, imports, exports)
        if self.dataplane is not None:
            self.status.dataplane = self.dataplane.status.to_json()

    async def _reflect(self, me: NodeRecord, my_as: int, neighbors: list[Neighbor],
                       accepted: Mapping[IPv4Address, Mapping[IPv4Network, Path]]) -> None:
        """As a route reflector: reflect what the iBGP peers sent (bgp_agent.reflection)."""
        cluster = me.route_reflector_cluster_id
        if cluster is None or me.address is None:
            self.reflection = None  # its routes go with the next _announce
            return
        if (self.reflection is None or self.reflection.cluster_id != cluster
                or self.reflection.local_as != my_as):
            log.info("reflecting routes as a route reflector of cluster id %s", cluster)
            self.reflection = Reflection(me.address.ip, cluster, my_as)
        reflection, now = self.reflection, self.clock()
        updates = reflection.step(neighbors, self.speaker.peers, accepted, now)
        deadline = reflection.next_deadline()
        if deadline is not None:
            self._wake_at(deadline)
        # The pass's sends are asked now and answered meanwhile: the next pass need not wait
        # for them (routes keep arriving while ExaBGP sends), and, asked in order, what it
        # sends a peer goes after them. At most REFLECTED_IN_FLIGHT passes ahead of ExaBGP.
        self._in_flight.append(self._start_reflected(reflection.sends(updates)))
        if len(self._in_flight) > REFLECTED_IN_FLIGHT:
            await asyncio.wait([self._in_flight[0]])
        landed = [f for f in self._in_flight if f.done()]
        self._in_flight = [f for f in self._in_flight if not f.done()]
        sent = all(f.result() for f in landed)
        if sent and reflection.due_check(now):  # against what the speaker holds after them
            sent = all(await asyncio.gather(*self._in_flight))
            self._in_flight = []
            sent = sent and await self._start_reflected(
                reflection.check(self.speaker.announced, now))
        if not sent:
            reflection.check_again(now + 1.0)
            self._wake_at(now + 1.0)

    def _start_reflected(self, sends: list[Send]) -> asyncio.Future:
        """Ask the speaker for them all now, in order; a future of whether all were taken.
        They go at once: they are for different (neighbour, prefix) pairs, and the bridge
        pipelines what is queued to ExaBGP (one turn of its loop for many commands)."""
        asked, refused = [], False
        try:
            for send in sends:
                if send.routes:
                    asked.append((send, self.speaker.announce_to(send.neighbors, send.routes)))
                if send.prefixes:
                    asked.append((send, self.speaker.withdraw_from(send.neighbors,
                                                                   send.prefixes)))
        except SpeakerError as error:  # ExaBGP away
            log.warning("reflecting: %s", error)
            refused = True
        flight = asyncio.ensure_future(self._answers(asked, refused))
        flight.add_done_callback(self._flight_landed)
        return flight

    @staticmethod
    async def _answers(asked: list[tuple[Send, Awaitable]], refused: bool) -> bool:
        results = await asyncio.gather(*(a for _, a in asked), return_exceptions=True)
        for (send, _), result in zip(asked, results):
            if not isinstance(result, BaseException):
                continue
            refused = True
            to = ", ".join(map(str, send.neighbors))
            if isinstance(result, SpeakerError):  # a session went down meanwhile, ExaBGP away
                log.warning("reflecting to %s: %s", to, result)
            else:  # a bug: said, and checked again as for any failed send
                log.error("reflecting to %s failed", to, exc_info=result)
        return not refused

    def _flight_landed(self, flight: asyncio.Future) -> None:
        if not flight.cancelled() and not flight.result():
            self.changed.set()  # a pass sees it and checks against the speaker soon

    async def _program_kernel(self, accepted: Mapping[IPv4Address, Mapping[IPv4Network, Path]],
                              own: set[IPv4Network], learned_known: bool,
                              next_hop: Callable[[Path], NextHop] = policy.native,
                              local: IPv4Interface | None = None,
                              static: Mapping[IPv4Network, Route] | None = None) -> bool:
        """Sync the kernel's routes (no route table: a dedicated reflector, pipit-rr, programs
        none); whether the routes learned from peers were known to this pass (the kernel
        holds what they sent, less any route it refused, which is reported). A next hop
        outside `local`'s network that no link reaches goes via the kernel's route to it;
        `static` routes (policy.peer_routes) win over learned ones."""
        now = self.clock()
        if now < self._grace_until and self._all_peers_settled():
            self._grace_until = 0.0  # start-up is over: from now on a lost peer's routes go
        in_grace = now < self._grace_until
        if in_grace and not self._grace_wake_set:  # one pass when the grace ends
            self._wake_at(self._grace_until)
            self._grace_wake_set = True

        if self.routes is None:
            return learned_known

        def sync():
            desired = policy.kernel_routes(accepted, own, next_hop, static)
            far = (recursive.far_gateways(desired.values(), local.network)
                   if local is not None else frozenset())
            # a far next hop that is a reachableBy peer goes the way of its static route
            # (the kernel's lookup would find that route, Pipit's own, and take it for none)
            peers = {r.dst.network_address: r.nexthops for r in (static or {}).values()}
            underlay = {**self._look_up(far - peers.keys()),
                        **{gateway: peers[gateway] for gateway in far & peers.keys()}}
            # Learned routes we cannot vouch for yet (agent just started, speaker not
            # connected) are not withdrawn: only blackholes of blocks we no longer own go.
            return underlay, self.routes.sync(recursive.resolve(desired, underlay),
                                              keep_unlisted=not learned_known or in_grace)

        async with self._kernel_lock:
            underlay, stats = await asyncio.to_thread(sync)
        self._note_underlay(underlay)
        if stats.resynced:
            self._wake_at(self.routes.resync_at)
        for op, count in (("add", stats.added), ("replace", stats.replaced),
                          ("delete", stats.deleted)):
            if count:
                KERNEL_ROUTE_CHANGES.labels(op).inc(count)
        if stats.errors:
            KERNEL_ROUTE_ERRORS.inc(len(stats.errors))
            self._report_kernel_errors(stats.errors)
        applied = self.routes.applied.values()
        self.status.blackholes = sum(1 for r in applied if r.blackhole)
        self.status.kernel_routes = len(applied) - self.status.blackholes
        return learned_known  # a refused route is reported; it does not hold the node back

    def _static_routes(self, neighbors: list[Neighbor]) -> dict[IPv4Network, Route]:
        """The routes no peer sent: reachableBy peers', over the floating IPs' (a node that
        programs routes is a node with pods)."""
        floating = self.floating_ips() if self.routes is not None else {}
        return {**policy.floating_routes(floating), **policy.peer_routes(neighbors)}

    def _next_hop_self_warnings(self, me: NodeRecord, neighbors: list[Neighbor]) -> list[str]:
        """nextHopMode Self draws a member's traffic to this reflector: one that programs no
        routes (pipit-rr) drops it."""
        drawn = sorted(n.name or str(n.address) for n in neighbors
                       if n.next_hop_self and n.peer_as == n.local_as)  # reflected to
        if not drawn or self.routes is not None or me.route_reflector_cluster_id is None:
            return []
        return [f"nextHopMode Self sends {', '.join(drawn)} this reflector's address as next "
                "hop, but it programs no routes (pipit-rr): their traffic to pods would stop "
                "here (use Self only on reflectors that are nodes, or Auto)"]

    def _look_up(self, far: frozenset[IPv4Address]
                 ) -> dict[IPv4Address, tuple[NextHop, ...] | None]:
        """What each far gateway resolves to through the kernel's routes (recursive.through);
        one lookup each, in a worker thread, holding _kernel_lock."""
        return {gateway: recursive.through(self.routes.kernel.lookup(gateway))
                for gateway in sorted(far)}

    def _note_underlay(self, underlay: dict[IPv4Address, tuple[NextHop, ...] | None]) -> None:
        for gateway, hops in underlay.items():
            if gateway in self._underlay and hops == self._underlay[gateway]:
                continue
            if hops is None:
                log.warning("next hop %s is on none of this node's links and no route of the "
                            "kernel leads to it: its routes cannot be installed", gateway)
            elif hops:
                log.info("next hop %s is on none of this node's links: its routes go via %s, "
                         "the kernel's route to it", gateway,
                         ", ".join(str(h.gateway) for h in hops))
        self._underlay = underlay
        self.status.underlay = {str(gateway): [str(h.gateway) for h in hops or ()]
                                for gateway, hops in underlay.items() if hops != ()}
        if underlay:
            self._watch_underlay.set()
        else:
            self._watch_underlay.clear()

    async def _follow_underlay(self) -> None:
        """While routes go via far next hops, look their gateways up again every
        UNDERLAY_CHECK_SECONDS: a pass follows when the kernel's way to one changed (the
        node's router failed over, a route was added), as BIRD follows its kernel table."""
        while True:
            await self._watch_underlay.wait()
            await asyncio.sleep(recursive.UNDERLAY_CHECK_SECONDS)
            seen = self._underlay
            if not seen or self.routes is None:
                continue
            async with self._kernel_lock:
                now = await asyncio.to_thread(self._look_up, frozenset(seen))
            if now != seen and seen is self._underlay:  # no pass looked again meanwhile
                self.changed.set()

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
        end_of_rib = []  # (neighbour, its session) to send End-of-RIB to, after our table
        for address, wanted in exports.items():
            state = peers.get(address)
            if state is None or state.state != "up":
                continue  # announced once the session is up (the speaker keeps adj-rib-out)
            have = self.speaker.announced.get(address, {})
            changed = [a for p, a in wanted.items() if have.get(p) != a]
            # what this node reflects is the reflection's to withdraw (while it reflects),
            # and a block of ours now another node's that it reflects is replaced by that
            # node's route, maybe still in flight: a withdrawal after it would remove it
            reflection = self.reflection
            mine = have if reflection is None else self.speaker.own.get(address, ())
            gone = [p for p in mine if p not in wanted
                    and (reflection is None or not reflection.reflects(address, p))]
            if changed:
                await self.speaker.announce(address, changed)
            if gone:
                await self.speaker.withdraw(address, gone)
            if self._eor_sent.get(address) != state.since and not self._reflector_waiting():
                end_of_rib.append((address, state.since))
        # End-of-RIB after our table, so a peer keeping our routes through a graceful restart
        # never flushes them early; asked of all at once (a reflector's 200 clients, one at a
        # time, held its pass ~0.3 s)
        results = await asyncio.gather(*(self.speaker.send_end_of_rib(a) for a, _ in end_of_rib),
                                       return_exceptions=True)
        for (address, since), result in zip(end_of_rib, results):
            if isinstance(result, SpeakerError):  # the session went down meanwhile: next pass
                log.warning("could not send End-of-RIB to %s: %s", address, result)
            elif isinstance(result, BaseException):
                raise result
            else:
                self._eor_sent[address] = since
        for address in set(self._eor_sent) - set(exports):
            del self._eor_sent[address]

    def _reflector_waiting(self) -> bool:
        """A reflector (re)starting holds its End-of-RIB back until its peers have sent their
        tables (within the start-up grace): a client keeping its routes through our restart
        would flush those we have not relearnt yet."""
        return (self.reflection is not None and self.reflection.waiting_for_end_of_rib()
                and self.clock() < self._grace_until)

    def _update_status(self, neighbors: list[Neighbor], imports: Mapping, exports: Mapping
                       ) -> None:
        peers = []
        counters = read_drop_counters() if neighbors else {}
        not_up = False
        for neighbor in neighbors:
            state = self.speaker.peers.get(neighbor.address)
            result = imports.get(neighbor.address)
            up = state is not None and state.state == "up"
            not_up |= not up
            reason = state.reason if state else ""
            diagnosis = self.drops.diagnose(neighbor, up, counters)
            if diagnosis:
                reason = diagnosis + (f" (the last session ended: {reason})" if reason else "")
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
                stale=self.graceful_restart.stale(neighbor.address),
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
        self.drops.keep_only({n.address for n in neighbors})
        self.status.peers = sorted(peers, key=lambda p: (p.neighbor.address, p.state))
        me = self.node_record()
        self.status.route_reflector_cluster_id = str(me.route_reflector_cluster_id or "")
        in_pool = node_in_pool(me, self.pools.items.values())
        self.status.warnings = [*policy.reflector_warnings(me, self.nodes.items.values(),
                                                           neighbors),
                                *self._selection_warnings,
                                *self._next_hop_self_warnings(me, neighbors),
                                *([f"node {me.name}: {in_pool} (meanwhile an IPReservation "
                                   f"of {me.address.ip} keeps it from pods)"] if in_pool
                                  else [])]
        self.status.exported = len(next(iter(exports.values()), {})) if exports else 0
        if not_up and self.clock() >= self._diagnose_at:
            self._diagnose_at = self.clock() + DIAGNOSE_SECONDS
            self._wake_at(self._diagnose_at)
