"""pipitctl: the operator's command line (calicoctl-like): the verbs over resources (IP pools,
BGP peers and configuration, nodes), `ipam` (pipitctl.ipam_cli), node status, versions, shell
completion and the lab."""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from bgp_agent.node import VERSION_ANNOTATION
from bgp_agent.status import DEFAULT_STATUS_SOCKET, read_status
from bgp_agent.version import software_version
from ipam.errors import InvalidResource, NotFound, PipitError
from ipam.resource import load_documents
from ipam.snapshot import load_snapshot
from ipam.store import Store
from pipitctl import output, workloads
from pipitctl.ipam_cli import ipam
from pipitctl.node_status import render as render_status
from pipitctl.options import (complete_kinds, complete_names, echo_lines, etcd_options,
                              file_option, with_etcd_options)
from pipitctl.resources import (CREATE, REPLACE, apply_objects, delete_objects, edit_object,
                                get_objects, kind_named, merge_patch, parse_label_changes,
                                read_kind, read_objects, relabel)


KINDS_HELP = "ippools, bgppeers, bgpconfigurations, nodes or workloadendpoints"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(software_version(), "--version", prog_name="pipitctl",
                      message="%(prog)s %(version)s")
@with_etcd_options
def cli(**etcd) -> None:
    """Manage Pipit pod networking: IP pools, IP address management and BGP."""


@cli.command()
@click.option("--client", is_flag=True, help="Only this pipitctl's version (no etcd needed).")
@with_etcd_options
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


@cli.command()
@file_option()
@etcd_options
async def apply(store: Store, sources) -> None:
    """Create or update the resources in a file (all or nothing)."""
    echo_lines(await apply_objects(store, read_objects(sources)))


@cli.command()
@file_option()
@click.option("--skip-exists", is_flag=True, help="Leave the resources that exist as they are.")
@etcd_options
async def create(store: Store, sources, skip_exists: bool) -> None:
    """Create the resources in a file; fails (writing none) if any already exists."""
    echo_lines(await apply_objects(store, read_objects(sources), CREATE, skip_exists))


@cli.command(name="replace")
@file_option()
@etcd_options
async def replace_command(store: Store, sources) -> None:
    """Update the resources in a file; fails (writing none) if any does not exist."""
    echo_lines(await apply_objects(store, read_objects(sources), REPLACE))


@cli.command()
@click.argument("kind", required=False, shell_complete=complete_kinds)
@click.argument("names", nargs=-1, shell_complete=complete_names)
@file_option(required=False, help="Delete the resources named in a file, a directory of "
                                  "them, or - for stdin.")
@click.option("-s", "--skip-not-exists", is_flag=True,
              help="Delete the others when some do not exist.")
@click.option("--force", is_flag=True,
              help="Delete an IP pool even while addresses in it are in use (releases "
                   "them), or a node whose agent still runs.")
@etcd_options
async def delete(store: Store, kind: str | None, names: tuple[str, ...], sources,
                 skip_not_exists: bool, force: bool) -> None:
    """Delete resources: `delete ippool NAME...` or `delete -f FILE`; each is checked (it
    exists, a pool is not in use) before any is deleted."""
    if sources is not None:
        if kind:
            raise InvalidResource("give either -f FILE or KIND NAME..., not both.")
        targets = [(i.kind, i.name) for i in read_objects(sources)]
    elif kind and names:
        targets = [(kind_named(kind), name) for name in names]
    else:
        raise InvalidResource("say what to delete: `pipitctl delete ippool NAME...` or "
                              "`pipitctl delete -f FILE`.")
    echo_lines(await delete_objects(store, targets, force, skip_not_exists))


OUTPUTS = "table, wide, yaml, json, name or custom-columns=COLUMN,..."


@cli.command()
@click.argument("kind", required=False, shell_complete=complete_kinds)
@click.argument("names", nargs=-1, shell_complete=complete_names)
@click.option("-o", "--output", "fmt", default="table", show_default=True, metavar="FORMAT",
              help=f"{OUTPUTS} (the columns of -o wide).")
