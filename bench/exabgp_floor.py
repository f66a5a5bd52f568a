"""ExaBGP's own work on a workload's routes, with nothing else: every route decoded once from
the UPDATEs its client sends and encoded once into UPDATEs for a peer, in this process, with
pipit-exabgp's changes to ExaBGP applied (`bgp_agent.exabgp_reactor`, `exabgp_fanout`). No sockets, no API, no
JSON, no agent and no reflection decision: the least any route reflector that speaks BGP
through ExaBGP does, wherever its reflection runs (in the agent, as Pipit's, or inside the
ExaBGP process). `bench.rr` prints it beside BIRD's time for the same workload, measured in
the same run.

    .venv/bin/python -m bench.exabgp_floor [--prefixes 5000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

MESSAGE_SIZE = 4096  # BGP's without the extended-message capability (BIRD's clients here)
HEADER = 19


def _attribute(flags: int, code: int, value: bytes) -> bytes:
    return bytes((flags, code, len(value))) + value


def client_attributes(next_hop: IPv4Address, as_number: int = 64512) -> bytes:
    """ORIGIN IGP, an AS_PATH of one AS, NEXT_HOP, LOCAL_PREF 100: what an iBGP client's
    UPDATE carries (the one AS makes ExaBGP parse a path, as for an eBGP-learnt route)."""
    return (_attribute(0x40, 1, b"\x00")
            + _attribute(0x40, 2, b"\x02\x01" + as_number.to_bytes(4, "big"))
            + _attribute(0x40, 3, next_hop.packed)
            + _attribute(0x40, 5, (100).to_bytes(4, "big")))


def updates(prefixes: Sequence[IPv4Network], attributes: bytes) -> list[bytes]:
    """UPDATE bodies (after the 19-octet header) announcing `prefixes`, as full as BGP's
    4096 octets allow, all with `attributes`."""
    room = MESSAGE_SIZE - HEADER - 4 - len(attributes)
    bodies, nlri = [], b""
    for prefix in prefixes:
        packed = bytes((prefix.prefixlen,)) + prefix.network_address.packed[
            :(prefix.prefixlen + 7) // 8]
        if len(nlri) + len(packed) > room:
            bodies.append(_body(attributes, nlri))
            nlri = b""
        nlri += packed
    if nlri:
        bodies.append(_body(attributes, nlri))
    return bodies


def _body(attributes: bytes, nlri: bytes) -> bytes:
    return b"\x00\x00" + len(attributes).to_bytes(2, "big") + attributes + nlri


@dataclass(frozen=True)
class Floor:
    routes: int
    decode: float  # s
    encode: float  # s
    messages: int  # UPDATEs encoded

    @property
    def seconds(self) -> float:
        return self.decode + self.encode


def _session():
    """What decoding and encoding an IPv4 unicast UPDATE read of ExaBGP's Negotiated (an iBGP
    session with 4-octet AS numbers, no ADD-PATH, no extended messages)."""
    from types import SimpleNamespace

    from exabgp.bgp.message.open.asn import ASN
    from exabgp.protocol.family import AFI, SAFI
    return SimpleNamespace(
        families=[(AFI.ipv4, SAFI.unicast)], msg_size=MESSAGE_SIZE, asn4=True, aigp=False,
        addpath=SimpleNamespace(send=lambda afi, safi: False, receive=lambda afi, safi: False),
        local_as=ASN(64512), peer_as=ASN(64512), cached_attributes=None, cached_wire=b"")


@functools.cache
def _prepare() -> None:
    """ExaBGP's logger as its start-up sets it, and pipit-exabgp's changes (its reactor's and
    fan-out's, as `pipit-exabgp` installs them), once."""
    from exabgp.environment import getenv
    from exabgp.logger import log

    from bgp_agent import exabgp_fanout, exabgp_reactor
    log.init(getenv())
    for problem in (exabgp_reactor.apply(), exabgp_fanout.apply()):
        if problem:
            raise RuntimeError(f"pipit-exabgp's changes do not apply: {problem}")


def measure(base: Sequence[Sequence[IPv4Network]], next_hops: Sequence[IPv4Address],
            repeat: int = 3) -> Floor:
    """Best of `repeat`: each client's prefixes (base[i], from next_hops[i]) decoded from its
    UPDATEs, then all of them encoded once into UPDATEs for one peer."""
    _prepare()
    from exabgp.bgp.message import Action
    from exabgp.bgp.message.direction import Direction
    from exabgp.bgp.message.update import Update
    from exabgp.protocol.family import AFI, SAFI
    from exabgp.protocol.ip import IP
    from exabgp.rib.change import Change
    from exabgp.rib.outgoing import OutgoingRIB

    session = _session()
    sent = [(updates(prefixes, client_attributes(hop)), IP.create(str(hop)))
            for prefixes, hop in zip(base, next_hops)]
    best: Floor | None = None
    for _ in range(repeat):
        started = time.perf_counter()
        received = [(Update.unpack_message(body, Direction.IN, session), hop)
                    for bodies, hop in sent for body in bodies]
        decoded = time.perf_counter()
        rib = OutgoingRIB(True, [(AFI.ipv4, SAFI.unicast)])
        routes = 0
        for update, hop in received:
            for nlri in update.nlris:
                nlri.nexthop, nlri.action = hop, Action.ANNOUNCE  # as ExaBGP's receive sets them
                rib.add_to_rib(Change(nlri, update.attributes))
                routes += 1
        messages = [m for update in rib.updates(True) for m in update.messages(session)]
        done = time.perf_counter()
        _check(received, messages, routes, session)
        floor = Floor(routes, decoded - started, done - decoded, len(messages))
        if best is None or floor.seconds < best.seconds:
            best = floor
    return best


def _check(received, messages: list[bytes], routes: int, session) -> None:
    """What was timed did the work: every route decoded as an announcement with the client's
    attributes, and every one in the UPDATEs encoded (read back by ExaBGP)."""
    from exabgp.bgp.message.direction import Direction
    from exabgp.bgp.message.update import Update
    from exabgp.bgp.message.update.attribute import Attribute
    if any(Attribute.CODE.AS_PATH not in update.attributes for update, _ in received):
        raise RuntimeError("ExaBGP did not decode the clients' attributes")
    sent = sum(len(Update.unpack_message(m[HEADER:], Direction.IN, session).nlris)
               for m in messages)
    if sent != routes or routes != sum(len(update.nlris) for update, _ in received):
        raise RuntimeError(f"{routes} routes decoded, {sent} encoded")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefixes", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    pool = IPv4Network("10.128.0.0/12")
    base = [[IPv4Network((int(pool.network_address) + 64 * n, 26))
             for n in range(args.prefixes)]]
    floor = measure(base, [IPv4Address("10.77.0.2")], args.repeat)
    print(f"ExaBGP alone, {floor.routes} routes decoded and encoded once (best of "
          f"{args.repeat}): {floor.seconds * 1e3:.1f} ms (decode {floor.decode * 1e3:.1f}, "
          f"encode {floor.encode * 1e3:.1f} into {floor.messages} UPDATEs), "
          f"{floor.seconds / floor.routes * 1e6:.1f} us a route")


if __name__ == "__main__":
    main()
