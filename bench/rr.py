"""Route reflection end to end: Pipit's reflector against BIRD 2, same topology, same run.

Pipit's reflector is `pipit-rr` (its ExaBGP run as `pipit-exabgp`); the reference, measured in
the same run, is BIRD 2 as the reflector. Issue 11's figures.

    sudo .venv/bin/python -m bench.rr [--clients 200] [--prefixes 5000] [--spread 2,50]
                                      [--joins 30] [--repeat 2] [--only cold,prefixes,join]
                                      [--timeout 300] [--keep DIR]

Topology, in `pipit-bench-pid<pid>-` namespaces (removed at the end, also on error, Ctrl-C or
SIGTERM; those of benches that died are removed at the start):

- `rr`: the reflector at 10.77.0.1/16, either BIRD 2 (`rr client`, `rr cluster id`, passive)
  or pipit-rr (node record with routeReflectorClusterID 244.0.0.1, label
  route-reflector=true; a private etcd holds the clients' node records, their blocks and one
  BGPPeer with peerSelector, as the lab's rr topology; being the lower address it waits for
  the clients to connect, as BIRD does here).
- `clients`: one BIRD 2 holding every client's session, each from its own macvlan and address
  (10.77.<1+i//250>.<1+i%250>, its own router id) with its own static protocols exported to
  that session only. (BIRD serialises sessions to one neighbour address on one interface, so
  each client needs an interface of its own.) Received routes are kept (next hops are the
  clients' own addresses: `gateway recursive`, unresolved) and counted per session.

Figures; every one is measured for both reflectors, turn about, `--repeat` times:

- cold resync: `--clients` clients with 1-2 blocks each; the reflector runs with no session
  up; the clients' sessions are enabled at once and BIRD opens them 0.75-1 s later (its
  connect delay, randomised, the same for both reflectors); time from the first session up to
  the moment every client has every other client's blocks, read from the clients' BIRD
  timestamps (µs) of the last route received; also from the last session up.
- N prefixes x {spread} clients: the sessions are up and empty; every client's share of
  `--prefixes` blocks is announced at once (one `birdc enable`); time until every client has
  all the others' (BIRD's timestamps: the static routes' to the last received route's).
- node join at `--clients` clients, after the cold resync: one new block on one client (its
  static protocol enabled) until it is in every other client's table; `--joins` times.

Beside each N-prefixes figure, `bench.exabgp_floor`'s time for the same routes: ExaBGP (with
pipit-exabgp's changes) decoding each from its client's UPDATEs and encoding it into UPDATEs
once, in this process, nothing else. It is the least any reflector that speaks BGP through
ExaBGP spends, wherever its reflection runs; printed against BIRD's best.

The blocks are in a pool and owned in etcd by the client announcing them, so Pipit's import
policy accepts them (its per-route check against etcd is part of what is measured). CPU time
of each reflector process over a figure is printed too (/proc, as bench.idle reads it).
Goals (issue 11): Pipit within 3x of BIRD's time; node join p99 <= 200 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

from bench import exabgp_floor
from bench.converge import percentile
from bench.exabgp_floor import Floor
from bench.idle import usage
from bgp_agent.node import NodeRecord, node_to_document
from bgp_agent.status import read_status
from ipam import keys
from ipam.block import new_block, to_json
from ipam.store import EtcdConfig, Store
from lab import netns
from lab.bird import Bird, BirdPeer, bgp_config
from lab.cluster import BIN
from lab.etcd import EtcdServer
from lab.netns import Namespaces
from lab.process import command_line, kill, stop_group, wait

AS_NUMBER = 64512
CLUSTER_ID = IPv4Address("244.0.0.1")
REFLECTOR = IPv4Interface("10.77.0.1/16")
POOL = IPv4Network("10.128.0.0/12")  # 16,384 blocks of /26
HOLD_TIME = 90  # both reflectors' sessions (BGPPeer holdTime; BIRD's hold time)
GOAL_RATIO = 3.0
GOAL_JOIN_P99_MS = 200.0
# Looking costs the clients' BIRD CPU (a `birdc show protocols all` of 200 sessions is ~5 ms),
# so the longer a wait has lasted the less often it looks; the figures come from BIRD's
# timestamps, not from when the bench noticed.
POLL_SHARE = 0.02  # of the time waited so far
POLL_MIN, POLL_MAX = 0.002, 0.5  # s
QUIET = 0.10  # the reflector is quiet below this share of a core (before each join; an idle
#               ExaBGP with 200 sessions and their keepalives uses ~3-5 %)
# Program names of what runs in the reflector's namespace, as printed
PROGRAMS = {"pipit-rr": "agent", "pipit-exabgp-bridge": "bridge", "pipit-exabgp": "ExaBGP",
            "bird": "BIRD"}
_ROUTE = re.compile(r"\[(\S+) (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)(?: from [^\]]*)?\]")
_PROTOCOL = re.compile(r"^(c\d+)\s+BGP\s")
_IMPORTED = re.compile(r"^\s+Routes:\s+(\d+) imported")


def client_address(i: int) -> IPv4Interface:
    """Client i (from 1)."""
    return IPv4Interface(f"10.77.{1 + (i - 1) // 250}.{1 + (i - 1) % 250}/16")


def block(n: int) -> IPv4Network:
    return IPv4Network((int(POOL.network_address) + 64 * n, 26))


def stamp(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


# --------------------------------------------------------------------------------------------
# What is measured

@dataclass(frozen=True)
class Workload:
    key: str  # cold | prefixes
    title: str
    base: tuple[tuple[IPv4Network, ...], ...]  # client i+1 announces base[i]
    at_open: bool  # base announced as the sessions open (else: once they are all up)
    joins: tuple[tuple[int, IPv4Network], ...] = ()  # (client, new block), one after another

    @property
    def clients(self) -> int:
        return len(self.base)

    @property
    def prefixes(self) -> int:
        return sum(map(len, self.base))

    @property
    def deliveries(self) -> int:
        """Routes the clients receive in all: every block to every other client."""
        return self.prefixes * (self.clients - 1)


def cold_workload(clients: int, joins: int) -> Workload:
    base, n = [], 0
    for i in range(clients):
        base.append(tuple(block(n + k) for k in range(1 + i % 2)))
        n += 1 + i % 2
    new = tuple((1 + (j * 37) % clients, block(n + j)) for j in range(joins))
    return Workload("cold", f"cold resync, {clients} clients x 1-2 blocks ({n} blocks)",
                    tuple(base), at_open=True, joins=new)


def spread_workload(prefixes: int, clients: int) -> Workload:
    per = -(-prefixes // clients)
    base = tuple(tuple(block(n) for n in range(i * per, min(prefixes, (i + 1) * per)))
                 for i in range(clients))
    return Workload(f"prefixes-{clients}", f"{prefixes} prefixes x {clients} clients, "
                    "announced at once into established sessions", base, at_open=False)


# --------------------------------------------------------------------------------------------
# The topology

def ip_batch(ns: str, lines: Sequence[str]) -> None:
    result = subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n",
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip -n {ns} -batch: {result.stderr.strip()}")


def make_topology(namespaces: Namespaces, clients: int) -> tuple[str, str]:
    """The reflector's namespace and the clients' (a macvlan and address per client), joined
    by a veth pair."""
    rr, cl = namespaces.create("rr"), namespaces.create("clients")
    subprocess.run([*netns.exec_prefix(cl), "sysctl", "-qw",
                    # each macvlan answers ARP for its own address only; replies may come in
                    # on another macvlan than the one the kernel sent from
                    "net.ipv4.conf.all.arp_ignore=1", "net.ipv4.conf.default.arp_ignore=1",
                    "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"],
                   check=True, capture_output=True)
    ip_batch(cl, [f"link add eth0 type veth peer name eth0 netns {rr}", "link set eth0 up"])
    ip_batch(rr, [f"addr add {REFLECTOR} dev eth0", "link set eth0 up"])
    lines = []
    for i in range(1, clients + 1):
        lines += [f"link add m{i} link eth0 type macvlan mode bridge",
                  f"addr add {client_address(i)} dev m{i}", f"link set m{i} up"]
    ip_batch(cl, lines)
    return rr, cl


def listening(ns: str) -> bool:
    """Something in the namespace accepts BGP sessions on the reflector's address."""
    out = subprocess.run([*netns.exec_prefix(ns), "ss", "-Hltn", "sport", "= :179"],
                         capture_output=True, text=True).stdout
    return f"{REFLECTOR.ip}:179" in out or "*:179" in out or "0.0.0.0:179" in out


