"""What the agent learns from its Kubernetes Node, when it has the API (--kubeconfig, or it
runs in a pod): the record's Kubernetes node (spec.orchRefs), its labels, the annotations
that override its defaults, the `kubernetes-internal-ip` address autodetection, and the
`NetworkUnavailable` condition, set to False once the node's routes are programmed.

    pipit.dev/ipv4-address                 10.0.0.11/24   the BGP address (as --ip)
    pipit.dev/as-number                    65001          the node's AS (as --as; asdot too)
    pipit.dev/route-reflector-cluster-id   244.0.0.1      (as --route-reflector-cluster-id)

An explicit flag wins over an annotation, an annotation over autodetection and the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from ipaddress import IPv4Address, IPv4Interface

from bgp_agent.bgp_config import parse_as_number
from bgp_agent.kube_api import KubeAPI, KubernetesUnavailable
from bgp_agent.node import (NodeRecord, choose_address, detect_address, local_addresses,
                            parse_cluster_id)
from bgp_agent.reachable import when_reachable
from ipam.errors import InvalidResource

log = logging.getLogger(__name__)

ADDRESS = "pipit.dev/ipv4-address"
AS_NUMBER = "pipit.dev/as-number"
CLUSTER_ID = "pipit.dev/route-reflector-cluster-id"
INTERNAL_IP = "kubernetes-internal-ip"
NETWORK_UNAVAILABLE = "NetworkUnavailable"


def internal_ip(node: dict) -> IPv4Address | None:
    for entry in (node.get("status") or {}).get("addresses") or []:
        if entry.get("type") == "InternalIP":
            try:
                return IPv4Address(entry.get("address", ""))
            except ValueError:
                continue  # an IPv6 InternalIP
    return None


def identity(args: argparse.Namespace, node: dict, labels: dict[str, str]) -> NodeRecord:
    """The node record from flags, the Node's annotations and labels, and autodetection
    (`kubernetes-internal-ip`: the local interface address equal to the Node's InternalIP)."""
    name = node["metadata"]["name"]
    annotations = node["metadata"].get("annotations") or {}
    where = f"Node {name}"
    if args.ip:
        from bgp_agent.node import parse_explicit_address
        address = parse_explicit_address(args.ip)
    elif ADDRESS in annotations:
        try:
            address = IPv4Interface(annotations[ADDRESS])
            if "/" not in annotations[ADDRESS]:
                raise ValueError
        except ValueError:
            raise InvalidResource(f"{where}: annotation {ADDRESS} {annotations[ADDRESS]!r} is "
                                  "not an IPv4 address with its prefix length, such as "
                                  "10.0.0.11/24.") from None
    elif args.ip_autodetection_method == INTERNAL_IP:
        wanted = internal_ip(node)
        if wanted is None:
            raise InvalidResource(f"{where} has no IPv4 InternalIP address for "
                                  f"--ip-autodetection-method {INTERNAL_IP}.")
        address = choose_address(f"cidr={wanted}/32", local_addresses())
    else:
        address = detect_address(args.ip_autodetection_method)
    as_text = args.as_number if args.as_number is not None else annotations.get(AS_NUMBER)
    as_number = None if as_text is None else parse_as_number(
        as_text, "--as" if args.as_number is not None else where, "the AS number")
    cluster_text = args.route_reflector_cluster_id or annotations.get(CLUSTER_ID)
    cluster_id = parse_cluster_id(cluster_text, where) if cluster_text else None
    return NodeRecord(args.node, address, as_number, {**node["metadata"].get("labels", {}),
                                                      **labels},
                      route_reflector_cluster_id=cluster_id, kubernetes_node=name)


async def read_node(api: KubeAPI, name: str) -> dict:
    node = await api.node(name)
    if node is None:
        raise InvalidResource(f"Kubernetes has no Node {name!r}; start the agent with the "
                              "node's name (--node, or NODENAME from spec.nodeName).")
    return node


def network_available_patch(node: dict) -> dict | None:
    """The status patch that sets NetworkUnavailable to False, or None when it already is
    (so a restarted agent changes nothing)."""
    for condition in (node.get("status") or {}).get("conditions") or []:
        if condition.get("type") == NETWORK_UNAVAILABLE and condition.get("status") == "False":
            return None
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"status": {"conditions": [{
        "type": NETWORK_UNAVAILABLE, "status": "False", "reason": "PipitIsUp",
        "message": "Pipit programmed this node's routes", "lastTransitionTime": now,
        "lastHeartbeatTime": now}]}}


async def mark_network_available(api: KubeAPI, name: str, programmed: asyncio.Event) -> None:
    """Once `programmed` is set, set the Node's NetworkUnavailable condition to False
    (retrying while the API is away)."""
    await programmed.wait()
    pause = 1.0
    while True:
        try:
            node = await read_node(api, name)
            patch = network_available_patch(node)
            if patch is not None:
                await api.call(api.core.patch_node_status, name, patch,
                               _content_type="application/strategic-merge-patch+json")
                log.info("routes programmed: Node %s NetworkUnavailable is now False", name)
            return
        except (KubernetesUnavailable, InvalidResource) as error:
            log.warning("cannot set NetworkUnavailable on Node %s yet: %s", name, error)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 30.0)


class AgentKubernetes:
    """The agent's Kubernetes side as agent.py wires it: None from `connect` without the
    API, so that everything else works from etcd alone."""

    def __init__(self, api: KubeAPI, node: dict):
        from bgp_agent.kube_pods import PodAnnotations
        from bgp_agent.kube_services import NodeServices

        self.api, self.node = api, node
        self.name = node["metadata"]["name"]
        self.pods = PodAnnotations(api, self.name)
        self.services = NodeServices(api)  # started by the routing loop when it needs them

    @classmethod
    async def connect(cls, args: argparse.Namespace, stop: asyncio.Event,
                      problem: Callable[[str], None] | None = None
                      ) -> AgentKubernetes | None:
        """The agent's Node read, waiting while the API cannot be reached (or answers 5xx,
        408, 429) as for etcd (bgp_agent.reachable; `problem` is told each failure). None
        without the API, or when `stop` comes while waiting."""
        api = KubeAPI.connect(args.kubeconfig)
        if api is None:
            if args.ip_autodetection_method == INTERNAL_IP and not args.ip:
                raise InvalidResource(f"--ip-autodetection-method {INTERNAL_IP} needs the "
                                      "Kubernetes API: pass --kubeconfig or run in a pod.")
            return None
        try:
            node = await when_reachable(lambda: read_node(api, args.node), stop,
                                        f"Node {args.node} not read yet",
                                        f"Node {args.node} read: the Kubernetes API answered",
                                        problem)
        except BaseException:
            api.close()
            raise
        if node is None:
            api.close()
            return None
        log.info("Kubernetes API at %s: this is Node %s", api.url, args.node)
        kube = cls(api, node)
        kube.pods.start()
        return kube

    def identity(self, args: argparse.Namespace, labels: dict[str, str]) -> NodeRecord:
        return identity(args, self.node, labels)

    async def refresh(self) -> None:
        """Read the Node again (its InternalIP, its address annotation may have changed
        since the agent started); raises InvalidResource if it is gone,
        KubernetesUnavailable while the API cannot answer."""
        self.node = await read_node(self.api, self.name)

    async def network_available(self, programmed: asyncio.Event) -> None:
        await mark_network_available(self.api, self.name, programmed)

    async def close(self) -> None:
        await self.pods.close()
        await self.services.close()
        self.api.close()
