"""A node's identity: its name, BGP address and AS number, how the address is found (Calico's
autodetection methods), and its record in etcd (/pipit/resources/nodes/<node>)."""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_interface

from bgp_agent.bgp_config import parse_as_number
from bgp_agent.version import software_version
from ipam import keys
from ipam.errors import InvalidResource, PipitError
from ipam.pool import check_node_outside_pools, read_pools
from ipam.resource import SpecReader, check_labels, check_name, make_document, read_document
from ipam.store import Store
from ipam.txn import Changes, transact

log = logging.getLogger(__name__)

KIND = "Node"
# Set on its record by the node's agent at registration, for `pipitctl version`.
VERSION_ANNOTATION = "pipit.dev/agent-version"

# Interfaces that never carry the node's address (Calico's list, plus Pipit's own devices).
EXCLUDED_INTERFACES = re.compile(
    r"^(lo|docker.*|cbr.*|dummy.*|virbr.*|lxcbr.*|veth.*|cali.*|tunl.*|flannel.*|kube-ipvs.*|"
    r"cni.*|vxlan.*|wireguard.*|wg-.*|nodelocaldns.*|pipit.*)$")


@dataclass(frozen=True)
class NodeRecord:
    name: str
    address: IPv4Interface | None = None  # BGP address with its subnet, e.g. 10.0.0.11/24
    as_number: int | None = None  # None: the cluster's (BGPConfiguration asNumber)
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    # A route reflector of this cluster id (Calico's routeReflectorClusterID): it joins no
    # mesh and reflects its clients' routes (see policy.select_neighbors)
    route_reflector_cluster_id: IPv4Address | None = None
    # Set by the node's agent when an IPIP / VXLAN pool selects it (Calico's field names):
    ipip_tunnel_address: IPv4Address | None = None  # on tunl0
    vxlan_tunnel_address: IPv4Address | None = None  # on vxlan.pipit (the VTEP)
    vxlan_mac: str | None = None  # vxlan.pipit's MAC, for the other nodes' FDB
    # The Kubernetes Node this record belongs to (Calico's spec.orchRefs, orchestrator k8s);
    # None: a node outside Kubernetes, which pipit-controller never cleans up
    kubernetes_node: str | None = None

    @property
    def tunnel_fields(self) -> tuple:
        return self.ipip_tunnel_address, self.vxlan_tunnel_address, self.vxlan_mac


_MAC = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}")


# What calico-node writes about its own host on a Calico Node, left out of one applied to
# Pipit: its agent finds the node's interfaces itself, and the tunnel addresses were Calico's
# IPAM's, which no Pipit pool holds (its agent allocates its own).
_CALICO_NODE_OWN = ("addresses", "interfaces", "wireguard", "ipv4VXLANTunnelAddr",
                    "ipv6VXLANTunnelAddr", "vxlanTunnelMACAddr", "vxlanTunnelMACAddrV6")
_CALICO_NODE_BGP_OWN = ("ipv4IPIPTunnelAddr", "ipv6Address")


def from_calico_node(spec: Mapping) -> dict:
    """A Calico Node's spec (calicoctl's), less what calico-node wrote about its host."""
    kept = {k: v for k, v in spec.items() if k not in _CALICO_NODE_OWN}
    if isinstance(kept.get("bgp"), dict):
        kept["bgp"] = {k: v for k, v in kept["bgp"].items() if k not in _CALICO_NODE_BGP_OWN}
    return kept


def keep_agent_fields(applied: NodeRecord, stored: NodeRecord) -> NodeRecord:
    """A node record applied over a stored one, with what the node's agent wrote that the
    document leaves out kept: its address, tunnel addresses and VTEP MAC, its Kubernetes Node
    and its version. Without them the other nodes would drop their sessions and tunnels to
    it until its agent wrote them again (a Calico document has none of them)."""
    version = stored.annotations.get(VERSION_ANNOTATION)
    return replace(
        applied, address=applied.address or stored.address,
        ipip_tunnel_address=applied.ipip_tunnel_address or stored.ipip_tunnel_address,
        vxlan_tunnel_address=applied.vxlan_tunnel_address or stored.vxlan_tunnel_address,
        vxlan_mac=applied.vxlan_mac or stored.vxlan_mac,
        kubernetes_node=applied.kubernetes_node or stored.kubernetes_node,
        annotations=({VERSION_ANNOTATION: version, **applied.annotations} if version
                     else applied.annotations))


