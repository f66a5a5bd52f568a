"""A real BIRD 2 instance for tests, the lab and the top-of-rack: its own configuration, control
socket, pid file and log in a private directory, optionally inside a network namespace, with
small parsers for the `birdc` output the tests look at (protocol state and since-time, routes
with next hop and AS path).

    with Bird("tor", bgp_config(...), netns="pipit-t-1234-tor") as bird:
        wait(lambda: bird.protocol("node1").established)
        bird.routes(protocol="node1")
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from lab.process import stop_group, wait
from lab.routers import RouterRoute, RouterSpec

BIRD = shutil.which("bird") or "/usr/sbin/bird"
BIRDC = shutil.which("birdc") or "/usr/sbin/birdc"


@dataclass(frozen=True, eq=False)
class BirdTime:
    """A time as BIRD prints it (`timeformat ... iso long ms`). BIRD keeps times on its
    monotonic clock and turns them into wall-clock time when it prints them, from two clock
    readings, so one instant can print a millisecond apart from one `birdc` call to the next:
    times within JITTER are the same instant. (A session reset or a re-sent route moves its
    time by far more.)"""
    JITTER = 0.005
    text: str

    @property
    def seconds(self) -> float:
        return datetime.fromisoformat(self.text).timestamp()

    def __eq__(self, other) -> bool:
        if not isinstance(other, BirdTime):
            return NotImplemented
        return abs(self.seconds - other.seconds) <= self.JITTER

    def __gt__(self, other: BirdTime) -> bool:
        return self.seconds - other.seconds > self.JITTER

    __hash__ = None  # equality within a tolerance cannot hash

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class BirdPeer:
    """One `protocol bgp` block."""
    name: str
    address: IPv4Address
    peer_as: int
    password: str | None = None
    hold_time: int = 90
    graceful_restart: bool = True
    passive: bool = False
    export: str = "all"  # a BIRD filter expression: all | none | where ...
    import_: str = "all"
    local_port: int = 179  # where BIRD listens for (and connects from) this session
    rr_cluster_id: IPv4Address | None = None  # as a route reflector: this peer is its client


@dataclass(frozen=True)
class ProtocolInfo:
    name: str
    proto: str
    state: str  # up | down | start ...
    since: BirdTime  # when the protocol last changed state
    info: str  # Established | Active | Connect ...

    @property
    def established(self) -> bool:
        return self.state == "up" and self.info.startswith("Established")


@dataclass(frozen=True)
class BirdRoute:
    prefix: IPv4Network
    via: IPv4Address | None
    protocol: str
    since: BirdTime | None = None  # when BIRD got this route (a withdrawn and re-sent one is newer)
    as_path: tuple[int, ...] = ()
    communities: tuple[tuple[int, int], ...] = ()
    large_communities: tuple[tuple[int, int, int], ...] = ()
    # as BIRD shows them: (rt, 64512, 7), (ro, ...), (generic, 0x43000000, 0x0)...
    extended_communities: tuple[tuple[str, str, str], ...] = ()


def bgp_config(router_id: IPv4Address, local_address: IPv4Address, local_as: int,
               peers: Iterable[BirdPeer], static_routes: Iterable[IPv4Network] = (),
               log_path: Path | None = None, static_attributes: str = "") -> str:
    """A BIRD 2 configuration: static routes (blackholes) exported to BGP peers, each with
    `static_attributes` (BIRD statements such as `bgp_large_community.add((1, 2, 3));`),
    everything received kept in BIRD's table only (no kernel protocol: the namespace's table
    is left alone)."""
    lines = [f"router id {router_id};", "timeformat protocol iso long ms;",
             "timeformat route iso long ms;"]
    if log_path:
        lines.append(f'log "{log_path}" all;')
    lines += ["protocol device {}", "protocol static originated {", "  ipv4;"]
    attributes = f" {{ {static_attributes} }}" if static_attributes else ""
    lines += [f"  route {prefix} blackhole{attributes};" for prefix in static_routes]
    lines.append("}")
    for peer in peers:
        lines += [
            f"protocol bgp {peer.name} {{",
            f"  local {local_address}{'' if peer.local_port == 179 else f' port {peer.local_port}'}"
            f" as {local_as};",
            f"  neighbor {peer.address} as {peer.peer_as};",
            f"  hold time {peer.hold_time};",
            # lab timers: a refused or collided attempt is retried in seconds, not minutes
            "  connect retry time 5;", "  error wait time 1, 10;",
            f"  graceful restart {'on' if peer.graceful_restart else 'off'};",
            "  direct;",  # iBGP: next hops on the shared link, no recursive lookup
        ]
        if peer.password:
            lines.append(f'  password "{peer.password}";')
        if peer.passive:
            lines.append("  passive on;")
        if peer.rr_cluster_id is not None:
            lines += ["  rr client;", f"  rr cluster id {peer.rr_cluster_id};"]
        lines += [f"  ipv4 {{ import {_filter(peer.import_)}; export {_filter(peer.export)}; }};",
                  "}"]
    return "\n".join(lines) + "\n"


def _filter(expression: str) -> str:
    return expression if expression in ("all", "none") or expression.startswith("where") \
        else f"filter {expression}"


def parse_protocols(text: str) -> dict[str, ProtocolInfo]:
    """`birdc show protocols` → by name. Columns: Name Proto Table State Since Info, where
    Since may hold a space (iso long: date and time)."""
    found = {}
    for line in text.splitlines():
        match = re.match(r"^(\S+)\s+(\S+)\s+(\S+)\s+(up|down|start|stop|flush)\s+"
                         r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?|\S+)\s*(.*)$", line)
        if match:
            name, proto, _table, state, since, info = match.groups()
            found[name] = ProtocolInfo(name, proto, state, BirdTime(since), info.strip())
    return found


def parse_routes(text: str) -> dict[IPv4Network, BirdRoute]:
    """`birdc show route all ...` → best route per prefix (the first listed)."""
    routes: dict[IPv4Network, BirdRoute] = {}
    current: dict | None = None

    def flush():
        if current and current["prefix"] not in routes:
            routes[current["prefix"]] = BirdRoute(**current)

    prefix = None
    for line in text.splitlines():
        # "10.1.0.0/26  unicast [node1 2026-01-01 10:00:00.123 from 10.0.0.2] * (100) [AS65001i]"
        # or, for an alternative route to the same prefix, the same without the prefix
        head = re.match(r"^(?P<prefix>\d+\.\d+\.\d+\.\d+/\d+)?\s+(?:\w+\s+)?"
                        r"\[(?P<proto>\S+) (?P<since>[^\]]*?)(?: from [^\]]*)?\]", line)
        if head:
            flush()
            if head.group("prefix"):
                prefix = IPv4Network(head.group("prefix"))
            current = {"prefix": prefix, "via": None, "protocol": head.group("proto"),
                       "since": BirdTime(head.group("since"))}
            continue
        if current is None:
            continue
        via = re.match(r"^\s+via (\d+\.\d+\.\d+\.\d+)", line)
        if via:
            current["via"] = IPv4Address(via.group(1))
        as_path = re.match(r"^\s+BGP\.as_path:(.*)$", line)
        if as_path:
            current["as_path"] = tuple(int(a) for a in re.findall(r"\d+", as_path.group(1)))
        community = re.match(r"^\s+BGP\.community:(.*)$", line)
        if community:
            current["communities"] = tuple(
                (int(a), int(b)) for a, b in re.findall(r"\((\d+),\s*(\d+)\)", community.group(1)))
        large = re.match(r"^\s+BGP\.large_community:(.*)$", line)
        if large:
            current["large_communities"] = tuple(
                tuple(map(int, c)) for c in re.findall(r"\((\d+),\s*(\d+),\s*(\d+)\)",
                                                       large.group(1)))
        extended = re.match(r"^\s+BGP\.ext_community:(.*)$", line)
        if extended:
            current["extended_communities"] = tuple(
                re.findall(r"\((\w+),\s*([\w.:]+),\s*([\w.:]+)\)", extended.group(1)))
    flush()
    return routes


@dataclass
class Bird:
    name: str
    config: str
    netns: str | None = None
    directory: Path | None = None
    process: subprocess.Popen | None = None
    _own_dir: bool = field(default=False, repr=False)

    @property
    def socket(self) -> Path:
        return self.directory / "bird.ctl"

    @property
    def config_path(self) -> Path:
        return self.directory / "bird.conf"

    @property
    def log_path(self) -> Path:
        return self.directory / "bird.log"

    def _in_netns(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def start(self, timeout: float = 10.0) -> Bird:
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix=f"pipit-bird-{self.name}-"))
            self._own_dir = True
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config)
        output = open(self.directory / "bird.out", "ab")
        self.process = subprocess.Popen(
            self._in_netns([BIRD, "-f", "-c", str(self.config_path), "-s", str(self.socket),
                            "-P", str(self.directory / "bird.pid")]),
            stdout=output, stderr=output, start_new_session=True)
        output.close()
        wait(self._answers, timeout, "BIRD to answer on its control socket")
        return self

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"bird {self.name} exited with {self.process.returncode}; see "
                               f"{self.directory / 'bird.out'}")
        return self.socket.exists() and subprocess.run(
            [BIRDC, "-s", str(self.socket), "show", "status"], capture_output=True).returncode == 0

    def birdc(self, *command: str) -> str:
        result = subprocess.run([BIRDC, "-s", str(self.socket), *command],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"birdc {' '.join(command)}: {result.stderr or result.stdout}")
        return result.stdout

    def configure(self, config: str) -> None:
        """Switch to a new configuration (BIRD keeps sessions whose protocol did not change)."""
        self.config = config
        self.config_path.write_text(config)
        output = self.birdc("configure")
        if "Reconfigured" not in output and "Reconfiguration in progress" not in output:
            raise RuntimeError(f"bird {self.name} refused the configuration: {output}")

    def protocols(self) -> dict[str, ProtocolInfo]:
        return parse_protocols(self.birdc("show", "protocols"))

    def protocol(self, name: str) -> ProtocolInfo:
        return self.protocols()[name]

    def routes(self, protocol: str | None = None, export: str | None = None
               ) -> dict[IPv4Network, BirdRoute]:
        """Routes BIRD learnt from `protocol`, or would send to `export` (all by default)."""
        selector = ["protocol", protocol] if protocol else ["export", export] if export else []
        return parse_routes(self.birdc("show", "route", *selector, "all"))

    def route_count(self, protocol: str) -> int:
        """Cheap for large tables: BIRD counts, nothing is parsed per route."""
        output = self.birdc("show", "route", "protocol", protocol, "count")
        match = re.search(r"(\d+) of \d+ routes|(\d+) routes", output)
        return int(match.group(1) or match.group(2)) if match else 0

    def route_stats(self, protocol: str) -> dict[str, dict[str, int]]:
        """The channel's "Route change stats" from `show protocols all`, e.g.
        stats["Import withdraws"]["received"]; counted since the protocol last started."""
        output = self.birdc("show", "protocols", "all", protocol)
        columns, stats = [], {}
        for line in output.splitlines():
            if "Route change stats:" in line:
                columns = line.split(":", 1)[1].split()
                continue
            match = re.match(r"^\s+(Import updates|Import withdraws|Export updates|"
                             r"Export withdraws):\s+(.*)$", line)
            if match and columns:
                values = match.group(2).split()
                stats[match.group(1)] = {c: int(v) for c, v in zip(columns, values) if v.isdigit()}
        return stats

    def stop(self) -> None:
        stop_group(self.process)
        self.process = None

    def destroy(self) -> None:
        self.stop()
        if self._own_dir and self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Bird:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.destroy()


# --------------------------------------------------------------------------------------------
# BIRD as a top-of-rack router (lab.routers interface)

def tor_config(spec: RouterSpec, log_path: Path | None = None) -> str:
    """A router: its own routes (blackholes) announced to every peer, everything learned
    passed on to every other peer and, with spec.kernel, into the namespace's kernel table."""
    lines = [f"router id {spec.router_id};", "timeformat protocol iso long ms;",
             "timeformat route iso long ms;"]
    if log_path:
        lines.append(f'log "{log_path}" all;')
    lines += ["protocol device {}", "protocol static originated {", "  ipv4;"]
    lines += [f"  route {prefix} blackhole;" for prefix in spec.originate]
    lines.append("}")
    if spec.kernel:
        lines += ["protocol kernel {", "  ipv4 { import none; export where source = RTS_BGP; };",
                  "}"]
    for peer in spec.peers:
        local = f"local {peer.local_address} " if peer.local_address else "local "
        lines += [
            f"protocol bgp {peer.name} {{",
            f"  {local}as {spec.local_as};",
            f"  neighbor {peer.address} as {peer.peer_as};",
            f"  hold time {peer.hold_time};",
            # lab timers: a refused or collided attempt is retried in seconds, not minutes
            "  connect retry time 5;", "  error wait time 1, 10;",
            f"  graceful restart {'on' if peer.graceful_restart else 'off'};",
            "  connect delay time 1;",  # a restarted peer is tried again soon
            "  error wait time 1, 5;",  # (default 60-300 s of refusing everything after an error)
        ]
        if peer.password:
            lines.append(f'  password "{peer.password}";')
        if peer.ttl_security:
            lines.append("  ttl security on;")  # sends 255, accepts 255 (one hop)
        lines += ["  ipv4 { import all; export all; };", "}"]
    return "\n".join(lines) + "\n"


