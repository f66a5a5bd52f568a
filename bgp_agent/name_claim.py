"""One agent per node name. Two hosts started with the same name (cloned images keep their
host name; a NODENAME copied between machines) would share one record and its blocks: the
record's address flips at each start, both announce the same blocks, and half the pods of
either cannot be reached, with nothing saying why (Calico behaves so). Each agent holds
/pipit/agents/<node> by an etcd lease it renews while it runs; the value names its host.

- Free (never held, or its lease lapsed: that agent is gone) or held from this host (an
  agent restarting here, a rolling update): the agent takes it at once.
- Held from another host: the agent waits, for at most the lease's time and a little more,
  for that claim to lapse (a host that died a moment ago); a claim still renewed then
  belongs to a live agent, and this one stops in one sentence naming that host.

A host is its boot id and its network namespace: an agent restarted on the same machine (in
a pod with the host's network, or in a lab node's namespace) is the same host; another
machine, or another lab node, is not. etcd away at start is waited for as for the
registration; a claim that lapses while the agent runs (etcd away longer than its lease) is
taken again once etcd answers, and if another host took it meanwhile, that is said, loudly,
without stopping this agent's routing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from ipam import keys
from ipam.errors import DatastoreUnavailable, InvalidResource
from ipam.store import Entry, Store

log = logging.getLogger("pipit-agent")

CLAIM_TTL = 30  # seconds an agent's claim outlives it
RENEW_EVERY = CLAIM_TTL / 3
RECHECK_EVERY = 1.0  # while waiting for another host's claim to lapse
RELEASE_TIMEOUT = 2.0  # an agent stopping does not wait long for etcd to end its claim


@dataclass(frozen=True)
class Holder:
    """Who holds a node name: the host (what stays the same across the agent's restarts on
    one machine), and what a person needs to find it."""
    host: str
    hostname: str
    pid: int
    since: str

    def describe(self) -> str:
        return f"host {self.hostname} (pid {self.pid}, since {self.since})"


def this_host() -> Holder:
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    network = os.stat("/proc/self/ns/net").st_ino
    return Holder(f"{boot}/net:{network}", socket.gethostname(), os.getpid(),
                  datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))


def holder_of(entry: Entry | None) -> Holder | None:
    """Who holds the claim `entry` is, if anyone: a key with no lease (written by hand) or a
    value that is not a holder counts as nobody."""
    if entry is None or not entry.lease or not isinstance(entry.value, dict):
        return None
    try:
        return Holder(str(entry.value["host"]), str(entry.value["hostname"]),
                      int(entry.value["pid"]), str(entry.value["since"]))
    except (KeyError, TypeError, ValueError):
        return None


def may_take(entry: Entry | None, me: Holder) -> bool:
    holder = holder_of(entry)
    return holder is None or holder.host == me.host


@dataclass
class Claim:
    node: str
    me: Holder
    lease: int


async def take(store: Store, node: str, me: Holder) -> Claim | Holder:
    """The claim, if it is free or this host's; else who holds it."""
    key = keys.agent_key(node)
    while True:
        entry = await store.get(key)
        if not may_take(entry, me):
            return holder_of(entry)
        lease = await store.grant_lease(CLAIM_TTL)
        if (await store.txn({key: entry.mod_revision if entry else 0}, {key: asdict(me)},
                            lease=lease)).succeeded:
            return Claim(node, me, lease)
        await store.revoke_lease(lease)  # another agent wrote in between: look again


async def claim_node_name(store: Store, node: str, stop: asyncio.Event,
                          waiting: Callable[[str], None] | None = None,
                          me: Holder | None = None, patience: float = CLAIM_TTL + 5
                          ) -> Claim | None:
    """This agent's claim on `node`, waiting up to `patience` for another host's claim to
    lapse (`waiting` is told whose); None if `stop` comes first. etcd unreachable raises
    DatastoreUnavailable (the caller waits for etcd); a claim another host keeps renewing
    raises InvalidResource."""
    me = me or this_host()
    loop = asyncio.get_running_loop()
    seen_since = None
    while True:
        other = await take(store, node, me)
        if isinstance(other, Claim):
            if seen_since is not None:
                log.info("the other host's claim on node %s lapsed: this agent holds it now",
                         node)
            return other
        now = loop.time()
        if seen_since is None:
            seen_since = now
            log.warning("node %s is held by an agent on %s; waiting up to %.0f s for that "
                        "claim to lapse", node, other.describe(), patience)
            if waiting is not None:
                waiting(other.describe())
        elif now - seen_since >= patience:
            raise InvalidResource(
                f"node {node} is run by another agent, on {other.describe()}, which still "
                "renews its claim: give each host its own node name (--node, or NODENAME), or "
                "stop that agent.")
        try:
            await asyncio.wait_for(stop.wait(), RECHECK_EVERY)
            return None
        except asyncio.TimeoutError:
            pass


async def keep(store: Store, claim: Claim) -> None:
    """Renew the claim while the agent runs (a task: cancel it to stop). A claim that lapsed
    (etcd away longer than its lease) is taken again; if another host took it meanwhile,
    that is said each time, and routing goes on."""
    while True:
        await asyncio.sleep(RENEW_EVERY)
        try:
            if await store.keep_lease_alive(claim.lease) > 0:
                continue
            again = await take(store, claim.node, claim.me)
            if isinstance(again, Claim):
                claim.lease = again.lease
                log.info("node %s: the claim that lapsed while etcd was away is held again",
                         claim.node)
                continue
            log.error("node %s is now also run by an agent on %s: two hosts share its name and "
                      "blocks; give each host its own node name (--node, or NODENAME)",
                      claim.node, again.describe())
        except DatastoreUnavailable as error:
            log.debug("could not renew the claim on node %s yet: %s", claim.node, error)


async def release(store: Store, claim: Claim) -> None:
    """Give the name up (the agent stopping): the next agent, on any host, takes it at
    once."""
    try:
        await store.revoke_lease(claim.lease, timeout=RELEASE_TIMEOUT)
    except DatastoreUnavailable as error:  # it lapses by itself
        log.info("could not release the claim on node %s (it lapses in %d s): %s",
                 claim.node, CLAIM_TTL, error)
