"""What `pipitctl ipam release` and `ipam check` decide, as pure functions over a snapshot."""

from __future__ import annotations

from ipaddress import IPv4Address

from ipam.block import Release
from ipam.snapshot import Snapshot, lookup


def release_verdict(snap: Snapshot, address: IPv4Address,
                    force: bool) -> tuple[Release | None, str | None]:
    """The Release that frees `address` as the snapshot holds it (it frees nothing if the
    address has been handed out again since), or why the address is not to be released: not
    in use, a block's gateway, outside every pool, or held by a live allocation (a handle that
    counts it: a pod has it) unless forced."""
    info = lookup(snap, address)
    if info.pool is None and info.block is None:
        return None, f"{address} is outside every IP pool"
    if info.block is not None and info.block.gateway == address:
        return None, (f"{address} is the gateway of block {info.block.cidr}, which is never "
                      "handed out")
    if info.holder is None:
        return None, f"{address} is not in use"
    handle_id = info.holder.handle_id
    handle = snap.handles.get(handle_id)
    live = handle is not None and handle.blocks.get(str(info.block.cidr), 0) > 0
    if live and not force:
        attributes = " ".join(f"{k}={v}" for k, v in sorted(info.holder.secondary.items()))
        held_by = f"handle {handle_id}" + (f" ({attributes})" if attributes else "")
        return None, (f"{address} is in use by {held_by}; if its pod is gone, release it with "
                      "--force")
    return Release(address, info.sequence, handle_id), None
