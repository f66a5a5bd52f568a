"""One active pipit-controller: leader election on a coordination.k8s.io Lease, as client-go
does it. A candidate takes the Lease when it has none, is its holder, or has seen the same
record (holder and renewTime) unchanged for leaseDurationSeconds by its own clock (never
comparing clocks across machines); the holder renews it every `retry` seconds and steps down
(the process exits) if it could not renew within `renew_deadline`. Writes carry the
resourceVersion read, so of two candidates only one wins (409 for the other). Stopping
cleanly gives the Lease up at once."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone

from bgp_agent.kube_api import KubeAPI, KubernetesUnavailable

log = logging.getLogger(__name__)


class LostLeadership(Exception):
    pass


def _now_micro() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElection:
    def __init__(self, api: KubeAPI, name: str, namespace: str, identity: str,
                 lease_duration: float = 15.0, renew_deadline: float = 10.0,
                 retry: float = 2.0, clock=time.monotonic):
        self.api, self.name, self.namespace, self.identity = api, name, namespace, identity
        self.lease_duration, self.renew_deadline, self.retry = (lease_duration,
                                                                renew_deadline, retry)
        self.clock = clock
        self._observed: tuple | None = None  # (holder, renewTime) last seen
        self._observed_at = 0.0
        self._renewed_at = 0.0

    def _record(self, holder: str | None, acquired: str | None, transitions: int) -> dict:
        now = _now_micro()
        return {"holderIdentity": holder, "leaseDurationSeconds": max(1, int(
                    self.lease_duration)), "acquireTime": acquired or now, "renewTime": now,
                "leaseTransitions": transitions}

    async def _try(self) -> bool:
        """One attempt to take or renew the Lease; whether we hold it now."""
        leases = self.api.coordination
        current = await self.api.call(leases.read_namespaced_lease, self.name, self.namespace,
                                      missing_ok=True)
        if current is None:
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._record(self.identity, None, 0)}
            try:
                await self.api.call(leases.create_namespaced_lease, self.namespace, body)
            except KubernetesUnavailable as error:
                log.info("could not create the Lease %s/%s: %s", self.namespace, self.name,
                         error)
                return False
            return True
        spec = current.get("spec") or {}
        holder = spec.get("holderIdentity")
        seen = (holder, spec.get("renewTime"))
        now = self.clock()
        if seen != self._observed:
            self._observed, self._observed_at = seen, now
        duration = spec.get("leaseDurationSeconds") or self.lease_duration
        if holder and holder != self.identity and now - self._observed_at < duration:
            return False  # held by another, and renewed within its duration
        ours = holder == self.identity
        transitions = (spec.get("leaseTransitions") or 0) + (0 if ours else 1)
        current["spec"] = self._record(self.identity, spec.get("acquireTime") if ours else None,
                                       transitions)
        try:
            await self.api.call(leases.replace_namespaced_lease, self.name, self.namespace,
                                current)
        except KubernetesUnavailable as error:  # 409: another candidate was faster
            log.debug("could not take the Lease: %s", error)
            return False
        if not ours:
            log.info("took the Lease %s/%s over from %s", self.namespace, self.name,
                     holder or "nobody")
        return True

    async def acquire(self) -> None:
        """Wait until this instance leads."""
        log.info("waiting to lead through the Lease %s/%s as %s", self.namespace, self.name,
                 self.identity)
        while True:
            try:
                if await self._try():
                    self._renewed_at = self.clock()
                    log.info("leading as %s", self.identity)
                    return
            except KubernetesUnavailable as error:
                log.warning("leader election: %s", error)
            await asyncio.sleep(self.retry)

    async def hold(self) -> None:
        """Renew the Lease until cancelled; raises LostLeadership when it could not."""
        while True:
            await asyncio.sleep(self.retry)
            try:
                held = await asyncio.wait_for(self._try(), self.renew_deadline)
            except (KubernetesUnavailable, asyncio.TimeoutError) as error:
                log.warning("renewing the Lease: %s", error or "no answer")
                held = None
            if held:
                self._renewed_at = self.clock()
            elif held is False or self.clock() - self._renewed_at > self.renew_deadline:
                raise LostLeadership(f"lost the Lease {self.namespace}/{self.name}: "
                                     f"{'another instance holds it' if held is False else 'could not renew it within %gs' % self.renew_deadline}.")

    async def release(self) -> None:
        """Give the Lease up (on a clean stop), so another instance takes over at once."""
        leases = self.api.coordination
        try:
            current = await self.api.call(leases.read_namespaced_lease, self.name,
                                          self.namespace, missing_ok=True)
            if current and (current.get("spec") or {}).get("holderIdentity") == self.identity:
                current["spec"] = {**current["spec"], "holderIdentity": None,
                                   "leaseDurationSeconds": 1, "renewTime": _now_micro()}
                await self.api.call(leases.replace_namespaced_lease, self.name,
                                    self.namespace, current)
                log.info("gave the Lease up")
        except KubernetesUnavailable as error:
            log.warning("could not give the Lease up: %s", error)
