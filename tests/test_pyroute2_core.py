"""ipip.pyroute2_core: IPRoute and NetlinkError without importing the rest of pyroute2 (its
NDB, sqlite3, IPDB, nftables...: 5.7 MiB of the agent's 60, bench/README.md converge), and
pyroute2 used the usual way in the same process still finds all of it. Each case runs in a
fresh interpreter: the test process has imported pyroute2 whole long ago."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, check=True, timeout=60).stdout.strip()


def test_the_agents_netlink_parts_import_none_of_the_rest_of_pyroute2():
    out = python(
        "import sys; from ipip.pyroute2_core import IPRoute, NetlinkError; "
        "import bgp_agent.node, bgp_agent.node_dataplane, ipip.tunnel, ipip.vxlan; "
        "from pyroute2.iproute.linux import IPRoute as Linux; "
        "from pyroute2.netlink.exceptions import NetlinkError as Error; "
        "print(IPRoute is Linux, NetlinkError is Error, "
        "sorted(m for m in ('sqlite3', 'pyroute2.ndb', 'pyroute2.ipdb', 'pyroute2.nftables', "
        "'pyroute2.netlink.nl80211') if m in sys.modules))")
    assert out == "True True []"


def test_pyroute2_used_the_usual_way_afterwards_is_whole():
    out = python(
        "from ipip.pyroute2_core import IPRoute; import pyroute2; "
        "from pyroute2 import NDB, IPRoute as Whole, __version__; "
        "print(Whole is IPRoute, NDB.__module__, pyroute2.__version__ == __version__ != 'unknown')")
    assert out == "True pyroute2.ndb.main True"


def test_pyroute2_imported_whole_first_is_used_as_it_is():
    out = python(
        "import pyroute2; from ipip.pyroute2_core import IPRoute; import sys; "
        "print(IPRoute is pyroute2.IPRoute, sys.modules['pyroute2'] is pyroute2, "
        "'pyroute2.ndb' in sys.modules)")
    assert out == "True True True"


def test_a_name_pyroute2_does_not_have_is_an_import_error_as_usual():
    out = python(
        "import ipip.pyroute2_core\n"
        "try:\n    from pyroute2 import NoSuchThing\n"
        "except ImportError as error:\n    print(type(error).__name__)")
    assert out == "ImportError"
