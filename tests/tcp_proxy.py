"""A TCP proxy on loopback, in front of a real etcd, for the faults of a real network: it
delays every byte each way (an etcd far away), holds back the server's answers from the
moment a client sent a given byte string (a request that went out and whose answer is lost),
and cuts the clients off. It runs its own event loop in a thread, so that synchronous tests
and other processes (pipitctl, the agent) can use it alike.

    with TCPProxy(("127.0.0.1", etcd.client_port), delay=0.1) as proxy:
        endpoint = proxy.url("https")
        proxy.hold_after(b'"handleID":"net.c1.eth0"')   # answers from then on are held
        proxy.cut()                                      # clients get a reset
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from dataclasses import dataclass, field


@dataclass
class _Link:
    """One client connection and its connection to the target."""
    client: asyncio.StreamWriter
    target: asyncio.StreamWriter
    held: list[bytes] = field(default_factory=list)
    tasks: list[asyncio.Task] = field(default_factory=list)


class TCPProxy:
    def __init__(self, target: tuple[str, int], delay: float = 0.0):
        self.target = target
        self.delay = delay  # seconds added to every byte, each way
        self.port = 0
        self.connections = 0  # accepted so far
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._links: list[_Link] = []
        self._pattern: bytes | None = None
        self._holding = False

    # -- control, from any thread ----------------------------------------------------------

    def start(self) -> TCPProxy:
        self._thread.start()
        self._run(self._start())
        return self

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}"

    def hold_after(self, pattern: bytes) -> None:
        """Hold back every answer sent after some client sent `pattern`."""
        self._loop.call_soon_threadsafe(setattr, self, "_pattern", pattern)

    @property
    def holding(self) -> bool:
        return self._holding

    def release(self) -> None:
        """Deliver what was held and let answers through again."""
        self._run(self._release())

    def cut(self) -> None:
        """Reset every client connection now (what was held is lost); new ones pass."""
        self._run(self._cut())

    def stop(self) -> None:
        if self._thread.is_alive():
            self._run(self._stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> TCPProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(30)

    # -- inside the proxy's loop -------------------------------------------------------------

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            target_reader, target_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)
            return
        link = _Link(writer, target_writer)
        self._links.append(link)
        link.tasks = [asyncio.create_task(self._pump(reader, link, upstream=True)),
                      asyncio.create_task(self._pump(target_reader, link, upstream=False))]
        await asyncio.gather(*link.tasks, return_exceptions=True)
        for end in (link.client, link.target):
            end.close()
        if link in self._links:
            self._links.remove(link)

    async def _pump(self, reader: asyncio.StreamReader, link: _Link, upstream: bool) -> None:
        """Read one direction; write each chunk `delay` after it arrived, in order."""
        queue: asyncio.Queue = asyncio.Queue()
        writer = asyncio.create_task(self._deliver(queue, link, upstream))
        seen = b""  # the end of what came before, for a pattern cut in two
        try:
            while chunk := await reader.read(65536):
                if upstream and self._pattern and self._pattern in seen + chunk:
                    self._holding = True
                seen = (seen + chunk)[-len(self._pattern or b""):]
                queue.put_nowait((time.monotonic() + self.delay, chunk))
            queue.put_nowait((time.monotonic() + self.delay, b""))  # end of stream
            await writer
        except OSError:
            pass
        finally:
            writer.cancel()
        for task in link.tasks:  # one side gone: the link is over
            if task is not asyncio.current_task():
                task.cancel()

    async def _deliver(self, queue: asyncio.Queue, link: _Link, upstream: bool) -> None:
        out = link.target if upstream else link.client
        while True:
            due, chunk = await queue.get()
            if due > time.monotonic():
                await asyncio.sleep(due - time.monotonic())
            if not chunk:
                return
            if not upstream and self._holding:
                link.held.append(chunk)
                continue
            out.write(chunk)
            try:
                await out.drain()
            except OSError:
                return

    async def _release(self) -> None:
        self._holding, self._pattern = False, None
        for link in self._links:
            for chunk in link.held:
                link.client.write(chunk)
            link.held.clear()

    async def _cut(self) -> None:
        self._holding, self._pattern = False, None
        for link in list(self._links):
            link.held.clear()
            _reset(link.client)
            link.target.close()
            for task in link.tasks:
                task.cancel()
        self._links.clear()

    async def _stop(self) -> None:
        await self._cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset, as a connection lost on the way is seen."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()
