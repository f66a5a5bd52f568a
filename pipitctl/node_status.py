"""`pipitctl node status`: the local agent's BGP sessions, as calicoctl prints them."""

from __future__ import annotations

import json
import socket

from ipam.errors import DatastoreUnavailable
from pipitctl.output import table

STATE_WORDS = {"up": "Established", "connected": "Connect", "down": "Idle", "idle": "Idle"}


def read_status(path: str, timeout: float = 5.0) -> dict:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(path)
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
    except OSError as error:
        reason = (error.strerror or str(error)).lower()
        raise DatastoreUnavailable(f"pipit-agent is not running on this node (nothing answers on "
                                   f"{path}: {reason}).") from None
    return json.loads(data)


def duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


def render(status: dict) -> str:
    lines = [f"Pipit agent is running on node {status['node']} "
             f"({status.get('address') or 'no address'}, AS {status.get('asNumber')})."]
    if not status.get("speakerConnected"):
        lines.append("ExaBGP is not connected to the agent: sessions below may be stale.")
    lines += ["", "IPv4 BGP status"]
    rows = []
    now = status.get("now", 0)
    for peer in status.get("peers", []):
        since = duration(now - peer["since"]) if peer.get("since") else "-"
        info = STATE_WORDS.get(peer["state"], peer["state"])
        if peer["state"] != "up" and peer.get("reason"):
            info += f": {peer['reason']}"
        if peer.get("stale"):
            info += f" ({peer['stale']} routes kept while it restarts)"
        rows.append((peer["address"], peer["type"], peer.get("name") or "-", peer["asNumber"],
                     peer["state"], since, peer["received"], peer["accepted"], peer["rejected"],
                     peer["exported"], info))
    if rows:
        lines.append(table(("PEER ADDRESS", "TYPE", "NAME", "AS", "STATE", "SINCE", "RECEIVED",
                            "ACCEPTED", "REJECTED", "EXPORTED", "INFO"), rows))
    else:
        lines.append("No BGP peers yet.")
    lines += ["", f"Kernel: {status.get('kernelRoutes', 0)} routes learned, "
                  f"{status.get('blackholes', 0)} blackholes for own blocks; "
                  f"exporting {status.get('exported', 0)} prefixes."]
    if status.get("lastError"):
        lines.append(f"Last error ({duration(now - status['lastErrorAt'])} ago): "
                     f"{status['lastError']}")
    return "\n".join(lines)
