"""The cluster's BGP settings: the BGPConfiguration resource named "default", and Calico's
node-specific ones, named node.<node name>, of which Pipit takes logSeverityScreen (that
node's log level over the default's), listenPort (where that node listens, and so where the
other nodes connect to it) and prefixAdvertisements, with the named communities they use (that
node's in place of the default's, as Calico's); every other field is the cluster's, and
refused there."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Network

from bgp_agent.md5_password import PasswordRef, parse_password
from bgp_agent.model import DEFAULT_AS, DEFAULT_HOLD_TIME, DEFAULT_RESTART_TIME, MAX_RESTART_TIME
from ipam.errors import InvalidResource
from ipam.pool import LOAD_BALANCER, IPPool
from ipam.resource import SpecReader, check_name, make_document, shown

KIND = "BGPConfiguration"
NAME = "default"
NODE_PREFIX = "node."  # a node-specific one: node.<node name>
NODE_FIELDS = {"logSeverityScreen", "listenPort", "communities", "prefixAdvertisements"}
# Kubernetes service ranges every node announces to its external peers (Calico's fields)
SERVICE_FIELDS = ("serviceClusterIPs", "serviceExternalIPs", "serviceLoadBalancerIPs")
_FIELDS = {"asNumber", "nodeToNodeMeshEnabled", "listenPort", "communities",
           "prefixAdvertisements", "nodeMeshHoldTime", "nodeMeshMaxRestartTime",
           "nodeMeshPassword", "logSeverityScreen", "serviceLoadBalancerAggregation",
           "bindMode", *SERVICE_FIELDS}
AGGREGATION = ("Enabled", "Disabled")  # serviceLoadBalancerAggregation (Calico's)
NO_WORKLOAD_PEERING = "Pipit does not peer with workloads (pods) yet."
# Calico's fields Pipit does not do, and why (refused in that sentence)
UNSUPPORTED = {
    "ignoredInterfaces": "Pipit reads no device routes to leave some out (a node announces "
                         "only its blocks, borrowed addresses and service ranges).",
    "localWorkloadPeeringIPV4": NO_WORKLOAD_PEERING,
    "localWorkloadPeeringIPV6": NO_WORKLOAD_PEERING,
    "programClusterRoutes": "pipit-agent programs every route to the other nodes' pods "
                            "itself, whatever the encapsulation (there is no Felix to leave "
                            "some to); leave it out.",
    "ipv4NormalRoutePriority": "Pipit sets no route priorities (leave it out).",
    "ipv6NormalRoutePriority": "Pipit sets no route priorities (leave it out).",
}
# Calico's logSeverityScreen values (read in any case, as Calico's), as the agent's log
# levels (Trace: Python has none finer than DEBUG; its ExaBGP stays at WARNING: at INFO it
# logs every route)
LOG_SEVERITIES = {"Trace": "DEBUG", "Debug": "DEBUG", "Info": "INFO", "Warning": "WARNING",
                  "Error": "ERROR", "Fatal": "CRITICAL"}
_A_CIDR = "a CIDR such as 10.96.0.0/12"
_COMMUNITY_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_COMMUNITY = re.compile(r"\d+(:\d+){1,2}")
Community = tuple[int, int]  # RFC 1997: AS:VALUE, 16 bits each
LargeCommunity = tuple[int, int, int]  # RFC 8092: AS:VALUE:VALUE, 32 bits each


def check_as_number(value: int, where: str) -> int:
    """One sentence for an AS number BGP cannot use."""
    if not 1 <= value <= 4294967294:
        raise InvalidResource(f"{where}: AS number {shown(value)} is outside 1-4294967294.")
    if value == 23456:
        raise InvalidResource(f"{where}: AS number 23456 is AS_TRANS (RFC 6793), reserved.")
    if value == 65535 or 65552 <= value <= 131071:
        raise InvalidResource(f"{where}: AS number {value} is reserved by IANA.")
    return value


_AS_PLAIN = re.compile(r"[0-9]{1,10}")
_AS_DOT = re.compile(r"([0-9]{1,5})\.([0-9]{1,5})")


def parse_as_number(value: object, where: str, field: str = "asNumber") -> int:
    """An AS number as Calico reads it: a whole number, the same in quotes ("65001"), or
    asdot (RFC 5396: "1.10" is 1 * 65536 + 10 = 65546); stored and shown as a number."""
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _AS_PLAIN.fullmatch(value.strip()):
        number = int(value)
    elif isinstance(value, str) and (dot := _AS_DOT.fullmatch(value.strip())):
        high, low = int(dot[1]), int(dot[2])
        if high <= 65535 and low <= 65535:
            number = (high << 16) + low
    if number is None:
        raise InvalidResource(f"{where}: {field} {shown(value)} is not an AS number (write a "
                              "whole number such as 65001, or asdot such as '1.10' with both "
                              "parts 0-65535).")
    return check_as_number(number, where)


def parse_community(text: object, where: str) -> Community | LargeCommunity:
    """A standard community `aa:nn` (16-bit parts) or a large one `aa:nn:mm` (RFC 8092,
    32-bit parts: a cluster on a 4-byte AS tags its routes with its own AS), as Calico reads
    them."""
    if isinstance(text, str) and _COMMUNITY.fullmatch(text.strip()):
        parts = tuple(int(p) for p in text.strip().split(":"))
        if all(p <= (65535 if len(parts) == 2 else 4294967295) for p in parts):
            return parts
    raise InvalidResource(f"{where}: community {shown(text)} is neither AS:VALUE with both parts "
                          "0-65535 nor a large community AS:VALUE:VALUE with each part "
                          "0-4294967295.")


def check_hold_time(value: int, where: str) -> int:
    if value != 0 and not 3 <= value <= 65535:
        raise InvalidResource(f"{where}: hold time {value} must be 0 or 3-65535 seconds.")
    return value


def check_restart_time(value: int, field: str, where: str) -> int:
    """A graceful restart time (`field` names it in the message); 0 turns it off."""
    if not 0 <= value <= MAX_RESTART_TIME:
        raise InvalidResource(f"{where}: {field} {value} is outside 0-{MAX_RESTART_TIME} "
                              "seconds.")
    return value


def _service_ranges(read: SpecReader, field_name: str) -> tuple[IPv4Network, ...]:
    """A service field: a list of {cidr: 10.96.0.0/12}, as Calico writes it."""
    value = read.spec.get(field_name)
    if value is None:
        return ()
    example = f"{field_name} must be a list such as [{{cidr: 10.96.0.0/12}}]"
    if not isinstance(value, list):
        raise read.fail(f"{example}, not {shown(value)}.")
    ranges = []
    for entry in value:
        if not isinstance(entry, Mapping) or set(entry) != {"cidr"} \
                or not isinstance(entry["cidr"], str):
            raise read.fail(f"{example}: {shown(entry)} is not one {{cidr: ...}}.")
        ranges.append(read.ipv4_network(f"{field_name}:", entry["cidr"], _A_CIDR))
    return tuple(dict.fromkeys(ranges))


@dataclass(frozen=True)
class BGPConfig:
    as_number: int = DEFAULT_AS
    node_to_node_mesh: bool = True
    listen_port: int = 179
    communities: tuple[Community, ...] = ()
    large_communities: tuple[LargeCommunity, ...] = ()
    node_mesh_hold_time: int = DEFAULT_HOLD_TIME
    node_mesh_restart_time: int = DEFAULT_RESTART_TIME
    node_mesh_password: PasswordRef | None = None  # TCP MD5 on every mesh session
    # serviceClusterIPs, serviceExternalIPs, serviceLoadBalancerIPs, in that order
    service_ranges: tuple[tuple[IPv4Network, ...], ...] = ((), (), ())
    # serviceLoadBalancerAggregation: Enabled, every node announces the serviceLoadBalancerIPs
    # ranges whole; Disabled, only each load-balancer service's own /32s
    # (bgp_agent.service_addresses)
    aggregate_balancers: bool = True
    # Calico's named communities ({name, value} in `communities`), used only where a
    # prefixAdvertisement names them; and each prefixAdvertisement: its cidr and its
    # communities as written (a name or a value)
    named_communities: tuple[tuple[str, Community | LargeCommunity], ...] = ()
    prefix_advertisements: tuple[tuple[IPv4Network, tuple[str, ...]], ...] = ()
    log_severity: str | None = None  # logSeverityScreen; None: the agent's --log-level
    # the listenPort of the nodes whose node.<name> configuration gives one (see port_of)
    node_listen_ports: tuple[tuple[str, int], ...] = ()
    # bindMode NodeIP, written out (Calico's; what Pipit does anyway: ExaBGP listens on the
    # node's address only, as each session's local address)
    bind_node_ip: bool = False
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)

    @property
    def name(self) -> str:
        return NAME

    def port_of(self, node: str) -> int:
        """Where `node` listens for BGP: its own listenPort, else the cluster's."""
        return dict(self.node_listen_ports).get(node, self.listen_port)

    @property
    def service_prefixes(self) -> tuple[IPv4Network, ...]:
        """Every service range, each once: none is taken from a peer."""
        return tuple(dict.fromkeys(p for ranges in self.service_ranges for p in ranges))

    @property
    def announced_service_ranges(self) -> tuple[IPv4Network, ...]:
        """The service ranges every node announces whole, as Calico's: the cluster IP ranges,
        the external IP ranges and (aggregated) the load-balancer ones, but no single address
        (a /32 entry): that goes per service, from the nodes that answer it, else a service
        with externalTrafficPolicy Local would be drawn to nodes that drop its traffic."""
        cluster, external, balancer = self.service_ranges
        return tuple(dict.fromkeys(
            (*cluster, *(p for p in (*external, *(balancer if self.aggregate_balancers else ()))
                         if p.prefixlen < 32))))

    def communities_for(self, prefix: IPv4Network
                        ) -> tuple[tuple[Community, ...], tuple[LargeCommunity, ...]]:
        """The (standard, large) communities an export of `prefix` carries: the cluster's,
        and those of every prefixAdvertisement whose cidr holds it (equal or inside)."""
        if not self.prefix_advertisements:
            return self.communities, self.large_communities
        named = dict(self.named_communities)
        extra = [named.get(token) or parse_community(token, KIND)
                 for cidr, tokens in self.prefix_advertisements if prefix.subnet_of(cidr)
                 for token in tokens]
        return (tuple(dict.fromkeys((*self.communities, *(c for c in extra if len(c) == 2)))),
                tuple(dict.fromkeys((*self.large_communities,
                                     *(c for c in extra if len(c) == 3)))))


