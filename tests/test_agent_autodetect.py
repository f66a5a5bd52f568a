"""The agent's own start without --ip: it finds the node's address on the real interfaces of
its network namespace (first-found, the default; interface=REGEX; skip-interface=REGEX;
cidr=CIDR; can-reach=DEST through the kernel's routes), registers it in the node record and
serves it in its status. A method that matches nothing stops the agent with one sentence and
a non-zero exit, before it serves or registers anything.

The namespace, made here (no dummy module on this kernel: veth pairs):

    lo      127.0.0.1/8         never (loopback)
    veth-x  192.168.9.5/24      first in interface order; first-found skips veth*, cni*
    cni0    (veth-x's peer, no address)
    eth0    192.168.10.5/24     what first-found takes
    eth1    10.20.0.5/24        and the route 172.30.0.0/16 via 10.20.0.1
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from bgp_agent.node import NodeRecord, parse_explicit_address, register
from ipam.store import EtcdConfig
from lab.agent import NodeAgentProcess
from lab.etcd import EtcdServer
from lab.netns import Namespaces
from lab.process import wait
from tests.helpers import with_store
from tests.ipip_support import ip
from tests.pipitctl_support import ok, pipitctl

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[1]
NODE = "n1"


@pytest.fixture(scope="module")
def host():
    """The node's namespace with the interfaces above (no traffic ever leaves it)."""
    with Namespaces() as namespaces:
        ns = namespaces.create("node")
        # (a veth pair's peer is made first, so it gets the lower interface index)
        ip(ns, "link", "add", "cni0", "type", "veth", "peer", "name", "veth-x")
        ip(ns, "link", "add", "eth1", "type", "veth", "peer", "name", "eth0")
        for device, address in (("veth-x", "192.168.9.5/24"), ("eth0", "192.168.10.5/24"),
                                ("eth1", "10.20.0.5/24")):
            ip(ns, "addr", "add", address, "dev", device)
        for device in ("veth-x", "cni0", "eth0", "eth1"):
            ip(ns, "link", "set", device, "up")
        ip(ns, "route", "add", "172.30.0.0/16", "via", "10.20.0.1", "dev", "eth1")
        index = {link["ifname"]: link["ifindex"]
                 for link in json.loads(ip(ns, "-j", "link", "show"))}
        assert index["lo"] < index["veth-x"] < index["eth0"] < index["eth1"], index
        yield ns


@pytest.fixture
def etcd(short_dir):
    """An etcd of this test's own, which the agent inside the namespace reaches through its
    unix socket (pipitctl, outside, through TCP)."""
    with EtcdServer(data_dir=short_dir / "etcd", unix_socket=True) as server:
        yield server


def node_agent(host: str, etcd: EtcdServer, directory, method: str | None,
               *more: str) -> NodeAgentProcess:
    # sidecar: no ExaBGP needed to register and serve the status
    extra = ["--exabgp", "sidecar", "--sigterm", "exit", *more]
    if method is not None:
        extra += ["--ip-autodetection-method", method]
    return NodeAgentProcess(NODE, host, directory / "state",
                            f"unix://{etcd.data_dir}/etcd.sock:0", extra_args=extra)


def node_records(etcd: EtcdServer) -> dict[str, dict]:
    listed = json.loads(ok(pipitctl("get", "nodes", "-o", "json", endpoints=etcd.endpoint)))
    return {item["metadata"]["name"]: item["spec"] for item in listed["items"]}


@pytest.mark.parametrize("method, chosen", [
    (None, "192.168.10.5/24"),  # the default, first-found: not lo, not veth-x
    ("first-found", "192.168.10.5/24"),
    ("interface=eth1", "10.20.0.5/24"),
    ("interface=veth-.*", "192.168.9.5/24"),  # an excluded name, when asked for by name
    ("skip-interface=veth-x|eth0", "10.20.0.5/24"),
    ("cidr=10.16.0.0/12", "10.20.0.5/24"),
    ("can-reach=172.30.1.1", "10.20.0.5/24"),  # through the route via eth1
    ("can-reach=192.168.9.77", "192.168.9.5/24"),  # on veth-x's subnet
])
def test_the_agent_finds_its_address_on_the_namespaces_interfaces(host, etcd, short_dir, method,
                                                                   chosen):
    with node_agent(host, etcd, short_dir, method) as agent:
        # the status is served before the first routing pass fills the address in
        status = wait(lambda: (s := agent.status()) and s.get("address") and s, 30,
                      "the agent's status to show its address")
        assert status["address"] == chosen, agent.log_tail()
        assert node_records(etcd) == {NODE: {"bgp": {"ipv4Address": chosen}}}
        assert f"node {NODE} registered with address {chosen}" in agent.log_tail()


