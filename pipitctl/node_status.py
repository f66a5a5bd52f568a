"""`pipitctl node status`: the local agent's BGP sessions, as calicoctl prints them."""

from __future__ import annotations

import re

from bgp_agent.service_addresses import EXCLUDED_LABEL
from pipitctl.output import table

STATE_WORDS = {"up": "Established", "connected": "Connect", "down": "Idle", "idle": "Idle",
               "disabled": "Disabled", "skipped": "Not configured"}
TYPE_WORDS = {"mesh": "node-to-node mesh", "global": "global", "node": "node specific",
              "reflector": "route reflector", "peer-node": "node peer"}


# BGP NOTIFICATION codes (RFC 4271, 4486, 9234), as ExaBGP reports them: "(code,subcode)"
NOTIFICATIONS = {
    (1, 0): "message header error", (2, 0): "OPEN message error",
    (2, 1): "unsupported version number", (2, 2): "the peer's AS number is not the expected one",
    (2, 3): "bad BGP identifier", (2, 4): "unsupported optional parameter",
    (2, 6): "unacceptable hold time", (2, 7): "unsupported capability",
    (3, 0): "UPDATE message error", (4, 0): "hold timer expired",
    (5, 0): "finite state machine error",
    (6, 0): "cease", (6, 1): "maximum number of prefixes reached",
    (6, 2): "administrative shutdown", (6, 3): "the peer has no session configured for us",
    (6, 4): "administrative reset", (6, 5): "connection rejected",
    (6, 6): "configuration change", (6, 7): "connection collision resolution",
    (6, 8): "out of resources", (6, 9): "hard reset",
}


def explain(reason: str) -> str:
    """ExaBGP's reason, with the meaning of a NOTIFICATION code it mentions."""
    match = re.search(r"notification (received|sent) \((\d+),(\d+)\)", reason)
    if not match:
        return reason
    code, subcode = int(match.group(2)), int(match.group(3))
    meaning = NOTIFICATIONS.get((code, subcode)) or NOTIFICATIONS.get((code, 0))
    return f"{reason}: {meaning}" if meaning else reason


def duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


def peer_type(peer: dict, reflector: bool) -> str:
    """How the peer is to this node: a reflector's clients and fellow reflectors, a client's
    reflectors, and the rest by how the peer was chosen."""
    words = TYPE_WORDS.get(peer["type"], peer["type"])
    if peer["type"] == "peer-node" and peer.get("rrClient"):
        return "rr client"
    if reflector and peer.get("rrClient"):
        return f"{words} (rr client)"
    if reflector and peer["type"] == "reflector":
        return f"{words} (non-client)"
    return words


def render(status: dict) -> str:
    cluster = status.get("routeReflectorClusterId")
    role = f", route reflector of cluster {cluster}" if cluster else ""
    as_number = f", AS {status['asNumber']}" if status.get("asNumber") else ""
    lines = [f"Pipit agent is running on node {status['node']} "
             f"({status.get('address') or 'no address'}{as_number}{role})."]
    if status.get("bgp") is False:
        lines.append("BGP is off on this node (pipit-agent --no-bgp): it hands out pod "
                     "addresses, and has no sessions and programs no routes.")
        return "\n".join(lines)
    if not status.get("speakerConnected"):
        lines.append("ExaBGP is not connected to the agent: sessions below may be stale.")
    lines += ["", "IPv4 BGP status"]
    rows = []
    now = status.get("now", 0)
    for peer in status.get("peers", []):
        up = peer["state"] == "up"
        since = duration(now - peer["since"]) if peer.get("since") else "-"
        info = STATE_WORDS.get(peer["state"], peer["state"])
        if not up and peer.get("reason"):
            info += f": {explain(peer['reason'])}"
        if peer.get("stale"):
            info += f" ({peer['stale']} routes kept while it restarts)"
        reasons = peer.get("rejectedReasons") or {}
        if up and reasons:
            info += " (" + "; ".join(f"{count} rejected: {why}" for why, count in
                                     sorted(reasons.items())) + ")"
        if peer.get("localAsNumber") and status.get("asNumber") and \
                peer["localAsNumber"] != status["asNumber"]:
            info += f" (peering as AS {peer['localAsNumber']})"
        if peer.get("filters"):
            info += f" (BGPFilters: {', '.join(peer['filters'])})"
        if peer.get("reachableBy"):
            info += f" (reached via {peer['reachableBy']})"
        if peer.get("nextHopSelf") and cluster:
            info += " (reflected with this node as next hop)"
        rows.append((peer["address"], peer_type(peer, bool(cluster)),
                     peer.get("name") or "-", peer["asNumber"] or "-", peer["state"],
                     since if up else "-", since if not up else "-", peer["received"],
                     peer["accepted"], peer["rejected"], peer["exported"], info))
    if rows:
        lines.append(table(("PEER ADDRESS", "TYPE", "NAME", "AS", "STATE", "UPTIME",
                            "DOWN FOR", "RECEIVED", "ACCEPTED", "REJECTED", "EXPORTED", "INFO"),
                           rows))
    else:
        lines.append("No BGP peers yet.")
    if not cluster:
        reflectors = [p.get("name") or p["address"] for p in status.get("peers", [])
                      if p["type"] == "reflector" and p["state"] != "skipped"]
        if reflectors:
            lines.append(f"Route reflectors: {', '.join(reflectors)}.")
    lines += [f"Warning: {warning}." for warning in status.get("warnings", [])]
    lines += ["", f"Kernel: {status.get('kernelRoutes', 0)} routes learned, "
                  f"{status.get('blackholes', 0)} blackholes for own blocks; "
                  f"exporting {status.get('exported', 0)} prefixes."]
    if status.get("services"):
        lines.append("Service addresses announced to external peers: "
                     f"{', '.join(status['services'])}.")
    if status.get("servicesExcluded"):
        lines.append(f"Service addresses: none announced, the node is labelled "
                     f"{EXCLUDED_LABEL}=true.")
    if status.get("underlay"):
        lines.append("Next hops on none of this node's links: " + "; ".join(
            f"{gateway} via {', '.join(via)}" if via else f"{gateway} (no route leads there)"
            for gateway, via in sorted(status["underlay"].items())) + ".")
    lines += describe_dataplane(status.get("dataplane") or {})
    if status.get("lastError"):
        lines.append(f"Last error ({duration(now - status['lastErrorAt'])} ago): "
                     f"{status['lastError']}")
    return "\n".join(lines)


def describe_dataplane(dataplane: dict) -> list[str]:
    """Encapsulation in use, tunnel addresses, pod MTU, and what keeps them from working."""
    if not dataplane:
        return []
    tunnels = []
    if "ipip" in dataplane.get("kinds", []):
        tunnels.append(f"IPIP (tunl0 {dataplane.get('ipipTunnelAddress') or 'without address'})")
    if "vxlan" in dataplane.get("kinds", []):
        tunnels.append("VXLAN (vxlan.pipit "
                       f"{dataplane.get('vxlanTunnelAddress') or 'without address'})")
    lines = [f"Encapsulation: {', '.join(tunnels) or 'none'}; pod MTU "
             f"{dataplane.get('podMTU') or '-'}."]
    lines += [f"Dataplane problem: {problem}" for problem in dataplane.get("problems", [])]
    return lines
