"""Connection tracking entries to forget when a floating IP leads elsewhere.

The kernel decides a flow's NAT once, at its first packet, and keeps it in the flow's
conntrack entry: when a floating IP (ipip.nat) stops leading to a pod, or leads to another
pod of the same node, a flow already seen keeps going to the old pod; when one starts leading
to a pod of the node, a flow seen before (sent on to where the address was routed) keeps
going there; and a steady UDP stream (the protocols floating IPs are for) refreshes its entry
forever. As kube-proxy clears the UDP flows of a Service whose endpoints changed, the agent
deletes the entries whose original destination is such a floating IP; their next packet is
decided afresh.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address


def moved(before: Mapping[IPv4Address, IPv4Address],
          after: Mapping[IPv4Address, IPv4Address]) -> list[IPv4Address]:
    """The floating IPs whose flows lead somewhere else now (gone, to another pod, or to a
    pod of this node at last)."""
    return sorted(a for a in before.keys() | after.keys() if before.get(a) != after.get(a))


def forget(destinations: Iterable[IPv4Address], netns: str | None = None) -> int:
    """Delete the conntrack entries whose original destination is one of `destinations`, in
    the current network namespace or a named one; how many went. The kernel's refusal is an
    OSError."""
    from ipip.pyroute2_core import NetlinkError  # pyroute2 without the rest of the package
    from pyroute2.conntrack import Conntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    deleted = 0
    try:
        table = Conntrack(**({"netns": netns, "flags": 0} if netns else {}))
        try:
            for address in destinations:
                for entry in list(table.dump_entries(tuple_orig=NFCTAttrTuple(
                        daddr=str(address)))):
                    try:
                        table.delete(entry)
                        deleted += 1
                    except NetlinkError as error:
                        if error.code != errno.ENOENT:  # ended meanwhile: gone all the same
                            raise
        finally:
            table.close()
    except NetlinkError as error:
        raise OSError(error.code, f"conntrack: {error}") from None
    return deleted
