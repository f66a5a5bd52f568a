"""Load-balancer addresses for Kubernetes services, as Calico's kube-controllers assigns them
(pure: controller.load_balancer does the I/O). A service of type LoadBalancer gets one IPv4
address from the IP pools whose allowedUses is LoadBalancer, held in IPAM under the handle
`lb.<namespace>.<name>` on the virtual node `load-balancer` (no node's: no node announces the
pool's blocks), and reported in its `status.loadBalancer.ingress`:

    pipit.dev/ipv4pools:       '["public"]'        on the Service: pools by name or CIDR
    pipit.dev/loadBalancerIPs: '["203.0.113.7"]'   on the Service: exactly this address
    spec.loadBalancerIP: 203.0.113.7               (deprecated by Kubernetes) the same

Calico's names for the annotations, projectcalico.org/ipv4pools and
projectcalico.org/loadBalancerIPs, are read too (both names with different values: refused).

Which services: with `AllServices` (the default) every LoadBalancer service whose
spec.loadBalancerClass is unset or Pipit's (`pipit.dev/load-balancer`, or Calico's `calico`:
the class of a Service cannot change); with
`RequestedServicesOnly` those of Pipit's class, or unset and asking by annotation or
loadBalancerIP. Another class is someone else's. Either way only once an enabled
LoadBalancer pool exists, so a cluster with another load-balancer implementation and no such
pool is left alone. The nodes announce the addresses as Calico's do: a serviceLoadBalancerIPs
range of the BGPConfiguration must cover the pool (bgp_agent.service_addresses).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address

from ipam.annotations import POOLS, PodRequest, annotation, pool_names, string_list
from ipam.errors import InvalidResource
from ipam.pool import LOAD_BALANCER, IPPool, pool_of

ADDRESSES = "pipit.dev/loadBalancerIPs"
# Calico's names for the annotations, read too
CALICO_POOLS, CALICO_ADDRESSES = "projectcalico.org/ipv4pools", "projectcalico.org/loadBalancerIPs"
POOL_NAMES, ADDRESS_NAMES = (POOLS, CALICO_POOLS), (ADDRESSES, CALICO_ADDRESSES)  # by rank
CLASS = "pipit.dev/load-balancer"
# Calico's class, Pipit's too: a Service's loadBalancerClass cannot change, so one made for
# Calico's load-balancer IPAM is served as it was
CLASSES = (CLASS, "calico")
HANDLE_PREFIX = "lb."
ALL_SERVICES, REQUESTED_ONLY = "AllServices", "RequestedServicesOnly"
ASSIGN_MODES = (ALL_SERVICES, REQUESTED_ONLY)


def handle_of(namespace: str, name: str) -> str:
    """The IPAM handle of a service's address (namespaces and service names hold no dot)."""
    return f"{HANDLE_PREFIX}{namespace}.{name}"


def service_of(handle_id: str) -> tuple[str, str] | None:
    """(namespace, name) of a load-balancer handle; None for any other handle."""
    if not handle_id.startswith(HANDLE_PREFIX):
        return None
    namespace, dot, name = handle_id.removeprefix(HANDLE_PREFIX).partition(".")
    return (namespace, name) if dot and namespace and name else None


def _annotations(service: Mapping) -> Mapping[str, str]:
    return (service.get("metadata") or {}).get("annotations") or {}


def managed(service: Mapping, mode: str = ALL_SERVICES) -> bool:
    """Whether Pipit assigns this service's load-balancer address (an IPv4 one: a service
    without IPv4 in its ipFamilies gets none)."""
    spec = service.get("spec") or {}
    if spec.get("type") != "LoadBalancer" or "IPv4" not in (spec.get("ipFamilies") or ["IPv4"]):
        return False
    cls = spec.get("loadBalancerClass")
    if cls is not None and cls not in CLASSES:
        return False
    if mode == ALL_SERVICES or cls in CLASSES:
        return True
    annotations = _annotations(service)
    return (any(annotations.get(name) for name in (*POOL_NAMES, *ADDRESS_NAMES))
            or bool(spec.get("loadBalancerIP")))


@dataclass(frozen=True)
class Wanted:
    """What a service asks for: pools by name (empty: every Automatic LoadBalancer pool) or
    one exact address."""
    pools: tuple[str, ...] = ()
    address: IPv4Address | None = None

    def satisfied_by(self, address: IPv4Address, pools: Sequence[IPPool]) -> bool:
        """Whether an address the service holds is still what it asks for (an address from
        a Manual pool it no longer names is not)."""
        if self.address is not None:
            return address == self.address
        pool = pool_of(pools, address)
        if pool is None:
            return False
        if self.pools:
            return pool.name in self.pools
        return pool.assignment_mode == "Automatic"


def wanted(service: Mapping, pools: Sequence[IPPool]) -> Wanted:
    """The service's request, from its annotations and spec.loadBalancerIP; anything wrong is
    one InvalidResource sentence naming what."""
    metadata = service.get("metadata") or {}
    where = f"service {metadata.get('namespace')}/{metadata.get('name')}"
    annotations = _annotations(service)
    asked = annotation(annotations, ADDRESS_NAMES, where)
    if asked:
        source = f"annotation {asked[0]} of {where}"
        texts = string_list(asked[1], source)
    elif (service.get("spec") or {}).get("loadBalancerIP"):
        source = f"spec.loadBalancerIP of {where}"
        texts = [service["spec"]["loadBalancerIP"]]
    else:
        texts = []
    if texts:
        parsed = []
        for text in texts:
            try:
                parsed.append(IPv4Address(text))
            except ValueError:
                if ":" not in str(text):
                    raise InvalidResource(f"{source}: {text!r} is not an IPv4 "
                                          "address.") from None
        if len(parsed) != 1:
            raise InvalidResource(f"{source} must name exactly one IPv4 address, not "
                                  f"{len(parsed)}.")
        return Wanted(address=parsed[0])
    named = annotation(annotations, POOL_NAMES, where)
    if named:
        source = f"annotation {named[0]} of {where}"
        request = PodRequest(tuple(string_list(named[1], source)), pools_from=source)
        names = pool_names(request, pools)
        for name in names:
            pool = next(p for p in pools if p.name == name)
            if LOAD_BALANCER not in pool.allowed_uses:
                raise InvalidResource(f"{source}: IP pool {name!r} gives no load-balancer "
                                      "addresses (its allowedUses has no LoadBalancer).")
        return Wanted(pools=names)
    return Wanted()


def ingress_with(service: Mapping, ours: IPv4Address | None,
                 previous: set[IPv4Address]) -> list[dict] | None:
    """The service's status.loadBalancer.ingress with `ours` in it (None: none) and no
    address Pipit gave it before (`previous`), others' entries kept; None if that is what it
    has already."""
    have = list(((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or [])
    drop = {str(a) for a in previous if a != ours}
    kept = [entry for entry in have if entry.get("ip") not in drop]
    if ours is not None and not any(entry.get("ip") == str(ours) for entry in kept):
        kept.append({"ip": str(ours)})
    return None if kept == have else kept
