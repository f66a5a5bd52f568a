"""tunl0, the IPIP device: up, with its MTU and exactly the node's tunnel address (a /32).

tunl0 is the ipip module's fallback device, which the kernel creates in every network
namespace once the module is loaded; it has no fixed remote, so a route `via <node IP> dev
tunl0 onlink` sends each packet to that route's gateway. It cannot be deleted: when no pool uses
IPIP any more, `disable` takes its address away and sets it down.

Functions take a pyroute2 IPRoute opened in the node's network namespace (the agent's own).
"""

from __future__ import annotations

import errno
from ipaddress import IPv4Address, IPv4Interface

from ipip.pyroute2_core import NetlinkError

from ipip.encap import IPIP, TUNL0
from ipip.links import DataplaneError, link, lookup, set_addresses, set_state


def ensure(ipr, address: IPv4Address | None, mtu: int) -> int:
    """Make tunl0 up with `mtu` and `address`/32 as its only address; with `address` None
    (IPIP pools exist, but none selects this node) it keeps no address. Returns its index."""
    index = lookup(ipr, TUNL0)
    if index is None:
        try:
            # Loads the ipip module on demand, which makes tunl0 itself: then this add finds it.
            ipr.link("add", ifname=TUNL0, kind=IPIP)
        except NetlinkError as error:
            if error.code == errno.EOPNOTSUPP:
                raise DataplaneError("this kernel cannot create tunl0: the ipip module is not "
                                     "available (modprobe ipip).") from None
            if error.code != errno.EEXIST:
                raise
        index = lookup(ipr, TUNL0)
    kind = link(ipr, index).get(("IFLA_LINKINFO", "IFLA_INFO_KIND"))
    if kind != IPIP:
        raise DataplaneError(f"{TUNL0} exists but is a {kind or 'non-tunnel'} device, not an "
                             "ipip tunnel; remove it so that Pipit can use IPIP.")
    set_state(ipr, index, up=True, mtu=mtu)
    set_addresses(ipr, index, [IPv4Interface((address, 32))] if address is not None else [])
    return index


def disable(ipr) -> None:
    """No pool uses IPIP: tunl0 loses its address and goes down (the kernel keeps the
    device). Call it after the routes through tunl0 are gone or moved."""
    index = lookup(ipr, TUNL0)
    if index is None:
        return
    set_addresses(ipr, index, [])
    set_state(ipr, index, up=False)

