"""pipitctl: the operator's command line (calicoctl-like) for pools, IPAM and, later, BGP."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from collections.abc import Callable, Iterator, Mapping
from ipaddress import IPv4Address

import click

from ipam.config import DEFAULT_MAX_BLOCKS_PER_HOST, IPAMConfig, config_from_spec, config_to_document
from ipam.errors import Conflict, DatastoreUnavailable, InUse, InvalidResource, PipitError
from ipam import keys
from ipam.release import release_addresses
from ipam.snapshot import blocks_of, load_snapshot, lookup, pool_usage
from ipam.store import ENV_CA, ENV_CERT, ENV_ENDPOINTS, ENV_KEY, EtcdConfig, Store
from ipam.resource import MAX_INPUT_BYTES, load_documents
from ipam.txn import Changes, transact
from bgp_agent.status import DEFAULT_STATUS_SOCKET, read_status
from pipitctl import output
from bgp_agent.node import VERSION_ANNOTATION
from bgp_agent.version import software_version
from pipitctl.config import DEFAULT_CONFIG, read_config
from pipitctl.ipam_report import (borrowed, fix_report, findings, read_report, release_verdict,
                                   report_document)
from pipitctl.split import split_stored_pool
from pipitctl.node_status import render as render_status
from pipitctl.resources import (CREATE, KINDS, REPLACE, apply_objects, delete_objects, edit_object,
                                get_objects, kind_named, merge_patch, parse_label_changes,
                                read_kind, read_objects, relabel)


_ETCD_OPTIONS = (
    click.option("--etcd-endpoints", metavar="URLS",
                 help=f"Comma-separated etcd URLs [env {ENV_ENDPOINTS}; default "
                      "http://127.0.0.1:2379]."),
    click.option("--etcd-ca-cert", metavar="FILE",
                 help=f"CA certificate to verify etcd with [env {ENV_CA}]."),
    click.option("--etcd-cert", metavar="FILE", help=f"Client certificate for etcd [env {ENV_CERT}]."),
    click.option("--etcd-key", metavar="FILE", help=f"Client key for etcd [env {ENV_KEY}]."),
    click.option("-c", "--config", "config_file", metavar="FILE",
                 help=f"Where etcd is, as a PipitctlConfig [default {DEFAULT_CONFIG}, if it "
                      "exists]; flags and the environment win over it."),
)
_ETCD_NAMES = ("etcd_endpoints", "etcd_ca_cert", "etcd_cert", "etcd_key")
_ETCD_ENV = {"etcd_endpoints": ENV_ENDPOINTS, "etcd_ca_cert": ENV_CA, "etcd_cert": ENV_CERT,
             "etcd_key": ENV_KEY}


def _with_etcd_options(function: Callable) -> Callable:
    for option in reversed(_ETCD_OPTIONS):
        function = option(function)
    return function


def etcd_config(given: Mapping[str, str | None]) -> tuple[EtcdConfig, bool]:
    """Where etcd is: each setting from its flag, else the environment, else the config
    file, else the default; and whether the endpoints were named at all."""
    from_file = read_config(given.get("config_file"))
    values = [given.get(n) or os.environ.get(_ETCD_ENV[n]) or from_file.get(n)
              for n in _ETCD_NAMES]
    return EtcdConfig.from_options(*values), bool(values[0])


def etcd_options(command: Callable) -> Callable:
    """--etcd-* options on a command (also accepted before it, on pipitctl itself); the async
    command gets a connected `store` as its first argument."""
    @_with_etcd_options
    @functools.wraps(command)
    def wrapper(**kwargs):
        parent = click.get_current_context().find_root().params
        given = {n: kwargs.pop(n) or parent.get(n) for n in (*_ETCD_NAMES, "config_file")}
        config, named = etcd_config(given)

        async def main():
            async with Store(config) as store:
                return await command(store, **kwargs)
        try:
            return asyncio.run(main())
        except DatastoreUnavailable as error:
            if named:
                raise
            raise DatastoreUnavailable(
                f"{str(error).rstrip('.')}; no etcd was named, so pipitctl tried its default: "
                f"name yours with --etcd-endpoints, {ENV_ENDPOINTS} or etcdEndpoints in "
                f"{DEFAULT_CONFIG}.") from None
    return wrapper


def read_input(filename: str) -> list[tuple[str, str]]:
    """(name, text) of each file the -f argument names: a file, stdin for -, or every .yaml,
    .yml and .json file of a directory (in name order); at most MAX_INPUT_BYTES in all, UTF-8."""
    if filename != "-" and os.path.isdir(filename):
        names = sorted(n for n in os.listdir(filename)
                       if n.endswith((".yaml", ".yml", ".json")) and not n.startswith("."))
        if not names:
            raise InvalidResource(f"directory {filename} holds no .yaml, .yml or .json file.")
        paths = [os.path.join(filename, n) for n in names]
    else:
        paths = [filename]
    sources, left = [], MAX_INPUT_BYTES
    for path in paths:
        text = _read_text(path, left, filename)
        left -= len(text.encode())
        sources.append((path if len(paths) > 1 else "", text))
    return sources


def _read_text(path: str, limit: int, named: str) -> str:
    where = "stdin" if path == "-" else named if path == named else f"{named} (in all)"
    try:
        if path == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
        if len(data) > limit:
            raise InvalidResource(f"{where} is larger than the {MAX_INPUT_BYTES} bytes pipitctl "
                                  "reads at once; split it into smaller files.")
        return data.decode("utf-8")
    except OSError as error:
        raise InvalidResource(f"cannot read {path}: {error.strerror}.") from None
    except UnicodeDecodeError:
        raise InvalidResource(f"cannot read {'stdin' if path == '-' else path}: it is not "
                              "UTF-8 text.") from None


def _read_file_option(ctx, param, value):
    # read while the command line is parsed, before any event loop: Ctrl-C then interrupts a
    # read of stdin at once (inside asyncio.run the first SIGINT only waits for the read);
    # not while the shell completes a word
    return None if value is None or ctx.resilient_parsing else read_input(value)


# -- shell completion: kinds, and the names etcd holds of one -------------------------------

def complete_kinds(ctx, param, incomplete: str) -> list[str]:
    return [k.plural for k in KINDS if k.plural.startswith(incomplete.lower())]


def complete_names(ctx, param, incomplete: str) -> list[str]:
    """The names of the kind typed before, from etcd (nothing if it cannot be read soon)."""
    try:
        kind = kind_named(ctx.params.get("kind") or "")
        given = {**ctx.find_root().params, **{k: v for k, v in ctx.params.items() if v}}
        config, _ = etcd_config(given)

        async def names() -> list[str]:
            async with Store(replace(config, timeout=2.0)) as store:
                return [key.removeprefix(kind.prefix)
                        for key in await store.list_keys(kind.prefix)]
        found = asyncio.run(names())
    except Exception:  # completing must never print an error into the command line
        return []
    typed = set(ctx.params.get("names") or ())
    return [n for n in sorted(found) if n.startswith(incomplete) and n not in typed]


def file_option(required: bool = True, help: str = "YAML or JSON file with one or more "
                "resources, a directory of them, or - for stdin."):
    return click.option("-f", "--filename", "sources", required=required, metavar="FILE|DIR|-",
                        callback=_read_file_option, help=help)


KINDS_HELP = "ippools, bgppeers, bgpconfigurations or nodes"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(software_version(), "--version", prog_name="pipitctl",
                      message="%(prog)s %(version)s")
@_with_etcd_options
def cli(**etcd) -> None:
    """Manage Pipit pod networking: IP pools, IP address management and BGP."""


@cli.command()
@click.option("--client", is_flag=True, help="Only this pipitctl's version (no etcd needed).")
@_with_etcd_options
@click.pass_context
def version(ctx, client: bool, **etcd) -> None:
    """pipitctl's version and the versions of the cluster's agents (from their node records)."""
    click.echo(f"Client Version:  {software_version()}")
    if not client:
        agent_versions(**etcd)


@etcd_options
async def agent_versions(store: Store) -> None:
    listing = await read_kind(store, kind_named("nodes"))
    by_version: dict[str, list[str]] = {}
    for name, stored in sorted(listing.items.items()):
        annotations = stored.obj.annotations if stored.obj is not None else {}
        by_version.setdefault(annotations.get(VERSION_ANNOTATION, "unknown"), []).append(name)
    if not by_version:
        click.echo("Agent Versions:  (no node has registered)")
    for number, (found, nodes) in enumerate(sorted(by_version.items())):
        shown = ", ".join(nodes[:5]) + (f" and {len(nodes) - 5} more" if len(nodes) > 5 else "")
        click.echo(f"{'Agent Versions:' if number == 0 else '':17}{found} "
                   f"({len(nodes)} node{'s' if len(nodes) > 1 else ''}: {shown})")


def _echo_lines(lines: list[str]) -> None:
    for line in lines:
        click.echo(line)


@cli.command()
@file_option()
@etcd_options
async def apply(store: Store, sources) -> None:
    """Create or update the resources in a file (all or nothing)."""
    _echo_lines(await apply_objects(store, read_objects(sources)))


@cli.command()
@file_option()
@click.option("--skip-exists", is_flag=True, help="Leave the resources that exist as they are.")
@etcd_options
async def create(store: Store, sources, skip_exists: bool) -> None:
    """Create the resources in a file; fails (writing none) if any already exists."""
    _echo_lines(await apply_objects(store, read_objects(sources), CREATE, skip_exists))


@cli.command(name="replace")
@file_option()
@etcd_options
async def replace_command(store: Store, sources) -> None:
    """Update the resources in a file; fails (writing none) if any does not exist."""
    _echo_lines(await apply_objects(store, read_objects(sources), REPLACE))


@cli.command()
@click.argument("kind", required=False, shell_complete=complete_kinds)
@click.argument("names", nargs=-1, shell_complete=complete_names)
@file_option(required=False, help="Delete the resources named in a file, a directory of "
                                  "them, or - for stdin.")
@click.option("-s", "--skip-not-exists", is_flag=True,
              help="Delete the others when some do not exist.")
@click.option("--force", is_flag=True,
              help="Delete an IP pool even while addresses in it are in use (releases them).")
@etcd_options
async def delete(store: Store, kind: str | None, names: tuple[str, ...], sources,
                 skip_not_exists: bool, force: bool) -> None:
    """Delete resources: `delete ippool NAME...` or `delete -f FILE`; all or none of them."""
    if sources is not None:
        if kind:
            raise InvalidResource("give either -f FILE or KIND NAME..., not both.")
        targets = [(i.kind, i.name) for i in read_objects(sources)]
    elif kind and names:
        targets = [(kind_named(kind), name) for name in names]
    else:
        raise InvalidResource("say what to delete: `pipitctl delete ippool NAME...` or "
                              "`pipitctl delete -f FILE`.")
    _echo_lines(await delete_objects(store, targets, force, skip_not_exists))


OUTPUTS = "table, wide, yaml, json, name or custom-columns=COLUMN,..."


@cli.command()
@click.argument("kind", required=False, shell_complete=complete_kinds)
@click.argument("names", nargs=-1, shell_complete=complete_names)
@click.option("-o", "--output", "fmt", default="table", show_default=True, metavar="FORMAT",
              help=f"{OUTPUTS} (the columns of -o wide).")
@click.option("-l", "--selector", metavar="SELECTOR",
              help="Only resources whose labels match (Calico's syntax: rack == 'a').")
@etcd_options
async def get(store: Store, kind: str | None, names: tuple[str, ...], fmt: str,
              selector: str | None) -> None:
    """Show resources: `get ippools [NAME...] [-l SELECTOR] [-o FORMAT]`."""
    if not kind:
        raise InvalidResource(f"say which kind to get: {KINDS_HELP} (`pipitctl get ippools`).")
    k = kind_named(kind)
    if fmt not in ("table", "ps", "wide", "yaml", "yml", "json", "name") \
            and not fmt.startswith("custom-columns="):
        raise InvalidResource(f"output format {fmt!r} is not one of {OUTPUTS}.")
    found = await get_objects(store, k, names, selector)
    if fmt in ("yaml", "yml"):
        click.echo(output.documents_yaml([s.document() for s in found]))
    elif fmt == "json":
        click.echo(output.documents_json([s.document() for s in found], len(names) == 1))
    elif fmt == "name":
        _echo_lines([f"{k.word}/{s.name}" for s in found])
    elif fmt.startswith("custom-columns="):
        try:
            headers, rows = output.pick_columns(k.wide_columns, [_row(k, s, wide=True)
                                                                 for s in found],
                                                fmt.partition("=")[2].split(","))
        except ValueError as error:
            raise InvalidResource(f"custom-columns: {error}.") from None
        click.echo(output.table(headers, rows))
    elif fmt == "wide":
        click.echo(output.table(k.wide_columns, [_row(k, s, wide=True) for s in found]))
    else:
        click.echo(output.table(k.columns, [_row(k, s) for s in found]))


def _row(kind, stored, wide: bool = False) -> tuple:
    """A resource's table row; one that fails validation shows why in the second column."""
    if stored.obj is not None:
        return kind.wide_row(stored.obj) if wide else kind.row(stored.obj)
    width = len(kind.wide_columns if wide else kind.columns)
    return (stored.name, f"(invalid: {stored.invalid.rstrip('.')})") + ("",) * (width - 2)