@click.option("-l", "--selector", metavar="SELECTOR",
              help="Only resources whose labels match (Calico's syntax: rack == 'a').")
@click.option("-n", "--namespace", metavar="NAMESPACE",
              help="Workload endpoints of this namespace only (the others are not namespaced).")
@click.option("-A", "--all-namespaces", is_flag=True,
              help="Workload endpoints of every namespace (what get shows without -n).")
@etcd_options
async def get(store: Store, kind: str | None, names: tuple[str, ...], fmt: str,
              selector: str | None, namespace: str | None, all_namespaces: bool) -> None:
    """Show resources: `get ippools [NAME...] [-l SELECTOR] [-o FORMAT]`."""
    if not kind:
        raise InvalidResource(f"say which kind to get: {KINDS_HELP} (`pipitctl get ippools`).")
    if fmt not in ("table", "ps", "wide", "yaml", "yml", "json", "name") \
            and not fmt.startswith("custom-columns="):
        raise InvalidResource(f"output format {fmt!r} is not one of {OUTPUTS}.")
    if namespace and all_namespaces:
        raise InvalidResource("give -n NAMESPACE or -A, not both.")
    if kind.lower() in workloads.WORDS:
        return await _get_endpoints(store, names, fmt, selector, namespace)
    k = kind_named(kind)
    if namespace or all_namespaces:
        raise InvalidResource(f"{k.plural} are not namespaced: leave out -n and -A.")
    found = await get_objects(store, k, names, selector)
    _show(fmt, k.columns, k.wide_columns, lambda wide: [_row(k, s, wide) for s in found],
          [s.document for s in found], [f"{k.word}/{s.name}" for s in found], len(names) == 1)


def _show(fmt: str, columns, wide_columns, rows: Callable[[bool], list[tuple]],
          documents: list[Callable[[], dict]], names: list[str], single: bool) -> None:
    """What `get` prints in format `fmt`: the table of `rows(wide)`, the documents, or the
    names (`single`: one JSON document rather than a List)."""
    if fmt in ("yaml", "yml"):
        click.echo(output.documents_yaml([document() for document in documents]))
    elif fmt == "json":
        click.echo(output.documents_json([document() for document in documents], single))
    elif fmt == "name":
        echo_lines(names)
    elif fmt.startswith("custom-columns="):
        try:
            headers, picked = output.pick_columns(wide_columns, rows(True),
                                                  fmt.partition("=")[2].split(","))
        except ValueError as error:
            raise InvalidResource(f"custom-columns: {error}.") from None
        click.echo(output.table(headers, picked))
    elif fmt == "wide":
        click.echo(output.table(wide_columns, rows(True)))
    else:
        click.echo(output.table(columns, rows(False)))


async def _get_endpoints(store: Store, names: tuple[str, ...], fmt: str,
                         selector: str | None, namespace: str | None) -> None:
    """`get workloadendpoints [NAME...] [-n NAMESPACE]`: the pods IPAM holds addresses for
    (NAME: the endpoint's or the pod's), of every namespace unless one is named."""
    if selector:
        raise InvalidResource("-l selects by labels, which workload endpoints do not carry "
                              "here; name the pods instead.")
    found = [e for e in workloads.endpoints(await load_snapshot(store))
             if namespace is None or e.namespace == namespace]
    if names:
        found = [e for e in found if e.name in names or e.pod in names]
        missing = [n for n in names if not any(n in (e.name, e.pod) for e in found)]
        if missing:
            raise NotFound(f"workload endpoint {missing[0]!r} not found (no pod of that name "
                           f"holds addresses{f' in namespace {namespace}' if namespace else ''}).")
    _show(fmt, workloads.COLUMNS, workloads.WIDE_COLUMNS,
          lambda wide: [e.row(wide) for e in found], [e.document for e in found],
          [f"workloadendpoint/{e.name}" for e in found], len(found) == 1 and len(names) == 1)


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


