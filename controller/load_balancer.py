"""pipit-controller's load-balancer addresses (ipam.load_balancer says which services, and
what they ask for): it follows Services, gives each managed one its address from IPAM
(claimed under the service's handle on the virtual node `load-balancer`) and writes it into
the service's status; it releases the address of a service deleted, no longer a
LoadBalancer, given to another class, or asking for another address or pool, and takes that
address out of the status. A pass runs soon after any Service changes, and every
RESYNC_SECONDS. Each address given is an Event on the service; a request that cannot be met
(a bad annotation, a pool exhausted) is a Warning Event and a log line, once per problem, the
service keeps what it had, and it is tried again at each pass."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Mapping
from datetime import datetime, timezone
from ipaddress import IPv4Address

from bgp_agent.kube_api import Event, Informer, KubeAPI, KubernetesUnavailable
from controller.passes import run_passes
from ipam import keys
from ipam import load_balancer as lb
from ipam.allocator import IPAM
from ipam.errors import DatastoreUnavailable, PipitError
from ipam.pool import LOAD_BALANCER, LOAD_BALANCER_NODE, IPPool, read_pools
from ipam.store import Store

log = logging.getLogger("pipit-controller")
RESYNC_SECONDS = 30.0
COMPONENT = "pipit-controller"
DEBOUNCE = 0.2  # seconds: changes coming together make one pass


class LoadBalancers:
    def __init__(self, store: Store, api: KubeAPI, mode: str = lb.ALL_SERVICES):
        self.store, self.api, self.mode = store, api, mode
        self.allocator = IPAM(store)
        self.wake = asyncio.Event()
        self.services = Informer(api, api.core.list_service_for_all_namespaces, "services",
                                 on_event=self._on_service)
        self._problems: dict[str, str] = {}  # handle -> the problem last logged for it
        self.passes = 0

    def _on_service(self, event: Event) -> None:
        self.wake.set()

    async def run(self) -> None:
        follow = asyncio.create_task(self.services.run())
        try:
            await self.services.ready.wait()
            log.info("load-balancer addresses: %d Services known (%s)",
                     len(self.services.items), self.mode)
            await run_passes(self.run_pass, self.wake, RESYNC_SECONDS, "load-balancer pass",
                             DEBOUNCE)
        finally:
            follow.cancel()
            await asyncio.gather(follow, return_exceptions=True)

    async def run_pass(self) -> None:
        pools = [pool for pool, _ in read_pools(await self.store.list(keys.POOLS))]
        assigning = any(LOAD_BALANCER in p.allowed_uses and not p.disabled for p in pools)
        services = {(s["metadata"].get("namespace"), s["metadata"]["name"]): s
                    for s in list(self.services.items.values())}
        addresses = await self.allocator.addresses_under(lb.HANDLE_PREFIX)
        held = {lb.service_of(handle_id): handle_id for handle_id in addresses}
        held.pop(None, None)
        for key, service in sorted(services.items()):
            if lb.managed(service, self.mode) and (assigning or key in held):
                await self._serve(service, pools, addresses.get(held.get(key), []))
        for key, handle_id in sorted(held.items()):
            service = services.get(key)
            if service is None or not lb.managed(service, self.mode):
                await self._release(handle_id, service)
        self.passes += 1

    async def _serve(self, service: Mapping, pools: list[IPPool],
                     had: list[IPv4Address]) -> None:
        """Give the service what it asks for (`had`: what its handle holds)."""
        namespace, name = service["metadata"].get("namespace"), service["metadata"]["name"]
        handle_id = lb.handle_of(namespace, name)
        try:
            wanted = lb.wanted(service, pools)
            have = had
            if len(have) > 1 or not all(wanted.satisfied_by(a, pools) for a in have):
                log.info("service %s/%s: releasing %s, not what it asks for now", namespace,
                         name, ", ".join(map(str, have)))
                await self.allocator.release(LOAD_BALANCER_NODE, handle_id)
                have = []
            if not have:
                have = await self.allocator.assign(
                    LOAD_BALANCER_NODE, handle_id,
                    attributes={"namespace": namespace, "service": name},
                    pools=wanted.pools,
                    addresses=(wanted.address,) if wanted.address else (),
                    use=LOAD_BALANCER, namespace_labels=await self._namespace_labels(
                        namespace, pools))
                log.info("service %s/%s: load-balancer address %s", namespace, name,
                         ", ".join(map(str, have)))
                await self._event(service, "Normal", "LoadBalancerAddressAssigned",
                                  f"Assigned load-balancer address {', '.join(map(str, have))}.")
        except PipitError as error:
            if _transient(error):
                raise
            if self._problems.get(handle_id) != str(error):
                self._problems[handle_id] = str(error)
                log.warning("service %s/%s gets no load-balancer address: %s", namespace, name,
                            error)
                await self._event(service, "Warning", "NoLoadBalancerAddress",
                                  f"No load-balancer address: {error}")
            return
        self._problems.pop(handle_id, None)
        await self._report(service, have[0], set(had))

    async def _event(self, service: Mapping, kind: str, reason: str, message: str) -> None:
        """A Kubernetes Event on the service (`kubectl describe service` shows it); one that
        cannot be written is only logged."""
        metadata = service["metadata"]
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"generateName": f"{metadata['name']}.",
                             "namespace": metadata.get("namespace")},
                "involvedObject": {"apiVersion": "v1", "kind": "Service",
                                   "namespace": metadata.get("namespace"),
                                   "name": metadata["name"], "uid": metadata.get("uid")},
                "type": kind, "reason": reason, "message": message, "count": 1,
                "firstTimestamp": now, "lastTimestamp": now,
                "source": {"component": COMPONENT}, "reportingComponent": COMPONENT}
        try:
            await self.api.call(self.api.core.create_namespaced_event,
                                metadata.get("namespace"), body)
        except PipitError as error:
            log.info("could not record an event on service %s/%s: %s",
                     metadata.get("namespace"), metadata["name"], error)

    async def _namespace_labels(self, namespace: str, pools: list[IPPool]
                                ) -> Mapping[str, str] | None:
        """The namespace's labels, read only when a LoadBalancer pool has a
        namespaceSelector."""
        if not any(LOAD_BALANCER in p.allowed_uses and p.namespace_selector for p in pools):
            return None
        found = await self.api.namespace(namespace)
        return ((found or {}).get("metadata") or {}).get("labels") or {}

    async def _release(self, handle_id: str, service: Mapping | None) -> None:
        released = await self.allocator.release(LOAD_BALANCER_NODE, handle_id)
        self._problems.pop(handle_id, None)
        namespace, name = lb.service_of(handle_id)
        log.info("service %s/%s: released load-balancer address %s (%s)", namespace, name,
                 ", ".join(map(str, released)) or "-",
                 "the service is gone" if service is None else "no longer Pipit's to serve")
        if service is not None:
            await self._report(service, None, set(released))

    async def _report(self, service: Mapping, ours: IPv4Address | None,
                      previous: set[IPv4Address]) -> None:
        ingress = lb.ingress_with(service, ours, previous)
        if ingress is None:
            return
        updated = copy.deepcopy(dict(service))
        updated.setdefault("status", {}).setdefault("loadBalancer", {})["ingress"] = ingress
        metadata = service["metadata"]
        await self.api.call(self.api.core.replace_namespaced_service_status, metadata["name"],
                            metadata.get("namespace"), updated)


def _transient(error: PipitError) -> bool:
    """etcd or the Kubernetes API away: the pass fails and is tried again, nothing logged per
    service."""
    return isinstance(error, DatastoreUnavailable) or (
        isinstance(error, KubernetesUnavailable) and not getattr(error, "refused", False))
