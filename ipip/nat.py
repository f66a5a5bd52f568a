"""natOutgoing: traffic from a pool with natOutgoing that leaves for an address outside every
pool is masqueraded to the node's address; pod-to-pod traffic never is.

Pipit owns one nftables table, `ip pipit-nat`, and rewrites it whole in a single `nft -f`
transaction (create-if-missing, delete, define: atomic, so no packet sees a half-built table).
Nothing outside that table is touched. `ruleset()` is pure; `apply()` runs nft in the current
network namespace (the agent's), or in a named one.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ipam.pool import IPPool

FAMILY, TABLE = "ip", "pipit-nat"


def _elements(pools: Iterable[IPPool]) -> str:
    return ", ".join(str(cidr) for cidr in sorted({p.cidr for p in pools}))


def ruleset(pools: Iterable[IPPool]) -> str:
    """The nft script that makes Pipit's table match `pools`: the table with a masquerade rule
    when some pool has natOutgoing, or no table at all when none has. Disabled pools count:
    their pods keep their addresses."""
    pools = list(pools)
    masquerading = [p for p in pools if p.nat_outgoing]
    script = [f"table {FAMILY} {TABLE}", f"delete table {FAMILY} {TABLE}"]
    if masquerading:
        script.append(f"""\
table {FAMILY} {TABLE} {{
    comment "managed by Pipit: rewritten whole on every change"
    set nat-pools {{
        type ipv4_addr; flags interval
        elements = {{ {_elements(masquerading)} }}
    }}
    set all-pools {{
        type ipv4_addr; flags interval
        elements = {{ {_elements(pools)} }}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr @nat-pools ip daddr != @all-pools masquerade
    }}
}}""")
    return "\n".join(script) + "\n"


def _nft(script: str, netns: str | None) -> None:
    argv = ["nft", "-f", "-"]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    result = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"nft refused Pipit's NAT table: {result.stderr.strip()}")


def apply(pools: Iterable[IPPool], netns: str | None = None) -> None:
    """Make the kernel's `ip pipit-nat` table match `pools` (idempotent)."""
    _nft(ruleset(pools), netns)


def remove(netns: str | None = None) -> None:
    """Delete Pipit's table, if it is there."""
    _nft(ruleset([]), netns)
