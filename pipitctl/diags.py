"""`pipitctl node diags` (calicoctl's): what support needs to see of one node, in one archive.

The node's side (its agent's status, Pipit's routes and NAT table, links, addresses and
neighbours, the sysctls that matter, what `node checksystem` finds, ExaBGP's configuration
with every password taken out) and the cluster's as etcd has it (every resource, IPAM's
usage and `ipam check`'s report). Each part that cannot be had (etcd away, no agent, a tool
missing) is said in `errors.txt` and the rest is still collected: diagnostics are wanted
most when something is broken.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import os
import re
import shutil
import socket
import subprocess
import tarfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bgp_agent.status import read_status
from bgp_agent.version import software_version
from ipam.errors import InvalidResource, PipitError
from ipam.snapshot import load_snapshot
from ipam.store import Store
from ipip import nat
from pipitctl import checksystem, output
from pipitctl.ipam_report import findings, report_document
from pipitctl.resources import KINDS, get_objects

SYSCTLS = ("net/ipv4/ip_forward", "net/ipv4/conf/all/rp_filter",
           "net/ipv4/conf/default/rp_filter", "net/netfilter/nf_conntrack_count",
           "net/netfilter/nf_conntrack_max")
# what the host's tools say, as JSON where they can (argv, file name)
COMMANDS = (
    (("ip", "-j", "-d", "link", "show"), "links.json"),
    (("ip", "-j", "addr", "show"), "addresses.json"),
    (("ip", "-j", "route", "show", "table", "all"), "routes.json"),
    (("ip", "-j", "rule", "show"), "rules.json"),
    (("ip", "-j", "neigh", "show"), "neighbours.json"),
    (("bridge", "-j", "fdb", "show"), "fdb.json"),
)
_PASSWORD = re.compile(r'(md5-password\s+)"[^"\n]*"')


def redacted(config: str) -> str:
    """ExaBGP's configuration with the value of every md5-password taken out."""
    return _PASSWORD.sub(r'\1"(removed)"', config)


def _run(argv: tuple[str, ...]) -> str:
    if shutil.which(argv[0]) is None:
        raise OSError(f"{argv[0]} is not installed")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        said = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[0]
        raise OSError(f"`{' '.join(argv)}` failed: {said}")
    return result.stdout


def _nat_table() -> str:
    """Pipit's nftables table (ipip.nat), or a line saying it is not there."""
    tables = _run(("nft", "list", "tables")).split("\n")
    if f"table {nat.FAMILY} {nat.TABLE}" not in tables:
        return (f"# no table {nat.FAMILY} {nat.TABLE}: no pool has natOutgoing, no pod here "
                "has a floating IP\n")
    return _run(("nft", "list", "table", nat.FAMILY, nat.TABLE))


def _sysctls() -> str:
    lines = []
    for name in SYSCTLS:
        try:
            value = Path("/proc/sys", name).read_text().strip()
        except OSError as error:
            value = f"(unreadable: {error.strerror})"
        lines.append(f"{name.replace('/', '.')} = {value}")
    return "\n".join(lines) + "\n"


def _checksystem() -> str:
    return checksystem.table(checksystem.run_checks()) + "\n"


async def collect(store: Store, directory: Path, state_dir: Path, status_socket: str,
                  clock: Callable[[], float] = time.time) -> tuple[Path, list[str]]:
    """Write the archive into `directory`; its path, and what could not be collected."""
    parts: dict[str, str] = {}
    errors: list[str] = []

    async def part(name: str, make: Callable[[], Awaitable[str] | str]) -> None:
        """One file of the archive: an async `make` (etcd) awaited, any other run in a
        thread (pyroute2's and the tools' blocking calls, outside this event loop)."""
        try:
            if inspect.iscoroutinefunction(make):
                parts[name] = await make()
            else:
                parts[name] = await asyncio.to_thread(make)
        except (OSError, PipitError, subprocess.SubprocessError, ValueError) as error:
            errors.append(f"{name}: {error}")

    await part("version.txt", lambda: f"pipitctl {software_version()}\n")
    await part("node-status.json",
               lambda: json.dumps(read_status(status_socket), indent=2) + "\n")
    await part("checksystem.txt", _checksystem)
    await part("sysctl.txt", _sysctls)
    for argv, name in COMMANDS:
        await part(name, lambda argv=argv: _run(argv))
    await part("nat.nft", _nat_table)
    await part("exabgp.conf", lambda: redacted((state_dir / "exabgp" / "exabgp.conf")
                                               .read_text()))
    await part("pod-mtu", lambda: (state_dir / "pod-mtu").read_text())

    async def resources() -> str:
        documents = [s.document() for kind in KINDS for s in await get_objects(store, kind)]
        return output.documents_yaml(documents)

    async def ipam_check() -> str:
        snap = await load_snapshot(store)
        return json.dumps(report_document(snap, findings(snap)), indent=2) + "\n"
    await part("resources.yaml", resources)
    await part("ipam-check.json", ipam_check)
    if errors:
        parts["errors.txt"] = "\n".join(errors) + "\n"

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(clock()))
    for attempt in range(100):  # another run in the same second: the next free name
        base = f"pipit-diags-{socket.gethostname()}-{stamp}" + (f"-{attempt}" if attempt
                                                                 else "")
        path = Path(directory) / f"{base}.tar.gz"
        try:  # routes, addresses and the cluster's resources: its owner's to read, new
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            break
        except FileExistsError:
            continue
        except OSError as error:
            raise InvalidResource(f"cannot write {path}: {error.strerror.lower()}; name "
                                  "another directory with --dir.") from None
    else:
        raise InvalidResource(f"{directory} holds 100 archives of this second already.")
    with open(descriptor, "wb") as file, tarfile.open(fileobj=file, mode="w:gz") as archive:
        for name, text in parts.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{base}/{name}")
            info.size, info.mtime, info.mode = len(data), int(clock()), 0o600
            archive.addfile(info, io.BytesIO(data))
    return path, errors
