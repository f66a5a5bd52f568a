"""The lab's Kubernetes (`pipitctl lab up --kubernetes`, mesh topology): tests/fakekube as the
API server, the lab's nodes registered as Nodes (with their InternalIP), its pods as Pods
(created before their CNI ADD and given their address after it, as a kubelet does), the
agents started with --kubeconfig, and pipit-controller.

Nothing runs in the machine's own network namespace: the API server listens on 10.99.0.1 on
the fabric's bridge (in the fabric namespace, which the nodes reach over eth0), and the
controller runs there too (etcd is a unix socket). The lab talks to the API with kubectl run
in the fabric namespace."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lab import netns
from lab.process import alive, command_line, wait

if TYPE_CHECKING:
    from lab.cluster import Lab

ROOT = Path(__file__).resolve().parent.parent
KUBECTL = Path(sys.prefix) / "bin" / "kubectl"
API_ADDRESS = "10.99.0.1"
API_PORT = 6443
POD_NAMESPACE = "lab"


class LabKube:
    def __init__(self, lab: Lab, grace: str = "15s"):
        self.lab = lab
        self.grace = grace

    @property
    def directory(self) -> Path:
        return self.lab.directory / "kube"

    @property
    def kubeconfig(self) -> Path:
        return self.directory / "kubeconfig"

    def _pid(self, role: str, marker: str) -> int | None:
        pid = self.lab._state().get("kube", {}).get(role)
        return pid if pid and alive(pid) and any(marker in a for a in command_line(pid)) \
            else None

    def _spawn(self, role: str, argv: list[str]) -> subprocess.Popen:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / f"{role}.log", "ab") as log:
            process = subprocess.Popen([*netns.exec_prefix(self.lab.fabric), *argv], cwd=ROOT,
                                       stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        self.lab._save(kube={**self.lab._state().get("kube", {}), role: process.pid})
        return process

    def start(self) -> None:
        """The API server (once), with the pods' namespace."""
        if self._pid("apiserver", "tests.fakekube"):
            return
        from lab.cluster import _ip
        _ip("-n", self.lab.fabric, "addr", "replace", f"{API_ADDRESS}/24", "dev", "br0")
        self.kubeconfig.unlink(missing_ok=True)
        process = self._spawn("apiserver", [sys.executable, "-m", "tests.fakekube", "--host",
                                            API_ADDRESS, "--port", str(API_PORT),
                                            "--kubeconfig", str(self.kubeconfig)])
        wait(lambda: process.poll() is not None or (
            self.kubeconfig.exists() and self.kubectl("get", "namespaces", check=False)
            .returncode == 0), 30, "the lab's API server to answer")
        if process.poll() is not None:
            raise RuntimeError(f"the lab's API server exited: see {self.directory}/"
                               "apiserver.log")
        self.apply({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": POD_NAMESPACE}})
        self.lab.log(f"Kubernetes API (fakekube) at https://{API_ADDRESS}:{API_PORT} in "
                     f"{self.lab.fabric}; kubeconfig {self.kubeconfig}")

    def kubectl(self, *args: str, input: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([*netns.exec_prefix(self.lab.fabric), str(KUBECTL),
                               "--kubeconfig", str(self.kubeconfig), *args], input=input,
                              capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
        return done

    def apply(self, obj: dict) -> None:
        self.kubectl("apply", "--validate=false", "-f", "-", input=json.dumps(obj))

    def set_status(self, kind: str, name: str, status: dict,
                   namespace: str | None = None) -> None:
        where = ["-n", namespace] if namespace else []
        self.kubectl("patch", kind, name, *where, "--subresource=status", "--type=merge",
                     "-p", json.dumps({"status": status}))

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        where = ["-n", namespace] if namespace else []
        done = self.kubectl("get", kind, name, *where, "-o", "json", check=False)
        return json.loads(done.stdout) if done.returncode == 0 else None

    # -- what the lab does through it ----------------------------------------------------

    def add_node(self, node: str, address: str, labels: dict[str, str]) -> None:
        if self.get("node", node) is None:
            self.apply({"apiVersion": "v1", "kind": "Node",
                        "metadata": {"name": node, "labels": labels}})
            self.set_status("node", node, {"addresses": [
                {"type": "InternalIP", "address": address.split("/")[0]},
                {"type": "Hostname", "address": node}]})

    def agent_args(self) -> list[str]:
        return ["--kubeconfig", str(self.kubeconfig)]

    def create_pod(self, name: str, node: str, annotations: dict | None = None) -> None:
        self.apply({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "namespace": POD_NAMESPACE,
                                 "annotations": annotations or {}},
                    "spec": {"nodeName": node, "containers": [{"name": "c",
                                                               "image": "none"}]}})

    def pod_started(self, name: str, address: str) -> None:
        self.set_status("pod", name, {"phase": "Running", "podIP": address,
                                      "podIPs": [{"ip": address}]}, POD_NAMESPACE)

    def start_controller(self) -> None:
        if self._pid("controller", "controller.main"):
            return
        self._spawn("controller", [sys.executable, "-m", "controller.main", "--kubeconfig",
                                   str(self.kubeconfig), "--etcd-endpoints",
                                   self.lab.etcd_endpoint, "--gc-grace-period", self.grace,
                                   "--lease-duration", "4s"])
        self.lab.log(f"pipit-controller running (grace {self.grace}); log "
                     f"{self.directory / 'controller.log'}")

    def stop_controller(self, sig: int = 15) -> None:
        from lab.process import kill
        pid = self._pid("controller", "controller.main")
        if pid:
            import os
            if sig == 9:
                kill(pid)
            else:
                os.killpg(pid, sig)
            wait(lambda: not alive(pid), 30, "pipit-controller to exit")