@cli.command()
@click.argument("kind", shell_complete=complete_kinds)
@click.argument("name", shell_complete=complete_names)
@click.option("-p", "--patch", "patch_text", required=True, metavar="PATCH",
              help="A JSON (or YAML) merge patch: {\"spec\": {\"natOutgoing\": true}}; null "
                   "removes a field.")
@etcd_options
async def patch(store: Store, kind: str, name: str, patch_text: str) -> None:
    """Change fields of a resource with a merge patch (RFC 7386)."""
    k = kind_named(kind)
    documents = load_documents(patch_text)
    if len(documents) != 1 or not isinstance(documents[0], dict):
        raise InvalidResource("the patch must be one mapping, such as "
                              "'{\"spec\": {\"natOutgoing\": true}}'.")
    click.echo(await edit_object(store, k, name, lambda doc: merge_patch(doc, documents[0])))


@cli.command()
@click.argument("kind", shell_complete=complete_kinds)
@click.argument("name", shell_complete=complete_names)
@click.argument("changes", nargs=-1)
@click.option("--overwrite", is_flag=True, help="Change a label that has another value.")
@click.option("--remove", "removing", multiple=True, metavar="KEY",
              help="Remove this label (as KEY- does).")
@etcd_options
async def label(store: Store, kind: str, name: str, changes: tuple[str, ...], overwrite: bool,
                removing: tuple[str, ...]) -> None:
    """Set labels (KEY=VALUE) or remove them (KEY-) on a resource."""
    k = kind_named(kind)
    setting, dropping = parse_label_changes(changes)
    dropping += list(removing)
    if not setting and not dropping:
        raise InvalidResource("say which labels to set (KEY=VALUE) or remove (KEY-).")
    what = f"{k.word} {name!r}"
    line = await edit_object(store, k, name, lambda doc: relabel(doc, setting, dropping,
                                                                 overwrite, what))
    click.echo(line.replace(" configured", " labeled"))


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script (kinds, and names from etcd):
    `source <(pipitctl completion bash)`."""
    from click.shell_completion import get_completion_class
    click.echo(get_completion_class(shell)(cli, {}, "pipitctl", "_PIPITCTL_COMPLETE").source())


@cli.group()
def ipam() -> None:
    """IP address management: usage, consistency, releases and settings."""


@ipam.command()
@click.option("--show-blocks", is_flag=True, help="Also list every block with its node.")
@click.option("--show-borrowed", is_flag=True,
              help="Also list the addresses nodes borrowed from other nodes' blocks.")
@click.option("--ip", "address", metavar="ADDRESS", help="Say who holds one address.")
@etcd_options
async def show(store: Store, show_blocks: bool, show_borrowed: bool,
               address: str | None) -> None:
    """Pool usage: addresses in use and free, per pool (and per block)."""
    snap = await load_snapshot(store)
    if address:
        click.echo(describe_address(snap, parse_address(address)))
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


def describe_address(snap, address: IPv4Address) -> str:
    info = lookup(snap, address)
    if info.pool is None and info.block is None:
        return f"{address} is not in any IP pool."
    if info.block is None:
        return f"{address} is free: it is in pool {info.pool.name!r}, in no block yet."
    where = f"block {info.block.cidr} (node {info.block.node or 'none'})"
    if info.block.gateway == address:
        return f"{address} is reserved as the gateway of {where}."
    if info.holder is None:
        return f"{address} is free, in {where}."
    attrs = " ".join(f"{k}={v}" for k, v in sorted(info.holder.secondary.items()))
    return (f"{address} is in use by handle {info.holder.handle_id} ({attrs}) in {where}, "
            f"sequence {info.sequence}.")


@ipam.command(name="check")
@click.option("--show-problem-ips", is_flag=True,
              help="Also list every address a problem concerns, with its handle.")
@click.option("-o", "--output", "report", metavar="FILE",
              help="Write the findings as JSON, for `ipam release --from-report FILE`.")
@etcd_options
async def check_command(store: Store, show_problem_ips: bool, report: str | None) -> None:
    """Find leaked addresses, orphaned handles, stale claims and the like, each with the
    command that fixes it (exit 1 if any)."""
    snap = await load_snapshot(store)
    found = findings(snap, report or "REPORT")
    summary = (f"checked {len(snap.blocks)} blocks, {len(snap.handles)} handles and "
               f"{len(snap.affinities)} affinities")
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
        _echo_lines(done)
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
@etcd_options
async def configure(store: Store, strict_affinity: str | None,
                    max_blocks_per_host: int | None) -> None:
    """Show or change the IPAM settings."""
    if max_blocks_per_host is not None:
        config_from_spec({"maxBlocksPerHost": max_blocks_per_host})  # the same check as stored
    if strict_affinity is not None:
        strict_affinity = strict_affinity == "true"

    async def decide(changes: Changes) -> IPAMConfig:
        entry = await changes.get(keys.IPAM_CONFIG)
        config = config_from_spec(entry.value.get("spec") or {}) if entry else IPAMConfig()
        new = IPAMConfig(
            config.strict_affinity if strict_affinity is None else strict_affinity,
            config.max_blocks_per_host if max_blocks_per_host is None else max_blocks_per_host)
        if new != config:  # showing the settings writes nothing
            changes.put(keys.IPAM_CONFIG, config_to_document(new))
        return new
    config = await transact(store, decide, "changing the IPAM settings")
    limit = config.max_blocks_per_host
    click.echo(f"strictAffinity: {output.yes_no(config.strict_affinity)}")
    click.echo(f"maxBlocksPerHost: {limit}" + (f" (means {config.block_limit})" if not limit
                                               else ""))


# click 8.2+ raises this for a bare `pipitctl` (or `pipitctl ipam`); older versions print the
# help themselves.
_HELP_NOT_ERROR = getattr(click.exceptions, "NoArgsIsHelpError", ())


@cli.group()
def node() -> None:
    """This node's agent: BGP sessions and routes."""


