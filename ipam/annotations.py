"""Pool and address selection per pod, from Kubernetes annotations (pure: the agent looks the
pod and its namespace up, see bgp_agent.kube_pods):

    pipit.dev/ipv4pools: '["blue", "10.250.0.0/16"]'   on the Namespace or the Pod (the Pod's
                                                        wins): pools by name or CIDR
    pipit.dev/ip-addrs:  '["10.250.3.7"]'              on the Pod: exactly these addresses
    pipit.dev/floating-ips: '["10.250.9.9"]'           on the Pod: more addresses that reach
                                                        it (DNAT on its node), held in IPAM

Calico's names for the same, cni.projectcalico.org/ipv4pools, cni.projectcalico.org/ipAddrs
and cni.projectcalico.org/floatingIPs, are read too (a cluster moving from Calico keeps its
annotations); both names on one object with different values are refused. Calico's
cni.projectcalico.org/ipAddrsNoIpam (an address outside IPAM) is refused: Pipit hands out
addresses only through its IPAM.

Without them the CNI configuration's `pools` (or every pool selecting the node) apply. A pool
named here serves the pod whatever its nodeSelector says (a `nodeSelector: "!all()"` pool is
for such pods only). Anything wrong is an error naming the annotation, before anything is
allocated."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from ipam.errors import InvalidResource, NotFound
from ipam.pool import IPPool

POOLS = "pipit.dev/ipv4pools"
ADDRESSES = "pipit.dev/ip-addrs"
# Calico's names for the same, read too
CALICO_POOLS = "cni.projectcalico.org/ipv4pools"
CALICO_ADDRESSES = "cni.projectcalico.org/ipAddrs"
CALICO_NO_IPAM = "cni.projectcalico.org/ipAddrsNoIpam"
FLOATING = "pipit.dev/floating-ips"
CALICO_FLOATING = "cni.projectcalico.org/floatingIPs"
POOL_NAMES, ADDRESS_NAMES = (POOLS, CALICO_POOLS), (ADDRESSES, CALICO_ADDRESSES)  # by rank
FLOATING_NAMES = (FLOATING, CALICO_FLOATING)


@dataclass(frozen=True)
class PodRequest:
    pools: tuple[str, ...] = ()  # as written: names or CIDRs
    addresses: tuple[IPv4Address, ...] = ()
    pools_from: str = ""  # e.g. "annotation pipit.dev/ipv4pools of pod ns/web"
    addresses_from: str = ""
    floating: tuple[IPv4Address, ...] = ()  # Calico's floating IPs: DNAT to the pod's address
    floating_from: str = ""
    # the namespace's labels (for pools' namespaceSelector); None: not known (no Kubernetes)
    namespace_labels: Mapping[str, str] | None = field(default=None, hash=False)


def string_list(text: str, where: str) -> list[str]:
    try:
        value = json.loads(text)
    except ValueError:
        raise InvalidResource(f"{where} is not JSON: write a list such as "
                              '["name"].') from None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v
                                                            for v in value):
        raise InvalidResource(f"{where} must be a JSON list of strings, not {text!r}.")
    return value


def annotation(annotations: Mapping[str, str], names: Sequence[str],
               owner: str) -> tuple[str, str] | None:
    """(name, value) of the first of `names` (Pipit's, then Calico's) `owner` carries, None if
    it carries none; two of them with different values are refused."""
    given = [(name, annotations[name]) for name in names if annotations.get(name)]
    if len({value for _, value in given}) > 1:
        raise InvalidResource(f"{owner} has both annotations {given[0][0]} and {given[1][0]}, "
                              "with different values: keep one.")
    return given[0] if given else None


def pod_request(namespace: str, pod: str, namespace_annotations: Mapping[str, str],
                pod_annotations: Mapping[str, str]) -> PodRequest:
    owner = f"pod {namespace}/{pod}"
    if pod_annotations.get(CALICO_NO_IPAM):
        raise InvalidResource(f"annotation {CALICO_NO_IPAM} of {owner} is not supported: Pipit "
                              f"hands out addresses only through its IPAM (ask for them with "
                              f"{ADDRESSES}).")
    pools, pools_from = (), ""
    for on, carried in ((owner, pod_annotations),
                        (f"namespace {namespace}", namespace_annotations)):
        chosen = annotation(carried, POOL_NAMES, on)
        if chosen:  # the pod's wins
            pools_from = f"annotation {chosen[0]} of {on}"
            pools = tuple(string_list(chosen[1], pools_from))
            break
    addresses, addresses_from = address_list(pod_annotations, ADDRESS_NAMES, owner)
    floating, floating_from = address_list(pod_annotations, FLOATING_NAMES, owner)
    both = sorted(set(floating) & set(addresses))
    if both:
        raise InvalidResource(f"{floating_from}: {both[0]} is also the pod's own address "
                              f"({addresses_from}): a floating IP must be another address.")
    return PodRequest(pools, addresses, pools_from, addresses_from, floating, floating_from)


def address_list(annotations: Mapping[str, str], names: Sequence[str],
                 owner: str) -> tuple[tuple[IPv4Address, ...], str]:
    """The IPv4 addresses of the first of `names` that `owner` carries, and where they came
    from ("annotation NAME of OWNER"); none and "" if it carries none."""
    chosen = annotation(annotations, names, owner)
    if not chosen:
        return (), ""
    where = f"annotation {chosen[0]} of {owner}"
    parsed = []
    for text in string_list(chosen[1], where):
        try:
            parsed.append(IPv4Address(text))
        except ValueError:
            raise InvalidResource(f"{where}: {text!r} is not an IPv4 address.") from None
    return tuple(parsed), where


def pool_names(request: PodRequest, pools: Sequence[IPPool]) -> tuple[str, ...]:
    """The pools a request names, CIDRs turned into the names of the pools with that CIDR."""
    names = []
    by_name = {p.name: p for p in pools}
    for item in request.pools:
        if item in by_name:
            names.append(item)
            continue
        try:
            cidr = IPv4Network(item)
        except ValueError:
            raise NotFound(f"{request.pools_from}: IP pool {item!r} does not exist.") from None
        match = next((p.name for p in pools if p.cidr == cidr), None)
        if match is None:
            raise NotFound(f"{request.pools_from}: no IP pool has the CIDR {cidr}.")
        names.append(match)
    return tuple(dict.fromkeys(names))
