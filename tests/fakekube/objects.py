"""What the API server does to an object on its way in, as pure functions: the metadata it
owns (uid, creationTimestamp, generation), the defaults it fills, the fields each endpoint may
change (a write to the main resource keeps the status, a write to /status keeps the spec, a
pod's spec is mostly immutable) and the validation that answers 422."""

from __future__ import annotations

import base64
import binascii
import copy
import datetime
import re
import secrets
import uuid

from tests.fakekube.errors import bad_request, invalid
from tests.fakekube.resources import NAMESPACES, PODS, SECRETS, Resource

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = rf"{_DNS_LABEL}(\.{_DNS_LABEL})*"
_LABEL_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_GENERATED_CHARS = "bcdfghjklmnpqrstvwxz2456789"   # what the apiserver's generateName uses

SUBDOMAIN_MESSAGE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' "
    "or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex "
    rf"used for validation is '{_DNS_SUBDOMAIN}')")
LABEL_MESSAGE = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
    "must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex "
    rf"used for validation is '{_DNS_LABEL}')")
LABEL_VALUE_MESSAGE = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or "
    "'my_value',  or '12345', regex used for validation is "
    "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')")

# What `kubectl`'s pod update may change in a pod's spec (the rest is immutable).
POD_MUTABLE_SPEC = ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _quoted(value: object) -> str:
    return '"' + str(value).replace('"', '\\"') + '"'


def _name_problems(resource: Resource, name: str) -> list[tuple[str, str, str]]:
    if resource is NAMESPACES:
        if len(name) > 63 or not re.fullmatch(_DNS_LABEL, name):
            return [("FieldValueInvalid", "metadata.name",
                     f"Invalid value: {_quoted(name)}: {LABEL_MESSAGE}")]
    elif len(name) > 253 or not re.fullmatch(_DNS_SUBDOMAIN, name):
        return [("FieldValueInvalid", "metadata.name",
                 f"Invalid value: {_quoted(name)}: {SUBDOMAIN_MESSAGE}")]
    return []


def _label_problems(labels: object) -> list[tuple[str, str, str]]:
    if labels is None:
        return []
    if not isinstance(labels, dict):
        return [("FieldValueInvalid", "metadata.labels", "Invalid value: must be a map")]
    problems = []
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if (len(name) > 63 or not re.fullmatch(_LABEL_NAME, name)
                or (prefix and (len(prefix) > 253 or not re.fullmatch(_DNS_SUBDOMAIN, prefix)))):
            problems.append(("FieldValueInvalid", "metadata.labels",
                             f"Invalid value: {_quoted(key)}: name part must consist of "
                             "alphanumeric characters, '-', '_' or '.', and must start and "
                             "end with an alphanumeric character"))
        if not isinstance(value, str) or len(value) > 63 or not re.fullmatch(
                f"({_LABEL_NAME})?", value):
            problems.append(("FieldValueInvalid", "metadata.labels",
                             f"Invalid value: {_quoted(value)}: {LABEL_VALUE_MESSAGE}"))
    return problems


def _pod_problems(pod: dict) -> list[tuple[str, str, str]]:
    containers = (pod.get("spec") or {}).get("containers")
    if not containers:
        return [("FieldValueRequired", "spec.containers", "Required value")]
    problems = []
    for i, container in enumerate(containers):
        for field in ("name", "image"):
            if not (isinstance(container, dict) and container.get(field)):
                problems.append(("FieldValueRequired", f"spec.containers[{i}].{field}",
                                 "Required value"))
    return problems


def _secret_problems(secret: dict) -> list[tuple[str, str, str]]:
    problems = []
    for key, value in (secret.get("data") or {}).items():
        try:
            base64.b64decode(value or "", validate=True)
        except (binascii.Error, TypeError):
            problems.append(("FieldValueInvalid", f"data[{key}]",
                             'Invalid value: "<secret contents redacted>": illegal base64 data'))
    return problems


def validate(resource: Resource, obj: dict) -> None:
    meta = obj["metadata"]
    problems = _name_problems(resource, meta["name"]) + _label_problems(meta.get("labels"))
    if resource is PODS:
        problems += _pod_problems(obj)
    if resource is SECRETS:
        problems += _secret_problems(obj)
    if problems:
        raise invalid(resource.kind, meta["name"], problems, resource.group)


def check_identity(resource: Resource, namespace: str | None, body: object,
                   name: str | None = None) -> dict:
    """The body as an object of `resource`, addressed by the request (400 otherwise)."""
    if not isinstance(body, dict):
        raise bad_request(f"the body of the request was not a {resource.kind} object")
    if body.get("apiVersion", resource.api_version) != resource.api_version:
        raise bad_request(f"the API version in the data ({body['apiVersion']}) does not match "
                          f"the expected API version ({resource.api_version})")
    if body.get("kind", resource.kind) != resource.kind:
        raise bad_request(f"the kind in the data ({body['kind']}) does not match the expected "
                          f"kind ({resource.kind})")
    obj = copy.deepcopy(body)
    obj["apiVersion"], obj["kind"] = resource.api_version, resource.kind
    meta = obj.get("metadata")
    if meta is None:
        meta = obj["metadata"] = {}
    if not isinstance(meta, dict):
        raise bad_request("metadata must be an object")
    if resource.namespaced:
        if meta.get("namespace", namespace) != namespace:
            raise bad_request("the namespace of the provided object does not match the "
                              "namespace sent on the request")
        meta["namespace"] = namespace
    else:
        meta.pop("namespace", None)
    if name is not None:
        if meta.get("name", name) != name:
            raise bad_request(f"the name of the object ({meta['name']}) does not match the "
                              f"name on the URL ({name})")
        meta["name"] = name
    return obj