cli.add_command(ipam)


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script (kinds, and names from etcd):
    `source <(pipitctl completion bash)`."""
    from click.shell_completion import get_completion_class
    click.echo(get_completion_class(shell)(cli, {}, "pipitctl", "_PIPITCTL_COMPLETE").source())


# click 8.2+ raises this for a bare `pipitctl` (or `pipitctl ipam`); older versions print the
# help themselves.
_HELP_NOT_ERROR = getattr(click.exceptions, "NoArgsIsHelpError", ())


@cli.group()
def node() -> None:
    """This node: its agent's BGP sessions and routes, what its kernel can do."""


@node.command(name="status")
@click.option("--socket", "path", default=DEFAULT_STATUS_SOCKET, show_default=True,
              metavar="PATH", help="The agent's status socket.")
def node_status(path: str) -> None:
    """BGP sessions of the agent on this node (peers, state, routes received and exported)."""
    click.echo(render_status(read_status(path)))


@node.command(name="checksystem")
def node_checksystem() -> None:
    """Whether this host's kernel does what Pipit asks of it (tunnels, NAT, conntrack, TCP
    MD5), each check saying what needs it; exit 1 if any is missing."""
    from pipitctl.checksystem import run_checks, table
    checks = run_checks()
    click.echo(table(checks))
    missing = [c for c in checks if not c.ok]
    if missing:
        raise InvalidResource(f"this host lacks {', '.join(c.what for c in missing)}: "
                              f"{'; '.join(c.needed_for for c in missing)} cannot be used on "
                              "it.")
    click.echo("This host's kernel does everything Pipit asks of it.")


@node.command(name="diags")
@click.option("--dir", "directory", default="/tmp", show_default=True,
              type=click.Path(file_okay=False, exists=True), help="Where to write the archive.")
@click.option("--state-dir", default="/run/pipit", show_default=True, metavar="DIR",
              help="The agent's --state-dir (its ExaBGP configuration, the pod MTU).")
@click.option("--socket", "status_socket", default=DEFAULT_STATUS_SOCKET, show_default=True,
              metavar="PATH", help="The agent's status socket.")
@etcd_options
async def node_diags(store: Store, directory: str, state_dir: str, status_socket: str) -> None:
    """Collect what support needs of this node and the cluster into one archive (calicoctl's
    node diags): status, routes, NAT, links, sysctls, ExaBGP's configuration without its
    passwords, every resource and the IPAM check."""
    from pipitctl.diags import collect
    path, errors = await collect(store, Path(directory), Path(state_dir), status_socket)
    for error in errors:
        click.echo(f"not collected: {error}", err=True)
    click.echo(f"Diagnostics written to {path}")


@cli.group()
def lab() -> None:
    """A whole cluster on this machine: etcd, nodes and pods in network namespaces."""


lab_dir = click.option("--dir", "directory", default="/tmp/pipit-lab", show_default=True,
                       type=click.Path(file_okay=False), help="The lab's state directory.")
lab_prefix = click.option("--prefix", envvar="PIPIT_LAB_PREFIX", metavar="PREFIX",
                          help="What the names of the lab's network namespaces start with "
                               "[env PIPIT_LAB_PREFIX; default pipit-lab-]; a running lab "
                               "keeps the one it was started with.")


def lab_prefix_for(directory: str, given: str | None) -> str:
    """The namespace prefix of the lab in `directory`: the one it was started with, else the
    one given, else the default."""
    from lab.cluster import DEFAULT_PREFIX, Lab
    recorded = Lab(Path(directory)).recorded_prefix()
    if recorded and given and given != recorded:
        raise InvalidResource(f"the lab in {directory} was started with --prefix {recorded}, "
                              f"not {given}.")
    prefix = recorded or given or DEFAULT_PREFIX
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", prefix):
        raise InvalidResource(f"--prefix {prefix!r} is not a plain name (letters, digits, "
                              "'.', '_' and '-').")
    return prefix


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
@click.option("--topology", type=click.Choice(["mesh", "racks", "rr"]), default="mesh",
              show_default=True, help="One bridge and a node-to-node mesh; two racks whose "
                                      "nodes peer eBGP with a top-of-rack router each; or one "
                                      "bridge, the mesh off and dedicated route reflectors.")