def node_from_document(doc: Mapping) -> NodeRecord:
    document = read_document(doc)
    read = SpecReader(KIND, document.name, document.spec,
                      {"bgp", "ipv4VXLANTunnelAddr", "vxlanTunnelMACAddr", "orchRefs"})
    bgp = document.spec.get("bgp") or {}
    if not isinstance(bgp, dict):
        raise read.fail("spec.bgp must be a mapping.")
    bgp_read = SpecReader(KIND, document.name, bgp,
                          {"ipv4Address", "asNumber", "ipv4IPIPTunnelAddr",
                           "routeReflectorClusterID"})
    text = bgp_read.string("ipv4Address")
    address = None
    if text:
        try:
            address = ip_interface(text)
        except ValueError:
            raise read.fail(f"ipv4Address {text!r} is not an address with a prefix length, such "
                            "as 10.0.0.11/24.") from None
        if address.version != 4:
            raise read.fail(f"ipv4Address {text} is not IPv4.")
    mac = read.string("vxlanTunnelMACAddr")
    if mac is not None and not _MAC.fullmatch(mac):
        raise read.fail(f"vxlanTunnelMACAddr {mac!r} is not a MAC address like 02:5e:00:11:22:33.")
    as_number = bgp.get("asNumber")
    if as_number is not None:
        as_number = parse_as_number(as_number, read.where, "spec.bgp.asNumber")
    cluster_id = bgp_read.string("routeReflectorClusterID") or None
    return NodeRecord(document.name, address, as_number,
                      dict(document.labels), dict(document.annotations),
                      route_reflector_cluster_id=(parse_cluster_id(cluster_id, read.where)
                                                  if cluster_id else None),
                      ipip_tunnel_address=_optional_address(bgp_read, "ipv4IPIPTunnelAddr"),
                      vxlan_tunnel_address=_optional_address(read, "ipv4VXLANTunnelAddr"),
                      vxlan_mac=mac, kubernetes_node=_kubernetes_node(read, document.spec))


def _kubernetes_node(read: SpecReader, spec: Mapping) -> str | None:
    """The Kubernetes node name of spec.orchRefs ([{orchestrator: k8s, nodeName: NAME}])."""
    refs = spec.get("orchRefs") or []
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise read.fail("orchRefs must be a list of {orchestrator, nodeName} mappings.")
    for ref in refs:
        if ref.get("orchestrator") == "k8s":
            name = ref.get("nodeName")
            if not isinstance(name, str) or not name:
                raise read.fail("orchRefs: the k8s entry has no nodeName.")
            return name
    return None


def parse_cluster_id(text: object, where: str) -> IPv4Address:
    """A route reflector cluster id: an IPv4 address in dotted-quad form (RFC 4456 makes it a
    4-byte number; Calico and BIRD write it like an address, e.g. 244.0.0.1)."""
    try:
        if not isinstance(text, str) or text.count(".") != 3:
            raise ValueError
        return IPv4Address(text.strip())
    except ValueError:
        raise InvalidResource(f"{where}: routeReflectorClusterID {text!r} is not a cluster id: "
                              "write it as an IPv4 address, such as 244.0.0.1.") from None


def _optional_address(read: SpecReader, field_name: str) -> IPv4Address | None:
    text = read.string(field_name)
    if not text:
        return None
    try:
        return IPv4Address(text)
    except ValueError:
        raise read.fail(f"{field_name} {text!r} is not an IPv4 address.") from None


