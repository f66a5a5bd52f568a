"""`pipitctl ipam`: usage, consistency checks and their fixes, releases, splits, settings."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address

import click

from bgp_agent.kube_api import KubernetesUnavailable
from ipam import block as blocks
from ipam import keys
from ipam.config import (DEFAULT_MAX_BLOCKS_PER_HOST, MAX_IP_COOLDOWN_SECONDS, IPAMConfig,
                         config_from_document, config_from_spec, config_to_document)
from ipam.errors import Conflict, DatastoreUnavailable, InUse, InvalidResource
from ipam.release import release_addresses
from ipam.reservation import read_reservations, reservations_holding
from ipam.snapshot import blocks_of, load_snapshot, lookup, pool_usage
from ipam.store import Store
from ipam.txn import Changes, transact
from pipitctl import output
from pipitctl.ipam_report import (Finding, borrowed, fix_report, findings, read_report, release_verdict,
                                   report_document)
from pipitctl.options import echo_lines, etcd_options
from pipitctl.split import split_stored_pool


@click.group()
def ipam() -> None:
    """IP address management: usage, consistency, releases and settings."""


@ipam.command()
@click.option("--show-blocks", is_flag=True, help="Also list every block with its node.")
@click.option("--show-borrowed", is_flag=True,
              help="Also list the addresses nodes borrowed from other nodes' blocks.")
@click.option("--ip", "address", metavar="ADDRESS", help="Say who holds one address.")
@click.option("--show-configuration", is_flag=True,
              help="Show the IPAM settings instead (as `ipam configure` with no change).")
@etcd_options
async def show(store: Store, show_blocks: bool, show_borrowed: bool,
               address: str | None, show_configuration: bool) -> None:
    """Pool usage: addresses in use and free, per pool (and per block)."""
    if show_configuration:
        entry = await store.get(keys.IPAM_CONFIG)
        _echo_settings(config_from_document(entry.value) if entry else IPAMConfig())
        return
    snap = await load_snapshot(store)
    if address:
        parsed = parse_address(address)
        reservations = read_reservations(await store.list(keys.RESERVATIONS))
        click.echo(describe_address(snap, parsed, reservations_holding(reservations, parsed)))
        return
    rows = []
    for pool in snap.pools:
        usage = pool_usage(snap, pool)
        rows.append((pool.name, pool.cidr, usage.total, usage.used, usage.free,
                     f"{output.bar(usage.percent / 100)} {output.percent(usage.percent)}"))
    click.echo(output.table(("POOL", "CIDR", "TOTAL", "IN USE", "FREE", "USED"), rows))
    if show_blocks:
        block_rows = [(pool.name, b.cidr, b.node or "(none)", b.used, b.free)
                      for pool in snap.pools for b in blocks_of(snap, pool)]
        click.echo()
        click.echo(output.table(("POOL", "BLOCK", "NODE", "IN USE", "FREE"), block_rows))
    if show_borrowed:
        click.echo()
        click.echo(output.table(("ADDRESS", "BLOCK", "BLOCK OWNER", "BORROWED BY", "HANDLE"),
                                [(b.address, b.block, b.owner or "(none)", b.borrower,
                                  b.handle) for b in borrowed(snap)]))


@ipam.command()
@click.argument("pool")
@click.argument("parts", type=int)
@etcd_options
async def split(store: Store, pool: str, parts: int) -> None:
    """Split an IP pool into PARTS (a power of two) pools of its settings; its blocks and
    addresses stay as they are."""
    for new in await split_stored_pool(store, pool, parts):
        click.echo(f"ippool {new.name!r} created with cidr {new.cidr}")
    click.echo(f"ippool {pool!r} deleted (split into {parts})")


def parse_address(text: str) -> IPv4Address:
    try:
        return IPv4Address(text)
    except ValueError:
        raise InvalidResource(f"{text!r} is not an IPv4 address.") from None


def describe_address(snap, address: IPv4Address, reserved_by: Sequence[str] = ()) -> str:
    """Who holds `address`, and which IPReservations (`reserved_by`, their names) hold it."""
    text = _holder_of(snap, address)
    if reserved_by:
        names = ", ".join(repr(name) for name in reserved_by)
        whose = f"IP reservations {names} hold" if len(reserved_by) > 1 else \
            f"IP reservation {names} holds"
        text += f" {whose} it: IPAM gives it only to a pod that asks for it."
    return text


def _holder_of(snap, address: IPv4Address) -> str:
    info = lookup(snap, address)
    if info.pool is None and info.block is None:
        return f"{address} is not in any IP pool."
    if info.block is None:
        return f"{address} is free: it is in pool {info.pool.name!r}, in no block yet."
    where = f"block {info.block.cidr} (node {info.block.node or 'none'})"
    reserved = info.block.reserved_as(address)
    if reserved:
        return f"{address} is reserved as {reserved} of {where}."
    if info.holder is None:
        return f"{address} is free, in {where}."
    attrs = " ".join(f"{k}={v}" for k, v in sorted(info.holder.secondary.items()))
    secondary = info.holder.secondary
    floating = (f", a floating IP of pod {secondary.get('namespace')}/{secondary.get('pod')} "
                f"(leads to {secondary[blocks.FLOATING_FOR]})"
                if secondary.get(blocks.FLOATING_FOR) else "")
    return (f"{address} is in use by handle {info.holder.handle_id}{floating} ({attrs}) in "
            f"{where}, sequence {info.sequence}.")


CHECK_NOT_DONE = 3  # `ipam check`'s exit code when it could not read what it checks


class CheckNotDone(click.ClickException):
    """etcd (or the Kubernetes API to compare with) could not be read: nothing was checked,
    which is not "problems found" (exit 1)."""
    exit_code = CHECK_NOT_DONE


def not_done_if_unreadable(command: Callable) -> Callable:
    @functools.wraps(command)
    def wrapper(**kwargs):
        try:
            return command(**kwargs)
        except (DatastoreUnavailable, KubernetesUnavailable) as error:
            raise CheckNotDone(str(error)) from None
    return wrapper


@ipam.command(name="check")
@click.option("--show-problem-ips", is_flag=True,
              help="Also list every address a problem concerns, with its handle.")
@click.option("-o", "--output", "report", metavar="FILE",
              help="Write the findings as JSON, for `ipam release --from-report FILE`.")
@click.option("--kubeconfig", metavar="PATH", envvar="KUBECONFIG",
              help="Also compare with the pods in Kubernetes: report addresses whose pod is "
                   "gone or has another IP [env KUBECONFIG].")
@not_done_if_unreadable
@etcd_options
async def check_command(store: Store, show_problem_ips: bool, report: str | None,
                        kubeconfig: str | None) -> None:
    """Find leaked addresses, orphaned handles, stale claims and the like, each with the
    command that fixes it (exit 1 if any; 3 if etcd or the Kubernetes API could not be
    read)."""
    snap = await load_snapshot(store)
    found = findings(snap, report or "REPORT")
    summary = (f"checked {len(snap.blocks)} blocks, {len(snap.handles)} handles and "
               f"{len(snap.affinities)} affinities")
    if kubeconfig:
        from pipitctl.kube_check import unclaimed_problems
        problems, pods = await unclaimed_problems(snap, kubeconfig)
        found += [Finding(problem, "pipit-controller releases it after its grace period (or "
                          "pipitctl ipam release --ip ADDRESS --force)")
                  for problem in problems]
        summary += f" against {pods} pods"
    if report:
        try:
            with open(report, "w") as f:
                json.dump(report_document(snap, found), f, indent=2)
        except OSError as error:
            raise InvalidResource(f"cannot write the report {report}: {error.strerror}.") \
                from None
    if not found:
        click.echo(f"{summary}: no problems found.")
        return
    click.echo(output.table(("PROBLEM", "SUBJECT", "DETAIL", "FIX"),
                            [(f.problem.kind, f.problem.subject, f.problem.detail, f.fix)
                             for f in found]))
    if show_problem_ips:
        rows = [(a.address, a.block, a.handle, f.problem.kind)
                for f in found for a in f.addresses]
        rows += [("-", "-", f.problem.subject, f.problem.kind) for f in found
                 if f.problem.kind == "orphan-handle"]
        click.echo()
        click.echo(output.table(("ADDRESS", "BLOCK", "HANDLE", "PROBLEM"), rows))
    click.echo(f"{summary}: {len(found)} problem(s) found"
               + (f"; written to {report}." if report else "."))
    raise SystemExit(1)


@ipam.command(name="release")
@click.option("--ip", "addresses", multiple=True, metavar="ADDRESS",
              help="An address to release (repeatable).")
@click.option("--force", is_flag=True,
              help="Release an address a live allocation holds (its pod's handle counts it).")
@click.option("--from-report", "report", metavar="FILE",
              help="Fix what `ipam check -o FILE` found and a fresh check still finds.")
@etcd_options
async def release_command(store: Store, addresses: tuple[str, ...], force: bool,
                          report: str | None) -> None:
    """Release addresses by hand (all or none of them), or fix what `ipam check` reported."""
    if bool(addresses) == bool(report):
        raise InvalidResource("say what to release: --ip ADDRESS... or --from-report FILE.")
    if report:
        reported = read_report(report)
        done, left = await fix_report(store, reported, await load_snapshot(store))
        echo_lines(done)
        for line in left:
            click.echo(f"left: {line}")
        if not done and not left:
            click.echo(f"{report} lists no problems.")
        return
    wanted = list(dict.fromkeys(parse_address(a) for a in addresses))
    snap = await load_snapshot(store)
    releases = []
    for address in wanted:
        release, refusal = release_verdict(snap, address, force)
        if refusal:
            raise InUse(f"{refusal}; nothing was released.")
        releases.append(release)
    freed = set(await release_addresses(store, releases))
    for address in wanted:
        if address in freed:
            click.echo(f"released {address}")
    gone = [a for a in wanted if a not in freed]
    if gone:
        raise Conflict(f"{gone[0]} changed while being released (freed or handed out again "
                       "since it was read); check it with `pipitctl ipam show --ip` and run the "
                       "release again if it is still to go.")


@ipam.command()
@click.option("--strict-affinity", type=click.Choice(["true", "false"]), metavar="true|false",
              help="Only use the node's own blocks; never borrow from other nodes' blocks.")
@click.option("--max-blocks-per-host", type=int, metavar="N",
              help=f"Blocks one node may claim (0 means {DEFAULT_MAX_BLOCKS_PER_HOST}).")
@click.option("--ip-cooldown-seconds", type=int, metavar="N",
              help="Seconds an address a pod gave back waits before it is handed out again "
                   f"(0-{MAX_IP_COOLDOWN_SECONDS}; 0: as soon as its turn comes).")
@click.option("--auto-allocate-blocks", type=click.Choice(["true", "false"]),
              metavar="true|false",
              help="false: a node claims a block only for an address asked for by value in "
                   "it (needs --strict-affinity true).")
@etcd_options
async def configure(store: Store, strict_affinity: str | None,
                    max_blocks_per_host: int | None, ip_cooldown_seconds: int | None,
                    auto_allocate_blocks: str | None) -> None:
    """Show or change the IPAM settings."""
    given = {field: value for field, value in (
        ("strictAffinity", None if strict_affinity is None else strict_affinity == "true"),
        ("maxBlocksPerHost", max_blocks_per_host), ("ipCooldownSeconds", ip_cooldown_seconds),
        ("autoAllocateBlocks",
         None if auto_allocate_blocks is None else auto_allocate_blocks == "true"))
        if value is not None}
    for field, value in given.items():  # each refused before anything is read
        if field != "autoAllocateBlocks":
            config_from_spec({field: value})

    async def decide(changes: Changes) -> IPAMConfig:
        entry = await changes.get(keys.IPAM_CONFIG)
        config = config_from_document(entry.value) if entry else IPAMConfig()
        document = config_to_document(config)
        document["spec"].update(given)
        # checked together (autoAllocateBlocks false needs strictAffinity); labels kept
        new = config_from_document(document)
        if new != config:  # showing the settings writes nothing
            changes.put(keys.IPAM_CONFIG, config_to_document(new))
        return new
    _echo_settings(await transact(store, decide, "changing the IPAM settings"))


def _echo_settings(config: IPAMConfig) -> None:
    limit = config.max_blocks_per_host
    click.echo(f"strictAffinity: {output.yes_no(config.strict_affinity)}")
    click.echo(f"maxBlocksPerHost: {limit}" + (f" (means {config.block_limit})" if not limit
                                               else ""))
    click.echo(f"ipCooldownSeconds: {config.ip_cooldown_seconds}")
    click.echo(f"autoAllocateBlocks: {output.yes_no(config.auto_allocate_blocks)}")
