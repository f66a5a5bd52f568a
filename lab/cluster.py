"""A whole Pipit cluster on one machine: etcd, nodes as network namespaces, each running
pipit-agent with its ExaBGP, and pods attached with the real `ptp` CNI plugin and pipit-ipam.
`pipitctl lab up | status | down` drives it; the end-to-end tests use it too.

Three topologies (nothing is created in the machine's own network namespace):

mesh (the default): every node on one bridge, a full iBGP node-to-node mesh.

    <prefix>fabric          a namespace holding bridge br0: the "switch" the nodes hang off
    <prefix>n1 .. nN        node namespaces, eth0 = 10.99.0.<10+i>/24 on the fabric
    <prefix>n1-p1 ..        pod namespaces, attached by ptp run inside their node
    <dir>/                  etcd data and unix socket, per-node agent state, logs, lab.json

racks: the mesh is off; each rack's nodes hang off their top-of-rack router (BIRD, FRR or
GoBGP: `router`), one AS per rack, eBGP between nodes and ToR (a BGPPeer per rack selecting
its nodes by the label rack=r<r>, optionally with a TCP MD5 password from a secret), and the
ToRs peer with each other over a core bridge.

    <prefix>tor<r>          ToR r: bridge br0 = 10.99.<r>.1/24 for its nodes, up0 =
                            10.98.0.<r>/24 to the core, loopback 192.0.2.<r>; AS 65100+r;
                            announces a default route and its loopback
    <prefix>core            bridge br0 joining the ToRs' up0
    <prefix>n<i>            node i in rack r: eth0 = 10.99.<r>.<10+i>/24, AS 65000+r

rr: the nodes on one bridge as in mesh, the mesh off, and dedicated route reflectors rr1 ..
rrR at 10.99.0.<200+k>: `pipit-rr` (cluster id 244.0.0.1, label route-reflector=true, no
pods; one BGPPeer peers every node with every reflector by peerSelector, the reflectors mesh
among themselves), or with reflector="bird" BIRD 2 (`rr client`, listening on port 1179; one
BGPPeer per reflector, peerIP 10.99.0.<200+k>:1179, the nodes' own AS).

With a chart (`Lab(chart=lab.chart.ChartNodes(...))`, `pipitctl lab up --from-chart`), the
mesh's nodes run the rendered Helm chart instead of agents started here: each node's DaemonSet
pod from Pipit's image, run by lab.kubelet; the chart's post-install Job configures the
cluster, and pods are attached through the conflist the agent wrote (lab.chart says how).

Every step is idempotent, so `up` on a running lab only adds what is missing; `down` finds
what to remove by name and by the state directory, so it also cleans up after a crash.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import yaml

from bgp_agent.status import read_status
from lab import netns
from lab.chart import ChartNodes
from lab.cni import Attachment, CNIRuntime, NetworkConfig, install_bin_dir
from lab.etcd import EtcdServer, make_tls_files
from lab.process import alive, command_line, kill, wait
from lab.routers import FabricRouter, RouterPeer, RouterSpec, make_router

DEFAULT_DIR = Path("/tmp/pipit-lab")
DEFAULT_PREFIX = "pipit-lab-"
FABRIC = "10.99.0.0/24"
POOL = "10.244.0.0/16"
BIN = Path(sys.executable).parent  # the virtualenv's console scripts
TOPOLOGIES = ("mesh", "racks", "rr")
CLUSTER_ID = "244.0.0.1"  # rr: the reflectors' cluster id
BIRD_REFLECTOR_PORT = 1179  # rr with BIRD reflectors: where they listen
METRICS_PORT = 9091  # every agent's /metrics, on 127.0.0.1 of its node's namespace
DEFAULT_ROUTE = IPv4Network("0.0.0.0/0")
COMMUNITY = "64512:100"  # attached to every block the nodes export to their ToR


def node_as(rack: int) -> int:
    return 65000 + rack


def tor_as(rack: int) -> int:
    return 65100 + rack


def tor_address(rack: int) -> IPv4Address:
    return IPv4Address(f"10.99.{rack}.1")


def tor_uplink(rack: int) -> IPv4Interface:
    return IPv4Interface(f"10.98.0.{rack}/24")


def tor_loopback(rack: int) -> IPv4Network:
    return IPv4Network(f"192.0.2.{rack}/32")


def brief(status: dict) -> str:
    """A node's status in one line (what `report` shows unless given a fuller renderer, such
    as pipitctl's)."""
    peers = [p for p in status.get("peers", []) if p["state"] != "skipped"]
    up = sum(p["state"] == "up" for p in peers)
    return f"agent of {status.get('node')} answering: {up}/{len(peers)} BGP sessions up"


