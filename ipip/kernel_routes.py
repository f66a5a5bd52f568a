"""Pipit's routes in the kernel: route data, the diff, and a batched netlink reader/writer.

Every route Pipit installs carries its own routing protocol number, RTPROT_PIPIT. That number
is how the agent finds its routes again after a restart (the kernel filters a dump by it) and
how a delete is kept from ever removing a route another daemon owns (the kernel matches it).

Bulk routes go over a raw NETLINK_ROUTE socket with messages packed here: pyroute2's
per-call `IPRoute.route()` manages about 1.2k routes/s, far too slow for 100k routes; links
and addresses stay with pyroute2. `python -m bench.routes` measures this module against
`ip -batch`.
"""

from __future__ import annotations

import ctypes
import errno as errno_codes
import itertools
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import TypeVar

# Pipit's routing protocol number (rtm_protocol). The kernel interprets only 0-4; 91 is in
# none of linux/rtnetlink.h, iproute2's rt_protos (bird is 12: the lab's ToR BIRD) or FRR's
# 186-197. `ip route show proto 91` lists Pipit's routes.
T = TypeVar("T")
RTPROT_PIPIT = 91

MAIN_TABLE = 254

# --- netlink constants (linux/netlink.h, linux/rtnetlink.h) ---------------------------------
NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_CAPPED = 0x100  # in an NLMSG_ERROR: the echoed request is its header only
NLM_F_ACK_TLVS = 0x200  # in an NLMSG_ERROR: extended ack attributes follow
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_DUMP = 0x300

RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_MULTIPATH = 9
RTA_TABLE = 15

RTN_UNICAST = 1
RTN_BLACKHOLE = 6
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_NOWHERE = 255
RTNH_F_ONLINK = 4

SOL_NETLINK = 270
NETLINK_EXT_ACK = 11
NETLINK_CAP_ACK = 10
NETLINK_GET_STRICT_CHK = 12
NLMSGERR_ATTR_MSG = 1
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
CLONE_NEWNET = 0x40000000

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTA = struct.Struct("=HH")  # len, type
_RTNH = struct.Struct("=HBBi")  # len, flags, hops, ifindex
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")
_HEADERS = _NLMSGHDR.size + _RTMSG.size
# The common case, `<block> via <gateway>`, packed in one call: headers, RTA_DST, RTA_GATEWAY.
_VIA = struct.Struct("=IHHII BBBBBBBBI HH4s HH4s")
# ... and as the kernel dumps it: headers, RTA_TABLE, RTA_DST, RTA_GATEWAY, RTA_OIF.
_KERNEL_VIA = struct.Struct("=IHHII BBBBBBBBI HHI HH4s HH4s HHi")

# Requests per apply() send. Each route that fails costs an error message in the receive
# buffer (about 1 KiB of skb truesize, measured), so a batch must fit the receive buffer even
# when every route in it fails, or errors would be dropped (ENOBUFS). Larger batches are no
# faster: at 2048 the kernel's own work is ~90% of apply()'s time.
_BATCH = 2048
_SOCKET_BUFFER = 8 << 20
_ERROR_TRUESIZE = 2048  # with margin


# --- route data ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class NextHop:
    """One next hop. `ifindex=None` lets the kernel pick the device; `onlink` (IPIP / VXLAN:
    `via <ip> dev tunl0 onlink`) needs a device."""

    gateway: IPv4Address
    ifindex: int | None = None
    onlink: bool = False

    def __post_init__(self) -> None:
        if self.onlink and self.ifindex is None:
            raise ValueError(f"next hop {self.gateway} is onlink but names no device (ifindex)")


def _nexthop_order(nexthop: NextHop) -> tuple[int, int, bool]:
    return int(nexthop.gateway), -1 if nexthop.ifindex is None else nexthop.ifindex, nexthop.onlink


