"""A whole Pipit cluster on one machine: etcd, nodes as network namespaces on one bridge, each
running pipit-agent with its ExaBGP, and pods attached with the real `ptp` CNI plugin and
pipit-ipam. `pipitctl lab up | status | down` drives it; the end-to-end tests use it too.

Layout (nothing is created in the machine's own network namespace):

    <prefix>fabric          a namespace holding bridge br0: the "switch" the nodes hang off
    <prefix>n1 .. nN        node namespaces, eth0 = 10.99.0.<10+i>/24 on the fabric
    <prefix>n1-p1 ..        pod namespaces, attached by ptp run inside their node
    <dir>/                  etcd data and unix socket, per-node agent state, logs, lab.json

Every step is idempotent, so `up` on a running lab only adds what is missing; `down` finds
what to remove by name and by the state directory, so it also cleans up after a crash.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Interface
from pathlib import Path

from lab import netns
from lab.cni import Attachment, CNIRuntime, NetworkConfig, install_bin_dir
from lab.etcd import EtcdServer

DEFAULT_DIR = Path("/tmp/pipit-lab")
DEFAULT_PREFIX = "pipit-lab-"
FABRIC = "10.99.0.0/24"
POOL = "10.244.0.0/16"
BIN = Path(sys.executable).parent  # the virtualenv's console scripts


@dataclass
class Pod:
    name: str
    node: str
    netns: str
    address: str = ""


@dataclass
class Lab:
    directory: Path = DEFAULT_DIR
    prefix: str = DEFAULT_PREFIX
    hold_time: int = 9
    restart_time: int = 30
    log: callable = print
    pods: list[Pod] = field(default_factory=list)

    # -- names and places ----------------------------------------------------------------

    @property
    def fabric(self) -> str:
        return f"{self.prefix}fabric"

    def node_ns(self, node: str) -> str:
        return f"{self.prefix}{node}"

    def node_dir(self, node: str) -> Path:
        return self.directory / node

    def node_address(self, index: int) -> IPv4Interface:
        return IPv4Interface(f"10.99.0.{10 + index}/24")

    def status_socket(self, node: str) -> Path:
        return self.node_dir(node) / "status.sock"

    def ipam_socket(self, node: str) -> Path:
        return self.node_dir(node) / "ipam.sock"

    @property
    def etcd_endpoint(self) -> str:
        return f"unix://{self.directory / 'etcd'}/etcd.sock:0"

    @property
    def etcd_host_endpoint(self) -> str:
        state = self._state()
        return state.get("etcd", {}).get("endpoint", "")

    def _state(self) -> dict:
        try:
            return json.loads((self.directory / "lab.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def _save(self, **changes) -> None:
        state = {**self._state(), **changes}
        (self.directory / "lab.json").write_text(json.dumps(state, indent=2))

    def nodes(self) -> list[str]:
        return list(self._state().get("nodes", {}))

    # -- up ------------------------------------------------------------------------------

    def up(self, node_count: int = 3, pods_per_node: int = 2) -> bool:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.start_etcd()
        self.configure_cluster()
        self.ensure_fabric()
        for index in range(1, node_count + 1):
            self.add_node(f"n{index}", index)
        self.wait_mesh()
        for node in self.nodes():
            for p in range(1, pods_per_node + 1):
                self.add_pod(node, f"{node}-p{p}")
        return self.report()

    def start_etcd(self) -> None:
        state = self._state().get("etcd", {})
        if state.get("pid") and _alive(state["pid"]):
            return
        server = EtcdServer(data_dir=self.directory / "etcd", unix_socket=True)
        server.start()
        self._save(etcd={"pid": server.process.pid, "endpoint": server.endpoint,
                         "unix": self.etcd_endpoint})
        self.log(f"etcd running at {server.endpoint} (nodes use {self.etcd_endpoint})")

    def pipitctl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "pipitctl"), "--etcd-endpoints",
                               self.etcd_host_endpoint, *args], input=input, text=True,
                              capture_output=True)

    def configure_cluster(self) -> None:
        documents = f"""\
