"""pipitctl: the operator's command line (calicoctl-like): resources (IP pools, BGP peers and
configuration, nodes), IPAM, node status and the lab."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import subprocess
import sys
from pathlib import Path
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address

import click

from ipam.block import Release
from ipam.config import DEFAULT_MAX_BLOCKS_PER_HOST, IPAMConfig, config_from_spec, config_to_document
from ipam.errors import InvalidResource, PipitError
from ipam import keys
from ipam.release import release_addresses
from ipam.snapshot import blocks_of, check, load_snapshot, lookup, pool_usage
from ipam.store import ENV_CA, ENV_CERT, ENV_ENDPOINTS, ENV_KEY, EtcdConfig, Store
from ipam.resource import MAX_INPUT_BYTES
from ipam.txn import Changes, transact
from bgp_agent.status import DEFAULT_STATUS_SOCKET, read_status
from pipitctl import output
from pipitctl.node_status import render as render_status
from pipitctl.resources import apply_objects, delete_object, get_objects, kind_named, read_objects


_ETCD_OPTIONS = (
    click.option("--etcd-endpoints", metavar="URLS",
                 help=f"Comma-separated etcd URLs [env {ENV_ENDPOINTS}; default "
                      "http://127.0.0.1:2379]."),
    click.option("--etcd-ca-cert", metavar="FILE",
                 help=f"CA certificate to verify etcd with [env {ENV_CA}]."),
    click.option("--etcd-cert", metavar="FILE", help=f"Client certificate for etcd [env {ENV_CERT}]."),
    click.option("--etcd-key", metavar="FILE", help=f"Client key for etcd [env {ENV_KEY}]."),
)
_ETCD_NAMES = ("etcd_endpoints", "etcd_ca_cert", "etcd_cert", "etcd_key")


def _with_etcd_options(function: Callable) -> Callable:
    for option in reversed(_ETCD_OPTIONS):
        function = option(function)
    return function


def etcd_options(command: Callable) -> Callable:
    """--etcd-* options on a command (also accepted before it, on pipitctl itself); the async
    command gets a connected `store` as its first argument."""
    @_with_etcd_options
    @functools.wraps(command)
    def wrapper(**kwargs):
        given = {n: kwargs.pop(n) for n in _ETCD_NAMES}
        parent = click.get_current_context().find_root().params
        config = EtcdConfig.from_options(*(given[n] or parent.get(n) for n in _ETCD_NAMES))

        async def main():
            async with Store(config) as store:
                return await command(store, **kwargs)
        return asyncio.run(main())
    return wrapper


def read_input(filename: str) -> str:
    """A file's text (stdin for -): at most MAX_INPUT_BYTES, UTF-8."""
    where = "stdin" if filename == "-" else filename
    try:
        if filename == "-":
            data = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
        else:
            with open(filename, "rb") as f:
                data = f.read(MAX_INPUT_BYTES + 1)
        if len(data) > MAX_INPUT_BYTES:
            raise InvalidResource(f"{where} is larger than the {MAX_INPUT_BYTES} bytes pipitctl "
                                  "reads at once; split it into smaller files.")
        return data.decode("utf-8")
    except OSError as error:
        raise InvalidResource(f"cannot read {filename}: {error.strerror}.") from None
    except UnicodeDecodeError:
        raise InvalidResource(f"cannot read {where}: it is not UTF-8 text.") from None


