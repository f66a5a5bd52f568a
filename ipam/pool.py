"""IP pools: the resource, its validation, and how a pool divides into blocks."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from ipam.block import block_capacity
from ipam.errors import InvalidResource, PipitError
from ipam.resource import SpecReader, make_document, read_document, shown, with_metadata
from ipam.selector import parse_selector

log = logging.getLogger(__name__)
KIND = "IPPool"
MODES = ("Never", "Always", "CrossSubnet")
DEFAULT_BLOCK_SIZE = 26
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 20, 32

# Ranges that can never hold pod addresses, with the word a person would use for them.
_RESERVED = (
    (IPv4Network("0.0.0.0/8"), "the 'this network' range"),
    (IPv4Network("127.0.0.0/8"), "loopback"),
    (IPv4Network("169.254.0.0/16"), "link-local"),
    (IPv4Network("224.0.0.0/4"), "multicast"),
    (IPv4Network("240.0.0.0/4"), "reserved (class E)"),
)

_FIELDS = {"cidr", "blockSize", "ipipMode", "vxlanMode", "natOutgoing", "disabled",
           "nodeSelector", "disableBGPExport", "allowedUses", "assignmentMode",
           "namespaceSelector"}
WORKLOAD, TUNNEL, LOAD_BALANCER = "Workload", "Tunnel", "LoadBalancer"
USES = (WORKLOAD, TUNNEL)  # Calico's allowedUses default: both
# Where load-balancer addresses are allocated (Calico's virtual node of the same name): no
# node's, none ever announces their blocks (controller.load_balancer)
LOAD_BALANCER_NODE = "load-balancer"
ASSIGNMENT_MODES = ("Automatic", "Manual")


def network_holds(cidr: IPv4Network, prefix: IPv4Network) -> bool:
    """prefix.subnet_of(cidr) (equal to or inside), on integers: subnet_of works out both
    networks' broadcast addresses, and a route's prefix is a new object that would work its
    own out for this (a few microseconds a route)."""
    return (prefix.prefixlen >= cidr.prefixlen and
            int(prefix.network_address) & int(cidr.netmask) == int(cidr.network_address))


@dataclass(frozen=True)
class IPPool:
    name: str
    cidr: IPv4Network
    block_size: int = DEFAULT_BLOCK_SIZE
    ipip_mode: str = "Never"
    vxlan_mode: str = "Never"
    nat_outgoing: bool = False
    disabled: bool = False
    node_selector: str = "all()"
    disable_bgp_export: bool = False
    allowed_uses: tuple[str, ...] = USES  # pods (Workload), tunnel addresses (Tunnel)
    assignment_mode: str = "Automatic"  # Manual: only for requests that name the pool
    # pods of the namespaces whose labels it matches (None: any); nodeSelector must match too
    namespace_selector: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)

    @property
    def block_count(self) -> int:
        """Blocks that fit in the pool: none when the pool is smaller than one block (only a
        disabled pool may be: it marks a range as the cluster's, e.g. to keep it out of NAT)."""
        if self.block_size < self.cidr.prefixlen:
            return 0
        return 1 << (self.block_size - self.cidr.prefixlen)

    @property
    def capacity(self) -> int:
        """Addresses pods can get: all but each block's gateway and broadcast address."""
        return self.block_count * block_capacity(1 << (32 - self.block_size))

    def block(self, index: int) -> IPv4Network:
        size = 1 << (32 - self.block_size)
        return IPv4Network((int(self.cidr.network_address) + index * size, self.block_size))

    def holds(self, prefix: IPv4Network) -> bool:
        """Whether `prefix` is equal to or inside the pool (network_holds)."""
        return network_holds(self.cidr, prefix)

    def selects(self, labels: Mapping[str, str]) -> bool:
        return parse_selector(self.node_selector).matches(labels)

    def serves(self, use: str, labels: Mapping[str, str],
               namespace_labels: Mapping[str, str] | None = None) -> bool:
        """Whether an automatic assignment for `use` (a pod: Workload, a tunnel address:
        Tunnel, a service's: LoadBalancer) on a node with these labels may take from it:
        enabled, allowed that use, not Manual, its nodeSelector picks the node and, for a pod
        or a service, its namespaceSelector their namespace (whose labels, None when unknown,
        match no namespaceSelector)."""
        return self._refusal(use, labels, namespace_labels) is None

    def _refusal(self, use: str, labels: Mapping[str, str],
                 namespace_labels: Mapping[str, str] | None) -> str | None:
        """The rule of serves() that keeps the assignment out (a field name), or None."""
        if self.disabled:
            return "disabled"
        if use not in self.allowed_uses:
            return "allowedUses"
        if self.assignment_mode != "Automatic":
            return "assignmentMode"
        if use in (WORKLOAD, LOAD_BALANCER) and self.namespace_selector is not None and (
                namespace_labels is None
                or not parse_selector(self.namespace_selector).matches(namespace_labels)):
            return "namespaceSelector"
        return None if self.selects(labels) else "nodeSelector"

    def why_not(self, use: str, labels: Mapping[str, str],
                namespace_labels: Mapping[str, str] | None = None) -> str:
        """Why an automatic assignment for `use` may not take from it, in a few words ("" if
        it may)."""
        return {
            None: "",
            "disabled": "disabled",
            "allowedUses": f"allowedUses {','.join(self.allowed_uses)}",
            "assignmentMode": f"assignmentMode {self.assignment_mode}: only for those naming it",
            "namespaceSelector": f"namespaceSelector {self.namespace_selector!r} does not select "
                                 "the namespace",
            "nodeSelector": f"nodeSelector {self.node_selector!r} does not select the node",
        }[self._refusal(use, labels, namespace_labels)]


def pool_from_spec(name: str, spec: Mapping) -> IPPool:
    """Build a pool from its resource spec; any problem is one InvalidResource sentence."""
    read = SpecReader(KIND, name, spec, _FIELDS)
    text = read.string("cidr")
    if not text:
        raise read.fail("spec.cidr is required (for example 10.244.0.0/16).")
    cidr = _parse_cidr(text, read)
    for reserved, what in _RESERVED:
        if cidr.overlaps(reserved):
            raise read.fail(f"cidr {cidr} overlaps {reserved}, which is {what} and cannot hold "
                            "pod addresses.")
    block_size = read.integer("blockSize", DEFAULT_BLOCK_SIZE)
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise read.fail(f"blockSize {block_size} is outside {MIN_BLOCK_SIZE}-{MAX_BLOCK_SIZE} "
                        "(IPv4).")
    disabled = read.boolean("disabled")
    if block_size < cidr.prefixlen and not disabled:
        raise read.fail(f"blockSize /{block_size} is larger than the pool {cidr} itself; use a "
                        f"blockSize of at least {cidr.prefixlen}, or disable the pool (a "
                        "disabled pool only marks its range as the cluster's).")
    ipip = read.choice("ipipMode", "Never", MODES)
    vxlan = read.choice("vxlanMode", "Never", MODES)
    if ipip != "Never" and vxlan != "Never":
        raise read.fail("ipipMode and vxlanMode cannot both be enabled; choose one encapsulation.")
    selector = read.string("nodeSelector", "all()") or "all()"
    namespaces = read.string("namespaceSelector") or None
    for text in (selector, namespaces):
        try:
            parse_selector(text or "all()")
        except InvalidResource as error:
            raise read.fail(str(error)) from None
    return IPPool(name=name, cidr=cidr, block_size=block_size, ipip_mode=ipip, vxlan_mode=vxlan,
                  nat_outgoing=read.boolean("natOutgoing"), disabled=disabled,
                  node_selector=selector, disable_bgp_export=read.boolean("disableBGPExport"),
                  allowed_uses=_allowed_uses(read),
                  assignment_mode=read.choice("assignmentMode", "Automatic", ASSIGNMENT_MODES),
                  namespace_selector=namespaces)


def _allowed_uses(read: SpecReader) -> tuple[str, ...]:
    """Calico's allowedUses: Workload, Tunnel or both (none given: both), or LoadBalancer
    alone (Kubernetes LoadBalancer services' addresses: no pod traffic, no node's blocks)."""
    uses = read.spec.get("allowedUses")
    if uses in (None, []):
        return USES
    if not isinstance(uses, list):
        raise read.fail(f"allowedUses must list Workload and/or Tunnel, or LoadBalancer, not "
                        f"{shown(uses)}.")
    for use in uses:
        if use not in (*USES, LOAD_BALANCER):
            raise read.fail(f"allowedUses {shown(use)} is not Workload, Tunnel or "
                            "LoadBalancer.")
    if LOAD_BALANCER in uses:
        if set(uses) != {LOAD_BALANCER}:
            raise read.fail("allowedUses LoadBalancer goes alone: a pool of load-balancer "
                            "addresses gives no pod or tunnel addresses.")
        for field_name in ("ipipMode", "vxlanMode"):
            if read.choice(field_name, "Never", MODES) != "Never":
                raise read.fail(f"a LoadBalancer pool carries no pod traffic: its {field_name} "
                                "must be Never.")
        if (read.string("nodeSelector", "all()") or "all()") != "all()":
            raise read.fail("a LoadBalancer pool's addresses belong to no node: leave its "
                            "nodeSelector out (all()).")
        return (LOAD_BALANCER,)
    return tuple(u for u in USES if u in uses)


def _parse_cidr(text: str, read: SpecReader) -> IPv4Network:
    example = "such as 10.244.0.0/16"
    network = read.ipv4_network("cidr", text, f"an IP network in CIDR form, {example}")
    if "/" not in text:
        raise read.fail(f"cidr {text.strip()!r} needs a prefix length, {example}.")
    return network


def pool_to_spec(pool: IPPool) -> dict:
    return {
        "cidr": str(pool.cidr),
        "blockSize": pool.block_size,
        "ipipMode": pool.ipip_mode,
        "vxlanMode": pool.vxlan_mode,
        "natOutgoing": pool.nat_outgoing,
        "disabled": pool.disabled,
        "nodeSelector": pool.node_selector,
        "disableBGPExport": pool.disable_bgp_export,
        **({} if pool.allowed_uses == USES else {"allowedUses": list(pool.allowed_uses)}),
        **({} if pool.assignment_mode == "Automatic" else
           {"assignmentMode": pool.assignment_mode}),
        **({} if pool.namespace_selector is None else
           {"namespaceSelector": pool.namespace_selector}),
    }


def pool_to_document(pool: IPPool) -> dict:
    return make_document(KIND, pool.name, pool_to_spec(pool), pool.labels, pool.annotations)


def pool_from_document(doc: Mapping) -> IPPool:
    document = read_document(doc)
    if document.kind != KIND:
        raise InvalidResource(f"{document.kind} {document.name!r} is not an {KIND}.")
    return with_metadata(pool_from_spec(document.name, dict(document.spec)), document)


def read_pools(entries) -> list[tuple[IPPool, int]]:
    """The valid pools among stored entries, each with its mod_revision; an invalid one
    (written by hand, by an older version) is logged and left out."""
    pools = []
    for entry in entries:
        try:
            pools.append((pool_from_document(entry.value), entry.mod_revision))
        except PipitError as error:
            log.warning("ignoring the pool at %s: %s", entry.key, error)
    return pools


def check_pool_fits(pool: IPPool, existing: Iterable[IPPool]) -> None:
    """Refuse a pool that overlaps another, or changes what cannot change once blocks exist."""
    for other in existing:
        if other.name == pool.name:
            if other.cidr != pool.cidr:
                raise InvalidResource(
                    f"IPPool {pool.name!r}: cidr cannot change from {other.cidr} to {pool.cidr}; "
                    "create a new pool and delete this one.")
            if other.block_size != pool.block_size:
                raise InvalidResource(
                    f"IPPool {pool.name!r}: blockSize cannot change from {other.block_size} to "
                    f"{pool.block_size}; create a new pool and delete this one.")
        elif other.cidr.overlaps(pool.cidr):
            raise InvalidResource(f"IPPool {pool.name!r}: cidr {pool.cidr} overlaps pool "
                                  f"{other.name!r} ({other.cidr}).")


# Why a node's address must stay out of every pool, for the sentences below.
_NODE_IN_POOL = ("a pod could be given it, and the routes to the pool's blocks would take "
                 "traffic meant for the node")


def check_pool_holds_no_node(pool: IPPool, pools: Iterable[IPPool], nodes: Iterable) -> None:
    """Refuse a new pool whose cidr holds a node's address (`nodes`: records with `name` and
    `address`). A pool stored already is left alone: its cidr cannot change."""
    if any(p.name == pool.name for p in pools):
        return
    for node in nodes:
        if node.address is not None and node.address.ip in pool.cidr:
            raise InvalidResource(
                f"IPPool {pool.name!r}: cidr {pool.cidr} holds the address of node {node.name} "
                f"({node.address.ip}): {_NODE_IN_POOL}; choose a cidr that holds no node's "
                "address.")


def node_in_pool(node, pools: Iterable[IPPool]) -> str | None:
    """What is wrong with a node whose address is inside a pool (None: nothing)."""
    pool = pool_of(pools, node.address.ip) if node.address is not None else None
    if pool is None:
        return None
    return (f"its address {node.address.ip} is inside IPPool {pool.name!r} ({pool.cidr}): "
            f"{_NODE_IN_POOL}; give the node an address outside every pool")


def check_node_outside_pools(node, nodes: Iterable, pools: Iterable[IPPool]) -> None:
    """Refuse a node address inside a pool, when it is new to the node (a record whose
    address is unchanged is left alone, as an agent restarting re-registers it: its status
    warns instead)."""
    if any(n.name == node.name and n.address == node.address for n in nodes):
        return
    problem = node_in_pool(node, pools)
    if problem is not None:
        raise InvalidResource(f"node {node.name}: {problem}.")


def search_start(pool: IPPool, node: str) -> int:
    """Where this node starts looking for a free block: spread by a hash of its name."""
    digest = hashlib.sha256(f"{node}/{pool.cidr}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % pool.block_count


def unclaimed_blocks(pool: IPPool, node: str, existing: set[IPv4Network]) -> Iterator[IPv4Network]:
    """The pool's blocks that do not exist yet, in this node's search order."""
    count = pool.block_count
    if not count or sum(1 for cidr in existing if cidr.subnet_of(pool.cidr)) >= count:
        return
    start = search_start(pool, node)
    for step in range(count):
        cidr = pool.block((start + step) % count)
        if cidr not in existing:
            yield cidr


def pool_of(pools: Iterable[IPPool], address: IPv4Address) -> IPPool | None:
    return next((p for p in pools if address in p.cidr), None)
