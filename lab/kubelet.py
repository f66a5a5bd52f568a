"""A kubelet for the lab: it runs one pod of a rendered chart on one lab node, the way a
kubelet would, from the image's root file system (no container runtime runs here:
`podman run` fails on setrlimit inside crun).

    ip netns exec <node namespace> python -m lab.kubelet POD_DIR

POD_DIR/pod.json (written by lab.chart) holds the pod (metadata and spec as the chart
rendered them), the node (name, address, root), the images by name (lab.oci_image), the
ConfigMaps and Secrets its volumes and environment refer to, and the host paths that every
node shares (the lab's etcd socket stands for the network a real etcd is reached over).

What it does with them:
- volumes: hostPath as directories (or files) under the node's root (`<node root>/<path>`,
  so that each lab node has its own /run/pipit, /etc/cni/net.d, /opt/cni/bin), emptyDir as a
  directory of the pod, Secret, ConfigMap, projected and downwardAPI volumes as files with
  their modes;
- init containers one after the other to completion, then every container, each started by
  lab.container_init (its own writable layer over the image, its volumes, its capabilities);
  command and args as Kubernetes combines them with the image's entrypoint and command, $(VAR)
  expanded; the environment with the downward API (fieldRef) and Secret/ConfigMap references
  filled in;
- probes (startup, liveness, readiness; httpGet, tcpSocket, exec) polled at their periods: a
  failed liveness probe restarts the container, readiness makes the pod ready;
- restartPolicy, with a back-off (1 s doubling to 30 s: shorter than a kubelet's, for a lab);
- SIGTERM: the pod is deleted: every container gets SIGTERM, then SIGKILL (its whole process
  group) after terminationGracePeriodSeconds.

It writes POD_DIR/status.json (phase, ready, each container's state, restarts, pid) whenever
something changes, and its own log to POD_DIR/kubelet.log; each container's output goes to
POD_DIR/logs/<container>.log.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("lab.kubelet")

# What a container runtime (containerd, CRI-O) grants a container by default.
DEFAULT_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID",
                        "SETUID", "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL",
                        "AUDIT_WRITE")
BACKOFF_START, BACKOFF_MAX = 1.0, 30.0
TICK = 0.1


class PodError(Exception):
    """The pod cannot run as specified (a volume or reference that does not resolve)."""


# --------------------------------------------------------------------------------------------
# Pure parts: environment, command line, capabilities, mounts

@dataclass(frozen=True)
class PodContext:
    """What the downward API and the hostPath mapping need to know about the pod."""
    name: str
    namespace: str
    uid: str
    node: str
    host_ip: str
    service_account: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    host_network: bool = True

    @property
    def pod_ip(self) -> str:
        return self.host_ip  # hostNetwork: the node's address (the lab runs no other pods)


_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: a defined variable is replaced, an undefined reference
    stays as written, $$ is a literal $."""
    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)
    return _REFERENCE.sub(replace, text)


def field_value(path: str, ctx: PodContext) -> str:
    """A fieldRef of the downward API."""
    simple = {"metadata.name": ctx.name, "metadata.namespace": ctx.namespace,
              "metadata.uid": ctx.uid, "spec.nodeName": ctx.node,
              "spec.serviceAccountName": ctx.service_account, "status.hostIP": ctx.host_ip,
              "status.hostIPs": ctx.host_ip, "status.podIP": ctx.pod_ip,
              "status.podIPs": ctx.pod_ip}
    if path in simple:
        return simple[path]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        source = ctx.labels if match.group(1) == "labels" else ctx.annotations
        return source.get(match.group(2), "")
    raise PodError(f"fieldRef {path!r} is not one the downward API offers")


def key_value(objects: Mapping, kind: str, ref: Mapping) -> str | None:
    """A key of a ConfigMap or Secret (None if optional and missing)."""
    data = objects.get(kind, {}).get(ref["name"])
    if data is None or ref["key"] not in data:
        if ref.get("optional"):
            return None
        raise PodError(f"{kind} {ref['name']} has no key {ref['key']!r}" if data is not None
                       else f"{kind} {ref['name']} does not exist")
    return data[ref["key"]]


