"""Load-balancer addresses for Kubernetes services (ipam.load_balancer, pure): which services
Pipit serves, what each asks for, and the status it is given. The controller against the API
and etcd, with the nodes announcing the address to a real router, is in test_lab_kube.py."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from ipam import load_balancer as lb
from ipam.errors import InvalidResource, NotFound
from ipam.pool import pool_from_spec

A = IPv4Address
POOLS = [pool_from_spec("public", {"cidr": "203.0.113.0/24", "allowedUses": ["LoadBalancer"]}),
         pool_from_spec("vip", {"cidr": "198.51.100.0/28", "allowedUses": ["LoadBalancer"],
                                "blockSize": 28,
                                "assignmentMode": "Manual"}),
         pool_from_spec("pods", {"cidr": "10.244.0.0/16"})]


def service(kind: str = "LoadBalancer", cls: str | None = None, families=None,
            annotations: dict | None = None, ip: str | None = None,
            ingress: tuple[str, ...] = ()) -> dict:
    spec = {"type": kind, **({"loadBalancerClass": cls} if cls else {}),
            **({"ipFamilies": families} if families else {}),
            **({"loadBalancerIP": ip} if ip else {})}
    return {"metadata": {"name": "shop", "namespace": "web", "annotations": annotations or {}},
            "spec": spec, "status": {"loadBalancer": {"ingress": [{"ip": i} for i in ingress]}}}


@pytest.mark.parametrize("svc, mode, expected", [
    (service(), lb.ALL_SERVICES, True),
    (service(kind="NodePort"), lb.ALL_SERVICES, False),
    (service(cls="example.com/other"), lb.ALL_SERVICES, False),  # someone else's
    (service(cls=lb.CLASS), lb.ALL_SERVICES, True),
    (service(families=["IPv6"]), lb.ALL_SERVICES, False),  # Pipit assigns IPv4 only
    (service(families=["IPv6", "IPv4"]), lb.ALL_SERVICES, True),
    (service(), lb.REQUESTED_ONLY, False),
    (service(cls=lb.CLASS), lb.REQUESTED_ONLY, True),
    (service(cls="calico"), lb.REQUESTED_ONLY, True),  # made for Calico's; class is immutable
    (service(annotations={"pipit.dev/ipv4pools": '["public"]'}), lb.REQUESTED_ONLY, True),
    (service(annotations={lb.ADDRESSES: '["203.0.113.7"]'}), lb.REQUESTED_ONLY, True),
    (service(annotations={lb.CALICO_ADDRESSES: '["203.0.113.7"]'}), lb.REQUESTED_ONLY, True),
    (service(annotations={lb.CALICO_POOLS: '["public"]'}), lb.REQUESTED_ONLY, True),
    (service(ip="203.0.113.7"), lb.REQUESTED_ONLY, True),
    (service(cls="example.com/other", ip="203.0.113.7"), lb.REQUESTED_ONLY, False),
])
def test_which_services_pipit_serves(svc, mode, expected):
    assert lb.managed(svc, mode) is expected


def test_what_a_service_asks_for_and_what_still_satisfies_it():
    anything = lb.wanted(service(), POOLS)
    assert anything == lb.Wanted()
    assert anything.satisfied_by(A("203.0.113.9"), POOLS)
    assert not anything.satisfied_by(A("198.51.100.3"), POOLS)  # Manual: only if named
    assert not anything.satisfied_by(A("192.0.2.1"), POOLS)  # in no pool (any more)
    named = lb.wanted(service(annotations={"pipit.dev/ipv4pools": '["198.51.100.0/28"]'}),
                      POOLS)
    assert named == lb.Wanted(pools=("vip",))
    assert named.satisfied_by(A("198.51.100.3"), POOLS)
    assert not named.satisfied_by(A("203.0.113.9"), POOLS)
    exact = lb.wanted(service(annotations={lb.ADDRESSES: '["203.0.113.7", "2001:db8::7"]'}),
                      POOLS)
    assert exact == lb.Wanted(address=A("203.0.113.7"))  # the IPv6 one is not Pipit's
    assert exact.satisfied_by(A("203.0.113.7"), POOLS)
    assert not exact.satisfied_by(A("203.0.113.9"), POOLS)
    assert lb.wanted(service(ip="203.0.113.8"), POOLS) == lb.Wanted(address=A("203.0.113.8"))
    # the annotation wins over the deprecated field
    assert lb.wanted(service(ip="203.0.113.8", annotations={lb.ADDRESSES: '["203.0.113.7"]'}),
                     POOLS).address == A("203.0.113.7")
    # Calico's names for the annotations (a Service made for Calico keeps its request), and
    # both names with the same value
    assert lb.wanted(service(annotations={lb.CALICO_ADDRESSES: '["203.0.113.7"]'}),
                     POOLS) == exact
    assert lb.wanted(service(annotations={lb.CALICO_POOLS: '["198.51.100.0/28"]'}),
                     POOLS) == named
    assert lb.wanted(service(annotations={lb.ADDRESSES: '["203.0.113.7"]',
                                          lb.CALICO_ADDRESSES: '["203.0.113.7"]'}),
                     POOLS) == exact


@pytest.mark.parametrize("annotations, ip, error, facts", [
    ({lb.ADDRESSES: "203.0.113.7"}, None, InvalidResource,
     ["annotation pipit.dev/loadBalancerIPs of service web/shop is not JSON"]),
    ({lb.ADDRESSES: '["203.0.113.7", "203.0.113.8"]'}, None, InvalidResource,
     ["must name exactly one IPv4 address, not 2"]),
    ({lb.ADDRESSES: '["two"]'}, None, InvalidResource, ["'two' is not an IPv4 address"]),
    ({}, "nowhere", InvalidResource, ["spec.loadBalancerIP of service web/shop", "'nowhere'"]),
    ({"pipit.dev/ipv4pools": '["nope"]'}, None, NotFound, ["IP pool 'nope' does not exist"]),
    ({"pipit.dev/ipv4pools": '["pods"]'}, None, InvalidResource,
     ["IP pool 'pods' gives no load-balancer addresses"]),
    ({lb.ADDRESSES: '["203.0.113.7"]', lb.CALICO_ADDRESSES: '["203.0.113.8"]'}, None,
     InvalidResource, ["service web/shop has both annotations pipit.dev/loadBalancerIPs and "
                       "projectcalico.org/loadBalancerIPs, with different values"]),
    ({lb.CALICO_POOLS: '["nope"]'}, None, NotFound,
     ["annotation projectcalico.org/ipv4pools of service web/shop: IP pool 'nope'"]),
])
def test_a_request_that_cannot_be_met_is_one_sentence(annotations, ip, error, facts):
    with pytest.raises(error) as caught:
        lb.wanted(service(annotations=annotations, ip=ip), POOLS)
    text = str(caught.value)
    assert all(fact in text for fact in facts), text
    assert text.count(". ") == 0 and text.endswith(".")


def test_the_status_gets_our_address_and_loses_the_ones_we_gave_before_only():
    fresh = service()
    assert lb.ingress_with(fresh, A("203.0.113.9"), set()) == [{"ip": "203.0.113.9"}]
    held = service(ingress=("203.0.113.9",))
    assert lb.ingress_with(held, A("203.0.113.9"), {A("203.0.113.9")}) is None  # as it is
    moved = lb.ingress_with(service(ingress=("203.0.113.9", "192.0.2.50")), A("203.0.113.10"),
                            {A("203.0.113.9")})
    assert moved == [{"ip": "192.0.2.50"}, {"ip": "203.0.113.10"}]  # another's entry kept
    assert lb.ingress_with(held, None, {A("203.0.113.9")}) == []
    assert lb.ingress_with(service(ingress=("192.0.2.50",)), None, set()) is None


def test_handles_name_their_service():
    handle = lb.handle_of("web", "shop")
    assert handle == "lb.web.shop" and lb.service_of(handle) == ("web", "shop")
    assert lb.service_of("pipit.abc.eth0") is None and lb.service_of("lb.web") is None
