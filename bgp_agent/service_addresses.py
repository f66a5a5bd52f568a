"""Which Kubernetes service addresses a node announces as /32s, as Calico does: a service with
`externalTrafficPolicy: Local` is answered only by the nodes that hold one of its endpoints
(kube-proxy drops its traffic elsewhere), so those nodes, and only they, announce its cluster
IP, external IPs and load-balancer IPs, each where it lies inside the matching range of the
BGPConfiguration (serviceClusterIPs, serviceExternalIPs, serviceLoadBalancerIPs). The ranges
themselves go from every node (bgp_agent.policy.announcements); the /32s, more specific, win
in the fabric. Pure: Service and EndpointSlice objects (dicts, as the API serves them) in,
prefixes out; bgp_agent.kube_services keeps the objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network

SERVICE_NAME_LABEL = "kubernetes.io/service-name"  # ties an EndpointSlice to its Service


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
    `ready` condition is absent counts as ready, as the API defines it)."""
    found: dict[tuple[str, str], set[str]] = {}
    for endpoint_slice in slices:
        metadata = endpoint_slice.get("metadata") or {}
        service = (metadata.get("labels") or {}).get(SERVICE_NAME_LABEL)
        if not service:
            continue
        nodes = found.setdefault((metadata.get("namespace") or "", service), set())
        for endpoint in endpoint_slice.get("endpoints") or []:
            ready = ((endpoint.get("conditions") or {}).get("ready"))
            if ready is not False and endpoint.get("nodeName"):
                nodes.add(endpoint["nodeName"])
    return found


def local_service_prefixes(services: Iterable[Mapping], slices: Iterable[Mapping], node: str,
                           ranges: tuple[tuple[IPv4Network, ...], ...]
                           ) -> frozenset[IPv4Network]:
    """The /32s `node` announces: the addresses (service_addresses) of every service with
    externalTrafficPolicy Local that has a ready endpoint on it."""
    if not any(ranges):
        return frozenset()
    holders = nodes_with_endpoints(slices)
    prefixes = set()
    for service in services:
        if (service.get("spec") or {}).get("externalTrafficPolicy") != "Local":
            continue
        metadata = service.get("metadata") or {}
        if node in holders.get((metadata.get("namespace") or "", metadata.get("name")), ()):
            prefixes |= {IPv4Network(a) for a in service_addresses(service, ranges)}
    return frozenset(prefixes)