def node_to_document(node: NodeRecord) -> dict:
    bgp: dict = {}
    if node.address is not None:
        bgp["ipv4Address"] = str(node.address)
    if node.as_number is not None:
        bgp["asNumber"] = node.as_number
    if node.ipip_tunnel_address is not None:
        bgp["ipv4IPIPTunnelAddr"] = str(node.ipip_tunnel_address)
    if node.route_reflector_cluster_id is not None:
        bgp["routeReflectorClusterID"] = str(node.route_reflector_cluster_id)
    spec: dict = {"bgp": bgp}
    if node.vxlan_tunnel_address is not None:
        spec["ipv4VXLANTunnelAddr"] = str(node.vxlan_tunnel_address)
    if node.vxlan_mac is not None:
        spec["vxlanTunnelMACAddr"] = node.vxlan_mac
    if node.kubernetes_node is not None:
        spec["orchRefs"] = [{"orchestrator": "k8s", "nodeName": node.kubernetes_node}]
    return make_document(KIND, node.name, spec, node.labels, node.annotations)


# -- address autodetection ------------------------------------------------------------------

@dataclass(frozen=True)
class InterfaceAddress:
    interface: str
    address: IPv4Interface


def choose_address(method: str, candidates: Iterable[InterfaceAddress],
                   route_source: IPv4Address | None = None) -> IPv4Interface:
    """Pick the node's address the way Calico's IP_AUTODETECTION_METHOD does:
    first-found | interface=REGEX | skip-interface=REGEX | cidr=CIDR[,CIDR] | can-reach=IP
    (for can-reach, pass the source address the kernel would use as `route_source`)."""
    candidates = [c for c in candidates if not c.address.ip.is_loopback
                  and not c.address.ip.is_link_local]
    kind, _, argument = method.partition("=")
    if kind == "first-found":
        usable = [c for c in candidates if not EXCLUDED_INTERFACES.match(c.interface)]
    elif kind in ("interface", "skip-interface"):
        try:
            pattern = re.compile(argument)
        except re.error as error:
            raise InvalidResource(f"{method!r}: {argument!r} is not a regular expression "
                                  f"({error}).") from None
        keep = kind == "interface"
        usable = [c for c in candidates if bool(pattern.fullmatch(c.interface)) == keep]
    elif kind == "cidr":
        networks = [_network(text, method) for text in argument.split(",")]
        usable = [c for c in candidates if any(c.address.ip in n for n in networks)]
    elif kind == "can-reach":
        _address(argument, method)
        usable = [c for c in candidates if c.address.ip == route_source]
    else:
        raise InvalidResource(f"unknown address autodetection method {method!r}; use "
                              "first-found, interface=REGEX, skip-interface=REGEX, cidr=CIDR "
                              "or can-reach=IP.")
    if not usable:
        raise InvalidResource(f"no IPv4 address on this node matches {method!r} (have: "
                              f"{', '.join(f'{c.interface} {c.address}' for c in candidates) or 'none'}).")
    return usable[0].address


def _network(text: str, method: str) -> IPv4Network:
    try:
        return IPv4Network(text.strip(), strict=False)
    except ValueError:
        raise InvalidResource(f"{method!r}: {text!r} is not an IPv4 network.") from None


def _address(text: str, method: str) -> IPv4Address:
    try:
        return IPv4Address(text.strip())
    except ValueError:
        raise InvalidResource(f"{method!r}: {text!r} is not an IPv4 address.") from None


def local_addresses() -> list[InterfaceAddress]:
    """Global IPv4 addresses on this network namespace's interfaces, in interface order."""
    from ipip.pyroute2_core import IPRoute  # heavy import, only for the agent
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        found = []
        for addr in ipr.get_addr(family=socket.AF_INET):
            ip = addr.get_attr("IFA_LOCAL") or addr.get_attr("IFA_ADDRESS")
            found.append((addr["index"], InterfaceAddress(
                names.get(addr["index"], "?"), IPv4Interface(f"{ip}/{addr['prefixlen']}"))))
    return [a for _, a in sorted(found, key=lambda pair: pair[0])]


