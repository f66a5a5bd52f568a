"""ExaBGP 5.0's configuration and environment for Pipit's speaker, rendered from the neighbour
set. Pure: text in, text out. The settings avoid ExaBGP 5.0's traps: the helper running as
`nobody`, the ack deadlock, not listening, End-of-RIB before our table (they are named where
each setting is made).

The file starts with `# pipit-digest: <digest>`, a digest of the whole configuration, and every
neighbour carries it again as `description "pipit:<digest>"` (followed by `keepalive N` for a
neighbour with its own keepalive interval, which pipit-exabgp reads: exabgp_reactor).
ExaBGP does not compare descriptions when it reloads (no session reset), but shows them in
`show neighbor configuration`, so the bridge can tell whether a reload really took effect:
ExaBGP silently drops a reload that arrives while routes are still queued for a peer.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address

from bgp_agent.model import MAX_RESTART_TIME, Neighbor

PROCESS = "pipit"  # the process block's name (ExaBGP's "service" for our commands)
TEMPLATE = "pipit"
DESCRIPTION_PREFIX = "pipit:"
MD5_MAX = 80  # ExaBGP refuses longer keys (and so does the kernel)
MD5_RULE = f"at most {MD5_MAX} characters without quotes, backslashes or line breaks"


def usable_md5_password(password: str) -> bool:
    """Whether ExaBGP's configuration can carry this TCP MD5 password (MD5_RULE)."""
    return len(password) <= MD5_MAX and not re.search(r'["\\\n\r]', password)


def render(router_id: IPv4Address, local_address: IPv4Address, local_as: int,
           neighbors: Iterable[Neighbor], bridge_command: list[str]) -> str:
    """The whole ExaBGP configuration file. Each neighbour is written with its own local
    address and AS (normally the node's `local_address` and `local_as`, which only appear in
    the header). Raises ValueError for values ExaBGP's tokeniser could not carry (spaces in the
    helper's arguments, quotes in a password)."""
    for arg in bridge_command:
        if not arg or re.search(r'[\s;{}"\'#]', arg):
            raise ValueError(f"bridge command argument {arg!r} cannot be written into ExaBGP's "
                             "configuration (no spaces, quotes, ';', braces or '#')")
    ordered = sorted(neighbors, key=lambda n: int(n.address))
    addresses = [n.address for n in ordered]
    if len(set(addresses)) != len(addresses):
        raise ValueError("two neighbours with the same address")
    body = _render(router_id, local_address, local_as, ordered, bridge_command, "{digest}")
    return body.replace("{digest}", config_digest(body))


