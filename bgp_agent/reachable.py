"""Waiting at start for what the agent cannot work without (etcd, the Kubernetes API), as
calico-node waits for its datastore: nodes, etcd and the API server powered on together come
up together, instead of each agent exiting into a kubelet's growing restart back-off (up to
five minutes without networking for new pods).

A request that cannot reach the service is tried again 1 s after the first failure, then
twice as long each time up to RETRY_MAX; the failure is logged at once and again every
REPORT_EVERY while it lasts. A service that answers refusing (etcd authentication, a
Kubernetes 401 or 403) ends the wait at once: waiting would not change its answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from bgp_agent.kube_api import KubernetesUnavailable
from ipam.errors import DatastoreUnavailable

log = logging.getLogger("pipit-agent")

RETRY_FIRST, RETRY_MAX, REPORT_EVERY = 1.0, 8.0, 60.0

T = TypeVar("T")


async def when_reachable(attempt: Callable[[], Awaitable[T]], stop: asyncio.Event,
                         waiting: str, answered: str,
                         problem: Callable[[str], None] | None = None) -> T | None:
    """attempt()'s answer, tried again while it cannot reach etcd or the Kubernetes API; None
    if `stop` comes first. `waiting` starts the warning ("node n1 not registered yet"),
    `answered` the line logged once a wait is over ("etcd answered"); `problem` is told each
    failure (for the readiness probe)."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    delay, reported = RETRY_FIRST, None
    while True:
        try:
            result = await attempt()
            break
        except (DatastoreUnavailable, KubernetesUnavailable) as error:
            if error.refused:
                raise
            if problem is not None:
                problem(str(error))
            now = loop.time()
            if reported is None or now - reported >= REPORT_EVERY:
                log.warning("%s, trying again: %s", waiting, error)
                reported = now
        try:
            await asyncio.wait_for(stop.wait(), delay)
            return None
        except asyncio.TimeoutError:
            delay = min(delay * 2, RETRY_MAX)
    if reported is not None:
        log.info("%s after %.0f s", answered, loop.time() - began)
    return result
