"""Prometheus metrics of IPAM and of Pipit's etcd transactions (the agent serves them on
/metrics; see bgp_agent.metrics). Counters only where something happens; what can be read
off the agent's state is collected at scrape time instead."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

# Milliseconds to seconds: an ADD answered from the agent's cache, one etcd round, a claim.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)

IPAM_REQUESTS = Counter(
    "pipit_ipam_requests", "IPAM requests the agent answered, by CNI command and result (ok, "
    "or the error kind, such as PoolExhausted or DatastoreUnavailable).",
    ["command", "result"])
IPAM_REQUEST_SECONDS = Histogram(
    "pipit_ipam_request_duration_seconds", "Time the agent took to answer an IPAM request, "
    "by CNI command (ADD: the allocation, committed to etcd).", ["command"],
    buckets=LATENCY_BUCKETS)
ETCD_TRANSACTIONS = Counter(
    "pipit_etcd_transactions", "etcd transactions, by result: committed, or conflict (another "
    "writer changed a compared key first; the change is decided again and retried).",
    ["result"])
ETCD_GAVE_UP = Counter(
    "pipit_etcd_transaction_retries_exhausted", "Changes that kept colliding with concurrent "
    "writers until their retries ran out (the caller got a try-again error).")
ETCD_UNAVAILABLE = Counter(
    "pipit_etcd_unavailable", "etcd requests that failed for want of an answer (etcd down, "
    "paused, unreachable or too slow).")