def config_digest(text: str) -> str:
    """A short digest of a configuration rendered with the "{digest}" placeholder."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def digest_of(config_text: str) -> str | None:
    """The digest written into a rendered configuration (None if it is not one of ours)."""
    match = re.match(r"# pipit-digest: ([0-9a-f]+)\n", config_text)
    return match.group(1) if match else None


def _render(router_id, local_address, local_as, neighbors, bridge_command, digest) -> str:
    lines = [
        f"# pipit-digest: {digest}",
        f"# Rendered by pipit-agent for {local_address} AS {local_as}; changes are overwritten.",
        f"process {PROCESS} {{",
        f"    run {' '.join(bridge_command)};",
        "    encoder json;",  # mandatory: there is no default
        "}",
        "",
        "template {",
        f"    neighbor {TEMPLATE} {{",
        # only what every neighbour shares: on `inherit` ExaBGP lets the template's values
        # override the neighbour's own (local-address, hold-time, ...), not the reverse
        f"        router-id {router_id};",
        # without a family block ExaBGP offers every family it knows in its OPEN
        "        family { ipv4 unicast; }",
        # ExaBGP would keep every received route (its Adj-RIB-In, on by default whatever
        # its documentation says): the bridge and the agent keep their own tables, and the
        # copy cost ~11 % of a reflector's ExaBGP receiving 15,000 routes, and its memory
        "        adj-rib-in false;",
        f"        api {{ processes [ {PROCESS} ]; neighbor-changes;",
        "              receive { parsed; update; open; }",
        # sent UPDATEs tell the bridge when a withdrawal really left (retire; pipit-exabgp
        # reports only those that withdraw, exabgp_fanout); the sent OPEN tells it whether
        # graceful restart was negotiated
        "              send { parsed; update; open; } }",
        "    }",
        "}",
    ]
    for n in neighbors:
        # the description also carries what ExaBGP has no setting for (pipit-exabgp reads it)
        extra = f" keepalive {n.keepalive_time}" if n.keepalive_time else ""
        lines += ["", f"neighbor {n.address} {{",
                  f"    inherit {TEMPLATE};",
                  f'    description "{DESCRIPTION_PREFIX}{digest}{extra}";']
        lines += [f"    local-address {n.local_address};", f"    local-as {n.local_as};",
                  f"    peer-as {n.peer_as};"]
        if n.hold_time != 0 and n.hold_time < 3:
            raise ValueError(f"neighbour {n.address}: hold time must be 0 or at least 3 s")
        lines.append(f"    hold-time {n.hold_time};")
        # ExaBGP does not listen unless told; `listen` binds local-address:port with this
        # peer's MD5 key, so sessions come up whichever side connects first
        lines.append(f"    listen {n.listen_port};")
        if n.passive:  # the peer connects (see model.Neighbor.passive)
            lines.append("    passive true;")
        if n.peer_port != 179:
            lines.append(f"    connect {n.peer_port};")
        # End-of-RIB only when the agent says (after it has announced): on its own ExaBGP
        # sends it right after OPEN, before the agent's routes, and a graceful-restart helper
        # then flushes our stale routes and briefly blackholes our pods
        lines.append("    manual-eor true;")
        if n.password:
            if not usable_md5_password(n.password):
                raise ValueError(f"neighbour {n.address}: the MD5 password must be {MD5_RULE}")
            lines.append(f'    md5-password "{n.password}";')
        if n.ttl_security:
            # GTSM (RFC 5082): nothing from the peer below this TTL; ExaBGP then sends with
            # 255 (pipit-exabgp checks it per session, not on the shared listening socket)
            lines.append(f"    incoming-ttl {256 - n.ttl_security};")
        capabilities = ["route-refresh;"]
        if n.restart_time > 0:
            capabilities.insert(0, f"graceful-restart {min(n.restart_time, MAX_RESTART_TIME)};")
        lines.append(f"    capability {{ {' '.join(capabilities)} }}")
        lines.append("}")
    return "\n".join(lines) + "\n"


def exabgp_environment(extra: Mapping[str, str] | None = None, *,
                       reflector: bool = False) -> dict[str, str]:
    """ExaBGP settings, as exabgp_<section>_<key> names. `extra` overrides (same names).
    A `reflector`'s ExaBGP turns less often (see exabgp_reactor_speed)."""
    env = {
        # the helper is started after the privilege drop; as `nobody` it cannot exec and
        # ExaBGP stops every peer
        "exabgp_daemon_user": "root",
        "exabgp_daemon_drop": "false",
        "exabgp_daemon_daemonize": "false",
        "exabgp_log_level": "WARNING",  # INFO logs every route: 10x slower announcing
        "exabgp_log_destination": "stdout",  # (really stderr) the log file or container log
        "exabgp_api_cli": "false",  # the named-pipe CLI costs 29 MB and nothing uses it
        "exabgp_api_ack": "true",  # the bridge wants done/error: API errors are never logged
        "exabgp_api_respawn": "true",
        "exabgp_api_terminate": "false",
        # The reactor's idle period is speed/100 s: each turn costs ~0.2 ms of Python (more
        # with more peers) whether or not anything happened, so 0.1 (1 ms) burned ~8 % of a
        # core idle and 10 costs ~0.3 %. Commands, received messages and keepalives still
        # wake it at once; connecting and accepting a session wait up to one period. It
        # needs pipit-exabgp (bgp_agent.exabgp_reactor): plain ExaBGP 5.0 waits a period
        # between each 50 prefixes of a command (10k batched: ~24 s instead of ~2.5 s) and
        # sleeps a period per turn once any session has ended.
        # A turn runs every peer, so its cost grows with them: a reflector with 51 sessions
        # spent ~1.3 % of a core at 10 turns a second; at 4 (speed 25) it meets 1 %. Its
        # sessions come up a little slower (a connection waits up to 0.25 s).
        "exabgp_reactor_speed": "25" if reflector else "10",
    }
    env.update(extra or {})
    return env


def environment_file(env: Mapping[str, str]) -> str:
    """The same settings as ExaBGP's ini file (`exabgp --env-file FILE server CONFIG`)."""
    sections: dict[str, list[str]] = {}
    for name, value in sorted(env.items()):
        parts = name.split("_", 2)
        if len(parts) != 3 or parts[0] != "exabgp":
            raise ValueError(f"{name!r} is not an exabgp_<section>_<key> setting")
        sections.setdefault(parts[1], []).append(f"{parts[2]} = {value}")
    out = []
    for section, entries in sections.items():
        out += [f"[exabgp.{section}]", *entries, ""]
    return "\n".join(out)
