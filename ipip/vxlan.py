"""vxlan.pipit, the VXLAN device: VNI, port, local underlay address, MAC, MTU and the node's
VTEP address (a /32); and for every other node's VTEP a permanent neighbour entry (VTEP IP ->
its MAC) and FDB entry (its MAC -> its node IP), so the kernel never floods or learns.

The device and everything on it are Pipit's: `set_vteps` makes the entries exactly the wanted
set, and `remove` deletes the device. Functions take a pyroute2 IPRoute opened in the node's
network namespace (the agent's own).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface

from ipip.pyroute2_core import NetlinkError

from ipip.encap import VXLAN, VXLAN_DEVICE, VXLAN_PORT, VXLAN_VNI, RemoteVTEP
from ipip.links import DataplaneError, link, lookup, set_addresses, set_state

NUD_PERMANENT = 0x80
NTF_SELF = 0x02  # an FDB entry of the vxlan device itself, not of a bridge it belongs to


@dataclass(frozen=True)
class Device:
    """What this node's vxlan.pipit should be."""

    local: IPv4Address  # the node's underlay address: source of the outer packets
    vtep: IPv4Address | None  # the node's VTEP address, allocated from a VXLAN pool
    mac: str  # encap.vtep_mac(node)
    mtu: int
    uplink: int | None = None  # the underlay interface's index
    vni: int = VXLAN_VNI
    port: int = VXLAN_PORT


def _settings(device: Device) -> dict:
    settings = {"vxlan_id": device.vni, "vxlan_port": device.port,
                "vxlan_local": str(device.local), "vxlan_learning": 0}
    if device.uplink is not None:
        settings["vxlan_link"] = device.uplink
    return settings


def _matches(ipr, index: int, device: Device) -> bool:
    info = link(ipr, index).get_attr("IFLA_LINKINFO")
    if info is None or info.get_attr("IFLA_INFO_KIND") != VXLAN:
        return False
    data = info.get_attr("IFLA_INFO_DATA")
    have = {key: data.get_attr(f"IFLA_{key.upper()}") for key in _settings(device)}
    return have == _settings(device)


def ensure(ipr, device: Device) -> int:
    """Make vxlan.pipit as `device` says, re-creating it when a setting that cannot change in
    place (VNI, port, local address, uplink) differs. Returns its interface index: a new one
    after a re-creation, which also changes the next hops of the routes through it."""
    index = lookup(ipr, VXLAN_DEVICE)
    if index is not None and not _matches(ipr, index, device):
        ipr.link("del", index=index)
        index = None
    if index is None:
        try:
            ipr.link("add", ifname=VXLAN_DEVICE, kind=VXLAN, address=device.mac, mtu=device.mtu,
                     **_settings(device))
        except NetlinkError as error:
            if error.code == errno.EOPNOTSUPP:
                raise DataplaneError("this kernel cannot create vxlan.pipit: the vxlan module "
                                     "is not available (modprobe vxlan).") from None
            raise
        index = lookup(ipr, VXLAN_DEVICE)
    set_state(ipr, index, up=True, mtu=device.mtu, mac=device.mac)
    vtep = [IPv4Interface((device.vtep, 32))] if device.vtep is not None else []
    set_addresses(ipr, index, vtep)
    return index


def set_vteps(ipr, index: int, vteps: Iterable[RemoteVTEP]) -> None:
    """Make the device's neighbour and FDB entries exactly those of `vteps`."""
    vteps = list(vteps)
    neighbours = {str(v.address): v.mac.lower() for v in vteps}
    forwarding = {v.mac.lower(): str(v.node_address) for v in vteps}
    for entry in ipr.get_neighbours(family=socket.AF_INET, ifindex=index):
        dst, mac = entry.get("NDA_DST"), (entry.get("NDA_LLADDR") or "").lower()
        if neighbours.get(dst) == mac and entry["state"] & NUD_PERMANENT:
            del neighbours[dst]  # already right
        elif dst not in neighbours:
            ipr.neigh("del", ifindex=index, dst=dst)
    for dst, mac in neighbours.items():
        ipr.neigh("replace", ifindex=index, dst=dst, lladdr=mac, state=NUD_PERMANENT)
    for entry in ipr.get_neighbours(family=socket.AF_BRIDGE, ifindex=index):
        if entry["ifindex"] != index:
            continue
        mac, dst = (entry.get("NDA_LLADDR") or "").lower(), entry.get("NDA_DST")
        if forwarding.get(mac) == dst:
            del forwarding[mac]
        elif dst is not None:
            ipr.fdb("del", ifindex=index, lladdr=mac, dst=dst, flags=NTF_SELF)
    for mac, dst in forwarding.items():
        ipr.fdb("replace", ifindex=index, lladdr=mac, dst=dst, state=NUD_PERMANENT,
                flags=NTF_SELF)


def remove(ipr) -> None:
    """No pool uses VXLAN: delete vxlan.pipit (its entries and routes go with it). Call it
    after the routes through it are gone or moved."""
    index = lookup(ipr, VXLAN_DEVICE)
    if index is not None:
        ipr.link("del", index=index)
