"""Which service addresses a node announces as /32s (bgp_agent.service_addresses, pure):
Calico's rules for services with externalTrafficPolicy Local, single addresses given as
ranges, and serviceLoadBalancerAggregation. The agents against the API and a real BIRD are in
test_lab_kube.py."""

from __future__ import annotations

from ipaddress import IPv4Network

import pytest

from bgp_agent.service_addresses import (excluded, node_service_prefixes,
                                         service_addresses)

N = IPv4Network
RANGES = ((N("10.96.0.0/12"),), (N("198.51.100.0/24"),), (N("203.0.113.0/24"),))


def service(name: str, policy: str = "Local", cluster: str = "10.96.0.10",
            external: tuple[str, ...] = (), balancer: tuple[str, ...] = (),
            namespace: str = "web", kind: str = "LoadBalancer", **spec_fields) -> dict:
    spec = {"type": kind, "clusterIP": cluster, "clusterIPs": [cluster],
            "externalTrafficPolicy": policy, "externalIPs": list(external), **spec_fields}
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec,
            "status": {"loadBalancer": {"ingress": [{"ip": ip} for ip in balancer]}}}


def endpoint_slice(service_name: str, *endpoints: tuple[str, bool | None],
                   namespace: str = "web") -> dict:
    return {"metadata": {"name": f"{service_name}-abc", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.0.5"], "nodeName": node,
                           **({} if ready is None else {"conditions": {"ready": ready}})}
                          for node, ready in endpoints]}


def test_a_service_s_addresses_are_those_inside_the_range_of_their_kind():
    svc = service("shop", external=("198.51.100.7", "192.0.2.1"),
                  balancer=("203.0.113.9", "198.51.100.8"))
    assert service_addresses(svc, RANGES) == {N("10.96.0.10/32").network_address,
                                              N("198.51.100.7/32").network_address,
                                              N("203.0.113.9/32").network_address}
    headless = service("db", cluster="None")
    assert service_addresses(headless, RANGES) == set()
    assert service_addresses(svc, ((), (), ())) == set()


@pytest.mark.parametrize("services, slices, expected", [
    # a Local service with a ready endpoint here: its cluster and load-balancer IPs
    ([service("shop", balancer=("203.0.113.9",))], [endpoint_slice("shop", ("n1", True))],
     {"10.96.0.10/32", "203.0.113.9/32"}),
    # ready absent counts as ready
    ([service("shop")], [endpoint_slice("shop", ("n1", None))], {"10.96.0.10/32"}),
    # not ready, or on another node: nothing
    ([service("shop")], [endpoint_slice("shop", ("n1", False), ("n2", True))], set()),
    # Cluster policy: every node answers it, the ranges cover it
    ([service("shop", policy="Cluster")], [endpoint_slice("shop", ("n1", True))], set()),
    # a slice of a same-named service in another namespace does not count
    ([service("shop")], [endpoint_slice("shop", ("n1", True), namespace="other")], set()),
    # no slice at all
    ([service("shop")], [], set()),
    # two services, one of them here
    ([service("a", cluster="10.96.0.1"), service("b", cluster="10.96.0.2")],
     [endpoint_slice("a", ("n2", True)), endpoint_slice("b", ("n1", True))],
     {"10.96.0.2/32"}),
])
def test_local_services_are_announced_by_the_nodes_holding_their_endpoints(services, slices,
                                                                          expected):
    assert node_service_prefixes(services, slices, "n1", RANGES) == {N(p) for p in expected}
    assert node_service_prefixes(services, slices, "n1", ((), (), ())) == frozenset()


# the ranges with single addresses among them: 203.0.113.9 a load-balancer IP, 198.51.100.7
# an external IP
SINGLES = ((N("10.96.0.0/12"),), (N("198.51.100.0/24"), N("198.51.100.7/32")),
           (N("203.0.113.0/24"), N("203.0.113.9/32")))


@pytest.mark.parametrize("svc, slices, aggregate, expected", [
    # Cluster, a load-balancer IP given as a single address: every node, endpoints or not
    (service("shop", "Cluster", balancer=("203.0.113.9",)), [], True,
     {"10.96.0.10/32", "203.0.113.9/32"}),
    # ... also when only spec.loadBalancerIP names it (Calico reads both)
    (service("shop", "Cluster", balancer=("203.0.113.10",), loadBalancerIP="203.0.113.9"),
     [], True, {"10.96.0.10/32", "203.0.113.10/32"}),
    # ... not when the service is no load balancer
    (service("shop", "Cluster", kind="NodePort", balancer=("203.0.113.9",)), [], True, set()),
    # an external IP given as a single address
    (service("shop", "Cluster", kind="ClusterIP", external=("198.51.100.7",)), [], True,
     {"10.96.0.10/32", "198.51.100.7/32"}),
    # inside a range only: the range covers it
    (service("shop", "Cluster", balancer=("203.0.113.10",)),
     [endpoint_slice("shop", ("n2", True))], True, set()),
    # Local with a single address: still only where its endpoints are
    (service("shop", "Local", balancer=("203.0.113.9",)), [endpoint_slice("shop", ("n2", True))],
     True, set()),
    (service("shop", "Local", balancer=("203.0.113.9",)), [endpoint_slice("shop", ("n1", True))],
     True, {"10.96.0.10/32", "203.0.113.9/32"}),
    # aggregation Disabled: a Cluster service with a ready endpoint anywhere, from every node
    (service("shop", "Cluster", balancer=("203.0.113.10",)),
     [endpoint_slice("shop", ("n2", True))], False, {"10.96.0.10/32", "203.0.113.10/32"}),
    (service("shop", "Cluster", balancer=("203.0.113.10",)),
     [endpoint_slice("shop", (None, True))], False, {"10.96.0.10/32", "203.0.113.10/32"}),
    # ... and none ready: nothing
    (service("shop", "Cluster", balancer=("203.0.113.10",)),
     [endpoint_slice("shop", ("n2", False))], False, set()),
    # headless and ExternalName services have no address to announce
    (service("shop", "Cluster", cluster="None", balancer=("203.0.113.9",)), [], True, set()),
    (service("shop", "Cluster", kind="ExternalName", balancer=("203.0.113.9",)), [], True,
     set()),
])
def test_single_addresses_and_disaggregated_balancers_follow_calico(svc, slices, aggregate,
                                                                   expected):
    assert node_service_prefixes([svc], slices, "n1", SINGLES, aggregate) == {
        N(p) for p in expected}


def test_only_the_label_set_to_true_excludes_a_node():
    label = "node.kubernetes.io/exclude-from-external-load-balancers"
    assert excluded({label: "true"})
    assert not excluded({label: "false"}) and not excluded({})
