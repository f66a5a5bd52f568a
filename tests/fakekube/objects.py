"""What the API server does to an object on its way in, as pure functions: the metadata it
owns (uid, creationTimestamp, generation), the defaults it fills, the fields each endpoint may
change (a write to the main resource keeps the status, a write to /status keeps the spec, a
pod's spec is mostly immutable) and the validation that answers 422."""

from __future__ import annotations

import base64
import binascii
import copy
import datetime
import ipaddress
import re
import secrets
import uuid

from tests.fakekube.errors import bad_request, invalid
from tests.fakekube.resources import ENDPOINTSLICES, NAMESPACES, PODS, SECRETS, SERVICES, \
    Resource

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

# Where a Service's clusterIP and nodePorts come from: the apiserver's defaults
# (--service-cluster-ip-range 10.96.0.0/12, --service-node-port-range 30000-32767); the first
# address is the `kubernetes` Service's. Allocated at random, as the real allocators do.
SERVICE_CIDR = ipaddress.ip_network("10.96.0.0/12")
NODE_PORTS = (30000, 32767)
SERVICE_TYPES = ("ClusterIP", "ExternalName", "LoadBalancer", "NodePort")
ADDRESS_TYPES = ("FQDN", "IPv4", "IPv6")


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


def _service_problems(service: dict) -> list[tuple[str, str, str]]:
    spec = service["spec"]
    kind = spec.get("type")
    if kind not in SERVICE_TYPES:
        return [("FieldValueNotSupported", "spec.type", f"Unsupported value: {_quoted(kind)}: "
                 "supported values: " + ", ".join(_quoted(t) for t in SERVICE_TYPES))]
    problems = []
    if kind == "ExternalName" and not spec.get("externalName"):
        problems.append(("FieldValueRequired", "spec.externalName", "Required value"))
    ports = spec.get("ports") or []
    if not ports and kind != "ExternalName" and spec.get("clusterIP") != "None":
        problems.append(("FieldValueRequired", "spec.ports", "Required value"))
    for i, port in enumerate(ports):
        number = port.get("port") if isinstance(port, dict) else None
        if not isinstance(number, int) or isinstance(number, bool) or not 0 < number < 65536:
            problems.append(("FieldValueInvalid", f"spec.ports[{i}].port",
                             f"Invalid value: {number}: must be between 1 and 65535, "
                             "inclusive"))
    return problems


def _endpoint_slice_problems(slice_: dict) -> list[tuple[str, str, str]]:
    address_type = slice_.get("addressType")
    if not address_type:
        problems = [("FieldValueRequired", "addressType", "Required value")]
    elif address_type not in ADDRESS_TYPES:
        problems = [("FieldValueNotSupported", "addressType",
                     f"Unsupported value: {_quoted(address_type)}: supported values: "
                     + ", ".join(_quoted(t) for t in ADDRESS_TYPES))]
    else:
        problems = []
    for i, endpoint in enumerate(slice_.get("endpoints") or []):
        if not (isinstance(endpoint, dict) and endpoint.get("addresses")):
            problems.append(("FieldValueRequired", f"endpoints[{i}].addresses",
                             "Required value: must contain at least 1 address"))
    return problems


def validate(resource: Resource, obj: dict) -> None:
    meta = obj["metadata"]
    problems = _name_problems(resource, meta["name"]) + _label_problems(meta.get("labels"))
    if resource is PODS:
        problems += _pod_problems(obj)
    if resource is SECRETS:
        problems += _secret_problems(obj)
    if resource is SERVICES:
        problems += _service_problems(obj)
    if resource is ENDPOINTSLICES:
        problems += _endpoint_slice_problems(obj)
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
    if resource is SERVICES:
        obj["status"] = {"loadBalancer": {}}   # a load balancer controller reports it
        _default_service(obj)
        _allocate(obj)
    validate(resource, obj)
    return obj


def _fill(resource: Resource, obj: dict) -> None:
    """What Go's JSON encoding of the stored object would show: structs always there, empty
    metadata maps and lists gone."""
    for part in resource.always:
        if not isinstance(obj.get(part), dict):
            obj[part] = {}
    if resource is SERVICES and not isinstance(obj["status"].get("loadBalancer"), dict):
        obj["status"]["loadBalancer"] = {}
    if resource is ENDPOINTSLICES:       # not omitempty in Go: null when there are none
        obj.setdefault("endpoints", None)
        obj.setdefault("ports", None)
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
    if resource is SERVICES:
        _default_service(new)
        _keep_allocated(old, new)
        _allocate(new)
    if resource is ENDPOINTSLICES and old.get("addressType") != new.get("addressType"):
        raise invalid(resource.kind, meta["name"], [(
            "FieldValueInvalid", "addressType",
            f"Invalid value: {_quoted(new.get('addressType'))}: field is immutable")],
            resource.group)
    if "generation" in old_meta and new.get("spec") != old.get("spec"):
        meta["generation"] = old_meta["generation"] + 1
    validate(resource, new)
    return new


def _externally_accessible(spec: dict) -> bool:
    return spec.get("type") in ("NodePort", "LoadBalancer") or (
        spec.get("type") == "ClusterIP" and bool(spec.get("externalIPs")))