@dataclass(frozen=True, slots=True)
class Route:
    """A route Pipit owns: `dst` via `nexthops` (several = ECMP multipath) or a blackhole."""

    dst: IPv4Network
    nexthops: tuple[NextHop, ...] = ()
    blackhole: bool = False
    table: int = MAIN_TABLE

    def __post_init__(self) -> None:
        if bool(self.nexthops) == self.blackhole:
            raise ValueError(
                f"route {self.dst} needs next hops or blackhole=True, not both or neither")
        # Canonical order, so that two routes with the same next hops compare equal.
        if len(self.nexthops) > 1 or not isinstance(self.nexthops, tuple):
            object.__setattr__(self, "nexthops", tuple(sorted(self.nexthops, key=_nexthop_order)))

    def __str__(self) -> str:
        if self.blackhole:
            return f"blackhole {self.dst}"
        hops = " ".join(
            f"via {nh.gateway}" + (f" dev #{nh.ifindex}" if nh.ifindex is not None else "")
            + (" onlink" if nh.onlink else "")
            for nh in self.nexthops
        )
        return f"{self.dst} {hops}"


@dataclass(frozen=True, slots=True)
class RouteError:
    """A route the kernel refused; the routes around it were still applied."""

    route: Route
    op: str  # "add", "replace" or "delete"
    errno: int
    message: str = ""  # the kernel's extended ack text, when it gave one

    def __str__(self) -> str:
        text = f"{self.op} {self.route}: {os.strerror(self.errno)}"
        return f"{text} ({self.message})" if self.message else text


@dataclass(frozen=True, slots=True)
class ReconcileStats:
    desired: int
    found: int  # Pipit routes the kernel had before
    added: int
    replaced: int
    deleted: int
    errors: list[RouteError] = field(default_factory=list)


def satisfies(want: Route, have: Route | None) -> bool:
    """Whether `have`, the kernel's route for the same prefix, is what `want` asks for. The
    kernel reports the device it resolved for every next hop, so a wanted next hop without a
    device matches any."""
    if have is None or want.blackhole != have.blackhole or want.table != have.table:
        return False
    if len(want.nexthops) != len(have.nexthops):
        return False
    for w, h in zip(want.nexthops, have.nexthops):
        if w is not h and not (
            w.gateway == h.gateway
            and w.onlink == h.onlink
            and (w.ifindex is None or w.ifindex == h.ifindex)
        ):
            return False
    return True


def diff(
    desired: Mapping[IPv4Network, Route], actual: Mapping[IPv4Network, Route]
) -> tuple[list[Route], list[Route]]:
    """(routes to install or replace, routes to delete) to turn `actual` into `desired`."""
    to_replace = [route for dst, route in desired.items() if not satisfies(route, actual.get(dst))]
    to_delete = [route for dst, route in actual.items() if dst not in desired]
    return to_replace, to_delete


# --- netlink encoding (pure) -------------------------------------------------------------------

def _attr(kind: int, payload: bytes) -> bytes:
    size = _RTA.size + len(payload)
    return _RTA.pack(size, kind) + payload + b"\0" * (-size % 4)


def _table_fields(table: int) -> tuple[int, bytes]:
    """rtm_table holds 8 bits; larger table ids go in RTA_TABLE (as iproute2 does)."""
    return (table, b"") if table < 256 else (0, _attr(RTA_TABLE, _U32.pack(table)))