def processes(ns: str) -> dict[str, int]:
    """What runs in the namespace, by program name (PROGRAMS)."""
    found = {}
    for pid in netns.pids(ns):
        names = [os.path.basename(a) for a in command_line(pid)[:2]]
        name = next((n for n in names if n in PROGRAMS), None)
        if name:
            found[PROGRAMS[name]] = pid
    return found


def poll(condition: Callable[[], object], timeout: float, what: str,
         least: float = 0.02):
    """Until `condition` returns something truthy (returned), looking less often as the wait
    grows (POLL_SHARE of it, between `least` and POLL_MAX s)."""
    start = time.monotonic()
    while True:
        value = condition()
        if value:
            return value
        waited = time.monotonic() - start
        if waited > timeout:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(min(POLL_MAX, max(least, POLL_MIN, waited * POLL_SHARE)))


def wait_quiet(ns: str, timeout: float) -> None:
    """Until the reflector's processes together use less than QUIET of a core (0.5 s
    windows): what it still had to do after the last figure is done."""
    pids = processes(ns)

    def quiet() -> bool:
        before = sum(usage(pid).cpu for pid in pids.values())
        time.sleep(0.5)
        return sum(usage(pid).cpu for pid in pids.values()) - before < QUIET * 0.5
    wait(quiet, timeout, "the reflector to be quiet", interval=0)


