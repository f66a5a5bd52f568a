"""A real GoBGP 3 router for the lab and the tests (lab.routers interface).

    gobgpd -f gobgpd.toml --api-hosts 127.0.0.1:PORT --pprof-disable   (inside its namespace)

driven with the `gobgp` CLI through that API port, which lives on the namespace's own
loopback. GoBGP installs routes into the kernel only through FRR's zebra, and GoBGP 3.10
crashes on FRR 8.4's zebra messages (a slice-bounds panic decoding an interface update), so
the lab copies GoBGP's best routes into the namespace's kernel itself: `fib-sync`, a small
loop beside gobgpd (`python -m lab.gobgp fib-sync --port PORT`), routes with protocol 186
("bgp" in iproute2's names).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from lab.process import stop_group, wait
from lab.routers import RouterRoute, RouterSpec

ROOT = Path(__file__).resolve().parent.parent
API_PORT = 50051
RTPROT_BGP = 186
ESTABLISHED = 6  # apipb.PeerState.SessionState


def gobgp_config(spec: RouterSpec) -> str:
    lines = ["[global.config]", f"  as = {spec.local_as}", f'  router-id = "{spec.router_id}"',
             "  port = 179", ""]
    for peer in spec.peers:
        keepalive = max(1, peer.hold_time // 3)
        lines += ["[[neighbors]]", "  [neighbors.config]",
                  f'    neighbor-address = "{peer.address}"', f"    peer-as = {peer.peer_as}"]
        if peer.password:
            lines.append(f'    auth-password = "{peer.password}"')
        lines += ["  [neighbors.timers.config]", f"    hold-time = {peer.hold_time}",
                  f"    keepalive-interval = {keepalive}", "    connect-retry = 1"]
        if peer.local_address:
            lines += ["  [neighbors.transport.config]",
                      f'    local-address = "{peer.local_address}"']
        if peer.graceful_restart:
            lines += ["  [neighbors.graceful-restart.config]", "    enabled = true",
                      "    helper-only = true"]
        lines += ["  [[neighbors.afi-safis]]", "    [neighbors.afi-safis.config]",
                  '      afi-safi-name = "ipv4-unicast"']
        if peer.graceful_restart:
            lines += ["    [neighbors.afi-safis.mp-graceful-restart.config]",
                      "      enabled = true"]
        lines.append("")
    return "\n".join(lines)


def _exec_prefix(netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


def gobgp(netns: str | None, port: int, *args: str) -> str:
    result = subprocess.run([*_exec_prefix(netns), "gobgp", "-p", str(port), *args],
                            capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"gobgp {' '.join(args)}: {result.stderr or result.stdout}")
    return result.stdout


def best_routes(rib: dict) -> dict[IPv4Network, RouterRoute]:
    """`gobgp -j global rib` → the best path of every prefix learned from a neighbour."""
    found = {}
    for prefix, paths in rib.items():
        best = next((p for p in paths if p.get("best")), None)
        if best is None or not best.get("neighbor-ip"):
            continue
        next_hop, as_path, communities = None, (), ()
        for attr in best.get("attrs", []):
            if attr.get("type") == 3:
                next_hop = IPv4Address(attr["nexthop"])
            elif attr.get("type") == 2:
                as_path = tuple(a for segment in attr.get("as_paths", [])
                                for a in segment.get("asns", []))
            elif attr.get("type") == 8:
                communities = tuple((c >> 16, c & 0xFFFF) for c in attr.get("communities", []))
        found[IPv4Network(prefix)] = RouterRoute(IPv4Network(prefix), next_hop, as_path,
                                                 communities, IPv4Address(best["neighbor-ip"]))
    return found


class GoBGPRouter:
    def __init__(self, spec: RouterSpec, netns: str | None, directory: Path,
                 port: int = API_PORT):
        self.spec = spec
        self.netns = netns
        self.directory = Path(directory)
        self.port = port
        self.process: subprocess.Popen | None = None
        self.fib: subprocess.Popen | None = None

    @property
    def config_path(self) -> Path:
        return self.directory / "gobgpd.toml"

    def cli(self, *args: str) -> str:
        return gobgp(self.netns, self.port, *args)

    def start(self, timeout: float = 20.0) -> GoBGPRouter:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(gobgp_config(self.spec))
        with open(self.directory / "gobgpd.log", "ab") as output:
            self.process = subprocess.Popen(
                [*_exec_prefix(self.netns), "gobgpd", "-f", str(self.config_path),
                 "--api-hosts", f"127.0.0.1:{self.port}", "--pprof-disable"],
                stdout=output, stderr=output, stdin=subprocess.DEVNULL, start_new_session=True)
        wait(self._answers, timeout, f"gobgpd {self.spec.name} to answer")
        for prefix in self.spec.originate:
            self.cli("global", "rib", "add", "-a", "ipv4", str(prefix))
        if self.spec.kernel:
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            with open(self.directory / "fib-sync.log", "ab") as output:
                self.fib = subprocess.Popen(
                    [*_exec_prefix(self.netns), sys.executable, "-m", "lab.gobgp", "fib-sync",
                     "--port", str(self.port)], stdout=output, stderr=output,
                    stdin=subprocess.DEVNULL, start_new_session=True, env=env, cwd=ROOT)
        return self

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"gobgpd {self.spec.name} exited with {self.process.returncode};"
                               f" see {self.directory / 'gobgpd.log'}")
        try:
            self.cli("global")
            return True
        except RuntimeError:
            return False

    def neighbors(self) -> dict[IPv4Address, dict]:
        return {IPv4Address(n["state"]["neighbor_address"]): n["state"]
                for n in json.loads(self.cli("-j", "neighbor") or "[]")}

    def established(self, address: IPv4Address) -> bool:
        state = self.neighbors().get(IPv4Address(address), {})
        return state.get("session_state") in (ESTABLISHED, "established", "ESTABLISHED")

    def routes(self) -> dict[IPv4Network, RouterRoute]:
        return best_routes(json.loads(self.cli("-j", "global", "rib", "-a", "ipv4") or "{}"))

    def originate(self, prefixes: Iterable[IPv4Network]) -> None:
        prefixes = tuple(prefixes)
        for prefix in self.spec.originate:
            if prefix not in prefixes:
                self.cli("global", "rib", "del", "-a", "ipv4", str(prefix))
        for prefix in prefixes:
            if prefix not in self.spec.originate:
                self.cli("global", "rib", "add", "-a", "ipv4", str(prefix))
        self.spec = replace(self.spec, originate=prefixes)

    def pids(self) -> list[int]:
        return [p.pid for p in (self.process, self.fib) if p is not None and p.poll() is None]

    def stop(self) -> None:
        for process in (self.fib, self.process):
            stop_group(process)
        self.process = self.fib = None

    def destroy(self) -> None:
        self.stop()

    def __enter__(self) -> GoBGPRouter:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.destroy()


# --------------------------------------------------------------------------------------------
# fib-sync: GoBGP's best routes into this namespace's kernel

def kernel_routes() -> dict[IPv4Network, IPv4Address | None]:
    out = subprocess.run(["ip", "-j", "-4", "route", "show", "proto", str(RTPROT_BGP)],
                         capture_output=True, text=True, check=True).stdout
    found = {}
    for route in json.loads(out or "[]"):
        dst = "0.0.0.0/0" if route["dst"] == "default" else route["dst"]
        found[IPv4Network(dst)] = IPv4Address(route["gateway"]) if route.get("gateway") else None
    return found


def sync_once(port: int) -> None:
    wanted = {p: r.next_hop for p, r in best_routes(json.loads(
        gobgp(None, port, "-j", "global", "rib", "-a", "ipv4") or "{}")).items() if r.next_hop}
    have = kernel_routes()
    commands = [f"route replace {p} via {hop} proto {RTPROT_BGP}"
                for p, hop in wanted.items() if have.get(p) != hop]
    commands += [f"route del {p} proto {RTPROT_BGP}" for p in have if p not in wanted]
    if commands:
        subprocess.run(["ip", "-force", "-batch", "-"], input="\n".join(commands) + "\n",
                       capture_output=True, text=True)


def fib_sync(port: int, interval: float) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        try:
            sync_once(port)
        except (RuntimeError, ValueError, subprocess.SubprocessError) as error:
            print(f"fib-sync: {error}", file=sys.stderr, flush=True)
        time.sleep(interval)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lab.gobgp")
    sub = parser.add_subparsers(dest="command", required=True)
    sync = sub.add_parser("fib-sync", help="copy GoBGP's best routes into the kernel, forever")
    sync.add_argument("--port", type=int, default=API_PORT)
    sync.add_argument("--interval", type=float, default=0.2)
    args = parser.parse_args(argv)
    fib_sync(args.port, args.interval)


if __name__ == "__main__":
    main()
