"""The agent's BGP speaker: ExaBGP, driven through pipit-exabgp-bridge over a unix socket. It
implements bgp_agent.model.Speaker, the interface the routing loop uses.

The agent listens on `socket_path`; the bridge (ExaBGP's process helper) connects, sends a
snapshot of everything ExaBGP told it, then live events (bgp_agent.bridge_protocol). The
bridge, not the agent, is ExaBGP's child, so a killed agent leaves the sessions, ExaBGP's
Adj-RIB-Out and the bridge's picture of them alone; the next agent gets it all back.

Two ways to run ExaBGP, both with the files the speaker writes into `state_dir`:

- spawn: bgp_agent.exabgp_process looks after ExaBGP (starts, adopts, restarts, stops it).
- sidecar: someone else runs ExaBGP, e.g. a second container of the pod sharing `state_dir` and
  the socket's directory, from the same image (it needs pipit-exabgp-bridge), with
  `exabgp_process.exabgp_command(state_dir)`. start() writes both files, the configuration
  with no neighbour until set_neighbors says otherwise; changes are applied with the API's
  reload.

A neighbour change is applied with ExaBGP's reload, which keeps every session whose
definition did not change. The bridge confirms each reload took effect (ExaBGP silently drops
one that arrives while routes are still queued for a peer).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence, Set
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from bgp_agent import bridge_protocol
from bgp_agent.bridge_protocol import (
    LINE_LIMIT,
    RouteTables,
    announcement_to_json,
    groups_to_json,
    prefix_text,
    read_lines,
    text_of,
)
from bgp_agent.exabgp_config import digest_of, environment_file, exabgp_environment, render
from bgp_agent.exabgp_process import CONFIG_FILE, ENV_FILE, ExaBGPProcess, tool
from bgp_agent.model import Announcement, Neighbor, Path as BGPPath, PeerState, SpeakerError
from ipam.local_socket import start_private_server

log = logging.getLogger("pipit-agent.speaker")

REQUEST_ROUTES = 5000  # routes per request to the bridge (it batches them for ExaBGP)


class SpeakerUnavailable(SpeakerError, ConnectionError):
    """The bridge is not connected (ExaBGP down or still starting)."""


def _answered(reply: dict) -> dict:
    if reply["type"] == "error":
        raise SpeakerError(reply.get("message", "failed"))
    return reply


async def _all_answered(replies: list[asyncio.Future]) -> None:
    """Once every reply is in: the first error raised, if any."""
    results = await asyncio.gather(*replies, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
        _answered(result)


def _exabgp_key(local_address, local_as, peer_as, router_id) -> tuple[str, ...]:
    """What names a neighbour inside ExaBGP: change any of it and ExaBGP makes a new peer,
    with an empty Adj-RIB-Out, rather than updating the old one."""
    return tuple(str(v) for v in (local_address, local_as, peer_as, router_id))


class ExaBGPSpeaker:
    def __init__(self, state_dir: Path, socket_path: Path, mode: str,
                 router_id: IPv4Address, local_address: IPv4Address, local_as: int,
                 exabgp_env_extra: dict | None = None, *, netns: str | None = None,
                 bridge_command: list[str] | None = None,
                 on_change: Callable[[], None] | None = None, reflector: bool = False):
        if mode not in ("spawn", "sidecar"):
            raise ValueError(f"mode must be 'spawn' or 'sidecar', not {mode!r}")
        self.state_dir = Path(state_dir)
        self.socket_path = Path(socket_path)
        self.mode = mode
        self.router_id = IPv4Address(router_id)
        self.local_address = IPv4Address(local_address)
        self.local_as = local_as
        self.env = exabgp_environment(exabgp_env_extra, reflector=reflector)
        self.netns = netns  # spawn ExaBGP inside this network namespace (lab, tests)
        self.bridge_command = bridge_command or [
            tool("pipit-exabgp-bridge"), "--socket", str(self.socket_path.absolute())]
        self.on_change = on_change

        # state, as of the last event from the bridge
        self.connected = False
        self.tables = RouteTables()
        self.changed = asyncio.Event()  # set on every change; whoever waits on it clears it
        self.exabgp_pid: int | None = None  # ExaBGP's pid as the bridge reports it

        self._neighbors: dict[IPv4Address, Neighbor] | None = None  # desired, once known
        self._config_text: str | None = None
        self._bridge_digest: str | None = None  # the configuration the bridge saw applied
        self._bridge_protocol = bridge_protocol.PROTOCOL  # as its hello says
        self._server: asyncio.AbstractServer | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._staging: RouteTables | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._config_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False  # stop() called: the bridge going away is expected
        self.process = ExaBGPProcess(self.state_dir, netns) if mode == "spawn" else None

    # --- what the routing loop reads (bgp_agent.model.Speaker) --------------------------------

    @property
    def peers(self) -> Mapping[IPv4Address, PeerState]:
        return self.tables.peers

    @property
    def received(self) -> Mapping[IPv4Address, Mapping[IPv4Network, BGPPath]]:
        return self.tables.received

    @property
    def announced(self) -> Mapping[IPv4Address, Mapping[IPv4Network, Announcement]]:
        return self.tables.announced

    @property
    def own(self) -> Mapping[IPv4Address, Set[IPv4Network]]:
        return self.tables.own

    # --- files -------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.state_dir / CONFIG_FILE

    @property
    def env_path(self) -> Path:
        return self.state_dir / ENV_FILE

    def _render(self, neighbors: Iterable[Neighbor]) -> str:
        return render(self.router_id, self.local_address, self.local_as, list(neighbors),
                      self.bridge_command)

    @staticmethod
    def _write(path: Path, text: str) -> bool:
        """Atomically replace `path` with `text`; False if it already held exactly that."""
        try:
            if path.read_text() == text:
                return False
        except FileNotFoundError:
            pass
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return True

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._write(self.env_path, environment_file(self.env))
        adopted = self.process is not None and self.process.adoptable_pid()
        if self._config_text is not None:
            self._write(self.config_path, self._config_text)
        elif not self.config_path.exists() or (self.process is not None and not adopted):
            # ExaBGP needs a file to start with; the neighbours come with set_neighbors. A file
            # a running ExaBGP (adopted, or a sidecar) may have loaded is left as it is.
            self._write(self.config_path, self._render([]))
        self.socket_path.unlink(missing_ok=True)  # left by an agent that was killed
        self._server = await start_private_server(self._on_bridge, str(self.socket_path),
                                                  limit=LINE_LIMIT)
        if self.process is not None:
            self.process.start()

    async def stop(self, stop_exabgp: bool) -> None:
        """Close the socket; with stop_exabgp also stop ExaBGP (after retire(), to leave
        without peers keeping our routes for the graceful-restart time)."""
        if stop_exabgp and self.process is None and self.connected:
            try:
                await asyncio.wait_for(self._request("command", line="shutdown"), 10)
            except (SpeakerError, asyncio.TimeoutError) as error:
                log.warning("could not ask ExaBGP to shut down: %s", error)
        self._stopping = True
        if self._server:
            self._server.close()
        if self._writer:
            self._writer.close()
        self._disconnected(self._writer)
        self.socket_path.unlink(missing_ok=True)
        if self.process is not None:
            await self.process.stop(terminate=stop_exabgp)
        for task in self._tasks:
            task.cancel()

    # --- the bridge connection ---------------------------------------------------------------

    async def _on_bridge(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._writer is not None:  # a new bridge (ExaBGP restarted): the old one is gone
            self._writer.close()
            self._disconnected(self._writer)
        self._writer = writer
        try:
            async for raw in read_lines(reader, "the bridge", log):
                try:
                    self._on_message(json.loads(raw))
                except Exception:
                    log.exception("could not handle a message from the bridge: %.300s", raw)
        except asyncio.CancelledError:
            # the agent stopping: end as a handler that finished (Python 3.11's stream server
            # logs a cancelled handler as an error, with its traceback, at every exit)
            pass
        finally:
            writer.close()
            self._disconnected(writer)

    def _disconnected(self, writer) -> None:
        if writer is None or writer is not self._writer:
            return
        self._writer = None
        self._staging = None
        was_connected, self.connected = self.connected, False
        for future in self._pending.values():
            if not future.done():
                future.set_exception(SpeakerUnavailable("the bridge disconnected"))
        self._pending.clear()
        if was_connected:
            if self._stopping:
                log.info("closed the connection to ExaBGP's bridge")
            else:
                log.warning("ExaBGP's bridge disconnected")
            self._signal()

    def _signal(self) -> None:
        self.changed.set()
        if self.on_change:
            self.on_change()

    def _on_message(self, message: dict) -> None:
        kind = message["type"]
        if kind in ("done", "error"):
            future = self._pending.pop(message.get("id"), None)
            if future and not future.done():
                future.set_result(message)
            return
        if kind == "hello":
            self.exabgp_pid = message.get("exabgp_pid")
            self._bridge_digest = message.get("digest")
            self._bridge_protocol = message.get("protocol")
            if message.get("protocol") != bridge_protocol.PROTOCOL:
                log.error("ExaBGP's bridge speaks protocol %s, this agent %d (an ExaBGP left "
                          "running by an older Pipit?); restart ExaBGP (its sessions go "
                          "through graceful restart)", message.get("protocol"),
                          bridge_protocol.PROTOCOL)
            return
        if kind == "snapshot-begin":
            self._staging = RouteTables()
            return
        if kind == "snapshot-end":
            self.tables = self._staging if self._staging is not None else RouteTables()
            self._staging = None
            self.connected = True
            log.info("bridge connected: %d peers, %d received and %d announced routes",
                     len(self.peers), sum(map(len, self.received.values())),
                     sum(map(len, self.announced.values())))
            self._spawn_task(self._apply_config_after_connect())
            self._signal()
            return
        if kind == "exabgp-shutdown":
            log.warning("ExaBGP is shutting down")
            return
        if kind not in bridge_protocol.STATE_TYPES:
            log.debug("ignored a %r message from the bridge", kind)
            return
        if self._staging is not None:
            self._staging.apply(bridge_protocol.decode(message))
        else:
            self.tables.apply(bridge_protocol.decode(message))
            self._signal()

    def _spawn_task(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _submit(self, op: str, **fields) -> asyncio.Future:
        """Write a request now; a future of the bridge's reply."""
        if not self.connected or self._writer is None:
            raise SpeakerUnavailable("ExaBGP's bridge is not connected")
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        self._writer.write(json.dumps({"id": request_id, "op": op, **fields},
                                      separators=(",", ":")).encode() + b"\n")
        return future

    async def _request(self, op: str, **fields) -> dict:
        return _answered(await self._submit(op, **fields))

    def _requests(self, requests: list[tuple[str, dict]]) -> asyncio.Future:
        """Pipeline several requests, written now in order (the bridge runs them in order): a
        future that settles once all have answered, with the first error."""
        replies = [self._submit(op, **fields) for op, fields in requests]
        return asyncio.ensure_future(_all_answered(replies))

    # --- neighbours --------------------------------------------------------------------------

    async def set_neighbors(self, neighbors: Sequence[Neighbor]) -> None:
        """Render the configuration; if ExaBGP does not run it yet, make it reload. Sessions
        whose neighbour did not change are not reset. Callable before start()."""
        async with self._config_lock:
            previous = self._neighbors
            self._neighbors = {n.address: n for n in neighbors}
            self._config_text = self._render(neighbors)
            if self.state_dir.exists():
                self._write(self.config_path, self._config_text)
            if self.connected:
                await self._apply_config(previous)

    async def _apply_config_after_connect(self) -> None:
        async with self._config_lock:
            if self._config_text is not None and self.connected:
                try:
                    await self._apply_config(None)
                except SpeakerError as error:
                    log.error("could not apply the neighbour set after reconnecting: %s", error)

    async def _apply_config(self, previous: dict[IPv4Address, Neighbor] | None) -> None:
        digest = digest_of(self._config_text)
        if digest == self._bridge_digest:
            return
        wanted = self._neighbors
        # a neighbour leaving, or becoming a different peer inside ExaBGP: withdraw what it
        # was sent first, or ExaBGP's cached Adj-RIB-Out for it would outlive it
        clear = []
        for address in list(self.announced):
            if address not in wanted:
                clear.append(address)
                continue
            new = wanted[address]
            new_key = _exabgp_key(new.local_address, new.local_as, new.peer_as, self.router_id)
            if previous and address in previous:
                old = previous[address]
                old_key = _exabgp_key(old.local_address, old.local_as, old.peer_as, self.router_id)
            elif address in self.peers and self.peers[address].extra.get("local_router_id"):
                extra = self.peers[address].extra
                old_key = _exabgp_key(extra.get("local_address"), extra.get("local_as"),
                                      extra.get("peer_as"), extra.get("local_router_id"))
            else:
                old_key = new_key
            if old_key != new_key:
                clear.append(address)
        await self._requests([("clear", {"neighbor": str(a)}) for a in clear])
        await self._request("reload", digest=digest, timeout=60,
                            neighbors=[str(a) for a in sorted(wanted)],
                            renewed=[str(a) for a in clear if a in wanted])
        self._bridge_digest = digest

    # --- routes ------------------------------------------------------------------------------

    async def announce(self, neighbor: IPv4Address, routes: Sequence[Announcement]) -> None:
        """Send `routes` to one neighbour, replacing what was sent before for those prefixes.
        Returns once ExaBGP has them in its Adj-RIB-Out (sent now, or when the session comes
        up, and again after a session reset); `announced` is updated by then."""
        await self.announce_to([neighbor], routes)

    async def withdraw(self, neighbor: IPv4Address, prefixes: Sequence[IPv4Network]) -> None:
        await self.withdraw_from([neighbor], prefixes)

    def announce_to(self, neighbors: Sequence[IPv4Address],
                    routes: Sequence[Announcement]) -> Awaitable[None]:
        """announce() to several neighbours at once: one ExaBGP command per attribute set
        for all of them (a reflector's fan-out). The requests are written when it is called
        (what is asked after goes after them); the awaitable settles once they are done."""
        routes, targets = list(routes), list(map(text_of, neighbors))
        return self._requests([
            ("announce", {"neighbors": targets,
                          **self._routes_json(routes[i:i + REQUEST_ROUTES])})
            for i in range(0, len(routes), REQUEST_ROUTES)])

    def _routes_json(self, routes: list[Announcement]) -> dict:
        """A request's routes, in groups; listed one by one to a bridge older than protocol 4
        (an ExaBGP left running by an older Pipit, until it is restarted)."""
        if isinstance(self._bridge_protocol, int) and self._bridge_protocol < 4:
            return {"routes": [announcement_to_json(r) for r in routes]}
        return {"groups": groups_to_json(routes, announcement_to_json)}

    def withdraw_from(self, neighbors: Sequence[IPv4Address],
                      prefixes: Sequence[IPv4Network]) -> Awaitable[None]:
        """withdraw() from several neighbours at once; written when called, as announce_to."""
        prefixes, targets = list(map(prefix_text, prefixes)), list(map(text_of, neighbors))
        return self._requests([
            ("withdraw", {"neighbors": targets, "prefixes": prefixes[i:i + REQUEST_ROUTES]})
            for i in range(0, len(prefixes), REQUEST_ROUTES)])

    async def send_end_of_rib(self, neighbor: IPv4Address) -> None:
        await self._request("eor", neighbor=str(neighbor))

    async def retire(self, timeout: float = 30.0) -> None:
        """Withdraw this node's own routes from every neighbour and return once the
        withdrawals were sent to every peer that is up (for a node leaving the cluster; then
        stop(True)). Routes it reflects stay (see the bridge's retire)."""
        await self._request("retire", timeout=timeout)

    async def command(self, line: str) -> list[str]:
        """A raw ExaBGP API command (diagnostics); its output lines."""
        return (await self._request("command", line=line)).get("output", [])

