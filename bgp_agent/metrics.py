"""Prometheus metrics of the agent's routing (and, through ipam.metrics, its IPAM), served on
/metrics at `--metrics-address HOST:PORT` (off unless given). Names are `pipit_...`, with units
in names and `_total` on counters (the client library adds it); no per-pod labels. Peers are
labelled by address and type, as `pipitctl node status` lists them.

What the routing loop's status already says (sessions, prefixes per peer, kernel routes,
blocks and addresses of this node) is read at scrape time by `StatusCollector`; events are
counted where they happen (passes, kernel refusals, ExaBGP restarts).
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator

from prometheus_client import Counter, Histogram, start_http_server
from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector

from ipam.metrics import LATENCY_BUCKETS

RECONCILE_PASSES = Counter(
    "pipit_reconcile_passes", "Passes of the routing loop (select peers, import, program the "
    "kernel, announce), by result: ok or error.", ["result"])
RECONCILE_SECONDS = Histogram(
    "pipit_reconcile_duration_seconds", "Time one pass of the routing loop took.",
    buckets=LATENCY_BUCKETS)
KERNEL_ROUTE_ERRORS = Counter(
    "pipit_kernel_route_errors", "Routes the kernel refused to install or delete.")
KERNEL_ROUTE_CHANGES = Counter(
    "pipit_kernel_route_changes", "Routes added, replaced or deleted in the kernel.", ["op"])
EXABGP_RESTARTS = Counter(
    "pipit_exabgp_restarts", "Times the agent restarted an ExaBGP that had exited.")


class StatusCollector(Collector):
    """Gauges read off the agent's status document (routing.Status.to_json) at scrape time."""

    def __init__(self, status: Callable[[], dict], ipam: Callable[[], dict] | None = None):
        self.status = status
        self.ipam = ipam  # () -> {"blocks": {pool: n}, "addresses": {pool: n}}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        status = self.status()
        connected = GaugeMetricFamily(
            "pipit_speaker_connected", "1 while the BGP speaker (ExaBGP, through its bridge) "
            "is connected to the agent.")
        connected.add_metric([], 1.0 if status.get("speakerConnected") else 0.0)
        yield connected
        sessions = GaugeMetricFamily(
            "pipit_bgp_sessions", "BGP sessions of this node, by state (up, down, idle, "
            "disabled, skipped) and peer type (mesh, global, node, reflector, peer-node).",
            labels=["state", "type"])
        for (state, kind), count in sorted(Tally((p["state"], p["type"])
                                                 for p in status.get("peers", [])).items()):
            sessions.add_metric([state, kind], count)
        yield sessions
        families = {what: GaugeMetricFamily(
            f"pipit_bgp_prefixes_{what}", f"Prefixes {words} per BGP peer, now.",
            labels=["peer", "type"]) for what, words in (
                ("received", "received"), ("accepted", "accepted by the import policy"),
                ("rejected", "rejected by the import policy"),
                ("exported", "announced to the peer"), ("stale", "kept while the peer restarts"))}
        for peer in status.get("peers", []):
            if peer["state"] == "skipped":
                continue
            for what, family in families.items():
                family.add_metric([peer["address"], peer["type"]], peer.get(what, 0))
        yield from families.values()
        routes = GaugeMetricFamily(
            "pipit_kernel_routes", "Pipit's routes in the node's kernel (protocol 91), by kind: "
            "learned (to other nodes' blocks) or blackhole (this node's own blocks).",
            labels=["kind"])
        routes.add_metric(["learned"], status.get("kernelRoutes", 0))
        routes.add_metric(["blackhole"], status.get("blackholes", 0))
        yield routes
        if self.ipam is not None:
            owned = self.ipam()
            blocks = GaugeMetricFamily("pipit_ipam_blocks_owned", "Blocks this node holds a "
                                       "confirmed affinity for, per pool.", labels=["pool"])
            used = GaugeMetricFamily("pipit_ipam_addresses_in_use", "Addresses held by this "
                                     "node's pods and tunnels, per pool.", labels=["pool"])
            for pool, count in sorted(owned.get("blocks", {}).items()):
                blocks.add_metric([pool], count)
            for pool, count in sorted(owned.get("addresses", {}).items()):
                used.add_metric([pool], count)
            yield blocks
            yield used


def serve(address: str) -> None:
    """Serve /metrics at HOST:PORT, in a thread of the client library's: Pipit's metrics
    beside the library's process and Python metrics."""
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0")


def register(collector: Collector) -> None:
    REGISTRY.register(collector)


def unregister(collector: Collector) -> None:
    REGISTRY.unregister(collector)


def metrics_address(text: str) -> str:
    """--metrics-address: HOST:PORT (HOST may be empty for every address)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT, such as 127.0.0.1:9091 or :9091")
    return text