def encode_newroute(route: Route, flags: int, seq: int) -> bytes:
    """An RTM_NEWROUTE request for `route` with Pipit's protocol number."""
    dst = route.dst
    nexthops = route.nexthops
    flags |= NLM_F_REQUEST
    if len(nexthops) == 1 and route.table < 256:
        hop = nexthops[0]
        if hop.ifindex is None:
            return _VIA.pack(
                _VIA.size, RTM_NEWROUTE, flags, seq, 0,
                socket.AF_INET, dst.prefixlen, 0, 0, route.table, RTPROT_PIPIT,
                RT_SCOPE_UNIVERSE, RTN_UNICAST, 0,
                8, RTA_DST, dst.network_address.packed,
                8, RTA_GATEWAY, hop.gateway.packed,
            )
    rtm_table, attrs = _table_fields(route.table)
    attrs += _attr(RTA_DST, dst.network_address.packed)
    rtm_flags = 0
    if route.blackhole:
        rtm_type = RTN_BLACKHOLE
    elif len(nexthops) == 1:
        rtm_type = RTN_UNICAST
        hop = nexthops[0]
        attrs += _attr(RTA_GATEWAY, hop.gateway.packed)
        if hop.ifindex is not None:
            attrs += _attr(RTA_OIF, _I32.pack(hop.ifindex))
        rtm_flags = RTNH_F_ONLINK if hop.onlink else 0
    else:
        rtm_type = RTN_UNICAST
        hops = b"".join(
            _RTNH.pack(_RTNH.size + 8, RTNH_F_ONLINK if hop.onlink else 0, 0, hop.ifindex or 0)
            + _attr(RTA_GATEWAY, hop.gateway.packed)
            for hop in nexthops
        )
        attrs += _attr(RTA_MULTIPATH, hops)
    return (
        _NLMSGHDR.pack(_HEADERS + len(attrs), RTM_NEWROUTE, flags, seq, 0)
        + _RTMSG.pack(socket.AF_INET, dst.prefixlen, 0, 0, rtm_table, RTPROT_PIPIT,
                      RT_SCOPE_UNIVERSE, rtm_type, rtm_flags)
        + attrs
    )


def encode_delroute(route: Route, flags: int, seq: int) -> bytes:
    """An RTM_DELROUTE request that the kernel matches only against a route of Pipit's
    protocol for this prefix and table: another daemon's route there gives ESRCH, untouched.
    Type 0 and scope NOWHERE match a Pipit route whatever its next hops or type."""
    rtm_table, attrs = _table_fields(route.table)
    attrs += _attr(RTA_DST, route.dst.network_address.packed)
    return (
        _NLMSGHDR.pack(_HEADERS + len(attrs), RTM_DELROUTE, flags | NLM_F_REQUEST, seq, 0)
        + _RTMSG.pack(socket.AF_INET, route.dst.prefixlen, 0, 0, rtm_table, RTPROT_PIPIT,
                      RT_SCOPE_NOWHERE, 0, 0)
        + attrs
    )


