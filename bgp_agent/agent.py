"""pipit-agent: the long-running process on every node.

It serves the local IPAM service the CNI plugin talks to, registers the node, and routes:
announces the node's blocks over BGP through an ExaBGP sidecar and installs the routes it
learns into the kernel.

Signals: SIGTERM, with `--sigterm retire` (the default), and SIGINT retire the node from
routing (its routes are withdrawn from every peer, ExaBGP stops if the agent started it), then
exit. SIGUSR1, and SIGTERM with `--sigterm exit` (what a DaemonSet wants: a rolling update
sends SIGTERM to every agent), exit without touching anything: ExaBGP keeps its sessions (or,
stopped beside the agent, leaves them to graceful restart), the kernel keeps its routes, and
the next agent adopts them. SIGKILL has the same effect as SIGUSR1.

For a kubelet: /livez and /readyz (bgp_agent.health, `--health-listen`), and the node's CNI
configuration written once IPAM can be served (bgp_agent.cni_conflist, `--cni-conf-file`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from bgp_agent import cni_conflist, health, long_lived, name_claim
from bgp_agent.bgp_config import parse_as_number
from bgp_agent.model import DEFAULT_AS
from bgp_agent.node import (
    NodeRecord,
    detect_address,
    ipam_only_status,
    parse_cluster_id,
    parse_explicit_address,
    register,
)
from bgp_agent.reachable import when_reachable
from bgp_agent.version import software_version
from bgp_agent.status import DEFAULT_STATUS_SOCKET, StatusServer
from ipam.allocator import IPAM
from ipam.errors import InvalidResource, PipitError
from ipam.pool import LOAD_BALANCER_NODE
from ipam.resource import duration_argument
from ipam.service import DEFAULT_SOCKET, IPAMService
from ipam.store import EtcdConfig, Store

log = logging.getLogger("pipit-agent")
DEFAULT_STATE_DIR = "/run/pipit"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pipit-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pipit-agent {software_version()}")
    parser.add_argument("--node", default=os.environ.get("NODENAME") or socket.gethostname(),
                        help="This node's name, as in Kubernetes (default: NODENAME, which "
                             "the chart sets from spec.nodeName, else the host name).")
    parser.add_argument("--kubeconfig", metavar="PATH",
                        help="Use the Kubernetes API (default: only when running in a pod): "
                             "node identity, labels and annotations, pool selection by pod "
                             "and namespace annotations, NetworkUnavailable.")
    parser.add_argument("--ipam-socket", default=DEFAULT_SOCKET, metavar="PATH",
                        help=f"Unix socket of the local IPAM service (default {DEFAULT_SOCKET}).")
    parser.add_argument("--no-bgp", action="store_true",
                        help="Run the IPAM service alone, without routing (the node registers "
                             "with --ip's address, if given).")
    address = parser.add_mutually_exclusive_group()
    address.add_argument("--ip", metavar="ADDR/PREFIX",
                         help="This node's BGP address, e.g. 10.0.0.11/24 (default: detected).")
    address.add_argument("--ip-autodetection-method", default="first-found", metavar="METHOD",
                         help="first-found | interface=REGEX | skip-interface=REGEX | cidr=CIDR "
                              "| can-reach=IP | kubernetes-internal-ip (default first-found).")
    parser.add_argument("--autodetect-poll-interval", type=duration_argument,
                        default=os.environ.get("AUTODETECT_POLL_INTERVAL", "60s"),
                        metavar="DURATION",
                        help="How often a detected address is looked for again; a new one is "
                             "registered and the node's sessions move to it (default 60s; 0: "
                             "never) [env AUTODETECT_POLL_INTERVAL, as calico-node's].")
    parser.add_argument("--as", dest="as_number", metavar="N",
                        help="This node's AS number, such as 65001 or asdot 1.10 (default: "
                             f"the cluster's, {DEFAULT_AS}).")
    parser.add_argument("--route-reflector-cluster-id", metavar="ID",
                        help="Make this node a route reflector of this cluster id, e.g. "
                             "244.0.0.1 (default: as its node record says; Calico's "
                             "routeReflectorClusterID).")
    parser.add_argument("--reflector-only", action="store_true",
                        help="Only reflect routes (a dedicated route reflector, `pipit-rr`): no "
                             "IPAM service, no kernel routes; the node needs a cluster id.")
    parser.add_argument("--labels", default="", metavar="K=V,...",
                        help="Labels for this node's record (pools and peers select on them).")
    parser.add_argument("--exabgp", choices=["spawn", "sidecar"], default="spawn",
                        help="Start and supervise ExaBGP (spawn), or expect one started "
                             "beside the agent with the rendered configuration (sidecar).")
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR",
                        help=f"Where ExaBGP's configuration and sockets live "
                             f"(default {DEFAULT_STATE_DIR}).")
    parser.add_argument("--status-socket", default=DEFAULT_STATUS_SOCKET, metavar="PATH",
                        help=f"Status socket for `pipitctl node status` "
                             f"(default {DEFAULT_STATUS_SOCKET}).")
    parser.add_argument("--mtu", type=mtu_value, metavar="BYTES",
                        help="Pod and tunnel MTU (default: the uplink's, less the "
                             "encapsulation's overhead: IPIP 20, VXLAN 50). The pod MTU is "
                             "published in STATE_DIR/pod-mtu for the CNI configuration.")
    parser.add_argument("--secrets-dir", metavar="DIR",
                        help="Where BGPPeer passwords given as secretKeyRef are: "
                             "DIR/<secret name>/<key>, as a mounted Kubernetes Secret volume "
                             "lays them out.")
    EtcdConfig.add_arguments(parser)
    parser.add_argument("--metrics-address", type=_metrics_address, metavar="HOST:PORT",
                        help="Serve Prometheus metrics on http://HOST:PORT/metrics (off unless "
                             "given; :9091 for every address).")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--sigterm", choices=["retire", "exit"], default="retire",
                        help="On SIGTERM, retire the node (withdraw its routes, stop ExaBGP) "
                             "or exit leaving sessions, routes and ExaBGP to the next agent, "
                             "as SIGUSR1 does (default retire; a DaemonSet wants exit).")
    health.add_arguments(parser)
    cni_conflist.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.node == LOAD_BALANCER_NODE:
        parser.error(f"node name {LOAD_BALANCER_NODE!r} is where load-balancer addresses are "
                     "allocated (Calico's name for it); give this node another with --node.")
    return args


def _metrics_address(text: str) -> str:
    from bgp_agent.metrics import metrics_address
    try:
        return metrics_address(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def mtu_value(text: str) -> int:
    """--mtu: a whole number no smaller than IPv4's minimum datagram (576)."""
    if not text.isdigit() or not 576 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not an MTU between 576 and 65535")
    return int(text)


