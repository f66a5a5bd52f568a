"""Pipit's routes in one network namespace's kernel, over a raw NETLINK_ROUTE socket: a dump
of Pipit's routes, and batched installs and deletes that report each route the kernel refused
while still applying the rest. Messages come from ipip.route_netlink; ipip.route_table decides
what to send and keeps track of what the kernel holds. Standard library only (the IPIP VM test
imports it under software emulation). `python -m bench.routes` measures it against `ip -batch`.
"""

from __future__ import annotations

import ctypes
import errno as errno_codes
import itertools
import os
import socket
import threading
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address, IPv4Network
from typing import TypeVar

from ipip.route_netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP_INTR,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSGHDR,
    RTM_NEWROUTE,
    decode_error,
    decode_fib_match,
    decode_route,
    encode_delroute,
    encode_dump_request,
    encode_fib_lookup,
    encode_newroute,
    split_messages,
)
from ipip.routes import MAIN_TABLE, FibMatch, NextHop, Route, RouteError

T = TypeVar("T")

SOL_NETLINK = 270
NETLINK_EXT_ACK = 11
NETLINK_CAP_ACK = 10
NETLINK_GET_STRICT_CHK = 12
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
CLONE_NEWNET = 0x40000000

# Requests per apply() send. Each route that fails costs an error message in the receive
# buffer (about 1 KiB of skb truesize, measured), so a batch must fit the receive buffer even
# when every route in it fails, or errors would be dropped (ENOBUFS). Larger batches are no
# faster: at 2048 the kernel's own work is ~90% of apply()'s time.
_BATCH = 2048
_SOCKET_BUFFER = 8 << 20
_ERROR_TRUESIZE = 2048  # with margin


class DumpInterrupted(OSError):
    """The route table kept changing during every dump attempt."""


def in_own_thread(function: Callable[[], T], name: str) -> T:
    """function() in a short-lived thread, its result or exception handed back: for work
    that moves its thread into another network namespace (setns, unshare switch only the
    calling thread) and must leave the caller's where it is."""
    result: list = []

    def run() -> None:
        try:
            result.append(function())
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _open_socket(netns: str | None) -> socket.socket:
    if netns is None:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)

    def enter_and_open() -> socket.socket:  # a socket stays in the namespace it was made in
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FileNotFoundError(
                errno_codes.ENOENT, f"network namespace {netns!r} does not exist") from None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                code = ctypes.get_errno()
                raise OSError(code, f"setns to network namespace {netns!r}: {os.strerror(code)}")
        finally:
            os.close(fd)
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)

    return in_own_thread(enter_and_open, f"netns-{netns}")


def _set_buffer(sock: socket.socket, force: int, plain: int, size: int) -> None:
    try:
        # Beyond net.core.[rw]mem_max; needs CAP_NET_ADMIN.
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, plain, size)


