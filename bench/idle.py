"""Idle cost per node: a lab of N nodes, converged and then left alone, measured over fixed
windows (pipit-agent, pipit-exabgp-bridge and ExaBGP separately, in % of one core, and their
memory), against N BIRD 2 instances with the same sessions, idle in the same windows.

    sudo .venv/bin/python -m bench.idle [--nodes 10] [--pods-per-node 1] [--window 30]
                                        [--repeat 3] [--settle 10]

The lab is `lab.cluster.Lab` (a full mesh: N-1 sessions per node, hold time 9 s) in a temp dir,
with `pipit-bench-pid<pid>-` namespaces, removed at the end (those of benches that died are
removed at the start). The reference: N BIRD 2 routers (lab.routers) on a bridge of their own,
a full mesh of eBGP sessions with the same hold time, each announcing a /26 and installing what
it learns into its namespace's kernel table, as a node does. Both run during the same windows.

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
from lab.cluster import Lab
from lab.netns import Namespaces
from lab.process import command_line, wait
from lab.routers import FabricRouter, RouterPeer, RouterSpec, make_router

GOAL = 1.0  # % of a core per node: agent + bridge + ExaBGP
KINDS = {"pipit-agent": "agent", "pipit-exabgp-bridge": "bridge", "pipit-exabgp": "exabgp",
         "exabgp": "exabgp"}
TICK = os.sysconf("SC_CLK_TCK")
BIRD_FABRIC = "10.98.0"  # 10.98.0.<10+i>/24 in the BIRD mesh's own namespaces


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
    task_dir = Path(f"/proc/{pid}/task")
    for task in task_dir.iterdir():
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
# The processes measured

def node_processes(lab: Lab, node: str) -> dict[str, int]:
    """The node's agent, bridge and ExaBGP: what runs in its namespace, by program name."""
    found = {}
    for pid in netns.pids(lab.node_ns(node)):
        names = [os.path.basename(arg) for arg in command_line(pid)[:2]]
        kind = next((KINDS[n] for n in names if n in KINDS), None)
        if kind:
            found[kind] = pid
    missing = {"agent", "bridge", "exabgp"} - set(found)
    if missing:
        raise RuntimeError(f"{node}: no {', '.join(sorted(missing))} running in its namespace")
    return found


def exabgp_settings(lab: Lab, node: str) -> str:
    """How the node's ExaBGP runs: its program and reactor speed."""
    pid = node_processes(lab, node)["exabgp"]
    program = next(os.path.basename(a) for a in command_line(pid) if "exabgp" in a)
    env = (lab.node_dir(node) / "exabgp" / ENV_FILE).read_text()
    speed = next((line.split("=", 1)[1].strip() for line in env.splitlines()
                  if line.startswith("speed")), "1.0 (ExaBGP's default)")
    return f"{program}, exabgp.reactor.speed {speed}"


