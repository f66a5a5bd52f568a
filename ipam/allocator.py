"""The allocator: hands out and takes back a node's addresses, batching concurrent requests.

Requests for one node go through that node's queue. A worker takes everything waiting (up to
`batch_limit`), decides all of it against a cached view of the node's blocks, and commits the
result as ONE etcd transaction that compares the mod_revision of every block, handle, pool
and setting the decision read. Many pods starting at once therefore cost one transaction, not
a storm of compare-and-swap conflicts; and if anything moved underneath (another process
borrowing from our block, a pool being disabled), the transaction fails, hands back the
current values, and the batch is decided again.

New blocks are claimed (two-phase, see claim.py) when the node's blocks are full and it holds
fewer than maxBlocksPerHost; past that, and unless strictAffinity is set, free addresses are
borrowed from other nodes' blocks.

A caller that gives up (cancelled: the CNI plugin's deadline passed) keeps nothing: a request
not yet decided is dropped, and addresses committed for it are released again. A batch whose
transaction went out without an answer coming back (etcd paused or restarted) is settled
before anything else of the node's: its outcome is learnt from etcd (txn.outcome), so every
caller still waiting is told the truth, the addresses or a retry on fresh reads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from ipam import block as blocks
from ipam import handle as handles
from ipam import keys
from ipam.block import Block
from ipam.claim import BlockClaim, PoolChanged, settle_affinity
from ipam.config import IPAMConfig, config_from_document
from ipam.errors import (Conflict, DatastoreUnavailable, InvalidResource, NotFound, PipitError,
                         PoolExhausted)
from ipam.handle import Handle, check_handle_id
from ipam.metrics import ETCD_GAVE_UP
from ipam.pool import LOAD_BALANCER, TUNNEL, WORKLOAD, IPPool, read_pools, unclaimed_blocks
from ipam.release import stage_block, stage_handle
from ipam.reservation import Reserved, read_reservations, reserved_by
from ipam.store import Entry, Store
from ipam.txn import MAX_ATTEMPTS, TXN_KEY_BUDGET, Changes, outcome

log = logging.getLogger(__name__)

# What each use of an address is called in a refusal
_WHAT = {WORKLOAD: "pod", TUNNEL: "tunnel", LOAD_BALANCER: "load-balancer"}
MAX_REASONS = 5  # pools a "no pool selects" sentence says why of
_SETTINGS_KEYS = 3  # what every batch's transaction compares: IPAM settings, fence, reservations
# What a request is refused for that fresher pools or settings may grant (see _serve).
REFUSALS = (NotFound, PoolExhausted)


@dataclass(frozen=True)
class AssignRequest:
    handle_id: str
    count: int = 1
    attributes: Mapping[str, str] = field(default_factory=dict)
    pools: tuple[str, ...] = ()  # by name; empty: every enabled pool that selects the node
    reuse: bool = False  # if the handle already holds addresses, answer with those (idempotent)
    addresses: tuple[IPv4Address, ...] = ()  # these addresses, not any free ones
    use: str = WORKLOAD  # a pod's, a tunnel's or a service's: the pools' allowedUses
    # its namespace's labels (a pod's, a service's), for namespaceSelector (None: not known)
    namespace_labels: Mapping[str, str] | None = None


@dataclass(frozen=True)
class ReleaseRequest:
    handle_id: str
    owed: bool = False  # taking back what was committed for a caller that gave up


Request = AssignRequest | ReleaseRequest
Item = tuple[Request, asyncio.Future]  # a queued request and its caller's future


def _may_be_granted(request: Request, result: object) -> bool:
    """Whether a refusal may be undone by fresher reads: a refusal as such, and an address
    asked for by value refused by its pool (not in one, disabled, not for this use) or its
    block (taken), as the cached view had them."""
    return isinstance(result, REFUSALS) or (
        isinstance(result, InvalidResource) and isinstance(request, AssignRequest)
        and bool(request.addresses))


@dataclass
class NodeView:
    """What one node's allocator believes etcd holds, each value with its mod_revision."""
    node: str
    pools: dict[str, tuple[IPPool, int]] = field(default_factory=dict)
    config: IPAMConfig = IPAMConfig()
    config_revision: int = 0
    fence_revision: int = 0  # of keys.fence_key(node), which every batch compares
    # the IPReservations, and the revision they were listed at: a batch that assigns on its
    # own commits only if none was written since
    reserved: Reserved = Reserved()
    reserved_revision: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    blocks: dict[IPv4Network, tuple[Block, int]] = field(default_factory=dict)  # confirmed, ours
    handles: dict[str, tuple[Handle, int]] = field(default_factory=dict)
    loaded_at: float = 0.0
    stale: bool = False  # a pool or the settings changed: reload before deciding again
    _block_pools: dict[IPv4Network, str | None] = field(default_factory=dict)
    # Blocks known to exist (anyone's), for finding an unclaimed one without listing every
    # block key per claim; a lost race adds to it, the periodic reload starts it afresh.
    known_blocks: set[IPv4Network] | None = None

    def pool_of(self, cidr: IPv4Network) -> str | None:
        """The name of the pool a block lies in (cached: blocks do not move)."""
        name = self._block_pools.get(cidr)
        if name is None:
            name = next((p.name for p, _ in self.pools.values() if cidr.subnet_of(p.cidr)), None)
            self._block_pools[cidr] = name
        return name

    def keys_of(self, addresses: Iterable[IPv4Address]) -> int:
        """How many keys a request for `addresses` adds to a batch's transaction: each block
        and pool they lie in, and the handle (those in no pool are refused, adding none)."""
        found: set[tuple[str, IPv4Network]] = set()
        for address in addresses:
            pool = next((p for p, _ in self.pools.values() if address in p.cidr), None)
            if pool is not None:
                found.add((pool.name, IPv4Network((address, pool.block_size), strict=False)))
        return len(found) + len({name for name, _ in found}) + 1

    def keys_to_release(self, handle_id: str) -> int:
        """How many keys freeing a handle adds to a batch's transaction: its blocks and
        itself (as last read)."""
        held = self.handles.get(handle_id)
        return len(held[0].blocks) + 1 if held else 1

    def eligible_pools(self, names: Sequence[str], use: str = WORKLOAD,
                       namespace_labels: Mapping[str, str] | None = None) -> list[IPPool]:
        """The pools a request for `use` (Workload, Tunnel, LoadBalancer) may use, or one
        sentence saying why there are none. A pool the request names is used whatever its
        nodeSelector and assignmentMode say (as in Calico: that is how a `nodeSelector:
        "!all()"` or Manual pool serves only the pods that ask for it), if its allowedUses
        has `use`; the selectors (nodeSelector, and a pod's or service's namespace for
        namespaceSelector) pick the pools of requests that name none, among the Automatic
        ones."""
        if names:
            chosen = []
            for name in names:
                if name not in self.pools:
                    raise NotFound(f"IP pool {name!r} does not exist.")
                pool = self.pools[name][0]
                if pool.disabled:
                    raise PoolExhausted(f"IP pool {name!r} is disabled.")
                if use not in pool.allowed_uses:
                    raise PoolExhausted(f"IP pool {name!r} does not give {_WHAT[use]} addresses "
                                        f"(its allowedUses has no {use}).")
                chosen.append(pool)
            return chosen
        chosen = sorted((p for p, _ in self.pools.values()
                         if p.serves(use, self.labels, namespace_labels)), key=lambda p: p.name)
        if not chosen:
            why = [f"{name!r}: {pool.why_not(use, self.labels, namespace_labels)}"
                   for name, (pool, _) in sorted(self.pools.items())][:MAX_REASONS]
            raise NotFound(
                f"no enabled IP pool selects node {self.node} for {_WHAT[use]} addresses"
                + (f" (pool {'; '.join(why)}{'; ...' if len(self.pools) > MAX_REASONS else ''});"
                   " change one with `pipitctl apply`." if why
                   else "; create one with `pipitctl apply`."))
        return chosen


