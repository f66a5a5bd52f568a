"""One IPAM GC pass of pipit-controller: an etcd snapshot and the informers' view of Nodes and
Pods through ipam.gc.plan (Calico's rules), then the I/O, each step re-validated just before:

- a confirmed leak on a node that still exists is checked once more with a direct GET of its
  pod (the informer may lag); an API error counts as "the pod may exist";
- a node is cleaned up only after a direct GET answers 404 for its Kubernetes Node and while
  no agent holds its name (bgp_agent.name_claim): its leaked and tunnel addresses released,
  its block affinities released (a block still holding other nodes' borrowed addresses
  stays, unowned), then its record deleted, comparing the revision the decision read;
- addresses go through ipam.release.release_leaks (sequence numbers: an address freed and
  handed out again since the snapshot is never taken), empty blocks through release_affinity
  with require_empty (a block that got an address meanwhile is kept).

A pass killed midway leaves nothing half-done: each etcd transaction is whole, and the next
pass decides again from etcd."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from bgp_agent.kube_api import KubeAPI, KubernetesUnavailable
from bgp_agent.name_claim import holder_of
from ipam import gc, keys
from ipam.errors import InUse, PipitError
from ipam.release import release_affinity, release_host_affinities, release_leaks
from ipam.snapshot import load_snapshot
from ipam.store import Store
from ipam.txn import Changes, transact

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    released: list[str] = field(default_factory=list)  # handles
    addresses: int = 0
    blocks: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    waiting: int = 0


class IPAMCollector:
    def __init__(self, store: Store, api: KubeAPI | None, grace: float,
                 clock=time.monotonic):
        self.store, self.api, self.grace, self.clock = store, api, grace, clock
        self.state = gc.State()

    async def run_pass(self, cluster: gc.Cluster) -> PassResult:
        snap = await load_snapshot(self.store)
        result = gc.plan(snap, cluster, self.state, self.clock(), self.grace)
        self.state = result.state
        outcome = PassResult(waiting=result.waiting)
        if result.kept:
            log.info("node(s) %s are gone from Kubernetes but still have addresses in use; "
                     "kept for now", ", ".join(result.kept))
        asked: dict[str, bool] = {}

        async def really_gone(node: str) -> bool:
            if node not in asked:
                asked[node] = await self._really_gone(snap, node)
            return asked[node]
        gone = {n for n in result.nodes if await really_gone(n)}
        leaks = []
        for leak in result.leaks:
            if gc.kubernetes_node(snap, leak.node) not in cluster.nodes:
                if not await really_gone(leak.node):
                    continue  # the Node is back (or could not be asked): not now
            elif not await self._still_leaked(leak, snap):
                continue
            leaks.append(leak)
        if leaks:
            released = set(await release_leaks(self.store, leaks))
            for leak in leaks:
                if leak.handle_id in released:
                    addresses = ", ".join(str(r.address) for r in leak.releases)
                    log.info("released %s (handle %s): %s", addresses, leak.handle_id,
                             leak.reason)
                    outcome.released.append(leak.handle_id)
                    outcome.addresses += len(leak.releases)
        for node, cidr in result.empty_blocks:
            try:
                done = await release_affinity(self.store, node, cidr, require_empty=True)
            except InUse:
                continue  # an address was taken from it meanwhile
            if done.released:
                log.info("released empty block %s of node %s", cidr, node)
                outcome.blocks.append(str(cidr))
        for node in sorted(gone):
            if await self._clean_node(node):
                outcome.nodes.append(node)
        return outcome

    async def _really_gone(self, snap, node: str) -> bool:
        """Whether `node` is gone: a direct GET answers 404 for its Kubernetes Node, and no
        agent runs it (holds its name claim: a Node deleted by hand, which its kubelet
        registers again, still has live pods, blocks and routes)."""
        name = gc.kubernetes_node(snap, node)
        if self.api is None or name is None:
            return False
        try:
            if await self.api.node(name) is not None:
                return False
            holder = holder_of(await self.store.get(keys.agent_key(node)))
        except (KubernetesUnavailable, PipitError) as error:
            log.warning("cannot confirm that node %s is gone: %s", node, error)
            return False
        if holder is not None:
            log.warning("node %s is gone from Kubernetes but its agent still runs, on %s: it "
                        "is cleaned up once that agent has stopped", node, holder.describe())
        return holder is None

    async def _still_leaked(self, leak: gc.Leak, snap) -> bool:
        """Ask the API for the pods of a leak whose node exists (the informer may lag)."""
        if self.api is None:
            return True
        allocations = [a for a in gc.allocations(snap) if a.handle_id == leak.handle_id]
        pods = {}
        for allocation in allocations:
            if allocation.namespace and allocation.pod:
                try:
                    found = await self.api.pod(allocation.namespace, allocation.pod)
                except KubernetesUnavailable as error:
                    log.warning("cannot check pod %s/%s before releasing its address: %s",
                                allocation.namespace, allocation.pod, error)
                    return False
                if found is not None:
                    pod = gc.pod_from_json(found)
                    pods[(pod.namespace, pod.name)] = pod
        return all(gc.invalid_reason(a, pods, gc.kubernetes_node(snap, a.node)) is not None
                   for a in allocations if not a.tunnel)

    async def _clean_node(self, node: str) -> bool:
        """A node gone from Kubernetes with nothing valid left: its affinities, then its
        record (the record last: a clean-up cut short is finished by the next pass)."""
        try:
            released = await release_host_affinities(self.store, node)
            entry = await self.store.get(keys.node_key(node))
            if entry is not None:
                async def decide(changes: Changes) -> None:
                    current = await changes.get(keys.node_key(node))
                    if current is not None and current.mod_revision == entry.mod_revision:
                        changes.delete(current.key)
                await transact(self.store, decide, f"deleting node {node}")
        except PipitError as error:
            log.warning("cleaning up node %s: %s", node, error)
            return False
        log.info("node %s is gone from Kubernetes: released %d block(s) (%d still in use by "
                 "other nodes' addresses stay, unowned) and deleted its record", node,
                 len(released.released), len(released.kept_in_use))
        return True