@dataclass(frozen=True)
class NodeBGPConfig:
    """Calico's node-specific BGPConfiguration (node.<node name>): that node's
    logSeverityScreen and listenPort, over the default's, and its prefixAdvertisements (None:
    not given, the default's), with the named communities they use, in place of the
    default's (see for_node)."""
    node: str
    log_severity: str | None = None
    listen_port: int | None = None
    named_communities: tuple[tuple[str, Community | LargeCommunity], ...] = ()
    prefix_advertisements: tuple[tuple[IPv4Network, tuple[str, ...]], ...] | None = None
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)

    @property
    def name(self) -> str:
        return NODE_PREFIX + self.node


def config_from_spec(name: str, spec: Mapping) -> BGPConfig | NodeBGPConfig:
    if name.startswith(NODE_PREFIX):
        return _node_config(name, spec)
    read = SpecReader(KIND, name, spec, _FIELDS, UNSUPPORTED)
    if name != NAME:
        raise read.fail(f"Pipit reads the BGPConfiguration named {NAME!r}, and one named "
                        f"{NODE_PREFIX}<node name> per node.")
    where = f"{KIND} {name!r}"
    given = spec.get("asNumber")
    as_number = parse_as_number(DEFAULT_AS if given is None else given, where)
    port = _listen_port(read, 179)
    communities = _communities(read)
    named = _named_communities(read, [c for c in communities if isinstance(c, Mapping)])
    parsed = [parse_community(c, where) for c in communities if not isinstance(c, Mapping)]
    restart = check_restart_time(read.seconds("nodeMeshMaxRestartTime", DEFAULT_RESTART_TIME),
                                 "nodeMeshMaxRestartTime", where)
    return BGPConfig(
        as_number=as_number,
        node_to_node_mesh=read.boolean("nodeToNodeMeshEnabled", True),
        listen_port=port,
        communities=tuple(c for c in parsed if len(c) == 2),
        large_communities=tuple(c for c in parsed if len(c) == 3),
        node_mesh_hold_time=check_hold_time(read.seconds("nodeMeshHoldTime",
                                                         DEFAULT_HOLD_TIME), where),
        node_mesh_restart_time=restart,
        node_mesh_password=parse_password(read, spec.get("nodeMeshPassword"),
                                          "nodeMeshPassword"),
        service_ranges=tuple(_service_ranges(read, f) for f in SERVICE_FIELDS),
        aggregate_balancers=read.choice("serviceLoadBalancerAggregation", "Enabled",
                                        AGGREGATION) == "Enabled",
        named_communities=named,
        prefix_advertisements=_prefix_advertisements(read, dict(named)),
        log_severity=_log_severity(read),
        bind_node_ip=_bind_mode(read) == "NodeIP",
    )


