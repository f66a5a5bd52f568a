"""The fake Kubernetes API server (tests/fakekube) proven against real clients: kubectl 1.35
and helm 4 (installed by scripts/setup.sh into the virtualenv) and the official Python client
(its CoreV1Api, watch.Watch, informer.SharedInformer and the Lease lock of its leader election).
Every behaviour the fake offers is driven here by one of them, so that a Pipit test passing
against the fake passes for reasons that hold against a real API server."""

from __future__ import annotations

import ipaddress
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from kubernetes import client, watch
from kubernetes import config as kubernetes_config
from kubernetes.client.exceptions import ApiException
from kubernetes.informer import ADDED, DELETED, ERROR, MODIFIED, SharedInformer
from kubernetes.leaderelection.electionconfig import Config as ElectionConfig
from kubernetes.leaderelection.leaderelection import LeaderElection
from kubernetes.leaderelection.leaderelectionrecord import LeaderElectionRecord
from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

from lab.etcd import free_port
from lab.process import stop_group, wait
from tests.fakekube.resources import NODES, SERVICE_NAME_LABEL
from tests.fakekube.server import PATCH_TYPES
from tests.helpers import require

KUBECTL = Path(sys.prefix, "bin", "kubectl")
HELM = Path(sys.prefix, "bin", "helm")
ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.kube


# ---------------------------------------------------------------------------------------------
# clients

class Kubectl:
    """kubectl 1.35 (and helm 4) with a kubeconfig pointing at the fake, and their own HOME
    and cache."""

    def __init__(self, kube, home: Path):
        require(KUBECTL.exists() and HELM.exists(),
                f"{KUBECTL} or {HELM} is missing: run scripts/setup.sh")
        self.env = {**os.environ, "HOME": str(home), "KUBECACHEDIR": str(home / "cache"),
                    "KUBECONFIG": str(kube.write_kubeconfig(home / "kubeconfig"))}

    def __call__(self, *args: str, input: str | None = None, check: bool = True,
                 binary: Path = KUBECTL) -> subprocess.CompletedProcess:
        done = subprocess.run([str(binary), *args], input=input, capture_output=True,
                              text=True, env=self.env, timeout=60)
        if check:
            assert done.returncode == 0, f"{binary.name} {' '.join(args)}: {done.stderr}"
        return done

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """helm 4, with the same kubeconfig and HOME."""
        return self(*args, binary=HELM, check=check)

    def get(self, *args: str) -> dict:
        return json.loads(self("get", *args, "-o", "json").stdout)

    def start(self, *args: str) -> Lines:
        process = subprocess.Popen([str(KUBECTL), *args], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, env=self.env,
                                   start_new_session=True)
        return Lines(process)


class Lines:
    """The output of a running process, read line by line up to a deadline."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.seen: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def expect(self, *words: str, timeout: float = 20.0) -> str:
        """The next line holding every one of `words` (lines before it are skipped)."""
        def found() -> str | None:
            try:
                line = self._lines.get(timeout=0.1)
            except queue.Empty:
                return None
            assert line is not None, f"output ended before {words}; seen: {self.seen}"
            self.seen.append(line)
            return line if all(w in line.split() for w in words) else None
        return wait(found, timeout, f"a line with {words}; seen: {self.seen}", interval=0)

    def stop(self) -> None:
        stop_group(self.process, signal.SIGKILL)
        self.process.stdout.close()


@pytest.fixture
def kubectl(fakekube, tmp_path) -> Kubectl:
    return Kubectl(fakekube, tmp_path)


@pytest.fixture
def api(fakekube):
    with client.ApiClient(client.Configuration(host=fakekube.url)) as api_client:
        yield api_client


@pytest.fixture
def core(api) -> client.CoreV1Api:
    return client.CoreV1Api(api)


def pod(name: str, node: str = "n1", labels: dict | None = None, **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}],
                     **spec}}


def node(name: str, labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels or {}}}


def service(name: str, **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": name},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}], **spec}}


def endpoint_slice(name: str, service_name: str, *ready: bool, node: str = "n1") -> dict:
    """An EndpointSlice of `service_name` (by its label), one endpoint per `ready`."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "labels": {SERVICE_NAME_LABEL: service_name}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [f"10.244.1.{i + 1}"], "conditions": {"ready": r},
                           "nodeName": node} for i, r in enumerate(ready)],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


SERVICE_RANGE = ipaddress.ip_network("10.96.0.0/12")     # the apiserver's default


def status_of(error: ApiException) -> dict:
    return json.loads(error.body)


def expect_event(events: queue.Queue, wanted: tuple, seen: list, timeout: float = 20.0):
    """Take events from `events` until one equal to `wanted` arrives."""
    def found() -> bool:
        try:
            seen.append(events.get(timeout=0.1))
        except queue.Empty:
            return False
        return seen[-1] == wanted
    wait(found, timeout, f"{wanted}; seen {seen}", interval=0)


# ---------------------------------------------------------------------------------------------
# kubectl

def test_kubectl_creates_gets_and_deletes_namespaces_nodes_and_pods(fakekube, kubectl):
    assert kubectl("version", "-o", "json").returncode == 0
    kubectl("create", "namespace", "pipit-t")          # a typed client: a protobuf body
    kubectl("create", "-f", "-", "--validate=false", input=json.dumps(node("n1")))
    kubectl("create", "-n", "pipit-t", "-f", "-", "--validate=false",
            input=yaml.safe_dump(pod("p1", labels={"app": "web"})))

    got = kubectl.get("-n", "pipit-t", "pod", "p1")
    meta = got["metadata"]
    assert (meta["name"], meta["namespace"], meta["labels"]) == ("p1", "pipit-t", {"app": "web"})
    assert meta["uid"] and meta["creationTimestamp"] and int(meta["resourceVersion"]) > 0
    assert got["status"] == {"phase": "Pending"}      # the server's, not the client's
    assert kubectl.get("namespace", "pipit-t")["status"] == {"phase": "Active"}
    assert [n["metadata"]["name"] for n in kubectl.get("nodes")["items"]] == ["n1"]

    dry = kubectl("create", "-n", "pipit-t", "-f", "-", "--validate=false",
                  "--dry-run=server", "-o", "name", input=json.dumps(pod("p2")))
    assert dry.stdout.strip() == "pod/p2"
    assert kubectl("get", "-n", "pipit-t", "pod", "p2", check=False).returncode != 0

    kubectl("delete", "-n", "pipit-t", "pod", "p1")
    gone = kubectl("get", "-n", "pipit-t", "pod", "p1", check=False)
    assert gone.returncode == 1
    assert 'Error from server (NotFound): pods "p1" not found' in gone.stderr
    kubectl("delete", "node", "n1")
    kubectl("delete", "namespace", "pipit-t")
    assert 'namespaces "pipit-t" not found' in kubectl("get", "namespace", "pipit-t",
                                                       check=False).stderr
    assert kubectl.get("nodes")["items"] == []


