"""The agent's view of the pods on its node and of the namespaces, for pool and address
selection by annotation at CNI ADD (ipam.annotations): two informers (pods with
`spec.nodeName=<node>`, namespaces), with a direct GET when the pod or namespace is not (yet)
in the cache."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from bgp_agent.kube_api import Informer, KubeAPI, KubernetesUnavailable
from ipam.annotations import PodRequest, pod_request
from ipam.errors import DatastoreUnavailable

log = logging.getLogger(__name__)


class PodAnnotations:
    def __init__(self, api: KubeAPI, node: str):
        self.api = api
        self.pods = Informer(api, api.core.list_pod_for_all_namespaces, f"pods on {node}",
                             field_selector=f"spec.nodeName={node}")
        self.namespaces = Informer(api, api.core.list_namespace, "namespaces")
        self._tasks: list[asyncio.Task] = []
        self.misses = 0  # lookups the caches could not answer (a GET was made)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(i.run()) for i in (self.pods, self.namespaces)]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _metadata(self, informer: Informer, key: str, get) -> dict:
        obj = informer.items.get(key)
        if obj is None:
            self.misses += 1
            try:
                obj = await get()
            except KubernetesUnavailable as error:
                raise DatastoreUnavailable(f"cannot read {key} from Kubernetes for its "
                                           f"annotations: {error}") from None
        return (obj or {}).get("metadata") or {}

    async def request(self, namespace: str, pod: str) -> PodRequest:
        """What the pod's (and its namespace's) annotations ask for, with the namespace's
        labels (pools' namespaceSelector)."""
        ns = await self._metadata(self.namespaces, namespace,
                                  lambda: self.api.namespace(namespace))
        own = await self._metadata(self.pods, f"{namespace}/{pod}",
                                   lambda: self.api.pod(namespace, pod))
        return replace(pod_request(namespace, pod, dict(ns.get("annotations") or {}),
                                   dict(own.get("annotations") or {})),
                       namespace_labels=dict(ns.get("labels") or {}))
