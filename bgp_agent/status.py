"""What the agent says about itself: the status document (sessions, routes, dataplane), the
diagnosis of sessions that do not come up (TCP MD5), and the status socket that serves the
document, one JSON document per connection; `read_status` is its client (for `pipitctl node
status` and the lab)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from bgp_agent.model import Neighbor
from ipam.errors import PipitError
from ipam.local_socket import start_private_server

DEFAULT_STATUS_SOCKET = "/run/pipit/status.sock"
NETSTAT = "/proc/net/netstat"
# the kernel's counters of segments dropped for a TCP MD5 signature, or a TTL below GTSM's
DROP_COUNTERS = ("TCPMD5Failure", "TCPMD5NotFound", "TCPMD5Unexpected", "TCPMinTTLDrop")


class AgentUnavailable(PipitError):
    """No pipit-agent answers on the node's status socket."""


# --------------------------------------------------------------------------------------------
# The document

@dataclass
class PeerStatus:
    neighbor: Neighbor
    state: str = "idle"  # the speaker's up | down | idle, or skipped | disabled (Pipit's own)
    since: float = 0.0
    reason: str = ""
    received: int = 0
    accepted: int = 0
    rejected: int = 0
    exported: int = 0
    stale: int = 0  # routes kept from a peer restarting gracefully
    rejected_reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class Status:
    node: str
    address: str = ""
    as_number: int = 0
    peers: list[PeerStatus] = field(default_factory=list)
    kernel_routes: int = 0
    blackholes: int = 0
    exported: int = 0
    last_error: str = ""
    last_error_at: float = 0.0
    speaker_connected: bool = False
    dataplane: dict = field(default_factory=dict)
    route_reflector_cluster_id: str = ""  # this node reflects routes for this cluster id
    warnings: list[str] = field(default_factory=list)
    # the service ranges and services' /32s announced to external peers
    services: list[str] = field(default_factory=list)
    services_watched: bool = False  # following Services and EndpointSlices (service ranges)
    services_excluded: bool = False  # labelled exclude-from-external-load-balancers
    # each next hop on none of the node's links -> what it goes via ([]: nothing leads there)
    underlay: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "node": self.node, "address": self.address, "asNumber": self.as_number,
            "routeReflectorClusterId": self.route_reflector_cluster_id,
            "warnings": self.warnings,
            "speakerConnected": self.speaker_connected,
            "kernelRoutes": self.kernel_routes, "blackholes": self.blackholes,
            "exported": self.exported, "lastError": self.last_error,
            "lastErrorAt": self.last_error_at, "dataplane": self.dataplane,
            "services": self.services, "servicesWatched": self.services_watched,
            "servicesExcluded": self.services_excluded,
            "underlay": self.underlay,
            "peers": [{
                "address": str(p.neighbor.address), "asNumber": p.neighbor.peer_as,
                "type": p.neighbor.kind, "name": p.neighbor.name, "state": p.state,
                "since": p.since, "reason": p.reason, "received": p.received,
                "accepted": p.accepted, "rejected": p.rejected, "exported": p.exported,
                "stale": p.stale, "rejectedReasons": p.rejected_reasons,
                "maxPrefixes": p.neighbor.max_prefixes, "rrClient": p.neighbor.rr_client,
                "password": p.neighbor.password is not None,
                "filters": [f.name for f in p.neighbor.filters],
                "ttlSecurity": p.neighbor.ttl_security,
                "localAsNumber": p.neighbor.local_as,
                "reachableBy": str(p.neighbor.reachable_by or ""),
                "nextHopSelf": p.neighbor.next_hop_self,
            } for p in self.peers],
        }


# --------------------------------------------------------------------------------------------
# Why a session does not come up: the kernel's counters of segments it dropped

def read_drop_counters(path: str = NETSTAT) -> dict[str, int]:
    """The kernel's DROP_COUNTERS of this network namespace (TcpExt in /proc/net/netstat):
    segments dropped for a wrong TCP MD5 signature, a missing one, one nobody expected, or a
    TTL below GTSM's minimum."""
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines, lines[1:]):
        if names.startswith("TcpExt:") and values.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:]))
            return {k: int(table[k]) for k in DROP_COUNTERS if k in table}
    return {}


def md5_diagnosis(password_set: bool, grown: Mapping[str, int]) -> str:
    """What the kernel's TCP MD5 counters (their growth while a session is not up) say about
    it: segments dropped for a wrong signature, for a missing one, or for an unexpected one."""
    failure = grown.get("TCPMD5Failure", 0)
    missing = grown.get("TCPMD5NotFound", 0)
    unexpected = grown.get("TCPMD5Unexpected", 0)
    if password_set and failure > 0:
        return (f"TCP MD5 signatures do not match: the passwords differ (the kernel dropped "
                f"{_segments(failure)} with a wrong signature)")
    if password_set and missing > 0:
        return (f"the peer sends no TCP MD5 signature but a password is set here: it has "
                f"none (the kernel dropped {_segments(missing)} without one)")
    if not password_set and unexpected > 0:
        return (f"the peer signs with TCP MD5 but no password is set here (the kernel "
                f"dropped {_segments(unexpected)} signed with one)")
    return ""


def ttl_diagnosis(hops: int, grown: Mapping[str, int]) -> str:
    """What the kernel's count of segments dropped for too low a TTL says about a session
    under GTSM (ttlSecurity `hops`) that is not up."""
    dropped = grown.get("TCPMinTTLDrop", 0)
    if not hops or dropped <= 0:
        return ""
    return (f"the peer's segments arrive with a TTL below {256 - hops}, the least ttlSecurity "
            f"{hops} accepts: it does not run GTSM (BIRD: ttl security on) or is more than "
            f"{hops} hop{'' if hops == 1 else 's'} away (the kernel dropped "
            f"{_segments(dropped)})")


def _segments(count: int) -> str:
    return f"{count} segment{'' if count == 1 else 's'}"


class DropWatch:
    """The counters as they were when each session was last up (or its neighbour changed):
    their growth since is what a session that is not up has run into. The counters are the
    namespace's, not per peer."""

    def __init__(self):
        self._base: dict[IPv4Address, tuple[Neighbor, dict[str, int]]] = {}

    def diagnose(self, neighbor: Neighbor, up: bool, counters: dict[str, int]) -> str:
        base = self._base.get(neighbor.address)
        if up or base is None or base[0] != neighbor:
            self._base[neighbor.address] = (neighbor, counters)
            return ""
        grown = {k: counters.get(k, 0) - base[1].get(k, 0) for k in DROP_COUNTERS}
        return (md5_diagnosis(neighbor.password is not None, grown)
                or ttl_diagnosis(neighbor.ttl_security, grown))

    def keep_only(self, addresses: set[IPv4Address]) -> None:
        for address in set(self._base) - addresses:
            del self._base[address]


# --------------------------------------------------------------------------------------------
# The socket

class StatusServer:
    def __init__(self, path: str, snapshot: Callable[[], dict]):
        self.path = path
        self.snapshot = snapshot
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server = await start_private_server(self._serve, self.path)

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
        raise AgentUnavailable(f"pipit-agent is not running on this node (nothing answers on "
                               f"{path}: {reason}).") from None
    try:
        status = json.loads(data)
        if not isinstance(status, dict):
            raise ValueError
    except ValueError:
        raise AgentUnavailable(f"pipit-agent on {path} closed the connection without a "
                               "status answer (did it stop or restart?); try again.") from None
    return status
