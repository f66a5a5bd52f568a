"""Resource kinds `pipitctl` manages and the generic apply / create / get / delete over them.

A file with several documents is validated completely (each document against the stored
resources and the documents before it) and then written in ONE transaction, so either all of
it lands or none of it does.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from ipam import keys
from ipam.errors import AlreadyExists, InvalidResource, NotFound, PipitError
from ipam.pool import check_pool_fits, pool_from_spec, pool_to_document
from ipam.pool_delete import delete_pool
from bgp_agent.bgp_config import config_from_spec as bgp_config_from_spec
from bgp_agent.bgp_peer import check_peer, peer_from_spec, peer_to_document
from bgp_agent.bgp_config import check_config_input, community_texts
from bgp_agent.bgp_config import config_to_document as bgp_config_to_document
from bgp_agent.node import node_from_document, node_to_document
from ipam.release import release_handle, release_host_affinities
from ipam.resource import (Document, check_metadata, make_document, parse_documents,
                           read_document, with_metadata)
from ipam.store import Store
from ipam.txn import Changes, transact
from pipitctl.output import yes_no

log = logging.getLogger(__name__)


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

    def key(self, name: str) -> str:
        return keys.resource_key(self.segment or self.plural, name)

    @property
    def prefix(self) -> str:
        return keys.resource_prefix(self.segment or self.plural)

    @property
    def word(self) -> str:
        return self.name.lower()


IPPOOL = Kind(
    name="IPPool", plural="ippools", aliases=("ippool", "ipp", "pool", "pools"),
    parse=lambda d: with_metadata(pool_from_spec(d.name, dict(d.spec)), d),
    to_document=pool_to_document,
    check=check_pool_fits,
    columns=("NAME", "CIDR", "SELECTOR"),
    row=lambda p: (p.name, p.cidr, p.node_selector),
    wide_columns=("NAME", "CIDR", "BLOCKSIZE", "NAT", "IPIPMODE", "VXLANMODE", "DISABLED",
                  "DISABLEBGPEXPORT", "SELECTOR"),
    wide_row=lambda p: (p.name, p.cidr, p.block_size, yes_no(p.nat_outgoing), p.ipip_mode,
                        p.vxlan_mode, yes_no(p.disabled), yes_no(p.disable_bgp_export),
                        p.node_selector),
    delete=delete_pool,
)


def _no_check(obj: Any, stored: list[Any]) -> None:
    pass


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
    parse=lambda d: node_from_document(make_document("Node", d.name, d.spec, d.labels,
                                                     d.annotations)),
    to_document=node_to_document, check=_no_check,
    columns=("NAME", "ADDRESS", "AS"),
    row=lambda n: (n.name, n.address or "-", n.as_number or "(cluster)"),
    wide_columns=("NAME", "ADDRESS", "AS", "RRCLUSTERID", "LABELS"),
    wide_row=lambda n: (n.name, n.address or "-", n.as_number or "(cluster)",
                        n.route_reflector_cluster_id or "-",
                        ",".join(f"{k}={v}" for k, v in sorted(n.labels.items())) or "-"),
    delete=delete_node,
)

BGP_CONFIGURATION = Kind(
    name="BGPConfiguration", plural="bgpconfigurations",
    aliases=("bgpconfiguration", "bgpconfig", "bgpconfigs"), segment="bgpconfig",
    parse=lambda d: with_metadata(bgp_config_from_spec(d.name, dict(d.spec)), d),
    to_document=bgp_config_to_document, check=_no_check, name_of=lambda c: "default",
    check_input=lambda d: check_config_input(d.spec),
    columns=("NAME", "ASNUMBER", "MESH"),
    row=lambda c: ("default", c.as_number, yes_no(c.node_to_node_mesh)),
    wide_columns=("NAME", "ASNUMBER", "MESH", "LISTENPORT", "COMMUNITIES", "MESHHOLDTIME",
                  "MESHRESTARTTIME"),
    wide_row=lambda c: ("default", c.as_number, yes_no(c.node_to_node_mesh), c.listen_port,
                        ",".join(community_texts(c)) or "-",
                        c.node_mesh_hold_time, c.node_mesh_restart_time),
)



def _peer_scope(peer) -> str:
    return peer.describe_scope()


def _peer_as(peer) -> object:
    return "(node's)" if peer.as_number is None else peer.as_number


BGP_PEER = Kind(
    name="BGPPeer", plural="bgppeers", aliases=("bgppeer", "peer", "peers"),
    parse=lambda d: with_metadata(peer_from_spec(d.name, dict(d.spec)), d),
    to_document=peer_to_document,
    check=_no_check, needs=("nodes",),
    check_with=lambda peer, peers, others: check_peer(peer, peers, others["nodes"]),
    columns=("NAME", "PEERIP", "NODE", "ASN"),
    row=lambda p: (p.name, p.endpoint, _peer_scope(p), _peer_as(p)),
    wide_columns=("NAME", "PEERIP", "NODE", "ASN", "PASSWORD", "HOLDTIME", "RESTARTTIME",
                  "MAXPREFIXES", "KEEPNEXTHOP", "ALLOWPOOLPREFIXES", "ALLOWEDLOCALAS"),
    wide_row=lambda p: (p.name, p.endpoint, _peer_scope(p), _peer_as(p),
                        str(p.password) if p.password else "-", p.hold_time, p.restart_time,
                        p.max_prefixes or "-", yes_no(p.keep_original_next_hop),
                        yes_no(p.allow_pool_prefixes), p.allowed_local_as),
)

KINDS: tuple[Kind, ...] = (IPPOOL, BGP_CONFIGURATION, BGP_PEER, NODE)


def kind_named(word: str) -> Kind:
    """The kind a CLI word or document `kind` names (ippool, ippools, IPPool...)."""
    lowered = word.lower()
    for kind in KINDS:
        if lowered in (kind.name.lower(), kind.plural, *kind.aliases):
            return kind
    known = ", ".join(k.plural for k in KINDS)
    raise InvalidResource(f"unknown resource type {word!r}; Pipit knows: {known}.")


def read_objects(text: str) -> list[tuple[Kind, Any]]:
    """Parse and validate every document of a file; errors say which document."""
    raw = parse_documents(text)
    flat: list[dict] = []
    for doc in raw:  # `kind: List` (as `get -o json` writes) holds its documents in items
        if str(doc.get("kind", "")).endswith("List") and isinstance(doc.get("items"), list):
            flat.extend(doc["items"])
        else:
            flat.append(doc)
    if not flat:
        raise InvalidResource("the input holds no resources.")
    objects = []
    seen: dict[tuple[str, str], int] = {}
    for number, doc in enumerate(flat, 1):
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
            earlier = seen.setdefault((kind.name, kind.name_of(obj)), number)
            if earlier != number:
                raise InvalidResource(f"{kind.word} {kind.name_of(obj)!r} is also document "
                                      f"{earlier}; give each resource once.")
            objects.append((kind, obj))
        except InvalidResource as error:
            prefix = f"document {number}: " if len(flat) > 1 else ""
            raise InvalidResource(f"{prefix}{error}") from None
    return objects


async def _stored(changes: Changes, kind: Kind) -> dict[str, Any]:
    """Every stored object of a kind, each read recorded so a concurrent change fails the txn."""
    found = {}
    for entry in await changes.store.list(kind.prefix):
        changes.saw(entry.key, entry.mod_revision)
        try:
            document = read_document(entry.value)
            found[document.name] = kind.parse(document)
        except PipitError as error:
            log.warning("ignoring invalid stored %s at %s: %s", kind.name, entry.key, error)
    return found


async def apply_objects(store: Store, objects: Sequence[tuple[Kind, Any]],
                        create_only: bool = False) -> list[str]:
    """Create or replace every object (all or nothing); one line per object saying what happened."""
    async def decide(changes: Changes) -> list[str]:
        stored: dict[Kind, dict[str, Any]] = {}
        lines = []
        for number, (kind, obj) in enumerate(objects, 1):
            current = stored.get(kind)
            if current is None:
                current = stored[kind] = await _stored(changes, kind)
            name = kind.name_of(obj)
            prefix = f"document {number}: " if len(objects) > 1 else ""
            if create_only and name in current:
                raise AlreadyExists(f"{prefix}{kind.word} {name!r} already exists; use "
                                    "`pipitctl apply` to change it.")
            try:
                kind.check(obj, list(current.values()))
                if kind.check_with is not None:
                    others = {}
                    for plural in kind.needs:
                        other = kind_named(plural)
                        if other not in stored:
                            stored[other] = await _stored(changes, other)
                        others[plural] = list(stored[other].values())
                    kind.check_with(obj, list(current.values()), others)
            except InvalidResource as error:
                raise InvalidResource(f"{prefix}{error}") from None
            if name not in current:
                action = "created"
            elif current[name] == obj:
                action = "unchanged"
            else:
                action = "configured"
            if action != "unchanged":
                changes.put(kind.key(name), kind.to_document(obj))
            current[name] = obj
            lines.append(f"{kind.word} {name!r} {action}")
        return lines
    return await transact(store, decide, "applying the resources")


async def get_objects(store: Store, kind: Kind, name: str | None = None) -> list[Any]:
    objects = await _stored(Changes(store), kind)
    if name is None:
        return [objects[n] for n in sorted(objects)]
    if name not in objects:
        raise NotFound(f"{kind.word} {name!r} not found.")
    return [objects[name]]


async def delete_object(store: Store, kind: Kind, name: str, force: bool = False) -> str:
    if kind.delete is not None:
        await kind.delete(store, name, force)
    else:
        await _delete_record(store, kind, name)
    return f"{kind.word} {name!r} deleted"

