"""The agent's view of the cluster's Services and EndpointSlices, for the /32s the node
announces for services (bgp_agent.service_addresses): two informers, started only once the
BGPConfiguration names a service range and stopped when none is left, or the node is
excluded from announcing services (a cluster that announces no services pays no watch of
every Service and EndpointSlice)."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Network

from bgp_agent.kube_api import Informer, KubeAPI
from bgp_agent.service_addresses import node_service_prefixes


class NodeServices:
    def __init__(self, api: KubeAPI):
        self.api = api
        self._new_informers()
        self._tasks: list[asyncio.Task] = []
        self._waker: asyncio.Task | None = None
        self._changed = asyncio.Event()
        # the last answer, with what it was worked out of: every pass asks, and going over
        # every Service and EndpointSlice of a large cluster on each would slow them all
        self._changes = 0
        self._answer: tuple[tuple, frozenset[IPv4Network]] | None = None

    def _new_informers(self) -> None:
        api = self.api
        self.services = Informer(api, api.core.list_service_for_all_namespaces, "services")
        self.slices = Informer(api, api.discovery.list_endpoint_slice_for_all_namespaces,
                               "endpoint slices")

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    def start(self, changed: asyncio.Event) -> None:
        """Follow Services and EndpointSlices; `changed` (the routing loop's; a new loop
        after a readdress gives its own) is set on every change."""
        self._changed = changed
        if self._tasks:
            return
        self._tasks = [asyncio.create_task(i.run()) for i in (self.services, self.slices)]
        self._waker = asyncio.create_task(self._wake())

    async def _wake(self) -> None:
        while True:
            waits = [asyncio.create_task(i.changed.wait()) for i in (self.services, self.slices)]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
            self.services.changed.clear()
            self.slices.changed.clear()
            self._changes += 1
            self._changed.set()

    def prefixes(self, node: str, ranges: tuple[tuple[IPv4Network, ...], ...],
                 aggregate_balancers: bool = True) -> frozenset[IPv4Network] | None:
        """The /32s `node` announces, or None until both informers have listed once."""
        if not (self.services.ready.is_set() and self.slices.ready.is_set()):
            return None
        basis = (self._changes, node, ranges, aggregate_balancers)
        if self._answer is None or self._answer[0] != basis:
            self._answer = (basis, node_service_prefixes(
                self.services.items.values(), self.slices.items.values(), node, ranges,
                aggregate_balancers))
        return self._answer[1]

    async def close(self) -> None:
        """Stop following (the service ranges are gone, or the agent stops); start() again
        lists afresh."""
        tasks = [*self._tasks, *([self._waker] if self._waker else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if tasks:
            self._tasks, self._waker, self._answer = [], None, None
            self._new_informers()
