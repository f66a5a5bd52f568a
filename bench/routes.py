"""Kernel route throughput: the agent's RouteTable.sync() against `ip -batch`, measured in
the same run.

    python -m bench.routes [--sizes 10000,100000] [--repeat 3] [--changes 0.02]

Runs as root in a network namespace it creates and always removes. For each size: install
(`route replace`) and remove (`route del ... proto 91`) the same `/26 via <gateway>` routes
with `ip -batch` and with RouteTable.sync() (the agent's one call: a new table's first sync
dumps the kernel, diffs and applies; the removal is a sync to nothing); best of --repeat runs
each. Then at the largest size, with --changes of the routes differing (half new gateways, a
quarter removed, a quarter new prefixes): a resync, sync() on a fresh RouteTable and socket
as after an agent restart (dump + diff + apply), and a pass, sync() on a warm table (diff +
apply, what a routing pass costs). Goals: ≤ 0.8× ip -batch's time (never above 1.0×),
resync ≤ 1 s.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network

from ipip.kernel_routes import KernelRoutes
from ipip.route_table import RouteTable
from ipip.routes import RTPROT_PIPIT, NextHop, Route, diff
from lab.netns import Namespaces

GATEWAY = IPv4Address("192.168.0.2")
OTHER_GATEWAY = IPv4Address("192.168.0.3")
BASE = int(IPv4Address("10.0.0.0"))


def make_routes(count: int, start: int = 0, gateway: IPv4Address = GATEWAY) -> list[Route]:
    hop = (NextHop(gateway),)
    return [Route(IPv4Network((BASE + (start + i) * 64, 26)), hop) for i in range(count)]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


def create_namespace(namespaces: Namespaces) -> str:
    """A namespace with a veth pair, v0 (192.168.0.1/24) and v1, both up; `namespaces` removes
    it, also after a failure here."""
    name = namespaces.create("routes")
    ip("-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    ip("-n", name, "addr", "add", "192.168.0.1/24", "dev", "v0")
    ip("-n", name, "link", "set", "v0", "up")
    ip("-n", name, "link", "set", "v1", "up")
    return name


def timed(action: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def ip_batch(netns: str, lines: list[str]) -> float:
    with tempfile.NamedTemporaryFile("w", prefix="pipit-bench-", suffix=".batch") as batch:
        batch.write("\n".join(lines) + "\n")
        batch.flush()
        seconds, _ = timed(lambda: subprocess.run(["ip", "-n", netns, "-batch", batch.name],
                                                  check=True, stdout=subprocess.DEVNULL))
    return seconds


def count_pipit_routes(netns: str) -> int:
    out = subprocess.run(["ip", "-n", netns, "route", "show", "proto", str(RTPROT_PIPIT)],
                         check=True, capture_output=True, text=True).stdout
    return len(out.splitlines())


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"bench.routes: {what}")


def bench_size(netns: str, kernel: KernelRoutes, count: int, repeat: int) -> dict[str, float]:
    routes = make_routes(count)
    add_lines = [f"route replace {r.dst} via {GATEWAY} proto {RTPROT_PIPIT}" for r in routes]
    del_lines = [f"route del {r.dst} proto {RTPROT_PIPIT}" for r in routes]

    def with_ip() -> tuple[float, float]:
        add_s = ip_batch(netns, add_lines)
        expect(count_pipit_routes(netns) == count, "ip -batch did not install every route")
        del_s = ip_batch(netns, del_lines)
        expect(count_pipit_routes(netns) == 0, "ip -batch did not remove every route")
        return add_s, del_s

    desired = {r.dst: r for r in routes}

    def with_route_table() -> tuple[float, float]:
        table = RouteTable(kernel)
        add_s, stats = timed(lambda: table.sync(desired))
        expect(not stats.errors, f"RouteTable install failed: {stats.errors[:3]}")
        expect(count_pipit_routes(netns) == count, "RouteTable did not install every route")
        del_s, stats = timed(lambda: table.sync({}))
        expect(not stats.errors, f"RouteTable removal failed: {stats.errors[:3]}")
        expect(count_pipit_routes(netns) == 0, "RouteTable did not remove every route")
        return add_s, del_s

    best = dict.fromkeys(("ip add", "ip del", "kr add", "kr del"), float("inf"))
    for run in range(repeat):
        tools = [("ip", with_ip), ("kr", with_route_table)]
        for tool, measure in tools[::-1] if run % 2 else tools:  # alternate who goes first
            add_s, del_s = measure()
            best[f"{tool} add"] = min(best[f"{tool} add"], add_s)
            best[f"{tool} del"] = min(best[f"{tool} del"], del_s)
    return best


def bench_resync(netns: str, kernel: KernelRoutes, count: int, changes: float,
                 repeat: int) -> dict[str, float]:
    """sync() on a fresh RouteTable and socket, as after an agent restart, with `changes` of
    the routes differing from the kernel; plus its dump and diff timed on their own, and the
    same changes as a pass of a warm table."""
    installed = {r.dst: r for r in make_routes(count)}
    step = max(1, round(1 / changes))  # every step-th route changes
    desired = dict(installed)
    for n, route in enumerate(list(installed.values())[::step]):
        if n % 4 < 2:
            desired[route.dst] = Route(route.dst, (NextHop(OTHER_GATEWAY),))
        elif n % 4 == 2:
            del desired[route.dst]
        else:
            new = make_routes(1, start=count + n)[0]
            desired[new.dst] = new

    best = dict.fromkeys(("dump", "diff", "total", "pass"), float("inf"))
    for _ in range(repeat):
        warm = RouteTable(kernel)
        expect(not warm.sync(installed).errors, "RouteTable install failed")
        dump_s, actual = timed(lambda: kernel.dump(reuse=desired.keys()))
        expect(len(actual) == count, f"dump found {len(actual)} routes, expected {count}")
        diff_s, _ = timed(lambda: diff(desired, actual))
        with KernelRoutes(netns) as fresh:
            total_s, stats = timed(lambda: RouteTable(fresh).sync(desired))
        expect(stats.resynced and not stats.errors, f"resync failed: {stats.errors[:3]}")
        expect(diff(desired, kernel.dump()) == ([], []), "kernel differs from desired")
        expect(not RouteTable(kernel).sync(installed).errors, "RouteTable install failed")
        pass_s, changed = timed(lambda: warm.sync(desired))
        expect(not changed.resynced and changed.changes == stats.changes,
               "the warm table's pass did not make the same changes")
        for key, seconds in (("dump", dump_s), ("diff", diff_s), ("total", total_s),
                             ("pass", pass_s)):
            best[key] = min(best[key], seconds)
    ip_show_s = ip_batch(netns, [f"route show proto {RTPROT_PIPIT}"])  # reference for the dump
    RouteTable(kernel).sync({})
    return {**best, "ip show": ip_show_s, "changes": stats.changes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.routes",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated route counts")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; best is kept")
    parser.add_argument("--changes", type=float, default=0.02,
                        help="fraction of the routes changed in the resync")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    if os.geteuid() != 0:
        print("bench.routes needs root (network namespaces)", file=sys.stderr)
        return 1

    # SIGTERM should unwind through the `with` below like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with Namespaces("pipit-bench-") as namespaces:
        netns = create_namespace(namespaces)
        with KernelRoutes(netns) as kernel:
            print(f"{'routes':>8} {'op':<8} {'ip -batch':>10} {'RouteTable':>13}"
                  f" {'ratio':>6} {'routes/s':>9}")
            worst = 0.0
            for count in sizes:
                best = bench_size(netns, kernel, count, args.repeat)
                for op in ("add", "del"):
                    ratio = best[f"kr {op}"] / best[f"ip {op}"]
                    worst = max(worst, ratio)
                    print(f"{count:>8} {op:<8} {best[f'ip {op}']:>9.3f}s {best[f'kr {op}']:>12.3f}s"
                          f" {ratio:>5.2f}× {count / best[f'kr {op}']:>9,.0f}")
            resync = bench_resync(netns, kernel, max(sizes), args.changes, args.repeat)
            print(f"{max(sizes):>8} {'resync':<8} {resync['total']:.3f}s"
                  f" for {resync['changes']:,.0f} changes"
                  f" (dump {resync['dump']:.3f}s, diff {resync['diff']:.3f}s;"
                  f" ip route show proto {RTPROT_PIPIT}: {resync['ip show']:.3f}s)")
            print(f"{max(sizes):>8} {'pass':<8} {resync['pass']:.3f}s"
                  f" for the same changes on a warm table (no dump)")
            print(f"goals: ratio ≤ 0.80× (worst {worst:.2f}×),"
                  f" resync ≤ 1 s ({resync['total']:.3f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
