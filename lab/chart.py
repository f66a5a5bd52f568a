"""The Helm chart (charts/pipit) as the lab and the tests use it: rendered with the real helm
(`render`), its objects picked out by kind and name; and run on the lab's nodes the way a
kubelet would (`ChartNodes`, behind `pipitctl lab up --from-chart`):

- the chart is rendered with the lab's etcd (and BGP timers), then the user's values;
- each node gets its own root directory for hostPath volumes (`<lab>/<node>/root`: its
  /run/pipit, /etc/cni/net.d, /opt/cni/bin), and the node DaemonSet's pod, run by lab.kubelet
  from the image scripts/build-image made: install-cni, then the agent and ExaBGP;
- the post-install hooks (the config Job) run as pods on the first node;
- pods are attached with the conflist the agent wrote and the plugins install-cni copied,
  run as a container runtime runs them, with the node's own /run (lab.chart.node_view);
- an upgrade renders again and replaces each node's pod in the DaemonSet's rolling order.

    objects = render(CHART, values=[Path("my-values.yaml")], set_values={"etcd.endpoints":
                     "{http://10.0.0.1:2379}"})
    daemonset = find(objects, "DaemonSet", "pipit-node")
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "pipit"
HELM = Path(sys.executable).parent / "helm"  # scripts/setup.sh puts helm 4 into the venv
RELEASE = "pipit"
NAMESPACE = "kube-system"


class ChartError(RuntimeError):
    """helm refused to render the chart (bad values, a template error); the message is
    helm's."""


def render(chart: Path = CHART, values: Sequence[Path] = (), set_values: Mapping[str, str] = {},
           *, release: str = RELEASE, namespace: str = NAMESPACE,
           kube_version: str | None = None) -> list[dict]:
    """The objects `helm template` renders (hooks and tests included), in its order."""
    return list(yaml.safe_load_all(template(chart, values, set_values, release=release,
                                            namespace=namespace, kube_version=kube_version)))


def template(chart: Path = CHART, values: Sequence[Path] = (), set_values: Mapping[str, str] = {},
             *, release: str = RELEASE, namespace: str = NAMESPACE,
             kube_version: str | None = None) -> str:
    """`helm template` output as text."""
    argv = [str(HELM), "template", release, str(chart), "--namespace", namespace]
    if kube_version:
        argv += ["--kube-version", kube_version]
    for path in values:
        argv += ["--values", str(path)]
    for key, value in set_values.items():
        argv += ["--set", f"{key}={value}"]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise ChartError(f"helm is not installed at {HELM}: run scripts/setup.sh") from None
    if result.returncode != 0:
        raise ChartError(" ".join(result.stderr.split()) or f"helm exited with "
                         f"{result.returncode}")
    return result.stdout


def find(objects: Iterable[dict], kind: str, name: str | None = None) -> dict:
    """The one rendered object of this kind (and name)."""
    found = [o for o in objects if o and o.get("kind") == kind
             and (name is None or o["metadata"]["name"] == name)]
    if len(found) != 1:
        raise LookupError(f"{len(found)} {kind} objects named {name or '(any)'} rendered")
    return found[0]


def of_kind(objects: Iterable[dict], kind: str) -> list[dict]:
    return [o for o in objects if o and o.get("kind") == kind]


def container(pod_spec: dict, name: str) -> dict:
    for entry in pod_spec.get("initContainers", []) + pod_spec.get("containers", []):
        if entry["name"] == name:
            return entry
    raise LookupError(f"no container {name} in the pod spec")


# --------------------------------------------------------------------------------------------
# The rendered chart run on the lab's nodes (`pipitctl lab up --from-chart`)

def image_archive(chart: Path = CHART) -> Path:
    """Where scripts/build-image puts the image of this chart's appVersion."""
    meta = yaml.safe_load((Path(chart) / "Chart.yaml").read_text())
    return ROOT / "build" / "image" / f"pipit-{meta['appVersion']}.oci.tar"


def node_view(node_root: Path) -> list[str]:
    """argv prefix that runs a command (a CNI plugin, as the container runtime does) with the
    lab node's own /run (its IPAM socket under /run/pipit), the machine's network namespaces
    still under /run/netns."""
    script = 'mount --rbind /run/netns "$0/run/netns" && mount --rbind "$0/run" /run && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script,
            str(node_root)]