def encode_dump_request(table: int, seq: int) -> bytes:
    """RTM_GETROUTE dump of IPv4 routes with Pipit's protocol in `table`; with
    NETLINK_GET_STRICT_CHK set on the socket the kernel does the filtering."""
    rtm_table, attrs = _table_fields(table)
    return (
        _NLMSGHDR.pack(_HEADERS + len(attrs), RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
        + _RTMSG.pack(socket.AF_INET, 0, 0, 0, rtm_table, RTPROT_PIPIT, 0, 0, 0)
        + attrs
    )


def _attrs(data: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each attribute in data[pos:end]."""
    while pos + 4 <= end:
        size, kind = _RTA.unpack_from(data, pos)
        if size < 4:
            return
        yield kind & 0x3FFF, pos + 4, pos + size  # strip NLA_F_NESTED / NLA_F_NET_BYTEORDER
        pos += (size + 3) & ~3


def _multipath(data: bytes, pos: int, end: int) -> tuple[NextHop, ...]:
    hops = []
    while pos + _RTNH.size <= end:
        size, flags, _, ifindex = _RTNH.unpack_from(data, pos)
        if size < _RTNH.size:
            break
        gateway = next((IPv4Address(data[s:e]) for kind, s, e in _attrs(data, pos + 8, pos + size)
                        if kind == RTA_GATEWAY), None)
        if gateway is not None:
            hops.append(NextHop(gateway, ifindex or None, bool(flags & RTNH_F_ONLINK)))
        pos += (size + 3) & ~3
    return tuple(hops)


def _decode_nexthops(
    gateway: bytes, ifindex: int, flags: int, seen: dict[tuple, tuple[NextHop, ...]]
) -> tuple[NextHop, ...]:
    """The one-hop tuple for these raw fields, shared between routes: 100k routes usually have
    only as many distinct next hops as there are nodes, so most lookups skip building one."""
    key = (gateway, ifindex, flags & RTNH_F_ONLINK)
    nexthops = seen.get(key)
    if nexthops is None:
        nexthops = seen[key] = (NextHop(IPv4Address(gateway), ifindex or None, bool(key[2])),)
    return nexthops


def _decode_network(
    dst: bytes, dst_len: int, known: dict[tuple[bytes, int], IPv4Network]
) -> IPv4Network:
    network = known.get((dst, dst_len))
    return IPv4Network((int.from_bytes(dst, "big"), dst_len)) if network is None else network


def decode_route(
    data: bytes,
    pos: int,
    end: int,
    table: int,
    seen: dict[tuple, tuple[NextHop, ...]] | None = None,
    known: dict[tuple[bytes, int], IPv4Network] | None = None,
) -> Route | None:
    """The Route in the RTM_NEWROUTE message at data[pos:end] (header included), or None if it
    is not an IPv4 Pipit unicast or blackhole route in `table` (a filter in case the kernel
    did not). `seen` shares next-hop tuples between the routes of one dump; `known` holds
    networks to reuse, keyed by (packed address, prefix length)."""
    seen = {} if seen is None else seen
    known = {} if known is None else known
    if end - pos == _KERNEL_VIA.size:
        # Fast path for the kernel's layout of `<dst> via <gateway> dev <ifindex>`.
        (_, _, _, _, _, family, dst_len, _, _, _, protocol, _, rtm_type, rtm_flags,
         _, t_table, rta_table, _, t_dst, dst, _, t_gateway, gateway, _, t_oif, ifindex,
         ) = _KERNEL_VIA.unpack_from(data, pos)
        if ((t_table, t_dst, t_gateway, t_oif) == (RTA_TABLE, RTA_DST, RTA_GATEWAY, RTA_OIF)
                and family == socket.AF_INET and protocol == RTPROT_PIPIT
                and rtm_type == RTN_UNICAST):
            if rta_table != table:
                return None
            network = _decode_network(dst, dst_len, known)
            return Route(network, _decode_nexthops(gateway, ifindex, rtm_flags, seen), False, table)

    family, dst_len, _, _, rtm_table, protocol, _, rtm_type, rtm_flags = _RTMSG.unpack_from(
        data, pos + _NLMSGHDR.size)
    if family != socket.AF_INET or protocol != RTPROT_PIPIT:
        return None
    dst = b"\0\0\0\0"
    gateway = ifindex = None
    nexthops: tuple[NextHop, ...] = ()
    for kind, start, stop in _attrs(data, pos + _HEADERS, end):
        if kind == RTA_DST:
            dst = data[start:stop]
        elif kind == RTA_GATEWAY:
            gateway = data[start:stop]
        elif kind == RTA_OIF:
            ifindex = _I32.unpack_from(data, start)[0]
        elif kind == RTA_TABLE:
            rtm_table = _U32.unpack_from(data, start)[0]
        elif kind == RTA_MULTIPATH:
            nexthops = _multipath(data, start, stop)
    if rtm_table != table:
        return None
    network = _decode_network(dst, dst_len, known)
    if rtm_type == RTN_BLACKHOLE:
        return Route(network, (), True, table)
    if rtm_type != RTN_UNICAST:
        return None  # Pipit installs no other types
    if gateway is not None:
        nexthops = _decode_nexthops(gateway, ifindex or 0, rtm_flags, seen)
    if not nexthops:
        return None  # a device route without gateway: not a shape Pipit installs
    return Route(network, nexthops, False, table)


def _error(data: bytes, flags: int, pos: int, end: int) -> tuple[int, int, str]:
    """(errno, seq of the request, extended ack text) of an NLMSG_ERROR body; errno 0 = ACK."""
    code = -_I32.unpack_from(data, pos)[0]
    length, _, _, seq, _ = _NLMSGHDR.unpack_from(data, pos + 4)
    message = ""
    if flags & NLM_F_ACK_TLVS:  # extended ack attributes follow the echoed request
        echoed = _NLMSGHDR.size if flags & NLM_F_CAPPED else (length + 3) & ~3
        for kind, start, stop in _attrs(data, pos + 4 + echoed, end):
            if kind == NLMSGERR_ATTR_MSG:
                message = data[start:stop].rstrip(b"\0").decode(errors="replace")
    return code, seq, message


def _messages(data: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """(type, flags, seq, body start, end) of each netlink message in one datagram."""
    pos = 0
    while pos + _NLMSGHDR.size <= len(data):
        length, kind, flags, seq, _ = _NLMSGHDR.unpack_from(data, pos)
        if length < _NLMSGHDR.size:
            return
        yield kind, flags, seq, pos + _NLMSGHDR.size, pos + length
        pos += (length + 3) & ~3


# --- the kernel edge -------------------------------------------------------------------------

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

    Not thread-safe: one owner (the agent's kernel reconcile loop, run in a thread)."""

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
        one costs ~2 µs, and a later dict lookup by it is an identity hit. reconcile() (and the
        agent) pass the desired prefixes, which halves the time of a 100k-route resync."""
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
            while pos + _NLMSGHDR.size <= len(data):
                length, kind, flags, msg_seq, _ = _NLMSGHDR.unpack_from(data, pos)
                if length < _NLMSGHDR.size:
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
                        code, _, message = _error(data, flags, pos + _NLMSGHDR.size, end)
                        if code == errno_codes.ENOENT:
                            return {}, False  # no such table (yet): nothing of ours in it
                        text = f"route dump of table {table}: {os.strerror(code)} {message}"
                        raise OSError(code, text.strip())
                pos = (end + 3) & ~3

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
        so apply_diff() uses it only for prefixes where the kernel holds a Pipit route."""
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
            for kind, flags, _, start, end in _messages(data):
                if kind != NLMSG_ERROR:
                    continue
                code, seq, message = _error(data, flags, start, end)
                index = (seq - first) & 0xFFFFFFFF
                if index > last:
                    continue  # a late reply to an earlier request
                route, op = chunk[index][:2]
                if code and not (op == "delete" and code == errno_codes.ESRCH):
                    errors.append(RouteError(route, op, code, message))
                if seq == last_seq:
                    return errors

    def reconcile(
        self, desired: Mapping[IPv4Network, Route], table: int = MAIN_TABLE
    ) -> ReconcileStats:
        """Make Pipit's routes in `table` exactly `desired`. Other protocols' routes are never
        touched: a new prefix is created exclusively, so one another daemon holds is reported
        (EEXIST) rather than overwritten."""
        for route in desired.values():
            if route.table != table:
                raise ValueError(
                    f"route {route} is for table {route.table}, reconciling table {table}")
        actual = self.dump(table, reuse=desired.keys())
        to_replace, to_delete = diff(desired, actual)
        added, errors = self.apply_diff(to_replace, to_delete, actual)
        return ReconcileStats(
            desired=len(desired), found=len(actual), added=added,
            replaced=len(to_replace) - added, deleted=len(to_delete), errors=errors,
        )

    def apply_diff(
        self,
        to_replace: Sequence[Route],
        to_delete: Iterable[Route],
        actual: Mapping[IPv4Network, Route],
    ) -> tuple[int, list[RouteError]]:
        """Apply what diff() found against `actual`, the kernel's Pipit routes: a prefix is
        replaced only where the kernel holds a Pipit route; any other is created exclusively,
        so a route another daemon holds there is reported (EEXIST), never overwritten.
        Returns (how many routes were new, the routes the kernel refused)."""
        new = [route for route in to_replace if route.dst not in actual]
        changed = [route for route in to_replace if route.dst in actual]
        return len(new), self.apply(replace=changed, delete=to_delete, add=new)