@node.command(name="status")
@click.option("--socket", "path", default=DEFAULT_STATUS_SOCKET, show_default=True,
              metavar="PATH", help="The agent's status socket.")
def node_status(path: str) -> None:
    """BGP sessions of the agent on this node (peers, state, routes received and exported)."""
    click.echo(render_status(read_status(path)))


@cli.group()
def lab() -> None:
    """A whole cluster on this machine: etcd, nodes and pods in network namespaces."""


lab_dir = click.option("--dir", "directory", default="/tmp/pipit-lab", show_default=True,
                       type=click.Path(file_okay=False), help="The lab's state directory.")


@contextlib.contextmanager
def lab_errors() -> Iterator[None]:
    """What goes wrong in the lab (a command that fails, a deadline that passes) as one
    sentence, not a traceback."""
    try:
        yield
    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as error:
        if isinstance(error, OSError) and error.strerror:  # the system's: reason and file
            text = error.strerror + (f": {error.filename}" if error.filename else "")
        else:
            text = str(error)
        text = " ".join(text.split()).rstrip(".")  # one line (ip's stderr may hold several)
        raise click.ClickException(f"the lab failed: {text}") from None


@lab.command(name="up")
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(1, 50))
@click.option("--pods-per-node", default=2, show_default=True, type=click.IntRange(0, 50))
@click.option("--topology", type=click.Choice(["mesh", "racks"]), default="mesh",
              show_default=True, help="One bridge and a node-to-node mesh, or two racks whose "
                                      "nodes peer eBGP with a top-of-rack router each.")
