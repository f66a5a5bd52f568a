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
addresses only through its IPAM; so are ipv6pools, ipFamilies asking for more than IPv4,
hwAddr and Calico's qos.projectcalico.org/* (refuse_unsupported).

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


CALICO_V6_POOLS = "cni.projectcalico.org/ipv6pools"
# Calico's annotations asking for what Pipit does not do, and why (refused in that sentence;
# qos.projectcalico.org/* too): a pod must not start without what it asked for.
UNSUPPORTED = {
    CALICO_NO_IPAM: f"Pipit hands out addresses only through its IPAM (ask for them with "
                    f"{ADDRESSES})",
    CALICO_V6_POOLS: "Pipit is IPv4 only for now",
    "cni.projectcalico.org/hwAddr": "Pipit does not set a pod's MAC address (the reference "
                                    "plugin makes its interface)",
}
CALICO_FAMILIES = "cni.projectcalico.org/ipFamilies"
QOS_PREFIX = "qos.projectcalico.org/"
NO_QOS = ("Pipit does not shape pods' traffic (Calico's Felix does): chain the bandwidth CNI "
          "plugin and use kubernetes.io/ingress-bandwidth and egress-bandwidth")


def refuse_unsupported(annotations: Mapping[str, str], owner: str) -> None:
    """One sentence for the first of Calico's annotations `owner` carries that asks for what
    Pipit does not do."""
    for name, value in annotations.items():
        reason = UNSUPPORTED.get(name) or (NO_QOS if name.startswith(QOS_PREFIX) else None)
        if name == CALICO_FAMILIES and value.replace(" ", "") not in ('["IPv4"]', ""):
            reason = "Pipit gives pods IPv4 addresses only for now (ask for [\"IPv4\"])"
        if reason and value:
            raise InvalidResource(f"annotation {name} of {owner} is not supported: {reason}.")


def pod_request(namespace: str, pod: str, namespace_annotations: Mapping[str, str],
                pod_annotations: Mapping[str, str]) -> PodRequest:
    owner = f"pod {namespace}/{pod}"
    refuse_unsupported(pod_annotations, owner)
    refuse_unsupported({k: v for k, v in namespace_annotations.items() if k == CALICO_V6_POOLS},
                       f"namespace {namespace}")  # the one Calico reads on namespaces too
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
