"""The agent's status socket: one JSON document per connection; `read_status` is its client
(for `pipitctl node status` and the lab)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Callable

from ipam.errors import DatastoreUnavailable

DEFAULT_STATUS_SOCKET = "/run/pipit/status.sock"


class StatusServer:
    def __init__(self, path: str, snapshot: Callable[[], dict]):
        self.path = path
        self.snapshot = snapshot
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, self.path)
        finally:
            os.umask(old_umask)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            document = {"now": time.time(), **self.snapshot()}
            writer.write(json.dumps(document).encode() + b"\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def read_status(path: str, timeout: float = 5.0) -> dict:
    """The status document of the agent serving on `path`."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(path)
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
    except OSError as error:
        reason = (error.strerror or str(error)).lower()
        raise DatastoreUnavailable(f"pipit-agent is not running on this node (nothing answers on "
                                   f"{path}: {reason}).") from None
    try:
        status = json.loads(data)
        if not isinstance(status, dict):
            raise ValueError
    except ValueError:
        raise DatastoreUnavailable(f"pipit-agent on {path} closed the connection without a "
                                   "status answer (did it stop or restart?); try again.") from None
    return status
