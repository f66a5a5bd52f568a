"""Node identity: address autodetection methods and the node's record in etcd."""

from ipaddress import IPv4Address, IPv4Interface

import pytest

from bgp_agent.node import (InterfaceAddress, NodeRecord, choose_address, node_from_document,
                            parse_explicit_address, register)
from ipam import keys
from ipam.errors import InvalidResource
from tests.helpers import with_store
from tests.sentences import one_sentence

HOST = [
    InterfaceAddress("lo", IPv4Interface("127.0.0.1/8")),
    InterfaceAddress("docker0", IPv4Interface("172.17.0.1/16")),
    InterfaceAddress("eth0", IPv4Interface("192.168.10.5/24")),
    InterfaceAddress("eth1", IPv4Interface("10.20.0.5/16")),
    InterfaceAddress("pipit-tun", IPv4Interface("10.244.0.1/32")),
]


@pytest.mark.parametrize("method, expected", [
    ("first-found", "192.168.10.5/24"),  # skips lo, docker0
    ("interface=eth1", "10.20.0.5/16"),
    ("interface=eth.*", "192.168.10.5/24"),
    ("skip-interface=eth0|lo|docker0", "10.20.0.5/16"),
    ("cidr=10.20.0.0/16", "10.20.0.5/16"),
    ("cidr=172.31.0.0/16,10.0.0.0/8", "10.20.0.5/16"),
])
def test_autodetection_methods(method, expected):
    assert choose_address(method, HOST) == IPv4Interface(expected)


def test_can_reach_picks_the_address_the_kernel_would_use():
    assert choose_address("can-reach=10.20.9.9", HOST,
                          route_source=IPv4Address("10.20.0.5")) == IPv4Interface("10.20.0.5/16")


@pytest.mark.parametrize("method, message", [
    ("interface=wlan.*", "no IPv4 address on this node matches 'interface=wlan.*'"),
    ("cidr=10.99.0.0/16", "no IPv4 address on this node matches"),
    ("interface=(", "is not a regular expression"),
    ("cidr=nonsense", "'nonsense' is not an IPv4 network"),
    ("guess", "unknown address autodetection method 'guess'"),
])
def test_autodetection_failures_are_one_sentence(method, message):
    with pytest.raises(InvalidResource) as caught:
        choose_address(method, HOST)
    one_sentence(caught.value, message)


def test_explicit_address_needs_a_prefix_length():
    assert parse_explicit_address("10.0.0.5/24") == IPv4Interface("10.0.0.5/24")
    with pytest.raises(InvalidResource, match="with its prefix length"):
        parse_explicit_address("10.0.0.5")


def test_registration_keeps_labels_reports_changes_and_refuses_a_duplicate(etcd):
    async def scenario(store):
        first = await register(store, NodeRecord("n1", IPv4Interface("10.0.0.1/24"),
                                                 labels={"rack": "a"}))
        assert first.labels == {"rack": "a"}
        # Re-registering with a new address keeps stored labels and AS number.
        moved = await register(store, NodeRecord("n1", IPv4Interface("10.0.0.9/24"),
                                                 labels={"zone": "z1"}))
        assert moved.address == IPv4Interface("10.0.0.9/24")
        assert moved.labels == {"rack": "a", "zone": "z1"}
        stored = node_from_document((await store.get(keys.node_key("n1"))).value)
        assert stored == moved
        before = await store.snapshot()
        with pytest.raises(InvalidResource, match="node n1 already has the address 10.0.0.9"):
            await register(store, NodeRecord("n2", IPv4Interface("10.0.0.9/24")))
        assert await store.snapshot() == before
    with_store(etcd, scenario)


def test_an_agent_without_bgp_registers_and_says_so_in_its_status(etcd, tmp_path):
    """`pipit-agent --no-bgp` (IPAM only) is listed by `get nodes` and answers `node status`."""
    import tempfile
    from pathlib import Path

    from lab.agent import AgentProcess
    from tests.pipitctl_support import ok, pipitctl

    endpoint = etcd.endpoints[0]
    with tempfile.TemporaryDirectory(dir="/tmp") as directory:  # a unix socket path is short
        agent = AgentProcess("ipam-only", Path(directory) / "a.sock", endpoint,
                             tmp_path / "agent.log", extra_args=["--ip", "10.77.0.5/24",
                                                                 "--labels", "role=edge"])
        with agent:
            rows = ok(pipitctl("get", "nodes", "-o", "wide", endpoints=endpoint)).splitlines()
            assert rows[1].split() == ["ipam-only", "10.77.0.5/24", "(cluster)", "-", "role=edge"]
            status = ok(pipitctl("node", "status", "--socket", str(agent.status_path)))
            assert status.splitlines() == [
                "Pipit agent is running on node ipam-only (10.77.0.5/24).",
                "BGP is off on this node (pipit-agent --no-bgp): it hands out pod addresses, "
                "and has no sessions and programs no routes."]
