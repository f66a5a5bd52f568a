"""Resource kinds `pipitctl` manages and the generic apply / create / get / delete over them.

A file with several documents is validated completely (each document against the stored
resources and the documents before it) and then written in ONE transaction, so either all of
it lands or none of it does.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ipam import keys
from ipam.errors import AlreadyExists, InvalidResource, NotFound, PipitError
from ipam.pool import check_pool_fits, pool_from_spec, pool_to_document
from ipam.pools import delete_pool
from ipam.resource import parse_documents, read_document
from ipam.store import Store
from ipam.txn import Changes, transact
from pipitctl.output import yes_no

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kind:
    name: str  # as in documents: IPPool
    plural: str  # key segment and CLI word: ippools
    aliases: tuple[str, ...]
    parse: Callable[[str, dict], Any]  # (name, spec) -> validated object
    to_document: Callable[[Any], dict]
    check: Callable[[Any, list[Any]], None]  # against the stored objects of this kind
    columns: tuple[str, ...]
    row: Callable[[Any], tuple]
    wide_columns: tuple[str, ...]
    wide_row: Callable[[Any], tuple]
    delete: Callable[[Store, str, bool], Awaitable[object]] | None = None

    def key(self, name: str) -> str:
        return keys.resource_key(self.plural, name)

    @property
    def prefix(self) -> str:
        return keys.resource_prefix(self.plural)

    @property
    def word(self) -> str:
        return self.name.lower()


IPPOOL = Kind(
    name="IPPool", plural="ippools", aliases=("ippool", "ipp", "pool", "pools"),
    parse=pool_from_spec, to_document=pool_to_document, check=check_pool_fits,
    columns=("NAME", "CIDR", "SELECTOR"),
    row=lambda p: (p.name, p.cidr, p.node_selector),
    wide_columns=("NAME", "CIDR", "BLOCKSIZE", "NAT", "IPIPMODE", "VXLANMODE", "DISABLED",
                  "DISABLEBGPEXPORT", "SELECTOR"),
    wide_row=lambda p: (p.name, p.cidr, p.block_size, yes_no(p.nat_outgoing), p.ipip_mode,
                        p.vxlan_mode, yes_no(p.disabled), yes_no(p.disable_bgp_export),
                        p.node_selector),
    delete=delete_pool,
)

KINDS: tuple[Kind, ...] = (IPPOOL,)


def kind_named(word: str) -> Kind:
    """The kind a CLI word or document `kind` names (ippool, ippools, IPPool...)."""
    lowered = word.lower()
    for kind in KINDS:
        if lowered in (kind.name.lower(), kind.plural, *kind.aliases):
            return kind
    known = ", ".join(k.plural for k in KINDS)
    raise InvalidResource(f"unknown resource type {word!r}; Pipit knows: {known}.")


def _name_of(obj: Any) -> str:
    return obj.name


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
    for number, doc in enumerate(flat, 1):
        try:
            if not isinstance(doc, dict):
                raise InvalidResource("it is not a mapping with apiVersion, kind, metadata and "
                                      "spec.")
            document = read_document(doc)
            kind = kind_named(document.kind)
            if document.kind != kind.name:
                raise InvalidResource(f"kind {document.kind!r} should be written {kind.name!r}.")
            objects.append((kind, kind.parse(document.name, dict(document.spec))))
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
            found[document.name] = kind.parse(document.name, dict(document.spec))
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
            name = _name_of(obj)
            prefix = f"document {number}: " if len(objects) > 1 else ""
            if create_only and name in current:
                raise AlreadyExists(f"{prefix}{kind.word} {name!r} already exists; use "
                                    "`pipitctl apply` to change it.")
            try:
                kind.check(obj, list(current.values()))
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
        entry = await store.get(kind.key(name))
        if entry is None:
            raise NotFound(f"{kind.word} {name!r} not found.")
        await store.txn({entry.key: entry.mod_revision}, delete=[entry.key])
    return f"{kind.word} {name!r} deleted"

