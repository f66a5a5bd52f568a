"""The node's local unix sockets (IPAM service, status, ExaBGP bridge): root's only.

Each socket is created 0600 (the umask is narrowed around bind, so it never exists with wider
rights), in a directory made 0700 if it does not exist yet; an existing directory is left as
the operator made it. The listen backlog is the system's maximum: a burst of pods connects to
the IPAM service all at once.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading

_UMASK = threading.Lock()  # the umask is the process's: one narrowed bind at a time


def somaxconn() -> int:
    try:
        with open("/proc/sys/net/core/somaxconn") as limit:
            return max(socket.SOMAXCONN, int(limit.read()))
    except (OSError, ValueError):
        return socket.SOMAXCONN


def bind_private(path: str) -> socket.socket:
    """A unix socket bound at `path`, mode 0600, its directory made 0700 if missing."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _UMASK:
            old = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
    except BaseException:
        sock.close()
        raise
    return sock


async def start_private_server(handler, path: str, **kwargs) -> asyncio.AbstractServer:
    """asyncio.start_unix_server on a socket made by bind_private, with the system's maximum
    listen backlog."""
    return await asyncio.start_unix_server(handler, sock=bind_private(path),
                                           backlog=somaxconn(), **kwargs)