def _bind_mode(read: SpecReader) -> str | None:
    mode = read.string("bindMode") or None
    if mode not in (None, "NodeIP"):
        raise read.fail(f"bindMode {shown(mode)} is not supported: Pipit listens for BGP on "
                        "the node's address only (NodeIP), the local address of its sessions.")
    return mode


def _node_config(name: str, spec: Mapping) -> NodeBGPConfig:
    node = name.removeprefix(NODE_PREFIX)
    try:
        check_name("node", node)
    except InvalidResource:
        raise InvalidResource(f"{KIND} {name!r}: {node!r} is not a valid node name (a "
                              f"node-specific BGPConfiguration is named {NODE_PREFIX}<node "
                              "name>).") from None
    cluster_wide = sorted(f for f in spec if f in _FIELDS and f not in NODE_FIELDS)
    if cluster_wide:
        raise InvalidResource(f"{KIND} {name!r}: {cluster_wide[0]} is the cluster's, set in "
                              f"the BGPConfiguration {NAME!r}; a node's may set only "
                              f"{', '.join(sorted(NODE_FIELDS))}.")
    read = SpecReader(KIND, name, spec, NODE_FIELDS, UNSUPPORTED)
    communities = _communities(read)
    if any(not isinstance(c, Mapping) for c in communities):
        raise read.fail("a node's communities only name values for its prefixAdvertisements "
                        "({name, value}); communities on every export are the cluster's, set "
                        f"in the BGPConfiguration {NAME!r}.")
    named = _named_communities(read, communities)
    advertisements = None
    if spec.get("prefixAdvertisements") is not None:
        advertisements = _prefix_advertisements(read, dict(named))
    elif named:
        raise read.fail("communities are named but no prefixAdvertisements uses them.")
    return NodeBGPConfig(node, _log_severity(read),
                         _listen_port(read, None) if spec.get("listenPort") is not None else None,
                         named, advertisements)


