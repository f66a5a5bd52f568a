"""The agent's health endpoints for a kubelet's probes: `/livez` (the agent's loops are alive)
and `/readyz` (it can do its job: etcd answers, ExaBGP's bridge is connected, the kernel was
programmed once), served over HTTP on a local TCP port or a unix socket (`--health-listen`).

Each endpoint runs a list of named checks; a check answers None when all is well, else one
sentence. The answer is 200 with `ok` or 503 with the failing checks, one per line, in
Kubernetes' own format (`[+]etcd ok`, `[-]exabgp failed: ...`), so that `kubectl describe pod`
shows why a probe failed.

    health = Health()
    health.live("ipam", lambda: None if service.serving else "the IPAM socket is closed")
    health.ready("etcd", etcd_answers(store))           # a coroutine function is awaited
    server = HealthServer(parse_listen("127.0.0.1:9199"), health)
    await server.start()
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from ipam.errors import InvalidResource, PipitError
from ipam.local_socket import start_private_server

log = logging.getLogger("pipit-agent.health")

DEFAULT_PORT = 9199
CHECK_TIMEOUT = 3.0  # a check that takes longer fails (a probe's default timeout is 1 s..)
REQUEST_LIMIT = 8192

Check = Callable[[], "str | None | Awaitable[str | None]"]


@dataclass(frozen=True)
class Listen:
    """Where the endpoints are served: `host`:`port` (TCP), or `path` (a unix socket)."""
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path else f"{self.host}:{self.port}"


def parse_listen(text: str) -> Listen:
    """`--health-listen`: HOST:PORT (such as 127.0.0.1:9199, [::1]:9199) or unix:PATH."""
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path.startswith("/"):
            raise InvalidResource(f"--health-listen {text!r}: a unix socket needs an absolute "
                                  "path, such as unix:/run/pipit/health.sock.")
        return Listen(path=path)
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidResource(f"--health-listen {text!r} is neither HOST:PORT (such as "
                              f"127.0.0.1:{DEFAULT_PORT}) nor unix:PATH.")
    return Listen(host=host, port=int(port))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--health-listen", metavar="HOST:PORT|unix:PATH",
                        help="Serve /livez and /readyz for probes here, e.g. "
                             f"127.0.0.1:{DEFAULT_PORT} (default: not served).")


@dataclass
class Health:
    """The checks of each endpoint, in the order they are reported."""
    livez: list[tuple[str, Check]] = field(default_factory=list)
    readyz: list[tuple[str, Check]] = field(default_factory=list)

    def live(self, name: str, check: Check) -> None:
        self.livez.append((name, check))

    def ready(self, name: str, check: Check) -> None:
        self.readyz.append((name, check))

    async def run(self, endpoint: str) -> tuple[bool, str]:
        """Run an endpoint's checks: whether all passed, and the report."""
        checks = {"livez": self.livez, "readyz": self.readyz}[endpoint]
        lines, ok = [], True
        for name, check in checks:
            problem = await _run_check(check)
            ok &= problem is None
            lines.append(f"[+]{name} ok" if problem is None else f"[-]{name} failed: {problem}")
        lines.append(f"{endpoint} check {'passed' if ok else 'failed'}")
        return ok, "\n".join(lines) + "\n"


async def _run_check(check: Check) -> str | None:
    try:
        result = check()
        if inspect.isawaitable(result):
            result = await asyncio.wait_for(result, CHECK_TIMEOUT)
        return result
    except asyncio.TimeoutError:
        return f"no answer within {CHECK_TIMEOUT:g} s"
    except PipitError as error:  # the sentence a person gets (etcd unreachable...)
        return str(error)
    except Exception as error:  # a check that breaks is a failed check, never a dead server
        return f"{type(error).__name__}: {error}"


