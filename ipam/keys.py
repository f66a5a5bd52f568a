"""The etcd key layout (README, "What etcd holds"). Block CIDRs appear in keys as 10.0.0.0-26."""

from ipaddress import IPv4Network

ROOT = "/pipit/"
RESOURCES = ROOT + "resources/"
BLOCKS = ROOT + "ipam/v2/assignment/ipv4/block/"
HOSTS = ROOT + "ipam/v2/host/"
HANDLES = ROOT + "ipam/v2/handle/"
FENCES = ROOT + "ipam/v2/fence/"
AGENTS = ROOT + "agents/"  # <node>: the running agent's claim on the name, by a lease
IPAM_CONFIG = RESOURCES + "ipamconfig/default"


def resource_prefix(plural: str) -> str:
    return f"{RESOURCES}{plural}/"


def resource_key(plural: str, name: str) -> str:
    return f"{RESOURCES}{plural}/{name}"


def pool_key(name: str) -> str:
    return resource_key("ippools", name)


POOLS = resource_prefix("ippools")
RESERVATIONS = resource_prefix("ipreservations")
NODES = resource_prefix("nodes")


def node_key(node: str) -> str:
    return NODES + node


def agent_key(node: str) -> str:
    return AGENTS + node


def _cidr_part(cidr: IPv4Network) -> str:
    return f"{cidr.network_address}-{cidr.prefixlen}"


def _cidr_from_part(part: str) -> IPv4Network:
    address, _, length = part.rpartition("-")
    return IPv4Network(f"{address}/{length}")


def block_key(cidr: IPv4Network) -> str:
    return BLOCKS + _cidr_part(cidr)


def block_cidr(key: str) -> IPv4Network:
    return _cidr_from_part(key.removeprefix(BLOCKS))


def affinity_prefix(node: str) -> str:
    return f"{HOSTS}{node}/ipv4/block/"


def affinity_key(node: str, cidr: IPv4Network) -> str:
    return affinity_prefix(node) + _cidr_part(cidr)


def affinity_parts(key: str) -> tuple[str, IPv4Network]:
    """(node, block cidr) of an affinity key."""
    node, _, rest = key.removeprefix(HOSTS).partition("/ipv4/block/")
    return node, _cidr_from_part(rest)


def handle_key(handle_id: str) -> str:
    return HANDLES + handle_id


def fence_key(node: str) -> str:
    """The key every allocation transaction of `node` compares: writing it stops a
    transaction whose answer was lost from committing later (see txn.outcome)."""
    return FENCES + node