def kill_all(ns: str) -> None:
    for pid in netns.pids(ns):
        kill(pid)
    wait(lambda: not netns.pids(ns), 10, f"the processes in {ns} to exit", interval=0.05)


# --------------------------------------------------------------------------------------------
# The clients: one BIRD

def clients_config(w: Workload) -> str:
    lines = ["router id 10.77.255.254;", "timeformat protocol iso long us;",
             "timeformat route iso long us;", "protocol device {}"]
    joins: dict[int, list[tuple[int, IPv4Network]]] = {}
    for n, (client, prefix) in enumerate(w.joins, 1):
        joins.setdefault(client, []).append((n, prefix))
    for i in range(1, w.clients + 1):
        routes = " ".join(f"route {p} blackhole;" for p in w.base[i - 1])
        lines.append(f"protocol static s{i}_base {{ {'' if w.at_open else 'disabled; '}"
                     f"ipv4; {routes} }}")
        for n, prefix in joins.get(i, ()):
            lines.append(f"protocol static s{i}_j{n} {{ disabled; ipv4; route {prefix} "
                         "blackhole; }")
        address = client_address(i).ip
        lines += [
            f"protocol bgp c{i} {{",
            "  disabled;",
            f"  router id {address};",  # an ORIGINATOR_ID of its own (else: a loop)
            f"  local {address} as {AS_NUMBER};",
            f"  neighbor {REFLECTOR.ip} as {AS_NUMBER};",
            f'  interface "m{i}";', "  direct;",
            f"  hold time {HOLD_TIME};",
            "  connect delay time 1;", "  connect retry time 5;", "  error wait time 1, 10;",
            # next hops are other clients' addresses, local here: kept, not resolved
            f'  ipv4 {{ gateway recursive; import all; export where proto ~ "s{i}_*"; }};',
            "}"]
    return "\n".join(lines) + "\n"