def prepare_create(resource: Resource, obj: dict) -> dict:
    """A new object: name (or generateName), server-owned metadata, defaults; validated."""
    meta = obj["metadata"]
    if not meta.get("name"):
        if not meta.get("generateName"):
            raise invalid(resource.kind, "", [("FieldValueRequired", "metadata.name",
                                               "Required value: name or generateName is "
                                               "required")], resource.group)
        meta["name"] = meta["generateName"] + "".join(
            secrets.choice(_GENERATED_CHARS) for _ in range(5))
    for owned in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds",
                  "selfLink"):
        meta.pop(owned, None)
    meta["uid"] = str(uuid.uuid4())
    meta["creationTimestamp"] = now()
    _fill(resource, obj)
    if "spec" in obj:
        meta["generation"] = 1
    if resource is NAMESPACES:
        obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
        obj["status"] = {"phase": "Active"}
    if resource is PODS:
        obj["status"] = {"phase": "Pending"}   # the kubelet reports the rest
    if resource is SECRETS:
        _fold_string_data(obj)
    validate(resource, obj)
    return obj


def _fill(resource: Resource, obj: dict) -> None:
    """What Go's JSON encoding of the stored object would show: structs always there, empty
    metadata maps and lists gone."""
    for part in resource.always:
        if not isinstance(obj.get(part), dict):
            obj[part] = {}
    meta = obj["metadata"]
    for field in ("labels", "annotations", "finalizers", "ownerReferences", "managedFields"):
        if field in meta and not meta[field]:
            del meta[field]


def _fold_string_data(secret: dict) -> None:
    secret.setdefault("type", "Opaque")
    for key, value in (secret.pop("stringData", None) or {}).items():
        secret.setdefault("data", {})[key] = base64.b64encode(str(value).encode()).decode()


def prepare_update(resource: Resource, old: dict, new: dict, subresource: str | None) -> dict:
    """`new` as it will be stored over `old` (same name and namespace): server-owned
    metadata kept, the part the endpoint does not own kept from `old`, generation bumped when
    the spec changes; validated. The caller has checked the resourceVersion precondition."""
    meta, old_meta = new["metadata"], old["metadata"]
    for owned in ("uid", "creationTimestamp", "deletionTimestamp",
                  "deletionGracePeriodSeconds", "generation"):
        if owned in old_meta:
            meta[owned] = old_meta[owned]
        else:
            meta.pop(owned, None)
    meta["resourceVersion"] = old_meta["resourceVersion"]
    if subresource == "status":
        if "spec" in old:
            new["spec"] = copy.deepcopy(old["spec"])
        else:
            new.pop("spec", None)
    elif resource.status:
        if "status" in old:
            new["status"] = copy.deepcopy(old["status"])
        else:
            new.pop("status", None)
    _fill(resource, new)
    if resource is PODS and subresource is None:
        _check_pod_spec_change(old, new)
    if resource is SECRETS:
        _fold_string_data(new)
    if "generation" in old_meta and new.get("spec") != old.get("spec"):
        meta["generation"] = old_meta["generation"] + 1
    validate(resource, new)
    return new


def _check_pod_spec_change(old: dict, new: dict) -> None:
    def frozen(spec: dict | None) -> dict:
        spec = copy.deepcopy(spec or {})
        for field in POD_MUTABLE_SPEC:
            spec.pop(field, None)
        for group in ("containers", "initContainers"):
            for container in spec.get(group) or []:
                if isinstance(container, dict):
                    container.pop("image", None)
        return spec

    if frozen(old.get("spec")) != frozen(new.get("spec")):
        raise invalid("Pod", new["metadata"]["name"], [(
            "FieldValueForbidden", "spec",
            "Forbidden: pod updates may not change fields other than `spec.containers[*].image`,"
            "`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` "
            "(only additions to existing tolerations),`spec.terminationGracePeriodSeconds` "
            "(allow it to be set to 1 if it was previously negative)")])


def check_immutable(resource: Resource, old: dict, new: dict) -> None:
    """A patch may not rename or move an object."""
    for field in ("name", "namespace"):
        if new.get("metadata", {}).get(field) != old["metadata"].get(field):
            raise invalid(resource.kind, old["metadata"]["name"], [(
                "FieldValueInvalid", f"metadata.{field}",
                f"Invalid value: {_quoted(new.get('metadata', {}).get(field))}: "
                "field is immutable")], resource.group)


def same_content(a: dict, b: dict) -> bool:
    """Equal apart from the resourceVersion (an update that changes nothing is not written)."""
    def strip(obj: dict) -> dict:
        return {**obj, "metadata": {k: v for k, v in obj["metadata"].items()
                                    if k != "resourceVersion"}}
    return strip(a) == strip(b)