apiVersion: pipit.dev/v1
kind: IPPool
metadata: {{name: default}}
spec: {{cidr: {POOL}, blockSize: 26}}
---
apiVersion: pipit.dev/v1
kind: BGPConfiguration
metadata: {{name: default}}
spec: {{nodeMeshHoldTime: {self.hold_time}, nodeMeshMaxRestartTime: {self.restart_time}}}
"""
        result = self.pipitctl("apply", "-f", "-", input=documents)
        if result.returncode != 0:
            raise RuntimeError(f"configuring the lab failed: {result.stderr.strip()}")

    def ensure_fabric(self) -> None:
        if not netns.exists(self.fabric):
            netns.create(self.fabric)
            _ip("-n", self.fabric, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.fabric, "link", "set", "br0", "up")

    def add_node(self, node: str, index: int | None = None) -> None:
        """Create the node's namespace and uplink, and start its agent (if not running)."""
        nodes = self._state().get("nodes", {})
        if index is None:
            index = nodes.get(node, {}).get("index") or len(nodes) + 1
        address = self.node_address(index)
        ns = self.node_ns(node)
        if not netns.exists(ns):
            netns.create(ns)
            port = f"{self.prefix[:6]}{node}"[-15:]  # interface names stop at 15 characters
            _ip("-n", self.fabric, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", ns)
            _ip("-n", self.fabric, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", str(address), "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        nodes[node] = {**nodes.get(node, {}), "index": index, "netns": ns,
                       "address": str(address)}
        self._save(nodes=nodes)
        self.start_agent(node)

    def agent_argv(self, node: str) -> list[str]:
        info = self._state()["nodes"][node]
        state = self.node_dir(node)
        return [*netns.exec_prefix(info["netns"]), str(BIN / "pipit-agent"), "--node", node,
                "--ip", info["address"], "--etcd-endpoints", self.etcd_endpoint,
                "--state-dir", str(state), "--ipam-socket", str(self.ipam_socket(node)),
                "--status-socket", str(self.status_socket(node)), "--exabgp", "spawn",
                "--labels", f"lab=pipit,node={node}"]

    def start_agent(self, node: str, timeout: float = 60.0) -> None:
        info = self._state()["nodes"][node]
        if info.get("pid") and _alive(info["pid"]) and self.status(node) is not None:
            return
        state = self.node_dir(node)
        state.mkdir(parents=True, exist_ok=True)
        with open(state / "agent.log", "ab") as log:
            process = subprocess.Popen(self.agent_argv(node), stdout=log, stderr=log,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        nodes = self._state()["nodes"]
        nodes[node]["pid"] = process.pid
        self._save(nodes=nodes)
        wait(lambda: self.status(node) is not None or process.poll() is not None, timeout,
             f"agent of {node} to answer")
        if process.poll() is not None:
            raise RuntimeError(f"the agent of {node} exited: see {state / 'agent.log'}")
        self.log(f"{node}: agent running ({info['address']})")

    def stop_agent(self, node: str, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        pid = self._state()["nodes"][node].get("pid")
        if pid and _alive(pid):
            os.kill(pid, sig)
            wait(lambda: not _alive(pid), timeout, f"agent of {node} to exit")

    def status(self, node: str) -> dict | None:
        from pipitctl.node_status import read_status
        try:
            return read_status(str(self.status_socket(node)), timeout=2.0)
        except Exception:
            return None

    def wait_mesh(self, timeout: float = 60.0) -> None:
        nodes = self.nodes()

        def established() -> bool:
            for node in nodes:
                status = self.status(node)
                peers = {p["name"]: p["state"] for p in (status or {}).get("peers", [])}
                if set(peers) != set(nodes) - {node} or set(peers.values()) - {"up"}:
                    return False
            return True
        wait(established, timeout, "the node-to-node mesh to establish")

    def network(self, node: str) -> NetworkConfig:
        return NetworkConfig.load({
            "cniVersion": "1.0.0", "name": "pipit", "type": "ptp", "mtu": 1500,
            "ipam": {"type": "pipit-ipam", "socket": str(self.ipam_socket(node))}})

    def runtime(self, node: str) -> CNIRuntime:
        bin_dir = install_bin_dir(self.directory / "cni-bin") if not (
            self.directory / "cni-bin" / "pipit-ipam").exists() else self.directory / "cni-bin"
        return CNIRuntime(bin_dir, netns=self.node_ns(node),
                          cache_dir=self.node_dir(node) / "cni")

    def add_pod(self, node: str, name: str) -> Pod:
        ns = f"{self.prefix}{name}"
        known = self._state().get("pods", {}).get(name)
        if known and netns.exists(ns) and netns.addresses(ns):
            return Pod(name, node, ns, known["address"])  # attached already
        if not netns.exists(ns):
            netns.create(ns)
        attachment = Attachment(container_id=f"lab-{name}", netns=netns.path_of(ns),
                                args=(("K8S_POD_NAMESPACE", "lab"), ("K8S_POD_NAME", name)))
        result = self.runtime(node).add(self.network(node), attachment)
        address = result["ips"][0]["address"].split("/")[0]
        pods = self._state().get("pods", {})
        pods[name] = {"node": node, "netns": ns, "address": address}
        self._save(pods=pods)
        self.log(f"{node}: pod {name} has {address}")
        return Pod(name, node, ns, address)

    def all_pods(self) -> list[Pod]:
        return [Pod(name, p["node"], p["netns"], p["address"])
                for name, p in self._state().get("pods", {}).items()]

    # -- checks --------------------------------------------------------------------------

    def ping(self, source: Pod, target: Pod) -> bool:
        result = subprocess.run([*netns.exec_prefix(source.netns), "ping", "-c", "1", "-W",
                                 "1", "-q", target.address], capture_output=True)
        return result.returncode == 0

    def ping_matrix(self, timeout: float = 30.0) -> dict[tuple[str, str], bool]:
        """Every pod pings every other pod (retrying while routes converge)."""
        pods = self.all_pods()
        pairs = [(a, b) for a in pods for b in pods if a is not b]

        def attempt(pair) -> bool:
            deadline = time.monotonic() + timeout
            while True:
                if self.ping(*pair):
                    return True
                if time.monotonic() > deadline:
                    return False
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(attempt, pairs))
        return {(a.name, b.name): ok for (a, b), ok in zip(pairs, results)}

    def kernel_routes(self, node: str) -> list[dict]:
        """Pipit's routes (protocol 91) in a node's kernel, as `ip -j route` gives them."""
        out = subprocess.run(["ip", "-n", self.node_ns(node), "-j", "route", "show", "proto",
                              "91"], capture_output=True, text=True, check=True).stdout
        return json.loads(out or "[]")

    def report(self) -> bool:
        from pipitctl.node_status import render
        ok = True
        for node in self.nodes():
            status = self.status(node)
            self.log(f"\n== {node}")
            self.log(render(status) if status else "agent not answering")
            ok &= status is not None
        matrix = self.ping_matrix()
        pods = self.all_pods()
        names = [p.name for p in pods]
        width = max(len(n) for n in names) if names else 4
        self.log("\nping matrix (row pings column):")
        self.log(" " * width + "  " + " ".join(n.rjust(width) for n in names))
        for a in names:
            cells = ["-".rjust(width) if a == b else
                     ("ok" if matrix[(a, b)] else "FAIL").rjust(width) for b in names]
            self.log(a.ljust(width) + "  " + " ".join(cells))
        failed = [pair for pair, good in matrix.items() if not good]
        self.log(f"\n{len(matrix) - len(failed)}/{len(matrix)} pod pairs reach each other.")
        return ok and not failed

    # -- down ----------------------------------------------------------------------------

    def down(self) -> None:
        """Stop every process and remove every namespace and file the lab made."""
        lab_namespaces = netns.names(self.prefix)
        for ns in lab_namespaces:  # agents, ExaBGP, bridges: whatever runs in a lab netns
            for pid in _netns_pids(ns):
                _kill(pid)
        state = self._state()
        for info in state.get("nodes", {}).values():
            if info.get("pid"):
                _kill(info["pid"])
        etcd_pid = state.get("etcd", {}).get("pid")
        if etcd_pid:
            _kill(etcd_pid)
        netns.delete(*lab_namespaces)
        shutil.rmtree(self.directory, ignore_errors=True)


def wait(condition, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _alive(pid: int) -> bool:
    """Running (a zombie is not: reaped here if it is our child, else left to its parent)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _kill(pid: int) -> None:
    """SIGKILL a process and, if it leads one, its process group."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _netns_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]