class Clients:
    def __init__(self, w: Workload, ns: str, directory: Path):
        self.w = w
        self.bird = Bird("clients", clients_config(w), netns=ns, directory=directory)

    def start(self) -> None:
        self.bird.start(timeout=60)

    def stop(self) -> None:
        self.bird.stop()

    def birdc(self, *command: str) -> str:
        return self.bird.birdc(*command)

    def imported(self) -> dict[str, int]:
        """Routes each client's session has received."""
        counts, current = {}, None
        for line in self.birdc("show", "protocols", "all", '"c*"').splitlines():
            match = _PROTOCOL.match(line)
            if match:
                current = match.group(1)
                counts.setdefault(current, 0)
                continue
            match = _IMPORTED.match(line)
            if match and current:
                counts[current] = int(match.group(1))
        return counts

    def expected(self, joined: int = 0) -> dict[str, int]:
        own = {i: len(self.w.base[i - 1]) for i in range(1, self.w.clients + 1)}
        for client, _ in self.w.joins[:joined]:
            own[client] += 1
        total = sum(own.values())
        return {f"c{i}": total - n for i, n in own.items()}

    def complete(self) -> bool:
        return self.imported() == self.expected()

    def sessions(self) -> dict[str, float]:
        """When each client's session came up (BIRD's clock); only those up."""
        return {name: info.since.seconds for name, info in self.bird.protocols().items()
                if name.startswith("c") and info.established}

    def last_received(self) -> float:
        """When the last route any client holds from the reflector arrived (BIRD's clock)."""
        times = [stamp(t) for proto, t in _ROUTE.findall(self.birdc("show", "route"))
                 if proto.startswith("c")]
        return max(times)

    def first_static(self) -> float:
        """When the first client's own routes appeared (BIRD's clock)."""
        times = [stamp(t) for proto, t in _ROUTE.findall(self.birdc("show", "route"))
                 if proto.startswith("s")]
        return min(times)


# --------------------------------------------------------------------------------------------
# The reflectors

class BirdReflector:
    label = "BIRD 2"

    def __init__(self, w: Workload, ns: str, directory: Path):
        peers = [BirdPeer(f"c{i}", client_address(i).ip, AS_NUMBER, hold_time=HOLD_TIME,
                          passive=True, rr_cluster_id=CLUSTER_ID)
                 for i in range(1, w.clients + 1)]
        self.ns = ns
        self.bird = Bird("rr", bgp_config(REFLECTOR.ip, REFLECTOR.ip, AS_NUMBER, peers),
                         netns=ns, directory=directory)

    def start(self) -> None:
        self.bird.start(timeout=60)
        wait(lambda: listening(self.ns), 30, "BIRD to listen", interval=0.02)

    def sessions_up(self, count: int) -> bool:
        return sum(p.established for p in self.bird.protocols().values()) == count

    def log_tail(self) -> str:
        return ""

    def stop(self) -> None:
        self.bird.stop()
        kill_all(self.ns)


class PipitReflector:
    label = "Pipit (pipit-rr)"

    def __init__(self, w: Workload, ns: str, directory: Path, etcd: EtcdServer):
        self.w, self.ns, self.directory, self.etcd = w, ns, directory, etcd
        self.process: subprocess.Popen | None = None

    @property
    def status_socket(self) -> Path:
        return self.directory / "status.sock"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [*netns.exec_prefix(self.ns), str(BIN / "pipit-rr"), "--node", "rr",
                "--ip", str(REFLECTOR), "--etcd-endpoints",
                f"unix://{self.etcd.data_dir}/etcd.sock:0", "--state-dir", str(self.directory),
                "--ipam-socket", str(self.directory / "ipam.sock"),
                "--status-socket", str(self.status_socket), "--exabgp", "spawn",
                "--labels", "route-reflector=true",
                "--route-reflector-cluster-id", str(CLUSTER_ID)]
        with open(self.directory / "agent.log", "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=log,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        wait(self._ready, 120, "pipit-rr to configure its peers and listen", interval=0.05)

    def _status(self) -> dict | None:
        try:
            return read_status(str(self.status_socket), timeout=5.0)
        except Exception:
            return None

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"pipit-rr exited with {self.process.returncode}:\n"
                               + self.log_tail())
        status = self._status()
        return bool(status and status.get("speakerConnected")
                    and len(status.get("peers", [])) == self.w.clients and listening(self.ns))

    def sessions_up(self, count: int) -> bool:
        status = self._status() or {}
        return sum(p["state"] == "up" for p in status.get("peers", [])) == count

    def log_tail(self, lines: int = 20) -> str:
        text = ""
        for name in ("agent.log", "exabgp.log"):
            try:
                tail = (self.directory / name).read_text(errors="replace").splitlines()[-lines:]
                text += f"--- {name}\n" + "\n".join(tail) + "\n"
            except OSError:
                pass
        return text

    def stop(self) -> None:
        stop_group(self.process, timeout=20)
        kill_all(self.ns)  # ExaBGP and its bridge, if SIGTERM left them