def bird_mesh(count: int, hold_time: int, namespaces: Namespaces, directory: Path
              ) -> list[FabricRouter]:
    """`count` BIRD routers on one bridge, every one peering with every other (eBGP, AS
    65000+i), each announcing 10.240.<i>.0/26; started, not yet established."""
    switch = namespaces.create("birdfabric")
    _ip("-n", switch, "link", "add", "br0", "type", "bridge")
    _ip("-n", switch, "link", "set", "br0", "up")
    names = namespaces.create_many("bird", count)
    addresses = [IPv4Interface(f"{BIRD_FABRIC}.{10 + i}/24") for i in range(1, count + 1)]
    for i, (ns, address) in enumerate(zip(names, addresses), 1):
        _ip("-n", switch, "link", "add", f"b{i}", "type", "veth", "peer", "name", "eth0",
            "netns", ns)
        _ip("-n", switch, "link", "set", f"b{i}", "master", "br0", "up")
        _ip("-n", ns, "addr", "add", str(address), "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
    routers = []
    for i, (ns, address) in enumerate(zip(names, addresses), 1):
        peers = tuple(RouterPeer(f"b{j}", other.ip, 65000 + j, local_address=address.ip,
                                 hold_time=hold_time)
                      for j, other in enumerate(addresses, 1) if j != i)
        spec = RouterSpec(f"b{i}", address.ip, 65000 + i, peers,
                          originate=(IPv4Network(f"10.240.{i}.0/26"),))
        routers.append(make_router("bird", spec, ns, directory / f"bird{i}").start())
    return routers


def bird_established(router) -> bool:
    protocols = router.protocols()  # one birdc call for all its sessions
    return all(protocols[p.name].established for p in router.spec.peers)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


# --------------------------------------------------------------------------------------------
# Measuring

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


def report(nodes: list[str], birds: list[str], windows: list[dict],
           rss: dict[str, dict[str, float]], header: str) -> None:
    print(header)
    width = 12 * len(windows)
    print(f"{'% of one core, mean per node':34}"
          + "".join(f"{f'window {w + 1}':>12}" for w in range(len(windows)))
          + f"{'worst node':>12}{'RSS MiB':>10}")

    def row(label: str, values: list[float], worst: float, memory: float | None) -> None:
        print(f"{label:34}" + "".join(f"{v:12.3f}" for v in values) + f"{worst:12.3f}"
              + (f"{memory:10.1f}" if memory is not None else ""))

    for kind, label in (("agent", "pipit-agent"), ("bridge", "pipit-exabgp-bridge"),
                        ("exabgp", "ExaBGP")):
        row(label, [mean(w[n][kind][0] for n in nodes) for w in windows],
            max(w[n][kind][0] for w in windows for n in nodes),
            mean(rss[n][kind] for n in nodes))
    print(f"{'  ExaBGP reactor turns/s':34}" + "".join(
        f"{mean(w[n]['exabgp'][1] for n in nodes):12.1f}" for w in windows))
    totals = [{n: sum(v[0] for v in w[n].values()) for n in nodes} for w in windows]
    node_total = [mean(t.values()) for t in totals]
    worst_node = max(max(t.values()) for t in totals)
    row("node: agent + bridge + ExaBGP", node_total, worst_node,
        mean(sum(rss[n].values()) for n in nodes))
    bird = [mean(w[b]["bird"][0] for b in birds) for w in windows]
    row("reference: BIRD 2, same sessions", bird,
        max(w[b]["bird"][0] for w in windows for b in birds), mean(rss[b]["bird"] for b in birds))
    print(f"{'ratio node / BIRD':34}" + "".join(
        f"{(f'{t / b:.0f}x' if b > 0 else 'inf'):>12}" for t, b in zip(node_total, bird)))
    print("-" * (34 + width + 22))
    print(f"goal: agent + bridge + ExaBGP <= {GOAL:g} % of a core per node -> "
          f"{'met' if worst_node <= GOAL else 'MISSED'} (mean {min(node_total):.2f}-{max(node_total):.2f} %, "
          f"worst node in any window {worst_node:.2f} %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--pods-per-node", type=int, default=1)
    parser.add_argument("--window", type=float, default=30.0, help="seconds per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="windows, one after the other")
    parser.add_argument("--settle", type=float, default=10.0,
                        help="seconds left alone after convergence before measuring")
    args = parser.parse_args()
    if args.nodes < 2:
        parser.error("--nodes must be at least 2 (a node alone has no session)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the cleanup runs
    with tempfile.TemporaryDirectory(prefix="pipit-bench-") as tmp, \
            Namespaces("pipit-bench-") as namespaces:  # also removes dead benches' leftovers
        tmp = Path(tmp)
        lab = Lab(directory=tmp / "lab", prefix=f"pipit-bench-pid{os.getpid()}-",
                  log=lambda *a: None)
        routers: list[FabricRouter] = []
        try:
            started = time.monotonic()
            if not lab.up(node_count=args.nodes, pods_per_node=args.pods_per_node):
                raise RuntimeError("the lab did not converge (sessions or pings failed)")
            up = time.monotonic() - started
            routers = bird_mesh(args.nodes, lab.hold_time, namespaces, tmp / "birds")
            wait(lambda: all(bird_established(r) for r in routers), 60,
                 "every BIRD session to establish", interval=0.5)
            wait(lambda: all(len(r.routes()) == args.nodes - 1 for r in routers), 60,
                 "every BIRD to learn every other's route", interval=0.5)
            nodes = lab.nodes()
            groups = {n: node_processes(lab, n) for n in nodes}
            birds = [r.spec.name for r in routers]
            groups.update({r.spec.name: {"bird": r.pids()[0]} for r in routers})
            time.sleep(args.settle)
            load = os.getloadavg()[0]
            windows = [measure(groups, args.window) for _ in range(args.repeat)]
            load_after = os.getloadavg()[0]
            rss = {g: {k: rss_mib(pid) for k, pid in kinds.items()} for g, kinds in groups.items()}
            how = exabgp_settings(lab, nodes[0])
        finally:
            for router in routers:
                router.destroy()
            lab.down()
    sessions = args.nodes - 1
    header = (f"idle cost per node: {args.nodes} nodes, full mesh ({sessions} sessions each, "
              f"hold time {lab.hold_time} s), {args.pods_per_node} pod(s) per node; lab up in "
              f"{up:.1f} s\nExaBGP: {how}; {args.repeat} windows of {args.window:g} s after "
              f"{args.settle:g} s idle; load average {load:.1f} before, {load_after:.1f} after")
    report(nodes, birds, windows, rss, header)


if __name__ == "__main__":
    main()