def host_side(path: str, container_spec: dict, pod_spec: dict, node_root: Path) -> Path:
    """Where a path inside a container is on its lab node, through the container's volume
    mounts (the longest that holds it) and the pod's hostPath volumes."""
    mounts = sorted(container_spec.get("volumeMounts", []), key=lambda m: -len(m["mountPath"]))
    for mount in mounts:
        inside = mount["mountPath"].rstrip("/")
        if path == inside or path.startswith(inside + "/"):
            [volume] = [v for v in pod_spec["volumes"] if v["name"] == mount["name"]]
            if "hostPath" not in volume:
                break
            rest = path[len(inside):].lstrip("/")
            return node_root / volume["hostPath"]["path"].lstrip("/") / rest
    raise LookupError(f"{path} is not on a hostPath volume of container "
                      f"{container_spec['name']}")


def flag(args: list[str], name: str) -> str:
    """The value of --name=VALUE in a rendered argument list."""
    for arg in args:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    raise LookupError(f"the chart passes no --{name}")


class ChartNodes:
    """The chart's rendering, kept in the lab's directory (chart/), and the pods it gives each
    node, run by lab.kubelet. The lab's etcd is the chart's etcd.endpoints (a unix socket
    every pod reaches at the same path: it stands for the network)."""

    def __init__(self, directory: Path, chart: Path = CHART, values: tuple[Path, ...] = (),
                 set_values: dict | None = None, image: Path | None = None):
        self.directory = Path(directory)
        self.chart = Path(chart).resolve()
        self.values = tuple(Path(v).resolve() for v in values)
        self.set_values = dict(set_values or {})
        self.image = Path(image).resolve() if image else image_archive(self.chart)

    # -- state --------------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self.directory / "chart"

    def to_json(self) -> dict:
        return {"chart": str(self.chart), "values": [str(v) for v in self.values],
                "set": self.set_values, "image": str(self.image)}

    @classmethod
    def attached(cls, directory: Path) -> ChartNodes | None:
        """The chart the lab in `directory` runs, if it runs one."""
        try:
            saved = json.loads((Path(directory) / "lab.json").read_text()).get("chart")
        except (OSError, ValueError):
            return None
        if not saved:
            return None
        return cls(directory, Path(saved["chart"]), tuple(map(Path, saved["values"])),
                   saved["set"], Path(saved["image"]))

    def objects(self) -> list[dict]:
        return list(yaml.safe_load_all((self.state_dir / "rendered.yaml").read_text()))

    def daemonset(self) -> dict:
        return find(self.objects(), "DaemonSet", f"{RELEASE}-node")

    # -- rendering ----------------------------------------------------------------------

    def render(self, lab) -> None:
        """Render the chart with the lab's settings, then the user's values, then the lab's
        etcd (which only the lab knows); unpack the image."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        lab_values = self.state_dir / "lab-values.yaml"
        lab_values.write_text(yaml.safe_dump({"bgp": {
            "nodeMeshHoldTime": lab.hold_time, "nodeMeshMaxRestartTime": lab.restart_time}}))
        etcd_values = self.state_dir / "lab-etcd-values.yaml"
        etcd_values.write_text(yaml.safe_dump({"etcd": {"endpoints": [lab.etcd_endpoint]}}))
        text = template(self.chart, [lab_values, *self.values, etcd_values], self.set_values)
        (self.state_dir / "rendered.yaml").write_text(text)
        from lab.oci_image import built_from, source_digest, unpack
        image = unpack(self.image, name=self._repository())
        if built_from(image) != source_digest():
            lab.log(f"warning: {self.image} was built from other sources than these: the "
                    "nodes run the code it holds (rebuild it with scripts/build-image)")
        (self.state_dir / "images.json").write_text(json.dumps({image.ref: image.to_json()}))
        lab.log(f"chart {self.chart.name} rendered; image {image.ref} from {self.image}")

    def _repository(self) -> str:
        image = container(self.daemonset()["spec"]["template"]["spec"], "agent")["image"]
        return image.rsplit(":", 1)[0]

    # -- a node's paths, as the chart lays them out ---------------------------------------

    def node_root(self, lab, node: str) -> Path:
        return lab.node_dir(node) / "root"

    def _agent_path(self, lab, node: str, name: str) -> Path:
        spec = self.daemonset()["spec"]["template"]["spec"]
        agent = container(spec, "agent")
        return host_side(flag(agent["args"], name), agent, spec, self.node_root(lab, node))

    def status_socket(self, lab, node: str) -> Path:
        return self._agent_path(lab, node, "status-socket")

    def ipam_socket(self, lab, node: str) -> Path:
        return self._agent_path(lab, node, "ipam-socket")

    def conflist(self, lab, node: str) -> Path | None:
        """The network configuration a container runtime would use on the node: libcni's
        rule, the first .conf/.conflist/.json in /etc/cni/net.d by name."""
        conf_dir = self.node_root(lab, node) / "etc" / "cni" / "net.d"
        found = sorted(p for p in conf_dir.glob("*") if p.suffix in (".conf", ".conflist",
                                                                     ".json"))
        return found[0] if found else None

    def network(self, lab, node: str):
        from lab.cni import NetworkConfig
        from lab.process import wait
        path = wait(lambda: self.conflist(lab, node), 30, f"the CNI configuration on {node}")
        return NetworkConfig.load(path)

    def runtime(self, lab, node: str):
        from lab.cni import CNIRuntime
        root = self.node_root(lab, node)
        return CNIRuntime(root / "opt" / "cni" / "bin", netns=lab.node_ns(node),
                          cache_dir=root / "var" / "lib" / "cni", wrapper=node_view(root))

    # -- pods -----------------------------------------------------------------------------

    def _pod_object(self, kind: str, name: str, workload: dict, node: str) -> dict:
        import uuid
        template_ = workload["spec"]["template"]
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"{name}-{node}", "namespace": NAMESPACE,
                             "uid": str(uuid.uuid4()),
                             "labels": template_["metadata"].get("labels", {}),
                             "annotations": template_["metadata"].get("annotations", {}),
                             "ownerReferences": [{"kind": kind, "name": name}]},
                "spec": {**template_["spec"], "nodeName": node}}

    def _objects_by_kind(self) -> dict:
        found: dict = {"ConfigMap": {}, "Secret": {}}
        for obj in self.objects():
            if obj and obj.get("kind") in found:
                data = dict(obj.get("data") or {})
                if obj["kind"] == "Secret":
                    import base64
                    data.update({k: base64.b64encode(v.encode()).decode()
                                 for k, v in (obj.get("stringData") or {}).items()})
                found[obj["kind"]][obj["metadata"]["name"]] = data
        return found

    def _launch(self, lab, node: str, pod: dict, label: str) -> tuple[Path, subprocess.Popen]:
        """Write the pod's description and start its kubelet in the node's namespace."""
        from lab import netns
        info = lab._state()["nodes"][node]
        pods = lab.node_dir(node) / "pods"
        pods.mkdir(parents=True, exist_ok=True)
        pod_dir = pods / f"{label}-{len(list(pods.iterdir())) + 1}"
        pod_dir.mkdir()
        root = self.node_root(lab, node)
        (root / "run" / "netns").mkdir(parents=True, exist_ok=True)  # for node_view
        description = {
            "pod": pod, "node": {"name": node, "address": info["address"].split("/")[0],
                                 "root": str(root)},
            "images": json.loads((self.state_dir / "images.json").read_text()),
            "objects": self._objects_by_kind(),
            "sharedPaths": [str(lab.directory / "etcd")]}
        (pod_dir / "pod.json").write_text(json.dumps(description, indent=2))
        with open(pod_dir / "kubelet.out", "ab") as out:
            process = subprocess.Popen(
                [*netns.exec_prefix(lab.node_ns(node)), sys.executable, "-m", "lab.kubelet",
                 str(pod_dir)], stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=ROOT)
        return pod_dir, process

    @staticmethod
    def pod_status(pod_dir: Path) -> dict:
        try:
            return json.loads((Path(pod_dir) / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def start_pod(self, lab, node: str, timeout: float = 120.0) -> None:
        """The node DaemonSet's pod on `node`, running and ready (as a rollout waits for)."""
        from lab.process import alive, wait
        current = lab._state()["nodes"][node].get("pod")
        if current and alive(current["kubelet"]) and self.pod_status(current["dir"]).get("ready"):
            return
        daemonset = self.daemonset()
        name = daemonset["metadata"]["name"]
        pod_dir, process = self._launch(lab, node, self._pod_object("DaemonSet", name,
                                                                    daemonset, node), name)
        nodes = lab._state()["nodes"]
        nodes[node]["pod"] = {"dir": str(pod_dir), "kubelet": process.pid}
        lab._save(nodes=nodes)

        def settled():
            status = self.pod_status(pod_dir)
            return (status.get("ready") or status.get("phase") == "Failed"
                    or process.poll() is not None)
        try:
            wait(settled, timeout, f"the pipit-node pod on {node} to be ready")
        except TimeoutError:
            raise RuntimeError(f"the pipit-node pod on {node} is not ready after {timeout:g} s: "
                               f"{self.describe(pod_dir)}") from None
        if not self.pod_status(pod_dir).get("ready"):
            raise RuntimeError(f"the pipit-node pod on {node} failed: {self.describe(pod_dir)}")
        lab.log(f"{node}: pod {name}-{node} ready ({info_address(lab, node)})")

    def describe(self, pod_dir: Path) -> str:
        status = self.pod_status(pod_dir)
        words = [f"phase {status.get('phase', 'unknown')}"]
        if status.get("message"):
            words.append(status["message"])
        for name, entry in {**status.get("initContainers", {}),
                            **status.get("containers", {})}.items():
            words.append(f"{name} {entry['state']}"
                         + (f" ({entry['reason']})" if entry.get("reason") else "")
                         + ("" if entry["ready"] or entry["state"] != "running" else ", not ready"))
        return "; ".join(words) + f" (logs in {pod_dir}/logs)"

    def stop_pod(self, lab, node: str, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
        """Delete the node's pod (SIGTERM: graceful, the containers get SIGTERM), or crash it
        (SIGKILL: the kubelet and every container killed at once)."""
        from lab.process import alive, kill, wait
        pod = lab._state()["nodes"].get(node, {}).get("pod")
        if not pod or not alive(pod["kubelet"]):
            return
        if sig == signal.SIGKILL:
            for entry in self.pod_status(pod["dir"]).get("containers", {}).values():
                if entry.get("pid"):
                    kill(entry["pid"])
            kill(pod["kubelet"])
        else:
            os.kill(pod["kubelet"], sig)
        wait(lambda: not alive(pod["kubelet"]), timeout, f"the pod on {node} to stop")

    def run_pod(self, lab, node: str, kind: str, name: str, timeout: float = 120.0) -> None:
        """A Job's (or a test's) pod on `node`, run to completion; raises if it failed."""
        from lab.process import wait
        obj = find(self.objects(), kind, name)
        pod = (obj if kind == "Pod" else self._pod_object(kind, name, obj, node))
        pod = {**pod, "spec": {**pod["spec"], "nodeName": node}}
        pod_dir, process = self._launch(lab, node, pod, name)
        try:
            wait(lambda: process.poll() is not None, timeout, f"{kind} {name} to finish")
        except TimeoutError:
            process.terminate()
            process.wait()
            raise RuntimeError(f"{kind} {name} did not finish: {self.describe(pod_dir)}") from None
        if self.pod_status(pod_dir).get("phase") != "Succeeded":
            raise RuntimeError(f"{kind} {name} failed: {self.describe(pod_dir)}")
        lab.log(f"{kind.lower()} {name} succeeded on {node}")

    def hooks(self, event: str) -> list[tuple[str, str]]:
        """The hook Jobs and Pods for a helm event (post-install...), in weight order."""
        found = []
        for obj in self.objects():
            annotations = (obj or {}).get("metadata", {}).get("annotations", {})
            if event in annotations.get("helm.sh/hook", "").split(",") and \
                    obj["kind"] in ("Job", "Pod"):
                found.append((int(annotations.get("helm.sh/hook-weight", "0")), obj["kind"],
                              obj["metadata"]["name"]))
        return [(kind, name) for _, kind, name in sorted(found)]

    def run_hooks(self, lab, event: str) -> None:
        node = lab.nodes()[0]
        for kind, name in self.hooks(event):
            self.run_pod(lab, node, kind, name)

    def upgrade(self, lab, values: tuple[Path, ...] = (), set_values: dict | None = None,
                timeout: float = 120.0) -> None:
        """`helm upgrade` with more values: render again, then replace each node's pod the
        way the DaemonSet's rolling update does (maxUnavailable nodes at a time, each batch
        ready before the next), then the post-upgrade hooks."""
        before = (self.values, dict(self.set_values))
        self.values = self.values + tuple(Path(v).resolve() for v in values)
        self.set_values.update(set_values or {})
        try:
            self.render(lab)
        except ChartError:  # refused values change nothing
            self.values, self.set_values = before
            self.render(lab)
            raise
        lab._save(chart=self.to_json())
        strategy = self.daemonset()["spec"].get("updateStrategy", {})
        step = int(strategy.get("rollingUpdate", {}).get("maxUnavailable", 1))
        nodes = lab.nodes()
        for start in range(0, len(nodes), step):
            batch = nodes[start:start + step]
            for node in batch:
                self.stop_pod(lab, node)
            for node in batch:
                self.start_pod(lab, node, timeout)
        self.run_hooks(lab, "post-upgrade")


def info_address(lab, node: str) -> str:
    return lab._state()["nodes"][node]["address"]
