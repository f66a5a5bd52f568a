"""The three PATCH bodies the API server takes: JSON merge patch (RFC 7386, what `kubectl
label` and `annotate` send), strategic merge patch (what `kubectl apply` and `kubectl patch`
send by default, and kubelets for node status) and JSON patch (RFC 6902, `kubectl patch
--type json`). Each returns a new object and leaves its input alone."""

from __future__ import annotations

import copy
import json

# Lists merged item by item on this key (the `patchMergeKey` of the Kubernetes types Pipit
# and kubectl touch); other lists of objects are replaced whole.
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name",
    "env": "name", "volumes": "name", "volumeMounts": "mountPath",
    "volumeDevices": "devicePath", "imagePullSecrets": "name", "ports": "containerPort",
    "conditions": "type", "addresses": "type", "ownerReferences": "uid",
    "hostAliases": "ip", "resourceClaims": "name", "topologySpreadConstraints": "topologyKey",
    "podIPs": "ip", "hostIPs": "ip",
}
# Lists of scalars merged as sets (`patchStrategy: merge` without a key).
MERGED_SCALAR_LISTS = {"finalizers"}

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
    """`original` with `patch` applied; None when the patch says `$patch: delete`."""
    result = _merge_map(original if isinstance(original, dict) else {}, patch)
    return None if result is _DELETE else result


def _merge_map(original: dict, patch: dict) -> object:
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
                                value)
            if merged is _DELETE:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list):
            old = result.get(key)
            result[key] = _merge_list(key, old if isinstance(old, list) else [], value)
        else:
            result[key] = value
    for key, values in removals.items():
        if isinstance(result.get(key), list):
            result[key] = [v for v in result[key] if v not in values]
    for key, order in orders.items():
        if isinstance(result.get(key), list):
            result[key] = _reorder(key, result[key], order)
    return result


def _merge_list(field: str, original: list, patch: list) -> list:
    if any(isinstance(i, dict) and i.get("$patch") == "replace" for i in patch):
        return _strip_directives([i for i in patch
                                  if not (isinstance(i, dict) and i.get("$patch"))])
    key = MERGE_KEYS.get(field)
    if key is None:
        if field in MERGED_SCALAR_LISTS:
            return original + [v for v in patch if v not in original]
        return _strip_directives(patch)
    result = copy.deepcopy(original)
    for item in patch:
        if not isinstance(item, dict):
            raise PatchError(f"{field}: a list merged on {key!r} takes objects")
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
            result[at] = _merge_map(result[at], item)
    return result


def _reorder(field: str, items: list, order: list) -> list:
    key = MERGE_KEYS.get(field)

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