def parse_labels(text: str) -> dict[str, str]:
    labels = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidResource(f"--labels item {item!r} is not KEY=VALUE.")
        labels[key] = value
    return labels


def node_identity(args: argparse.Namespace) -> NodeRecord:
    address = (parse_explicit_address(args.ip) if args.ip
               else None if args.no_bgp else detect_address(args.ip_autodetection_method))
    as_number = None if args.as_number is None else parse_as_number(args.as_number, "--as",
                                                                        "the AS number")
    cluster_id = (parse_cluster_id(args.route_reflector_cluster_id,
                                   "--route-reflector-cluster-id")
                  if args.route_reflector_cluster_id else None)
    return NodeRecord(args.node, address, as_number, parse_labels(args.labels),
                      route_reflector_cluster_id=cluster_id)


def find_identity(args: argparse.Namespace, kube) -> NodeRecord:
    """This node's record as the flags, its Kubernetes Node (if any) and its interfaces say."""
    if kube is not None and not args.no_bgp:
        return kube.identity(args, parse_labels(args.labels))
    return node_identity(args)


async def run(args: argparse.Namespace) -> None:
    config = EtcdConfig.from_arguments(args)
    listen = health.parse_listen(args.health_listen) if args.health_listen else None
    conflist = cni_conflist.ConflistWriter.from_args(args)
    stop = asyncio.Event()
    retire = True
    loop = asyncio.get_running_loop()

    def stop_and(retire_node: bool):
        def handler():
            nonlocal retire
            retire = retire_node
            stop.set()
        return handler
    loop.add_signal_handler(signal.SIGTERM, stop_and(args.sigterm == "retire"))
    loop.add_signal_handler(signal.SIGINT, stop_and(True))
    loop.add_signal_handler(signal.SIGUSR1, stop_and(False))

    if args.metrics_address:
        from bgp_agent import metrics
        metrics.serve(args.metrics_address)
    from bgp_agent.kube_node import AgentKubernetes
    # The probes answer from the start: alive, and not ready until the agent's parts exist,
    # saying what it waits for (the Kubernetes API, then etcd).
    starting = health.Starting()
    probes = health.HealthServer(listen, starting.health()) if listen else None
    kube = None
    try:
        if probes:
            await probes.start()
        kube = await AgentKubernetes.connect(  # None without Kubernetes, or stopped waiting
            args, stop, starting.waiting_for("the Kubernetes API"))
        if stop.is_set():
            return
        # Who this node is, its address found on its interfaces, before IPAM is served: a
        # node that cannot tell says so in one sentence and has written nothing.
        identity = await asyncio.to_thread(find_identity, args, kube)  # pyroute2 inside
        async with Store(config) as store:
            await serve(args, store, identity, stop, lambda: retire, kube, probes, starting,
                        conflist)
    finally:
        if kube is not None:
            await kube.close()
        if probes:
            await probes.close()


