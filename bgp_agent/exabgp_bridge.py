"""pipit-exabgp-bridge: the process ExaBGP runs (its `process` helper), between ExaBGP's process
API (JSON events on our stdin, text commands on our stdout) and pipit-agent's unix socket.

    pipit-exabgp-bridge --socket /var/run/pipit/exabgp.sock

ExaBGP freezes when a helper stops reading its stdin and exits after five helper deaths in about
a minute, so the bridge reads stdin all the time, never blocks on the agent, keeps trying to
connect to the agent with a short backoff while it is away, and logs and skips anything it
cannot handle. It keeps what ExaBGP told it (sessions, received routes, the announcements
ExaBGP acknowledged) so that an agent that (re)connects gets the whole picture first. (That
picture lives only here: should the bridge itself die, ExaBGP restarts it knowing nothing of
the sessions already up.)

Bridge <-> agent protocol: JSON objects, one per line, over the unix socket (the agent listens,
the bridge connects). Addresses and prefixes are strings.

Bridge to agent, first on every connection:
    {"type": "hello", "protocol": 1, "bridge_pid": 12, "exabgp_pid": 11, "digest": "ab12.."|null}
        digest: the configuration the bridge last saw ExaBGP apply (see exabgp_config)
    {"type": "snapshot-begin"}
    {"type": "peer", ...PeerState...}                      one per known peer
    {"type": "received", "peer": A, "announce": [Path...], "withdraw": []}     in chunks
    {"type": "announced", "neighbor": A, "routes": [Announcement...]}         in chunks
    {"type": "snapshot-end"}
then live, in the order things happen:
    {"type": "peer", "address": A, "state": "up"|"down"|"idle", "since": 1.7e9, "reason": "...",
     "graceful_restart": bool, "restart_time": 120, "router_id": A|null, "end_of_rib": bool,
     "extra": {...}}
        sent when the state, reason or End-of-RIB flag changes; an "up" with a new "since" is a
        new session (drop what the old one sent). On "down" the bridge has already
        dropped the peer's received routes (ExaBGP sends no withdrawals, trap 4); the agent
        drops them too and uses graceful_restart/restart_time (from the last OPEN exchange) to
        decide whether to keep its kernel routes as stale. ExaBGP's "connected" is not reported:
        it repeats every second while a peer refuses (trap 5).
    {"type": "received", "peer": A, "announce": [Path...], "withdraw": [prefix...]}
    {"type": "announced", "neighbor": A, "routes": [Announcement...]}   ExaBGP accepted these
    {"type": "withdrawn", "neighbor": A, "prefixes": [prefix...]}       ExaBGP accepted these
    {"type": "forget", "peer": A}          no longer configured: drop everything about it
    {"type": "done", "id": N, "output": [...]} / {"type": "error", "id": N, "message": "..."}
    {"type": "exabgp-shutdown"}

Agent to bridge (executed one at a time, in order; each answered by done/error with its id):
    {"id": N, "op": "announce", "neighbor": A, "routes": [Announcement...]}
    {"id": N, "op": "withdraw", "neighbor": A, "prefixes": [prefix...]}
    {"id": N, "op": "clear", "neighbor": A}          withdraw everything sent to one neighbour
    {"id": N, "op": "reload", "digest": D, "neighbors": [A...], "timeout": 30}
        reload ExaBGP's configuration and answer only once ExaBGP shows it applied
    {"id": N, "op": "retire", "timeout": 30}
        withdraw everything from every neighbour and answer once the withdrawals left
    {"id": N, "op": "command", "line": "show neighbor summary"}     raw, output in the reply
A Path / Announcement is the model's dataclass as an object, empty and None fields left out.
An error reply still comes after the announced/withdrawn messages for the lines ExaBGP took.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field, fields
from ipaddress import IPv4Address, IPv4Network

from bgp_agent.exabgp_config import DESCRIPTION_PREFIX
from bgp_agent.model import Announcement, Path, PeerState
from bgp_agent.version import software_version

log = logging.getLogger("pipit-exabgp-bridge")

PROTOCOL = 1
BATCH = 1000  # prefixes per ExaBGP command line (ExaBGP's limit is 1 MiB a line)
CHUNK = 1000  # routes per snapshot message
LINE_LIMIT = 64 * 2**20  # longest line either side accepts
AGENT_BUFFER_LIMIT = 64 * 2**20  # an agent this far behind is dropped; it gets a snapshot back
COMMAND_TIMEOUT = 120.0  # ExaBGP acks every command; this only guards against a lost ack


# --------------------------------------------------------------------------------------------
# JSON forms of the model types

def _plain(value):
    if isinstance(value, (IPv4Address, IPv4Network)):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _to_json(obj) -> dict:
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is None or value == () or (f.name == "origin" and value == "igp"):
            continue
        out[f.name] = _plain(value)
    return out


def path_to_json(path: Path) -> dict:
    return _to_json(path)


def path_from_json(d: dict) -> Path:
    return Path(
        prefix=IPv4Network(d["prefix"]), next_hop=IPv4Address(d["next_hop"]),
        as_path=tuple(d.get("as_path", ())), communities=tuple(map(tuple, d.get("communities", ()))),
        local_pref=d.get("local_pref"), med=d.get("med"), origin=d.get("origin", "igp"),
        originator_id=_address(d.get("originator_id")),
        cluster_list=tuple(IPv4Address(a) for a in d.get("cluster_list", ())))


def announcement_to_json(route: Announcement) -> dict:
    return _to_json(route)


def announcement_from_json(d: dict) -> Announcement:
    return Announcement(
        prefix=IPv4Network(d["prefix"]), next_hop=_address(d.get("next_hop")),
        communities=tuple(map(tuple, d.get("communities", ()))), as_path=tuple(d.get("as_path", ())),
        local_pref=d.get("local_pref"), med=d.get("med"),
        originator_id=_address(d.get("originator_id")),
        cluster_list=tuple(IPv4Address(a) for a in d.get("cluster_list", ())),
        large_communities=tuple(map(tuple, d.get("large_communities", ()))))


def peer_to_json(peer: PeerState) -> dict:
    return {"address": str(peer.address), "state": peer.state, "since": peer.since,
            "reason": peer.reason, "graceful_restart": peer.graceful_restart,
            "restart_time": peer.restart_time, "router_id": _plain(peer.router_id),
            "end_of_rib": peer.end_of_rib, "extra": peer.extra}


def peer_from_json(d: dict) -> PeerState:
    return PeerState(address=IPv4Address(d["address"]), state=d["state"], since=d["since"],
                     reason=d["reason"], graceful_restart=d["graceful_restart"],
                     restart_time=d["restart_time"], router_id=_address(d.get("router_id")),
                     end_of_rib=d["end_of_rib"], extra=d.get("extra") or {})


def _address(value) -> IPv4Address | None:
    return None if value is None else IPv4Address(value)


# --------------------------------------------------------------------------------------------
# ExaBGP commands

def _attributes(route: Announcement) -> str:
    words = [f"next-hop {route.next_hop or 'self'}"]
    if route.as_path:  # sent verbatim; empty means ExaBGP's default ([local AS] to eBGP)
        words.append(f"as-path [ {' '.join(map(str, route.as_path))} ]")
    if route.local_pref is not None:
        words.append(f"local-preference {route.local_pref}")
    if route.med is not None:
        words.append(f"med {route.med}")
    if route.communities:
        words.append(f"community [ {' '.join(f'{a}:{b}' for a, b in route.communities)} ]")
    if route.large_communities:
        large = " ".join(":".join(map(str, c)) for c in route.large_communities)
        words.append(f"large-community [ {large} ]")
    if route.originator_id is not None:
        words.append(f"originator-id {route.originator_id}")
    if route.cluster_list:
        words.append(f"cluster-list [ {' '.join(map(str, route.cluster_list))} ]")
    return " ".join(words)


def announce_commands(neighbor: IPv4Address, routes: Iterable[Announcement], batch: int = BATCH
                      ) -> list[tuple[str, list[Announcement]]]:
    """One `announce attributes ... nlri P1 P2 ...` line per attribute set and batch (one line
    per prefix is ten times slower in ExaBGP)."""
    groups: dict[str, list[Announcement]] = {}
    for route in routes:
        groups.setdefault(_attributes(route), []).append(route)
    commands = []
    for attributes, group in groups.items():
        for i in range(0, len(group), batch):
            part = group[i:i + batch]
            nlri = " ".join(str(r.prefix) for r in part)
            commands.append((f"neighbor {neighbor} announce attributes {attributes} nlri {nlri}",
                             part))
    return commands


def withdraw_commands(neighbor: IPv4Address, prefixes: Iterable[IPv4Network], batch: int = BATCH
                      ) -> list[tuple[str, list[IPv4Network]]]:
    prefixes = list(prefixes)
    return [(f"neighbor {neighbor} withdraw attributes nlri "
             + " ".join(str(p) for p in prefixes[i:i + batch]), prefixes[i:i + batch])
            for i in range(0, len(prefixes), batch)]


def parse_configured(output: Iterable[str]) -> dict[IPv4Address, str | None]:
    """`show neighbor configuration` → {neighbour: digest from its pipit description}."""
    found: dict[IPv4Address, str | None] = {}
    current = None
    for line in output:
        head = re.match(r"^neighbor (\d+\.\d+\.\d+\.\d+) \{", line.strip())
        if head:
            current = IPv4Address(head.group(1))
            found[current] = None
            continue
        described = re.match(rf'^description "{DESCRIPTION_PREFIX}([0-9a-f]+)";', line.strip())
        if described and current is not None:
            found[current] = described.group(1)
    return found


# --------------------------------------------------------------------------------------------
# ExaBGP events

@dataclass(frozen=True)
class StateEvent:
    peer: IPv4Address
    state: str
    reason: str
    time: float
    local: dict


@dataclass(frozen=True)
class OpenEvent:
    peer: IPv4Address
    direction: str
    graceful_restart: bool
    restart_time: int
    router_id: IPv4Address | None


@dataclass(frozen=True)
class UpdateEvent:
    peer: IPv4Address
    direction: str
    announce: tuple[Path, ...] = ()
    withdraw: tuple[IPv4Network, ...] = ()
    end_of_rib: bool = False


@dataclass(frozen=True)
class ShutdownEvent:
    pass


Event = StateEvent | OpenEvent | UpdateEvent | ShutdownEvent


def parse_event(event: dict) -> Event | None:
    """One of ExaBGP's JSON event objects → an Event; None for kinds the bridge ignores.
    Raises KeyError/ValueError on malformed input."""
    kind = event.get("type")
    if kind == "notification" and event.get("notification") == "shutdown":
        return ShutdownEvent()
    neighbor = event.get("neighbor")
    if not neighbor:
        return None
    peer = IPv4Address(neighbor["address"]["peer"])
    if kind == "state":
        local = {"local_address": neighbor["address"].get("local"),
                 "local_as": neighbor.get("asn", {}).get("local"),
                 "peer_as": neighbor.get("asn", {}).get("peer"),
                 "local_router_id": neighbor.get("router-id")}
        return StateEvent(peer, neighbor["state"], neighbor.get("reason", ""),
                          float(event.get("time", time.time())), local)
    if kind == "open":
        message = neighbor["open"]
        # received capabilities are keyed by code ("64"), sent ones by name: go by "name"
        restart = [c for c in message.get("capabilities", {}).values()
                   if isinstance(c, dict) and c.get("name") == "graceful restart"]
        return OpenEvent(peer, neighbor.get("direction", ""), bool(restart),
                         int(restart[0].get("time", 0)) if restart else 0,
                         _address(message.get("router_id")))
    if kind == "update":
        message = neighbor["message"]
        direction = neighbor.get("direction", "")
        if "eor" in message:
            return UpdateEvent(peer, direction, end_of_rib=True)
        update = message.get("update", {})
        return UpdateEvent(peer, direction, tuple(_paths(update)), tuple(_withdrawn(update)))
    return None


def _nlri_prefix(item) -> IPv4Network:
    return IPv4Network(item if isinstance(item, str) else item["nlri"])  # api.compact gives strings


def _paths(update: dict) -> Iterator[Path]:
    attributes = update.get("attribute", {})
    as_path: list[int] = []
    for _, segment in sorted(attributes.get("as-path", {}).items(), key=lambda kv: int(kv[0])):
        as_path += segment.get("value", [])  # sets flattened: loop checks only need the ASNs
    common = dict(
        as_path=tuple(as_path),
        communities=tuple(tuple(c) for c in attributes.get("community", ())),
        local_pref=attributes.get("local-preference"), med=attributes.get("med"),
        origin=attributes.get("origin", "igp"),
        originator_id=_address(attributes.get("originator-id")),
        cluster_list=tuple(IPv4Address(a) for a in attributes.get("cluster-list", ())))
    for family, by_next_hop in update.get("announce", {}).items():
        if family != "ipv4 unicast":
            continue
        for next_hop, items in by_next_hop.items():
            for item in items:
                yield Path(prefix=_nlri_prefix(item), next_hop=IPv4Address(next_hop), **common)


def _withdrawn(update: dict) -> Iterator[IPv4Network]:
    for family, items in update.get("withdraw", {}).items():
        if family == "ipv4 unicast":
            yield from (_nlri_prefix(item) for item in items)


# --------------------------------------------------------------------------------------------
# What the bridge knows: pure state, each change returning the messages the agent should get

@dataclass
class BridgeState:
    peers: dict[IPv4Address, PeerState] = field(default_factory=dict)
    received: dict[IPv4Address, dict[IPv4Network, Path]] = field(default_factory=dict)
    announced: dict[IPv4Address, dict[IPv4Network, Announcement]] = field(default_factory=dict)
    configured: set[IPv4Address] | None = None  # None until the agent first says (accept all)
    # The neighbours of a reload being applied: their sessions may come up before the bridge
    # has seen the reload take effect, and those events must not be lost.
    configuring: set[IPv4Address] = field(default_factory=set)
    digest: str | None = None
    sent_graceful_restart: dict[IPv4Address, bool] = field(default_factory=dict)
    received_open: dict[IPv4Address, OpenEvent] = field(default_factory=dict)
    retiring: dict[IPv4Address, set[IPv4Network]] = field(default_factory=dict)

    def on_event(self, event: Event) -> list[dict]:
        if isinstance(event, ShutdownEvent):
            return [{"type": "exabgp-shutdown"}]
        if (self.configured is not None and event.peer not in self.configured
                and event.peer not in self.configuring):
            return []  # e.g. the "down" of a neighbour a reload just removed
        if isinstance(event, StateEvent):
            return self._on_state(event)
        if isinstance(event, OpenEvent):
            if event.direction == "send":
                self.sent_graceful_restart[event.peer] = event.graceful_restart
            else:
                self.received_open[event.peer] = event
            return []
        if event.direction == "send":
            pending = self.retiring.get(event.peer)
            if pending:
                pending.difference_update(event.withdraw)
            return []
        return self._on_received(event)

    def _peer(self, address: IPv4Address) -> PeerState:
        if address not in self.peers:
            self.peers[address] = PeerState(address)
        return self.peers[address]

    def _on_state(self, event: StateEvent) -> list[dict]:
        if event.state not in ("up", "down"):
            return []  # "connected" comes every second while a peer refuses
        peer = self._peer(event.peer)
        before = (peer.state, peer.reason)
        peer.extra = {**peer.extra, **{k: v for k, v in event.local.items() if v is not None}}
        if event.state == "up":
            opened = self.received_open.get(event.peer)
            peer.graceful_restart = bool(opened and opened.graceful_restart
                                         and self.sent_graceful_restart.get(event.peer))
            peer.restart_time = opened.restart_time if opened else 0
            peer.router_id = opened.router_id if opened else None
            peer.state, peer.reason, peer.end_of_rib = "up", "", False
            self.received[event.peer] = {}
        else:
            peer.state, peer.reason = "down", event.reason
            self.received.pop(event.peer, None)  # no withdrawals come (trap 4)
            self.retiring.pop(event.peer, None)
        if event.state == "down" and (peer.state, peer.reason) == before:
            return []  # ExaBGP retries a refusing peer every second: one report is enough
        peer.since = event.time  # a new "since" on "up" tells the agent a new session began
        return [{"type": "peer", **peer_to_json(peer)}]

    def _on_received(self, event: UpdateEvent) -> list[dict]:
        peer = self._peer(event.peer)
        if event.end_of_rib:
            if peer.end_of_rib:
                return []
            peer.end_of_rib = True
            return [{"type": "peer", **peer_to_json(peer)}]
        table = self.received.setdefault(event.peer, {})
        for prefix in event.withdraw:
            table.pop(prefix, None)
        for path in event.announce:
            table[path.prefix] = path
        return [{"type": "received", "peer": str(event.peer),
                 "announce": [path_to_json(p) for p in event.announce],
                 "withdraw": [str(p) for p in event.withdraw]}]

    def record_announced(self, neighbor: IPv4Address, routes: list[Announcement]) -> dict:
        table = self.announced.setdefault(neighbor, {})
        for route in routes:
            table[route.prefix] = route
        return {"type": "announced", "neighbor": str(neighbor),
                "routes": [announcement_to_json(r) for r in routes]}

    def record_withdrawn(self, neighbor: IPv4Address, prefixes: list[IPv4Network]) -> dict:
        table = self.announced.get(neighbor, {})
        for prefix in prefixes:
            table.pop(prefix, None)
        if not table:
            self.announced.pop(neighbor, None)
        return {"type": "withdrawn", "neighbor": str(neighbor), "prefixes": [str(p) for p in prefixes]}

    def set_configured(self, neighbors: set[IPv4Address], digest: str | None) -> list[dict]:
        self.configured, self.digest = set(neighbors), digest
        gone = (set(self.peers) | set(self.announced) | set(self.received)) - self.configured
        for address in gone:
            for table in (self.peers, self.received, self.announced, self.retiring,
                          self.sent_graceful_restart, self.received_open):
                table.pop(address, None)
        return [{"type": "forget", "peer": str(a)} for a in sorted(gone)]

    def snapshot(self, exabgp_pid: int) -> Iterator[dict]:
        yield {"type": "hello", "protocol": PROTOCOL, "bridge_pid": os.getpid(),
               "exabgp_pid": exabgp_pid, "digest": self.digest}
        yield {"type": "snapshot-begin"}
        for peer in self.peers.values():
            yield {"type": "peer", **peer_to_json(peer)}
        for address, table in self.received.items():
            paths = list(table.values())
            for i in range(0, len(paths), CHUNK):
                yield {"type": "received", "peer": str(address), "withdraw": [],
                       "announce": [path_to_json(p) for p in paths[i:i + CHUNK]]}
        for address, table in self.announced.items():
            routes = list(table.values())
            for i in range(0, len(routes), CHUNK):
                yield {"type": "announced", "neighbor": str(address),
                       "routes": [announcement_to_json(r) for r in routes[i:i + CHUNK]]}
        yield {"type": "snapshot-end"}


# --------------------------------------------------------------------------------------------
# I/O

async def read_lines(reader: asyncio.StreamReader, source: str,
                     logger: logging.Logger = log) -> AsyncIterator[bytes]:
    """The lines `reader` gives until EOF; a line longer than LINE_LIMIT (the readers' limit)
    is logged, naming `source`, and skipped."""
    while True:
        try:
            raw = await reader.readline()
        except ValueError:
            logger.error("skipped a line longer than %d bytes from %s", LINE_LIMIT, source)
            continue
        if not raw:
            return
        yield raw


class CommandFailed(Exception):
    pass


class Bridge:
    def __init__(self, socket_path: str):
        self.socket_path = socket_path
        self.state = BridgeState()
        self.agent: asyncio.StreamWriter | None = None
        self.queue: asyncio.Queue[tuple[asyncio.StreamWriter, dict]] = asyncio.Queue()
        self._stdout: asyncio.WriteTransport | None = None
        self._ack: asyncio.Future | None = None  # the one command in flight
        self._output: list[str] = []
        self._retired = asyncio.Event()
        self._retire_armed = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader(limit=LINE_LIMIT)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        self._stdout, _ = await loop.connect_write_pipe(asyncio.Protocol, sys.stdout)
        tasks = [asyncio.create_task(self._agent_loop()), asyncio.create_task(self._worker())]
        try:
            await self._read_exabgp(stdin)  # returns when ExaBGP goes away
        finally:
            for task in tasks:
                task.cancel()

    # --- ExaBGP side -------------------------------------------------------------------------

    async def _read_exabgp(self, stdin: asyncio.StreamReader) -> None:
        async for raw in read_lines(stdin, "ExaBGP"):
            try:
                self._on_exabgp_line(raw.decode(errors="replace").rstrip("\n"))
            except Exception:  # never die on input: ExaBGP gives up after 5 helper deaths
                log.exception("could not handle a line from ExaBGP: %.300s", raw)
        log.info("ExaBGP closed our stdin; exiting")

    def _on_exabgp_line(self, line: str) -> None:
        if line in ("done", "error"):
            if self._ack and not self._ack.done():
                self._ack.set_result((line == "done", self._output))
            else:
                log.warning("ExaBGP answered %r to no command", line)
            self._output = []
            return
        if line.startswith("{") and '"exabgp"' in line[:20]:
            event = parse_event(json.loads(line))
            if event is not None:
                messages = self.state.on_event(event)
                for message in messages:
                    self._send_agent(message)
                if self._retire_armed and not any(self.state.retiring.values()):
                    self._retired.set()
            return
        if self._ack is None:
            log.warning("unexpected line from ExaBGP: %.300s", line)
            return
        self._output.append(line)  # output of the command in flight ("show ...", "reload ...")

    async def command(self, line: str) -> list[str]:
        """Send one command and wait for ExaBGP's done/error: one at a time, because ExaBGP
        answers "reload" and unknown commands before earlier announcements (acks are not FIFO)."""
        self._ack = asyncio.get_running_loop().create_future()
        self._output = []
        self._stdout.write(line.encode() + b"\n")
        try:
            ok, output = await asyncio.wait_for(self._ack, COMMAND_TIMEOUT)
        except asyncio.TimeoutError:
            raise CommandFailed(f"ExaBGP did not answer within {COMMAND_TIMEOUT:g} s: "
                                f"{line[:200]}") from None
        finally:
            self._ack = None
        if not ok:
            raise CommandFailed(f"ExaBGP refused: {line[:200]}" + (f" ({output})" if output else ""))
        return output

    # --- agent side --------------------------------------------------------------------------

    async def _agent_loop(self) -> None:
        backoff = 0.05
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.socket_path,
                                                                    limit=LINE_LIMIT)
            except OSError:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            log.info("connected to the agent at %s", self.socket_path)
            self.agent = writer
            for message in self.state.snapshot(os.getppid()):
                self._send_agent(message)
            try:
                await self._read_agent(reader, writer)
            except ConnectionError:
                pass
            except Exception:
                log.exception("agent connection failed")
            finally:
                if self.agent is writer:
                    self.agent = None
                writer.close()
            log.info("agent went away; reconnecting")

    async def _read_agent(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async for raw in read_lines(reader, "the agent"):
            if writer.is_closing():  # dropped (_send_agent): nothing more from it
                return
            try:
                request = json.loads(raw)
                if not isinstance(request, dict):
                    raise ValueError("not an object")
            except ValueError as error:
                log.error("bad request from the agent (%s): %.300s", error, raw)
                continue
            self.queue.put_nowait((writer, request))

    def _send_agent(self, message: dict) -> None:
        agent = self.agent
        if agent is None or agent.is_closing():
            return
        agent.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
        if agent.transport.get_write_buffer_size() > AGENT_BUFFER_LIMIT:
            log.error("the agent is not reading; dropping it (it gets a snapshot on reconnect)")
            agent.close()
            self.agent = None

    async def _worker(self) -> None:
        while True:
            writer, request = await self.queue.get()
            if writer is not self.agent:
                continue  # from an agent that has gone: its successor decides afresh
            try:
                output = await self._execute(request)
                reply = {"type": "done", "id": request.get("id"), "output": output}
            except Exception as error:
                if not isinstance(error, (CommandFailed, KeyError, ValueError, TypeError)):
                    log.exception("request failed: %.300s", request)
                log.error("%s", error)  # ExaBGP never logs API errors itself
                reply = {"type": "error", "id": request.get("id"), "message": str(error)}
            if writer is self.agent:
                self._send_agent(reply)

    async def _execute(self, request: dict) -> list[str]:
        op = request["op"]
        if op == "announce":
            neighbor = IPv4Address(request["neighbor"])
            routes = [announcement_from_json(r) for r in request["routes"]]
            return await self._each(announce_commands(neighbor, routes),
                                    lambda part: self.state.record_announced(neighbor, part))
        if op == "withdraw":
            neighbor = IPv4Address(request["neighbor"])
            prefixes = [IPv4Network(p) for p in request["prefixes"]]
            return await self._each(withdraw_commands(neighbor, prefixes),
                                    lambda part: self.state.record_withdrawn(neighbor, part))
        if op == "clear":
            neighbor = IPv4Address(request["neighbor"])
            output = await self.command(f"neighbor {neighbor} clear adj-rib out")
            self._send_agent(self.state.record_withdrawn(
                neighbor, list(self.state.announced.get(neighbor, {}))))
            return output
        if op == "reload":
            return await self._reload(request.get("digest"),
                                      {IPv4Address(a) for a in request["neighbors"]},
                                      float(request.get("timeout", 30)))
        if op == "retire":
            return await self._retire(float(request.get("timeout", 30)))
        if op == "command":
            return await self.command(str(request["line"]))
        raise ValueError(f"unknown op {op!r}")

    async def _each(self, commands, record) -> list[str]:
        errors = []
        for line, part in commands:
            try:
                await self.command(line)
            except CommandFailed as error:
                errors.append(str(error))
                continue
            self._send_agent(record(part))
        if errors:
            raise CommandFailed(f"{len(errors)} of {len(commands)} commands failed: "
                                + "; ".join(errors[:3]))
        return []

    async def _reload(self, digest: str | None, neighbors: set[IPv4Address], timeout: float
                      ) -> list[str]:
        """ExaBGP drops a reload (API or SIGUSR1) that arrives while any peer still has routes
        queued to send, with no word: ask again until `show neighbor configuration` shows it."""
        deadline = time.monotonic() + timeout
        pause = 0.02
        self.state.configuring = set(neighbors)
        try:
            while True:
                await self.command("reload")
                configured = parse_configured(await self.command("show neighbor configuration"))
                if set(configured) == neighbors and all(d == digest
                                                        for d in configured.values()):
                    break
                if time.monotonic() > deadline:
                    raise CommandFailed(
                        f"ExaBGP did not apply the configuration within {timeout:g} s (still "
                        f"{sorted(map(str, configured))}); an invalid file is only reported in "
                        "ExaBGP's own log")
                log.info("ExaBGP has not applied the reload yet (routes still queued?); "
                         "asking again")
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.5)
        finally:
            self.state.configuring = set()
        for message in self.state.set_configured(neighbors, digest):
            self._send_agent(message)
        return []

    async def _retire(self, timeout: float) -> list[str]:
        """Withdraw everything and wait until the withdrawals were sent: with graceful restart
        a stopping ExaBGP sends no NOTIFICATION, so peers would keep our routes for minutes."""
        self.state.retiring = {address: set(self.state.announced.get(address, {}))
                               for address, peer in self.state.peers.items() if peer.state == "up"}
        self._retired.clear()
        if not any(self.state.retiring.values()):
            self._retired.set()
        self._retire_armed = True
        try:  # armed before the command: withdrawals may leave before ExaBGP's "done"
            output = await self.command("clear adj-rib out")
            for neighbor in list(self.state.announced):
                self._send_agent(self.state.record_withdrawn(
                    neighbor, list(self.state.announced[neighbor])))
            try:
                await asyncio.wait_for(self._retired.wait(), timeout)
            except asyncio.TimeoutError:
                left = sum(len(p) for p in self.state.retiring.values())
                raise CommandFailed(f"{left} withdrawals still unsent after {timeout:g} s") from None
            return output
        finally:
            self._retire_armed = False
            self.state.retiring = {}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pipit-exabgp-bridge", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version",
                        version=f"pipit-exabgp-bridge {software_version()}")
    parser.add_argument("--socket", required=True, metavar="PATH",
                        help="pipit-agent's unix socket for the bridge")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    # stderr is ExaBGP's: it ends up in ExaBGP's log / the container log
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s pipit-exabgp-bridge %(levelname)s %(message)s")
    try:
        asyncio.run(Bridge(args.socket).run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
