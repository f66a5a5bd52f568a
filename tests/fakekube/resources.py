"""The resources the fake serves and the discovery documents that describe them (`/api`,
`/api/v1`, `/apis`, `/apis/<group>`, `/apis/<group>/<version>`), in the legacy (not aggregated)
form, which kubectl and client-go fall back to."""

from __future__ import annotations

from dataclasses import dataclass

VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
COMMON_FIELDS = frozenset({"metadata.name", "metadata.namespace"})


@dataclass(frozen=True)
class Resource:
    group: str                 # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    status: bool = False       # has a /status subresource (main writes keep the status)
    fields: frozenset[str] = frozenset()   # field selectors beyond metadata.name/namespace
    returns_deleted: bool = False   # DELETE answers with the object, not a Status (pods)
    always: tuple[str, ...] = ()    # top-level fields always there ({} when empty), as from Go
    categories: tuple[str, ...] = ()   # as `kubectl get all` finds them

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> str:
        """Unique across groups, used to key stored objects."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def field_selectors(self) -> frozenset[str]:
        return COMMON_FIELDS | self.fields


NAMESPACES = Resource("", "v1", "namespaces", "Namespace", False, ("ns",), status=True,
                      fields=frozenset({"status.phase"}), always=("spec", "status"))
NODES = Resource("", "v1", "nodes", "Node", False, ("no",), status=True,
                 fields=frozenset({"spec.unschedulable"}), always=("spec", "status"))
PODS = Resource("", "v1", "pods", "Pod", True, ("po",), status=True, returns_deleted=True,
                always=("spec", "status"), categories=("all",),
                fields=frozenset({"spec.nodeName", "spec.restartPolicy", "spec.schedulerName",
                                  "spec.serviceAccountName", "spec.hostNetwork", "status.phase",
                                  "status.podIP", "status.nominatedNodeName"}))
SECRETS = Resource("", "v1", "secrets", "Secret", True, fields=frozenset({"type"}))
CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap", True, ("cm",))
EVENTS = Resource("", "v1", "events", "Event", True, ("ev",), fields=frozenset({
    "involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
    "involvedObject.uid", "involvedObject.apiVersion", "involvedObject.resourceVersion",
    "involvedObject.fieldPath", "reason", "reportingComponent", "source", "type"}))
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease", True, always=("spec",))
# A Service's DELETE answers the deleted object, as a pod's; its status holds the load
# balancer's ingress (objects.py fills the defaults and allocates a clusterIP).
SERVICES = Resource("", "v1", "services", "Service", True, ("svc",), status=True,
                    returns_deleted=True, always=("spec", "status"), categories=("all",),
                    fields=frozenset({"spec.clusterIP", "spec.type"}))
# Only stored as given (no controller makes slices from Services and pods); tied to their
# Service by a label.
ENDPOINTSLICES = Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True)
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

RESOURCES = (NAMESPACES, NODES, PODS, SECRETS, CONFIGMAPS, EVENTS, SERVICES, LEASES,
             ENDPOINTSLICES)
_BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCES}


def find(group: str, version: str, plural: str) -> Resource | None:
    return _BY_PATH.get((group, version, plural))


def _group_versions() -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for r in RESOURCES:
        if r.group and r.version not in groups.setdefault(r.group, []):
            groups[r.group].append(r.version)
    return groups


def api_versions(server_address: str) -> dict:
    return {"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                            "serverAddress": server_address}]}


def api_group(group: str) -> dict | None:
    versions = _group_versions().get(group)
    if not versions:
        return None
    entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": entries,
            "preferredVersion": entries[0]}


def api_group_list() -> dict:
    return {"kind": "APIGroupList", "apiVersion": "v1",
            "groups": [{k: v for k, v in api_group(g).items() if k not in ("kind", "apiVersion")}
                       for g in _group_versions()]}


def api_resource_list(group: str, version: str) -> dict | None:
    chosen = [r for r in RESOURCES if (r.group, r.version) == (group, version)]
    if not chosen:
        return None
    entries = []
    for r in chosen:
        entry = {"name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
                 "kind": r.kind, "verbs": VERBS}
        if r.short_names:
            entry["shortNames"] = list(r.short_names)
        if r.categories:
            entry["categories"] = list(r.categories)
        entries.append(entry)
        if r.status:
            entries.append({"name": f"{r.plural}/status", "singularName": "",
                            "namespaced": r.namespaced, "kind": r.kind,
                            "verbs": ["get", "patch", "update"]})
    return {"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version, "resources": entries}
