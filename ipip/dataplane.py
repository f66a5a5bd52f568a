"""One node's encapsulation devices as a whole: what the agent calls on every reconcile pass,
in this order (routes through a device must never outlive it, or the kernel drops them
behind the route cache's back):

    prepared = dataplane.prepare(ipr, desired)    # 1. devices this node needs: up, right MTU
    next_hop = encap.route_next_hop(pools, desired.local, prepared.devices, desired.vteps)
    routes = policy.kernel_routes(accepted, own, next_hop=next_hop)   # 2. routes (kernel_routes)
    dataplane.retire(ipr, desired)                 # 3. devices no pool needs any more
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface

from ipip import tunnel, vxlan
from ipip.encap import IPIP, VXLAN, Devices, RemoteVTEP
from ipip.links import DataplaneError
from ipip.mtu import Uplink, pod_mtu, tunnel_mtu, uplink


@dataclass(frozen=True)
class Desired:
    """What this node's encapsulation should be, from the pools and the node records."""

    local: IPv4Interface  # the node's underlay address with its subnet (its BGP address)
    kinds: frozenset[str] = frozenset()  # encap.kinds_in_use(pools)
    tunnel_address: IPv4Address | None = None  # tunl0's /32, from handle ipip-tunnel-addr-<node>
    vtep_address: IPv4Address | None = None  # from handle vxlan-tunnel-addr-<node>
    vtep_mac: str = ""  # encap.vtep_mac(node)
    vteps: tuple[RemoteVTEP, ...] = ()  # every other node's VTEP, from its node record
    mtu_override: int | None = None  # pod and tunnel MTU, instead of the uplink's less overhead
    # of `kinds`, those the kernel cannot make (capability.kernel_supports): not tried, their
    # lack already said; the pod MTU still leaves room for them
    unsupported: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Prepared:
    devices: Devices  # for encap.next_hop / route_next_hop
    uplink: Uplink
    pod_mtu: int  # to publish for the CNI configuration (mtu.publish)
    errors: tuple[str, ...] = ()  # a device that could not be set up: one sentence each


def prepare(ipr, desired: Desired) -> Prepared:
    """Create or update the devices `desired` needs; touch none it does not (see retire).
    A device the kernel cannot make (module missing, name taken) is reported in `errors` and
    left out of `devices`, so the other encapsulation and the routes still go ahead; one of
    `unsupported` kind is left out without a word."""
    link = uplink(ipr, desired.local.ip)
    tunl0 = vxlan_index = None
    errors = []
    if IPIP in desired.kinds - desired.unsupported:
        try:
            tunl0 = tunnel.ensure(ipr, desired.tunnel_address,
                                  tunnel_mtu(link.mtu, IPIP, desired.mtu_override))
        except DataplaneError as error:
            errors.append(str(error))
    if VXLAN in desired.kinds - desired.unsupported:
        if not desired.vtep_mac:
            raise ValueError("VXLAN needs the node's VTEP MAC (encap.vtep_mac)")
        try:
            vxlan_index = vxlan.ensure(ipr, vxlan.Device(
                local=desired.local.ip, vtep=desired.vtep_address, mac=desired.vtep_mac,
                mtu=tunnel_mtu(link.mtu, VXLAN, desired.mtu_override), uplink=link.index))
            vxlan.set_vteps(ipr, vxlan_index, desired.vteps)
        except DataplaneError as error:
            errors.append(str(error))
    return Prepared(Devices(tunl0, vxlan_index), link,
                    pod_mtu(link.mtu, desired.kinds, desired.mtu_override), tuple(errors))


def retire(ipr, desired: Desired) -> None:
    """Take down what no pool needs any more: call after the routes have moved off it."""
    if IPIP not in desired.kinds:
        tunnel.disable(ipr)
    if VXLAN not in desired.kinds:
        vxlan.remove(ipr)
