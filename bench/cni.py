"""Pod ADD latency through the real ptp plugin: pipit-ipam against host-local, same run.

    python -m bench.cni [--pods 50] [--rounds 3] [--burst 100] [--python PATH]

Runs as root. Starts a private etcd, a pipit-agent (--no-bgp) and a node network namespace
`pipit-bench-pid<pid>-node-1` with pod namespaces beside it; removes all of it on exit, also on
error, Ctrl-C or SIGTERM. Every ADD and DEL goes through lab.cni's runtime: `ip netns exec
NODE ptp` with the configuration on stdin, ptp delegating to the IPAM plugin.

- latency: --rounds × --pods sequential ADDs per IPAM plugin, the plugins taking turns pod by
  pod (so drift hits all alike); then the DELs. p50 / p99 per plugin. The plugins: host-local,
  pipit-ipam as installed (the native front) and pipit-ipam-python (the Python plugin alone).
- burst: --burst ADDs started at once (one thread each), total time until the last one
  answered; then as many DELs at once. host-local is measured the same way.
- where the time goes: the pieces of one pipit-ipam ADD measured alone (process start of
  `ip netns exec`, of ptp, of the plugin's interpreter; the plugin's own ADD; the agent's
  answer on its socket).

Goals: ADD p50 ≤ 30 ms, p99 ≤ 100 ms, within 2× of host-local; a burst of 100 ≤ 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ipam.store import EtcdConfig
from ipam.cni import ask_agent
from ipam.cni_install import PYTHON_PLUGIN
from lab.agent import AgentProcess
from lab.cni import Attachment, CNIRuntime, NetworkConfig, install_bin_dir
from lab.etcd import EtcdServer
from lab.netns import Namespaces, path_of
from tests.helpers import add_pool, with_store

NODE = "bench-node"
GOAL_P50, GOAL_P99, GOAL_RATIO, GOAL_BURST = 0.030, 0.100, 2.0, 1.0


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def median_of(action: Callable[[], object], count: int = 30) -> float:
    return statistics.median(timed(action) for _ in range(count))


class Bench:
    def __init__(self, work: Path, ns: Namespaces, agent: AgentProcess, python: str | None):
        self.work, self.ns, self.agent = work, ns, agent
        self.node = ns.create("node")
        self.runtime = CNIRuntime(install_bin_dir(work / "bin", python=python), netns=self.node)
        self.nets = {
            "host-local": NetworkConfig.load({
                "cniVersion": "1.0.0", "name": "bench-host-local", "type": "ptp",
                "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.97.0.0/16"}]],
                         "dataDir": str(work / "host-local")}}),
            "pipit-ipam": NetworkConfig.load({
                "cniVersion": "1.0.0", "name": "bench-pipit", "type": "ptp",
                "ipam": {"type": "pipit-ipam", "socket": str(agent.socket_path)}}),
            # the Python plugin alone (what the native front falls back to)
            PYTHON_PLUGIN: NetworkConfig.load({
                "cniVersion": "1.0.0", "name": "bench-pipit-python", "type": "ptp",
                "ipam": {"type": PYTHON_PLUGIN, "socket": str(agent.socket_path)}}),
        }
        self.counter = 0

    def pods(self, count: int) -> list[Attachment]:
        names = self.ns.create_many("pod", count)
        self.counter += count
        return [Attachment(f"bench-{self.counter}-{i}", path_of(n)) for i, n in enumerate(names)]

    def latency(self, pods: int, rounds: int) -> dict[str, dict[str, list[float]]]:
        samples = {name: {"ADD": [], "DEL": []} for name in self.nets}
        sets = {name: self.pods(pods) for name in self.nets}
        for _ in range(rounds):
            for op in ("ADD", "DEL"):
                for i in range(pods):
                    for name, net in self.nets.items():
                        pod = sets[name][i]
                        call = self.runtime.add if op == "ADD" else self.runtime.delete
                        samples[name][op].append(timed(lambda: call(net, pod)))
        for names in sets.values():
            self.ns.remove(*(os.path.basename(p.netns) for p in names))
        return samples

    def burst(self, name: str, count: int) -> tuple[float, float]:
        net, pods = self.nets[name], self.pods(count)
        try:
            with ThreadPoolExecutor(count) as pool:
                start = time.perf_counter()
                list(pool.map(lambda pod: self.runtime.add(net, pod), pods))
                added = time.perf_counter() - start
                start = time.perf_counter()
                list(pool.map(lambda pod: self.runtime.delete(net, pod), pods))
                deleted = time.perf_counter() - start
        finally:
            self.ns.remove(*(os.path.basename(p.netns) for p in pods))
        return added, deleted

    def breakdown(self) -> list[tuple[str, float]]:
        """The pieces of one ADD through ptp with pipit-ipam, each measured on its own."""
        pod = self.pods(1)[0]
        net = self.nets["pipit-ipam"]
        conf = self.runtime.plugin_config(net, net.plugins[0], pod)
        plugin = self.runtime.find("pipit-ipam")
        python_plugin = self.runtime.find(PYTHON_PLUGIN)
        interpreter = open(python_plugin).readline()[2:].split()
        env = self.runtime.environment("ADD", pod)
        stdin = json.dumps(conf).encode()
        handle = f"bench-pipit.{pod.container_id}.eth0"
        socket = str(self.agent.socket_path)
        ask_agent(socket, {"command": "ADD", "handle": handle})

        def run(argv, **kw):
            subprocess.run(argv, capture_output=True, **kw)
        rows = [
            ("`ip netns exec NODE true`", median_of(lambda: run(["ip", "netns", "exec",
                                                                 self.node, "true"]))),
            ("ptp VERSION (Go binary start)", median_of(lambda: run(
                [self.runtime.find("ptp")], env={"CNI_COMMAND": "VERSION"}))),
            (f"{interpreter[0]} -IS -c pass (plugin's interpreter)",
             median_of(lambda: run([*interpreter, "-c", "pass"]))),
            (f"{PYTHON_PLUGIN} VERSION (start + imports)", median_of(lambda: run(
                [python_plugin], env={"CNI_COMMAND": "VERSION"}))),
            (f"{PYTHON_PLUGIN} ADD, repeated (whole plugin run)",
             median_of(lambda: run([python_plugin], input=stdin, env=env))),
            ("pipit-ipam (native front) ADD, repeated (whole plugin run)",
             median_of(lambda: run([plugin], input=stdin, env=env))),
            ("agent ADD on its socket, repeated (reuse)", median_of(lambda: ask_agent(
                socket, {"command": "ADD", "handle": handle}))),
            ("agent ADD+DEL on its socket (new address)", median_of(lambda: (
                ask_agent(socket, {"command": "ADD", "handle": handle + "x"}),
                ask_agent(socket, {"command": "DEL", "handle": handle + "x"})))),
        ]
        ask_agent(socket, {"command": "DEL", "handle": handle})
        self.ns.remove(os.path.basename(pod.netns))
        return rows


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.1f} ms"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=50, help="pods per round and plugin")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--burst", type=int, default=100, help="concurrent ADDs")
    parser.add_argument("--python", metavar="PATH",
                        help="interpreter for pipit-ipam (same X.Y; default: this one)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.cni needs root (network namespaces)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="pipit-bench-"))
    (work / "etcd").mkdir()
    try:
        with EtcdServer(data_dir=work / "etcd") as etcd, Namespaces("pipit-bench-") as ns:
            with_store(EtcdConfig(endpoints=(etcd.endpoint,)),
                       lambda store: add_pool(store, "bench", "10.96.0.0/16", blockSize=26))
            with AgentProcess(NODE, work / "agent.sock", etcd.endpoint, work / "agent.log",
                              log_level="WARNING") as agent:
                bench = Bench(work, ns, agent, args.python)
                bench.latency(10, 1)  # warm-up: page cache, first block claims
                samples = bench.latency(args.pods, args.rounds)
                bursts = {name: bench.burst(name, args.burst) for name in bench.nets}
                pieces = bench.breakdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = args.pods * args.rounds
    print(f"ptp ADD / DEL latency, {n} pods per IPAM plugin (through `ip netns exec NODE ptp`):")
    print(f"  {'IPAM':<17} {'op':<4} {'p50':>10} {'p99':>10} {'max':>10}")
    for name, ops in samples.items():
        for op, values in ops.items():
            print(f"  {name:<17} {op:<4} {ms(percentile(values, 50)):>10} "
                  f"{ms(percentile(values, 99)):>10} {ms(max(values)):>10}")
    p50 = {k: percentile(v["ADD"], 50) for k, v in samples.items()}
    p99 = {k: percentile(v["ADD"], 99) for k, v in samples.items()}
    ratio = p50["pipit-ipam"] / p50["host-local"]
    for name in (n for n in samples if n != "host-local"):
        print(f"  ratio {name} / host-local: ADD p50 {p50[name] / p50['host-local']:.2f}×,"
              f" p99 {p99[name] / p99['host-local']:.2f}×")
    print(f"burst of {args.burst} concurrent ADDs (then DELs), total time:")
    for name, (added, deleted) in bursts.items():
        print(f"  {name:<17} ADD {added:6.3f} s   DEL {deleted:6.3f} s")
    for name in (n for n in bursts if n != "host-local"):
        print(f"  ratio {name} / host-local: ADD "
              f"{bursts[name][0] / bursts['host-local'][0]:.2f}×")
    print("where one pipit-ipam ADD's time goes (medians, each piece alone):")
    for label, seconds in pieces:
        print(f"  {label:<66} {ms(seconds)}")
    burst = bursts["pipit-ipam"][0]
    print(f"goals: p50 ≤ 30 ms ({ms(p50['pipit-ipam']).strip()}: "
          f"{verdict(p50['pipit-ipam'] <= GOAL_P50)}), "
          f"p99 ≤ 100 ms ({ms(p99['pipit-ipam']).strip()}: "
          f"{verdict(p99['pipit-ipam'] <= GOAL_P99)}), "
          f"≤ 2× host-local ({ratio:.2f}×: {verdict(ratio <= GOAL_RATIO)}), "
          f"burst of {args.burst} ≤ 1 s ({burst:.3f} s: {verdict(burst <= GOAL_BURST)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