class KernelRoutes:
    """Pipit's routes in one network namespace's kernel table, over a raw netlink socket.

    Not thread-safe: one owner (a RouteTable, which the agent runs in a worker thread)."""

    def __init__(self, netns: str | None = None, *, batch: int = _BATCH) -> None:
        self.netns = netns
        self._seq = 0
        self._sock = _open_socket(netns)
        try:
            _set_buffer(self._sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, _SOCKET_BUFFER)
            _set_buffer(self._sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, _SOCKET_BUFFER)
            self._sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
            # Errors come without the request echoed back, but with the kernel's reason.
            self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            self._sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
            self._sock.bind((0, 0))
        except BaseException:
            self._sock.close()
            raise
        receive_buffer = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self.batch = max(1, min(batch, receive_buffer // _ERROR_TRUESIZE))

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> KernelRoutes:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _take_seqs(self, count: int) -> int:
        """The first of `count` fresh sequence numbers."""
        first = (self._seq + 1) & 0xFFFFFFFF
        self._seq = (self._seq + count) & 0xFFFFFFFF
        return first

    def dump(
        self, table: int = MAIN_TABLE, reuse: Iterable[IPv4Network] = ()
    ) -> dict[IPv4Network, Route]:
        """Pipit's routes in `table`. Retries when the kernel flags the dump as interrupted by
        a concurrent change (NLM_F_DUMP_INTR), because such a dump may miss routes.

        A route whose prefix equals one in `reuse` gets that very IPv4Network object: building
        one costs ~2 µs, and a later dict lookup by it is an identity hit. RouteTable passes the
        desired prefixes, which halves the time of a 100k-route resync."""
        known = {(network.network_address.packed, network.prefixlen): network for network in reuse}
        for _ in range(5):
            routes, interrupted = self._dump_once(table, known)
            if not interrupted:
                return routes
        raise DumpInterrupted(errno_codes.EAGAIN, f"route table {table} kept changing during dumps")

    def _dump_once(self, table: int, known: dict) -> tuple[dict[IPv4Network, Route], bool]:
        seq = self._take_seqs(1)
        self._sock.send(encode_dump_request(table, seq))
        routes: dict[IPv4Network, Route] = {}
        seen: dict[tuple, tuple[NextHop, ...]] = {}
        interrupted = False
        while True:
            data = self._sock.recv(1 << 16)
            pos = 0
            while pos + NLMSGHDR.size <= len(data):
                length, kind, flags, msg_seq, _ = NLMSGHDR.unpack_from(data, pos)
                if length < NLMSGHDR.size:
                    break
                end = pos + length
                if msg_seq == seq:  # else a late reply to an earlier request
                    interrupted |= bool(flags & NLM_F_DUMP_INTR)
                    if kind == RTM_NEWROUTE:
                        route = decode_route(data, pos, end, table, seen, known)
                        if route is not None:
                            routes[route.dst] = route
                    elif kind == NLMSG_DONE:
                        return routes, interrupted
                    elif kind == NLMSG_ERROR:
                        code, _, message = decode_error(data, flags, pos + NLMSGHDR.size, end)
                        if code == errno_codes.ENOENT:
                            return {}, False  # no such table (yet): nothing of ours in it
                        text = f"route dump of table {table}: {os.strerror(code)} {message}"
                        raise OSError(code, text.strip())
                pos = (end + 3) & ~3

    def lookup(self, address: IPv4Address) -> FibMatch | None:
        """The route, of any protocol, that the kernel's tables hold for traffic to `address`
        (`ip route get fibmatch`), or None when none leads there."""
        seq = self._take_seqs(1)
        self._sock.send(encode_fib_lookup(address, seq))
        while True:
            data = self._sock.recv(1 << 16)
            for kind, flags, msg_seq, start, end in split_messages(data):
                if msg_seq != seq:
                    continue  # a late reply to an earlier request
                if kind == RTM_NEWROUTE:
                    return decode_fib_match(data, start - NLMSGHDR.size, end)
                if kind == NLMSG_ERROR:
                    code, _, message = decode_error(data, flags, start, end)
                    if code in (errno_codes.ENETUNREACH, errno_codes.EHOSTUNREACH,
                                errno_codes.EINVAL, errno_codes.EACCES):
                        return None  # no route, or an unreachable / prohibit one
                    raise OSError(code, f"route lookup of {address}: {os.strerror(code)} "
                                        f"{message}".strip())

    def apply(
        self,
        replace: Iterable[Route] = (),
        delete: Iterable[Route] = (),
        *,
        add: Iterable[Route] = (),
    ) -> list[RouteError]:
        """Install `replace` (create, or overwrite the route for that prefix), create `add`
        (refused with EEXIST if any route, ours or another daemon's, already has the prefix)
        and delete `delete` (only ever Pipit's route for that prefix; already gone is fine).

        Requests go many per send; a route the kernel refuses is reported and the rest still
        applied. `replace` overwrites another daemon's route for the same prefix and metric,
        so RouteTable uses it only for prefixes where the kernel holds a Pipit route."""
        requests = itertools.chain(
            ((route, "delete", encode_delroute, 0) for route in delete),
            ((route, "replace", encode_newroute, NLM_F_CREATE | NLM_F_REPLACE)
             for route in replace),
            ((route, "add", encode_newroute, NLM_F_CREATE | NLM_F_EXCL) for route in add),
        )
        errors: list[RouteError] = []
        while chunk := list(itertools.islice(requests, self.batch)):
            errors += self._send_batch(chunk)
        return errors

    def _send_batch(self, chunk: list[tuple[Route, str, Callable[[Route, int, int], bytes], int]]
                    ) -> list[RouteError]:
        # Only the last request asks for an ACK: the kernel answers the others only when they
        # fail, so success costs no reply. The kernel handles the whole send before sendmsg
        # returns, so the last ACK arrives after every error of the batch.
        first = self._take_seqs(len(chunk))
        last = len(chunk) - 1
        parts = [
            encode(route, flags | (NLM_F_ACK if i == last else 0), (first + i) & 0xFFFFFFFF)
            for i, (route, _, encode, flags) in enumerate(chunk)
        ]
        self._sock.sendall(b"".join(parts))
        errors = []
        last_seq = (first + last) & 0xFFFFFFFF
        while True:
            data = self._sock.recv(1 << 16)
            for kind, flags, _, start, end in split_messages(data):
                if kind != NLMSG_ERROR:
                    continue
                code, seq, message = decode_error(data, flags, start, end)
                index = (seq - first) & 0xFFFFFFFF
                if index > last:
                    continue  # a late reply to an earlier request
                route, op = chunk[index][:2]
                if code and not (op == "delete" and code == errno_codes.ESRCH):
                    errors.append(RouteError(route, op, code, message))
                if seq == last_seq:
                    return errors
