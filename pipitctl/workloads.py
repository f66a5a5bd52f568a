"""`pipitctl get workloadendpoints` (calicoctl's `get wep`): every pod attachment IPAM holds
addresses for, with its node, addresses and floating IPs. Pure: worked out from an IPAM
snapshot. Read-only: an endpoint is what a CNI ADD made, not a resource to apply.

Calico's WorkloadEndpoint names (`<node>-k8s-<pod>-<interface>`, each '-' of the parts
doubled) and fields (node, orchestrator, pod, containerID, endpoint, ipNetworks, ipNATs) are
kept, so scripts reading calicoctl's output read this one. INTERFACE is the pod's side
(`eth0`): the host side is the reference plugin's (ptp's veth), which IPAM does not record.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from ipaddress import IPv4Address

from ipam import block as blocks
from ipam.resource import API_VERSION
from ipam.snapshot import Snapshot

WORDS = ("workloadendpoints", "workloadendpoint", "wep", "weps")
COLUMNS = ("NAMESPACE", "WORKLOAD", "NODE", "NETWORKS", "INTERFACE")
WIDE_COLUMNS = ("NAMESPACE", "NAME", "WORKLOAD", "NODE", "NETWORKS", "INTERFACE", "CONTAINER",
                "NATS")


@dataclass(frozen=True)
class Endpoint:
    namespace: str
    pod: str
    node: str
    interface: str
    container: str
    addresses: tuple[IPv4Address, ...]
    floating: tuple[IPv4Address, ...] = ()  # Calico's ipNATs: external -> the first address

    @property
    def name(self) -> str:
        parts = (self.node, "k8s", self.pod, self.interface)
        return "-".join(p.replace("-", "--") for p in parts)

    def row(self, wide: bool = False) -> tuple:
        networks = ",".join(f"{a}/32" for a in self.addresses)
        if not wide:
            return self.namespace, self.pod, self.node, networks, self.interface
        nats = ",".join(f"{f}:{self.addresses[0]}" for f in self.floating) or "-"
        return (self.namespace, self.name, self.pod, self.node, networks, self.interface,
                self.container or "-", nats)

    def document(self) -> dict:
        spec: dict = {"orchestrator": "k8s", "node": self.node, "pod": self.pod,
                      "containerID": self.container, "endpoint": self.interface,
                      "ipNetworks": [f"{a}/32" for a in self.addresses]}
        if self.floating:
            spec["ipNATs"] = [{"internalIP": str(self.addresses[0]), "externalIP": str(f)}
                              for f in self.floating]
        return {"apiVersion": API_VERSION, "kind": "WorkloadEndpoint",
                "metadata": {"name": self.name, "namespace": self.namespace}, "spec": spec}


def endpoints(snap: Snapshot) -> list[Endpoint]:
    """The pod attachments of the snapshot (allocations naming a namespace and a pod), by
    namespace, pod and interface; a pod's floating IPs with the attachment they belong to."""
    held: dict[str, list[IPv4Address]] = defaultdict(list)
    attributes: dict[str, dict[str, str]] = {}
    for block in snap.blocks.values():
        for ordinal, index in enumerate(block.allocations):
            if index is None:
                continue
            attribute = block.attributes[index]
            held[attribute.handle_id].append(block.address(ordinal))
            attributes[attribute.handle_id] = dict(attribute.secondary)
    floating: dict[str, list[IPv4Address]] = defaultdict(list)
    for handle, secondary in attributes.items():
        if secondary.get(blocks.ATTACHMENT):
            floating[secondary[blocks.ATTACHMENT]] += held[handle]
    found = []
    for handle, secondary in attributes.items():
        if secondary.get(blocks.ATTACHMENT) or not (secondary.get("namespace")
                                                    and secondary.get("pod")):
            continue
        found.append(Endpoint(secondary["namespace"], secondary["pod"],
                              secondary.get("node", ""), secondary.get("ifname", ""),
                              secondary.get("containerID", ""), tuple(sorted(held[handle])),
                              tuple(sorted(floating.get(handle, ())))))
    return sorted(found, key=lambda e: (e.namespace, e.pod, e.interface, e.container))