class _Plan:
    """One batch's working copies of blocks and handles, on top of the node's view."""

    def __init__(self, view: NodeView):
        self.view = view
        self.revisions: dict[str, int] = {}  # every key the decisions read, at its revision
        self.blocks: dict[IPv4Network, Block] = {}  # changed blocks
        self.handles: dict[str, Handle] = {}  # changed handles
        # Other nodes' (or unowned) blocks read for releases and borrowing.
        self.foreign: dict[IPv4Network, tuple[Block, int]] = {}
        self.listed_all = False
        self.fresh: set[str] = set()  # handles given new addresses (not ones they held)
        self.reserved = Reserved()  # what automatic assignments must skip (IPReservations)

    def peek_block(self, cidr: IPv4Network, source: Mapping | None = None) -> Block | None:
        """The working copy of a block, without making the decision depend on it."""
        if cidr in self.blocks:
            return self.blocks[cidr]
        found = (source or self.view.blocks).get(cidr)
        return None if found is None else found[0]

    def read_block(self, cidr: IPv4Network, source: Mapping | None = None) -> Block | None:
        if cidr in self.blocks:
            return self.blocks[cidr]
        found = (source or self.view.blocks).get(cidr)
        if found is None:
            return None
        self.revisions.setdefault(keys.block_key(cidr), found[1])
        return found[0]

    def read_handle(self, handle_id: str) -> Handle:
        if handle_id in self.handles:
            return self.handles[handle_id]
        handle, revision = self.view.handles.get(handle_id, (Handle(handle_id), 0))
        self.revisions.setdefault(keys.handle_key(handle_id), revision)
        return handle

    def stage(self, changes: Changes) -> None:
        for key, revision in self.revisions.items():
            changes.saw(key, revision)
        for block in self.blocks.values():
            stage_block(changes, block)
        for handle in self.handles.values():
            stage_handle(changes, handle)


