"""natOutgoing: traffic from a pool with natOutgoing that leaves for an address outside every
pool is masqueraded to the node's address; pod-to-pod traffic never is.

Floating IPs (Calico's `cni.projectcalico.org/floatingIPs`), as Felix makes them: traffic to a
floating address is DNAT'd to its pod's own address, in prerouting (from elsewhere) and output
(from the node's processes); the pod's own traffic keeps its address, but for the hairpin (a pod
to its own floating address, which after DNAT is pod to pod) the source becomes the pod's lowest
floating address. Maps, not a rule per address: one lookup per packet however many there are.

Pipit owns one nftables table, `ip pipit-nat`, and rewrites it whole in a single `nft -f`
transaction (create-if-missing, delete, define: atomic, so no packet sees a half-built table).
Nothing outside that table is touched. `ruleset()` is pure; `apply()` runs nft in the current
network namespace (the agent's), or in a named one.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ipam.pool import IPPool

FAMILY, TABLE = "ip", "pipit-nat"


def _elements(pools: Iterable[IPPool]) -> str:
    return ", ".join(str(cidr) for cidr in sorted({p.cidr for p in pools}))


def _map(name: str, key: str, pairs: Iterable[tuple[object, object]]) -> str:
    elements = ", ".join(f"{k} : {v}" for k, v in pairs)
    return (f"    map {name} {{\n        type {key} : ipv4_addr\n"
            f"        elements = {{ {elements} }}\n    }}\n")


def _floating(floating: Mapping[IPv4Address, IPv4Address]) -> tuple[str, list[str], list[str]]:
    """The maps, prerouting / output chains and postrouting rule of the floating IPs: external
    -> pod address for DNAT, and pod . pod -> the pod's lowest external for the hairpin's SNAT.
    Elements in address order."""
    lowest: dict[IPv4Address, IPv4Address] = {}
    for external, pod in sorted(floating.items()):
        lowest.setdefault(pod, external)
    maps = _map("floating-ips", "ipv4_addr", sorted(floating.items())) + \
        _map("floating-hairpin", "ipv4_addr . ipv4_addr",
             [(f"{pod} . {pod}", lowest[pod]) for pod in sorted(lowest)])
    chains = [f"""\
    chain {name} {{
        type nat hook {name} priority {priority}; policy accept;
        dnat to ip daddr map @floating-ips
    }}
""" for name, priority in (("prerouting", "dstnat"), ("output", "-100"))]
    return maps, chains, ["ct status dnat snat to ip saddr . ip daddr map @floating-hairpin"]


def ruleset(pools: Iterable[IPPool], floating: Mapping[IPv4Address, IPv4Address] = {}) -> str:
    """The nft script that makes Pipit's table match `pools` and `floating` (floating address
    -> its pod's address): the table when some pool has natOutgoing or some floating IP is
    wanted, holding only the parts in use, or no table at all. Disabled pools count: their
    pods keep their addresses. Equal inputs give equal text (elements sorted)."""
    pools = list(pools)
    masquerading = [p for p in pools if p.nat_outgoing]
    script = [f"table {FAMILY} {TABLE}", f"delete table {FAMILY} {TABLE}"]
    if not masquerading and not floating:
        return "\n".join(script) + "\n"
    sets, chains, postrouting = "", [], []
    if floating:
        sets, chains, postrouting = _floating(floating)
    if masquerading:
        sets = f"""\
    set nat-pools {{
        type ipv4_addr; flags interval
        elements = {{ {_elements(masquerading)} }}
    }}
    set all-pools {{
        type ipv4_addr; flags interval
        elements = {{ {_elements(pools)} }}
    }}
""" + sets
        postrouting.append("ip saddr @nat-pools ip daddr != @all-pools masquerade")
    rules = "".join(f"        {rule}\n" for rule in postrouting)
    script.append(f"""\
table {FAMILY} {TABLE} {{
    comment "managed by Pipit: rewritten whole on every change"
{sets}{"".join(chains)}    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
{rules}    }}
}}""")
    return "\n".join(script) + "\n"


def _nft(script: str, netns: str | None) -> None:
    argv = ["nft", "-f", "-"]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    result = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"nft refused Pipit's NAT table: {result.stderr.strip()}")


def apply(pools: Iterable[IPPool], *, floating: Mapping[IPv4Address, IPv4Address] = {},
          netns: str | None = None) -> None:
    """Make the kernel's `ip pipit-nat` table match `pools` and `floating` (idempotent)."""
    _nft(ruleset(pools, floating), netns)


def remove(netns: str | None = None) -> None:
    """Delete Pipit's table, if it is there."""
    _nft(ruleset([]), netns)
