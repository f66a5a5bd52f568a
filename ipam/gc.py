"""Leak garbage collection against Kubernetes: which addresses, blocks and nodes to give back,
decided over an IPAM snapshot and what the Kubernetes API says (pure: no I/O).

Calico's rules (kube-controllers' IPAM controller), which pipit-controller applies:

- Only nodes that belong to Kubernetes are judged: a node record without a Kubernetes node
  (`spec.orchRefs`) is outside Kubernetes and left alone; an allocation whose node has no
  record is taken to be on the Kubernetes Node of the same name.
- A pod's allocation (attributes `namespace` and `pod`) is valid while its pod exists, is on
  the allocation's node, and either has no IP reported yet or has this one (for a floating
  IP, the address it leads to). A pod evicted (phase Failed, reason Evicted) holds nothing.
  Any other allocation (no pod attributes, not a tunnel) is valid: its owner is unknown.
- An invalid allocation is a candidate leak; it is confirmed once it has been a candidate for
  the grace period, or at once when its node is gone from Kubernetes.
- Tunnel addresses are judged only by their node: they go when the node is cleaned up.
- A handle is released whole or not at all: only when every address it holds is confirmed.
  Each release names the address's sequence number, so an address freed and given to someone
  else since the snapshot is never taken (ipam.release.release_leaks re-validates).
- A node gone from Kubernetes is cleaned up (affinities released, record deleted) once
  nothing valid is left on it; its tunnel addresses go with it.
- A block affine to a node and empty is released only when seen empty in two consecutive
  passes, and never the node's last block.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from ipam.block import Release, floating_target
from ipam.pool import LOAD_BALANCER_NODE
from ipam.snapshot import Snapshot

DEFAULT_GRACE_SECONDS = 15 * 60.0


@dataclass(frozen=True)
class Allocation:
    """One address in use, as its block records it."""
    address: IPv4Address
    block: IPv4Network
    handle_id: str
    sequence: int | None
    node: str | None  # the node it was allocated for (attribute `node`)
    namespace: str | None = None
    pod: str | None = None
    tunnel: bool = False  # a node's IPIP / VXLAN tunnel address
    floating_for: IPv4Address | None = None  # a floating IP: the pod's address it leads to

    @property
    def key(self) -> tuple[str, IPv4Address, int | None]:
        """Names this allocation and no later one of the same address."""
        return self.handle_id, self.address, self.sequence


def allocations(snap: Snapshot) -> list[Allocation]:
    found = []
    for cidr, block in sorted(snap.blocks.items()):
        for ordinal, index in enumerate(block.allocations):
            if index is None:
                continue
            attribute = block.attributes[index]
            extra = attribute.secondary
            found.append(Allocation(
                block.address(ordinal), cidr, attribute.handle_id,
                block.seq_for_allocation.get(ordinal), extra.get("node") or None,
                extra.get("namespace") or None, extra.get("pod") or None,
                str(extra.get("type", "")).endswith("-tunnel"),
                floating_target(extra)))
    return found


@dataclass(frozen=True)
class Pod:
    """What the Kubernetes API says of a pod."""
    namespace: str
    name: str
    node: str | None = None  # spec.nodeName
    ips: frozenset[IPv4Address] = frozenset()  # status.podIPs
    evicted: bool = False  # status.phase Failed with reason Evicted


@dataclass(frozen=True)
class Cluster:
    """The Kubernetes side of a GC pass: the Nodes that exist and the pods, by (ns, name)."""
    nodes: frozenset[str]
    pods: Mapping[tuple[str, str], Pod]


def kubernetes_node(snap: Snapshot, node: str | None) -> str | None:
    """The Kubernetes Node a Pipit node belongs to; None for a node outside Kubernetes (and
    for the load balancers' virtual node, whose addresses controller.load_balancer keeps)."""
    if node is None or node == LOAD_BALANCER_NODE:
        return None
    if node in snap.kubernetes_nodes:
        return snap.kubernetes_nodes[node]
    return node  # no record: Pipit names nodes as Kubernetes does


def invalid_reason(allocation: Allocation, pods: Mapping[tuple[str, str], Pod],
                   kube_node: str | None) -> str | None:
    """Why a pod's allocation is no longer its pod's (None: it is, or cannot be judged)."""
    if allocation.tunnel or not allocation.namespace or not allocation.pod:
        return None
    pod = pods.get((allocation.namespace, allocation.pod))
    where = f"pod {allocation.namespace}/{allocation.pod}"
    if pod is None:
        return f"{where} does not exist"
    if pod.node and kube_node and pod.node != kube_node:
        return f"{where} runs on node {pod.node}, not {kube_node}"
    if pod.evicted:
        return f"{where} was evicted"
    if not pod.ips:
        return None  # its IP is not reported yet
    own = allocation.floating_for or allocation.address  # a floating IP: the pod's it leads to
    if own not in pod.ips:
        return f"{where} has {', '.join(map(str, sorted(pod.ips)))}, not {own}"
    return None


@dataclass(frozen=True)
class Leak:
    """A handle to release whole: every address it holds, each with its sequence number."""
    handle_id: str
    releases: tuple[Release, ...]
    reason: str
    node: str | None = None
    blocks: tuple[IPv4Network, ...] = ()  # where the addresses are


@dataclass(frozen=True)
class State:
    """What a pass hands to the next: since when each candidate leak has been one (keyed by
    Allocation.key), and the blocks seen empty."""
    candidates: Mapping[tuple[str, IPv4Address, int | None], float] = field(
        default_factory=dict)
    empty_blocks: frozenset[IPv4Network] = frozenset()


@dataclass(frozen=True)
class Plan:
    leaks: tuple[Leak, ...]  # handles to release now
    waiting: int  # candidate leaks still within the grace period
    empty_blocks: tuple[tuple[str, IPv4Network], ...]  # (node, block) affinities to release
    nodes: tuple[str, ...]  # Pipit nodes gone from Kubernetes, to clean up
    kept: tuple[str, ...]  # nodes gone from Kubernetes that still have valid allocations
    state: State


def plan(snap: Snapshot, cluster: Cluster, state: State, now: float,
         grace: float = DEFAULT_GRACE_SECONDS) -> Plan:
    """One GC pass: what to release now, and the state for the next pass."""
    found = allocations(snap)
    by_handle: dict[str, list[Allocation]] = defaultdict(list)
    for allocation in found:
        by_handle[allocation.handle_id].append(allocation)

    def kube(node: str | None) -> str | None:
        return kubernetes_node(snap, node)

    def gone(node: str | None) -> bool:
        name = kube(node)
        return name is not None and name not in cluster.nodes

    # Every Pipit node IPAM knows of, whether it is gone, and whether anything valid is on it.
    nodes = ({n for n, _ in snap.affinities} | {b.node for b in snap.blocks.values() if b.node}
             | {a.node for a in found if a.node} | set(snap.nodes))
    blocked: set[str] = set()  # nodes with an allocation that is valid or of unknown owner
    confirmed: set[tuple] = set()
    candidates: dict[tuple, float] = {}
    reasons: dict[tuple, str] = {}
    for allocation in found:
        if allocation.node is None or kube(allocation.node) is None:
            continue  # not Kubernetes': never judged
        if allocation.tunnel:
            continue  # judged with its node below
        reason = invalid_reason(allocation, cluster.pods, kube(allocation.node))
        if reason is None:
            blocked.add(allocation.node)
            continue
        reasons[allocation.key] = reason
        if gone(allocation.node):
            confirmed.add(allocation.key)
            continue
        since = state.candidates.get(allocation.key, now)
        candidates[allocation.key] = since
        if now - since >= grace:
            confirmed.add(allocation.key)
    cleaned = tuple(sorted(n for n in nodes if gone(n) and n not in blocked))
    kept = tuple(sorted(n for n in nodes if gone(n) and n in blocked))
    for allocation in found:
        if allocation.tunnel and allocation.node in cleaned:
            confirmed.add(allocation.key)
            reasons[allocation.key] = f"node {allocation.node} is gone"

    leaks = []
    for handle_id, held in sorted(by_handle.items()):
        if all(a.key in confirmed for a in held):
            first = held[0]
            leaks.append(Leak(handle_id, tuple(Release(a.address, a.sequence, handle_id)
                                               for a in held),
                              reasons[first.key], first.node,
                              tuple(sorted({a.block for a in held}))))
    released = {a.key for leak in leaks for a in by_handle[leak.handle_id]}
    waiting = sum(1 for key in candidates if key not in released)

    # Empty blocks: released on the second sighting in a row, never a node's last one.
    per_node: dict[str, list[IPv4Network]] = defaultdict(list)
    for cidr, block in sorted(snap.blocks.items()):
        if block.node is not None:
            per_node[block.node].append(cidr)
    empty_now: set[IPv4Network] = set()
    empty_release = []
    for node, cidrs in sorted(per_node.items()):
        if node in cleaned:
            continue  # all of its affinities go with it
        left = len(cidrs)
        for cidr in cidrs:
            if not snap.blocks[cidr].empty or left <= 1:
                continue
            empty_now.add(cidr)
            if cidr in state.empty_blocks:
                empty_release.append((node, cidr))
                empty_now.discard(cidr)
                left -= 1
    new_state = State({k: v for k, v in candidates.items() if k not in released},
                      frozenset(empty_now))
    return Plan(tuple(leaks), waiting, tuple(empty_release), cleaned, kept, new_state)


@dataclass(frozen=True)
class Unclaimed:
    """An address whose pod does not claim it (for `pipitctl ipam check`)."""
    allocation: Allocation
    reason: str


def unclaimed(snap: Snapshot, cluster: Cluster) -> list[Unclaimed]:
    """Pods' addresses that no pod claims now (a leak, or a pod not yet reported), and
    tunnel addresses of nodes gone from Kubernetes."""
    found = []
    for allocation in allocations(snap):
        kube = kubernetes_node(snap, allocation.node)
        if kube is None:
            continue
        if allocation.tunnel:
            if kube not in cluster.nodes:
                found.append(Unclaimed(allocation, f"node {kube} is gone from Kubernetes"))
            continue
        reason = invalid_reason(allocation, cluster.pods, kube)
        if reason is not None:
            found.append(Unclaimed(allocation, reason))
    return found


def pod_from_json(obj: Mapping) -> Pod:
    """A Pod as the API serves it (a dict) reduced to what GC needs."""
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    ips = set()
    for entry in status.get("podIPs") or ([{"ip": status["podIP"]}] if status.get("podIP")
                                          else []):
        try:
            address = IPv4Address(entry.get("ip", ""))
        except ValueError:
            continue  # IPv6 (or garbage): not Pipit's
        ips.add(address)
    return Pod(meta.get("namespace", ""), meta.get("name", ""), spec.get("nodeName") or None,
               frozenset(ips),
               status.get("phase") == "Failed" and status.get("reason") == "Evicted")


def cluster_from_json(nodes: Iterable[Mapping], pods: Iterable[Mapping]) -> Cluster:
    reduced = [pod_from_json(p) for p in pods]
    return Cluster(frozenset((n.get("metadata") or {}).get("name", "") for n in nodes),
                   {(p.namespace, p.name): p for p in reduced})