def container_env(container: Mapping, image_env: list[str], ctx: PodContext,
                  objects: Mapping) -> dict[str, str]:
    """The environment of a container: the image's, HOSTNAME, envFrom, then env in order
    (each value may refer to the variables before it)."""
    env: dict[str, str] = dict(item.split("=", 1) for item in image_env if "=" in item)
    env["HOSTNAME"] = ctx.node if ctx.host_network else ctx.name
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key in source:
                data = objects.get(kind, {}).get(source[key]["name"])
                if data is None and not source[key].get("optional"):
                    raise PodError(f"{kind} {source[key]['name']} does not exist")
                env.update({prefix + k: v for k, v in (data or {}).items()})
    for item in container.get("env", []):
        value_from = item.get("valueFrom")
        if value_from is None:
            env[item["name"]] = expand(str(item.get("value", "")), env)
            continue
        if "fieldRef" in value_from:
            value = field_value(value_from["fieldRef"]["fieldPath"], ctx)
        elif "configMapKeyRef" in value_from:
            value = key_value(objects, "ConfigMap", value_from["configMapKeyRef"])
        elif "secretKeyRef" in value_from:
            value = key_value(objects, "Secret", value_from["secretKeyRef"])
        elif "resourceFieldRef" in value_from:
            value = resource_value(container, value_from["resourceFieldRef"])
        else:
            raise PodError(f"env {item['name']}: unknown valueFrom {sorted(value_from)}")
        if value is not None:
            env[item["name"]] = value
    return env


def resource_value(container: Mapping, ref: Mapping) -> str:
    kind, _, name = ref["resource"].partition(".")
    value = container.get("resources", {}).get(kind, {}).get(name)
    return str(value) if value is not None else "0"


def container_argv(container: Mapping, image_config: Mapping, env: Mapping[str, str]
                   ) -> list[str]:
    """Kubernetes' rule: `command` replaces the image's entrypoint (and then its Cmd is not
    used), `args` replaces its Cmd; both $(VAR)-expanded."""
    if "command" in container:
        command, args = container["command"], container.get("args", [])
    else:
        command = image_config.get("Entrypoint") or []
        args = container.get("args", image_config.get("Cmd") or [])
    argv = [expand(str(a), env) for a in [*command, *args]]
    if not argv:
        raise PodError(f"container {container['name']} has no command and its image none")
    return argv


def capabilities(security: Mapping) -> list[str] | None:
    """The capabilities a container keeps (None: all, privileged)."""
    if security.get("privileged"):
        return None
    caps = security.get("capabilities", {})
    drop = {c.upper().removeprefix("CAP_") for c in caps.get("drop", [])}
    add = [c.upper().removeprefix("CAP_") for c in caps.get("add", [])]
    kept = [] if "ALL" in drop else [c for c in DEFAULT_CAPABILITIES if c not in drop]
    return sorted(set(kept) | set(add))


def container_mounts(container: Mapping, volumes: Mapping[str, Path],
                     shared_paths: list[str]) -> list[dict]:
    """Bind mounts for the container's volumeMounts (subPath included), parents first, plus
    the paths every node shares, at the same place."""
    mounts = []
    for entry in container.get("volumeMounts", []):
        if entry["name"] not in volumes:
            raise PodError(f"container {container['name']} mounts volume {entry['name']}, "
                           "which the pod does not have")
        source = volumes[entry["name"]]
        if entry.get("subPath"):
            source = source / entry["subPath"]
        mounts.append({"source": str(source), "target": entry["mountPath"],
                       "readOnly": bool(entry.get("readOnly")), "file": source.is_file()})
    for path in shared_paths:
        mounts.append({"source": path, "target": path, "readOnly": False, "file": False})
    return sorted(mounts, key=lambda m: m["target"].rstrip("/").count("/"))


# --------------------------------------------------------------------------------------------
# Volumes (I/O)