class BirdRouter(Bird):
    def __init__(self, spec: RouterSpec, netns: str | None, directory: Path):
        super().__init__(spec.name, "", netns=netns, directory=Path(directory))
        self.spec = spec
        self.config = tor_config(spec, self.log_path)

    def start(self, timeout: float = 20.0) -> BirdRouter:
        super().start(timeout)
        return self

    def _protocol_of(self, address: IPv4Address) -> str:
        for peer in self.spec.peers:
            if peer.address == IPv4Address(address):
                return peer.name
        raise KeyError(f"{address} is not a peer of {self.name}")

    def established(self, address: IPv4Address) -> bool:
        info = self.protocols().get(self._protocol_of(address))
        return bool(info and info.established)

    def routes(self) -> dict[IPv4Network, RouterRoute]:
        names = {p.name: p.address for p in self.spec.peers}
        return {prefix: RouterRoute(prefix, r.via, r.as_path, r.communities, names[r.protocol])
                for prefix, r in self.routes_of().items() if r.protocol in names}

    def routes_of(self, protocol: str | None = None) -> dict[IPv4Network, BirdRoute]:
        return Bird.routes(self, protocol=protocol)

    def originate(self, prefixes: Iterable[IPv4Network]) -> None:
        self.spec = replace(self.spec, originate=tuple(prefixes))
        self.configure(tor_config(self.spec, self.log_path))

    def change_peers(self, addresses: Iterable[IPv4Address], **changes) -> None:
        """Change the sessions with these peers (RouterPeer fields: ttl_security, peer_as...);
        BIRD restarts those that changed."""
        addresses = set(addresses)
        self.spec = replace(self.spec, peers=tuple(
            replace(p, **changes) if p.address in addresses else p for p in self.spec.peers))
        self.configure(tor_config(self.spec, self.log_path))

    def pids(self) -> list[int]:
        return [self.process.pid] if self.process and self.process.poll() is None else []
