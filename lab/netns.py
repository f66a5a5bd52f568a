"""Named network namespaces (`ip netns`) for tests, benchmarks and the lab, removed again
whatever happens.

Names carry the creating process's id (`<prefix>pid<pid>-<tag>-<n>`), so a later run can tell
a crashed run's leftovers (`remove_leftovers`) from the namespaces of a run that is still
alive, or of other tools that use the same prefix their own way.

    with Namespaces("pipit-t-") as ns:
        node = ns.create("node")              # "pipit-t-pid4711-node-1", lo up
        pods = ns.create_many("pod", 100)     # one `ip -batch` call
        ns.run(node, "ip", "route")           # a command inside the namespace
    # every namespace made here is gone, also after an exception
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

from lab.process import alive, kill

NETNS_DIR = Path("/var/run/netns")
TEST_PREFIX = "pipit-t-"


def path_of(name: str) -> str:
    """The bind-mounted file that is the namespace (what CNI_NETNS takes)."""
    return str(NETNS_DIR / name)


def exec_prefix(name: str) -> list[str]:
    """argv prefix that runs a command inside the named namespace."""
    return ["ip", "netns", "exec", name]


def ping(name: str, target: object, *options: str, count: int = 1, reply_wait: float = 1,
         timeout: float | None = None) -> subprocess.CompletedProcess:
    """`ping -c count -W reply_wait [options] target` run inside the named namespace, its
    output captured as text (returncode 0: a reply came). `options` are more of ping's flags
    (-q, -n, -s SIZE, ...); `timeout` bounds the whole run (None: ping's own end)."""
    return subprocess.run([*exec_prefix(name), "ping", "-c", str(count), "-W", f"{reply_wait:g}",
                           *options, str(target)], capture_output=True, text=True,
                          timeout=timeout)


def names(prefix: str = "") -> list[str]:
    """Existing named namespaces whose name starts with `prefix`."""
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def exists(name: str) -> bool:
    return os.path.exists(path_of(name))


def _batch(lines: Sequence[str]) -> None:
    if not lines:
        return
    result = subprocess.run(["ip", "-force", "-batch", "-"], input="\n".join(lines) + "\n",
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip -batch failed: {result.stderr.strip()}")


def create(*names_: str, loopback_up: bool = True) -> None:
    """Create namespaces (all in one `ip -batch`), each with its loopback up."""
    try:
        _batch([f"netns add {n}" for n in names_])
        for name in names_ if loopback_up else ():
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True,
                           capture_output=True)
    except (RuntimeError, subprocess.CalledProcessError):
        delete(*names_)  # a half-done batch leaves nothing behind
        raise


def delete(*names_: str) -> None:
    """Delete namespaces; ones that do not exist are skipped."""
    present = [n for n in names_ if exists(n)]
    try:
        _batch([f"netns del {n}" for n in present])  # -force: go on after a failed line
    except RuntimeError:
        pass
    left = [n for n in present if exists(n)]
    for name in left:  # one by one, so that one stuck namespace does not hide the others
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    still = [n for n in left if exists(n)]
    if still:
        raise RuntimeError(f"could not delete network namespaces {', '.join(still)}")


_OWNER = re.compile(r"pid(\d+)-")


def pids(name: str) -> list[int]:
    """Processes running inside a namespace ([] if there is no such namespace)."""
    if not exists(name):
        return []
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def remove_leftovers(prefix: str = TEST_PREFIX) -> list[str]:
    """Delete namespaces named `<prefix>pid<pid>-...` whose creating process is gone, with
    whatever still runs inside them (a crashed run's agents, ExaBGP, BIRD...)."""
    stale = []
    for name in names(prefix):
        match = _OWNER.match(name[len(prefix):])
        if match and not alive(int(match.group(1))):
            stale.append(name)
    for name in stale:
        for pid in pids(name):
            kill(pid)
    delete(*stale)
    return stale


class Namespaces:
    """Namespaces made through this object; `close()` (or leaving `with`) deletes them all.
    Creating one first removes dead runs' leftovers with the same prefix."""

    def __init__(self, prefix: str = TEST_PREFIX):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", prefix):
            raise ValueError(f"namespace prefix {prefix!r} is not a plain name")
        self.prefix = prefix
        self.created: list[str] = []
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        remove_leftovers(prefix)

    def name(self, tag: str) -> str:
        with self._lock:
            return f"{self.prefix}pid{os.getpid()}-{tag}-{next(self._counter)}"

    def create(self, tag: str) -> str:
        return self.create_many(tag, 1)[0]

    def create_many(self, tag: str, count: int) -> list[str]:
        new = [self.name(tag) for _ in range(count)]
        with self._lock:
            self.created += new  # recorded first: close() removes even a half-made batch
        create(*new)
        return new

    def remove(self, *names_: str) -> None:
        delete(*names_)
        with self._lock:
            self.created = [n for n in self.created if n not in names_]

    def run(self, name: str, *argv: str, check: bool = True, timeout: float = 30.0,
            **kwargs) -> subprocess.CompletedProcess:
        """Run a command inside a namespace, output captured as text."""
        return subprocess.run([*exec_prefix(name), *argv], check=check, capture_output=True,
                              text=True, timeout=timeout, **kwargs)

    def close(self) -> None:
        with self._lock:
            doomed, self.created = list(reversed(self.created)), []
        delete(*doomed)

    def __enter__(self) -> Namespaces:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


NEIGHBOUR_SYSCTL = "/proc/sys/net/ipv4/neigh/default/gc_thresh{}"


def ensure_neighbour_table(entries: int) -> list[str]:
    """Make the kernel's ARP table hold `entries` neighbours. It is one table for every
    namespace (its limits exist only in the root's /proc): at the default 1,024 a 50-node lab
    (each node resolving every other) overflows and pings between some pods fail. Limits are
    only raised, never lowered; returns what was changed, as "name old -> new"."""
    changed = []
    for level, wanted in ((1, entries // 2), (2, entries), (3, 2 * entries)):
        path = Path(NEIGHBOUR_SYSCTL.format(level))
        current = int(path.read_text())
        if current < wanted:
            path.write_text(str(wanted))
            changed.append(f"gc_thresh{level} {current} -> {wanted}")
    return changed


def addresses(name: str, ifname: str = "eth0") -> list[str]:
    """IPv4 addresses (`ADDR/LEN`) configured on an interface inside a namespace."""
    out = subprocess.run(["ip", "-n", name, "-j", "-4", "addr", "show", "dev", ifname],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return []
    return [f"{a['local']}/{a['prefixlen']}" for link in json.loads(out.stdout or "[]")
            for a in link.get("addr_info", [])]
