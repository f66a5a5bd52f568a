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

This is where ExaBGP's words are read and written: its commands, its JSON events and the
wording of its reasons become the fields of bgp_agent.bridge_protocol's messages, which
describe the protocol with the agent.
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
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from ipaddress import IPv4Address, IPv4Network

from bgp_agent import long_lived
from bgp_agent.bridge_protocol import (
    LINE_LIMIT,
    PROTOCOL,
    Announced,
    Forget,
    PeerChanged,
    Received,
    RouteTables,
    StateMessage,
    Withdrawn,
    address_of,
    announcement_from_json,
    encode,
    optional_address,
    prefix_of,
    prefix_text,
    read_lines,
    routes_of,
    same_attributes,
    text_of,
)
from bgp_agent.exabgp_config import DESCRIPTION_PREFIX
from bgp_agent.model import Announcement, Path, PeerState, with_prefix
from bgp_agent.version import software_version

log = logging.getLogger("pipit-exabgp-bridge")

BATCH = 1000  # prefixes per ExaBGP command line (ExaBGP's limit is 1 MiB a line)
AGENT_BUFFER_LIMIT = 64 * 2**20  # an agent this far behind is dropped; it gets a snapshot back
COMMAND_TIMEOUT = 120.0  # ExaBGP acks every command; this only guards against a lost ack
# Announce/withdraw commands written to ExaBGP ahead of its answers: ExaBGP reads them all in
# one turn of its loop and answers them in order, instead of one command per turn (a
# reflector's pass is hundreds of commands, and every turn runs every peer).
PIPELINE = 32
ROUTE_OPS = ("announce", "withdraw", "eor")  # pipelined: ExaBGP takes them in order
# How ExaBGP words a session that ended with a NOTIFICATION (reactor/peer.py); any such end
# rules out graceful restart (RFC 4724).
NOTIFICATION = re.compile(r"notification (sent|received) \(\d+,\d+\)")


# --------------------------------------------------------------------------------------------
# ExaBGP commands

def _attributes(route: Announcement) -> str:
    words = [f"next-hop {route.next_hop or 'self'}"]
    if route.origin != "igp":
        words.append(f"origin {route.origin}")
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
    if route.extended_communities:  # as their octets, whatever their type (RFC 4360)
        extended = " ".join(f"0x{c:016x}" for c in route.extended_communities)
        words.append(f"extended-community [ {extended} ]")
    if route.originator_id is not None:
        words.append(f"originator-id {route.originator_id}")
    if route.cluster_list:
        words.append(f"cluster-list [ {' '.join(map(str, route.cluster_list))} ]")
    return " ".join(words)


def _selector(neighbors: Sequence[IPv4Address]) -> str:
    """ExaBGP's prefix of a command for one or several neighbours."""
    return " , ".join(["neighbor " + text_of(n) for n in neighbors])


def announce_commands(neighbors: Sequence[IPv4Address], routes: Iterable[Announcement],
                      batch: int = BATCH) -> list[tuple[str, list[Announcement]]]:
    """One `announce attributes ... nlri P1 P2 ...` line per attribute set and batch, for all
    `neighbors` at once (one line per prefix, or per neighbour, is many times slower in
    ExaBGP)."""
    groups: dict[str, list[Announcement]] = {}
    previous, text = None, ""
    for route in routes:
        if previous is None or not same_attributes(route, previous):
            previous, text = route, _attributes(route)
        groups.setdefault(text, []).append(route)
    commands = []
    target = _selector(neighbors)
    for attributes, group in groups.items():
        for i in range(0, len(group), batch):
            part = group[i:i + batch]
            nlri = " ".join([prefix_text(r.prefix) for r in part])
            commands.append((f"{target} announce attributes {attributes} nlri {nlri}", part))
    return commands


def withdraw_commands(neighbors: Sequence[IPv4Address], prefixes: Iterable[IPv4Network],
                      batch: int = BATCH) -> list[tuple[str, list[IPv4Network]]]:
    prefixes = list(prefixes)
    target = _selector(neighbors)
    return [(f"{target} withdraw attributes nlri "
             + " ".join(map(prefix_text, prefixes[i:i + batch])), prefixes[i:i + batch])
            for i in range(0, len(prefixes), batch)]


