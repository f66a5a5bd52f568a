"""`pipitctl ipam check --kubeconfig`: addresses no pod claims, from the pods and Nodes the
Kubernetes API lists (ipam.gc's rules: the pod is gone, on another node, evicted, or has
another IP; a tunnel address of a Node that is gone)."""

from __future__ import annotations

from bgp_agent.kube_api import KubeAPI
from ipam import gc
from ipam.errors import InvalidResource
from ipam.snapshot import Problem, Snapshot


async def unclaimed_problems(snap: Snapshot, kubeconfig: str) -> tuple[list[Problem], int]:
    api = KubeAPI.connect(kubeconfig)
    if api is None:
        raise InvalidResource("no Kubernetes API to compare with: pass --kubeconfig.")
    try:
        nodes = await api.call(api.core.list_node)
        pods = await api.call(api.core.list_pod_for_all_namespaces)
    finally:
        api.close()
    cluster = gc.cluster_from_json(nodes.get("items") or [], pods.get("items") or [])
    problems = [Problem("address-without-pod", u.allocation.handle_id,
                        f"{u.allocation.address} (node {u.allocation.node}): {u.reason}")
                for u in gc.unclaimed(snap, cluster)]
    return problems, len(cluster.pods)