class IPAM:
    """Address management for any number of nodes over one etcd connection."""

    def __init__(self, store: Store, batch_limit: int = 50, refresh_seconds: float = 10.0,
                 clock=time.time):
        """`clock`: Unix time, for ipCooldownSeconds (a test may pass its own)."""
        self.store = store
        self.clock = clock
        self.batch_limit = batch_limit
        self.refresh_seconds = refresh_seconds
        self._views: dict[str, NodeView] = {}
        self._queues: dict[str, list[Item]] = {}
        self._workers: dict[str, asyncio.Task] = {}  # the task serving each node's queue
        # Handles whose callers gave up after their addresses were committed: released
        # before anything else of the node's, until that succeeds.
        self._owed: dict[str, set[str]] = {}
        self.transactions = 0  # committed batch transactions, for tests and benchmarks

    # -- the public operations -------------------------------------------------------------

    async def assign(self, node: str, handle_id: str, count: int = 1,
                     attributes: Mapping[str, str] | None = None,
                     pools: Iterable[str] = (), reuse: bool = False,
                     addresses: Iterable[IPv4Address] = (), use: str = WORKLOAD,
                     namespace_labels: Mapping[str, str] | None = None) -> list[IPv4Address]:
        """Allocate `count` addresses for the handle on this node; all or nothing, from
        pools whose allowedUses has `use` (Workload: a pod's, Tunnel: a tunnel's,
        LoadBalancer: a service's) and, for a pod or a service, whose namespaceSelector its
        namespace's labels match. With
        `reuse`, a handle that already holds addresses gets those back instead. With
        `addresses`, exactly those (a block not claimed yet is claimed for this node; one of
        another node's is borrowed from): one that lies in no pool or is not free fails the
        whole request. Cancelling the caller leaves nothing allocated for it."""
        check_handle_id(handle_id)
        addresses = tuple(dict.fromkeys(addresses))
        if addresses:
            count = len(addresses)
        if not isinstance(count, int) or count < 1:
            raise InvalidResource(f"the number of addresses must be 1 or more, not {count!r}.")
        attrs = {"node": node, **(attributes or {})}
        return await self._submit(node, AssignRequest(handle_id, count, attrs, tuple(pools),
                                                      reuse, addresses, use,
                                                      namespace_labels))

    async def release(self, node: str, handle_id: str) -> list[IPv4Address]:
        """Free every address of the handle (batched with the node's other requests)."""
        check_handle_id(handle_id)
        return await self._submit(node, ReleaseRequest(handle_id))

    async def addresses(self, handle_id: str) -> list[IPv4Address]:
        """The addresses a handle holds now (empty if the handle is unknown)."""
        entry = await self.store.get(keys.handle_key(check_handle_id(handle_id)))
        return (await self._read_held([entry]))[handle_id] if entry is not None else []

    async def addresses_under(self, prefix: str) -> dict[str, list[IPv4Address]]:
        """The addresses of every handle whose id starts with `prefix`, in two reads."""
        return await self._read_held(await self.store.list(keys.HANDLES + prefix))

    async def _read_held(self, entries: Iterable[Entry]) -> dict[str, list[IPv4Address]]:
        held = {e.key.removeprefix(keys.HANDLES): handles.from_json(e.value) for e in entries}
        found = await self.store.get_many({keys.block_key(IPv4Network(c))
                                           for h in held.values() for c in h.blocks})
        read = {key: blocks.from_json(e.value) for key, e in found.items() if e is not None}
        return {handle_id: sorted(a for c in handle.blocks
                                  if (block := read.get(keys.block_key(IPv4Network(c))))
                                  for a in blocks.addresses_of(block, handle_id))
                for handle_id, handle in held.items()}

    # -- batching ------------------------------------------------------------------------

    async def _submit(self, node: str, request: Request):
        """Queue the request for the node's worker and wait for its outcome. Cancelling the
        wait cancels the future, which the worker sees: see _serve_batch."""
        future = asyncio.get_running_loop().create_future()
        self._queues.setdefault(node, []).append((request, future))
        self._wake(node)
        return await future

    def _wake(self, node: str) -> None:
        if node not in self._workers:
            self._workers[node] = asyncio.create_task(self._work(node),
                                                      name=f"pipit-ipam-{node}")

    async def _work(self, node: str) -> None:
        """Serve the node's queue, a batch at a time, until it and the owed releases are
        done; after a batch that failed, wait a little before retrying owed releases."""
        queue = self._queues[node]
        owed = self._owed.setdefault(node, set())
        batch: list[Item] = []
        pause = 0.0
        try:
            while queue or owed:
                if owed and pause:
                    await asyncio.sleep(pause)
                loop = asyncio.get_running_loop()
                batch = [(ReleaseRequest(h, owed=True), loop.create_future()) for h in owed]
                room = max(1, self.batch_limit - len(batch))
                batch += [item for item in queue[:room] if not item[1].done()]
                del queue[:room]
                failed = await self._serve_batch(node, batch)
                pause = min(pause * 2 or 0.1, 2.0) if failed else 0.0
        except asyncio.CancelledError:  # the agent is stopping: their fate is for a retry
            for request, future in batch + queue:
                if not future.done() and not getattr(request, "owed", False):
                    future.set_exception(Conflict(
                        f"the request on node {node} was interrupted; try again."))
            queue.clear()
            raise
        finally:
            del self._workers[node]

    async def _serve_batch(self, node: str, batch: list[Item]) -> bool:
        """Decide and commit a batch, answer its callers, queue again what did not fit, and
        owe a release for every handle given new addresses whose callers have all gone.
        Returns whether the batch failed as a whole (etcd away)."""
        queue, owed = self._queues[node], self._owed[node]
        try:
            decided, fresh = await self._serve(node, batch)
            failed = False
        except Exception as error:  # etcd unavailable, conflicts: every request fails alike
            decided, fresh, failed = [(item, error) for item in batch], set(), True
        served = {id(future) for (_, future), _ in decided}
        queue[:0] = [(request, future) for request, future in batch  # did not fit: next
                     if id(future) not in served and not getattr(request, "owed", False)]
        waiting = {request.handle_id for (request, future), _ in decided
                   if isinstance(request, AssignRequest) and not future.done()}
        for (request, future), result in decided:
            if isinstance(request, ReleaseRequest) and request.owed:
                if not isinstance(result, BaseException):
                    owed.discard(request.handle_id)
                    log.info("released %s on node %s: its caller had given up",
                             request.handle_id, node)
            elif not future.done():
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
            elif (isinstance(request, AssignRequest) and request.handle_id in fresh
                  and request.handle_id not in waiting and not isinstance(result, BaseException)):
                owed.add(request.handle_id)  # committed for a caller that is gone
        return failed

    async def _serve(self, node: str, batch: list[Item]) -> tuple[list[tuple[Item, object]],
                                                                  set[str]]:
        """Decide and commit the batch's requests whose callers still wait (a prefix of them
        if they would not fit in one etcd transaction); returns each decided item with its
        outcome, an address list or an error, and the handles given new addresses."""
        for _ in range(MAX_ATTEMPTS):
            live = [item for item in batch if not item[1].done()]
            if not live:
                return [], set()
            named = {p for r, _ in live if isinstance(r, AssignRequest) for p in r.pools}
            cached = self._views.get(node)
            view = await self._view(node, named)
            plan = _Plan(view)
            automatic = any(isinstance(r, AssignRequest) and not r.addresses for r, _ in live)
            if automatic:
                plan.reserved = view.reserved
            await self._prefetch_handles(plan, [request for request, _ in live])
            decided: list[tuple[Item, object]] = []
            for item in live:
                request = item[0]
                # a request for addresses, or to free a handle, in many blocks needs many
                # keys: then it waits for a transaction of its own
                wanted = (view.keys_of(request.addresses)
                          if isinstance(request, AssignRequest) and request.addresses
                          else view.keys_to_release(request.handle_id)
                          if isinstance(request, ReleaseRequest) else 0)
                if decided and len(plan.revisions) + wanted >= TXN_KEY_BUDGET:
                    break
                try:
                    if isinstance(request, AssignRequest):
                        decided.append((item, await self._plan_assign(plan, request)))
                    else:
                        decided.append((item, self._plan_release(plan, request)))
                except PipitError as error:
                    decided.append((item, error))
                except PoolChanged:
                    break  # the batch is decided again on the fresh view
            if view is cached and any(_may_be_granted(item[0], result)
                                      for item, result in decided):
                # A refusal commits nothing, so no transaction would tell that the pools or
                # settings it was decided on are old (a pool created or enabled since):
                # confirm it on fresh reads.
                view.stale = True
                continue
            changes = Changes(self.store)
            plan.stage(changes)
            if changes.empty:
                return decided, plan.fresh
            changes.saw(keys.IPAM_CONFIG, view.config_revision)
            changes.saw(keys.fence_key(node), view.fence_revision)
            if automatic:
                changes.saw_prefix(keys.RESERVATIONS, view.reserved_revision)
            try:
                result = await changes.commit()
            except DatastoreUnavailable as error:
                if not error.maybe_written:
                    raise
                log.warning("node %s: %s; learning whether the batch was committed", node, error)
                if await self._settle(node, view, plan, changes):
                    return decided, plan.fresh
                continue  # not committed, and now it never will be: decide again
            if result.succeeded:
                self.transactions += 1
                self._remember(view, plan, result.revision)
                return decided, plan.fresh
            self._absorb(view, result.current)
            if keys.RESERVATIONS in result.current_prefixes:
                view.reserved = reserved_by(read_reservations(
                    result.current_prefixes[keys.RESERVATIONS]))
                view.reserved_revision = result.revision
        ETCD_GAVE_UP.inc()
        raise Conflict(f"allocation on node {node} kept colliding with concurrent changes after "
                       f"{MAX_ATTEMPTS} attempts; try again.")

    async def _settle(self, node: str, view: NodeView, plan: _Plan, changes: Changes) -> bool:
        """Whether the batch's transaction, whose answer was lost, was committed: the handles
        it wrote (which only this node's batches write; every batch writes one) are its
        witnesses. Either way the cache no longer knows the revisions: read again."""
        written = {key: changes.puts.get(key) for key in (*changes.puts, *changes.deletes)}
        written = {k: v for k, v in written.items() if k.startswith(keys.HANDLES)} or written
        committed = await outcome(self.store, keys.fence_key(node), written)
        log.warning("node %s: the batch of %d handle(s) was %scommitted", node, len(written),
                    "" if committed else "not ")
        view.stale = True
        for handle_id in plan.handles:
            view.handles.pop(handle_id, None)
        if committed:
            self.transactions += 1
        return committed

    # -- deciding ------------------------------------------------------------------------

    async def _plan_assign(self, plan: _Plan, request: AssignRequest) -> list[IPv4Address]:
        view = plan.view
        if request.reuse:
            held = self._held(plan, request.handle_id)
            if held:
                return held
        if request.addresses:
            return await self._plan_assign_addresses(plan, request)
        pools = view.eligible_pools(request.pools, request.use, request.namespace_labels)
        for pool in pools:  # the decision depends on each pool as the view read it
            plan.revisions.setdefault(keys.pool_key(pool.name), view.pools[pool.name][1])
        taken: dict[IPv4Network, Block] = {}  # this request's changes, merged only if complete
        got: list[IPv4Address] = []

        reserved = plan.reserved
        now, cooldown = self.clock(), view.config.ip_cooldown_seconds

        def take(cidr: IPv4Network, block: Block) -> None:
            skip = reserved.ordinals(cidr) if reserved else frozenset()
            if cooldown:
                skip = skip | blocks.cooling(block, now, cooldown)
            updated, addresses = blocks.assign(block, request.count - len(got), request.handle_id,
                                               request.attributes, skip)
            if addresses:
                taken[cidr] = updated
                got.extend(addresses)

        names = {p.name for p in pools}

        def in_pools(cidr: IPv4Network) -> bool:
            return view.pool_of(cidr) in names

        for cidr, (block, _) in view.blocks.items():
            if len(got) == request.count:
                break
            if plan.blocks:
                block = plan.blocks.get(cidr, block)
            # Skipping a full block needs no check that it is still full: only blocks we
            # take from are compared in the transaction.
            if block.free and in_pools(cidr):
                take(cidr, plan.read_block(cidr))
        while (len(got) < request.count and view.config.auto_allocate_blocks
               and len(view.blocks) < view.config.block_limit):
            claimed = await self._claim(view, pools, reserved)
            if claimed is None:
                break
            take(claimed, plan.read_block(claimed))
        if len(got) < request.count and not view.config.strict_affinity:
            for cidr in sorted(await self._borrowable(plan)):
                if len(got) == request.count:
                    break
                if in_pools(cidr) and plan.peek_block(cidr, plan.foreign).free:
                    take(cidr, plan.read_block(cidr, plan.foreign))
        if len(got) < request.count:
            raise PoolExhausted(self._exhausted(view, pools, request.count, now))
        plan.blocks.update(taken)
        handle = plan.read_handle(request.handle_id)
        for cidr, block in taken.items():
            added = sum(1 for a in got if a in cidr)
            handle = handles.add(handle, str(cidr), added)
        plan.handles[request.handle_id] = handle
        plan.fresh.add(request.handle_id)
        return got

    async def _plan_assign_addresses(self, plan: _Plan, request: AssignRequest
                                     ) -> list[IPv4Address]:
        view = plan.view
        if view.keys_of(request.addresses) + _SETTINGS_KEYS > TXN_KEY_BUDGET:
            raise InvalidResource(
                f"the {len(request.addresses)} addresses asked for lie in more blocks than one "
                f"etcd transaction can take at once (about {TXN_KEY_BUDGET - _SETTINGS_KEYS - 2} "
                "of one pool): ask for fewer, or for addresses in fewer blocks.")
        taken: dict[IPv4Network, Block] = {}
        for address in request.addresses:
            pool = next((p for p, _ in view.pools.values() if address in p.cidr), None)
            if pool is None:
                raise InvalidResource(f"{address} is not in any IP pool.")
            if pool.disabled:
                raise InvalidResource(f"{address} is in IP pool {pool.name!r}, which is "
                                      "disabled.")
            if request.use not in pool.allowed_uses:
                raise InvalidResource(f"{address} is in IP pool {pool.name!r}, which gives no "
                                      f"{_WHAT[request.use]} addresses (its allowedUses has no "
                                      f"{request.use}).")
            plan.revisions.setdefault(keys.pool_key(pool.name), view.pools[pool.name][1])
            cidr = IPv4Network((address, pool.block_size), strict=False)
            block = taken.get(cidr) or await self._block_at(plan, pool, cidr)
            try:
                taken[cidr] = blocks.assign_address(block, address, request.handle_id,
                                                    request.attributes)
            except ValueError as error:
                raise InvalidResource(f"{error}.") from None
        plan.blocks.update(taken)
        handle = plan.read_handle(request.handle_id)
        for cidr in taken:
            handle = handles.add(handle, str(cidr), sum(1 for a in request.addresses
                                                          if a in cidr))
        plan.handles[request.handle_id] = handle
        plan.fresh.add(request.handle_id)
        return sorted(request.addresses)

    async def _block_at(self, plan: _Plan, pool: IPPool, cidr: IPv4Network) -> Block:
        """The block `cidr` as this batch sees it: ours, another node's (read), or claimed
        for this node now."""
        view = plan.view
        if cidr in plan.blocks or cidr in view.blocks:
            return plan.read_block(cidr)
        if cidr not in plan.foreign:
            entry = await self.store.get(keys.block_key(cidr))
            if entry is None:
                try:
                    claimed = await BlockClaim(self.store, view.node, pool,
                                               view.pools[pool.name][1], cidr).run()
                except PoolChanged:
                    view.stale = True
                    raise
                if claimed is not None:
                    view.blocks[cidr] = claimed
                    log.info("node %s claimed block %s in pool %s for a requested address",
                             view.node, cidr, pool.name)
                    return plan.read_block(cidr)
                entry = await self.store.get(keys.block_key(cidr))  # someone else was faster
            if entry is None:
                raise Conflict(f"block {cidr} changed while being claimed; try again.")
            plan.foreign[cidr] = (blocks.from_json(entry.value), entry.mod_revision)
        return plan.read_block(cidr, plan.foreign)

    @staticmethod
    def _exhausted(view: NodeView, pools: list[IPPool], count: int, now: float) -> str:
        names = ", ".join(repr(p.name) for p in pools)
        held = len(view.blocks)
        why = (f"node {view.node} holds {held} blocks (maxBlocksPerHost "
               f"{view.config.block_limit})" if view.config.auto_allocate_blocks else
               f"node {view.node} holds {held} blocks and claims no more by itself "
               "(autoAllocateBlocks is false: an address asked for by value claims its block)")
        if view.config.strict_affinity:
            why += " and strictAffinity forbids borrowing"
        else:
            why += " and no other block has a free address"
        cooldown = view.config.ip_cooldown_seconds
        cooling = sum(len(blocks.cooling(block, now, cooldown))
                      for block, _ in view.blocks.values()) if cooldown else 0
        if cooling:
            why += (f" ({cooling} of its addresses were given back less than "
                    f"ipCooldownSeconds {cooldown} ago)")
        return f"IP pool {names} cannot provide {count} more address(es): {why}."

    async def _claim(self, view: NodeView, pools: list[IPPool],
                     reserved: Reserved = Reserved()) -> IPv4Network | None:
        """Claim a new block for the node in the first of `pools` that has one unclaimed,
        passing over blocks whose every address is reserved."""
        if view.known_blocks is None:
            view.known_blocks = {keys.block_cidr(k)
                                 for k in await self.store.list_keys(keys.BLOCKS)}
        existing = view.known_blocks
        for pool in pools:
            candidates = (c for c in unclaimed_blocks(pool, view.node, existing)
                          if not reserved.covers(c))
            for attempt, cidr in enumerate(candidates):
                if attempt >= 16:  # heavy contention: list again, let the caller retry
                    view.known_blocks = None
                    break
                claim = BlockClaim(self.store, view.node, pool, view.pools[pool.name][1], cidr)
                try:
                    claimed = await claim.run()
                except PoolChanged:
                    view.stale = True  # decide again on the pool as it is now
                    raise
                except DatastoreUnavailable:
                    view.stale = True  # the claim may be half done: settle it first
                    raise
                existing.add(cidr)  # ours now, or someone else's
                if claimed is not None:
                    view.blocks[cidr] = claimed
                    log.info("node %s claimed block %s in pool %s", view.node, cidr, pool.name)
                    return cidr
        return None

    async def _borrowable(self, plan: _Plan) -> list[IPv4Network]:
        """Blocks of other nodes (or of none) that have free addresses."""
        if not plan.listed_all:
            plan.listed_all = True
            for entry in await self.store.list(keys.BLOCKS):
                block = blocks.from_json(entry.value)
                if block.node != plan.view.node:
                    plan.foreign.setdefault(block.cidr, (block, entry.mod_revision))
        return [c for c, (b, _) in plan.foreign.items() if b.free]

    async def _prefetch_handles(self, plan: _Plan, requests: list[Request]) -> None:
        """Read the handles (and other nodes' blocks) that releases and idempotent assigns
        need: one round trip for all handles, one for all blocks."""
        view = plan.view
        # A handle cached from our own writes is good enough to release (the transaction
        # checks it); answering "you already have these" must not rest on a cache.
        wanted = [r.handle_id for r in requests
                  if isinstance(r, AssignRequest) and r.reuse
                  or isinstance(r, ReleaseRequest) and r.handle_id not in view.handles]
        found = await self.store.get_many(keys.handle_key(h) for h in wanted)
        for handle_id in wanted:
            entry = found[keys.handle_key(handle_id)]
            if entry is not None:
                view.handles[handle_id] = (handles.from_json(entry.value), entry.mod_revision)
            else:
                view.handles.pop(handle_id, None)
        foreign = {IPv4Network(c) for r in requests if r.handle_id in view.handles
                   for c in view.handles[r.handle_id][0].blocks} - set(view.blocks)
        for key, entry in (await self.store.get_many(keys.block_key(c) for c in foreign)).items():
            if entry is not None:
                plan.foreign[keys.block_cidr(key)] = (blocks.from_json(entry.value),
                                                      entry.mod_revision)
            else:
                plan.revisions.setdefault(key, 0)

    @staticmethod
    def _held(plan: _Plan, handle_id: str) -> list[IPv4Address]:
        """The addresses a handle holds as this batch sees them."""
        if handle_id not in plan.handles and handle_id not in plan.view.handles:
            return []
        handle = plan.read_handle(handle_id)
        held: list[IPv4Address] = []
        for cidr_text in handle.blocks:
            cidr = IPv4Network(cidr_text)
            block = plan.read_block(cidr) or plan.read_block(cidr, plan.foreign)
            if block is not None:
                held += blocks.addresses_of(block, handle_id)
        return sorted(held)

    def _plan_release(self, plan: _Plan, request: ReleaseRequest) -> list[IPv4Address]:
        if request.handle_id not in plan.view.handles and request.handle_id not in plan.handles:
            plan.revisions.setdefault(keys.handle_key(request.handle_id), 0)
            return []  # unknown handle: nothing to free (the caller's DEL is idempotent)
        freed: list[IPv4Address] = []
        now, cooldown = self.clock(), plan.view.config.ip_cooldown_seconds
        for cidr_text in plan.read_handle(request.handle_id).blocks:
            cidr = IPv4Network(cidr_text)
            block = plan.read_block(cidr) or plan.read_block(cidr, plan.foreign)
            if block is None:
                continue
            updated, done = blocks.release_handle(block, request.handle_id, now, cooldown)
            if done:
                plan.blocks[cidr] = updated
                freed += done
        plan.handles[request.handle_id] = Handle(request.handle_id)  # holds nothing now
        return freed

    # -- the cached view -----------------------------------------------------------------

    async def _view(self, node: str, named_pools: set[str] = frozenset()) -> NodeView:
        """The node's view, read afresh when it is old, stale, or does not know a pool a
        request names (one created since it was read)."""
        view = self._views.get(node)
        if view is None or view.stale or time.monotonic() - view.loaded_at > self.refresh_seconds \
                or not named_pools <= view.pools.keys():
            view = await self._load(node, view)
            self._views[node] = view
        return view

    async def _load(self, node: str, previous: NodeView | None) -> NodeView:
        view = NodeView(node, handles=previous.handles if previous else {})
        entries, view.reserved_revision = await self.store.list_with_revision(keys.RESERVATIONS)
        view.reserved = reserved_by(read_reservations(entries))
        for pool, revision in read_pools(await self.store.list(keys.POOLS)):
            view.pools[pool.name] = (pool, revision)
        found = await self.store.get_many([keys.IPAM_CONFIG, keys.node_key(node),
                                           keys.fence_key(node)])
        config, record = found[keys.IPAM_CONFIG], found[keys.node_key(node)]
        fence = found[keys.fence_key(node)]
        view.fence_revision = fence.mod_revision if fence else 0
        if config is not None:
            view.config = config_from_document(config.value)
            view.config_revision = config.mod_revision
        if record is not None:
            view.labels = dict((record.value.get("metadata") or {}).get("labels") or {})
        affinities = await self.store.list(keys.affinity_prefix(node))
        found = await self.store.get_many(keys.block_key(keys.affinity_parts(a.key)[1])
                                          for a in affinities)
        for affinity in affinities:
            cidr = keys.affinity_parts(affinity.key)[1]
            settled = await settle_affinity(self.store, node, affinity,
                                            found[keys.block_key(cidr)])
            if settled is not None:
                view.blocks[cidr] = settled
        view.loaded_at = time.monotonic()
        return view

    def _remember(self, view: NodeView, plan: _Plan, revision: int) -> None:
        for cidr, block in plan.blocks.items():
            if block.node == view.node:
                view.blocks[cidr] = (block, revision)
            else:
                view.blocks.pop(cidr, None)
        for handle_id, handle in plan.handles.items():
            if handle.total:
                view.handles[handle_id] = (handle, revision)
            else:
                view.handles.pop(handle_id, None)

    def _absorb(self, view: NodeView, current: Mapping[str, Entry | None]) -> None:
        """Take in the fresh values a failed transaction handed back."""
        for key, entry in current.items():
            if key.startswith(keys.BLOCKS):
                cidr = keys.block_cidr(key)
                block = blocks.from_json(entry.value) if entry else None
                if block is not None and block.node == view.node:
                    view.blocks[cidr] = (block, entry.mod_revision)
                else:
                    view.blocks.pop(cidr, None)
            elif key.startswith(keys.HANDLES):
                handle_id = key.removeprefix(keys.HANDLES)
                if entry is not None:
                    view.handles[handle_id] = (handles.from_json(entry.value), entry.mod_revision)
                else:
                    view.handles.pop(handle_id, None)
            elif key == keys.fence_key(view.node):  # another allocator of this node fenced
                view.fence_revision = entry.mod_revision if entry else 0
            elif (entry.mod_revision if entry else 0) != self._seen(view, key):
                view.stale = True

    @staticmethod
    def _seen(view: NodeView, key: str) -> int:
        if key == keys.IPAM_CONFIG:
            return view.config_revision
        for pool, revision in view.pools.values():
            if keys.pool_key(pool.name) == key:
                return revision
        return -1