def _items(data: Mapping[str, bytes], items: list | None, default_mode: int
           ) -> list[tuple[str, bytes, int]]:
    if not items:
        return [(key, value, default_mode) for key, value in data.items()]
    chosen = []
    for item in items:
        if item["key"] not in data:
            raise PodError(f"no key {item['key']!r} for volume item {item['path']}")
        chosen.append((item["path"], data[item["key"]], item.get("mode", default_mode)))
    return chosen


def object_files(objects: Mapping, kind: str, spec: Mapping) -> dict[str, bytes]:
    name = spec.get("name") or spec.get("secretName")
    data = objects.get(kind, {}).get(name)
    if data is None:
        if spec.get("optional"):
            return {}
        raise PodError(f"{kind} {name} does not exist")
    if kind == "Secret":
        return {k: base64.b64decode(v) for k, v in data.items()}
    return {k: v.encode() for k, v in data.items()}


def prepare_volumes(spec: Mapping, pod_dir: Path, node_root: Path, shared_paths: list[str],
                    ctx: PodContext, objects: Mapping) -> dict[str, Path]:
    """Make every volume of the pod; their paths on this machine, by name."""
    volumes = {}
    for volume in spec.get("volumes", []):
        name = volume["name"]
        if "hostPath" in volume:
            volumes[name] = host_path(volume["hostPath"], node_root, shared_paths)
            continue
        path = pod_dir / "volumes" / name
        if "emptyDir" in volume:
            path.mkdir(parents=True, exist_ok=True)
        elif "configMap" in volume or "secret" in volume:
            kind = "ConfigMap" if "configMap" in volume else "Secret"
            source = volume["configMap" if kind == "ConfigMap" else "secret"]
            files = _items(object_files(objects, kind, source), source.get("items"),
                           source.get("defaultMode", 0o644))
            _replace_dir(path, files)
        elif "projected" in volume:
            files = []
            default = volume["projected"].get("defaultMode", 0o644)
            for source in volume["projected"].get("sources", []):
                if "secret" in source or "configMap" in source:
                    kind = "Secret" if "secret" in source else "ConfigMap"
                    entry = source["secret" if kind == "Secret" else "configMap"]
                    files += _items(object_files(objects, kind, entry), entry.get("items"),
                                    default)
                elif "downwardAPI" in source:
                    files += _downward(source["downwardAPI"], ctx, default)
                else:
                    raise PodError(f"volume {name}: projected source {sorted(source)} is not "
                                   "supported by the lab")
            _replace_dir(path, files)
        elif "downwardAPI" in volume:
            _replace_dir(path, _downward(volume["downwardAPI"], ctx,
                                         volume["downwardAPI"].get("defaultMode", 0o644)))
        else:
            raise PodError(f"volume {name}: {sorted(set(volume) - {'name'})} is not supported "
                           "by the lab")
        volumes[name] = path
    return volumes


def _downward(spec: Mapping, ctx: PodContext, default: int) -> list[tuple[str, bytes, int]]:
    return [(item["path"], field_value(item["fieldRef"]["fieldPath"], ctx).encode(),
             item.get("mode", default)) for item in spec.get("items", [])]


def _replace_dir(path: Path, files: list[tuple[str, bytes, int]]) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    for name, content, mode in files:
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        os.chmod(target, mode)


def host_path(spec: Mapping, node_root: Path, shared_paths: list[str]) -> Path:
    """A hostPath on this lab node: under the node's root, unless every node shares it."""
    wanted = spec["path"]
    if any(wanted == p or wanted.startswith(p.rstrip("/") + "/") for p in shared_paths):
        path = Path(wanted)
    else:
        path = node_root / wanted.lstrip("/")
    kind = spec.get("type", "")
    if kind == "DirectoryOrCreate":
        path.mkdir(parents=True, exist_ok=True)
    elif kind == "FileOrCreate":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
    elif kind == "Directory" and not path.is_dir():
        raise PodError(f"hostPath {wanted} is not a directory on node")
    elif kind == "File" and not path.is_file():
        raise PodError(f"hostPath {wanted} is not a file on node")
    elif kind == "" and not path.exists():
        path.mkdir(parents=True)  # the kubelet's default: whatever is there, else a directory
    return path


