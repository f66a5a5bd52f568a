"""Idle cost per node: a lab of N nodes, converged and then left alone, measured over fixed
windows (pipit-agent, pipit-exabgp-bridge and ExaBGP separately, in % of one core, and their
memory), against BIRD 2 routers holding the same sessions, idle in the same windows.

    sudo .venv/bin/python -m bench.idle [--nodes 10] [--topology mesh|rr] [--reflectors 2]
                                        [--pods-per-node 1] [--hold-time 9] [--window 30]
                                        [--repeat 3] [--settle 10]

The lab is `lab.cluster.Lab` (hold time 9 s, as `pipitctl lab up`) in a temp dir, with
`pipit-bench-pid<pid>-` namespaces, removed at the end (those of benches that died are removed
at the start); mesh: every node peers with every other; rr (where the lab has it): the nodes
peer with dedicated pipit-rr reflectors. The reference: one BIRD 2 router per lab node on a
bridge of their own, with a session wherever the lab has one (eBGP, the same hold time), each
announcing a /26 and installing what it learns into its namespace's kernel table, as a node
does. Both run during the same windows.

CPU time is what the kernel accounts to each process's threads (/proc/PID/task/*/schedstat, in
ns) plus its children reaped meanwhile. ExaBGP's wake-ups per second (voluntary context
switches) count its reactor's turns. Goal (issue 11): agent + bridge + ExaBGP <= 1 % of a core.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

from bench.converge import rss_mib
from bgp_agent.exabgp_process import ENV_FILE
from lab import netns
from lab.cluster import TOPOLOGIES, Lab
from lab.netns import Namespaces
from lab.process import command_line, wait
from lab.routers import FabricRouter, RouterPeer, RouterSpec, make_router

GOAL = 1.0  # % of a core per node: agent + bridge + ExaBGP
KINDS = {"pipit-agent": "agent", "pipit-rr": "agent", "pipit-exabgp-bridge": "bridge",
         "pipit-exabgp": "exabgp", "exabgp": "exabgp"}
LABELS = {"agent": "pipit-agent", "bridge": "pipit-exabgp-bridge", "exabgp": "ExaBGP"}
TICK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------
# What a process has used

@dataclass(frozen=True)
class Usage:
    cpu: float  # seconds
    wakeups: int  # voluntary context switches (its threads' sleeps)
    at: float  # time.monotonic() when read


def usage(pid: int) -> Usage:
    """CPU time so far: every live thread's (schedstat, ns), plus the children it has reaped
    (ticks); and how often its threads went to sleep. (A thread that exits between two
    readings takes its time with it; idle, none do.)"""
    cpu, wakeups = 0.0, 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            cpu += int((task / "schedstat").read_text().split()[0]) / 1e9
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    wakeups += int(line.split()[1])
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu += (int(fields[13]) + int(fields[14])) / TICK  # cutime + cstime
    return Usage(cpu, wakeups, time.monotonic())


def share(before: Usage, after: Usage) -> float:
    """% of one core between two readings."""
    return 100 * (after.cpu - before.cpu) / (after.at - before.at)


def rate(before: Usage, after: Usage) -> float:
    return (after.wakeups - before.wakeups) / (after.at - before.at)


# --------------------------------------------------------------------------------------------
# The lab's processes and sessions

def node_processes(lab: Lab, node: str) -> dict[str, int]:
    """The node's agent, bridge and ExaBGP: what runs in its namespace, by program name."""
    found = {}
    for pid in netns.pids(lab.node_ns(node)):
        names = [os.path.basename(arg) for arg in command_line(pid)[:2]]
        kind = next((KINDS[n] for n in names if n in KINDS), None)
        if kind:
            found[kind] = pid
    missing = set(LABELS) - set(found)
    if missing:
        raise RuntimeError(f"{node}: no {', '.join(sorted(missing))} running in its namespace")
    return found


def sessions(lab: Lab) -> dict[str, list[str]]:
    """node -> the other lab nodes it has a session up with (from their status)."""
    statuses = {node: lab.status(node) or {} for node in lab.nodes()}
    by_address = {str(s.get("address", "")).split("/")[0]: node for node, s in statuses.items()}
    return {node: sorted(by_address[p["address"]] for p in s.get("peers", [])
                         if p["state"] == "up" and p["address"] in by_address)
            for node, s in statuses.items()}