def end_of_rib_command(neighbor: IPv4Address) -> str:
    """End-of-RIB for IPv4 unicast (ExaBGP runs with manual-eor: it goes out after our table,
    so a peer keeping our routes through a graceful restart never flushes them early)."""
    return f"neighbor {neighbor} announce eor ipv4 unicast"


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
        described = re.match(rf'^description "{DESCRIPTION_PREFIX}([0-9a-f]+)[^"]*";',
                             line.strip())
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
                         optional_address(message.get("router_id")))
    if kind == "update":
        message = neighbor["message"]
        direction = neighbor.get("direction", "")
        if "eor" in message:
            return UpdateEvent(peer, direction, end_of_rib=True)
        update = message.get("update", {})
        return UpdateEvent(peer, direction, tuple(_paths(update)), tuple(_withdrawn(update)))
    return None


def _nlri_prefix(item) -> IPv4Network:
    return prefix_of(item if isinstance(item, str) else item["nlri"])  # api.compact gives strings


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
        originator_id=optional_address(attributes.get("originator-id")),
        cluster_list=tuple(map(address_of, attributes.get("cluster-list", ()))),
        large_communities=tuple(tuple(c) for c in attributes.get("large-community", ())),
        extended_communities=tuple(c["value"] for c in attributes.get("extended-community",
                                                                      ())))
    for family, by_next_hop in update.get("announce", {}).items():
        if family != "ipv4 unicast":
            continue
        for next_hop, items in by_next_hop.items():
            template = None
            for item in items:
                if template is None:
                    template = Path(prefix=_nlri_prefix(item), next_hop=address_of(next_hop),
                                    **common)
                    yield template
                else:
                    yield with_prefix(template, _nlri_prefix(item))


def _withdrawn(update: dict) -> Iterator[IPv4Network]:
    for family, items in update.get("withdraw", {}).items():
        if family == "ipv4 unicast":
            yield from (_nlri_prefix(item) for item in items)


# --------------------------------------------------------------------------------------------
# What the bridge knows: its tables, changed only through the state messages it sends

@dataclass
class BridgeState:
    tables: RouteTables = field(default_factory=RouteTables)
    configured: set[IPv4Address] | None = None  # None until the agent first says (accept all)
    # The neighbours of a reload being applied: their sessions may come up before the bridge
    # has seen the reload take effect, and those events must not be lost.
    configuring: set[IPv4Address] = field(default_factory=set)
    digest: str | None = None
    sent_graceful_restart: dict[IPv4Address, bool] = field(default_factory=dict)
    received_open: dict[IPv4Address, OpenEvent] = field(default_factory=dict)
    retiring: dict[IPv4Address, set[IPv4Network]] = field(default_factory=dict)

    def _send(self, message: StateMessage) -> dict:
        """Apply `message` here and give its JSON form for the agent, which applies it too."""
        self.tables.apply(message)
        return encode(message)

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

    def _on_state(self, event: StateEvent) -> list[dict]:
        if event.state not in ("up", "down"):
            return []  # "connected" comes every second while a peer refuses
        peer = self.tables.peers.get(event.peer) or PeerState(event.peer)
        extra = {**peer.extra, **{k: v for k, v in event.local.items() if v is not None}}
        if event.state == "up":
            opened = self.received_open.get(event.peer)
            peer = replace(
                peer, state="up", reason="", notification=False, end_of_rib=False, extra=extra,
                graceful_restart=bool(opened and opened.graceful_restart
                                      and self.sent_graceful_restart.get(event.peer)),
                restart_time=opened.restart_time if opened else 0,
                router_id=opened.router_id if opened else None)
        else:
            self.retiring.pop(event.peer, None)
            if (peer.state, peer.reason) == ("down", event.reason):
                return []  # ExaBGP retries a refusing peer every second: one report is enough
            peer = replace(peer, state="down", reason=event.reason, extra=extra,
                           notification=bool(NOTIFICATION.search(event.reason)))
        # a new "since" on "up" tells the agent a new session began
        return [self._send(PeerChanged(replace(peer, since=event.time)))]

    def _on_received(self, event: UpdateEvent) -> list[dict]:
        if event.end_of_rib:
            peer = self.tables.peers.get(event.peer) or PeerState(event.peer)
            if peer.end_of_rib:
                return []
            return [self._send(PeerChanged(replace(peer, end_of_rib=True)))]
        return [self._send(Received(event.peer, event.announce, event.withdraw))]

    def record_announced(self, neighbors: Sequence[IPv4Address],
                         routes: list[Announcement]) -> dict:
        return self._send(Announced(tuple(neighbors), tuple(routes)))

    def record_withdrawn(self, neighbors: Sequence[IPv4Address],
                         prefixes: list[IPv4Network]) -> dict:
        return self._send(Withdrawn(tuple(neighbors), tuple(prefixes)))

    def set_configured(self, neighbors: set[IPv4Address], digest: str | None) -> list[dict]:
        self.configured, self.digest = set(neighbors), digest
        tables = self.tables
        gone = (set(tables.peers) | set(tables.announced) | set(tables.received)) - self.configured
        for address in gone:
            for table in (self.retiring, self.sent_graceful_restart, self.received_open):
                table.pop(address, None)
        return [self._send(Forget(a)) for a in sorted(gone)]

    def snapshot(self, exabgp_pid: int) -> Iterator[dict]:
        yield {"type": "hello", "protocol": PROTOCOL, "bridge_pid": os.getpid(),
               "exabgp_pid": exabgp_pid, "digest": self.digest}
        yield {"type": "snapshot-begin"}
        yield from map(encode, self.tables.snapshot())
        yield {"type": "snapshot-end"}