# --------------------------------------------------------------------------------------------
# Probes

def probe_once(spec: Mapping, container: Mapping, host_ip: str, pid: int | None) -> bool:
    timeout = float(spec.get("timeoutSeconds", 1))
    try:
        if "httpGet" in spec:
            get = spec["httpGet"]
            conn = http.client.HTTPConnection(get.get("host") or host_ip,
                                              port_number(get["port"], container),
                                              timeout=timeout)
            try:
                conn.request("GET", get.get("path", "/"))
                return 200 <= conn.getresponse().status < 400
            finally:
                conn.close()
        if "tcpSocket" in spec:
            address = (spec["tcpSocket"].get("host") or host_ip,
                       port_number(spec["tcpSocket"]["port"], container))
            with socket.create_connection(address, timeout=timeout):
                return True
        if "exec" in spec:
            if pid is None:
                return False
            result = subprocess.run(["nsenter", "-t", str(pid), "-m", "-r", "-w", "--",
                                     *spec["exec"]["command"]], capture_output=True,
                                    timeout=timeout)
            return result.returncode == 0
    except (OSError, http.client.HTTPException, subprocess.TimeoutExpired):
        return False
    raise PodError(f"probe {sorted(spec)} is not supported by the lab")


def port_number(port, container: Mapping) -> int:
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for entry in container.get("ports", []):
        if entry.get("name") == port:
            return int(entry["containerPort"])
    raise PodError(f"container {container['name']} has no port named {port!r}")


@dataclass
class ProbeState:
    spec: Mapping
    next_at: float
    successes: int = 0
    failures: int = 0
    passed: bool = False  # as of the thresholds

    def record(self, ok: bool, now: float) -> None:
        self.next_at = now + float(self.spec.get("periodSeconds", 10))
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= int(self.spec.get("successThreshold", 1)):
                self.passed = True
        else:
            self.successes, self.failures = 0, self.failures + 1
            if self.failures >= int(self.spec.get("failureThreshold", 3)):
                self.passed = False

    @property
    def failed(self) -> bool:
        return self.failures >= int(self.spec.get("failureThreshold", 3))


# --------------------------------------------------------------------------------------------
# The pod

@dataclass
class Container:
    spec: Mapping
    init: bool
    process: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0
    restart_at: float = 0.0
    backoff: float = BACKOFF_START
    exit_code: int | None = None
    done: bool = False  # an init container that succeeded, or a finished container
    probes: dict[str, ProbeState] = field(default_factory=dict)
    reason: str = ""

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def started(self) -> bool:
        startup = self.probes.get("startupProbe")
        return self.running and (startup is None or startup.passed)

    @property
    def ready(self) -> bool:
        if not self.started:
            return False
        readiness = self.probes.get("readinessProbe")
        return readiness is None or readiness.passed