def route_source_for(destination: IPv4Address) -> IPv4Address:
    """The source address the kernel picks to reach `destination` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((str(destination), 9))
        except OSError as error:
            raise InvalidResource(f"this node has no route to {destination} ({error.strerror})."
                                  ) from None
        return IPv4Address(probe.getsockname()[0])


def detect_address(method: str) -> IPv4Interface:
    route_source = None
    if method.startswith("can-reach="):
        route_source = route_source_for(_address(method.partition("=")[2], method))
    return choose_address(method, local_addresses(), route_source)


def parse_explicit_address(text: str) -> IPv4Interface:
    try:
        address = ip_interface(text)
    except ValueError:
        address = None
    if address is None or address.version != 4 or "/" not in text:
        raise InvalidResource(f"--ip {text!r} must be an IPv4 address with its prefix length, "
                              "such as 10.0.0.11/24.")
    return address


# -- registration -----------------------------------------------------------------------------

def check_address_free(node: NodeRecord, nodes: Iterable[NodeRecord]) -> None:
    """Refuse an address another node's record holds: sessions to it, and the routes of the
    blocks it owns, would be taken for either node's."""
    if node.address is None:
        return
    for other in nodes:
        if other.name != node.name and other.address and other.address.ip == node.address.ip:
            raise InvalidResource(
                f"node {other.name} already has the address {node.address.ip}; if that node "
                f"is gone, remove its record with `pipitctl delete node {other.name}`.")


async def register(store: Store, node: NodeRecord) -> NodeRecord:
    """Create or update this node's record with its current address (labels, AS and route
    reflector cluster id already stored are kept unless given). Refuses an address another
    node's record holds."""
    check_name(KIND, node.name)
    check_labels(f"node {node.name}", node.labels)

    async def decide(changes: Changes) -> NodeRecord:
        stored: NodeRecord | None = None
        others = []
        for entry in await changes.store.list(keys.NODES):
            try:
                other = node_from_document(entry.value)
            except PipitError:
                continue
            if other.name == node.name:
                changes.saw(entry.key, entry.mod_revision)
                stored = other
            else:
                others.append(other)
        check_address_free(node, others)
        changes.saw(keys.node_key(node.name), changes.expect.get(keys.node_key(node.name), 0))
        pools = [pool for pool, _ in read_pools(await changes.store.list(keys.POOLS))]
        check_node_outside_pools(node, [stored] if stored else [], pools)
        merged = replace(node,
                         as_number=node.as_number if node.as_number is not None
                         else stored.as_number if stored else None,
                         route_reflector_cluster_id=node.route_reflector_cluster_id
                         or (stored.route_reflector_cluster_id if stored else None),
                         kubernetes_node=node.kubernetes_node
                         or (stored.kubernetes_node if stored else None),
                         labels={**(stored.labels if stored else {}), **node.labels},
                         annotations={**(stored.annotations if stored else node.annotations),
                                      VERSION_ANNOTATION: software_version()})
        if stored is not None:  # the tunnel fields are the running agent's to change
            merged = replace(merged, ipip_tunnel_address=stored.ipip_tunnel_address,
                             vxlan_tunnel_address=stored.vxlan_tunnel_address,
                             vxlan_mac=stored.vxlan_mac)
        if stored != merged:
            if stored and stored.address != merged.address:
                log.warning("node %s: address changed from %s to %s", node.name, stored.address,
                            merged.address)
            changes.put(keys.node_key(node.name), node_to_document(merged))
        return merged
    return await transact(store, decide, f"registering node {node.name}")


def ipam_only_status(me: NodeRecord) -> dict:
    """The status an agent run with --no-bgp serves (`pipitctl node status` reads it)."""
    return {"node": me.name, "address": str(me.address) if me.address else None,
            "asNumber": me.as_number, "bgp": False, "speakerConnected": False, "peers": []}


async def set_tunnel_fields(store: Store, name: str, ipip: IPv4Address | None,
                            vxlan: IPv4Address | None, mac: str | None) -> None:
    """Record this node's tunnel addresses (and VTEP MAC) on its record."""
    async def decide(changes: Changes) -> None:
        entry = await changes.get(keys.node_key(name))
        if entry is None:
            raise InvalidResource(f"node {name} has no record; it must register first.")
        record = node_from_document(entry.value)
        updated = replace(record, ipip_tunnel_address=ipip, vxlan_tunnel_address=vxlan,
                          vxlan_mac=mac)
        if updated != record:
            changes.put(entry.key, node_to_document(updated))
    await transact(store, decide, f"recording the tunnel addresses of node {name}")