# --------------------------------------------------------------------------------------------
# I/O

class CommandFailed(Exception):
    pass


class Bridge:
    def __init__(self, socket_path: str):
        self.socket_path = socket_path
        self.state = BridgeState()
        self.agent: asyncio.StreamWriter | None = None
        self.queue: asyncio.Queue[tuple[asyncio.StreamWriter, dict]] = asyncio.Queue()
        self._held: tuple[asyncio.StreamWriter, dict] | None = None  # taken, run next
        self._arrived = asyncio.Event()  # a request was queued
        self._stdout: asyncio.WriteTransport | None = None
        # the commands in flight, oldest first: ExaBGP answers announcements in order; a
        # future whose caller gave up stays until its answer comes, so answers stay matched
        self._acks: deque[asyncio.Future] = deque()
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
            ack = self._acks.popleft() if self._acks else None
            if ack is None:
                log.warning("ExaBGP answered %r to no command", line)
            elif not ack.done():
                ack.set_result((line == "done", self._output))
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
        if not self._acks:
            log.warning("unexpected line from ExaBGP: %.300s", line)
            return
        self._output.append(line)  # output of the command in flight ("show ...", "reload ...")

    async def command(self, line: str) -> list[str]:
        """Send one command and wait for ExaBGP's done/error. Other than announcements
        (`_pipelined`), one at a time: ExaBGP answers "reload" and unknown commands before earlier
        announcements (acks are not FIFO)."""
        return await self._answer(self._send(line), line)

    def _send(self, line: str) -> asyncio.Future:
        ack = asyncio.get_running_loop().create_future()
        if not self._acks:
            self._output = []
        self._acks.append(ack)
        self._stdout.write(line.encode() + b"\n")
        return ack

    @staticmethod
    async def _answer(ack: asyncio.Future, line: str) -> list[str]:
        try:
            ok, output = await asyncio.wait_for(asyncio.shield(ack), COMMAND_TIMEOUT)
        except asyncio.TimeoutError:
            ack.cancel()  # stays in line for its answer, if one ever comes
            raise CommandFailed(f"ExaBGP did not answer within {COMMAND_TIMEOUT:g} s: "
                                f"{line[:200]}") from None
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
            self._arrived.set()

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
            if self._held is not None:  # taken from the queue by _route_requests, next
                (writer, request), self._held = self._held, None
            else:
                writer, request = await self.queue.get()
            if writer is not self.agent:
                continue  # from an agent that has gone: its successor decides afresh
            if request.get("op") in ROUTE_OPS:  # with those queued behind it, pipelined
                await self._route_requests(writer, request)
                continue
            try:
                output = await self._execute(request)
                reply = {"type": "done", "id": request.get("id"), "output": output}
            except Exception as error:
                reply = self._error_reply(request, error)
            if writer is self.agent:
                self._send_agent(reply)

    @staticmethod
    def _error_reply(request: dict, error: Exception) -> dict:
        if not isinstance(error, (CommandFailed, KeyError, ValueError, TypeError)):
            log.exception("request failed: %.300s", request)
        log.error("%s", error)  # ExaBGP never logs API errors itself
        return {"type": "error", "id": request.get("id"), "message": str(error)}

    async def _route_requests(self, writer: asyncio.StreamWriter, first: dict) -> None:
        """Route requests (ROUTE_OPS): `first`, then those queued behind it as they come (up
        to another kind of request, left in `_held`), their commands pipelined (ExaBGP answers
        them in order); each is answered once its own commands are."""
        left: dict[int, int] = {}  # id(request) -> its commands not yet answered
        errors: dict[int, list[str]] = {}

        def take(request: dict) -> list[tuple[str, Callable[[], dict | None], dict]]:
            try:
                commands = self._route_commands(request)
            except (KeyError, ValueError, TypeError) as error:
                self._send_agent(self._error_reply(request, error))
                return []
            if not commands:
                self._send_agent(self._route_reply(request, []))
                return []
            left[id(request)], errors[id(request)] = len(commands), []
            return [(line, record, request) for line, record in commands]

        def more() -> list[tuple[str, Callable[[], dict | None], dict]]:
            while self._held is None and not self.queue.empty():
                queued = self.queue.get_nowait()
                if queued[0] is not self.agent:
                    continue  # from an agent that has gone
                if queued[0] is not writer or queued[1].get("op") not in ROUTE_OPS:
                    self._held = queued  # after these
                    break
                lines = take(queued[1])
                if lines:
                    return lines
            return []

        def settled(request: dict, failure: str | None) -> None:
            if failure is not None:
                errors[id(request)].append(failure)
            left[id(request)] -= 1
            if left[id(request)] == 0:
                del left[id(request)]
                failures = errors.pop(id(request))
                if writer is self.agent:
                    self._send_agent(self._route_reply(request, failures))
        await self._pipelined(take(first), settled, more)

    def _route_reply(self, request: dict, errors: list[str]) -> dict:
        if not errors:
            return {"type": "done", "id": request.get("id"), "output": []}
        return self._error_reply(request, CommandFailed(
            f"{len(errors)} commands failed: " + "; ".join(errors[:3])))

    def _route_commands(self, request: dict) -> list[tuple[str, Callable[[], dict | None]]]:
        """An announce, withdraw or End-of-RIB request's ExaBGP commands, each with what
        makes its state message (if any) once ExaBGP took it."""
        if request["op"] == "eor":  # after the routes before it: ExaBGP sends it once
            neighbor = address_of(request["neighbor"])  # those queued for the peer are out
            return [(end_of_rib_command(neighbor), lambda: None)]
        neighbors = [address_of(a) for a in request["neighbors"]]
        if request["op"] == "announce":
            routes = routes_of(request, "routes", announcement_from_json)
            return [(line, partial(self.state.record_announced, neighbors, part))
                    for line, part in announce_commands(neighbors, routes)]
        prefixes = [prefix_of(p) for p in request["prefixes"]]
        return [(line, partial(self.state.record_withdrawn, neighbors, part))
                for line, part in withdraw_commands(neighbors, prefixes)]

    async def _execute(self, request: dict) -> list[str]:
        """Any request but those of ROUTE_OPS (`_route_requests`)."""
        op = request["op"]
        if op == "clear":
            neighbor = IPv4Address(request["neighbor"])
            output = await self.command(f"neighbor {neighbor} clear adj-rib out")
            self._send_agent(self.state.record_withdrawn(
                [neighbor], list(self.state.tables.announced.get(neighbor, {}))))
            return output
        if op == "reload":
            return await self._reload(request.get("digest"),
                                      {IPv4Address(a) for a in request["neighbors"]},
                                      float(request.get("timeout", 30)),
                                      {IPv4Address(a) for a in request.get("renewed", ())})
        if op == "retire":
            return await self._retire(float(request.get("timeout", 30)))
        if op == "command":
            return await self.command(str(request["line"]))
        raise ValueError(f"unknown op {op!r}")

    async def _pipelined(self, lines: list[tuple[str, Callable[[], dict | None], object]],
                         settled: Callable[[object, str | None], None],
                         more: Callable[[], list] | None = None) -> None:
        """Send route commands (ROUTE_OPS), up to PIPELINE before the oldest is answered; for
        each one ExaBGP took, its state message `record()` goes to the agent, in order; then
        `settled(tag, None)`, or `settled(tag, why)` for one it refused. Once `lines` are
        written, `more()` gives the next ones (none: none yet), asked again after each answer
        until none are in flight."""
        in_flight: deque[tuple[asyncio.Future, str, Callable[[], dict | None], object]] = deque()
        pending = deque(lines)

        async def settle_oldest() -> None:
            ack, line, record, tag = in_flight.popleft()
            try:
                await self._answer(ack, line)
            except CommandFailed as error:
                settled(tag, str(error))
                return
            message = record()
            if message is not None:  # (End-of-RIB: nothing to tell the agent's tables)
                self._send_agent(message)
            settled(tag, None)
        while True:
            room = len(in_flight) < PIPELINE
            if not pending and more is not None and room:
                self._arrived.clear()
                pending.extend(more())
            if pending and room:
                line, record, tag = pending.popleft()
                in_flight.append((self._send(line), line, record, tag))
            elif not in_flight:
                return
            elif more is not None and room and self._held is None and not in_flight[0][0].done():
                await self._answer_or_request(in_flight[0][0])  # whichever comes first
            else:
                await settle_oldest()

    async def _answer_or_request(self, ack: asyncio.Future) -> None:
        """Until ExaBGP answers `ack` or the agent queues a request (at most COMMAND_TIMEOUT;
        the answer's own wait has its timeout too)."""
        arrival = asyncio.ensure_future(self._arrived.wait())
        try:
            await asyncio.wait([ack, arrival], timeout=COMMAND_TIMEOUT,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            arrival.cancel()

    async def _reload(self, digest: str | None, neighbors: set[IPv4Address], timeout: float,
                      renewed: set[IPv4Address] = frozenset()) -> list[str]:
        """ExaBGP drops a reload (API or SIGUSR1) that arrives while any peer still has routes
        queued to send, with no word: ask again until `show neighbor configuration` shows it.
        A `renewed` neighbour is a new peer inside ExaBGP once it has: what the old one was
        sent (routes announced after the agent cleared it, before the reload) went with it,
        and is reported withdrawn, so that the agent announces it again."""
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
        for neighbor in sorted(renewed & neighbors):
            lost = list(self.state.tables.announced.get(neighbor, {}))
            if lost:
                self._send_agent(self.state.record_withdrawn([neighbor], lost))
        return []

    async def _retire(self, timeout: float) -> list[str]:
        """Withdraw this node's own routes and wait until the withdrawals were sent: with
        graceful restart a stopping ExaBGP sends no NOTIFICATION, so peers would keep them for
        minutes. Routes a reflector reflects (next hop not self) stay: its clients keep them
        through graceful restart while the other reflectors carry them (Calico #9259: a
        reflector's shutdown withdrawing them cut clusters off)."""
        tables = self.state.tables
        own = {address: [p for p, a in table.items() if a.next_hop is None]
               for address, table in tables.announced.items()}
        reflects = any(a.next_hop is not None for t in tables.announced.values()
                       for a in t.values())
        self.state.retiring = {address: set(own.get(address, ()))
                               for address, peer in tables.peers.items() if peer.state == "up"}
        self._retired.clear()
        if not any(self.state.retiring.values()):
            self._retired.set()
        self._retire_armed = True
        try:  # armed before the command: withdrawals may leave before ExaBGP's "done"
            if not reflects:  # all of it is ours: one command
                output = await self.command("clear adj-rib out")
                for neighbor in list(tables.announced):
                    self._send_agent(self.state.record_withdrawn(
                        [neighbor], list(tables.announced[neighbor])))
            else:  # ours only, one command per group of neighbours with the same routes
                groups: dict[tuple[IPv4Network, ...], list[IPv4Address]] = {}
                for neighbor, prefixes in own.items():
                    if prefixes:
                        groups.setdefault(tuple(sorted(prefixes)), []).append(neighbor)
                errors: list[str] = []
                await self._pipelined(
                    [(line, partial(self.state.record_withdrawn, neighbors, part), None)
                     for prefixes, neighbors in groups.items()
                     for line, part in withdraw_commands(neighbors, prefixes)],
                    lambda _, failure: errors.append(failure) if failure else None)
                if errors:
                    raise CommandFailed(f"{len(errors)} commands failed: "
                                        + "; ".join(errors[:3]))
                output = []
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
    long_lived.freeze()  # its modules and classes, out of the garbage collector's walks
    try:
        asyncio.run(Bridge(args.socket).run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
