"""The three PATCH bodies the API server takes: JSON merge patch (RFC 7386, what `kubectl
label` and `annotate` send), strategic merge patch (what `kubectl apply` and `kubectl patch`
send by default, and kubelets for node status) and JSON patch (RFC 6902, `kubectl patch
--type json`). Each returns a new object and leaves its input alone."""

from __future__ import annotations

import copy
import json

# The lists a strategic merge patch merges item by item, by kind and by path in the object
# (a list's items add no step: "spec.containers.ports" are the ports of any container), with
# their `patchMergeKey`, from the struct tags of k8s.io/api 1.35 for the kinds the fake
# serves; "*" holds those of every kind. Other lists are replaced whole: an EndpointSlice's
# `endpoints`, `ports` and endpoints' `addresses` (strings), a Node's `taints`, a Service's
# `loadBalancer.ingress`, a Pod's `containerStatuses`...
_CONTAINER_LISTS = {"ports": "containerPort", "env": "name", "volumeMounts": "mountPath",
                    "volumeDevices": "devicePath"}
_CONTAINERS = ("containers", "initContainers", "ephemeralContainers")
MERGE_KEYS: dict[str, dict[str, str]] = {
    "*": {"metadata.ownerReferences": "uid"},
    "Pod": {
        **{f"spec.{group}": "name" for group in _CONTAINERS},
        **{f"spec.{group}.{field}": key
           for group in _CONTAINERS for field, key in _CONTAINER_LISTS.items()},
        "spec.volumes": "name", "spec.imagePullSecrets": "name", "spec.hostAliases": "ip",
        "spec.topologySpreadConstraints": "topologyKey", "spec.schedulingGates": "name",
        "spec.resourceClaims": "name", "status.conditions": "type", "status.podIPs": "ip",
        "status.hostIPs": "ip", "status.resourceClaimStatuses": "name",
    },
    "Node": {"status.conditions": "type", "status.addresses": "type"},
    "Namespace": {"status.conditions": "type"},
    "Service": {"spec.ports": "port", "status.conditions": "type"},
}
# Lists of scalars merged as sets (`patchStrategy: merge` without a key), by kind and path (a
# Namespace's `spec.finalizers` has no strategy: replaced whole).
MERGED_SCALAR_LISTS: dict[str, set[str]] = {
    "*": {"metadata.finalizers"},
    "Node": {"spec.podCIDRs"},
}


def merge_key(kind: str, path: str) -> str | None:
    """The key the list at `path` in an object of `kind` merges on; None if it has none."""
    return MERGE_KEYS["*"].get(path) or MERGE_KEYS.get(kind, {}).get(path)


def _merged_as_set(kind: str, path: str) -> bool:
    return path in MERGED_SCALAR_LISTS["*"] | MERGED_SCALAR_LISTS.get(kind, set())


MEDIA_MERGE = "application/merge-patch+json"
MEDIA_STRATEGIC = "application/strategic-merge-patch+json"
MEDIA_JSON = "application/json-patch+json"


class PatchError(ValueError):
    """A patch that cannot apply (the server answers 422 or 400)."""


def apply(media_type: str, target: dict, body: bytes) -> dict:
    """`target` patched by `body` sent as `media_type`."""
    try:
        patch = json.loads(body or b"null")
    except ValueError as e:
        raise PatchError(f"error decoding patch: {e}") from None
    if media_type == MEDIA_MERGE:
        if not isinstance(patch, dict):
            raise PatchError("a merge patch must be a JSON object")
        return merge_patch(target, patch)
    if media_type == MEDIA_STRATEGIC:
        if not isinstance(patch, dict):
            raise PatchError("a strategic merge patch must be a JSON object")
        result = strategic_merge_patch(target, patch)
        return {} if result is None else result
    if media_type == MEDIA_JSON:
        if not isinstance(patch, list):
            raise PatchError("a JSON patch must be a JSON array of operations")
        return json_patch(target, patch)
    raise ValueError(media_type)


# ---------------------------------------------------------------------------------------------
# RFC 7386

def merge_patch(target: object, patch: object) -> object:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# ---------------------------------------------------------------------------------------------
# Strategic merge patch (the subset of k8s.io/apimachinery/pkg/util/strategicpatch that
# kubectl and kubelets send: merge keys, `$patch: replace|delete|merge`,
# `$deleteFromPrimitiveList/<field>` and `$setElementOrder/<field>`)

_DELETE = object()
_SET_ORDER = "$setElementOrder/"
_DELETE_FROM = "$deleteFromPrimitiveList/"


def _strip_directives(value: object) -> object:
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items()
                if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value
                if not (isinstance(v, dict) and "$patch" in v and len(v) == 1)]
    return copy.deepcopy(value)


def strategic_merge_patch(original: dict, patch: dict) -> dict | None:
    """`original` with `patch` applied, its lists merged as in `original`'s kind; None when the
    patch says `$patch: delete`."""
    original = original if isinstance(original, dict) else {}
    result = _merge_map(original, patch, original.get("kind", ""), "")
    return None if result is _DELETE else result


def _join(path: str, field: str) -> str:
    return f"{path}.{field}" if path else field