file_option = click.option("-f", "--filename", required=True, metavar="FILE",
                           help="YAML or JSON file with one or more resources, - for stdin.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@_with_etcd_options
def cli(**etcd) -> None:
    """Manage Pipit pod networking: IP pools, IP address management and BGP."""


@cli.command()
@file_option
@etcd_options
async def apply(store: Store, filename: str) -> None:
    """Create or update the resources in a file (all or nothing)."""
    for line in await apply_objects(store, read_objects(read_input(filename))):
        click.echo(line)


@cli.command()
@file_option
@etcd_options
async def create(store: Store, filename: str) -> None:
    """Create the resources in a file; fails if any already exists."""
    for line in await apply_objects(store, read_objects(read_input(filename)), create_only=True):
        click.echo(line)


@cli.command()
@click.argument("kind", required=False)
@click.argument("name", required=False)
@click.option("-f", "--filename", metavar="FILE", help="Delete the resources named in a file.")
@click.option("--force", is_flag=True,
              help="Delete an IP pool even while addresses in it are in use (releases them).")
@etcd_options
async def delete(store: Store, kind: str | None, name: str | None, filename: str | None,
                 force: bool) -> None:
    """Delete a resource: `delete ippool NAME` or `delete -f FILE`."""
    if filename:
        targets = [(k, o.name) for k, o in read_objects(read_input(filename))]
    elif kind and name:
        targets = [(kind_named(kind), name)]
    else:
        raise InvalidResource("say what to delete: `pipitctl delete ippool NAME` or "
                              "`pipitctl delete -f FILE`.")
    for k, n in targets:
        click.echo(await delete_object(store, k, n, force))


@cli.command()
@click.argument("kind")
@click.argument("name", required=False)
@click.option("-o", "--output", "fmt", type=click.Choice(["table", "wide", "yaml", "json"]),
              default="table", show_default=True)
@etcd_options
async def get(store: Store, kind: str, name: str | None, fmt: str) -> None:
    """Show resources: `get ippools [NAME] -o table|wide|yaml|json`."""
    k = kind_named(kind)
    objects = await get_objects(store, k, name)
    if fmt == "yaml":
        click.echo(output.documents_yaml([k.to_document(o) for o in objects]))
    elif fmt == "json":
        click.echo(output.documents_json([k.to_document(o) for o in objects], name is not None))
    elif fmt == "wide":
        click.echo(output.table(k.wide_columns, [k.wide_row(o) for o in objects]))
    else:
        click.echo(output.table(k.columns, [k.row(o) for o in objects]))


@cli.group()
def ipam() -> None:
    """IP address management: usage, consistency, releases and settings."""


@ipam.command()
@click.option("--show-blocks", is_flag=True, help="Also list every block with its node.")
@click.option("--ip", "address", metavar="ADDRESS", help="Say who holds one address.")
@etcd_options
async def show(store: Store, show_blocks: bool, address: str | None) -> None:
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
@etcd_options
async def check_command(store: Store) -> None:
    """Find leaked addresses, orphaned handles and affinities without blocks (exit 1 if any)."""
    snap = await load_snapshot(store)
    problems = check(snap)
    summary = (f"checked {len(snap.blocks)} blocks, {len(snap.handles)} handles and "
               f"{len(snap.affinities)} affinities")
    if not problems:
        click.echo(f"{summary}: no problems found.")
        return
    click.echo(output.table(("PROBLEM", "SUBJECT", "DETAIL"),
                            [(p.kind, p.subject, p.detail) for p in problems]))
    click.echo(f"{summary}: {len(problems)} problem(s) found.")
    raise SystemExit(1)


@ipam.command(name="release")
@click.option("--ip", "addresses", multiple=True, required=True, metavar="ADDRESS",
              help="An address to release (repeatable).")
@etcd_options
async def release_command(store: Store, addresses: tuple[str, ...]) -> None:
    """Release addresses by hand (for leaks that `ipam check` found)."""
    wanted = [parse_address(a) for a in addresses]
    freed = set(await release_addresses(store, [Release(a) for a in wanted]))
    for address in wanted:
        if address in freed:
            click.echo(f"released {address}")
        else:
            click.echo(f"Error: {address} was not in use; nothing released.", err=True)
    if len(freed) < len(set(wanted)):
        raise SystemExit(1)


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
@click.option("--from-chart", "chart", type=click.Path(exists=True, file_okay=False),
              help="Run the nodes from this Helm chart (charts/pipit) as a kubelet would: "
                   "the rendered DaemonSet's pod on each node, from the image "
                   "scripts/build-image made.")
@click.option("--values", "values", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="--from-chart: a values file (repeat for more).")
@click.option("--image", type=click.Path(exists=True, dir_okay=False),
              help="--from-chart: the OCI image archive (default: build/image/"
                   "pipit-<appVersion>.oci.tar).")
@lab_dir
def lab_up(nodes: int, pods_per_node: int, topology: str, router: str, chart: str | None,
           values: tuple[str, ...], image: str | None, directory: str) -> None:
    """Start (or complete) the lab; print node status and a pod-to-pod ping matrix."""
    from lab.chart import ChartNodes
    from lab.cluster import Lab
    running = Lab(Path(directory)).running_topology()
    if running and (running, topology) != ("mesh", "mesh"):
        raise InvalidResource(f"a {running} lab is running in {directory}; re-running up "
                              "completes only a mesh lab: `pipitctl lab down` first.")
    if (values or image) and not chart:
        raise InvalidResource("--values and --image go with --from-chart.")
    if chart and topology != "mesh":
        raise InvalidResource("--from-chart runs the mesh topology only.")
    nodes_from = (ChartNodes(Path(directory), Path(chart), tuple(map(Path, values)),
                             image=Path(image) if image else None) if chart else None)
    with lab_errors():
        ok = Lab(Path(directory), topology=topology, router=router, chart=nodes_from).up(
            nodes, pods_per_node, render_status)
    if not ok:
        raise SystemExit(1)


@lab.command(name="upgrade")
@click.option("--values", "values", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A values file to add (repeat for more).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="A value to set, as helm's --set (repeat for more).")
@lab_dir
def lab_upgrade(values: tuple[str, ...], settings: tuple[str, ...], directory: str) -> None:
    """A lab started --from-chart: render the chart again with these values and replace each
    node's pod the way the DaemonSet's rolling update does; then node status and the ping
    matrix."""
    from lab.cluster import Lab
    lab = Lab(Path(directory))
    if lab.chart is None:
        raise InvalidResource(f"no lab started --from-chart is running in {directory}.")
    pairs = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key:
            raise InvalidResource(f"--set {setting!r} is not KEY=VALUE.")
        pairs[key] = value
    with lab_errors():
        lab.chart.upgrade(lab, tuple(map(Path, values)), pairs)
        ok = lab.report(render_status)
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
    try:
        cli.main(standalone_mode=False)
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