class HealthServer:
    """A minimal HTTP/1.1 server: GET or HEAD of /livez or /readyz, one request per connection."""

    def __init__(self, listen: Listen, health: Health):
        self.listen = listen
        self.health = health
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if self.listen.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.listen.path)
            self._server = await start_private_server(self._serve, self.listen.path)
        else:
            self._server = await asyncio.start_server(self._serve, self.listen.host,
                                                      self.listen.port, reuse_address=True)
        log.info("health endpoints /livez and /readyz on %s", self.listen)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self.listen.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.listen.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CHECK_TIMEOUT)
            method, target, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ") + [""]
            path = target.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, body = "405 Method Not Allowed", "only GET and HEAD\n"
            elif path.strip("/") in ("livez", "readyz"):
                ok, body = await self.health.run(path.strip("/"))
                status = "200 OK" if ok else "503 Service Unavailable"
            else:
                status, body = "404 Not Found", "the endpoints are /livez and /readyz\n"
            payload = body.encode()
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                         f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                         + (payload if method != "HEAD" else b""))
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError, UnicodeDecodeError, ValueError):
            pass  # a client that went away or sent garbage: nothing to answer
        finally:
            writer.close()


# --------------------------------------------------------------------------------------------
# The agent's checks

@dataclass
class Starting:
    """The agent's health before its parts exist: alive (waiting is no reason to restart
    it) and not ready, saying what it waits for."""
    problem: str = "starting"

    def health(self) -> Health:
        health = Health()
        health.ready("start", lambda: self.problem)
        return health

    def waiting_for(self, what: str) -> Callable[[str], None]:
        """What bgp_agent.reachable tells of each failure to reach `what`."""
        def problem(error: str) -> None:
            self.problem = f"waiting for {what}: {error}"
        return problem


STUCK_AFTER = 300.0  # a routing pass running longer than this is stuck (livez fails)


@dataclass
class AgentParts:
    """What the checks look at; the routing parts are filled in once they exist (until then
    readiness fails with "starting")."""
    store: object
    service: object  # the IPAM service (None: none served)
    routing: bool = True  # False with --no-bgp: nothing routes, so nothing to wait for
    router: object = None
    speaker: object = None
    task: asyncio.Task | None = None  # the routing loop
    conflist: object = None  # the CNI configuration writer, with --cni-conf-file


def agent_health(parts: AgentParts, clock: Callable[[], float],
                 stuck_after: float = STUCK_AFTER) -> Health:
    health = Health()

    def ipam_serving() -> str | None:
        return None if parts.service.serving else "the IPAM socket is not accepting requests"
    if parts.service is not None:  # a dedicated route reflector serves no IPAM
        health.live("ipam", ipam_serving)

    async def etcd_answers() -> str | None:
        await parts.store.get("/pipit/")  # any read: a DatastoreUnavailable says why not
        return None
    if parts.service is not None:
        health.ready("ipam", ipam_serving)
    health.ready("etcd", etcd_answers)
    if parts.conflist is not None:
        health.ready("cni-config", parts.conflist.check)
    if not parts.routing:
        return health

    def routing_alive() -> str | None:
        if parts.task is None:
            return None  # still registering the node
        if parts.task.done():
            return "the routing loop has ended"
        started = parts.router.pass_started
        if started is not None and clock() - started > stuck_after:
            return f"a routing pass has been running for {clock() - started:.0f} s"
        return None
    health.live("routing", routing_alive)

    def exabgp_connected() -> str | None:
        if parts.speaker is None:
            return "starting: the node is not registered yet"
        return None if parts.speaker.connected else "ExaBGP's bridge is not connected"

    def kernel_programmed() -> str | None:
        if parts.router is None or not parts.router.programmed.is_set():
            return "the kernel has not been programmed with the peers' routes yet"
        return None
    health.ready("exabgp", exabgp_connected)
    health.ready("kernel", kernel_programmed)
    return health


def get(listen: Listen, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET `path` from a health server (for tests, the lab's probes and people): the status
    code and body."""
    import socket

    if listen.path:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: object = listen.path
    else:
        conn = socket.socket(socket.AF_INET6 if ":" in listen.host else socket.AF_INET,
                             socket.SOCK_STREAM)
        address = (listen.host, listen.port)
    with conn:
        conn.settimeout(timeout)
        conn.connect(address)
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                     .encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode(errors="replace")