async def write_cluster(endpoint: str, w: Workload) -> None:
    """The clients' node records and every block the workload announces, owned by the client
    that announces it (what Pipit's import policy checks reflected routes against)."""
    puts: dict[str, dict] = {}
    for i in range(1, w.clients + 1):
        record = NodeRecord(f"c{i}", client_address(i), labels={"bench": "client"})
        puts[keys.node_key(record.name)] = node_to_document(record)
        for prefix in w.base[i - 1]:
            puts[keys.block_key(prefix)] = to_json(new_block(prefix, f"c{i}"))
    for client, prefix in w.joins:
        puts[keys.block_key(prefix)] = to_json(new_block(prefix, f"c{client}"))
    items = list(puts.items())
    async with Store(EtcdConfig(endpoints=(endpoint,))) as store:
        for start in range(0, len(items), 100):
            result = await store.txn({}, dict(items[start:start + 100]))
            assert result.succeeded


CLUSTER = f"""\
apiVersion: pipit.dev/v1
kind: IPPool
metadata: {{name: bench}}
spec: {{cidr: {POOL}, blockSize: 26}}
---
apiVersion: pipit.dev/v1
kind: BGPConfiguration
metadata: {{name: default}}
spec: {{nodeToNodeMeshEnabled: false, asNumber: {AS_NUMBER}}}
---
apiVersion: pipit.dev/v1
kind: BGPPeer
metadata: {{name: to-reflectors}}
spec: {{nodeSelector: all(), peerSelector: "route-reflector == 'true'", holdTime: {HOLD_TIME}}}
"""


def start_etcd(directory: Path, w: Workload) -> EtcdServer:
    etcd = EtcdServer(data_dir=directory, unix_socket=True)
    try:
        etcd.start()
        result = subprocess.run([str(BIN / "pipitctl"), "--etcd-endpoints", etcd.endpoint,
                                 "apply", "-f", "-"], input=CLUSTER, text=True,
                                capture_output=True)
        if result.returncode != 0:
            raise RuntimeError(f"pipitctl apply: {result.stderr.strip()}")
        asyncio.run(write_cluster(etcd.endpoint, w))
    except BaseException:
        etcd.destroy()
        raise
    return etcd


# --------------------------------------------------------------------------------------------
# One trial: a reflector, fresh clients, the workload

@dataclass
class Trial:
    reflector: str
    seconds: float = 0.0  # the figure (cold: first session up -> complete)
    tail: float = 0.0  # cold: last session up -> complete
    spread: float = 0.0  # cold: first -> last session up
    cpu: dict[str, float] = field(default_factory=dict)  # program -> CPU seconds
    joins: list[float] = field(default_factory=list)  # s per join


def cpu_of(ns: str) -> Callable[[], dict[str, float]]:
    """CPU seconds each process in the reflector's namespace has used since this call."""
    pids = processes(ns)
    before = {name: usage(pid).cpu for name, pid in pids.items()}

    def spent() -> dict[str, float]:
        out = {}
        for name, pid in pids.items():
            try:
                out[name] = usage(pid).cpu - before[name]
            except OSError:
                out[name] = float("nan")
        return out
    return spent


def run_trial(kind: str, w: Workload, rr_ns: str, cl_ns: str, directory: Path,
              etcd: EtcdServer | None, timeout: float) -> Trial:
    clients = Clients(w, cl_ns, directory / "clients")
    reflector = (PipitReflector(w, rr_ns, directory / "rr", etcd) if kind == "pipit"
                 else BirdReflector(w, rr_ns, directory / "rr"))
    trial = Trial(reflector.label)
    try:
        clients.start()
        reflector.start()
        cpu = cpu_of(rr_ns)
        client_cpu = usage(clients.bird.process.pid).cpu
        clients.birdc("enable", '"c*"')
        if not w.at_open:
            poll(lambda: len(clients.sessions()) == w.clients
                 and reflector.sessions_up(w.clients), timeout, "every session to come up")
            wait_quiet(rr_ns, timeout)
            cpu = cpu_of(rr_ns)
            client_cpu = usage(clients.bird.process.pid).cpu
            clients.birdc("enable", '"s*"')
        poll(clients.complete, timeout, f"every client to have every other client's routes "
             f"with {reflector.label}")
        trial.cpu = cpu()
        trial.cpu["clients' BIRD"] = usage(clients.bird.process.pid).cpu - client_cpu
        end = clients.last_received()
        if w.at_open:
            opened = clients.sessions().values()
            trial.seconds, trial.tail = end - min(opened), end - max(opened)
            trial.spread = max(opened) - min(opened)
        else:
            trial.seconds = end - clients.first_static()
        for n, (client, prefix) in enumerate(w.joins, 1):
            wait_quiet(rr_ns, timeout)
            trial.joins.append(join(clients, client, n, prefix, timeout))
        return trial
    except BaseException:
        print(f"{reflector.label}: failed; its last words:\n{reflector.log_tail()}",
              file=sys.stderr)
        raise
    finally:
        reflector.stop()
        clients.stop()


