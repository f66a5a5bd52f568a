"""Can this kernel encapsulate? Checked once at start-up, so that a missing ipip or vxlan
module is said in one sentence naming the module and the pools that need it, instead of
surfacing later as routes the kernel refuses.

The probe creates a device of that kind in a throw-away network namespace (made by
unshare(CLONE_NEWNET) in a short-lived thread; it disappears with the thread and its socket):
that is exactly what the dataplane will do, loads the module on demand like `ip link add`, and
leaves nothing behind. Where creating a namespace is not permitted, a module present in
/sys/module counts as available.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ipip.encap import IPIP, VXLAN, VXLAN_PORT, kinds_in_use, pools_using
from ipip.kernel_routes import CLONE_NEWNET, in_own_thread

if TYPE_CHECKING:
    from ipam.pool import IPPool

MODULES = {IPIP: "ipip", VXLAN: "vxlan"}
_FIELDS = {IPIP: "ipipMode", VXLAN: "vxlanMode"}
_PROBE_ARGS = {IPIP: {}, VXLAN: {"vxlan_id": 1, "vxlan_port": VXLAN_PORT}}


def message(kind: str, pool_names: Iterable[str]) -> str:
    """One sentence: which module is missing and which pools need it."""
    names = [f"'{name}'" for name in pool_names]
    pools = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    noun = "pool" if len(names) == 1 else "pools"
    module, field = MODULES[kind], _FIELDS[kind]
    return (f"This kernel cannot create {kind} tunnels (the {module} module is not available), "
            f"which IP {noun} {pools} need{'s' if len(names) == 1 else ''} for {field}: load "
            f"it with 'modprobe {module}' or set {'its' if len(names) == 1 else 'their'} {field} "
            "to Never.")


def check(pools: Iterable[IPPool],
          supports: Callable[[str], bool] | None = None) -> list[str]:
    """One sentence per encapsulation some pool uses that this kernel lacks; empty when all is
    well."""
    pools = list(pools)
    supports = supports or kernel_supports
    return [message(kind, [p.name for p in pools_using(pools, kind)])
            for kind in sorted(kinds_in_use(pools)) if not supports(kind)]


def kernel_supports(kind: str) -> bool:
    """Whether the kernel can create a device of this kind (IPIP or VXLAN)."""
    try:
        return _probe(kind)
    except PermissionError:
        return Path("/sys/module", MODULES[kind]).exists()


def _probe(kind: str) -> bool:
    def in_throwaway_namespace() -> bool:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"unshare(CLONE_NEWNET): {os.strerror(code)}")
        from ipip.pyroute2_core import IPRoute, NetlinkError  # opens in the new namespace

        with IPRoute() as ipr:
            try:
                ipr.link("add", ifname="pipit-probe", kind=MODULES[kind], **_PROBE_ARGS[kind])
                return True
            except NetlinkError as error:
                if error.code == errno.EEXIST:
                    # The kernel knows the kind: an ipip probe without endpoints is the
                    # fallback tunl0 the loaded module already made in this namespace.
                    return True
                if error.code == errno.EOPNOTSUPP:  # no such kind: module missing
                    return False
                raise

    return in_own_thread(in_throwaway_namespace, f"probe-{kind}")