@click.option("--router", type=click.Choice(["bird", "frr", "gobgp"]), default="bird",
              show_default=True, help="racks: the top-of-rack routers' implementation.")
@lab_dir
def lab_up(nodes: int, pods_per_node: int, topology: str, router: str, directory: str) -> None:
    """Start (or complete) the lab; print node status and a pod-to-pod ping matrix."""
    from lab.cluster import Lab
    running = Lab(Path(directory)).running_topology()
    if running and (running, topology) != ("mesh", "mesh"):
        raise InvalidResource(f"a {running} lab is running in {directory}; re-running up "
                              "completes only a mesh lab: `pipitctl lab down` first.")
    with lab_errors():
        ok = Lab(Path(directory), topology=topology, router=router).up(nodes, pods_per_node,
                                                                        render_status)
    if not ok:
        raise SystemExit(1)


@lab.command(name="status")
@lab_dir
def lab_status(directory: str) -> None:
    """Node status of every lab node and the ping matrix."""
    from lab.cluster import Lab
    lab = Lab(Path(directory))
    if lab.running_topology() is None:
        raise InvalidResource(f"no lab is running in {directory}.")
    with lab_errors():
        ok = lab.report(render_status)
    if not ok:
        raise SystemExit(1)


@lab.command(name="down")
@lab_dir
def lab_down(directory: str) -> None:
    """Remove every namespace, process and file of the lab (also after a crash)."""
    from lab.cluster import Lab
    with lab_errors():
        Lab(Path(directory)).down()
    click.echo("lab removed")


def main() -> None:
    # what a library logs (a stored pool it skips...) is not for the terminal: pipitctl says
    # what matters in its output and its one-sentence errors
    logging.getLogger().addHandler(logging.NullHandler())
    try:
        cli.main(prog_name="pipitctl", complete_var="_PIPITCTL_COMPLETE", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except _HELP_NOT_ERROR as error:  # bare `pipitctl`: the help
        error.show()
        sys.exit(error.exit_code)
    except click.ClickException as error:  # usage errors too: one line, not the usage text
        message = error.format_message().rstrip()
        click.echo(f"Error: {message}" + ("" if message.endswith(".") else "."), err=True)
        sys.exit(error.exit_code)
    except PipitError as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)