def _merge_map(original: dict, patch: dict, kind: str, path: str) -> object:
    """`original` (the map at `path` in an object of `kind`) with `patch` applied."""
    directive = patch.get("$patch")
    if directive == "delete":
        return _DELETE
    if directive == "replace":
        return _strip_directives(patch)
    if directive not in (None, "merge"):
        raise PatchError(f"Unknown patch type: {directive}")
    result = copy.deepcopy(original)
    orders: dict[str, list] = {}
    removals: dict[str, list] = {}
    for key, value in patch.items():
        if key.startswith(_SET_ORDER):
            orders[key[len(_SET_ORDER):]] = value
        elif key.startswith(_DELETE_FROM):
            removals[key[len(_DELETE_FROM):]] = value
        elif key.startswith("$"):
            continue
        elif value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            merged = _merge_map(result.get(key) if isinstance(result.get(key), dict) else {},
                                value, kind, _join(path, key))
            if merged is _DELETE:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list):
            old = result.get(key)
            result[key] = _merge_list(kind, _join(path, key),
                                      old if isinstance(old, list) else [], value)
        else:
            result[key] = value
    for key, values in removals.items():
        if isinstance(result.get(key), list):
            result[key] = [v for v in result[key] if v not in values]
    for key, order in orders.items():
        if isinstance(result.get(key), list):
            result[key] = _reorder(merge_key(kind, _join(path, key)), result[key], order)
    return result


def _merge_list(kind: str, path: str, original: list, patch: list) -> list:
    """`original` (the list at `path` in an object of `kind`) with `patch` applied."""
    if any(isinstance(i, dict) and i.get("$patch") == "replace" for i in patch):
        return _strip_directives([i for i in patch
                                  if not (isinstance(i, dict) and i.get("$patch"))])
    key = merge_key(kind, path)
    if key is None:
        if _merged_as_set(kind, path):
            return original + [v for v in patch if v not in original]
        return _strip_directives(patch)
    result = copy.deepcopy(original)
    for item in patch:
        if not isinstance(item, dict):
            raise PatchError(f"{path}: a list merged on {key!r} takes objects")
        if key not in item:
            raise PatchError(f"map: {item} does not contain declared merge key: {key}")
        at = next((i for i, old in enumerate(result)
                   if isinstance(old, dict) and old.get(key) == item[key]), None)
        if item.get("$patch") == "delete":
            if at is not None:
                del result[at]
        elif at is None:
            result.append(_strip_directives(item))
        else:
            result[at] = _merge_map(result[at], item, kind, path)
    return result


def _reorder(key: str | None, items: list, order: list) -> list:
    def ident(item: object) -> object:
        return item.get(key) if key and isinstance(item, dict) else item

    wanted = [ident(o) for o in order]
    ranked = [i for w in wanted for i in items if ident(i) == w]
    return ranked + [i for i in items if ident(i) not in wanted]


# ---------------------------------------------------------------------------------------------
# RFC 6902

def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: object, parts: list[str]) -> tuple[object, str]:
    node = doc
    for part in parts[:-1]:
        node = _child(node, part)
    return node, parts[-1]


def _child(node: object, part: str) -> object:
    try:
        if isinstance(node, list):
            return node[int(part)]
        if isinstance(node, dict):
            return node[part]
    except (KeyError, IndexError, ValueError):
        pass
    raise PatchError(f"doc is missing path: {part!r}")


def _get(doc: object, path: str) -> object:
    node = doc
    for part in _pointer(path):
        node = _child(node, part)
    return node


def _add(doc: object, path: str, value: object) -> object:
    parts = _pointer(path)
    if not parts:
        return value
    node, last = _parent(doc, parts)
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last) if last.isdigit() else -1
        if not 0 <= index <= len(node):
            raise PatchError(f"index out of range: {last!r}")
        node.insert(index, value)
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise PatchError(f"doc is missing path: {path!r}")
    return doc


def _remove(doc: object, path: str) -> object:
    parts = _pointer(path)
    node, last = _parent(doc, parts)
    _child(node, last)
    del node[int(last) if isinstance(node, list) else last]
    return doc


def json_patch(target: dict, operations: list) -> dict:
    doc = copy.deepcopy(target)
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(f"invalid JSON patch operation: {op!r}")
        kind, path = op["op"], op["path"]
        if kind in ("add", "replace", "test") and "value" not in op:
            raise PatchError(f"{kind} operation has no value")
        if kind == "add":
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif kind == "remove":
            doc = _remove(doc, path)
        elif kind == "replace":
            _get(doc, path)
            doc = _add(_remove(doc, path), path, copy.deepcopy(op["value"])) if path else \
                copy.deepcopy(op["value"])
        elif kind in ("move", "copy"):
            value = copy.deepcopy(_get(doc, op.get("from", "")))
            if kind == "move":
                doc = _remove(doc, op["from"])
            doc = _add(doc, path, value)
        elif kind == "test":
            if _get(doc, path) != op["value"]:
                raise PatchError(f"testing value {path} failed")
        else:
            raise PatchError(f"Unexpected kind: {kind}")
    if not isinstance(doc, dict):
        raise PatchError("the patched document is not an object")
    return doc
