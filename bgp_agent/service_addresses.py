"""Which Kubernetes service addresses a node announces as /32s, as Calico does: a service with
`externalTrafficPolicy: Local` is answered only by the nodes that hold one of its endpoints
(kube-proxy drops its traffic elsewhere), so those nodes, and only they, announce its cluster
IP, external IPs and load-balancer IPs, each where it lies inside the matching range of the
BGPConfiguration (serviceClusterIPs, serviceExternalIPs, serviceLoadBalancerIPs). The ranges
themselves go from every node (BGPConfig.announced_service_ranges); the /32s, more specific,
win in the fabric. A single address given as a range (a /32 entry of serviceExternalIPs or
serviceLoadBalancerIPs) is not announced whole: a service with externalTrafficPolicy Cluster
holding it is announced by every node, a Local one as above. With
serviceLoadBalancerAggregation Disabled, the load-balancer ranges are not announced whole
either, and every node announces each Cluster service's /32s while it has a ready endpoint.
A node labelled node.kubernetes.io/exclude-from-external-load-balancers=true announces no
service address at all (EXCLUDED_LABEL). Pure: Service and EndpointSlice objects (dicts, as
the API serves them) in, prefixes out; bgp_agent.kube_services keeps the objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network

SERVICE_NAME_LABEL = "kubernetes.io/service-name"  # ties an EndpointSlice to its Service
# Kubernetes' well-known label, as Calico reads it: "true", and the node announces no service
EXCLUDED_LABEL = "node.kubernetes.io/exclude-from-external-load-balancers"


def excluded(labels: Mapping[str, str]) -> bool:
    return labels.get(EXCLUDED_LABEL) == "true"


def _ipv4(text: object) -> IPv4Address | None:
    try:
        return IPv4Address(text) if isinstance(text, str) else None
    except ValueError:
        return None  # "None" (headless), IPv6, anything else


def _inside(address: IPv4Address | None, ranges: Iterable[IPv4Network]) -> bool:
    return address is not None and any(address in r for r in ranges)


def service_addresses(service: Mapping, ranges: tuple[tuple[IPv4Network, ...], ...]
                      ) -> set[IPv4Address]:
    """The service's addresses that lie inside the ranges announced for their kind: cluster
    IPs, external IPs, load-balancer ingress IPs (`ranges`: BGPConfig.service_ranges)."""
    cluster_ranges, external_ranges, balancer_ranges = ranges
    spec = service.get("spec") or {}
    status = service.get("status") or {}
    cluster = [spec.get("clusterIP"), *(spec.get("clusterIPs") or [])]
    external = spec.get("externalIPs") or []
    balancer = [i.get("ip") for i in (status.get("loadBalancer") or {}).get("ingress") or []
                if isinstance(i, Mapping)]
    found = set()
    for texts, kind_ranges in ((cluster, cluster_ranges), (external, external_ranges),
                               (balancer, balancer_ranges)):
        for text in texts:
            address = _ipv4(text)
            if _inside(address, kind_ranges):
                found.add(address)
    return found


def nodes_with_endpoints(slices: Iterable[Mapping]) -> dict[tuple[str, str], set[str]]:
    """(namespace, service) -> the nodes holding a ready endpoint of it (an endpoint whose
    `ready` condition is absent counts as ready, as the API defines it; one that names no
    node counts as "")."""
    found: dict[tuple[str, str], set[str]] = {}
    for endpoint_slice in slices:
        metadata = endpoint_slice.get("metadata") or {}
        service = (metadata.get("labels") or {}).get(SERVICE_NAME_LABEL)
        if not service:
            continue
        nodes = found.setdefault((metadata.get("namespace") or "", service), set())
        for endpoint in endpoint_slice.get("endpoints") or []:
            ready = ((endpoint.get("conditions") or {}).get("ready"))
            if ready is not False:
                nodes.add(endpoint.get("nodeName") or "")
    return found


def _single(address: IPv4Address | None, ranges: Iterable[IPv4Network]) -> bool:
    """A single address entry (a /32) of the ranges is the address."""
    return address is not None and IPv4Network(address) in ranges


def announced_by_every_node(service: Mapping, ranges: tuple[tuple[IPv4Network, ...], ...]
                            ) -> bool:
    """Calico's rule for a service whose traffic any node answers (externalTrafficPolicy
    Cluster): every node announces its addresses when one of them is a single address entry
    of the load-balancer or external IP ranges, which no node announces whole."""
    _, external_ranges, balancer_ranges = ranges
    spec = service.get("spec") or {}
    balancers = [spec.get("loadBalancerIP"),
                 *(i.get("ip") for i in ((service.get("status") or {}).get("loadBalancer")
                                         or {}).get("ingress") or [] if isinstance(i, Mapping))]
    return ((spec.get("type") == "LoadBalancer"
             and any(_single(_ipv4(b), balancer_ranges) for b in balancers))
            or any(_single(_ipv4(e), external_ranges) for e in spec.get("externalIPs") or []))


def node_service_prefixes(services: Iterable[Mapping], slices: Iterable[Mapping], node: str,
                          ranges: tuple[tuple[IPv4Network, ...], ...],
                          aggregate_balancers: bool = True) -> frozenset[IPv4Network]:
    """The /32s `node` announces for services (their service_addresses), as Calico does:
    a service with externalTrafficPolicy Local, where it holds a ready endpoint of it; one
    with Cluster, from every node, when announced_by_every_node or, with
    serviceLoadBalancerAggregation Disabled (not `aggregate_balancers`), when it has a ready
    endpoint anywhere. ExternalName and headless services have none."""
    if not any(ranges):
        return frozenset()
    holders = nodes_with_endpoints(slices)
    prefixes = set()
    for service in services:
        spec = service.get("spec") or {}
        if (spec.get("type") or "ClusterIP") not in ("ClusterIP", "NodePort", "LoadBalancer") \
                or spec.get("clusterIP") in (None, "", "None"):
            continue
        metadata = service.get("metadata") or {}
        nodes = holders.get((metadata.get("namespace") or "", metadata.get("name")), set())
        if spec.get("externalTrafficPolicy") == "Local":
            announced = node in nodes
        else:
            announced = (announced_by_every_node(service, ranges)
                         or (not aggregate_balancers and bool(nodes)))
        if announced:
            prefixes |= {IPv4Network(a) for a in service_addresses(service, ranges)}
    return frozenset(prefixes)