async def serve(args: argparse.Namespace, store: Store, identity: NodeRecord,
                stop: asyncio.Event, retiring, kube, probes: health.HealthServer | None,
                starting: health.Starting, conflist: cni_conflist.ConflistWriter | None
                ) -> None:
    """The node's name claimed (bgp_agent.name_claim), then IPAM, the node's registration
    and routing, until `stop`."""
    claim = await when_reachable(
        lambda: name_claim.claim_node_name(
            store, identity.name, stop,
            starting.waiting_for("another host's claim on the node name to lapse")),
        stop, f"node {identity.name} not registered yet",
        f"node {identity.name} claimed: etcd answered", starting.waiting_for("etcd"))
    if claim is None:
        return
    keeping = asyncio.create_task(name_claim.keep(store, claim))
    ipam = IPAM(store)
    service = None if args.reflector_only else IPAMService(
        ipam, args.node, args.ipam_socket, pod_request=kube.pods.request if kube else None)
    try:
        if service is not None:
            await service.start()
        parts = health.AgentParts(store, service, routing=not args.no_bgp, conflist=conflist)
        if probes:
            probes.health = health.agent_health(parts, asyncio.get_running_loop().time)
        if args.no_bgp:  # registered all the same, so that it is listed and has a status
            me = await register_when_reachable(store, identity, stop)
            if me is None:
                return
            status = StatusServer(args.status_socket, lambda: ipam_only_status(me))
            await status.start()
            if conflist:  # IPAM can be served: etcd answered the registration
                conflist.publish(args.mtu or cni_conflist.DEFAULT_MTU)
            try:
                await stop.wait()
            finally:
                await status.close()
        else:
            while identity is not None:  # a new identity: the node's address changed
                identity = await route(store, ipam, args, identity, stop, retiring, kube, parts,
                                       conflist)
        log.info("stopping")
    finally:
        if service is not None:
            await service.close()
        keeping.cancel()
        await name_claim.release(store, claim)


async def register_when_reachable(store: Store, identity: NodeRecord, stop: asyncio.Event
                                  ) -> NodeRecord | None:
    """register(), tried again for as long as etcd cannot be reached (bgp_agent.reachable).
    None if `stop` comes first (nothing has been written). etcd refusing the agent
    (authentication, permissions: as calico-node stops when unauthorised) and any other
    refusal (an address another node holds...) end it."""
    return await when_reachable(lambda: register(store, identity), stop,
                                f"node {identity.name} not registered yet",
                                f"node {identity.name} registered: etcd answered")