def for_node(config: BGPConfig, own: NodeBGPConfig | None) -> BGPConfig:
    """The cluster's settings as one node applies them: its own prefixAdvertisements, if its
    node.<name> configuration gives them (even none), in place of the default's (Calico's
    rule); the cluster's communities on every export stay."""
    if own is None or own.prefix_advertisements is None:
        return config
    return replace(config, named_communities=own.named_communities,
                   prefix_advertisements=own.prefix_advertisements)


def _listen_port(read: SpecReader, default: int | None) -> int:
    port = read.integer("listenPort", default)
    if not 1 <= port <= 65535:
        raise read.fail(f"listenPort {port} is outside 1-65535.")
    return port


def _log_severity(read: SpecReader) -> str | None:
    severity = read.string("logSeverityScreen") or None
    if severity is None:
        return None
    known = next((s for s in LOG_SEVERITIES if s.lower() == severity.lower()), None)
    if known is None:
        raise read.fail(f"logSeverityScreen {severity!r} is not one of "
                        f"{', '.join(LOG_SEVERITIES)}.")
    return known


def _communities(read: SpecReader) -> list:
    communities = read.spec.get("communities") or []
    if not isinstance(communities, list):
        raise read.fail("communities must be a list such as ['64512:100', '4200000000:1:2'].")
    return communities