def join(clients: Clients, client: int, n: int, prefix: IPv4Network, timeout: float) -> float:
    """A new block on one client: from its static route to the last other client's copy."""
    clients.birdc("enable", f"s{client}_j{n}")
    others = clients.w.clients - 1

    def arrived() -> list[tuple[str, str]] | None:
        routes = _ROUTE.findall(clients.birdc("show", "route", "for", str(prefix)))
        got = [r for r in routes if r[0].startswith("c")]
        return routes if len(got) == others else None
    routes = poll(arrived, timeout, f"{prefix} to reach every other client", least=0)
    origin = min(stamp(t) for proto, t in routes if proto == f"s{client}_j{n}")
    return max(stamp(t) for proto, t in routes if proto.startswith("c")) - origin


# --------------------------------------------------------------------------------------------
# Report

def span(values: list[float], unit: float = 1e3, digits: int = 0) -> str:
    low, high = min(values) * unit, max(values) * unit
    return f"{low:.{digits}f}" if f"{low:.{digits}f}" == f"{high:.{digits}f}" \
        else f"{low:.{digits}f}-{high:.{digits}f}"


def cpu_text(trials: list[Trial]) -> str:
    names = list(trials[0].cpu)
    return ", ".join(f"{name} {span([t.cpu[name] for t in trials], 1, 2)}" for name in names)


def report(w: Workload, results: dict[str, list[Trial]], floor: Floor | None = None
           ) -> list[float]:
    """Print one workload's figures; the best-to-best ratio, and the pairwise ratios. With
    `floor`, ExaBGP's own work on the workload's routes against BIRD's best."""
    bird, pipit = results["bird"], results["pipit"]
    print(f"\n{w.title}: {w.deliveries:,} routes to deliver, {len(bird)} trials each")
    what = ("first session up -> complete" if w.at_open else "announce -> complete")
    extra = "   sessions opened over   last session up -> complete" if w.at_open else ""
    print(f"  {'':22}{what:>30}{extra}")
    for trials in (bird, pipit):
        line = f"  {trials[0].reflector:22}{span([t.seconds for t in trials]) + ' ms':>30}"
        if w.at_open:
            line += (f"{span([t.spread for t in trials]) + ' ms':>25}"
                     f"{span([t.tail for t in trials]) + ' ms':>30}")
        print(line)
        print(f"  {'':24}CPU s: {cpu_text(trials)}")
    ratios = [p.seconds / b.seconds for b, p in zip(bird, pipit)]
    best = min(t.seconds for t in pipit) / min(t.seconds for t in bird)
    print(f"  ratio Pipit / BIRD: {best:.1f}x best to best (trial by trial: "
          f"{', '.join(f'{r:.1f}x' for r in ratios)})")
    if floor is not None:
        least = floor.seconds / min(t.seconds for t in bird)
        print(f"  ExaBGP alone, each route decoded and encoded once (bench.exabgp_floor): "
              f"{floor.seconds * 1e3:.0f} ms, {least:.1f}x BIRD's best"
              + (f": no reflector speaking through ExaBGP is within {GOAL_RATIO:g}x here"
                 if least > GOAL_RATIO else ""))
    return [best, *ratios]


