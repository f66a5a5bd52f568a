"""Request bodies in Kubernetes' protobuf encoding, turned into the JSON objects they stand for.

kubectl's and helm's typed clients (`kubectl create namespace|configmap|secret`, helm's
release Secrets and their deletion) send
`application/vnd.kubernetes.protobuf`: the magic `k8s\\0`, then a runtime.Unknown envelope
(apiVersion, kind, raw) whose raw bytes are the object. Only the kinds and fields those
commands send are described here; anything else is refused (415), as a server would refuse a
format it does not read. Answers are always JSON, which those clients accept too."""

from __future__ import annotations

import base64

MEDIA_TYPE = "application/vnd.kubernetes.protobuf"
MAGIC = b"k8s\x00"

STRING, BYTES, INT, RAW = "string", "bytes", "int", "raw"   # BYTES: base64 in JSON

# field number -> (JSON name, type); a type is STRING, BYTES, INT, a nested schema (dict),
# ("map", value type) or ("list", item type)
OBJECT_META = {
    1: ("name", STRING), 2: ("generateName", STRING), 3: ("namespace", STRING),
    5: ("uid", STRING), 6: ("resourceVersion", STRING), 7: ("generation", INT),
    11: ("labels", ("map", STRING)), 12: ("annotations", ("map", STRING)),
    14: ("finalizers", ("list", STRING)),
}
SCHEMAS = {
    ("v1", "Namespace"): {1: ("metadata", OBJECT_META),
                          2: ("spec", {1: ("finalizers", ("list", STRING))})},
    ("v1", "ConfigMap"): {1: ("metadata", OBJECT_META), 2: ("data", ("map", STRING)),
                          3: ("binaryData", ("map", BYTES)), 4: ("immutable", INT)},
    ("v1", "Secret"): {1: ("metadata", OBJECT_META), 2: ("data", ("map", BYTES)),
                       3: ("type", STRING), 4: ("stringData", ("map", STRING)),
                       5: ("immutable", INT)},
}
DELETE_OPTIONS = {1: ("gracePeriodSeconds", INT),
                  2: ("preconditions", {1: ("uid", STRING), 2: ("resourceVersion", STRING)}),
                  4: ("propagationPolicy", STRING), 5: ("dryRun", ("list", STRING))}
SCHEMAS[("v1", "DeleteOptions")] = SCHEMAS[("meta.k8s.io/v1", "DeleteOptions")] = DELETE_OPTIONS
_ENVELOPE = {1: ("typeMeta", {1: ("apiVersion", STRING), 2: ("kind", STRING)}),
             2: ("raw", RAW)}
_BOOLEANS = {"immutable"}


class UnsupportedBody(ValueError):
    """A protobuf body this module cannot read."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise UnsupportedBody("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes):
    """(field number, wire type, value) of each field of a message."""
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos:pos + size], pos + size
        else:
            raise UnsupportedBody(f"wire type {wire}")
        yield number, wire, value


def _scalar(kind: str, value: int | bytes) -> object:
    if kind == STRING:
        return value.decode() if isinstance(value, bytes) else str(value)
    if kind == RAW:
        return value
    if kind == BYTES:
        return base64.b64encode(value).decode() if isinstance(value, bytes) else ""
    return value


def _message(data: bytes, schema: dict) -> dict:
    out: dict[str, object] = {}
    for number, _, value in _fields(data):
        if number not in schema:
            continue
        name, kind = schema[number]
        if isinstance(kind, dict):
            out[name] = _message(value, kind)
        elif isinstance(kind, tuple) and kind[0] == "map":
            entry = _message(value, {1: ("key", STRING), 2: ("value", kind[1])})
            out.setdefault(name, {})[entry.get("key", "")] = entry.get(
                "value", _scalar(kind[1], b""))
        elif isinstance(kind, tuple):
            out.setdefault(name, []).append(_scalar(kind[1], value))
        elif value:   # Go writes empty fields that its JSON omits
            out[name] = bool(value) if name in _BOOLEANS else _scalar(kind, value)
    return out


def decode(body: bytes) -> dict:
    """The JSON form of a protobuf request body."""
    if not body.startswith(MAGIC):
        raise UnsupportedBody("no k8s protobuf magic number")
    envelope = _message(body[len(MAGIC):], _ENVELOPE)
    type_meta = envelope.get("typeMeta", {})
    api_version, kind = type_meta.get("apiVersion", ""), type_meta.get("kind", "")
    schema = SCHEMAS.get((api_version, kind))
    if schema is None:
        raise UnsupportedBody(f"{kind} {api_version} in protobuf")
    obj = _message(envelope.get("raw", b""), schema)
    return {"apiVersion": api_version, "kind": kind, **obj}
