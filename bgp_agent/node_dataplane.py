"""The agent's side of encapsulation (IPIP, VXLAN), MTU, natOutgoing and floating IPs.

Each routing pass asks `prepare()` for the next hop of every learned route. Before answering
it makes this node match the pools: a tunnel address from an IPIP / VXLAN pool that selects
the node (IPAM handle `ipip-tunnel-addr-<node>` / `vxlan-tunnel-addr-<node>`, recorded on the
node record with the VTEP MAC, released when no such pool selects the node any more), the
tunnel devices up with the right MTU and the other nodes' VTEPs, the NAT table (natOutgoing,
and the floating IPs of its pods: DNAT to the pod), and the pod MTU published for the CNI
configuration. After the routes are in, `retire()` removes
devices no pool needs (never before: routes through a vanished device are dropped silently).
The kernel work is ipip/'s; this module decides and keeps etcd up to date.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

from ipip.routes import NextHop
from bgp_agent.node import NodeRecord, set_tunnel_fields
from bgp_agent.policy import native
from ipam.allocator import IPAM
from ipam.errors import PipitError
from ipam.pool import TUNNEL, IPPool
from ipam.store import Store
from ipip import capability, conntrack, dataplane, encap, mtu, nat

log = logging.getLogger(__name__)
RESYNC_SECONDS = 60.0  # look at the devices again even if nothing asked for a change


@dataclass
class EncapStatus:
    kinds: list[str] = field(default_factory=list)
    ipip_tunnel_address: str = ""
    vxlan_tunnel_address: str = ""
    pod_mtu: int = 0
    problems: list[str] = field(default_factory=list)  # missing modules, devices that failed

    def to_json(self) -> dict:
        return {"kinds": self.kinds, "ipipTunnelAddress": self.ipip_tunnel_address,
                "vxlanTunnelAddress": self.vxlan_tunnel_address, "podMTU": self.pod_mtu,
                "problems": self.problems}


class NodeDataplane:
    def __init__(self, store: Store, ipam: IPAM, mtu_path: Path, mtu_override: int | None = None):
        self.store = store
        self.ipam = ipam
        self.mtu_path = Path(mtu_path)
        self.mtu_override = mtu_override
        self.status = EncapStatus()
        self._ipr = None
        self._desired: dataplane.Desired | None = None
        self._prepared: dataplane.Prepared | None = None
        self._resync_at = 0.0
        self._retired = False
        self._capability_kinds: frozenset[str] = frozenset()  # as of the last pass
        self._supported: dict[str, bool] = {}  # kernel probe per encapsulation in use
        # the pools and floating IPs the NAT table was last made for
        self._nat_applied: tuple[list[IPPool], dict[IPv4Address, IPv4Address]] | None = None
        self.on_pod_mtu: Callable[[int], None] | None = None  # told each new pod MTU

    async def _netlink(self):
        """pyroute2's IPRoute, made (and used) in worker threads: it runs an event loop of
        its own, which cannot start inside the agent's."""
        if self._ipr is None:
            from ipip.pyroute2_core import IPRoute  # heavy: only once a node routes
            self._ipr = await asyncio.to_thread(IPRoute)
        return self._ipr

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()

    async def prepare(self, me: NodeRecord, pools: list[IPPool], nodes: Iterable[NodeRecord],
                      floating: Mapping[IPv4Address, IPv4Address] | None = None
                      ) -> Callable[[object], NextHop]:
        """Make the node's encapsulation and NAT match the pools and its pods' `floating` IPs
        (address -> the pod's own); the next hop of each learned route. Whatever fails here
        (a missing module, no tunnel address, nft refusing the NAT table) is reported in the
        status and never stops the routing pass: routes then go native."""
        if me.address is None:
            return native
        problems: list[str] = []
        kinds = frozenset(encap.kinds_in_use(pools))
        problems += await self._check_capability(kinds, pools)
        ipip_address = await self._tunnel_address(me, pools, encap.IPIP, problems)
        vxlan_address = await self._tunnel_address(me, pools, encap.VXLAN, problems)
        # vxlan.pipit needs its MAC even on a node no VXLAN pool selects (it still reaches
        # those pools' blocks); the record carries a MAC only beside a VTEP address.
        mac = encap.vtep_mac(me.name) if encap.VXLAN in kinds else ""
        recorded = (ipip_address, vxlan_address, mac if vxlan_address else None)
        if recorded != me.tunnel_fields:
            await set_tunnel_fields(self.store, me.name, *recorded)
        vteps = tuple(encap.RemoteVTEP(n.address.ip, n.vxlan_tunnel_address, n.vxlan_mac)
                      for n in nodes if n.name != me.name and n.address is not None
                      and n.vxlan_tunnel_address is not None and n.vxlan_mac)
        desired = dataplane.Desired(
            local=me.address, kinds=kinds, tunnel_address=ipip_address,
            vtep_address=vxlan_address, vtep_mac=mac, vteps=vteps,
            mtu_override=self.mtu_override,
            # a device the kernel cannot make is not tried: its failure would say it again
            unsupported=frozenset(k for k in kinds if not self._supported.get(k, True)))
        devices, pod_mtu = encap.Devices(), self.status.pod_mtu
        try:
            prepared = await self._prepare_devices(desired)
            devices, pod_mtu = prepared.devices, prepared.pod_mtu
            problems += prepared.errors
        except (LookupError, ValueError, OSError) as error:  # no uplink, an MTU too small
            problems.append(f"the tunnel devices were not set up: {error}")
        await self._apply_nat(pools, dict(floating or {}), problems)
        if pod_mtu and pod_mtu != self.status.pod_mtu:
            mtu.publish(self.mtu_path, pod_mtu)
            if self.on_pod_mtu is not None:
                self.on_pod_mtu(pod_mtu)
        for problem in problems:
            if problem not in self.status.problems:
                log.error("%s", problem)
        self.status = EncapStatus(sorted(kinds), str(ipip_address or ""),
                                  str(vxlan_address or ""), pod_mtu, problems)
        return encap.route_next_hop(pools, me.address, devices, vteps)

    async def _apply_nat(self, pools: list[IPPool], floating: dict[IPv4Address, IPv4Address],
                         problems: list[str]) -> None:
        """Rewrite the NAT table (natOutgoing, floating IPs) when the pools or floating IPs
        changed (nft is not needed at all while nothing ever asked for either)."""
        wanted = (list(pools), floating)
        if wanted == self._nat_applied:
            return
        if self._nat_applied is None and not floating and not any(p.nat_outgoing
                                                                   for p in pools):
            self._nat_applied = wanted
            return
        before = self._nat_applied[1] if self._nat_applied is not None else {}
        try:
            await asyncio.to_thread(nat.apply, pools, floating=floating)
            self._nat_applied = wanted
        except (OSError, RuntimeError) as error:
            problems.append(f"natOutgoing and floating IPs are not in place: {error}")
            return
        stale = conntrack.moved(before, floating)
        if stale:  # flows already seen keep their NAT: their next packets are decided anew
            try:
                await asyncio.to_thread(conntrack.forget, stale)
            except OSError as error:
                problems.append(f"the flows to floating IPs {', '.join(map(str, stale))}, "
                                f"which lead elsewhere now, were not forgotten: {error}")

    async def _prepare_devices(self, desired: dataplane.Desired) -> dataplane.Prepared:
        """dataplane.prepare, when the wanted devices changed or a resync is due (someone may
        have removed a device): most passes change only routes."""
        now = time.monotonic()
        if desired != self._desired or self._prepared is None or now >= self._resync_at:
            self._desired, self._prepared = desired, None
            self._prepared = await asyncio.to_thread(dataplane.prepare, await self._netlink(),
                                                     desired)
            self._resync_at, self._retired = now + RESYNC_SECONDS, False
        return self._prepared

    async def retire(self) -> None:
        """Remove the devices no pool needs, once per change of the wanted devices."""
        if self._desired is not None and not self._retired:
            await asyncio.to_thread(dataplane.retire, await self._netlink(), self._desired)
            self._retired = True

    async def _check_capability(self, kinds: frozenset[str], pools: list[IPPool]) -> list[str]:
        """One sentence per encapsulation a pool needs and this kernel lacks, naming the pools
        of this pass (the kernel is probed again, and the sentences logged, only when the set
        of encapsulations in use changes)."""
        changed = kinds != self._capability_kinds
        if changed:
            self._supported = await asyncio.to_thread(
                lambda: {kind: capability.kernel_supports(kind) for kind in kinds})
            self._capability_kinds = kinds
        messages = capability.check(pools, self._supported.__getitem__)
        if changed:
            for message in messages:
                log.error("%s", message)
        return messages

    async def _tunnel_address(self, me: NodeRecord, pools: list[IPPool], kind: str,
                              problems: list[str]) -> IPv4Address | None:
        """This node's tunnel address for `kind`: kept while a pool of that kind selects the
        node and holds it, else allocated from the first such pool; released when none."""
        wanted = encap.tunnel_pools(pools, me.labels, kind)
        current = me.ipip_tunnel_address if kind == encap.IPIP else me.vxlan_tunnel_address
        handle = encap.tunnel_handle(kind, me.name)
        if current is not None and any(current in p.cidr for p in wanted):
            return current
        try:
            if current is not None:
                await self.ipam.release(me.name, handle)
                log.info("released %s tunnel address %s", kind, current)
            if not wanted:
                return None
            [address] = await self.ipam.assign(me.name, handle, pools=[wanted[0].name],
                                               attributes={"type": f"{kind}-tunnel"},
                                               reuse=True, use=TUNNEL)
        except PipitError as error:
            problems.append(f"no {kind} tunnel address: {error}")
            return None
        log.info("%s tunnel address %s from pool %s", kind, address, wanted[0].name)
        return address