def _default_service(service: dict) -> None:
    """The defaults Go's SetDefaults_Service fills on every write."""
    spec = service["spec"]
    if not spec.get("sessionAffinity"):
        spec["sessionAffinity"] = "None"
    if spec["sessionAffinity"] == "None":
        spec.pop("sessionAffinityConfig", None)
    elif spec["sessionAffinity"] == "ClientIP" and not (
            (spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}).get(
            "timeoutSeconds"):
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": 10800}}
    if not spec.get("type"):
        spec["type"] = "ClusterIP"
    for port in spec.get("ports") or []:
        if isinstance(port, dict):
            if not port.get("protocol"):
                port["protocol"] = "TCP"
            if port.get("targetPort") in (None, 0, ""):
                port["targetPort"] = port.get("port")
    if _externally_accessible(spec) and not spec.get("externalTrafficPolicy"):
        spec["externalTrafficPolicy"] = "Cluster"
    if spec.get("internalTrafficPolicy") is None and \
            spec["type"] in ("ClusterIP", "NodePort", "LoadBalancer"):
        spec["internalTrafficPolicy"] = "Cluster"
    if spec["type"] == "LoadBalancer":
        spec.setdefault("allocateLoadBalancerNodePorts", True)
        for ingress in service.get("status", {}).get("loadBalancer", {}).get("ingress") or []:
            if isinstance(ingress, dict) and ingress.get("ip") and not ingress.get("ipMode"):
                ingress["ipMode"] = "VIP"


def _needs_node_ports(spec: dict) -> bool:
    return spec["type"] == "NodePort" or (
        spec["type"] == "LoadBalancer" and spec.get("allocateLoadBalancerNodePorts") is True)


def _needs_health_check_node_port(spec: dict) -> bool:
    return spec["type"] == "LoadBalancer" and spec.get("externalTrafficPolicy") == "Local"


def _ip_family(name: str, address: str, field: str) -> str:
    try:
        return f"IPv{ipaddress.ip_address(address).version}"
    except ValueError:
        raise invalid("Service", name, [(
            "FieldValueInvalid", field, f"Invalid value: {_quoted(address)}: must be a valid "
            "IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)")]) from None


def _allocate(service: dict) -> None:
    """What the real registry allocates where the spec leaves it out: a clusterIP (with
    clusterIPs, ipFamilies and ipFamilyPolicy), nodePorts and a healthCheckNodePort. Random,
    as there; the fake does not check them against the other Services."""
    spec = service["spec"]
    if spec["type"] == "ExternalName":
        return
    if not spec.get("clusterIP"):
        spec["clusterIP"] = spec["clusterIPs"][0] if spec.get("clusterIPs") else str(
            SERVICE_CIDR[2 + secrets.randbelow(SERVICE_CIDR.num_addresses - 3)])
    if not spec.get("clusterIPs"):
        spec["clusterIPs"] = [spec["clusterIP"]]
    if not spec.get("ipFamilies"):
        spec["ipFamilies"] = ["IPv4"] if spec["clusterIP"] == "None" else [
            _ip_family(service["metadata"]["name"], ip, f"spec.clusterIPs[{i}]")
            for i, ip in enumerate(spec["clusterIPs"])]
    spec.setdefault("ipFamilyPolicy", "SingleStack")

    def node_port() -> int:
        return NODE_PORTS[0] + secrets.randbelow(NODE_PORTS[1] - NODE_PORTS[0] + 1)

    if _needs_node_ports(spec):
        for port in spec.get("ports") or []:
            if isinstance(port, dict) and not port.get("nodePort"):
                port["nodePort"] = node_port()
    if _needs_health_check_node_port(spec) and not spec.get("healthCheckNodePort"):
        spec["healthCheckNodePort"] = node_port()


def _keep_allocated(old: dict, new: dict) -> None:
    """An update keeps what was allocated where it leaves it out (the real registry's
    patchAllocatedValues); the clusterIP may not change."""
    before, after = old["spec"], new["spec"]
    if "ExternalName" in (before["type"], after["type"]):
        return
    if not after.get("clusterIP"):
        after["clusterIP"] = before.get("clusterIP")
    if not after.get("clusterIPs"):
        after["clusterIPs"] = before.get("clusterIPs")
    for field in ("ipFamilies", "ipFamilyPolicy"):
        if not after.get(field) and before.get(field):
            after[field] = before[field]
    if after["clusterIP"] != before.get("clusterIP"):
        raise invalid("Service", new["metadata"]["name"], [(
            "FieldValueInvalid", "spec.clusterIPs[0]",
            f"Invalid value: {_quoted(after['clusterIP'])}: may not change once set")])
    if _needs_node_ports(before) and _needs_node_ports(after):
        ports = [p for p in after.get("ports") or [] if isinstance(p, dict)]
        used = {p.get("nodePort") for p in ports}
        for port in ports:
            if not port.get("nodePort"):
                kept = next((p.get("nodePort") for p in before.get("ports") or []
                             if p.get("name") == port.get("name")), None)
                if kept and kept not in used:
                    port["nodePort"] = kept
    if _needs_health_check_node_port(before) and _needs_health_check_node_port(after) and \
            not after.get("healthCheckNodePort"):
        after["healthCheckNodePort"] = before.get("healthCheckNodePort")


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

