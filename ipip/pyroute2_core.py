"""pyroute2's IPRoute and NetlinkError, without the rest of pyroute2.

Importing any module of pyroute2 runs the package's `__init__` first, and pyroute2 0.9's
imports everything it has: NDB (and sqlite3), IPDB, conntrack, nftables, nl80211, wireguard,
plan9 and more, 5.7 MiB of an agent that has 60 MiB in all (bench.converge), none of it used.
So the package is entered into `sys.modules` as what Python makes of it before running its
`__init__`, and only the route-netlink modules are imported from it. Anything else asked of
the package (`from pyroute2 import NDB`, elsewhere in the same process) runs its `__init__`
after all and is answered by it: nothing that uses pyroute2 the usual way sees a difference.
"""

from __future__ import annotations

import importlib.util
import sys


def _bare_package() -> None:
    if "pyroute2" in sys.modules:
        return  # imported already, whole or bare
    spec = importlib.util.find_spec("pyroute2")
    package = importlib.util.module_from_spec(spec)  # __path__, __spec__, ...: not run yet

    def whole(name: str):
        if not name.startswith("__") and importlib.util.find_spec(f"pyroute2.{name}"):
            return importlib.import_module(f"pyroute2.{name}")  # a module of the package
        del package.__getattr__
        spec.loader.exec_module(package)  # pyroute2's own __init__, into the same module
        return getattr(package, name)
    package.__getattr__ = whole  # PEP 562: asked only for what the module does not have
    sys.modules["pyroute2"] = package


_bare_package()

from pyroute2.iproute import IPRoute  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402

__all__ = ["IPRoute", "NetlinkError"]