def test_kubectl_creates_configmaps_and_secrets_from_literals(kubectl):
    kubectl("create", "configmap", "settings", "--from-literal=mtu=1450")
    kubectl("create", "secret", "generic", "bgp", "--from-literal=tor=s3cret",
            "--type=pipit.dev/bgp-password")
    assert kubectl.get("configmap", "settings")["data"] == {"mtu": "1450"}
    secret = kubectl.get("secret", "bgp")
    assert secret["data"] == {"tor": "czNjcmV0"} and secret["type"] == "pipit.dev/bgp-password"


def test_kubectl_applies_gets_and_deletes_services_and_endpoint_slices(kubectl):
    """A Service as the server completes it (defaults, a clusterIP from the service range, an
    empty load balancer status) and the EndpointSlices found by their Service's label."""
    manifest = [service("web"), endpoint_slice("web-a", "web", True, False),
                endpoint_slice("dns-a", "dns", True)]
    applied = kubectl("apply", "-f", "-", "--validate=false", input=yaml.safe_dump_all(manifest))
    assert applied.stdout.split("\n")[:3] == [
        "service/web created", "endpointslice.discovery.k8s.io/web-a created",
        "endpointslice.discovery.k8s.io/dns-a created"]

    got = kubectl.get("svc", "web")                       # the short name, from discovery
    spec = got["spec"]
    assert (spec["type"], spec["sessionAffinity"], spec["internalTrafficPolicy"]) == \
        ("ClusterIP", "None", "Cluster")
    assert ipaddress.ip_address(spec["clusterIP"]) in SERVICE_RANGE
    assert spec["clusterIPs"] == [spec["clusterIP"]] and spec["ipFamilies"] == ["IPv4"]
    assert spec["ports"] == [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
    assert got["status"] == {"loadBalancer": {}}
    assert kubectl("get", "all", "-o", "name").stdout.split() == ["service/web"]

    slices = kubectl.get("endpointslices", "-l", f"{SERVICE_NAME_LABEL}=web")["items"]
    assert [s["metadata"]["name"] for s in slices] == ["web-a"]
    assert slices[0]["addressType"] == "IPv4"
    assert [(e["addresses"], e["conditions"]["ready"], e["nodeName"])
            for e in slices[0]["endpoints"]] == [(["10.244.1.1"], True, "n1"),
                                                 (["10.244.1.2"], False, "n1")]
    assert slices[0]["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]

    # applied again with another selector: what the server allocated stays
    kubectl("apply", "-f", "-", "--validate=false",
            input=yaml.safe_dump({**service("web"), "spec": {**service("web")["spec"],
                                                              "selector": {"app": "web2"}}}))
    again = kubectl.get("svc", "web")["spec"]
    assert again["selector"] == {"app": "web2"} and again["clusterIP"] == spec["clusterIP"]

    kubectl("delete", "svc", "web")
    kubectl("delete", "endpointslices", "-l", f"{SERVICE_NAME_LABEL}=web")
    assert 'services "web" not found' in kubectl("get", "svc", "web", check=False).stderr
    assert 'endpointslices.discovery.k8s.io "web-a" not found' in kubectl(
        "get", "endpointslice", "web-a", check=False).stderr
    assert [s["metadata"]["name"] for s in kubectl.get("endpointslices")["items"]] == ["dns-a"]


def test_kubectl_errors_are_the_real_servers(fakekube, kubectl):
    kubectl("create", "-f", "-", "--validate=false", input=json.dumps(pod("p1")))
    again = kubectl("create", "-f", "-", "--validate=false", input=json.dumps(pod("p1")),
                    check=False)
    assert 'Error from server (AlreadyExists)' in again.stderr and \
        'pods "p1" already exists' in again.stderr

    bad = kubectl("create", "-f", "-", "--validate=false", input=json.dumps(pod("Bad_Name")),
                  check=False)
    assert 'The Pod "Bad_Name" is invalid: metadata.name: Invalid value: "Bad_Name"' in \
        bad.stderr

    stale = kubectl.get("pod", "p1")
    kubectl("label", "pod", "p1", "moved=on")
    stale["metadata"]["labels"] = {"mine": "yes"}
    lost = kubectl("replace", "-f", "-", "--validate=false", input=json.dumps(stale),
                   check=False)
    assert "Error from server (Conflict)" in lost.stderr
    assert "the object has been modified" in lost.stderr
    assert kubectl.get("pod", "p1")["metadata"]["labels"] == {"moved": "on"}

    moved = kubectl("patch", "pod", "p1", "-p", '{"spec": {"nodeName": "n2"}}', check=False)
    assert "Forbidden: pod updates may not change fields" in moved.stderr

    orphan = kubectl("create", "-n", "nowhere", "-f", "-", "--validate=false",
                     input=json.dumps(pod("p2")), check=False)
    assert 'namespaces "nowhere" not found' in orphan.stderr


def test_kubectl_label_and_annotate_send_merge_patches(fakekube, kubectl):
    kubectl("create", "-f", "-", "--validate=false", input=json.dumps(node("n1", {"a": "1"})))
    kubectl("label", "node", "n1", "rack=r1", "zone=z")
    kubectl("label", "node", "n1", "--overwrite", "rack=r2")
    kubectl("label", "node", "n1", "zone-")
    kubectl("annotate", "node", "n1", "pipit.dev/as-number=64512")
    kubectl("label", "node", "n1", "tried=only", "--dry-run=server")
    meta = kubectl.get("node", "n1")["metadata"]
    assert meta["labels"] == {"a": "1", "rack": "r2"}
    assert meta["annotations"] == {"pipit.dev/as-number": "64512"}
    patches = [r.content_type for r in fakekube.requests if r.method == "PATCH"]
    assert patches == ["application/merge-patch+json"] * 5


def test_kubectl_patch_strategic_merge_json_and_status(fakekube, kubectl):
    kubectl("create", "-f", "-", "--validate=false", input=json.dumps(node("n1")))
    kubectl("create", "-f", "-", "--validate=false", input=json.dumps(
        pod("p1", containers=[{"name": "a", "image": "one"}, {"name": "b", "image": "two"}])))

    # strategic (kubectl's default): containers merge on their name
    kubectl("patch", "pod", "p1", "-p", '{"spec": {"containers": [{"name": "b", '
                                         '"image": "three"}]}}')
    containers = kubectl.get("pod", "p1")["spec"]["containers"]
    assert [(c["name"], c["image"]) for c in containers] == [("a", "one"), ("b", "three")]

    # the status subresource; conditions merge on their type, the spec stays
    conditions = [{"type": "Ready", "status": "True"},
                  {"type": "NetworkUnavailable", "status": "True"}]
    kubectl("patch", "node", "n1", "--subresource=status", "-p",
            json.dumps({"status": {"conditions": conditions}, "spec": {"podCIDR": "x"}}))
    kubectl("patch", "node", "n1", "--subresource=status", "-p", json.dumps(
        {"status": {"conditions": [{"type": "NetworkUnavailable", "status": "False"}]}}))
    got = kubectl.get("node", "n1")
    assert got["status"]["conditions"] == [{"type": "Ready", "status": "True"},
                                           {"type": "NetworkUnavailable", "status": "False"}]
    assert "podCIDR" not in got.get("spec", {})

    kubectl("patch", "node", "n1", "--type", "merge", "-p",
            '{"metadata": {"labels": {"x": "1", "y": "2"}}}')
    kubectl("patch", "node", "n1", "--type", "json", "-p", json.dumps([
        {"op": "remove", "path": "/metadata/labels/x"},
        {"op": "replace", "path": "/metadata/labels/y", "value": "3"},
        {"op": "copy", "from": "/metadata/labels/y", "path": "/metadata/labels/z"},
        {"op": "move", "from": "/metadata/labels/z", "path": "/metadata/labels/w"},
        {"op": "add", "path": "/spec/taints", "value": [{"key": "k", "effect": "NoSchedule"}]}]))
    got = kubectl.get("node", "n1")
    assert got["metadata"]["labels"] == {"y": "3", "w": "3"}
    assert got["spec"]["taints"] == [{"key": "k", "effect": "NoSchedule"}]
    failed = kubectl("patch", "node", "n1", "--type", "json", "-p",
                     '[{"op": "test", "path": "/metadata/name", "value": "n2"}]', check=False)
    assert failed.returncode != 0 and "testing value /metadata/name failed" in failed.stderr

    sent = {r.content_type for r in fakekube.requests if r.method == "PATCH"}
    assert sent == set(PATCH_TYPES)

    # the directives a user may put in a strategic merge patch, passed on by kubectl
    kubectl("create", "configmap", "c", "--from-literal=a=1", "--from-literal=b=2")
    kubectl("annotate", "configmap", "c", "x=1")
    kubectl("patch", "configmap", "c", "-p", '{"data": {"$patch": "replace", "only": "this"},'
                                            ' "metadata": {"annotations": {"$patch": "delete"}}}')
    got = kubectl.get("configmap", "c")
    assert got["data"] == {"only": "this"} and "annotations" not in got["metadata"]


def test_kubectl_apply_three_way_merges_with_what_others_changed(fakekube, kubectl, tmp_path):
    manifest = tmp_path / "node.yaml"
    first = node("n1", {"rack": "a", "role": "edge"})
    manifest.write_text(yaml.safe_dump(first))
    assert "created" in kubectl("apply", "-f", str(manifest), "--validate=false").stdout
    kubectl("label", "node", "n1", "set-by-agent=yes")          # someone else's label

    manifest.write_text(yaml.safe_dump(node("n1", {"rack": "b"})))
    assert "configured" in kubectl("apply", "-f", str(manifest), "--validate=false").stdout
    meta = kubectl.get("node", "n1")["metadata"]
    assert meta["labels"] == {"rack": "b", "set-by-agent": "yes"}   # role removed, theirs kept
    assert "kubectl.kubernetes.io/last-applied-configuration" in meta["annotations"]
    assert "unchanged" in kubectl("apply", "-f", str(manifest), "--validate=false").stdout
    assert [r.content_type for r in fakekube.requests if r.method == "PATCH"][-1] == \
        "application/strategic-merge-patch+json"

    # what apply sends to remove part of a merged list: finalizers (a set, in the order
    # applied) and owner references (merged on their uid) lose one item each; taints (an
    # atomic list) are replaced
    owners = [{"apiVersion": "v1", "kind": "Node", "name": n, "uid": f"uid-{n}"}
              for n in ("n1", "n2")]
    settings = {"apiVersion": "v1", "kind": "ConfigMap", "data": {"mtu": "1450"},
                "metadata": {"name": "settings", "finalizers": ["pipit.dev/a", "pipit.dev/b",
                                                                 "pipit.dev/c"],
                             "ownerReferences": owners}}
    tainted = {**node("n1", {"rack": "b"}),
               "spec": {"taints": [{"key": "a", "effect": "NoSchedule"},
                                   {"key": "b", "effect": "NoSchedule"}]}}
    manifest.write_text(yaml.safe_dump_all([settings, tainted]))
    kubectl("apply", "-f", str(manifest), "--validate=false")
    settings["metadata"].update(finalizers=["pipit.dev/c", "pipit.dev/a"],
                                ownerReferences=owners[:1])
    tainted["spec"]["taints"] = [{"key": "a", "effect": "NoExecute"}]
    manifest.write_text(yaml.safe_dump_all([settings, tainted]))
    kubectl("apply", "-f", str(manifest), "--validate=false")
    meta = kubectl.get("configmap", "settings")["metadata"]
    assert meta["finalizers"] == ["pipit.dev/c", "pipit.dev/a"]
    assert [o["name"] for o in meta["ownerReferences"]] == ["n1"]
    assert kubectl.get("node", "n1")["spec"]["taints"] == [{"key": "a", "effect": "NoExecute"}]
    bodies = b"".join(r.body for r in fakekube.requests if r.method == "PATCH")
    assert b'"$deleteFromPrimitiveList/finalizers":["pipit.dev/b"]' in bodies
    assert b'{"$patch":"delete","uid":"uid-n2"}' in bodies



def test_kubectl_apply_adds_and_removes_a_services_ports(fakekube, kubectl, tmp_path):
    """A Service's ports merge on their port (ServiceSpec's patchMergeKey), not on a
    container port's containerPort: apply adds one, then removes the other."""
    manifest = tmp_path / "service.yaml"
    http = {"name": "http", "port": 80, "targetPort": 8080}
    https = {"name": "https", "port": 443, "targetPort": 8443}
    for ports in ([http], [http, https], [https]):
        manifest.write_text(yaml.safe_dump(service("web", ports=ports)))
        kubectl("apply", "-f", str(manifest), "--validate=false")
        got = kubectl.get("svc", "web")["spec"]["ports"]
        assert got == [{**p, "protocol": "TCP"} for p in ports]
    patches = [r for r in fakekube.requests if r.method == "PATCH"]
    assert {r.content_type for r in patches} == {"application/strategic-merge-patch+json"}
    assert b'{"$patch":"delete","port":80}' in patches[-1].body

def test_kubectl_get_watch_streams_added_modified_deleted(fakekube, kubectl):
    kubectl("create", "-f", "-", "--validate=false", input=json.dumps(pod("p1")))
    watching = kubectl.start("get", "pods", "--watch", "--output-watch-events")
    try:
        watching.expect("ADDED", "p1")
        kubectl("label", "pod", "p1", "seen=yes")
        watching.expect("MODIFIED", "p1")
        kubectl("create", "-f", "-", "--validate=false", input=json.dumps(pod("p2")))
        watching.expect("ADDED", "p2")
        kubectl("delete", "pod", "p1")
        watching.expect("DELETED", "p1")
    finally:
        watching.stop()


def test_kubectl_wait_uses_a_watch_list_with_bookmarks(fakekube, kubectl, core):
    """kubectl 1.35's informers stream the initial state (sendInitialEvents) and wait for the
    bookmark that ends it; a fake without it would make `kubectl wait` hang."""
    kubectl("create", "-f", "-", "--validate=false", input=json.dumps(pod("p1")))
    waiting = kubectl.start("wait", "--for=jsonpath={.status.phase}=Running", "pod/p1",
                            "--timeout=30s")
    try:
        wait(lambda: any(r.query.get("sendInitialEvents") == "true" for r in fakekube.requests),
             20, "kubectl's watch")
        core.patch_namespaced_pod_status("p1", "default", {"status": {"phase": "Running"}})
        waiting.expect("pod/p1", "condition", "met")
        assert waiting.process.wait(10) == 0
    finally:
        waiting.stop()
    watch_request = next(r for r in fakekube.requests if r.query.get("sendInitialEvents"))
    assert watch_request.query["allowWatchBookmarks"] == "true"
    assert watch_request.query["fieldSelector"] == "metadata.name=p1"


def test_kubectl_selectors_and_pages(fakekube, kubectl):
    kubectl("create", "namespace", "other")
    for name, namespace, host, labels in [("a", "default", "n1", {"app": "web", "tier": "fe"}),
                                          ("b", "default", "n2", {"app": "web", "tier": "db"}),
                                          ("c", "other", "n1", {"app": "dns"}),
                                          ("d", "other", "n1", {})]:
        kubectl("create", "-n", namespace, "-f", "-", "--validate=false",
                input=json.dumps(pod(name, host, labels)))

    def names(*args: str) -> list[str]:
        return [p["metadata"]["name"] for p in kubectl.get("pods", *args)["items"]]

    assert names("-A", "--field-selector", "spec.nodeName=n1") == ["a", "c", "d"]
    assert names("-A", "--field-selector", "spec.nodeName=n1,metadata.namespace!=default") == \
        ["c", "d"]
    assert names("-A", "-l", "app in (web,dns),tier!=db") == ["a", "c"]
    assert names("-A", "-l", "!app") == ["d"]
    bad = kubectl("get", "pods", "--field-selector", "spec.image=x", check=False)
    assert "field label not supported: spec.image" in bad.stderr

    assert names("-A", "--chunk-size=1") == ["a", "b", "c", "d"]
    pages = [r for r in fakekube.requests if r.query.get("limit") == "1"]
    assert len(pages) == 4 and all(p.query.get("continue") for p in pages[1:])


def test_kubectl_retries_what_the_server_asks_it_to(fakekube, kubectl):
    fakekube.fail(429, times=2, method="GET", path="^/api/v1/nodes")
    assert kubectl.get("nodes")["items"] == []
    assert sum(r.path == "/api/v1/nodes" for r in fakekube.requests) == 3


def test_helm_installs_upgrades_and_uninstalls_a_release(kubectl, tmp_path):
    """helm 4 against the fake, with client-side apply (the fake has no server-side apply)
    and no OpenAPI validation (it serves no OpenAPI); releases are Secrets found by label."""
    chart = tmp_path / "chart"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: demo\nversion: 0.1.0\n")
    (chart / "templates" / "settings.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\n"
        "data: {mtu: {{ .Values.mtu | quote }}}\n")
    options = ("--server-side=false", "--disable-openapi-validation")
    refused = kubectl.helm("install", "pipit", str(chart), options[1], check=False)
    assert "server-side apply not available on the server" in refused.stderr
    kubectl.helm("uninstall", "pipit")
    kubectl.helm("install", "pipit", str(chart), "--set", "mtu=1450", *options)
    assert kubectl.get("configmap", "settings")["data"] == {"mtu": "1450"}
    kubectl.helm("upgrade", "pipit", str(chart), "--set", "mtu=1400", *options)
    assert kubectl.get("configmap", "settings")["data"] == {"mtu": "1400"}
    releases = json.loads(kubectl.helm("list", "-o", "json").stdout)
    assert [(r["name"], str(r["revision"]), r["status"]) for r in releases] == \
        [("pipit", "2", "deployed")]
    kubectl.helm("uninstall", "pipit")
    assert kubectl.get("configmaps")["items"] == [] and kubectl.get("secrets")["items"] == []


# ---------------------------------------------------------------------------------------------
# the Python client: CRUD, errors, subresources

def test_python_client_crud_across_kinds_with_one_resource_version(api, core):
    leases = client.CoordinationV1Api(api)
    versions = []

    def keep(obj) -> None:
        versions.append(int(obj.metadata.resource_version))

    keep(core.create_namespace({"metadata": {"name": "pipit"}}))
    keep(core.create_node(node("n1", {"rack": "a"})))
    keep(core.create_namespaced_pod("pipit", pod("p1")))
    secret = core.create_namespaced_secret("pipit", {"metadata": {"name": "s"},
                                                     "stringData": {"tor": "pw"}})
    keep(secret)
    assert secret.data == {"tor": "cHc="} and secret.type == "Opaque"
    keep(core.create_namespaced_config_map("pipit", {"metadata": {"name": "c"},
                                                     "data": {"k": "v"}}))
    keep(core.create_namespaced_event("pipit", {
        "metadata": {"generateName": "p1."}, "reason": "AddressAssigned",
        "involvedObject": {"kind": "Pod", "name": "p1", "namespace": "pipit"}}))
    keep(leases.create_namespaced_lease("pipit", {"metadata": {"name": "l"},
                                                  "spec": {"holderIdentity": "x"}}))
    assert versions == sorted(versions) and len(set(versions)) == len(versions)

    got = core.read_node("n1")
    assert got.metadata.uid and got.metadata.creation_timestamp and got.metadata.generation == 1
    got.metadata.labels["rack"] = "b"
    relabelled = core.replace_node("n1", got)
    assert relabelled.metadata.generation == 1            # metadata is not the spec
    relabelled.spec = client.V1NodeSpec(pod_cidr="10.0.0.0/24")
    respecced = core.replace_node("n1", relabelled)
    assert respecced.metadata.generation == 2
    assert int(respecced.metadata.resource_version) > int(relabelled.metadata.resource_version)
    unchanged = core.replace_node("n1", respecced)
    assert unchanged.metadata.resource_version == respecced.metadata.resource_version

    events = core.list_namespaced_event("pipit", field_selector="involvedObject.name=p1")
    assert [e.reason for e in events.items] == ["AddressAssigned"]
    assert events.items[0].metadata.name.startswith("p1.")
    pods = core.list_pod_for_all_namespaces()
    assert int(pods.metadata.resource_version) == max(versions) + 2

    assert core.delete_namespaced_pod("p1", "pipit").metadata.name == "p1"
    deleted = core.delete_node("n1")
    assert (deleted["kind"], deleted["status"], deleted["details"]["name"]) == \
        ("Status", "Success", "n1")                     # a node's delete answers a Status
    with pytest.raises(ApiException) as missing:
        core.read_node("n1")
    assert missing.value.status == 404
    assert status_of(missing.value) == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'nodes "n1" not found', "reason": "NotFound", "code": 404,
        "details": {"name": "n1", "kind": "nodes"}}


def test_python_client_errors(core):
    core.create_node(node("n1"))
    with pytest.raises(ApiException) as exists:
        core.create_node(node("n1"))
    assert (exists.value.status, status_of(exists.value)["reason"]) == (409, "AlreadyExists")

    stale = core.read_node("n1")
    core.patch_node("n1", {"metadata": {"labels": {"x": "1"}}})
    with pytest.raises(ApiException) as conflict:
        core.replace_node("n1", stale)
    assert (conflict.value.status, status_of(conflict.value)["reason"]) == (409, "Conflict")
    with pytest.raises(ApiException) as precondition:
        core.patch_node("n1", {"metadata": {"resourceVersion": stale.metadata.resource_version,
                                            "labels": {"y": "2"}}})
    assert precondition.value.status == 409
    stale.metadata.resource_version = None                 # an unconditional update
    assert core.replace_node("n1", stale).metadata.labels is None

    with pytest.raises(ApiException) as invalid:
        core.create_namespaced_pod("default", {"metadata": {"name": "p", "labels": {
            "bad key!": "v"}}, "spec": {"containers": [{"name": "c"}]}})
    status = status_of(invalid.value)
    assert (invalid.value.status, status["reason"]) == (422, "Invalid")
    assert [c["field"] for c in status["details"]["causes"]] == ["metadata.labels",
                                                                 "spec.containers[0].image"]
    with pytest.raises(ApiException) as not_base64:
        core.create_namespaced_secret("default", {"metadata": {"name": "s"},
                                                  "data": {"k": "not base64!"}})
    assert status_of(not_base64.value)["details"]["causes"][0]["field"] == "data[k]"
    with pytest.raises(ApiException) as bad_selector:
        core.list_node(label_selector="a in (x")
    assert bad_selector.value.status == 400
    with pytest.raises(ApiException) as gone_precondition:
        core.delete_node("n1", body=client.V1DeleteOptions(
            preconditions=client.V1Preconditions(uid="not-its-uid")))
    assert gone_precondition.value.status == 409


def test_status_subresource_and_main_resource_each_keep_the_other(core):
    core.create_node({**node("n1"), "spec": {"podCIDR": "10.0.0.0/24"},
                      "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}})
    got = core.read_node("n1")
    got.spec.pod_cidr = "10.9.0.0/24"
    got.status.addresses = []
    core.replace_node("n1", got)
    got = core.read_node_status("n1")
    assert got.spec.pod_cidr == "10.9.0.0/24"
    assert [a.address for a in got.status.addresses] == ["192.0.2.1"]

    got.spec.pod_cidr = "10.8.0.0/24"
    got.status.addresses = [client.V1NodeAddress(type="InternalIP", address="192.0.2.2")]
    core.replace_node_status("n1", got)
    got = core.read_node("n1")
    assert got.spec.pod_cidr == "10.9.0.0/24"
    assert [a.address for a in got.status.addresses] == ["192.0.2.2"]

    core.create_namespaced_pod("default", pod("p1"))
    core.patch_namespaced_pod_status("p1", "default", {"status": {
        "podIP": "10.244.0.5", "podIPs": [{"ip": "10.244.0.5"}], "phase": "Running"}})
    assert core.read_namespaced_pod("p1", "default").status.pod_ip == "10.244.0.5"
    assert [p.metadata.name for p in core.list_namespaced_pod(
        "default", field_selector="status.podIP=10.244.0.5").items] == ["p1"]


def test_python_client_services_their_status_and_endpoint_slices(api, core):
    """What a controller announcing Services reads: Services of every namespace, the load
    balancer's address in the status subresource (which the main resource keeps), and the
    EndpointSlices of one Service by label."""
    slices = client.DiscoveryV1Api(api)
    core.create_namespace({"metadata": {"name": "other"}})
    core.create_namespaced_service("default", service("web", type="LoadBalancer",
                                                      externalTrafficPolicy="Local"))
    core.create_namespaced_service("other", service("dns", clusterIP="10.96.0.10"))

    services = core.list_service_for_all_namespaces().items
    assert [(s.metadata.namespace, s.metadata.name) for s in services] == \
        [("default", "web"), ("other", "dns")]
    web, dns = services
    assert web.spec.external_traffic_policy == "Local" and web.spec.health_check_node_port
    assert 30000 <= web.spec.ports[0].node_port <= 32767
    assert web.status.load_balancer.ingress is None
    assert (dns.spec.cluster_ip, dns.spec.external_traffic_policy) == ("10.96.0.10", None)
    assert [s.metadata.name for s in core.list_service_for_all_namespaces(
        field_selector="spec.type=LoadBalancer").items] == ["web"]

    # the status subresource writes the status only
    core.patch_namespaced_service_status("web", "default", {
        "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}},
        "spec": {"externalTrafficPolicy": "Cluster"}})
    # the main resource writes all but the status
    core.patch_namespaced_service("web", "default", {"metadata": {"labels": {"bgp": "yes"}},
                                                     "status": {"loadBalancer": None}})
    got = core.read_namespaced_service("web", "default")
    got.status.load_balancer.ingress = []
    got.spec.cluster_ip = got.spec.cluster_ips = None      # an update keeps the allocated
    core.replace_namespaced_service("web", "default", got)
    got = core.read_namespaced_service("web", "default")
    assert [(i.ip, i.ip_mode) for i in got.status.load_balancer.ingress] == \
        [("192.0.2.10", "VIP")]
    assert got.spec.external_traffic_policy == "Local" and got.metadata.labels == {"bgp": "yes"}
    assert got.spec.cluster_ip == web.spec.cluster_ip

    slices.create_namespaced_endpoint_slice("default", endpoint_slice("web-a", "web", True))
    slices.create_namespaced_endpoint_slice("default", endpoint_slice("web-b", "web", False,
                                                                      node="n2"))
    slices.create_namespaced_endpoint_slice("other", endpoint_slice("dns-a", "dns", True))
    found = slices.list_endpoint_slice_for_all_namespaces(
        label_selector=f"{SERVICE_NAME_LABEL}=web").items
    assert [(s.metadata.name, [(e.node_name, e.conditions.ready) for e in s.endpoints])
            for s in found] == [("web-a", [("n1", True)]), ("web-b", [("n2", False)])]
    assert [s.metadata.namespace for s in slices.list_endpoint_slice_for_all_namespaces(
        label_selector=f"{SERVICE_NAME_LABEL} in (dns)").items] == ["other"]
    with pytest.raises(ApiException) as bad_address_type:
        slices.create_namespaced_endpoint_slice("default", {"metadata": {"name": "bad"},
                                                            "addressType": "IPv5"})
    assert (bad_address_type.value.status, status_of(bad_address_type.value)["details"][
        "causes"][0]["field"]) == (422, "addressType")

    deleted = core.delete_namespaced_service("web", "default")   # answers the Service
    assert (deleted.metadata.name, deleted.status.load_balancer.ingress[0].ip) == \
        ("web", "192.0.2.10")
    assert [s.metadata.name for s in core.list_service_for_all_namespaces().items] == ["dns"]



def test_python_client_strategic_patch_of_one_service_port_keeps_the_others(fakekube, core):
    core.create_namespaced_service("default", service("web", ports=[
        {"name": "http", "port": 80, "targetPort": 8080},
        {"name": "https", "port": 443, "targetPort": 8443}]))
    core.patch_namespaced_service("web", "default", {"spec": {"ports": [
        {"port": 443, "targetPort": 9443}]}})
    ports = core.read_namespaced_service("web", "default").spec.ports
    assert [(p.name, p.port, p.target_port) for p in ports] == [("http", 80, 8080),
                                                                ("https", 443, 9443)]
    assert [r.content_type for r in fakekube.requests if r.method == "PATCH"] == \
        ["application/strategic-merge-patch+json"]           # the client's default


def test_python_client_strategic_patch_replaces_an_endpoint_slices_ports(api):
    """An EndpointSlice's ports have no patch strategy: a strategic patch replaces them whole
    (merged on their port, http would stay; on containerPort, the patch is refused)."""
    slices = client.DiscoveryV1Api(api)
    slices.create_namespaced_endpoint_slice("default", endpoint_slice("web-a", "web", True))
    slices.patch_namespaced_endpoint_slice("web-a", "default", {"ports": [
        {"name": "metrics", "port": 9090, "protocol": "TCP"}]})
    got = slices.read_namespaced_endpoint_slice("web-a", "default")
    assert [(p.name, p.port) for p in got.ports] == [("metrics", 9090)]
    assert [e.addresses for e in got.endpoints] == [["10.244.1.1"]]


def test_python_client_strategic_patch_merges_container_ports_on_container_port(core):
    """A pod's container ports may not change: the patch below is accepted only because its
    port merges into the existing one with that containerPort."""
    ports = [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
             {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    core.create_namespaced_pod("default", pod("p1", containers=[
        {"name": "c", "image": "busybox", "ports": ports}]))
    core.patch_namespaced_pod("p1", "default", {"spec": {"containers": [
        {"name": "c", "image": "busybox:1.37", "ports": [{"containerPort": 9090}]}]}})
    got = core.read_namespaced_pod("p1", "default").spec.containers
    assert [(c.name, c.image) for c in got] == [("c", "busybox:1.37")]
    assert [(p.name, p.container_port) for p in got[0].ports] == [("http", 8080),
                                                                   ("metrics", 9090)]

def test_label_and_field_selectors(core):
    for name, labels in [("a", {"rack": "r1", "edge": ""}), ("b", {"rack": "r2"}),
                         ("c", {"rack": "r3", "weight": "5"}), ("d", {})]:
        core.create_node(node(name, labels))

    def names(**selectors: str) -> list[str]:
        return [n.metadata.name for n in core.list_node(**selectors).items]

    assert names(label_selector="rack=r1") == ["a"]
    assert names(label_selector="rack==r2") == ["b"]
    assert names(label_selector="rack!=r1") == ["b", "c", "d"]
    assert names(label_selector="rack in (r1, r3)") == ["a", "c"]
    assert names(label_selector="rack notin (r1,r3)") == ["b", "d"]
    assert names(label_selector="edge") == ["a"]
    assert names(label_selector="!edge,rack") == ["b", "c"]
    assert names(label_selector="weight>4") == ["c"]
    assert names(label_selector="") == ["a", "b", "c", "d"]
    assert names(field_selector="metadata.name=c") == ["c"]
    assert names(field_selector="metadata.name!=c,spec.unschedulable=false") == ["a", "b", "d"]
    core.patch_node("d", {"spec": {"unschedulable": True}})
    assert names(field_selector="spec.unschedulable=true") == ["d"]
    for bad in ("rack in ()", "rack=a b", "=x", "rack=" + "v" * 64):
        with pytest.raises(ApiException) as refused:
            core.list_node(label_selector=bad)
        assert refused.value.status == 400, bad


def test_namespace_deletion_takes_its_objects_and_finalizers_hold_deletion(core):
    core.create_namespace({"metadata": {"name": "gone"}})
    core.create_namespaced_pod("gone", pod("p1"))
    core.create_namespaced_config_map("gone", {"metadata": {"name": "c"}})
    rv = core.list_namespaced_pod("gone").metadata.resource_version
    core.delete_namespace("gone")
    stream = watch.Watch().stream(core.list_pod_for_all_namespaces, resource_version=rv,
                                  timeout_seconds=1)
    assert [(e["type"], e["object"].metadata.name) for e in stream] == [("DELETED", "p1")]
    assert core.list_config_map_for_all_namespaces(field_selector="metadata.namespace=gone") \
        .items == []

    core.create_namespaced_config_map("default", {"metadata": {
        "name": "held", "finalizers": ["pipit.dev/release-addresses"]}})
    core.delete_namespaced_config_map("held", "default")
    held = core.read_namespaced_config_map("held", "default")
    assert held.metadata.deletion_timestamp is not None
    core.patch_namespaced_config_map("held", "default", {"metadata": {"finalizers": None}},
                                     _content_type="application/merge-patch+json")
    with pytest.raises(ApiException) as missing:
        core.read_namespaced_config_map("held", "default")
    assert missing.value.status == 404


def test_delete_collection_by_label(core):
    for name, app in [("a", "web"), ("b", "web"), ("c", "dns")]:
        core.create_namespaced_pod("default", pod(name, labels={"app": app}))
    core.delete_collection_namespaced_pod("default", label_selector="app=web")
    assert [p.metadata.name for p in core.list_namespaced_pod("default").items] == ["c"]


def test_injected_failures(fakekube, core):
    core.create_node(node("n1"))
    fakekube.fail(503, times=1, method="GET", path="/nodes/n1")
    with pytest.raises(ApiException) as unavailable:
        core.read_node("n1")
    assert (unavailable.value.status, status_of(unavailable.value)["reason"]) == \
        (503, "ServiceUnavailable")
    assert core.read_node("n1").metadata.name == "n1"


# ---------------------------------------------------------------------------------------------
# the Python client: watches, informers, leader election

def test_watch_from_a_resource_version_through_a_selector(core):
    core.create_namespaced_pod("default", pod("before", labels={"app": "web"}))
    rv = core.list_namespaced_pod("default").metadata.resource_version
    core.create_namespaced_pod("default", pod("a", labels={"app": "web"}))
    core.create_namespaced_pod("default", pod("other", labels={"app": "dns"}))
    core.patch_namespaced_pod("a", "default", {"metadata": {"annotations": {"k": "v"}}})
    core.patch_namespaced_pod("other", "default", {"metadata": {"labels": {"app": "web"}}})
    core.patch_namespaced_pod("a", "default", {"metadata": {"labels": {"app": "gone"}}})
    final = core.delete_namespaced_pod("other", "default")

    stream = watch.Watch().stream(core.list_namespaced_pod, "default", resource_version=rv,
                                  label_selector="app=web", timeout_seconds=1)
    events = [(e["type"], e["object"].metadata.name, int(e["object"].metadata.resource_version),
               e["object"].metadata.labels["app"]) for e in stream]
    assert [e[:2] for e in events] == [("ADDED", "a"), ("MODIFIED", "a"), ("ADDED", "other"),
                                       ("DELETED", "a"), ("DELETED", "other")]
    assert [e[2] for e in events] == sorted(e[2] for e in events) and events[0][2] > int(rv)
    # a pod leaving the selector goes as it was before; a deleted one as it was last
    assert events[3][3] == "web"
    assert events[4][2] == int(final.metadata.resource_version)

    by_node = watch.Watch().stream(core.list_pod_for_all_namespaces, timeout_seconds=1,
                                   field_selector="spec.nodeName=n1")
    assert sorted(e["object"].metadata.name for e in by_node) == ["a", "before"]


def test_watch_endpoint_slices_of_one_service_through_a_label_selector(fakekube, api):
    """A live watch of one Service's EndpointSlices, as a controller keeps its endpoints:
    slices of other Services never show; one relabelled to it is ADDED."""
    slices = client.DiscoveryV1Api(api)
    rv = slices.list_endpoint_slice_for_all_namespaces().metadata.resource_version
    events: queue.Queue = queue.Queue()
    seen: list = []

    def follow() -> None:
        stream = watch.Watch().stream(slices.list_endpoint_slice_for_all_namespaces,
                                      label_selector=f"{SERVICE_NAME_LABEL}=web",
                                      resource_version=rv, timeout_seconds=60)
        for event in stream:
            got = event["object"]
            events.put((event["type"], got.metadata.name,
                        [e.conditions.ready for e in got.endpoints or []]))

    following = threading.Thread(target=follow, daemon=True)
    following.start()
    try:
        slices.create_namespaced_endpoint_slice("default", endpoint_slice("web-a", "web", True))
        expect_event(events, ("ADDED", "web-a", [True]), seen)
        slices.create_namespaced_endpoint_slice("default", endpoint_slice("dns-a", "dns", True))
        slices.patch_namespaced_endpoint_slice("web-a", "default", {
            "endpoints": endpoint_slice("web-a", "web", True, False)["endpoints"]})
        expect_event(events, ("MODIFIED", "web-a", [True, False]), seen)
        slices.patch_namespaced_endpoint_slice("dns-a", "default", {
            "metadata": {"labels": {SERVICE_NAME_LABEL: "web"}}})
        expect_event(events, ("ADDED", "dns-a", [True]), seen)
        slices.delete_namespaced_endpoint_slice("web-a", "default")
        expect_event(events, ("DELETED", "web-a", [True, False]), seen)
        assert [e[:2] for e in seen] == [("ADDED", "web-a"), ("MODIFIED", "web-a"),
                                         ("ADDED", "dns-a"), ("DELETED", "web-a")]
    finally:   # the server ends the watch (Watch.stop() would cut the connection under it)
        wait(lambda: fakekube.end_watches() or not following.is_alive(), 20,
             "the watch to end")


def test_watch_bookmarks_carry_the_current_resource_version(fakekube, core):
    fakekube.bookmark_interval = 0.1
    rv = core.list_node().metadata.resource_version
    core.create_namespaced_config_map("default", {"metadata": {"name": "elsewhere"}})
    w = watch.Watch()
    for event in w.stream(core.list_node, resource_version=rv, allow_watch_bookmarks=True,
                          timeout_seconds=10):
        assert event["type"] == "BOOKMARK"
        break
    assert int(w.resource_version) == fakekube.store.resource_version > int(rv)


def test_watch_from_before_the_compaction_point_is_expired(fakekube, core):
    core.create_node(node("n1"))
    old = core.list_node().metadata.resource_version
    core.create_node(node("n2"))
    fakekube.store.compact()
    with pytest.raises(ApiException) as expired:
        list(watch.Watch().stream(core.list_node, resource_version=old, timeout_seconds=5))
    assert expired.value.status == 410
    current = core.list_node().metadata.resource_version
    assert list(watch.Watch().stream(core.list_node, resource_version=current,
                                     timeout_seconds=1)) == []

    page = core.list_node(limit=1)
    assert page.metadata._continue and page.metadata.remaining_item_count == 1
    fakekube.store.compact()
    core.create_node(node("n3"))
    fakekube.store.compact()
    with pytest.raises(ApiException) as too_old:
        core.list_node(limit=1, _continue=page.metadata._continue)
    assert too_old.value.status == 410


class Recorder:
    """An informer's handlers, recording (event, name) in order."""

    def __init__(self, informer: SharedInformer):
        self.events: queue.Queue = queue.Queue()
        self.seen: list = []
        self.errors: list = []
        for kind in (ADDED, MODIFIED, DELETED):
            informer.add_event_handler(
                kind, lambda obj, kind=kind: self.events.put((kind, obj.metadata.name)))
        informer.add_event_handler(ERROR, self.errors.append)

    def expect(self, kind: str, name: str) -> None:
        expect_event(self.events, (kind, name), self.seen)


def stop_informer(informer: SharedInformer, kube) -> None:
    """SharedInformer.stop() joins a thread that may sit in a watch it opened after stop()
    looked (e.g. when stopped during a re-list): end watches until the thread is gone."""
    stopping = threading.Thread(target=informer.stop)
    stopping.start()

    def stopped() -> bool:
        kube.end_watches()
        stopping.join(0.1)
        return not stopping.is_alive()
    wait(stopped, 20, "the informer to stop")


def lists(kube, path: str) -> int:
    return sum(r.path == path and "watch" not in r.query for r in kube.requests)


def watches(kube, path: str) -> int:
    return sum(r.path == path and "watch" in r.query for r in kube.requests)


def test_informer_follows_changes_and_survives_api_server_restarts(fakekube, core):
    core.create_node(node("a", {"pipit": "yes"}))
    core.create_node(node("ignored"))
    informer = SharedInformer(core.list_node, label_selector="pipit=yes")
    seen = Recorder(informer)
    informer.start()
    try:
        seen.expect(ADDED, "a")
        core.create_node(node("b", {"pipit": "yes"}))
        seen.expect(ADDED, "b")
        core.patch_node("b", {"metadata": {"annotations": {"x": "1"}}})
        seen.expect(MODIFIED, "b")
        core.delete_node("b")
        seen.expect(DELETED, "b")
        assert {n.metadata.name for n in informer.cache.list()} == {"a"}

        # a restart drops the watch; the informer watches again from where it was, no new list
        listed, watched = lists(fakekube, "/api/v1/nodes"), watches(fakekube, "/api/v1/nodes")
        fakekube.stop()
        fakekube.store.create(NODES, None, node("c", {"pipit": "yes"}))
        fakekube.start()
        seen.expect(ADDED, "c")
        assert lists(fakekube, "/api/v1/nodes") == listed
        assert watches(fakekube, "/api/v1/nodes") == watched + 1

        # a restart after compaction: 410 Expired, the informer lists again
        fakekube.stop()
        fakekube.store.create(NODES, None, node("d", {"pipit": "yes"}))
        fakekube.store.delete(NODES, None, "a")
        fakekube.store.compact()
        fakekube.start()
        seen.expect(DELETED, "a")
        seen.expect(ADDED, "d")
        assert lists(fakekube, "/api/v1/nodes") == listed + 1
        assert any(getattr(e, "status", None) == 410 for e in seen.errors)
        assert {n.metadata.name for n in informer.cache.list()} == {"c", "d"}
    finally:
        stop_informer(informer, fakekube)


def test_informer_on_a_node_scoped_field_selector(fakekube, core):
    """What Pipit's agent does: pods of its node only; a pod bound elsewhere never shows."""
    informer = SharedInformer(core.list_pod_for_all_namespaces, field_selector="spec.nodeName=n1")
    seen = Recorder(informer)
    informer.start()
    try:
        core.create_namespaced_pod("default", pod("elsewhere", node="n2"))
        core.create_namespaced_pod("default", pod("here", node="n1"))
        seen.expect(ADDED, "here")
        core.delete_namespaced_pod("here", "default")
        seen.expect(DELETED, "here")
        assert ("ADDED", "elsewhere") not in seen.seen
    finally:
        stop_informer(informer, fakekube)


def test_lease_updates_are_optimistic(api):
    """Two candidates read the lease; the first update wins, the second conflicts."""
    first, second = (LeaseLock("pipit-controller", "kube-system", who) for who in ("a", "b"))
    for lock in (first, second):
        lock.api_instance = client.CoordinationV1Api(api)
    record = LeaderElectionRecord("a", "15", "2025-01-01 00:00:00", "2025-01-01 00:00:00")
    assert first.create("pipit-controller", "kube-system", record)
    assert second.get("pipit-controller", "kube-system")[0]
    renewed = LeaderElectionRecord("a", "15", "2025-01-01 00:00:00", "2025-01-01 00:00:01")
    assert first.update("pipit-controller", "kube-system", renewed)
    taken = LeaderElectionRecord("b", "15", "2025-01-01 00:00:01", "2025-01-01 00:00:01")
    assert not second.update("pipit-controller", "kube-system", taken)
    held = client.CoordinationV1Api(api).read_namespaced_lease("pipit-controller", "kube-system")
    assert held.spec.holder_identity == "a"


@pytest.mark.slow
def test_leader_election_hands_over_through_the_lease(api):
    """The Python client's leader election on a Lease in the fake: candidate a leads, stops
    renewing; b takes over only once a's lease has run out."""
    leases = client.CoordinationV1Api(api)
    led: list[str] = []
    holders: list[str] = []

    def candidate(identity: str) -> threading.Thread:
        lock = LeaseLock("pipit-controller", "kube-system", identity)
        lock.api_instance = leases

        def lead() -> None:
            led.append(identity)
            raise RuntimeError("stepping down")   # the election stops renewing

        config = ElectionConfig(lock, lease_duration=3, renew_deadline=2, retry_period=1,
                                onstarted_leading=lead, onstopped_leading=lambda: None)
        thread = threading.Thread(target=LeaderElection(config).run, daemon=True)
        thread.start()
        return thread

    rv = leases.list_namespaced_lease("kube-system").metadata.resource_version
    a = candidate("a")
    wait(lambda: led == ["a"], 20, "a to lead")
    b = candidate("b")
    wait(lambda: led == ["a", "b"], 30, "b to take over")
    a.join(10)
    b.join(10)
    assert not a.is_alive() and not b.is_alive()
    for event in watch.Watch().stream(leases.list_namespaced_lease, "kube-system",
                                      resource_version=rv, timeout_seconds=1):
        holders.append(event["object"].spec.holder_identity)
    assert holders[0] == "a" and holders[-1] == "b"
    assert holders == sorted(holders)   # never back to a


# ---------------------------------------------------------------------------------------------
# as a process, for the lab

def test_runs_as_a_process_for_the_lab(tmp_path):
    """`python -m tests.fakekube`: the kubeconfig it writes serves kubectl and the Python
    client's loader; SIGTERM ends it cleanly."""
    port, config = free_port(), tmp_path / "kubeconfig"
    server = subprocess.Popen([sys.executable, "-m", "tests.fakekube", "--port", str(port),
                               "--kubeconfig", str(config)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        assert server.stdout.readline().strip() == f"fakekube listening on http://127.0.0.1:{port}"
        env = {**os.environ, "HOME": str(tmp_path), "KUBECONFIG": str(config)}
        done = subprocess.run([str(KUBECTL), "get", "namespaces", "-o", "name"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.stdout.split() == ["namespace/default", "namespace/kube-node-lease",
                                       "namespace/kube-public", "namespace/kube-system"]
        with kubernetes_config.new_client_from_config(str(config)) as from_config:
            assert client.CoreV1Api(from_config).read_namespace("default").status.phase == \
                "Active"
        assert stop_group(server) == 0
    finally:
        stop_group(server, signal.SIGKILL)
        server.stdout.close()
