"""The agent's BGP speaker: ExaBGP, driven through pipit-exabgp-bridge over a unix socket.

The agent listens on `socket_path`; the bridge (ExaBGP's process helper) connects, sends a
snapshot of everything ExaBGP told it, then live events (protocol: bgp_agent.exabgp_bridge).
The bridge, not the agent, is ExaBGP's child, so a killed agent leaves the sessions, ExaBGP's
Adj-RIB-Out and the bridge's picture of them alone; the next agent gets it all back.

Two ways to run ExaBGP, both with the files the Speaker writes into `state_dir`:

- spawn: the Speaker starts ExaBGP in its own session (so a SIGKILLed agent does not take it
  down), records its pid in exabgp.pid, restarts it with backoff if it dies, and adopts a
  running one left by a previous agent instead of starting a second.
- sidecar: someone else runs ExaBGP, e.g. a second container of the pod sharing `state_dir` and
  the socket's directory, from the same image (it needs pipit-exabgp-bridge):

      until [ -s STATE/exabgp.conf ]; do sleep 1; done
      exec exabgp --env-file STATE/exabgp.env server STATE/exabgp.conf

  (`sidecar_command(state_dir)`). start() writes both files, the configuration with no
  neighbour until set_neighbors says otherwise; changes are applied with the API's reload.

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
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from bgp_agent.exabgp_bridge import (
    LINE_LIMIT,
    announcement_from_json,
    announcement_to_json,
    path_from_json,
    peer_from_json,
    read_lines,
)
from bgp_agent.exabgp_config import digest_of, environment_file, exabgp_environment, render
from bgp_agent.model import Announcement, Neighbor, Path as BGPPath, PeerState

log = logging.getLogger("pipit-agent.speaker")

REQUEST_ROUTES = 5000  # routes per request to the bridge (it batches them for ExaBGP)
LOG_ROTATE_BYTES = 10 * 2**20
CONFIG_FILE = "exabgp.conf"  # ExaBGP's files in state_dir
ENV_FILE = "exabgp.env"


class SpeakerError(Exception):
    """ExaBGP or the bridge refused or failed a request."""


class SpeakerUnavailable(SpeakerError, ConnectionError):
    """The bridge is not connected (ExaBGP down or still starting)."""


def sidecar_command(state_dir: Path) -> list[str]:
    """How a sidecar runs ExaBGP on the files a Speaker writes into `state_dir`."""
    state_dir = Path(state_dir)
    return [_tool("exabgp"), "--env-file", str(state_dir / ENV_FILE), "server",
            str(state_dir / CONFIG_FILE)]


def _tool(name: str) -> str:
    """A console script of this installation (beside the interpreter), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


@dataclass
class _Tables:
    peers: dict[IPv4Address, PeerState] = field(default_factory=dict)
    received: dict[IPv4Address, dict[IPv4Network, BGPPath]] = field(default_factory=dict)
    announced: dict[IPv4Address, dict[IPv4Network, Announcement]] = field(default_factory=dict)


def _exabgp_key(local_address, local_as, peer_as, router_id) -> tuple[str, ...]:
    """What names a neighbour inside ExaBGP: change any of it and ExaBGP makes a new peer,
    with an empty Adj-RIB-Out, rather than updating the old one."""
    return tuple(str(v) for v in (local_address, local_as, peer_as, router_id))


