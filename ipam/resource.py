"""The resource envelope shared by every kind: calicoctl-style YAML/JSON documents.

    apiVersion: pipit.dev/v1
    kind: IPPool
    metadata: {name: pool-a}
    spec: {...camelCase fields...}

The same shape is what etcd stores under /pipit/resources/<plural>/<name>.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import yaml

from ipam.errors import InvalidResource

API_VERSION = "pipit.dev/v1"
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def shown(value: object, limit: int = 60) -> str:
    """A value as an error message quotes it: its repr, cut short when it is long."""
    if isinstance(value, int) and value.bit_length() > 200:  # (repr fails past 4300 digits)
        return f"a number of about {int(value.bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@dataclass(frozen=True)
class Document:
    kind: str
    name: str
    spec: Mapping
    labels: Mapping[str, str]


def parse_documents(text: str) -> list[dict]:
    """Every non-empty document of a YAML (or JSON) stream, in order."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "cannot be parsed"
        raise InvalidResource(f"the input is not valid YAML{where}: {problem}.") from None
    for number, doc in enumerate(docs, 1):
        if not isinstance(doc, dict):
            raise InvalidResource(f"document {number} is not a mapping with apiVersion, kind, "
                                  "metadata and spec.")
    return docs


def check_name(kind: str, name: object) -> str:
    if name is None or name == "":
        raise InvalidResource(f"{kind} has no metadata.name; give it one, such as 'default'.")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidResource(
            f"{kind} name {name!r} is not valid: use lower-case letters, digits, '-' and '.', "
            "starting and ending with a letter or digit.")
    return name


def read_document(doc: Mapping) -> Document:
    """Check the envelope of one document (not its spec)."""
    kind = doc.get("kind")
    if not isinstance(kind, str) or not kind:
        raise InvalidResource("a document has no kind.")
    api = doc.get("apiVersion")
    if api != API_VERSION:
        raise InvalidResource(f"{kind} has apiVersion {api!r}; Pipit reads {API_VERSION!r}.")
    unknown = set(doc) - {"apiVersion", "kind", "metadata", "spec"}
    if unknown:
        raise InvalidResource(f"{kind} has unknown top-level field {sorted(unknown)[0]!r}.")
    metadata = doc.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise InvalidResource(f"{kind} metadata must be a mapping.")
    name = check_name(kind, metadata.get("name"))
    labels = metadata.get("labels") or {}
    if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise InvalidResource(f"{kind} {name!r}: metadata.labels must map strings to strings.")
    spec = doc.get("spec")
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise InvalidResource(f"{kind} {name!r}: spec must be a mapping.")
    return Document(kind, name, spec, labels)


def make_document(kind: str, name: str, spec: Mapping,
                  labels: Mapping[str, str] | None = None) -> dict:
    metadata: dict = {"name": name}
    if labels:
        metadata["labels"] = dict(labels)
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": metadata, "spec": dict(spec)}


class SpecReader:
    """Typed access to a spec's fields with one-sentence errors naming the resource."""

    def __init__(self, kind: str, name: str, spec: Mapping, fields: set[str]):
        self.where = f"{kind} {name!r}"
        unknown = sorted(set(spec) - fields)
        if unknown:
            raise InvalidResource(f"{self.where}: unknown spec field {unknown[0]!r} (known: "
                                  f"{', '.join(sorted(fields))}).")
        self.spec = spec

    def fail(self, message: str) -> InvalidResource:
        return InvalidResource(f"{self.where}: {message}")

    def _typed(self, field: str, default, types: tuple, what: str):
        value = self.spec.get(field, default)
        if value is None:
            return default
        # bool is an int in Python; a count must not accept true/false.
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise self.fail(f"{field} must be {what}, not {shown(value)}.")
        return value

    def string(self, field: str, default: str | None = None) -> str | None:
        return self._typed(field, default, (str,), "a string")

    def boolean(self, field: str, default: bool = False) -> bool:
        return self._typed(field, default, (bool,), "true or false")

    def integer(self, field: str, default: int | None = None) -> int | None:
        return self._typed(field, default, (int,), "a whole number")

    def choice(self, field: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.string(field, default)
        if value not in choices:
            raise self.fail(f"{field} {shown(value)} is not one of {', '.join(choices)}.")
        return value