@click.option("--router", type=click.Choice(["bird", "frr", "gobgp"]), default="bird",
              show_default=True, help="racks: the top-of-rack routers' implementation.")
@click.option("--route-reflectors", default=2, show_default=True, type=click.IntRange(1, 9),
              help="rr: how many route reflectors.")
@click.option("--reflector", type=click.Choice(["pipit", "bird"]), default="pipit",
              show_default=True, help="rr: the reflectors' implementation (pipit-rr, or BIRD "
                                      "2 on port 1179).")
@click.option("--etcd-tls", is_flag=True, help="etcd with TLS client certificates (a CA and "
                                               "certificates made with openssl).")
@click.option("--kubernetes", is_flag=True,
              help="mesh: also an API server (Pipit's fake) with the nodes as Nodes and the "
                   "pods as Pods, agents using it, and pipit-controller (lab/kube.py).")
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
@lab_prefix
def lab_up(nodes: int, pods_per_node: int, topology: str, router: str, route_reflectors: int,
           reflector: str, etcd_tls: bool, kubernetes: bool, chart: str | None,
           values: tuple[str, ...], image: str | None, directory: str,
           prefix: str | None) -> None:
    """Start (or complete) the lab; print node status and a pod-to-pod ping matrix."""
    from lab.chart import ChartNodes
    from lab.cluster import Lab
    prefix = lab_prefix_for(directory, prefix)
    running = Lab(Path(directory)).running_topology()
    if running and (running != topology or topology == "racks"):
        raise InvalidResource(f"a {running} lab is running in {directory}; re-running up "
                              "completes a mesh or rr lab of the same topology only: "
                              "`pipitctl lab down` first.")
    if (values or image) and not chart:
        raise InvalidResource("--values and --image go with --from-chart.")
    if chart and (topology != "mesh" or kubernetes or etcd_tls):
        raise InvalidResource("--from-chart runs the mesh topology only, without --kubernetes "
                              "or --etcd-tls.")
    nodes_from = (ChartNodes(Path(directory), Path(chart), tuple(map(Path, values)),
                             image=Path(image) if image else None) if chart else None)
    with lab_errors():
        ok = Lab(Path(directory), prefix=prefix, topology=topology, router=router,
                 reflectors=route_reflectors, reflector=reflector, etcd_tls=etcd_tls,
                 kubernetes=kubernetes, chart=nodes_from).up(nodes, pods_per_node,
                                                             render_status)
    if not ok:
        raise SystemExit(1)


@lab.command(name="upgrade")
@click.option("--values", "values", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A values file to add (repeat for more).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="A value to set, as helm's --set (repeat for more).")
@lab_dir
@lab_prefix
def lab_upgrade(values: tuple[str, ...], settings: tuple[str, ...], directory: str,
                prefix: str | None) -> None:
    """A lab started --from-chart: render the chart again with these values and replace each
    node's pod the way the DaemonSet's rolling update does; then node status and the ping
    matrix."""
    from lab.cluster import Lab
    lab = Lab(Path(directory), prefix=lab_prefix_for(directory, prefix))
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
@lab_prefix
def lab_status(directory: str, prefix: str | None) -> None:
    """Node status of every lab node and the ping matrix."""
    from lab.cluster import Lab
    lab = Lab(Path(directory), prefix=lab_prefix_for(directory, prefix))
    if lab.running_topology() is None:
        raise InvalidResource(f"no lab is running in {directory}.")
    with lab_errors():
        ok = lab.report(render_status)
    if not ok:
        raise SystemExit(1)


@lab.command(name="down")
@lab_dir
@lab_prefix
def lab_down(directory: str, prefix: str | None) -> None:
    """Remove every namespace, process and file of the lab (also after a crash)."""
    from lab.cluster import Lab
    prefix = lab_prefix_for(directory, prefix)
    with lab_errors():
        Lab(Path(directory), prefix=prefix).down()
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