class Speaker:
    def __init__(self, state_dir: Path, socket_path: Path, mode: str,
                 router_id: IPv4Address, local_address: IPv4Address, local_as: int,
                 exabgp_env_extra: dict | None = None, *, netns: str | None = None,
                 bridge_command: list[str] | None = None,
                 on_change: Callable[[], None] | None = None):
        if mode not in ("spawn", "sidecar"):
            raise ValueError(f"mode must be 'spawn' or 'sidecar', not {mode!r}")
        self.state_dir = Path(state_dir)
        self.socket_path = Path(socket_path)
        self.mode = mode
        self.router_id = IPv4Address(router_id)
        self.local_address = IPv4Address(local_address)
        self.local_as = local_as
        self.env = exabgp_environment(exabgp_env_extra)
        self.netns = netns  # spawn ExaBGP inside this network namespace (lab, tests)
        self.bridge_command = bridge_command or [
            _tool("pipit-exabgp-bridge"), "--socket", str(self.socket_path.absolute())]
        self.on_change = on_change

        # state, as of the last event from the bridge
        self.connected = False
        self.peers: dict[IPv4Address, PeerState] = {}
        self.received: dict[IPv4Address, dict[IPv4Network, BGPPath]] = {}
        self.announced: dict[IPv4Address, dict[IPv4Network, Announcement]] = {}
        self.changed = asyncio.Event()  # set on every change; whoever waits on it clears it
        self.exabgp_pid: int | None = None  # ExaBGP's pid as the bridge reports it

        self._neighbors: dict[IPv4Address, Neighbor] | None = None  # desired, once known
        self._config_text: str | None = None
        self._bridge_digest: str | None = None  # the configuration the bridge saw applied
        self._server: asyncio.AbstractServer | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._staging: _Tables | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._config_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._process: subprocess.Popen | None = None  # ExaBGP, when we started it
        self._supervisor: asyncio.Task | None = None
        self._stopping = False

    # --- files -------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.state_dir / CONFIG_FILE

    @property
    def env_path(self) -> Path:
        return self.state_dir / ENV_FILE

    @property
    def pid_path(self) -> Path:
        return self.state_dir / "exabgp.pid"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "exabgp.log"

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
        adopted = self.mode == "spawn" and self._adoptable_pid()
        if self._config_text is not None:
            self._write(self.config_path, self._config_text)
        elif not self.config_path.exists() or (self.mode == "spawn" and not adopted):
            # ExaBGP needs a file to start with; the neighbours come with set_neighbors. A file
            # a running ExaBGP (adopted, or a sidecar) may have loaded is left as it is.
            self._write(self.config_path, self._render([]))
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)  # left by an agent that was killed
        self._server = await asyncio.start_unix_server(self._on_bridge, str(self.socket_path),
                                                       limit=LINE_LIMIT)
        if self.mode == "spawn":
            if adopted:
                log.info("adopting the running ExaBGP, pid %d", adopted)
                pid = adopted
            else:
                pid = self._spawn()
            self._supervisor = asyncio.create_task(self._supervise(pid))

    async def stop(self, stop_exabgp: bool) -> None:
        """Close the socket; with stop_exabgp also stop ExaBGP (after retire(), to leave
        without peers keeping our routes for the graceful-restart time)."""
        self._stopping = True
        if self._supervisor:
            self._supervisor.cancel()
        if stop_exabgp and self.mode == "sidecar" and self.connected:
            try:
                await asyncio.wait_for(self._request("command", line="shutdown"), 10)
            except (SpeakerError, asyncio.TimeoutError) as error:
                log.warning("could not ask ExaBGP to shut down: %s", error)
        if self._server:
            self._server.close()
        if self._writer:
            self._writer.close()
        self._disconnected(self._writer)
        self.socket_path.unlink(missing_ok=True)
        if stop_exabgp and self.mode == "spawn":
            pid = self._process.pid if self._process else self._adoptable_pid()
            if pid:
                await self._terminate(pid)
            self.pid_path.unlink(missing_ok=True)
        for task in self._tasks:
            task.cancel()

    # --- ExaBGP process (spawn mode) ---------------------------------------------------------

    def _adoptable_pid(self) -> int | None:
        """The pid in exabgp.pid if it is still an ExaBGP running our configuration."""
        try:
            pid = int(self.pid_path.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return None
        if str(self.config_path).encode() in cmdline and any(b"exabgp" in a for a in cmdline):
            return pid
        return None

    def _spawn(self) -> int:
        argv = sidecar_command(self.state_dir)  # the same files, started by us
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        if self.log_path.exists() and self.log_path.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(self.log_path, self.log_path.with_suffix(".log.1"))
        # settings come from the env file only: variables inherited from our own environment
        # would silently override it
        env = {k: v for k, v in os.environ.items() if not k.lower().startswith("exabgp")}
        with open(self.log_path, "ab") as output:
            # its own session: signals to the agent's process group do not reach it, and
            # its output goes to a file, not a pipe that dies with the agent
            self._process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output,
                                             stderr=output, env=env, start_new_session=True)
        self._write(self.pid_path, f"{self._process.pid}\n")
        log.info("started ExaBGP, pid %d (log %s)", self._process.pid, self.log_path)
        return self._process.pid

    async def _wait_exit(self, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)  # works for an adopted ExaBGP, which is not our child
        except ProcessLookupError:
            return
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
        try:
            await exited
        finally:
            loop.remove_reader(fd)
            os.close(fd)

    async def _supervise(self, pid: int) -> None:
        backoff = 1.0
        while True:
            started = time.monotonic()
            await self._wait_exit(pid)
            if self._stopping:
                return
            status = "unknown status (not our child)"
            if self._process and self._process.pid == pid:
                status = f"status {self._process.wait()}"
            if time.monotonic() - started > 60:
                backoff = 1.0
            log.error("ExaBGP (pid %d) exited with %s; restarting it in %g s. Its last words:\n%s",
                      pid, status, backoff, self._log_tail())
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
            pid = self._spawn()

    def _log_tail(self, lines: int = 10) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def _terminate(self, pid: int, timeout: float = 10.0) -> None:
        try:
            os.kill(pid, signal.SIGTERM)
            await asyncio.wait_for(self._wait_exit(pid), timeout)
        except ProcessLookupError:
            pass
        except asyncio.TimeoutError:
            log.warning("ExaBGP (pid %d) ignored SIGTERM for %g s; killing it", pid, timeout)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await self._wait_exit(pid)
        if self._process and self._process.pid == pid:
            self._process.wait()

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
            return
        if kind == "snapshot-begin":
            self._staging = _Tables()
            return
        if kind == "snapshot-end":
            tables, self._staging = self._staging if self._staging is not None else _Tables(), None
            self.peers, self.received, self.announced = (tables.peers, tables.received,
                                                         tables.announced)
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
        if self._staging is not None:
            apply_message(self._staging, message)
        else:
            apply_message(self, message)
            self._signal()

    def _spawn_task(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _request(self, op: str, **fields) -> dict:
        if not self.connected or self._writer is None:
            raise SpeakerUnavailable("ExaBGP's bridge is not connected")
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        self._writer.write(json.dumps({"id": request_id, "op": op, **fields},
                                      separators=(",", ":")).encode() + b"\n")
        reply = await future
        if reply["type"] == "error":
            raise SpeakerError(reply.get("message", "failed"))
        return reply

    async def _requests(self, requests: list[tuple[str, dict]]) -> None:
        """Pipeline several requests (the bridge runs them in order); raise the first error
        once all have finished."""
        results = await asyncio.gather(*(self._request(op, **fields) for op, fields in requests),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    # --- neighbours --------------------------------------------------------------------------

    async def set_neighbors(self, neighbors: list[Neighbor]) -> None:
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
                            neighbors=[str(a) for a in sorted(wanted)])
        self._bridge_digest = digest

    # --- routes ------------------------------------------------------------------------------

    async def announce(self, neighbor: IPv4Address, routes: list[Announcement]) -> None:
        """Send `routes` to one neighbour, replacing what was sent before for those prefixes.
        Returns once ExaBGP has them in its Adj-RIB-Out (sent now, or when the session comes
        up, and again after a session reset); `announced` is updated by then."""
        routes = list(routes)
        await self._requests([
            ("announce", {"neighbor": str(neighbor),
                          "routes": [announcement_to_json(r) for r in routes[i:i + REQUEST_ROUTES]]})
            for i in range(0, len(routes), REQUEST_ROUTES)])

    async def withdraw(self, neighbor: IPv4Address, prefixes: list[IPv4Network]) -> None:
        prefixes = [str(p) for p in prefixes]
        await self._requests([
            ("withdraw", {"neighbor": str(neighbor), "prefixes": prefixes[i:i + REQUEST_ROUTES]})
            for i in range(0, len(prefixes), REQUEST_ROUTES)])

    async def retire(self, timeout: float = 30.0) -> None:
        """Withdraw everything from every neighbour and return once the withdrawals were sent
        to every peer that is up (for a node leaving the cluster; then stop(True))."""
        await self._request("retire", timeout=timeout)

    async def command(self, line: str) -> list[str]:
        """A raw ExaBGP API command (diagnostics); its output lines."""
        return (await self._request("command", line=line)).get("output", [])


def apply_message(tables, message: dict) -> None:
    """Apply one of the bridge's state messages to `tables` (peers/received/announced)."""
    kind = message["type"]
    if kind == "peer":
        peer = peer_from_json(message)
        old = tables.peers.get(peer.address)
        tables.peers[peer.address] = peer
        if peer.state != "up":
            tables.received.pop(peer.address, None)
        elif old is None or old.state != "up" or old.since != peer.since:
            tables.received[peer.address] = {}  # a new session
    elif kind == "received":
        table = tables.received.setdefault(IPv4Address(message["peer"]), {})
        for prefix in message["withdraw"]:
            table.pop(IPv4Network(prefix), None)
        for path in map(path_from_json, message["announce"]):
            table[path.prefix] = path
    elif kind == "announced":
        table = tables.announced.setdefault(IPv4Address(message["neighbor"]), {})
        for route in map(announcement_from_json, message["routes"]):
            table[route.prefix] = route
    elif kind == "withdrawn":
        neighbor = IPv4Address(message["neighbor"])
        table = tables.announced.get(neighbor, {})
        for prefix in message["prefixes"]:
            table.pop(IPv4Network(prefix), None)
        if not table:
            tables.announced.pop(neighbor, None)
    elif kind == "forget":
        address = IPv4Address(message["peer"])
        for table in (tables.peers, tables.received, tables.announced):
            table.pop(address, None)
    else:
        log.debug("ignored a %r message from the bridge", kind)