def _named_communities(read: SpecReader, entries: list[Mapping]
                       ) -> tuple[tuple[str, Community | LargeCommunity], ...]:
    """Calico's form of `communities`: {name, value}, a value to name in prefixAdvertisements
    (attached to nothing by itself)."""
    named: dict[str, Community | LargeCommunity] = {}
    for entry in entries:
        if set(entry) != {"name", "value"}:
            raise read.fail(f"a community is either a value such as '64512:100' or {{name, "
                            f"value}} to use in prefixAdvertisements, not {shown(dict(entry))}.")
        name = entry["name"]
        if not isinstance(name, str) or not _COMMUNITY_NAME.fullmatch(name):
            raise read.fail(f"community name {shown(name)} is not lower-case letters, digits, "
                            "'-' and '.'.")
        if name in named:
            raise read.fail(f"community name {name!r} is given twice.")
        named[name] = parse_community(entry["value"], read.where)
    return tuple(named.items())


def _prefix_advertisements(read: SpecReader, named: Mapping[str, object]
                           ) -> tuple[tuple[IPv4Network, tuple[str, ...]], ...]:
    """prefixAdvertisements: [{cidr, communities: [a name from `communities`, or a value]}]."""
    value = read.spec.get("prefixAdvertisements")
    if value is None:
        return ()
    example = ("prefixAdvertisements must be a list such as [{cidr: 10.244.0.0/16, "
               "communities: ['64512:120']}]")
    if not isinstance(value, list):
        raise read.fail(f"{example}, not {shown(value)}.")
    advertisements = []
    for entry in value:
        if not isinstance(entry, Mapping) or set(entry) != {"cidr", "communities"} \
                or not isinstance(entry["cidr"], str) \
                or not isinstance(entry["communities"], list) or not entry["communities"]:
            raise read.fail(f"{example}: {shown(entry)} is not one {{cidr, communities}} with "
                            "at least one community.")
        cidr = read.ipv4_network("prefixAdvertisements:", entry["cidr"], _A_CIDR)
        tokens = []
        for token in entry["communities"]:
            if not (isinstance(token, str) and token in named):
                try:
                    parse_community(token, read.where)
                except InvalidResource:
                    raise read.fail(f"prefixAdvertisements: community {shown(token)} for "
                                    f"{cidr} is neither a name given in communities nor a "
                                    "value such as '64512:120' or '4200000000:1:2'.") from None
            tokens.append(token.strip())
        advertisements.append((cidr, tuple(tokens)))
    return tuple(advertisements)


_MESH_FIELDS = ("nodeMeshHoldTime", "nodeMeshMaxRestartTime", "nodeMeshPassword")


def check_config_input(spec: Mapping) -> None:
    """What Calico refuses on input but an agent still reads when stored: a node-to-node mesh
    setting while the mesh is off (it would do nothing)."""
    if spec.get("nodeToNodeMeshEnabled") is False:
        given = [f for f in _MESH_FIELDS if spec.get(f) is not None]
        if given:
            raise InvalidResource(f"{KIND} {NAME!r}: {given[0]} cannot be set when "
                                  "nodeToNodeMeshEnabled is false (it would do nothing).")


def community_texts(config: BGPConfig) -> list[str]:
    return [":".join(map(str, c)) for c in (*config.communities, *config.large_communities)]