@pytest.mark.parametrize("method, sentence", [
    ("interface=wlan0",
     "no IPv4 address on this node matches 'interface=wlan0' (have: veth-x 192.168.9.5/24, "
     "eth0 192.168.10.5/24, eth1 10.20.0.5/24)."),
    ("cidr=10.99.0.0/16",
     "no IPv4 address on this node matches 'cidr=10.99.0.0/16' (have: veth-x 192.168.9.5/24, "
     "eth0 192.168.10.5/24, eth1 10.20.0.5/24)."),
    ("can-reach=203.0.113.9", "this node has no route to 203.0.113.9 (Network is unreachable)."),
])
def test_no_address_found_is_one_sentence_and_the_agent_serves_nothing(host, etcd, short_dir,
                                                                       method, sentence):
    agent = node_agent(host, etcd, short_dir, method)
    (short_dir / "state").mkdir()
    result = subprocess.run(agent.argv, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.fullmatch(rf".* pipit-agent\[{NODE}\] ERROR pipit-agent: {re.escape(sentence)}",
                        lines[0]), lines[0]
    assert node_records(etcd) == {}
    assert sorted(p.name for p in (short_dir / "state").iterdir()) == []  # no socket, no file


def test_the_running_agent_registers_its_new_address_unless_another_node_holds_it(
        host, etcd, short_dir):
    """As calico-node looks again every AUTODETECT_POLL_INTERVAL: eth1 readdressed, the agent
    registers the new address by itself (its sessions move there: tests/test_lab.py). An
    address another node's record holds, or none at all, keeps the old one, saying why."""
    with_store(EtcdConfig((etcd.endpoint,)), lambda store: register(
        store, NodeRecord("n0", parse_explicit_address("10.20.0.6/24"))))
    try:
        with node_agent(host, etcd, short_dir, "interface=eth1",
                        "--autodetect-poll-interval", "0.2s") as agent:
            wait(lambda: (agent.status() or {}).get("address") == "10.20.0.5/24", 30,
                 "the agent's first address")
            readdress(host, "10.20.0.5/24", None)
            wait(lambda: "node n1 keeps its address 10.20.0.5/24: no IPv4 address on this node "
                 "matches 'interface=eth1'" in agent.log_tail(), 20, "no address found, said")
            readdress(host, None, "10.20.0.6/24")
            wait(lambda: "node n1 keeps its address 10.20.0.5/24: node n0 already has the "
                 "address 10.20.0.6" in agent.log_tail(), 20, "the refusal, said")
            assert node_records(etcd)[NODE] == {"bgp": {"ipv4Address": "10.20.0.5/24"}}
            readdress(host, "10.20.0.6/24", "10.20.0.7/24")
            wait(lambda: node_records(etcd)[NODE] == {"bgp": {"ipv4Address": "10.20.0.7/24"}},
                 20, "the new address registered")
            wait(lambda: (agent.status() or {}).get("address") == "10.20.0.7/24", 20,
                 "the status to show it")
            assert agent.running
    finally:
        readdress(host, "10.20.0.7/24", "10.20.0.5/24", missing_ok=True)
        ip(host, "route", "replace", "172.30.0.0/16", "via", "10.20.0.1", "dev", "eth1")


def readdress(ns: str, old: str | None, new: str | None, missing_ok: bool = False) -> None:
    for verb, address in (("del", old), ("add", new)):
        if address is not None:
            subprocess.run(["ip", "-n", ns, "addr", verb, address, "dev", "eth1"],
                           check=not missing_ok, capture_output=True)