def exabgp_settings(lab: Lab, node: str, pid: int) -> str:
    """How the node's ExaBGP runs: its program and reactor speed."""
    program = next(os.path.basename(a) for a in command_line(pid) if "exabgp" in a)
    env = (lab.node_dir(node) / "exabgp" / ENV_FILE).read_text()
    speed = next((line.split("=", 1)[1].strip() for line in env.splitlines()
                  if line.startswith("speed")), "1.0 (ExaBGP's default)")
    return f"{program}, exabgp.reactor.speed {speed}"


# --------------------------------------------------------------------------------------------
# The reference: BIRD routers with the lab's sessions

def bird_twins(graph: dict[str, list[str]], hold_time: int, namespaces: Namespaces,
               directory: Path) -> dict[str, FabricRouter]:
    """node -> a BIRD router in a namespace of its own, on one bridge with the others, with an
    eBGP session (AS 65000+i) wherever the node has one, announcing 10.240.<i>.0/26; started."""
    nodes = sorted(graph)
    index = {node: i for i, node in enumerate(nodes, 1)}
    address = {node: IPv4Interface(f"10.98.{i // 200}.{10 + i % 200}/16")
               for node, i in index.items()}
    switch = namespaces.create("birdfabric")
    _ip("-n", switch, "link", "add", "br0", "type", "bridge")
    _ip("-n", switch, "link", "set", "br0", "up")
    spaces = dict(zip(nodes, namespaces.create_many("bird", len(nodes))))
    for node, ns in spaces.items():
        port = f"b{index[node]}"
        _ip("-n", switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
            "netns", ns)
        _ip("-n", switch, "link", "set", port, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", str(address[node]), "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
    routers = {}
    for node, ns in spaces.items():
        i = index[node]
        peers = tuple(RouterPeer(f"p{index[other]}", address[other].ip, 65000 + index[other],
                                 local_address=address[node].ip, hold_time=hold_time)
                      for other in graph[node])
        spec = RouterSpec(f"b{i}", address[node].ip, 65000 + i, peers,
                          originate=(IPv4Network(f"10.240.{i // 4}.{i % 4 * 64}/26"),))
        routers[node] = make_router("bird", spec, ns, directory / f"bird{i}").start()
    return routers


def bird_established(router) -> bool:
    protocols = router.protocols()  # one birdc call for all its sessions
    return all(p.name in protocols and protocols[p.name].established for p in router.spec.peers)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


# --------------------------------------------------------------------------------------------
# Measuring and reporting

def measure(groups: dict[str, dict[str, int]], window: float
            ) -> dict[str, dict[str, tuple[float, float]]]:
    """One window: {group: {kind: (% of a core, wake-ups/s)}} for every process at once."""
    before = {g: {k: usage(pid) for k, pid in kinds.items()} for g, kinds in groups.items()}
    time.sleep(window)
    after = {g: {k: usage(pid) for k, pid in kinds.items()} for g, kinds in groups.items()}
    return {g: {k: (share(before[g][k], after[g][k]), rate(before[g][k], after[g][k]))
                for k in kinds} for g, kinds in groups.items()}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def report_role(title: str, nodes: list[str], windows: list[dict],
                rss: dict[str, dict[str, float]]) -> float:
    """One block of rows for some nodes (and their BIRD twins, `bird:<node>`); returns the
    worst node total of any window."""
    print(f"{title:34}" + "".join(f"{f'window {w + 1}':>12}" for w in range(len(windows)))
          + f"{'worst':>10}{'RSS MiB':>10}")

    def row(label, values, worst, memory) -> None:
        print(f"  {label:32}" + "".join(f"{v:12.3f}" for v in values) + f"{worst:10.3f}"
              + f"{memory:10.1f}")

    for kind, label in LABELS.items():
        row(label, [mean(w[n][kind][0] for n in nodes) for w in windows],
            max(w[n][kind][0] for w in windows for n in nodes), mean(rss[n][kind] for n in nodes))
    print(f"  {'  ExaBGP reactor turns/s':32}" + "".join(
        f"{mean(w[n]['exabgp'][1] for n in nodes):12.1f}" for w in windows))
    totals = [{n: sum(v[0] for v in w[n].values()) for n in nodes} for w in windows]
    node_total = [mean(t.values()) for t in totals]
    worst = max(max(t.values()) for t in totals)
    row("agent + bridge + ExaBGP", node_total, worst, mean(sum(rss[n].values()) for n in nodes))
    birds = [f"bird:{n}" for n in nodes]
    bird = [mean(w[b]["bird"][0] for b in birds) for w in windows]
    row("reference: BIRD 2, same sessions", bird,
        max(w[b]["bird"][0] for w in windows for b in birds), mean(rss[b]["bird"] for b in birds))
    print(f"  {'ratio to BIRD':32}" + "".join(
        f"{(f'{t / b:.0f}x' if b > 0 else '-'):>12}" for t, b in zip(node_total, bird)))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--topology", default="mesh",
                        choices=[t for t in TOPOLOGIES if t != "racks"])
    parser.add_argument("--reflectors", type=int, default=2, help="rr: dedicated reflectors")
    parser.add_argument("--pods-per-node", type=int, default=1)
    parser.add_argument("--hold-time", type=int, default=Lab.hold_time,
                        help="BGP hold time of every session (the lab's, 9 s, by default; "
                             "Pipit's default outside the lab is 90 s)")
    parser.add_argument("--window", type=float, default=30.0, help="seconds per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="windows, one after the other")
    parser.add_argument("--settle", type=float, default=10.0,
                        help="seconds left alone after convergence before measuring")
    args = parser.parse_args()
    if args.nodes < 2:
        parser.error("--nodes must be at least 2 (a node alone has no session)")
    options = {"reflectors": args.reflectors} if args.topology == "rr" else {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the cleanup runs
    with tempfile.TemporaryDirectory(prefix="pipit-bench-") as tmp, \
            Namespaces("pipit-bench-") as namespaces:  # also removes dead benches' leftovers
        tmp = Path(tmp)
        lab = Lab(directory=tmp / "lab", prefix=f"pipit-bench-pid{os.getpid()}-",
                  topology=args.topology, hold_time=args.hold_time, log=lambda *a: None,
                  **options)
        routers: dict[str, FabricRouter] = {}
        try:
            started = time.monotonic()
            if not lab.up(node_count=args.nodes, pods_per_node=args.pods_per_node):
                raise RuntimeError("the lab did not converge (sessions or pings failed)")
            up = time.monotonic() - started
            graph = sessions(lab)
            routers = bird_twins(graph, lab.hold_time, namespaces, tmp / "birds")
            wait(lambda: all(bird_established(r) for r in routers.values()), 60 + len(graph),
                 "every BIRD session to establish", interval=0.5)
            groups = {n: node_processes(lab, n) for n in graph}
            groups.update({f"bird:{n}": {"bird": r.pids()[0]} for n, r in routers.items()})
            time.sleep(args.settle)
            load = os.getloadavg()[0]
            windows = [measure(groups, args.window) for _ in range(args.repeat)]
            load_after = os.getloadavg()[0]
            rss = {g: {k: rss_mib(pid) for k, pid in kinds.items()} for g, kinds in groups.items()}
            reflectors = set(getattr(lab, "reflector_names", list)())
            first = sorted(set(graph) - reflectors)[0]
            how = exabgp_settings(lab, first, groups[first]["exabgp"])
            if reflectors:
                reflector = sorted(reflectors)[0]
                how += "; reflectors: " + exabgp_settings(lab, reflector,
                                                          groups[reflector]["exabgp"])
        finally:
            for router in routers.values():
                router.destroy()
            lab.down()
    print(f"idle cost per node: {args.topology} lab, {args.nodes} nodes"
          + (f" and {len(reflectors)} reflectors" if reflectors else "")
          + f", hold time {lab.hold_time} s, {args.pods_per_node} pod(s) per node; up in "
          f"{up:.1f} s")
    print(f"ExaBGP: {how}; {args.repeat} windows of {args.window:g} s after {args.settle:g} s "
          f"idle; load average {load:.1f} before, {load_after:.1f} after")
    print("% of one core (mean per node in each window, worst node in any window)")
    worst = 0.0
    for title, members in (("nodes", [n for n in sorted(graph) if n not in reflectors]),
                           ("reflectors", sorted(reflectors))):
        if members:
            counts = sorted({len(graph[n]) for n in members})
            worst = max(worst, report_role(
                f"{title} ({len(members)}, {'/'.join(map(str, counts))} sessions)",
                members, windows, rss))
    print(f"goal: agent + bridge + ExaBGP <= {GOAL:g} % of a core on every node -> "
          f"{'met' if worst <= GOAL else 'MISSED'} (worst {worst:.2f} %)")


if __name__ == "__main__":
    main()
