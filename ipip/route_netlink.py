"""Pipit's routes in netlink messages (linux/rtnetlink.h): RTM_NEWROUTE / RTM_DELROUTE
requests, the dump request, and the kernel's answers decoded. Pure: bytes in, bytes out.

Requests are packed here rather than by pyroute2, whose per-call `IPRoute.route()` manages
about 1.2k routes/s, far too slow for 100k routes (links and addresses stay with pyroute2).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

from ipip.routes import RTPROT_PIPIT, FibMatch, NextHop, Route

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
RTM_F_FIB_MATCH = 0x2000  # RTM_GETROUTE: answer the matching route, not a resolved one

NLMSGERR_ATTR_MSG = 1

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTA = struct.Struct("=HH")  # len, type
_RTNH = struct.Struct("=HBBi")  # len, flags, hops, ifindex
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")
_HEADERS = NLMSGHDR.size + _RTMSG.size
# The common case, `<block> via <gateway>`, packed in one call: headers, RTA_DST, RTA_GATEWAY.
_VIA = struct.Struct("=IHHII BBBBBBBBI HH4s HH4s")
# ... and as the kernel dumps it: headers, RTA_TABLE, RTA_DST, RTA_GATEWAY, RTA_OIF.
_KERNEL_VIA = struct.Struct("=IHHII BBBBBBBBI HHI HH4s HH4s HHi")


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
        NLMSGHDR.pack(_HEADERS + len(attrs), RTM_NEWROUTE, flags, seq, 0)
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
        NLMSGHDR.pack(_HEADERS + len(attrs), RTM_DELROUTE, flags | NLM_F_REQUEST, seq, 0)
        + _RTMSG.pack(socket.AF_INET, route.dst.prefixlen, 0, 0, rtm_table, RTPROT_PIPIT,
                      RT_SCOPE_NOWHERE, 0, 0)
        + attrs
    )


def encode_dump_request(table: int, seq: int) -> bytes:
    """RTM_GETROUTE dump of IPv4 routes with Pipit's protocol in `table`; with
    NETLINK_GET_STRICT_CHK set on the socket the kernel does the filtering."""
    rtm_table, attrs = _table_fields(table)
    return (
        NLMSGHDR.pack(_HEADERS + len(attrs), RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
        + _RTMSG.pack(socket.AF_INET, 0, 0, 0, rtm_table, RTPROT_PIPIT, 0, 0, 0)
        + attrs
    )


def encode_fib_lookup(address: IPv4Address, seq: int) -> bytes:
    """RTM_GETROUTE for the route the kernel would send `address`'s traffic by, as it stands
    in its table (`ip route get fibmatch ADDRESS`)."""
    attrs = _attr(RTA_DST, address.packed)
    return (
        NLMSGHDR.pack(_HEADERS + len(attrs), RTM_GETROUTE, NLM_F_REQUEST, seq, 0)
        + _RTMSG.pack(socket.AF_INET, 32, 0, 0, 0, 0, 0, 0, RTM_F_FIB_MATCH)
        + attrs
    )


def decode_fib_match(data: bytes, pos: int, end: int) -> FibMatch:
    """The route in the kernel's RTM_NEWROUTE answer to encode_fib_lookup (header included)."""
    _, dst_len, _, _, rtm_table, protocol, _, rtm_type, rtm_flags = _RTMSG.unpack_from(
        data, pos + NLMSGHDR.size)
    dst, gateway, ifindex, _, nexthops = _route_attributes(data, pos, end, rtm_table)
    if gateway is not None:
        nexthops = (NextHop(IPv4Address(gateway), ifindex or None,
                            bool(rtm_flags & RTNH_F_ONLINK and ifindex)),)
    return FibMatch(IPv4Network((int.from_bytes(dst, "big"), dst_len)), rtm_type, protocol,
                    nexthops, ifindex or None)


def _route_attributes(data: bytes, pos: int, end: int, rtm_table: int
                      ) -> tuple[bytes, bytes | None, int, int, tuple[NextHop, ...]]:
    """(destination, gateway, device, table, multipath next hops) of the route message at
    data[pos:end]: 0.0.0.0, None and 0 where absent; the table from RTA_TABLE if given."""
    dst = b"\0\0\0\0"
    gateway = None
    ifindex = 0
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
    return dst, gateway, ifindex, rtm_table, nexthops


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
        data, pos + NLMSGHDR.size)
    if family != socket.AF_INET or protocol != RTPROT_PIPIT:
        return None
    dst, gateway, ifindex, rtm_table, nexthops = _route_attributes(data, pos, end, rtm_table)
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


def decode_error(data: bytes, flags: int, pos: int, end: int) -> tuple[int, int, str]:
    """(errno, seq of the request, extended ack text) of an NLMSG_ERROR body; errno 0 = ACK."""
    code = -_I32.unpack_from(data, pos)[0]
    length, _, _, seq, _ = NLMSGHDR.unpack_from(data, pos + 4)
    message = ""
    if flags & NLM_F_ACK_TLVS:  # extended ack attributes follow the echoed request
        echoed = NLMSGHDR.size if flags & NLM_F_CAPPED else (length + 3) & ~3
        for kind, start, stop in _attrs(data, pos + 4 + echoed, end):
            if kind == NLMSGERR_ATTR_MSG:
                message = data[start:stop].rstrip(b"\0").decode(errors="replace")
    return code, seq, message


def split_messages(data: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """(type, flags, seq, body start, end) of each netlink message in one datagram."""
    pos = 0
    while pos + NLMSGHDR.size <= len(data):
        length, kind, flags, seq, _ = NLMSGHDR.unpack_from(data, pos)
        if length < NLMSGHDR.size:
            return
        yield kind, flags, seq, pos + NLMSGHDR.size, pos + length
        pos += (length + 3) & ~3