@contextlib.contextmanager
def new_namespace(name: str) -> Iterator[None]:
    """Create a namespace for the `with` block to set up; if that fails midway, delete it
    again, so that the next `up` (which skips existing namespaces) redoes it."""
    netns.create(name)
    try:
        yield
    except BaseException:
        with contextlib.suppress(RuntimeError):
            netns.delete(name)
        raise


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
    topology: str = "mesh"  # mesh | racks | rr
    reflectors: int = 2  # rr: how many dedicated route reflectors
    reflector: str = "pipit"  # rr: pipit (pipit-rr) | bird
    router: str = "bird"  # racks: the ToRs' implementation, bird | frr | gobgp
    racks: int = 2
    nodes_per_rack: int = 2
    password: str | None = None  # racks: TCP MD5 between nodes and ToRs, from a secret
    etcd_tls: bool = False  # etcd with TLS client certificates (made with openssl)
    routers: dict[int, FabricRouter] = field(default_factory=dict, repr=False)  # racks: rack -> ToR
    # lab.json is read, changed and written again by several threads (the soak test's pods
    # and agent restarts): one lock, or one thread's write undoes another's
    _state_lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    kubernetes: bool = False  # mesh: an API server, Nodes, Pods, pipit-controller (lab/kube.py)
    # the rendered Helm chart runs the nodes (lab.chart) instead of agents started here
    chart: ChartNodes | None = None

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {', '.join(TOPOLOGIES)}")
        if self.kubernetes and self.topology != "mesh":
            raise ValueError("the lab's Kubernetes comes with the mesh topology only")
        self.kubernetes = self.kubernetes or bool(self._state().get("kube"))

    def kube(self):
        """The lab's Kubernetes side (lab/kube.py), or None."""
        from lab.kube import LabKube
        return LabKube(self) if self.kubernetes else None
        if self.chart is None:
            self.chart = ChartNodes.attached(self.directory)

    # -- names and places ----------------------------------------------------------------

    @property
    def fabric(self) -> str:
        return f"{self.prefix}fabric"

    def node_ns(self, node: str) -> str:
        return f"{self.prefix}{node}"

    def node_dir(self, node: str) -> Path:
        return self.directory / node

    def node_record(self, node: str) -> dict:
        """What lab.json holds of a running node: index, netns, address, pid (and, from a
        chart, its pod)."""
        return self._state()["nodes"][node]

    def node_ip(self, node: str) -> IPv4Address:
        """A running node's address on the fabric."""
        return IPv4Interface(self.node_record(node)["address"]).ip

    def etcd_pid(self) -> int | None:
        """The lab's etcd process, while it runs."""
        return self._etcd_pid()

    def node_address(self, index: int) -> IPv4Interface:
        if index > 1000:  # rr: reflector k has index 1000 + k
            return IPv4Interface(f"10.99.0.{200 + index - 1000}/24")
        if self.topology == "racks":
            return IPv4Interface(f"10.99.{self.rack_of(index)}.{10 + index}/24")
        return IPv4Interface(f"10.99.0.{10 + index}/24")

    def rack_of(self, index: int) -> int:
        rack = (index - 1) // self.nodes_per_rack + 1
        if rack > self.racks:
            raise ValueError(f"node {index} does not fit: {self.racks} racks of "
                             f"{self.nodes_per_rack} nodes hold {self.racks * self.nodes_per_rack}")
        return rack

    def node_rack(self, node: str) -> int:
        return self.rack_of(self._state()["nodes"][node]["index"])

    def tor_ns(self, rack: int) -> str:
        return f"{self.prefix}tor{rack}"

    @property
    def core(self) -> str:
        return f"{self.prefix}core"

    @property
    def secrets_dir(self) -> Path:
        return self.directory / "secrets"

    def status_socket(self, node: str) -> Path:
        if self.chart:
            return self.chart.status_socket(self, node)
        return self.node_dir(node) / "status.sock"

    def ipam_socket(self, node: str) -> Path:
        if self.chart:
            return self.chart.ipam_socket(self, node)
        return self.node_dir(node) / "ipam.sock"

    @property
    def etcd_endpoint(self) -> str:
        # etcd names a unix listener "host:port" and creates it in its working directory.
        return f"unix://{self.directory / 'etcd'}/etcd.sock:0"

    @property
    def etcd_host_endpoint(self) -> str:
        state = self._state()
        return state.get("etcd", {}).get("endpoint", "")

    def _state(self) -> dict:
        try:
            return json.loads((self.directory / "lab.json").read_text())
        except (OSError, ValueError):  # no lab (or no directory) here
            return {}

    def _save(self, **changes) -> None:
        with self._state_lock:
            state = {**self._state(), **changes}
            path = self.directory / "lab.json"
            tmp = path.with_name(f"lab.json.{os.getpid()}.{threading.get_ident()}")
            tmp.write_text(json.dumps(state, indent=2))
            os.replace(tmp, path)  # readers never see half a file

    def recorded_prefix(self) -> str | None:
        """The namespace prefix the lab in this directory was started with, if one is."""
        return self._state().get("prefix")

    def running_topology(self) -> str | None:
        """The topology of the lab in this directory, if one is up."""
        state = self._state()
        return state.get("topology", "mesh") if state.get("nodes") else None

    def nodes(self) -> list[str]:
        """Every node with an agent, route reflectors included."""
        return list(self._state().get("nodes", {}))

    def workers(self) -> list[str]:
        """The nodes that take pods (not the dedicated route reflectors)."""
        return [n for n, info in self._state().get("nodes", {}).items()
                if not info.get("reflector")]

    def reflector_names(self) -> list[str]:
        return [n for n in self.nodes() if n not in self.workers()]

    # -- up ------------------------------------------------------------------------------

    def up(self, node_count: int = 3, pods_per_node: int = 2,
           render: Callable[[dict], str] = brief) -> bool:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.start_etcd()
        self._save(topology=self.topology, prefix=self.prefix)
        self.configure_cluster()
        if self.topology == "racks":
            self.ensure_racks()
        else:
            self.ensure_fabric()
        hosts = node_count + self.reflectors + 2  # the nodes resolve each other (and a router)
        raised = netns.ensure_neighbour_table(hosts * hosts + 4 * node_count * pods_per_node)
        if raised:
            self.log(f"ARP table limits raised for {node_count} nodes: {', '.join(raised)}")
        if self.kube():
            self.kube().start()
        if self.topology == "rr" and self.reflector == "pipit":
            for k in range(1, self.reflectors + 1):
                self.add_node(f"rr{k}", 1000 + k, reflector=True)
        for index in range(1, node_count + 1):
            self.add_node(f"n{index}", index)
        if self.chart:
            self.chart.run_hooks(self, "post-install")
        if self.topology == "racks":
            self.start_tors()
        if self.topology == "rr" and self.reflector == "bird":
            self.start_bird_reflectors()
        self.wait_mesh(timeout=60.0 + node_count)
        for node in self.workers():
            for p in range(1, pods_per_node + 1):
                self.add_pod(node, f"{node}-p{p}")
        if self.kube():
            self.kube().start_controller()
        return self.report(render)

    def start_etcd(self) -> None:
        if self._etcd_pid():
            return
        tls = make_tls_files(self.directory / "etcd-tls") if self.etcd_tls else None
        server = EtcdServer(data_dir=self.directory / "etcd", unix_socket=True, tls=tls)
        server.start()
        self._save(etcd={"pid": server.process.pid, "endpoint": server.endpoint,
                         "unix": self.etcd_endpoint,
                         "tls": tls and {"ca": tls.ca, "cert": tls.client_cert,
                                         "key": tls.client_key}})
        self.log(f"etcd running at {server.endpoint} (nodes use {self.etcd_endpoint})")

    def etcd_tls_flags(self) -> list[str]:
        """The client certificate flags of an etcd with TLS (none without)."""
        tls = self._state().get("etcd", {}).get("tls")
        return (["--etcd-ca-cert", tls["ca"], "--etcd-cert", tls["cert"], "--etcd-key",
                 tls["key"]] if tls else [])

    def pipitctl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "pipitctl"), "--etcd-endpoints",
                               self.etcd_host_endpoint, *self.etcd_tls_flags(), *args],
                              input=input, text=True, capture_output=True)

    def configure_cluster(self) -> None:
        if self.chart:  # the chart's post-install hook does it, once the nodes are up
            self._save(chart=self.chart.to_json())
            self.chart.render(self)
            return
        documents = f"""\
apiVersion: pipit.dev/v1
kind: IPPool
metadata: {{name: default}}
spec: {{cidr: {POOL}, blockSize: 26}}
"""
        if self.topology == "racks":
            documents += self._racks_documents()
        elif self.topology == "rr":
            documents += """\
---
apiVersion: pipit.dev/v1
kind: BGPConfiguration
metadata: {name: default}
spec: {nodeToNodeMeshEnabled: false}
"""
            documents += "".join(self.reflector_peer_documents())
        else:
            documents += f"""\
---
apiVersion: pipit.dev/v1
kind: BGPConfiguration
metadata: {{name: default}}
spec: {{nodeMeshHoldTime: {self.hold_time}, nodeMeshMaxRestartTime: {self.restart_time}}}
"""
        result = self.pipitctl("apply", "-f", "-", input=documents)
        if result.returncode != 0:
            raise RuntimeError(f"configuring the lab failed: {result.stderr.strip()}")

    def _racks_documents(self) -> str:
        """Mesh off, communities on exported blocks, one BGPPeer per rack for its ToR."""
        documents = f"""\
---
apiVersion: pipit.dev/v1
kind: BGPConfiguration
metadata: {{name: default}}
spec: {{nodeToNodeMeshEnabled: false, communities: ['{COMMUNITY}']}}
"""
        if self.password:
            secret = self.secrets_dir / "tor"
            secret.mkdir(parents=True, exist_ok=True)
            (secret / "password").write_text(self.password + "\n")
            os.chmod(secret / "password", 0o600)
        for rack in range(1, self.racks + 1):
            documents += self.tor_peer_document(rack)
        return documents

    def reflector_peer_documents(self) -> list[str]:
        """rr: the BGPPeers that make the nodes the reflectors' clients."""
        times = {"holdTime": self.hold_time, "maxRestartTime": self.restart_time}
        if self.reflector == "pipit":
            specs = {"to-reflectors": {"nodeSelector": "all()",
                                       "peerSelector": "route-reflector == 'true'", **times}}
        else:
            specs = {f"rr{k}": {"peerIP": f"{self.node_address(1000 + k).ip}:"
                                          f"{BIRD_REFLECTOR_PORT}",
                                "asNumber": 64512, "nodeSelector": "all()", **times}
                     for k in range(1, self.reflectors + 1)}
        return ["---\n" + yaml.safe_dump({"apiVersion": "pipit.dev/v1", "kind": "BGPPeer",
                                          "metadata": {"name": name}, "spec": spec},
                                         sort_keys=False) for name, spec in specs.items()]

    def start_bird_reflectors(self) -> None:
        """rr with reflector="bird": BIRD 2 route reflectors, every node their client
        (reconfigured when nodes joined)."""
        from lab.bird import Bird, BirdPeer, bgp_config
        nodes = self._state().get("nodes", {})
        birds = self._state().get("birds", {})
        for k in range(1, self.reflectors + 1):
            name, address = f"rr{k}", self.node_address(1000 + k)
            ns = self.attach(name, address)
            peers = [BirdPeer(node, IPv4Interface(info["address"]).ip, 64512,
                              hold_time=self.hold_time, local_port=BIRD_REFLECTOR_PORT,
                              rr_cluster_id=IPv4Address(CLUSTER_ID))
                     for node, info in sorted(nodes.items())]
            config = bgp_config(address.ip, address.ip, 64512, peers,
                                log_path=self.directory / name / "bird.log")
            bird = Bird(name, config, netns=ns, directory=self.directory / name)
            if name in birds and alive(birds[name]):
                bird.configure(config)
            else:
                bird.start()
                birds[name] = bird.process.pid
                self.log(f"{name}: BIRD route reflector running ({address.ip} port "
                         f"{BIRD_REFLECTOR_PORT})")
        self._save(birds=birds)

    def tor_peer_document(self, rack: int, **changes) -> str:
        """The BGPPeer of rack r's ToR, as YAML (`changes`: spec fields to set or, with None,
        to leave out)."""
        spec = {"peerIP": str(tor_address(rack)), "asNumber": tor_as(rack),
                "nodeSelector": f"rack == 'r{rack}'", "holdTime": self.hold_time,
                "maxRestartTime": self.restart_time,
                # the other nodes of the rack share our AS: their routes come back through
                # the ToR with it in the AS path
                "numAllowedLocalASNumbers": 1}
        if self.password:
            spec["password"] = {"secretKeyRef": {"name": "tor", "key": "password"}}
        spec.update(changes)
        spec = {k: v for k, v in spec.items() if v is not None}
        return "---\n" + yaml.safe_dump({"apiVersion": "pipit.dev/v1", "kind": "BGPPeer",
                                          "metadata": {"name": f"tor-r{rack}"}, "spec": spec},
                                         sort_keys=False)

    def ensure_racks(self) -> None:
        """The ToR namespaces with their bridges, joined by a core bridge."""
        if not netns.exists(self.core):
            with new_namespace(self.core):
                _ip("-n", self.core, "link", "add", "br0", "type", "bridge")
                _ip("-n", self.core, "link", "set", "br0", "up")
        for rack in range(1, self.racks + 1):
            ns = self.tor_ns(rack)
            if netns.exists(ns):
                continue
            with new_namespace(ns):  # deleting it also removes the core's end of its uplink
                _ip("-n", ns, "link", "add", "br0", "type", "bridge")
                _ip("-n", ns, "addr", "add", f"{tor_address(rack)}/24", "dev", "br0")
                _ip("-n", ns, "link", "set", "br0", "up")
                _ip("-n", ns, "addr", "add", str(tor_loopback(rack)), "dev", "lo")
                port = f"tor{rack}"
                _ip("-n", self.core, "link", "add", port, "type", "veth", "peer", "name", "up0",
                    "netns", ns)
                _ip("-n", self.core, "link", "set", port, "master", "br0", "up")
                _ip("-n", ns, "addr", "add", str(tor_uplink(rack)), "dev", "up0")
                _ip("-n", ns, "link", "set", "up0", "up")
                _ip("netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")

    def tor_spec(self, rack: int) -> RouterSpec:
        nodes = self._state().get("nodes", {})
        peers = [RouterPeer(node, IPv4Interface(info["address"]).ip, node_as(rack),
                            local_address=tor_address(rack), password=self.password,
                            hold_time=self.hold_time)
                 for node, info in sorted(nodes.items(), key=lambda kv: kv[1]["index"])
                 if self.rack_of(info["index"]) == rack]
        peers += [RouterPeer(f"tor{other}", tor_uplink(other).ip, tor_as(other),
                             local_address=tor_uplink(rack).ip, hold_time=self.hold_time)
                  for other in range(1, self.racks + 1) if other != rack]
        return RouterSpec(f"tor{rack}", tor_address(rack), tor_as(rack), tuple(peers),
                          originate=(DEFAULT_ROUTE, tor_loopback(rack)))

    def start_tors(self) -> None:
        """Start (or, after a node joined, restart) each rack's router."""
        tors = self._state().get("tors", {})
        for rack in range(1, self.racks + 1):
            spec = self.tor_spec(rack)
            router = self.routers.get(rack)
            if router is not None and router.spec.peers == spec.peers and router.pids():
                continue
            if router is not None:
                router.destroy()
            router = make_router(self.router, spec, self.tor_ns(rack),
                                 self.directory / f"tor{rack}").start()
            self.routers[rack] = router
            tors[str(rack)] = {"router": self.router, "netns": self.tor_ns(rack),
                               "pids": router.pids()}
            self.log(f"tor{rack}: {self.router} running (AS {tor_as(rack)})")
        self._save(tors=tors, topology=self.topology)

    def ensure_fabric(self) -> None:
        if not netns.exists(self.fabric):
            with new_namespace(self.fabric):
                _ip("-n", self.fabric, "link", "add", "br0", "type", "bridge")
                _ip("-n", self.fabric, "link", "set", "br0", "up")

    def attach(self, name: str, address: IPv4Interface, switch: str | None = None) -> str:
        """A namespace `<prefix><name>` whose eth0 has `address`, plugged into the bridge of
        `switch` (default: the fabric); made if missing. Its name."""
        ns = self.node_ns(name)
        if not netns.exists(ns):
            switch = switch or self.fabric
            port = f"{self.prefix[:6]}{name}"[-15:]  # interface names stop at 15 characters
            with new_namespace(ns):  # deleting it also removes the switch's end of eth0
                _ip("-n", switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                    "netns", ns)
                _ip("-n", switch, "link", "set", port, "master", "br0", "up")
                _ip("-n", ns, "addr", "add", str(address), "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
        return ns

    def add_node(self, node: str, index: int | None = None, reflector: bool = False) -> None:
        """Create the node's namespace and uplink, and start its agent (if not running); a
        `reflector` runs pipit-rr."""
        nodes = self._state().get("nodes", {})
        if index is None:
            index = nodes.get(node, {}).get("index") or len(nodes) + 1
        address = self.node_address(index)
        ns = self.attach(node, address, self.tor_ns(self.rack_of(index))
                         if self.topology == "racks" else None)
        nodes[node] = {**nodes.get(node, {}), "index": index, "netns": ns,
                       "address": str(address), **({"reflector": True} if reflector else {})}
        self._save(nodes=nodes)
        if self.kube():
            self.kube().add_node(node, str(address), {"lab": "pipit", "node": node})
        self.start_agent(node)
        if self.topology == "racks" and self.routers:
            self.start_tors()  # a new node: its ToR needs a session to it

    def agent_argv(self, node: str) -> list[str]:
        info = self._state()["nodes"][node]
        state = self.node_dir(node)
        program = "pipit-rr" if info.get("reflector") else "pipit-agent"
        # a node with `detect` (an --ip-autodetection-method) finds its address itself, and
        # looks again every second
        address = (["--ip-autodetection-method", info["detect"],
                    "--autodetect-poll-interval", "1s"] if info.get("detect")
                   else ["--ip", info["address"]])
        return [*netns.exec_prefix(info["netns"]), str(BIN / program), "--node", node,
                *address, "--etcd-endpoints", self.etcd_endpoint,
                *self.etcd_tls_flags(),
                "--state-dir", str(state), "--ipam-socket", str(self.ipam_socket(node)),
                "--status-socket", str(self.status_socket(node)), "--exabgp", "spawn",
                "--metrics-address", f"127.0.0.1:{METRICS_PORT}",
                *self._node_options(node, info["index"]),
                *(self.kube().agent_args() if self.kube() else ())]

    def _node_options(self, node: str, index: int) -> list[str]:
        if index > 1000:
            return ["--labels", f"lab=pipit,node={node},route-reflector=true",
                    "--route-reflector-cluster-id", CLUSTER_ID]
        if self.topology != "racks":
            return ["--labels", f"lab=pipit,node={node}"]
        rack = self.rack_of(index)
        return ["--labels", f"lab=pipit,node={node},rack=r{rack}", "--as", str(node_as(rack)),
                "--secrets-dir", str(self.secrets_dir)]

    def start_agent(self, node: str, timeout: float = 60.0) -> None:
        if self.chart:
            return self.chart.start_pod(self, node)
        info = self._state()["nodes"][node]
        if self._agent_pid(node) and self.status(node) is not None:
            return
        state = self.node_dir(node)
        state.mkdir(parents=True, exist_ok=True)
        with open(state / "agent.log", "ab") as log:
            process = subprocess.Popen(self.agent_argv(node), stdout=log, stderr=log,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        with self._state_lock:
            nodes = self._state()["nodes"]
            nodes[node]["pid"] = process.pid
            self._save(nodes=nodes)
        wait(lambda: self.status(node) is not None or process.poll() is not None, timeout,
             f"agent of {node} to answer")
        if process.poll() is not None:
            raise RuntimeError(f"the agent of {node} exited: see {state / 'agent.log'}")
        self.log(f"{node}: agent running ({info['address']})")

    def stop_agent(self, node: str, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.chart:
            return self.chart.stop_pod(self, node, sig, timeout)
        pid = self._agent_pid(node)
        if pid:
            os.kill(pid, sig)
            wait(lambda: not alive(pid), timeout, f"agent of {node} to exit")

    def _agent_pid(self, node: str) -> int | None:
        """The pid lab.json has for the node's agent, if that process still is the agent we
        started (a pid from an old lab.json may have been reused by anything)."""
        pid = self._state().get("nodes", {}).get(node, {}).get("pid")
        args = command_line(pid) if pid and alive(pid) else []
        ours = (any(os.path.basename(a) in ("pipit-agent", "pipit-rr") for a in args)
                and str(self.status_socket(node)) in args)
        return pid if ours else None

    def _etcd_pid(self) -> int | None:
        """The pid lab.json has for etcd, if that process still is the etcd we started."""
        pid = self._state().get("etcd", {}).get("pid")
        args = command_line(pid) if pid and alive(pid) else []
        ours = (bool(args) and os.path.basename(args[0]) == "etcd"
                and str(self.directory / "etcd" / "data") in args)
        return pid if ours else None

    def remove_node(self, node: str) -> None:
        """The node leaves: its agent retires (withdraws its routes, stops its ExaBGP), then
        its pods' and its own namespaces go, and the lab forgets it. Its IPAM state stays in
        etcd, as a real node's does until `pipitctl delete node`."""
        self.stop_agent(node)
        state = self._state()
        gone = [name for name, pod in state.get("pods", {}).items() if pod["node"] == node]
        netns.delete(*(state["pods"][name]["netns"] for name in gone),
                     state["nodes"][node]["netns"])
        self._save(pods={n: p for n, p in state.get("pods", {}).items() if n not in gone},
                   nodes={n: i for n, i in state["nodes"].items() if n != node})

    def status(self, node: str) -> dict | None:
        try:
            return read_status(str(self.status_socket(node)), timeout=2.0)
        except Exception:
            return None

    def expected_peers(self, node: str) -> set[str]:
        """Names of the sessions a node should have: every other node (mesh), its ToR's
        BGPPeer (racks), every reflector (rr; a reflector: every other node)."""
        if self.topology == "racks":
            return {f"tor-r{self.node_rack(node)}"}
        if (self.running_topology() or self.topology) == "rr" and node in self.workers():
            return set(self.reflector_names()) or set(self._state().get("birds", {}))
        return set(self.nodes()) - {node}

    def established(self, node: str) -> bool:
        status = self.status(node)
        peers = {p["name"]: p["state"] for p in (status or {}).get("peers", [])
                 if p["state"] != "skipped"}
        return set(peers) == self.expected_peers(node) and not set(peers.values()) - {"up"}

    def wait_mesh(self, timeout: float = 60.0) -> None:
        """Wait until every node has every session it should have up (mesh, ToR or
        reflectors)."""
        wait(lambda: all(self.established(n) for n in self.nodes()), timeout,
             f"every node's BGP sessions ({self.topology}) to establish")

    def network(self, node: str) -> NetworkConfig:
        """The node's CNI configuration, with the pod MTU its agent publishes (as the chart's
        installer writes it on a real node)."""
        if self.chart:
            return self.chart.network(self, node)
        try:
            mtu = int((self.node_dir(node) / "pod-mtu").read_text())
        except (FileNotFoundError, ValueError):
            mtu = 1500
        return NetworkConfig.load({
            "cniVersion": "1.0.0", "name": "pipit", "type": "ptp", "mtu": mtu,
            "ipam": {"type": "pipit-ipam", "socket": str(self.ipam_socket(node))}})

    def runtime(self, node: str) -> CNIRuntime:
        if self.chart:
            return self.chart.runtime(self, node)
        bin_dir = install_bin_dir(self.directory / "cni-bin") if not (
            self.directory / "cni-bin" / "pipit-ipam").exists() else self.directory / "cni-bin"
        return CNIRuntime(bin_dir, netns=self.node_ns(node),
                          cache_dir=self.node_dir(node) / "cni")

    def add_pod(self, node: str, name: str, annotations: dict | None = None) -> Pod:
        ns = f"{self.prefix}{name}"
        known = self._state().get("pods", {}).get(name)
        if known and netns.exists(ns) and netns.addresses(ns):
            return Pod(name, node, ns, known["address"])  # attached already
        if not netns.exists(ns):
            netns.create(ns)
        if self.kube():  # the Pod exists before its ADD, and gets its address after
            self.kube().create_pod(name, node, annotations)
        attachment = Attachment(container_id=f"lab-{name}", netns=netns.path_of(ns),
                                args=(("K8S_POD_NAMESPACE", "lab"), ("K8S_POD_NAME", name)))
        result = self.runtime(node).add(self.network(node), attachment)
        address = result["ips"][0]["address"].split("/")[0]
        if self.kube():
            self.kube().pod_started(name, address)
        with self._state_lock:
            pods = self._state().get("pods", {})
            pods[name] = {"node": node, "netns": ns, "address": address}
            self._save(pods=pods)
        self.log(f"{node}: pod {name} has {address}")
        return Pod(name, node, ns, address)

    def remove_pod(self, name: str, node: str | None = None) -> None:
        """The pod goes as a runtime deletes one: CNI DEL (its address is released), then
        its namespace. With `node`, also a pod whose ADD failed (a runtime DELs it until
        that works)."""
        pod = self._state().get("pods", {}).get(name)
        if pod is None and node is None:
            return
        pod = pod or {"node": node, "netns": f"{self.prefix}{name}"}
        attachment = Attachment(container_id=f"lab-{name}", netns=netns.path_of(pod["netns"]))
        self.runtime(pod["node"]).delete(self.network(pod["node"]), attachment)
        if netns.exists(pod["netns"]):
            netns.delete(pod["netns"])
        with self._state_lock:
            pods = self._state().get("pods", {})
            pods.pop(name, None)
            self._save(pods=pods)

    def all_pods(self) -> list[Pod]:
        return [Pod(name, p["node"], p["netns"], p["address"])
                for name, p in self._state().get("pods", {}).items()]

    # -- checks --------------------------------------------------------------------------

    def ping(self, source: Pod, target: Pod) -> bool:
        return netns.ping(source.netns, target.address, "-q").returncode == 0

    def ping_matrix(self, timeout: float = 30.0) -> dict[tuple[str, str], bool]:
        """Every pod pings every other pod (retrying while routes converge)."""
        pods = self.all_pods()
        pairs = [(a, b) for a in pods for b in pods if a is not b]

        def attempt(pair) -> bool:
            try:
                return wait(lambda: self.ping(*pair), timeout,
                            f"{pair[0].name} to reach {pair[1].name}", interval=0.2)
            except TimeoutError:
                return False
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(attempt, pairs))
        return {(a.name, b.name): ok for (a, b), ok in zip(pairs, results)}

    def kernel_routes(self, node: str) -> list[dict]:
        """Pipit's routes (protocol 91) in a node's kernel, as `ip -j route` gives them."""
        out = subprocess.run(["ip", "-n", self.node_ns(node), "-j", "route", "show", "proto",
                              "91"], capture_output=True, text=True, check=True).stdout
        return json.loads(out or "[]")

    def pipit_routes(self, node: str) -> dict[str, str]:
        """Pipit's kernel routes on a node: destination -> gateway, or 'blackhole'."""
        return {r["dst"]: "blackhole" if r.get("type") == "blackhole" else r.get("gateway", "")
                for r in self.kernel_routes(node)}

    def report(self, render: Callable[[dict], str] = brief) -> bool:
        """Show every node's status (through `render`) and the ping matrix; whether all is
        well."""
        ok = True
        tls = self._state().get("etcd", {}).get("tls")
        self.log(f"etcd: {self.etcd_host_endpoint} (for pipitctl: export "
                 f"PIPIT_ETCD_ENDPOINTS={self.etcd_host_endpoint}"
                 + (f" PIPIT_ETCD_CA_CERT_FILE={tls['ca']} PIPIT_ETCD_CERT_FILE={tls['cert']} "
                    f"PIPIT_ETCD_KEY_FILE={tls['key']}" if tls else "") + ")")
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
            for pid in netns.pids(ns):
                kill(pid)
        # lab.json's pids only while they are still our processes (not reused by others)
        for pid in [*map(self._agent_pid, self.nodes()), self._etcd_pid()]:
            if pid:
                kill(pid)
        netns.delete(*lab_namespaces)
        shutil.rmtree(self.directory, ignore_errors=True)


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