def config_to_document(config: BGPConfig | NodeBGPConfig) -> dict:
    if isinstance(config, NodeBGPConfig):
        spec = {field_name: value for field_name, value in (
            ("logSeverityScreen", config.log_severity), ("listenPort", config.listen_port))
            if value is not None}
        if config.named_communities:
            spec["communities"] = _named_community_specs(config.named_communities)
        if config.prefix_advertisements is not None:
            spec["prefixAdvertisements"] = _advertisement_specs(config.prefix_advertisements)
        return make_document(KIND, config.name, spec, config.labels, config.annotations)
    spec = {
        "asNumber": config.as_number,
        "nodeToNodeMeshEnabled": config.node_to_node_mesh,
        "listenPort": config.listen_port,
        "communities": [*community_texts(config),
                        *_named_community_specs(config.named_communities)],
    }
    if config.prefix_advertisements:
        spec["prefixAdvertisements"] = _advertisement_specs(config.prefix_advertisements)
    if config.node_to_node_mesh:
        spec.update(zip(_MESH_FIELDS, (config.node_mesh_hold_time,
                                       config.node_mesh_restart_time)))
        if config.node_mesh_password is not None:
            spec["nodeMeshPassword"] = config.node_mesh_password.to_spec()
    for field_name, ranges in zip(SERVICE_FIELDS, config.service_ranges):
        if ranges:
            spec[field_name] = [{"cidr": str(r)} for r in ranges]
    if not config.aggregate_balancers:
        spec["serviceLoadBalancerAggregation"] = "Disabled"
    if config.log_severity is not None:
        spec["logSeverityScreen"] = config.log_severity
    if config.bind_node_ip:
        spec["bindMode"] = "NodeIP"
    return make_document(KIND, NAME, spec, config.labels, config.annotations)


# Why a pool of pods must stay out of every service range, for the sentences below.
_POOL_IN_SERVICES = ("no node takes a route inside a service range (kube-proxy serves it), so "
                     "pods there could not be reached")


def _overlap(config: BGPConfig, pool: IPPool) -> tuple[str, IPv4Network] | None:
    """The service field and range of `config` that overlap `pool`, if the pool's addresses
    are routed as node blocks (Workload, Tunnel: a LoadBalancer pool's are services')."""
    if LOAD_BALANCER in pool.allowed_uses:
        return None
    for field_name, ranges in zip(SERVICE_FIELDS, config.service_ranges):
        for service in ranges:
            if service.overlaps(pool.cidr):
                return field_name, service
    return None


def check_pool_clear_of_services(pool: IPPool, configs: Iterable[object]) -> None:
    """Refuse a pool of pods or tunnels that overlaps a service range of the cluster's
    BGPConfiguration."""
    for config in configs:
        found = _overlap(config, pool) if isinstance(config, BGPConfig) else None
        if found:
            raise InvalidResource(
                f"IPPool {pool.name!r}: cidr {pool.cidr} overlaps service range {found[1]} "
                f"(BGPConfiguration {config.name!r} {found[0]}): {_POOL_IN_SERVICES}.")


def check_services_clear_of_pools(config: object, pools: Iterable[IPPool]) -> None:
    """Refuse service ranges that overlap a pool of pods or tunnels."""
    if not isinstance(config, BGPConfig):
        return
    for pool in pools:
        found = _overlap(config, pool)
        if found:
            raise InvalidResource(
                f"BGPConfiguration {config.name!r}: {found[0]} {found[1]} overlaps IPPool "
                f"{pool.name!r} ({pool.cidr}): {_POOL_IN_SERVICES}.")


def _named_community_specs(named: tuple[tuple[str, Community | LargeCommunity], ...]
                           ) -> list[dict]:
    return [{"name": name, "value": ":".join(map(str, value))} for name, value in named]


def _advertisement_specs(advertisements: tuple[tuple[IPv4Network, tuple[str, ...]], ...]
                         ) -> list[dict]:
    return [{"cidr": str(cidr), "communities": list(tokens)} for cidr, tokens in advertisements]
