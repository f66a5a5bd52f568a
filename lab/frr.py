"""A real FRR 8 router (zebra + bgpd) for the lab and the tests (lab.routers interface).

FRR's libraries hard-code /var/tmp/frr and the daemons' sockets live in /var/run/frr, so each
instance runs in a private mount namespace (`unshare -m`) inside its network namespace, with
its own directories bind-mounted over those two (`<dir>/run` on /var/run/frr: configuration,
pid files, sockets; `<dir>/vartmp` on /var/tmp: logs); vtysh reaches it by entering the same
namespaces (`nsenter -t <bgpd pid> -m -n`). zebra installs bgpd's best routes into the
namespace's kernel table.

The daemons drop to the `frr` user and find their files through those mounts only: the
directory around them may be private to root (pytest's temporary directories are).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
from collections.abc import Iterable
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from lab.process import alive, kill, stop_group, wait
from lab.routers import RouterRoute, RouterSpec

FRR_DIR = Path("/usr/lib/frr")


def frr_config(spec: RouterSpec, log_path: Path) -> str:
    lines = ["frr defaults traditional", f"hostname {spec.name}", f"log file {log_path}", "!",
             f"router bgp {spec.local_as}",
             f" bgp router-id {spec.router_id}",
             " no bgp ebgp-requires-policy",  # FRR 8 sends nothing to eBGP peers without one
             " no bgp network import-check",  # announce `network`s without a route in the RIB
             " bgp graceful-restart"]
    for peer in spec.peers:
        lines.append(f" neighbor {peer.address} remote-as {peer.peer_as}")
        keepalive = max(1, peer.hold_time // 3)
        lines.append(f" neighbor {peer.address} timers {keepalive} {peer.hold_time}")
        lines.append(f" neighbor {peer.address} timers connect 1")
        if peer.local_address:
            lines.append(f" neighbor {peer.address} update-source {peer.local_address}")
        if peer.password:
            lines.append(f" neighbor {peer.address} password {peer.password}")
        if not peer.graceful_restart:
            lines.append(f" neighbor {peer.address} graceful-restart-disable")
    lines += [" address-family ipv4 unicast"]
    lines += [f"  network {prefix}" for prefix in spec.originate]
    lines += [" exit-address-family", "exit", "!"]
    return "\n".join(lines) + "\n"


class FrrRouter:
    def __init__(self, spec: RouterSpec, netns: str | None, directory: Path):
        self.spec = spec
        self.netns = netns
        self.directory = Path(directory)
        self.process: subprocess.Popen | None = None

    @property
    def config_path(self) -> Path:
        return self.directory / "run" / "frr.conf"

    @property
    def log_path(self) -> Path:
        return self.directory / "vartmp" / "frr.log"

    def _pid(self, daemon: str) -> int | None:
        try:
            return int((self.directory / "run" / f"{daemon}.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def start(self, timeout: float = 20.0) -> FrrRouter:
        for sub in ("run", "vartmp"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(self.directory / sub, 0o777)  # the daemons run as the frr user
        # paths as the daemons see them, inside their mount namespace
        self.config_path.write_text(frr_config(self.spec, Path("/var/tmp/frr.log")))
        os.chmod(self.config_path, 0o644)
        d = shlex.quote(str(self.directory))
        bgpd_no_kernel = "" if self.spec.kernel else " -n"  # -n: install nothing in the kernel
        script = (
            f"mount --bind {d}/vartmp /var/tmp && mkdir -p /var/tmp/frr && "
            f"mount --bind {d}/run /var/run/frr && "
            f"{FRR_DIR}/zebra -f /var/run/frr/frr.conf -i /var/run/frr/zebra.pid -P 0 "
            "--log file:/var/tmp/zebra.log & "
            f"exec {FRR_DIR}/bgpd -f /var/run/frr/frr.conf -i /var/run/frr/bgpd.pid -P 0 "
            f"--log file:/var/tmp/bgpd.log{bgpd_no_kernel}")
        argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        with open(self.directory / "frr.out", "ab") as output:
            self.process = subprocess.Popen(argv, stdout=output, stderr=output,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        wait(self._answers, timeout, f"FRR {self.spec.name} to answer vtysh")
        return self

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"FRR {self.spec.name} exited with {self.process.returncode}; "
                               f"see {self.directory / 'frr.out'}")
        if self._pid("bgpd") is None or self._pid("zebra") is None:
            return False
        return (self.vtysh("show bgp summary", check=False).returncode == 0
                and f"router bgp {self.spec.local_as}" in self.vtysh("show running-config",
                                                                     check=False).stdout)

    def vtysh(self, *commands: str, check: bool = True) -> subprocess.CompletedProcess:
        pid = self._pid("bgpd")
        argv = ["nsenter", "-t", str(pid), "-m", "-n", "vtysh"]
        for command in commands:
            argv += ["-c", command]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if check and (result.returncode != 0 or "% " in result.stdout):
            raise RuntimeError(f"vtysh {commands}: {result.stdout}{result.stderr}")
        return result

    def show(self, command: str) -> dict:
        return json.loads(self.vtysh(command).stdout or "{}")

    def established(self, address: IPv4Address) -> bool:
        peers = self.show("show bgp ipv4 unicast summary json").get("peers", {})
        return peers.get(str(address), {}).get("state") == "Established"

    def routes(self) -> dict[IPv4Network, RouterRoute]:
        table = self.show("show bgp ipv4 unicast json").get("routes", {})
        found = {}
        for prefix, paths in table.items():
            best = next((p for p in paths if p.get("bestpath")), None)
            if best is None or best.get("peerId") in (None, "(unspec)"):
                continue  # not learned over BGP (our own `network`)
            hops = [h.get("ip") for h in best.get("nexthops", []) if h.get("ip")]
            as_path = tuple(int(a) for a in str(best.get("path", "")).split() if a.isdigit())
            found[IPv4Network(prefix)] = RouterRoute(
                IPv4Network(prefix), IPv4Address(hops[0]) if hops else None, as_path,
                peer=IPv4Address(best["peerId"]))
        return found

    def originate(self, prefixes: Iterable[IPv4Network]) -> None:
        prefixes = tuple(prefixes)
        commands = ["configure terminal", f"router bgp {self.spec.local_as}",
                    "address-family ipv4 unicast"]
        commands += [f"no network {p}" for p in self.spec.originate if p not in prefixes]
        commands += [f"network {p}" for p in prefixes if p not in self.spec.originate]
        self.vtysh(*commands)
        self.spec = replace(self.spec, originate=prefixes)

    def pids(self) -> list[int]:
        return [p for p in (self._pid("bgpd"), self._pid("zebra")) if p]

    def stop(self) -> None:
        for pid in self.pids():  # reaches zebra even if bgpd, its group's leader, is gone
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        stop_group(self.process)  # the group (a second SIGTERM is harmless), SIGKILL after 10 s
        for pid in self.pids():  # zebra is no child of ours
            try:
                wait(lambda pid=pid: not alive(pid), 10, "FRR to exit")
            except TimeoutError:
                kill(pid)
        self.process = None

    def destroy(self) -> None:
        self.stop()

    def __enter__(self) -> FrrRouter:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.destroy()
