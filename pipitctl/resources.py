"""Resource kinds `pipitctl` manages and the generic verbs over them: apply / create /
replace, get, patch and label, delete.

An input with several documents is validated completely (each document against the stored
resources and the documents before it) and then written as one change (pipitctl.commit), so
either all of it lands or none of it does. A stored resource that fails today's validation is
still listed, with the reason, and can be got, fixed by an apply, or deleted.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from ipam import keys
from ipam.errors import AlreadyExists, Conflict, InUse, InvalidResource, NotFound, PipitError
from ipam.pool import (check_node_outside_pools, check_pool_fits, check_pool_holds_no_node,
                       pool_from_spec, pool_to_document)
from ipam.config import config_from_spec as ipam_config_from_spec
from ipam.config import config_to_document as ipam_config_to_document
from ipam.pool_delete import addresses_in_use, delete_pool, in_use_refusal
from bgp_agent.bgp_config import config_from_spec as bgp_config_from_spec
from bgp_agent.bgp_filter import filter_from_spec, filter_to_document, rule_counts
from bgp_agent.bgp_peer import check_peer, peer_from_spec, peer_to_document
from bgp_agent.bgp_config import (NodeBGPConfig, check_config_input,
                                  check_pool_clear_of_services, check_services_clear_of_pools,
                                  community_texts)
from bgp_agent.bgp_config import config_to_document as bgp_config_to_document
from bgp_agent.name_claim import holder_of
from bgp_agent.node import (check_address_free, from_calico_node, keep_agent_fields,
                            node_from_document, node_to_document)
from ipam.release import release_handle, release_host_affinities
from ipam.reservation import reservation_from_spec, reservation_to_document
from ipam.resource import (Document, check_metadata, make_document, parse_documents,
                           read_document, shown, with_metadata)
from ipam.selector import parse_selector
from ipam.store import Store
from ipam.txn import MAX_ATTEMPTS, Changes, transact
from pipitctl import workloads
from pipitctl.commit import Write, commit
from pipitctl.output import yes_no



@dataclass(frozen=True)
class Kind:
    name: str  # as in documents: IPPool
    plural: str  # CLI word: ippools
    aliases: tuple[str, ...]
    parse: Callable[[Document], Any]  # -> validated object
    to_document: Callable[[Any], dict]
    check: Callable[[Any, list[Any]], None]  # against the stored objects of this kind
    columns: tuple[str, ...]
    row: Callable[[Any], tuple]
    wide_columns: tuple[str, ...]
    wide_row: Callable[[Any], tuple]
    delete: Callable[[Store, str, bool], Awaitable[object]] | None = None
    segment: str = ""  # key segment under /pipit/resources/, if not the plural
    name_of: Callable[[Any], str] = attrgetter("name")
    # checks against stored objects of other kinds too: check_with(obj, same kind, others)
    # with others[plural] the stored objects of each kind in `needs`
    needs: tuple[str, ...] = ()
    check_with: Callable[[Any, list[Any], dict[str, list[Any]]], None] | None = None
    # rules for what comes in that stored documents need not meet (an agent still reads them)
    check_input: Callable[[Document], None] | None = None
    # the checks read every stored object of the kind: a write is guarded by the whole prefix
    reads_all: bool = False
    # other keys (of the kinds in `needs`) whose current values a check rests on
    depends_on: Callable[[Any], Iterable[str]] | None = None
    # refuses a delete before anything is deleted: (store, name, force, one of several)
    delete_check: Callable[[Store, str, bool, bool], Awaitable[None]] | None = None
    # what an applied object takes over from the stored one it replaces: keeps(new, stored)
    keeps: Callable[[Any, Any], Any] | None = None

    def key(self, name: str) -> str:
        return keys.resource_key(self.segment or self.plural, name)

    @property
    def prefix(self) -> str:
        return keys.resource_prefix(self.segment or self.plural)

    @property
    def word(self) -> str:
        return self.name.lower()


async def _pool_delete_check(store: Store, name: str, force: bool, several: bool) -> None:
    if not force:
        in_use = await addresses_in_use(store, name)
        if in_use:
            raise in_use_refusal(name, in_use, nothing_deleted=several)


IPPOOL = Kind(
    name="IPPool", plural="ippools", aliases=("ippool", "ipp", "pool", "pools"),
    parse=lambda d: with_metadata(pool_from_spec(d.name, dict(d.spec)), d),
    to_document=pool_to_document,
    check=check_pool_fits, reads_all=True, needs=("nodes", "bgpconfigurations"),
    check_with=lambda pool, pools, others: (
        check_pool_holds_no_node(pool, pools, others["nodes"]),
        check_pool_clear_of_services(pool, others["bgpconfigurations"])),
    columns=("NAME", "CIDR", "SELECTOR"),
    row=lambda p: (p.name, p.cidr, p.node_selector),
    wide_columns=("NAME", "CIDR", "BLOCKSIZE", "NAT", "IPIPMODE", "VXLANMODE", "DISABLED",
                  "DISABLEBGPEXPORT", "SELECTOR", "ALLOWEDUSES", "ASSIGNMENTMODE"),
    wide_row=lambda p: (p.name, p.cidr, p.block_size, yes_no(p.nat_outgoing), p.ipip_mode,
                        p.vxlan_mode, yes_no(p.disabled), yes_no(p.disable_bgp_export),
                        p.node_selector, ",".join(p.allowed_uses), p.assignment_mode),
    delete=delete_pool, delete_check=_pool_delete_check,
)


def _no_check(obj: Any, stored: list[Any]) -> None:
    pass


async def _node_delete_check(store: Store, name: str, force: bool, several: bool) -> None:
    """Refuse to delete a node whose agent still runs (it holds the node's name claim,
    bgp_agent.name_claim): its block claims would go from under its pods, and every other
    node would stop routing to them, while the agent carries on."""
    if force:
        return
    holder = holder_of(await store.get(keys.agent_key(name)))
    if holder is not None:
        raise InUse(f"node {name!r} is run by an agent on {holder.describe()}"
                    f"{', so nothing was deleted' if several else ''}: deleting it would take "
                    "its blocks from its pods and the other nodes' routes to them; stop that "
                    "agent first, or delete with --force.")


async def delete_node(store: Store, name: str, force: bool) -> None:
    """Remove a node: its tunnel addresses, its claims on blocks (blocks still in use stay,
    unowned), then its record. The record goes last, so a delete that fails midway leaves the
    node listed and running it again finishes the job."""
    from ipip.encap import IPIP, VXLAN, tunnel_handle  # only here: it costs start-up time

    if await store.get(keys.node_key(name)) is None:
        raise NotFound(f"node {name!r} not found.")
    for kind in (IPIP, VXLAN):
        await release_handle(store, tunnel_handle(kind, name))
    await release_host_affinities(store, name)
    await _delete_record(store, NODE, name)


async def _delete_record(store: Store, kind: Kind, name: str) -> None:
    """Delete one stored resource (retried while it changes under us)."""
    async def decide(changes: Changes) -> None:
        entry = await changes.get(kind.key(name))
        if entry is None:
            raise NotFound(f"{kind.word} {name!r} not found.")
        changes.delete(entry.key)
    await transact(store, decide, f"deleting {kind.word} {name!r}")


NODE = Kind(
    name="Node", plural="nodes", aliases=("node", "no"),
    parse=lambda d: node_from_document(make_document(
        "Node", d.name, from_calico_node(d.spec) if d.calico else d.spec, d.labels,
        d.annotations)),
    to_document=node_to_document, check=check_address_free, needs=("ippools",),
    reads_all=True,  # an address is checked against every other node's
    check_with=lambda node, nodes, others: check_node_outside_pools(node, nodes,
                                                                    others["ippools"]),
    columns=("NAME", "ADDRESS", "AS"),
    row=lambda n: (n.name, n.address or "-", n.as_number or "(cluster)"),
    wide_columns=("NAME", "ADDRESS", "AS", "RRCLUSTERID", "LABELS"),
    wide_row=lambda n: (n.name, n.address or "-", n.as_number or "(cluster)",
                        n.route_reflector_cluster_id or "-",
                        ",".join(f"{k}={v}" for k, v in sorted(n.labels.items())) or "-"),
    delete=delete_node, delete_check=_node_delete_check, keeps=keep_agent_fields,
)

BGP_CONFIGURATION = Kind(
    name="BGPConfiguration", plural="bgpconfigurations",
    aliases=("bgpconfiguration", "bgpconfig", "bgpconfigs"), segment="bgpconfig",
    parse=lambda d: with_metadata(bgp_config_from_spec(d.name, dict(d.spec)), d),
    to_document=bgp_config_to_document, check=_no_check, name_of=lambda c: c.name,
    check_input=lambda d: check_config_input(d.spec), needs=("ippools",),
    check_with=lambda config, configs, others: check_services_clear_of_pools(
        config, others["ippools"]),
    columns=("NAME", "ASNUMBER", "MESH", "LOGSEVERITY"),
    row=lambda c: _bgp_config_row(c)[:4],
    wide_columns=("NAME", "ASNUMBER", "MESH", "LOGSEVERITY", "LISTENPORT", "COMMUNITIES",
                  "MESHHOLDTIME", "MESHRESTARTTIME"),
    wide_row=lambda c: _bgp_config_row(c),
)


IPAM_CONFIGURATION = Kind(
    name="IPAMConfiguration", plural="ipamconfigurations",
    aliases=("ipamconfiguration", "ipamconfig", "ipamconfigs"), segment="ipamconfig",
    parse=lambda d: with_metadata(ipam_config_from_spec(dict(d.spec), d.name), d),
    to_document=ipam_config_to_document, check=_no_check, name_of=lambda c: "default",
    columns=("NAME", "STRICTAFFINITY", "MAXBLOCKSPERHOST"),
    row=lambda c: ("default", yes_no(c.strict_affinity), c.max_blocks_per_host),
    wide_columns=("NAME", "STRICTAFFINITY", "MAXBLOCKSPERHOST", "IPCOOLDOWNSECONDS",
                  "AUTOALLOCATEBLOCKS"),
    wide_row=lambda c: ("default", yes_no(c.strict_affinity), c.max_blocks_per_host,
                        c.ip_cooldown_seconds, yes_no(c.auto_allocate_blocks)),
)


def _bgp_config_row(c) -> tuple:
    """The default's settings, or a node's (node.<name>: its log level only)."""
    if isinstance(c, NodeBGPConfig):
        return (c.name, "-", "-", c.log_severity or "-", c.listen_port or "-", "-", "-", "-")
    return (c.name, c.as_number, yes_no(c.node_to_node_mesh), c.log_severity or "-",
            c.listen_port, ",".join(community_texts(c)) or "-", c.node_mesh_hold_time,
            c.node_mesh_restart_time)



def _peer_scope(peer) -> str:
    return peer.describe_scope()


def _peer_as(peer) -> object:
    return "(node's)" if peer.as_number is None else peer.as_number


BGP_PEER = Kind(
    name="BGPPeer", plural="bgppeers", aliases=("bgppeer", "peer", "peers"),
    parse=lambda d: with_metadata(peer_from_spec(d.name, dict(d.spec)), d),
    to_document=peer_to_document,
    check=_no_check, needs=("nodes", "bgpfilters"), reads_all=True,
    depends_on=lambda peer: ([keys.node_key(peer.node)] if peer.node else []) + [
        keys.resource_key("bgpfilters", name) for name in peer.filters],
    check_with=lambda peer, peers, others: check_peer(
        peer, peers, others["nodes"], [f.name for f in others["bgpfilters"]]),
    columns=("NAME", "PEERIP", "NODE", "ASN"),
    row=lambda p: (p.name, p.endpoint, _peer_scope(p), _peer_as(p)),
    wide_columns=("NAME", "PEERIP", "NODE", "ASN", "PASSWORD", "HOLDTIME", "KEEPALIVE",
                  "RESTARTTIME", "MAXPREFIXES", "KEEPNEXTHOP", "ALLOWPOOLPREFIXES",
                  "ALLOWEDLOCALAS", "FILTERS", "TTLSECURITY", "LOCALASN"),
    wide_row=lambda p: (p.name, p.endpoint, _peer_scope(p), _peer_as(p),
                        str(p.password) if p.password else "-", p.hold_time,
                        p.keepalive_time or "-", p.restart_time,
                        p.max_prefixes or "-", yes_no(p.keep_original_next_hop),
                        yes_no(p.allow_pool_prefixes), p.allowed_local_as,
                        ",".join(p.filters) or "-", p.ttl_security or "-",
                        p.local_as_number or "-"),
)


def _names_filter(document: object, name: str) -> bool:
    """Whether a stored BGPPeer document (valid or not) lists the filter."""
    spec = document.get("spec") if isinstance(document, dict) else None
    names = spec.get("filters") if isinstance(spec, dict) else None
    return isinstance(names, list) and name in names


async def delete_filter(store: Store, name: str, force: bool) -> None:
    """Delete a BGPFilter no BGPPeer names (in one transaction with the read of the peers:
    a peer applied meanwhile that names it makes the delete look again)."""
    key, peers_prefix = BGP_FILTER.key(name), BGP_PEER.prefix

    async def decide(changes: Changes) -> None:
        if await changes.get(key) is None:
            raise NotFound(f"bgpfilter {name!r} not found.")
        entries, revision = await store.list_with_revision(peers_prefix)
        changes.saw_prefix(peers_prefix, revision)
        users = sorted(e.key.removeprefix(peers_prefix) for e in entries
                       if _names_filter(e.value, name))
        if users:
            raise InUse(f"bgpfilter {name!r} is used by BGPPeer {', '.join(map(repr, users))}; "
                        "take it out of their filters first (nothing was deleted).")
        changes.delete(key)
    await transact(store, decide, f"deleting bgpfilter {name!r}")


BGP_FILTER = Kind(
    name="BGPFilter", plural="bgpfilters", aliases=("bgpfilter", "filter", "filters"),
    parse=lambda d: with_metadata(filter_from_spec(d.name, dict(d.spec)), d),
    to_document=filter_to_document, check=_no_check, delete=delete_filter,
    columns=("NAME", "RULES"),
    row=lambda f: (f.name, rule_counts(f)),
    wide_columns=("NAME", "RULES"),
    wide_row=lambda f: (f.name, rule_counts(f)),
)

def _reserved_text(reservation, limit: int | None = None) -> str:
    """The reserved CIDRs, comma-separated; cut at `limit` characters (as calicoctl's table)."""
    text = ",".join(reservation_to_document(reservation)["spec"]["reservedCIDRs"])
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


IPRESERVATION = Kind(
    name="IPReservation", plural="ipreservations",
    aliases=("ipreservation", "reservation", "reservations"),
    parse=lambda d: with_metadata(reservation_from_spec(d.name, dict(d.spec)), d),
    to_document=reservation_to_document, check=_no_check,
    columns=("NAME", "CIDRS"),
    row=lambda r: (r.name, _reserved_text(r, 80)),
    wide_columns=("NAME", "CIDRS"),
    wide_row=lambda r: (r.name, _reserved_text(r)),
)

KINDS: tuple[Kind, ...] = (IPPOOL, BGP_CONFIGURATION, BGP_FILTER, BGP_PEER, NODE,
                           IPRESERVATION, IPAM_CONFIGURATION)


def kind_named(word: str) -> Kind:
    """The kind a CLI word or document `kind` names (ippool, ippools, IPPool...)."""
    lowered = word.lower()
    for kind in KINDS:
        if lowered in (kind.name.lower(), kind.plural, *kind.aliases):
            return kind
    if lowered in workloads.WORDS:
        raise InvalidResource("workload endpoints are what a pod's CNI ADD made, shown from "
                              "IPAM by `pipitctl get workloadendpoints`; they are not applied, "
                              "patched, labelled or deleted.")
    known = ", ".join(k.plural for k in KINDS)
    raise InvalidResource(f"unknown resource type {word!r}; Pipit knows: {known}.")


@dataclass(frozen=True)
class Incoming:
    """A validated resource from the input."""
    kind: Kind
    obj: Any
    resource_version: int | None = None  # metadata.resourceVersion: apply only over that
    where: str = ""  # "FILE: document N: " to start a message about it with

    @property
    def name(self) -> str:
        return self.kind.name_of(self.obj)


def read_objects(sources: str | Sequence[tuple[str, str]]) -> list[Incoming]:
    """Parse and validate every document of the input: a text, or (file name, text) pairs
    read as one input (a directory); errors say which file and document. An input of nothing
    but empty lists (`kind: List` with no items, as `get` shows an empty kind) is no resources
    and no error; an input with no documents at all is an error."""
    if isinstance(sources, str):
        sources = [("", sources)]
    documents: list[tuple[str, dict]] = []
    lists = 0
    for source, text in sources:
        try:
            raw = parse_documents(text)
        except InvalidResource as error:
            raise InvalidResource(f"{source}: {error}" if source else str(error)) from None
        flat: list[dict] = []
        for doc in raw:  # `kind: List` (as `get -o json` writes) holds its documents in items
            if str(doc.get("kind", "")).endswith("List") and isinstance(doc.get("items"), list):
                flat.extend(doc["items"])
                lists += 1
            else:
                flat.append(doc)
        many = len(flat) > 1
        for number, doc in enumerate(flat, 1):
            where = (f"{source}: " if source and len(sources) > 1 else "") + \
                (f"document {number}: " if many else "")
            documents.append((where, doc))
    if not documents and not lists:
        raise InvalidResource("the input holds no resources.")
    objects = []
    seen: dict[tuple[str, str], int] = {}
    for index, (where, doc) in enumerate(documents):
        try:
            if not isinstance(doc, dict):
                raise InvalidResource("it is not a mapping with apiVersion, kind, metadata and "
                                      "spec.")
            document = read_document(doc)
            check_metadata(document)
            kind = kind_named(document.kind)
            if document.kind != kind.name:
                raise InvalidResource(f"kind {document.kind!r} should be written {kind.name!r}.")
            obj = kind.parse(document)
            if kind.check_input is not None:
                kind.check_input(document)
            earlier = seen.setdefault((kind.name, kind.name_of(obj)), index)
            if earlier != index:
                first = documents[earlier][0].rstrip(": ") or "given earlier"
                raise InvalidResource(f"{kind.word} {kind.name_of(obj)!r} is also {first}; give "
                                      "each resource once.")
            objects.append(Incoming(kind, obj, document.resource_version, where))
        except InvalidResource as error:
            raise InvalidResource(f"{where}{error}") from None
    return objects


# -- what etcd holds ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Stored:
    """A stored resource: its object (None when it fails today's validation), the reason it
    fails, and the mod_revision it had when read (its resourceVersion)."""
    kind: Kind
    name: str
    revision: int
    value: Any  # the stored JSON document
    obj: Any = None
    invalid: str | None = None

    @property
    def labels(self) -> Mapping[str, str]:
        if self.obj is not None:
            return self.obj.labels
        metadata = self.value.get("metadata") if isinstance(self.value, dict) else None
        labels = metadata.get("labels") if isinstance(metadata, dict) else None
        return labels if isinstance(labels, dict) else {}

    def document(self) -> dict:
        """As `get -o yaml|json` shows it: with metadata.resourceVersion."""
        if self.obj is not None:
            document = self.kind.to_document(self.obj)
        elif isinstance(self.value, dict):
            document = dict(self.value)
        else:  # not even JSON: what can be said of it
            document = make_document(self.kind.name, self.name, {})
        metadata = dict(document.get("metadata") or {})
        document["metadata"] = {"name": metadata.pop("name", self.name),
                                "resourceVersion": str(self.revision), **metadata}
        return document


@dataclass
class Listing:
    """Every stored resource of one kind, by name, and the etcd revision it was read at."""
    kind: Kind
    items: dict[str, Stored]
    revision: int

    @property
    def valid(self) -> dict[str, Any]:
        return {n: s.obj for n, s in self.items.items() if s.obj is not None}


def _name_of_key(kind: Kind, key: str) -> str:
    return key.removeprefix(kind.prefix)


async def read_kind(store: Store, kind: Kind) -> Listing:
    entries, revision = await store.list_with_revision(kind.prefix)
    items = {}
    for entry in entries:
        name = _name_of_key(kind, entry.key)
        try:
            if not isinstance(entry.value, dict):
                raise InvalidResource("it is not a JSON object.")
            document = read_document(entry.value)
            obj = kind.parse(document)
            if kind.name_of(obj) != name:
                raise InvalidResource(f"it is named {kind.name_of(obj)!r} inside.")
            items[name] = Stored(kind, name, entry.mod_revision, entry.value, obj)
        except PipitError as error:  # shown as invalid, with the reason, by get
            items[name] = Stored(kind, name, entry.mod_revision, entry.value,
                                 invalid=str(error))
    return Listing(kind, items, revision)


# -- apply, create, replace ---------------------------------------------------------------------

APPLY, CREATE, REPLACE = "apply", "create", "replace"


class StaleVersion(Conflict):
    """A document's resourceVersion is not the stored resource's any more."""


def plan_writes(objects: Sequence[Incoming], listings: dict[Kind, Listing], mode: str = APPLY,
                skip_existing: bool = False) -> tuple[list[Write], dict[str, int], list[str]]:
    """Decide every object against the listings (and the documents before it): the writes,
    the prefixes whose whole listing the decisions rest on (at their revisions), and one line
    per object saying what happens to it. Raises on the first object that cannot be written."""
    current = {kind: listing.valid for kind, listing in listings.items()}
    objects = list(objects)
    writes: list[Write] = []
    ranges: dict[str, int] = {}
    lines = []
    for incoming in objects:
        kind, obj, name = incoming.kind, incoming.obj, incoming.name
        listing, where = listings[kind], incoming.where
        stored = listing.items.get(name)
        what = f"{where}{kind.word} {name!r}"
        if stored is not None and mode == CREATE:
            if skip_existing:
                lines.append(f"{kind.word} {name!r} already exists (skipped)")
                continue
            raise AlreadyExists(f"{what} already exists; use `pipitctl apply` to change it.")
        if stored is None and mode == REPLACE:
            raise NotFound(f"{what} does not exist; use `pipitctl apply` or `pipitctl create` "
                           "to create it.")
        revision = stored.revision if stored is not None else 0
        if incoming.resource_version is not None:
            if mode == CREATE:
                raise InvalidResource(f"{what} has metadata.resourceVersion, which only a "
                                      "resource that exists has; remove it to create one.")
            if incoming.resource_version != revision:
                now = (f"it is at resourceVersion {revision}" if stored is not None
                       else "it was deleted")
                raise StaleVersion(f"{what} changed since resourceVersion "
                               f"{incoming.resource_version} ({now}); get it again, make your "
                               "change to that and apply it.")
        if kind.keeps is not None and stored is not None and stored.obj is not None:
            obj = kind.keeps(obj, stored.obj)
        same_kind = list(current[kind].values())
        try:
            kind.check(obj, same_kind)
            if kind.check_with is not None:
                others = {plural: list(current[kind_named(plural)].values())
                          for plural in kind.needs}
                kind.check_with(obj, same_kind, others)
        except InvalidResource as error:
            raise InvalidResource(f"{where}{error}") from None
        if kind.reads_all:
            ranges[kind.prefix] = listing.revision
        if stored is None:
            action = "created"
        elif stored.obj == obj:
            action = "unchanged"
        else:
            action = "configured"
        if action != "unchanged":
            depends = tuple((key, _revision_of(listings, key))
                            for key in (kind.depends_on(obj) if kind.depends_on else ()))
            writes.append(Write(kind.key(name), revision, kind.to_document(obj),
                                old=stored.value if stored is not None else None,
                                depends=depends))
        current[kind][name] = obj
        lines.append(f"{kind.word} {name!r} {action}")
    return writes, ranges, lines


def _revision_of(listings: dict[Kind, Listing], key: str) -> int:
    for listing in listings.values():
        if key.startswith(listing.kind.prefix):
            stored = listing.items.get(_name_of_key(listing.kind, key))
            return stored.revision if stored is not None else 0
    raise ValueError(f"{key} is in no listing")


async def apply_objects(store: Store, objects: Sequence[Incoming], mode: str = APPLY,
                        skip_existing: bool = False) -> list[str]:
    """Create or update every object, all or nothing, also when there are more than one etcd
    transaction holds; one line per object saying what happened. BGPFilters go before the
    rest, so that a BGPPeer may name one that comes after it in the input."""
    objects = sorted(objects, key=lambda incoming: incoming.kind is not BGP_FILTER)
    kinds = {i.kind for i in objects}
    kinds |= {kind_named(p) for k in kinds for p in k.needs}
    for _ in range(MAX_ATTEMPTS):
        listings = {kind: await read_kind(store, kind) for kind in kinds}
        writes, ranges, lines = plan_writes(objects, listings, mode, skip_existing)
        if await commit(store, writes, ranges):
            return lines
    raise Conflict(f"applying the resources kept colliding with concurrent changes after "
                   f"{MAX_ATTEMPTS} attempts; try again.")


async def get_objects(store: Store, kind: Kind, names: Sequence[str] = (),
                      selector: str | None = None) -> list[Stored]:
    """The stored resources of a kind (sorted by name), those named, or those whose labels
    the selector (Calico's syntax) matches; a name that is not there is an error."""
    listing = await read_kind(store, kind)
    missing = [n for n in names if n not in listing.items]
    if missing:
        raise NotFound(f"{kind.word} {missing[0]!r} not found.")
    found = [listing.items[n] for n in dict.fromkeys(names)] if names else \
        [listing.items[n] for n in sorted(listing.items)]
    if selector is not None:
        matches = parse_selector(selector).matches
        found = [s for s in found if matches(s.labels)]
    return found


# -- patch and label: read, change, write back unless it changed meanwhile ---------------------

def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: mappings merge, null removes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


async def edit_object(store: Store, kind: Kind, name: str,
                      change: Callable[[dict], dict]) -> str:
    """Write `change(stored document)` over the resource, validated as `replace` would, if
    the resource did not change in between (else read it and change it again); the line
    saying what happened. A document with its own metadata.resourceVersion is written only
    over that version."""
    for _ in range(MAX_ATTEMPTS):
        listing = await read_kind(store, kind)
        stored = listing.items.get(name)
        if stored is None:
            raise NotFound(f"{kind.word} {name!r} not found.")
        current = {k: v for k, v in stored.value.items()} if isinstance(stored.value, dict) \
            else {}
        changed = change(current)
        metadata = changed.get("metadata") if isinstance(changed.get("metadata"), dict) else {}
        if metadata.get("name", name) != name:
            raise InvalidResource(f"{kind.word} {name!r} cannot be renamed; create the new one "
                                  "and delete this one.")
        if changed.get("kind", kind.name) != kind.name:
            raise InvalidResource(f"{kind.word} {name!r} cannot change its kind.")
        version = metadata.get("resourceVersion")
        if version is None:
            changed = {**changed, "metadata": {**metadata,
                                               "resourceVersion": str(stored.revision)}}
        [incoming] = read_objects([("", json.dumps(changed))])
        try:
            [line] = await apply_objects(store, [incoming], REPLACE)
            return line
        except StaleVersion:
            if version is not None:
                raise
    raise Conflict(f"changing {kind.word} {name!r} kept colliding with concurrent changes "
                   f"after {MAX_ATTEMPTS} attempts; try again.")


def parse_label_changes(items: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """`key=value` to set and `key-` to remove, as kubectl writes them."""
    setting: dict[str, str] = {}
    removing: list[str] = []
    for item in items:
        key, equals, value = item.partition("=")
        if equals and key:
            setting[key] = value
        elif not equals and item.endswith("-") and len(item) > 1:
            removing.append(item[:-1])
        else:
            raise InvalidResource(f"{shown(item)} is neither KEY=VALUE (set a label) nor KEY- "
                                  "(remove one).")
    both = set(setting) & set(removing)
    if both:
        raise InvalidResource(f"label {sorted(both)[0]!r} is both set and removed; say one.")
    return setting, removing


def relabel(document: dict, setting: Mapping[str, str], removing: Sequence[str],
            overwrite: bool, what: str) -> dict:
    metadata = dict(document.get("metadata") or {})
    labels = dict(metadata.get("labels") or {})
    for key, value in setting.items():
        if key in labels and labels[key] != value and not overwrite:
            raise InvalidResource(f"{what} already has label {key}={labels[key]!r}; add "
                                  "--overwrite to change it.")
        labels[key] = value
    for key in removing:
        labels.pop(key, None)
    metadata["labels"] = labels
    return {**document, "metadata": metadata}


# -- delete --------------------------------------------------------------------------------------

async def delete_objects(store: Store, targets: Sequence[tuple[Kind, str]], force: bool = False,
                         skip_missing: bool = False) -> list[str]:
    """Delete every target, or none: each is checked first (it exists, or --skip-not-exists;
    an IP pool has no address in use, or --force), then they go in order (BGPFilters last)."""
    targets = list(dict.fromkeys(targets))
    listings = {kind: await read_kind(store, kind) for kind in {k for k, _ in targets}}
    missing = {(k, n) for k, n in targets if n not in listings[k].items}
    if missing and not skip_missing:
        kind, name = next(t for t in targets if t in missing)
        raise NotFound(f"{kind.word} {name!r} not found" + (
            ", so nothing was deleted (add --skip-not-exists to delete the others)."
            if len(targets) > 1 else "."))
    for kind, name in targets:
        if (kind, name) not in missing and kind.delete_check is not None:
            await kind.delete_check(store, name, force, len(targets) > 1)
    lines = []
    # BGPFilters after the BGPPeers that may name them (one input deleting both)
    for kind, name in sorted(targets, key=lambda target: target[0] is BGP_FILTER):
        if (kind, name) in missing:
            lines.append(f"{kind.word} {name!r} does not exist (skipped)")
        else:
            lines.append(await delete_object(store, kind, name, force))
    return lines


async def delete_object(store: Store, kind: Kind, name: str, force: bool = False) -> str:
    if kind.delete is not None:
        await kind.delete(store, name, force)
    else:
        await _delete_record(store, kind, name)
    return f"{kind.word} {name!r} deleted"