def report_joins(w: Workload, results: dict[str, list[Trial]]) -> float:
    print(f"\nnode join at {w.clients} clients: a new block on one client -> in the other "
          f"{w.clients - 1} clients' tables ({len(w.joins)} joins per trial, all trials)")
    print(f"  {'':22}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}")
    p99 = 0.0
    for kind in ("bird", "pipit"):
        values = [j * 1e3 for t in results[kind] for j in t.joins]
        print(f"  {results[kind][0].reflector:22}" + "".join(
            f"{percentile(values, p):8.1f}ms" for p in (50, 90, 99)) + f"{max(values):8.1f}ms")
        if kind == "pipit":
            p99 = percentile(values, 99)
    return p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200, help="cold resync and node join")
    parser.add_argument("--prefixes", type=int, default=5000)
    parser.add_argument("--spread", default="2,50", help="client counts for --prefixes")
    parser.add_argument("--joins", type=int, default=30, help="node joins per trial")
    parser.add_argument("--repeat", type=int, default=2, help="trials per reflector and figure")
    parser.add_argument("--only", default="cold,prefixes,join",
                        help="figures to measure: cold, prefixes, join (join runs after cold)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="s to wait for any one step before giving up")
    parser.add_argument("--keep", metavar="DIR",
                        help="work in DIR and leave it (logs: DIR/<figure>-<reflector>-<n>/)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    if not only <= {"cold", "prefixes", "join"}:
        parser.error("--only takes cold, prefixes and join")
    spread = [int(n) for n in args.spread.split(",") if n]
    if args.clients < 2 or any(n < 2 for n in spread):
        parser.error("a reflector needs at least 2 clients")
    blocks = POOL.num_addresses // 64
    if max(args.prefixes, args.clients * 2 + args.joins) > blocks:
        parser.error(f"the pool {POOL} holds {blocks} blocks: ask for fewer prefixes or "
                     "clients (routes outside it are rejected, as they should be)")
    workloads = []
    if only & {"cold", "join"}:
        workloads.append(cold_workload(args.clients, args.joins if "join" in only else 0))
    if "prefixes" in only:
        workloads += [spread_workload(args.prefixes, n) for n in spread]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the cleanup runs
    load = os.getloadavg()[0]
    results: dict[str, dict[str, list[Trial]]] = {}
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
    with (contextlib.nullcontext(args.keep) if args.keep
          else tempfile.TemporaryDirectory(prefix="pipit-bench-")) as tmp, \
            Namespaces("pipit-bench-") as namespaces:  # also removes dead benches' leftovers
        tmp = Path(tmp)
        rr_ns, cl_ns = make_topology(namespaces, max(w.clients for w in workloads))
        try:
            for number, w in enumerate(workloads):
                etcd = start_etcd(tmp / f"etcd{number}", w)
                results[w.key] = {"bird": [], "pipit": []}
                try:
                    for rep in range(args.repeat):
                        for kind in (("bird", "pipit") if rep % 2 == 0 else ("pipit", "bird")):
                            trial = run_trial(kind, w, rr_ns, cl_ns,
                                              tmp / f"{w.key}-{kind}-{rep}", etcd, args.timeout)
                            results[w.key][kind].append(trial)
                finally:
                    etcd.destroy()
        finally:
            for ns in (rr_ns, cl_ns):
                for pid in netns.pids(ns):
                    kill(pid)
    load_after = os.getloadavg()[0]
    print("route reflection: Pipit's reflector (pipit-rr, ExaBGP as pipit-exabgp) against BIRD 2 "
          "as the reflector, same topology, same run")
    print(f"clients: one BIRD 2, a session per client from its own macvlan; hold time "
          f"{HOLD_TIME} s; load average {load:.1f} before, {load_after:.1f} after")
    ratios, p99 = [], None
    for w in workloads:
        floor = None if w.at_open else exabgp_floor.measure(
            w.base, [client_address(i).ip for i in range(1, w.clients + 1)])
        if w.key != "cold" or "cold" in only:
            ratios.append(report(w, results[w.key], floor)[0])
        if w.joins:
            p99 = report_joins(w, results[w.key])
    goals = []
    if ratios:
        worst = max(ratios)
        goals.append(f"Pipit within {GOAL_RATIO:g}x of BIRD -> "
                     f"{'met' if worst <= GOAL_RATIO else 'MISSED'} (worst best-to-best "
                     f"{worst:.1f}x)")
    if p99 is not None:
        goals.append(f"node join p99 <= {GOAL_JOIN_P99_MS:g} ms -> "
                     f"{'met' if p99 <= GOAL_JOIN_P99_MS else 'MISSED'} ({p99:.0f} ms)")
    print("\ngoals: " + "; ".join(goals))


if __name__ == "__main__":
    main()