async def route(store: Store, ipam: IPAM, args: argparse.Namespace, identity: NodeRecord,
                stop: asyncio.Event, retiring, kube=None,
                parts: health.AgentParts | None = None,
                conflist: cni_conflist.ConflistWriter | None = None) -> NodeRecord | None:
    """Register the node (`identity`), then run the BGP speaker and the routing loop until
    `stop` (None), or until the node's detected address changes: then its new record, left
    as SIGUSR1 leaves (nothing withdrawn, ExaBGP running), for a new pass to adopt."""
    from bgp_agent.node_dataplane import NodeDataplane
    from bgp_agent.model import SpeakerError
    from bgp_agent.routing import Router
    from bgp_agent.speaker import ExaBGPSpeaker
    from ipip.kernel_routes import KernelRoutes
    from ipip.route_table import RouteTable

    me = await register_when_reachable(store, identity, stop)
    if me is None:
        return None
    log.info("node %s registered with address %s", me.name, me.address)
    if args.reflector_only and me.route_reflector_cluster_id is None:
        raise InvalidResource(f"node {me.name} has no route reflector cluster id: give "
                              "--route-reflector-cluster-id (or set routeReflectorClusterID "
                              "on its node record).")
    state_dir = Path(args.state_dir)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    kernel = None if args.reflector_only else KernelRoutes()
    speaker = ExaBGPSpeaker(state_dir / "exabgp", state_dir / "exabgp.sock", args.exabgp,
                            router_id=me.address.ip, local_address=me.address.ip,
                            local_as=me.as_number or DEFAULT_AS,
                            reflector=me.route_reflector_cluster_id is not None)
    dataplane = (None if args.reflector_only
                 else NodeDataplane(store, ipam, state_dir / "pod-mtu", args.mtu))
    router = Router(store, me, speaker, kernel and RouteTable(kernel),
                    secrets_dir=args.secrets_dir, dataplane=dataplane)
    speaker.on_change = router.changed.set
    if kube is not None and dataplane is not None:  # a node: /32s of its Local services
        router.node_services = kube.services
    if conflist and dataplane is not None:
        dataplane.on_pod_mtu = conflist.publish  # the first once IPAM and routing are up
    status = StatusServer(args.status_socket, router.status.to_json)
    collector = None
    if args.metrics_address:
        from bgp_agent import metrics
        collector = metrics.StatusCollector(router.status.to_json,
                                            None if args.reflector_only else router.ipam_usage)
        metrics.register(collector)
    await speaker.start()
    await status.start()
    task = asyncio.create_task(router.run())
    freezing = asyncio.create_task(freeze_when_loaded(router))
    if kube is not None:  # NetworkUnavailable=False once the routes are programmed
        asyncio.create_task(kube.network_available(router.programmed))
    if parts:
        parts.router, parts.speaker, parts.task = router, speaker, task
    stopping = asyncio.create_task(stop.wait())
    watching = (asyncio.create_task(address_change(store, args, kube, me))
                if not args.ip and args.autodetect_poll_interval > 0 else None)
    moved = None
    try:
        await asyncio.wait({task, stopping} | ({watching} if watching else set()),
                           return_when=asyncio.FIRST_COMPLETED)
        if task.done():  # the routing loop ended by itself: a bug; say so and stop
            task.result()
        if watching is not None and watching.done() and not stopping.done():
            moved = watching.result()
            log.info("node %s moves to its new address %s: its sessions and routes follow",
                     me.name, moved.address)
            return moved
        return None
    finally:
        stopping.cancel()
        if watching is not None:
            watching.cancel()
        freezing.cancel()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await status.close()
        if collector is not None:
            metrics.unregister(collector)
        retire = moved is None and retiring()
        try:
            if retire:
                log.info("retiring: withdrawing this node's routes from every peer")
                await speaker.retire()
        except SpeakerError as error:  # ExaBGP away or slow: stop it all the same
            log.error("could not withdraw this node's routes before stopping: %s", error)
        finally:
            await speaker.stop(stop_exabgp=retire)
            if kernel is not None:
                kernel.close()
                dataplane.close()


async def address_change(store: Store, args: argparse.Namespace, kube, me: NodeRecord
                         ) -> NodeRecord:
    """The node's record, registered anew, once the address detected on its interfaces is no
    longer `me`'s (looked for every --autodetect-poll-interval, as calico-node looks every
    AUTODETECT_POLL_INTERVAL, with the Kubernetes Node read again each time: one GET a
    minute per node by default). A detection that finds nothing, etcd or the API away, or a
    registration refused (another node's record holds the address) keep the old address,
    saying why."""
    while True:
        await asyncio.sleep(args.autodetect_poll_interval)
        try:
            if kube is not None and not args.no_bgp:  # the Node as it is now
                await kube.refresh()
            found = await asyncio.to_thread(find_identity, args, kube)
            if found.address != me.address:
                return await register(store, found)
        except PipitError as error:
            log.warning("node %s keeps its address %s: %s", me.name, me.address, error)


async def freeze_when_loaded(router) -> None:
    """Once the cluster state is in, the objects alive stay for good: out of the garbage
    collector's walks (bgp_agent.long_lived)."""
    await asyncio.gather(*(m.ready.wait() for m in router.mirrors))
    log.debug("%d long-lived objects left out of garbage collection", long_lived.freeze())


def main_reflector(argv: list[str] | None = None) -> None:
    """pipit-rr: pipit-agent as a dedicated route reflector (--reflector-only)."""
    main(["--reflector-only", *(sys.argv[1:] if argv is None else argv)])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format=f"%(asctime)s pipit-agent[{args.node}] %(levelname)s "
                               "%(name)s: %(message)s")
    try:
        asyncio.run(run(args))
    except PipitError as error:
        log.error("%s", error)
        sys.exit(1)
    except OSError as error:  # a missing exabgp, a socket path that cannot be made...
        log.error("%s", error)
        sys.exit(1)


if __name__ == "__main__":
    main()
