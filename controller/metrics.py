"""Prometheus metrics of pipit-controller (served on /metrics with --metrics-address, as the
agent's; see bgp_agent.metrics for the serving)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from ipam.metrics import LATENCY_BUCKETS

GC_PASSES = Counter("pipit_controller_gc_passes", "GC passes, by result: ok or error.",
                    ["result"])
GC_PASS_SECONDS = Histogram("pipit_controller_gc_pass_duration_seconds",
                            "Time one GC pass took (read etcd, judge, release).",
                            buckets=LATENCY_BUCKETS)
RELEASED_ADDRESSES = Counter("pipit_controller_released_addresses",
                             "Leaked addresses released (their pod gone or holding another IP).")
RELEASED_BLOCKS = Counter("pipit_controller_released_blocks", "Empty blocks given back.")
CLEANED_NODES = Counter("pipit_controller_cleaned_nodes",
                        "Deleted Kubernetes Nodes whose IPAM state and record were removed.")
WAITING_LEAKS = Gauge("pipit_controller_leaks_in_grace",
                      "Candidate leaks seen but still within the grace period.")
LEADER = Gauge("pipit_controller_leader", "1 while this instance holds the Lease (or runs "
               "without leader election).")
