"""pipit-controller: cleans up after Kubernetes in Pipit's etcd. One active instance (a Lease).

- Node deletion: a Kubernetes Node deleted (or deleted while the controller was down) has its
  leaked and tunnel addresses and its block affinities released and its node record deleted,
  once a direct GET confirms it is gone and nothing valid is left on it.
- Leak GC (Calico's rules, ipam.gc): an address whose pod is gone, or has another IP, is
  released after --gc-grace-period (at once if its node is gone); empty blocks are given
  back on their second sighting, never a node's last.
- Label sync: Kubernetes Node labels onto the node records (controller.labels).
- Load-balancer addresses: LoadBalancer services get theirs from the IP pools whose
  allowedUses is LoadBalancer, in their status (controller.load_balancer).

It watches Nodes and Pods (bgp_agent.kube_api.Informer: re-lists after 410, backs off while
the API server is away), runs a pass every half grace period (at most a minute apart) and
soon after a Node or Pod is deleted, and keeps going through API server restarts and etcd
outages, saying what it waits for in its log.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time

from bgp_agent.kube_api import DELETED, Event, Informer, KubeAPI, KubernetesUnavailable
from controller import metrics
from controller.ipam_gc import IPAMCollector
from controller.labels import sync_node_labels
from controller.load_balancer import LoadBalancers
from controller.passes import run_passes
from controller.leader import LeaseElection, LostLeadership
from ipam import gc
from ipam import load_balancer as lb
from ipam.errors import PipitError
from ipam.resource import duration_argument
from ipam.store import EtcdConfig, Store

log = logging.getLogger("pipit-controller")
DEBOUNCE = 1.0  # seconds: deletions coming together make one pass
MAX_INTERVAL = 60.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pipit-controller",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", metavar="PATH", default=os.environ.get("KUBECONFIG"),
                        help="Kubernetes API access [env KUBECONFIG]; default: the pod's "
                             "service account.")
    parser.add_argument("--gc-grace-period", type=duration_argument,
                        default=gc.DEFAULT_GRACE_SECONDS, metavar="DURATION",
                        help="How long an address whose pod is gone (or has another IP) is "
                             "kept before it is released (default 15m; 0 releases at once).")
    parser.add_argument("--load-balancer-ips", default=lb.ALL_SERVICES,
                        choices=[*lb.ASSIGN_MODES, "Disabled"],
                        help="Which LoadBalancer services get an address from the IP pools "
                             "whose allowedUses is LoadBalancer (Calico's assignIPs; default "
                             "AllServices, once such a pool exists).")
    parser.add_argument("--no-leader-elect", dest="leader_elect", action="store_false",
                        help="Run without the Lease (only with a single replica).")
    parser.add_argument("--lease-name", default="pipit-controller", metavar="NAME")
    parser.add_argument("--lease-namespace", default="kube-system", metavar="NAMESPACE")
    parser.add_argument("--lease-duration", type=duration_argument, default=15.0,
                        metavar="DURATION",
                        help="How long a Lease not renewed keeps others out (default 15s).")
    parser.add_argument("--identity", default=f"{socket.gethostname()}-{os.getpid()}",
                        help="This instance's name in the Lease (default HOSTNAME-PID).")
    EtcdConfig.add_arguments(parser)
    parser.add_argument("--metrics-address", type=_metrics_address, metavar="HOST:PORT",
                        help="Serve Prometheus metrics on http://HOST:PORT/metrics (off "
                             "unless given).")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


class Controller:
    def __init__(self, store: Store, api: KubeAPI, grace: float):
        self.store, self.api = store, api
        self.collector = IPAMCollector(store, api, grace)
        self.interval = min(max(grace / 2, 1.0), MAX_INTERVAL)
        self.wake = asyncio.Event()
        self.nodes = Informer(api, api.core.list_node, "nodes", on_event=self._on_node)
        self.pods = Informer(api, api.core.list_pod_for_all_namespaces, "pods",
                             on_event=self._on_pod)
        self.labels_due = True
        self._labels: dict[str, dict | None] = {}  # Node -> labels last seen
        self.passes = 0

    def _on_node(self, event: Event) -> None:
        """A deleted Node, or a Node whose labels changed (not a status heartbeat), wakes a
        pass."""
        meta = event.obj.get("metadata") or {}
        name = meta.get("name")
        if event.type == DELETED:
            log.info("Node %s deleted", name)
            self._labels.pop(name, None)
            self.wake.set()
        elif self._labels.get(name) != meta.get("labels"):
            self._labels[name] = meta.get("labels")
            self.labels_due = True
            self.wake.set()

    def _on_pod(self, event: Event) -> None:
        if event.type == DELETED:
            self.wake.set()

    def cluster(self) -> gc.Cluster:
        return gc.cluster_from_json(self.nodes.items.values(), self.pods.items.values())

    async def run(self) -> None:
        tasks = [asyncio.create_task(i.run()) for i in (self.nodes, self.pods)]
        try:
            log.info("listing Nodes and Pods from %s", self.api.url)
            await asyncio.gather(self.nodes.ready.wait(), self.pods.ready.wait())
            log.info("%d Nodes and %d Pods known; collecting every %gs", len(self.nodes.items),
                     len(self.pods.items), self.interval)
            await run_passes(self.run_pass, self.wake, self.interval, "GC pass", DEBOUNCE)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def run_pass(self) -> None:
        if self.labels_due:
            self.labels_due = False
            try:
                await sync_node_labels(self.store, {
                    n["metadata"]["name"]: (n["metadata"].get("labels") or {})
                    for n in self.nodes.items.values()})
            except PipitError:
                self.labels_due = True
                raise
        started = time.monotonic()
        try:
            result = await self.collector.run_pass(self.cluster())
        except Exception:
            metrics.GC_PASSES.labels("error").inc()
            raise
        metrics.GC_PASSES.labels("ok").inc()
        metrics.GC_PASS_SECONDS.observe(time.monotonic() - started)
        metrics.RELEASED_ADDRESSES.inc(result.addresses)
        metrics.RELEASED_BLOCKS.inc(len(result.blocks))
        metrics.CLEANED_NODES.inc(len(result.nodes))
        metrics.WAITING_LEAKS.set(result.waiting)
        self.passes += 1
        if result.released or result.blocks or result.nodes:
            log.info("GC pass: released %d address(es) of %d handle(s), %d empty block(s), "
                     "%d node(s) in %.2fs; %d candidate leak(s) within the grace period",
                     result.addresses, len(result.released), len(result.blocks),
                     len(result.nodes), time.monotonic() - started, result.waiting)
        elif result.waiting:
            log.info("GC pass: %d candidate leak(s) within the grace period", result.waiting)


def _metrics_address(text: str) -> str:
    from bgp_agent.metrics import metrics_address
    try:
        return metrics_address(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


async def run(args: argparse.Namespace) -> None:
    config = EtcdConfig.from_arguments(args)
    api = KubeAPI.connect(args.kubeconfig)
    if api is None:
        raise KubernetesUnavailable("pipit-controller needs the Kubernetes API: pass "
                                    "--kubeconfig, set KUBECONFIG, or run it in a pod.")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.metrics_address:
        from bgp_agent.metrics import serve
        serve(args.metrics_address)
    election = None
    try:
        async with Store(config) as store:
            work: list[asyncio.Task] = []
            if args.leader_elect:
                election = LeaseElection(api, args.lease_name, args.lease_namespace,
                                         args.identity, lease_duration=args.lease_duration,
                                         renew_deadline=args.lease_duration * 2 / 3,
                                         retry=max(args.lease_duration / 7, 0.5))
                acquiring = asyncio.create_task(election.acquire())
                stopping = asyncio.create_task(stop.wait())
                await asyncio.wait({acquiring, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if not acquiring.done():
                    acquiring.cancel()
                    return
                work.append(asyncio.create_task(election.hold()))
            metrics.LEADER.set(1)
            work.append(asyncio.create_task(Controller(store, api,
                                                       args.gc_grace_period).run()))
            if args.load_balancer_ips != "Disabled":
                work.append(asyncio.create_task(
                    LoadBalancers(store, api, args.load_balancer_ips).run()))
            work.append(asyncio.create_task(stop.wait()))
            done, _ = await asyncio.wait(work, return_when=asyncio.FIRST_COMPLETED)
            for task in work:
                task.cancel()
            await asyncio.gather(*work, return_exceptions=True)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()
            log.info("stopping")
            metrics.LEADER.set(0)
            if election is not None:
                await election.release()
    finally:
        api.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s pipit-controller %(levelname)s %(name)s: "
                               "%(message)s")
    try:
        asyncio.run(run(args))
    except LostLeadership as error:
        log.error("%s Exiting, to start again as a candidate.", error)
        sys.exit(1)
    except PipitError as error:
        log.error("%s", error)
        sys.exit(1)


if __name__ == "__main__":
    main()