class Kubelet:
    def __init__(self, pod_dir: Path):
        self.dir = Path(pod_dir)
        self.desc = json.loads((self.dir / "pod.json").read_text())
        pod = self.desc["pod"]
        self.spec = pod["spec"]
        meta = pod["metadata"]
        node = self.desc["node"]
        self.ctx = PodContext(meta["name"], meta.get("namespace", "default"),
                              meta.get("uid", meta["name"]), node["name"], node["address"],
                              self.spec.get("serviceAccountName", "default"),
                              meta.get("labels", {}), meta.get("annotations", {}),
                              bool(self.spec.get("hostNetwork")))
        self.node_root = Path(node["root"])
        self.shared_paths = list(self.desc.get("sharedPaths", []))
        self.objects = self.desc.get("objects", {})
        self.images = self.desc.get("images", {})
        self.policy = self.spec.get("restartPolicy", "Always")
        self.init = [Container(c, True) for c in self.spec.get("initContainers", [])]
        self.main = [Container(c, False) for c in self.spec.get("containers", [])]
        self.phase = "Pending"
        self.message = ""
        self.terminating = False
        self._last_status = ""

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict:
        def describe(c: Container) -> dict:
            state = ("running" if c.running else "terminated" if c.exit_code is not None
                     else "waiting")
            return {"state": state, "ready": c.ready, "restarts": c.restarts,
                    "pid": c.process.pid if c.running else None, "exitCode": c.exit_code,
                    "reason": c.reason}
        ready = (self.phase == "Running" and not self.terminating
                 and all(c.ready for c in self.main))
        return {"phase": self.phase, "ready": ready, "message": self.message,
                "kubeletPid": os.getpid(),
                "initContainers": {c.name: describe(c) for c in self.init},
                "containers": {c.name: describe(c) for c in self.main}}

    def write_status(self) -> None:
        text = json.dumps(self.status(), indent=2, sort_keys=True)
        if text == self._last_status:
            return
        temp = self.dir / ".status.json.tmp"
        temp.write_text(text)
        os.replace(temp, self.dir / "status.json")
        self._last_status = text

    # -- containers -----------------------------------------------------------------------

    def plan(self, container: Container, volumes: Mapping[str, Path]) -> dict:
        spec = container.spec
        image = self.images.get(spec["image"])
        if image is None:
            raise PodError(f"image {spec['image']} is not on this node (ErrImagePull); the lab "
                           f"has {', '.join(self.images) or 'none'}")
        config = image["config"]
        env = container_env(spec, config.get("Env", []), self.ctx, self.objects)
        security = spec.get("securityContext", {})
        pod_security = self.spec.get("securityContext", {})
        run_as_user = security.get("runAsUser", pod_security.get("runAsUser"))
        run_as_group = security.get("runAsGroup", pod_security.get("runAsGroup"))
        return {"rootfs": image["rootfs"], "dir": str(self.dir / "containers" / spec["name"]),
                "mounts": container_mounts(spec, volumes, self.shared_paths),
                "readOnlyRoot": bool(security.get("readOnlyRootFilesystem")),
                "privileged": bool(security.get("privileged")),
                "workingDir": spec.get("workingDir") or config.get("WorkingDir") or "/",
                "argv": container_argv(spec, config, env), "env": env,
                "capabilities": capabilities(security),
                "noNewPrivs": security.get("allowPrivilegeEscalation") is False,
                "uid": run_as_user, "gid": run_as_group,
                "hostIP": self.ctx.host_ip, "hostname": self.ctx.node}

    def start(self, container: Container, volumes: Mapping[str, Path]) -> None:
        plan = self.plan(container, volumes)
        cdir = Path(plan["dir"])
        for layer in ("upper", "work", "merged"):  # a fresh writable layer each start
            shutil.rmtree(cdir / layer, ignore_errors=True)
        cdir.mkdir(parents=True, exist_ok=True)
        (cdir / "plan.json").write_text(json.dumps(plan))
        (self.dir / "logs").mkdir(exist_ok=True)
        with open(self.dir / "logs" / f"{container.name}.log", "ab") as out:
            container.process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-m",
                 "lab.container_init", str(cdir / "plan.json")],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                cwd=Path(__file__).resolve().parent.parent)
        container.started_at = time.monotonic()
        container.exit_code = None
        container.reason = ""
        now = time.monotonic()
        container.probes = {
            kind: ProbeState(container.spec[kind],
                             now + float(container.spec[kind].get("initialDelaySeconds", 0)))
            for kind in ("startupProbe", "livenessProbe", "readinessProbe")
            if kind in container.spec}
        log.info("started container %s (pid %d): %s", container.name, container.process.pid,
                 " ".join(plan["argv"]))

    def stop(self, container: Container, grace: float) -> None:
        """SIGTERM to the container's process, SIGKILL to what is left of its group after
        `grace` seconds."""
        process = container.process
        if process is None:
            return
        if process.poll() is None:
            try:
                process.send_signal(signal.SIGTERM)
                process.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("container %s ignored SIGTERM for %g s: killed", container.name,
                            grace)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        process.wait()
        container.exit_code = process.returncode

    def run_probes(self, container: Container, now: float) -> None:
        if not container.running:
            return
        startup = container.probes.get("startupProbe")
        order = ["startupProbe"] if startup is not None and not startup.passed else [
            "livenessProbe", "readinessProbe"]
        for kind in order:
            state = container.probes.get(kind)
            if state is None or now < state.next_at:
                continue
            ok = probe_once(state.spec, container.spec, self.ctx.host_ip, container.process.pid)
            state.record(ok, now)
            if kind in ("startupProbe", "livenessProbe") and state.failed:
                log.warning("container %s failed its %s: restarting it", container.name, kind)
                container.reason = f"{kind} failed"
                self.stop(container, float(self.spec.get("terminationGracePeriodSeconds", 30)))
                return

    def reap(self, container: Container, now: float) -> None:
        """A container that exited: done, or restarted after its back-off."""
        if container.process is None or container.process.poll() is None:
            return
        code = container.process.returncode
        if container.exit_code is None:
            container.exit_code = code
            try:
                os.killpg(container.process.pid, signal.SIGKILL)  # what it left running
            except (ProcessLookupError, PermissionError):
                pass
            log.info("container %s exited with %s", container.name, code)
            if code == 0 and (container.init or self.policy != "Always"):
                container.done = True
            elif self.policy == "Never" and not container.init:
                container.done = True
            else:
                if now - container.started_at > 60:
                    container.backoff = BACKOFF_START
                container.restart_at = now + container.backoff
                container.backoff = min(container.backoff * 2, BACKOFF_MAX)
                container.reason = container.reason or f"exited with {code}"

    # -- the pod's life -------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "terminating", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(self, "terminating", True))
        try:
            volumes = prepare_volumes(self.spec, self.dir, self.node_root, self.shared_paths,
                                      self.ctx, self.objects)
            for container in self.init + self.main:
                self.plan(container, volumes)  # every reference resolves, before anything runs
        except PodError as error:
            self.phase, self.message = "Failed", str(error)
            log.error("%s", error)
            self.write_status()
            return 1
        self.write_status()
        try:
            return self._loop(volumes)
        finally:
            for container in self.init + self.main:
                if container.running:
                    self.stop(container, 0)
            self.write_status()

    def _loop(self, volumes: Mapping[str, Path]) -> int:
        grace = float(self.spec.get("terminationGracePeriodSeconds", 30))
        while True:
            now = time.monotonic()
            if self.terminating:
                self.phase = "Terminating"
                self.write_status()
                running = [c for c in self.init + self.main if c.running]
                for container in running:  # all at once, as a kubelet does
                    container.process.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + grace
                for container in running:
                    try:
                        container.process.wait(max(0.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        pass
                    self.stop(container, 0)
                self.phase = "Terminated"
                log.info("pod deleted")
                return 0
            pending_init = [c for c in self.init if not c.done]
            group = pending_init[:1] if pending_init else self.main
            for container in group:
                self.reap(container, now)
                if (not container.done and not container.running
                        and now >= container.restart_at):
                    if container.process is not None:
                        container.restarts += 1
                    self.start(container, volumes)
                self.run_probes(container, time.monotonic())
            if not pending_init:
                self.phase = "Running"
                if self.policy != "Always" and all(c.done for c in self.main):
                    failed = any(c.exit_code for c in self.main)
                    self.phase = "Failed" if failed else "Succeeded"
                    self.write_status()
                    return 1 if failed else 0
            self.write_status()
            time.sleep(TICK)


def main(argv: list[str] | None = None) -> None:
    pod_dir = Path((argv or sys.argv[1:])[0])
    logging.basicConfig(filename=pod_dir / "kubelet.log", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    sys.exit(Kubelet(pod_dir).run())


if __name__ == "__main__":
    main()
