"""BGPPeer: the resource (parsing, one-sentence refusals, the checks against nodes and other
peers), where its password comes from, and `pipitctl apply / get / delete` of it against a
real etcd. How the agent picks its sessions from peers is in test_policy.py; the sessions
themselves, against real routers, in test_tor.py."""

from __future__ import annotations

import json
import re
from ipaddress import IPv4Address, IPv4Interface

import pytest
import yaml

from bgp_agent.bgp_peer import BGPPeer, check_peer, peer_from_spec, peer_to_spec
from bgp_agent.md5_password import PasswordRef, PasswordUnavailable, resolve_password
from bgp_agent.node import NodeRecord, node_to_document
from ipam import keys
from ipam.errors import InvalidResource
from tests.pipitctl_support import ok, put, snapshot
from tests.sentences import one_sentence
from tests.speaker_support import (
    bird_peer, established, eventually, make_speaker, needs_root, running)

TOR = {"peerIP": "10.99.1.1", "asNumber": 65101}


def refused(spec: dict, *facts: str, name: str = "tor") -> str:
    with pytest.raises(InvalidResource) as caught:
        peer_from_spec(name, spec)
    return one_sentence(caught.value, *facts, prefix=f"BGPPeer '{name}': ")


def node_record(name: str, address: str | None = None, **labels: str) -> NodeRecord:
    return NodeRecord(name, IPv4Interface(address) if address else None, None, labels)


# --------------------------------------------------------------------------------------------
# The resource

def test_a_minimal_peer_is_global_with_the_defaults():
    peer = peer_from_spec("tor", TOR)
    assert peer == BGPPeer("tor", IPv4Address("10.99.1.1"), 65101)
    assert peer.scope == "global" and peer.hold_time == 90 and peer.restart_time == 120
    assert peer.max_prefixes == 0 and not peer.allow_pool_prefixes and peer.password is None


def test_every_field_round_trips():
    spec = {**TOR, "nodeSelector": "rack == 'a' && has(tor)",
            "password": {"secretKeyRef": {"name": "bgp-secrets", "key": "rack-a"}},
            "holdTime": 9, "maxRestartTime": 30, "maxPrefixes": 100,
            "keepOriginalNextHop": True, "allowPoolPrefixes": True,
            "numAllowedLocalASNumbers": 1, "filters": ["tor-in", "tor-out"], "ttlSecurity": 1,
            "localASNumber": "1.10", "sourceAddress": "UseNodeIP", "reachableBy": "10.99.0.1",
            "keepaliveTime": "3s"}
    peer = peer_from_spec("rack-a", spec)
    assert peer.keepalive_time == 3
    with_mode = peer_from_spec("rack-a", {**spec, "keepOriginalNextHop": False,
                                          "nextHopMode": "Self"})
    assert with_mode.next_hop_mode == "Self"
    assert peer_from_spec("rack-a", peer_to_spec(with_mode)) == with_mode
    assert (peer.filters, peer.ttl_security, peer.local_as_number, peer.reachable_by) == (
        ("tor-in", "tor-out"), 1, 65546, IPv4Address("10.99.0.1"))
    assert peer.scope == "node" and peer.password == PasswordRef(secret="bgp-secrets",
                                                                 key="rack-a")
    assert peer_from_spec("rack-a", peer_to_spec(peer)) == peer
    assert peer.applies_to(node_record("n1", tor="x", rack="a"))
    assert not peer.applies_to(node_record("n2", rack="a"))
    by_node = peer_from_spec("one", {**TOR, "node": "n1", "password": {"file": "/etc/p"}})
    assert by_node.applies_to(node_record("n1")) and not by_node.applies_to(node_record("n2"))
    assert peer_from_spec("one", peer_to_spec(by_node)) == by_node


def test_peer_ip_may_carry_the_port_the_peer_listens_on():
    """Calico's `10.0.0.1:1179`: a reflector or a router with another daemon on 179."""
    peer = peer_from_spec("rr", {**TOR, "peerIP": "10.99.1.1:1179"})
    assert (peer.peer_ip, peer.peer_port, peer.endpoint) == (IPv4Address("10.99.1.1"), 1179,
                                                             "10.99.1.1:1179")
    assert peer_to_spec(peer)["peerIP"] == "10.99.1.1:1179"
    assert peer_from_spec("rr", peer_to_spec(peer)) == peer
    # BGP's own port written out is kept (without one, a Pipit node's peerIP goes to that
    # node's listenPort: test_policy)
    explicit = peer_from_spec("rr", {**TOR, "peerIP": "10.99.1.1:179"})
    assert (explicit.peer_port, explicit.endpoint) == (179, "10.99.1.1:179")
    assert peer_from_spec("rr", peer_to_spec(explicit)) == explicit
    assert peer_from_spec("rr", TOR).peer_port is None
    # one session per address: the same router on two ports is still a duplicate
    with pytest.raises(InvalidResource, match="already peers with 10.99.1.1"):
        check_peer(peer, [peer_from_spec("tor", TOR)], [])


REFUSALS = [
    ({**TOR, "peerIP": "10.99.1.1:0"}, ["port 0", "1-65535"]),
    ({**TOR, "peerIP": "10.99.1.1:65536"}, ["port 65536", "1-65535"]),
    ({**TOR, "peerIP": "10.99.1.1:"}, ["'10.99.1.1:' is not an IP address", "10.0.0.1:1179"]),
    ({**TOR, "peerIP": "tor:179"}, ["'tor:179' is not an IP address"]),
    ({**TOR, "peerIP": "[fd00::1]:1179"}, ["IPv6"]),
    ({**TOR, "peerIP": "127.0.0.1:1179"}, ["loopback"]),
    ({"peerIP": "10.99.1.1"}, ["asNumber is required"]),
    ({**TOR, "asNumber": 0}, ["AS number 0", "1-4294967294"]),
    ({**TOR, "asNumber": 4294967296}, ["4294967296", "1-4294967294"]),
    ({**TOR, "asNumber": 23456}, ["23456", "AS_TRANS"]),
    ({**TOR, "asNumber": 65535}, ["65535", "reserved"]),
    ({**TOR, "asNumber": "AS65001"}, ["asNumber 'AS65001' is not an AS number", "asdot"]),
    ({**TOR, "asNumber": "1.65536"}, ["'1.65536' is not an AS number", "0-65535"]),
    ({**TOR, "asNumber": True}, ["asNumber True is not an AS number"]),
    ({**TOR, "asNumber": "0.0"}, ["AS number 0", "1-4294967294"]),
    ({"asNumber": 65001}, ["peerIP is required"]),
    ({**TOR, "peerIP": "10.99.1.1/24"}, ["'10.99.1.1/24' is not an IP address"]),
    ({**TOR, "peerIP": "tor.example"}, ["'tor.example' is not an IP address"]),
    ({**TOR, "peerIP": "fd00::1"}, ["IPv6"]),
    ({**TOR, "peerIP": "0.0.0.0"}, ["unspecified"]),
    ({**TOR, "peerIP": "127.0.0.1"}, ["loopback"]),
    ({**TOR, "peerIP": "224.0.0.5"}, ["multicast"]),
    ({**TOR, "peerIP": "255.255.255.255"}, ["broadcast"]),
    ({**TOR, "peerIP": "240.0.0.1"}, ["reserved"]),
    ({**TOR, "node": "n1", "nodeSelector": "all()"}, ["either node or nodeSelector"]),
    ({**TOR, "nodeSelector": "rack == "}, ["nodeSelector", "rack == "]),
    ({**TOR, "nodeSelector": "rack = 'a'"}, ["nodeSelector"]),
    ({**TOR, "node": "Node_1"}, ["'Node_1' is not a valid node name"]),
    ({**TOR, "password": "s3cret"}, ["must not be written into the resource", "file",
                                     "secretKeyRef"]),
    ({**TOR, "password": {"file": "peer.secret"}}, ["absolute path"]),
    ({**TOR, "password": {"file": "/a", "secretKeyRef": {"name": "a", "key": "b"}}},
     ["say where the password is"]),
    ({**TOR, "password": {"secretKeyRef": {"name": "bgp"}}}, ["exactly name and key"]),
    ({**TOR, "password": {"secretKeyRef": {"name": "bgp", "key": "../etc"}}},
     ["'../etc' is not a valid Secret key"]),
    ({**TOR, "password": {"secretKeyRef": {"name": "BGP/x", "key": "k"}}},
     ["not a valid Secret name"]),
    ({**TOR, "holdTime": 2}, ["hold time 2", "0 or 3-65535"]),
    ({**TOR, "maxRestartTime": 5000}, ["maxRestartTime 5000", "0-4095"]),
    ({**TOR, "maxPrefixes": -1}, ["maxPrefixes -1"]),
    ({**TOR, "numAllowedLocalASNumbers": 11}, ["numAllowedLocalASNumbers 11"]),
    ({**TOR, "ttlSecurity": 255}, ["ttlSecurity 255", "1-254"]),
    ({**TOR, "localASNumber": 0}, ["AS number 0"]),
    ({**TOR, "sourceAddress": "None"}, ["sourceAddress 'None'", "UseNodeIP"]),
    ({**TOR, "localASNumber": "x"}, ["localASNumber 'x'"]),
    ({"peerSelector": "all()", "localASNumber": 65001}, ["localASNumber goes with peerIP"]),
    ({**TOR, "ttlSecurity": -1}, ["ttlSecurity -1"]),
    ({**TOR, "ttlSecurity": "on"}, ["ttlSecurity", "whole number"]),
    ({**TOR, "peerAS": 1}, ["unknown spec field 'peerAS'"]),
    ({"peerSelector": "all()", "reachableBy": "10.99.0.1"}, ["reachableBy goes with peerIP"]),
    ({**TOR, "reachableBy": "gw"}, ["reachableBy 'gw' is not an IP address"]),
    ({**TOR, "reachableBy": "fd00::1"}, ["reachableBy fd00::1 is IPv6"]),
    ({**TOR, "reachableBy": TOR["peerIP"]}, ["is peerIP itself"]),
    ({**TOR, "reachableBy": "0.0.0.0"}, ["reachableBy 0.0.0.0 is the unspecified address",
                                         "cannot be a gateway"]),
    ({**TOR, "nextHopMode": "self"}, ["nextHopMode 'self' is not one of Auto, Self, Keep"]),
    ({**TOR, "nextHopMode": "Keep", "keepOriginalNextHop": True},
     ["either nextHopMode or keepOriginalNextHop"]),
    ({**TOR, "keepaliveTime": 90}, ["keepaliveTime 90", "below holdTime 90"]),
    ({**TOR, "keepaliveTime": 0}, ["keepaliveTime 0", "1 or more"]),
    ({**TOR, "holdTime": 0, "keepaliveTime": 10}, ["keepaliveTime cannot be set with holdTime 0"]),
    ({**TOR, "keepaliveTime": "soon"}, ["keepaliveTime must be whole seconds"]),
    # Calico's fields Pipit does not do: why, not "unknown"
    ({"peerIP": "169.254.0.179", "asNumber": 65001, "localWorkloadSelector": "app == 'vr'"},
     ["localWorkloadSelector is not supported", "does not peer with workloads"]),
]


@pytest.mark.parametrize("spec,facts", REFUSALS, ids=[str(i) for i in range(len(REFUSALS))])
def test_every_invalid_peer_is_one_sentence(spec, facts):
    refused(spec, *facts)


def test_a_node_specific_peer_cannot_be_the_node_itself():
    nodes = [node_record("n1", "10.99.1.11/24"), node_record("n2", "10.99.1.12/24")]
    with pytest.raises(InvalidResource) as caught:
        check_peer(peer_from_spec("self", {**TOR, "peerIP": "10.99.1.11", "node": "n1"}),
                   [], nodes)
    one_sentence(caught.value, "10.99.1.11 is the address of node n1 itself")
    # a global peer at a node's address is how every other node peers with that node (a
    # reflector); the node itself skips it at run time (test_policy)
    check_peer(peer_from_spec("rr", {**TOR, "peerIP": "10.99.1.11"}), [], nodes)


DUPLICATES = [
    ({}, {}, "every node"),
    ({}, {"node": "n1"}, "node n1"),
    ({"node": "n1"}, {}, "node n1"),
    ({"node": "n1"}, {"node": "n1"}, "node n1"),
    ({"nodeSelector": "rack == 'a'"}, {"nodeSelector": "rack == 'a'"}, "the nodes"),
    ({"nodeSelector": "rack == 'a'"}, {}, "the nodes \"rack == 'a'\" selects"),
    ({"nodeSelector": "rack == 'a'"}, {"node": "n1"}, "node n1"),  # n1 is in rack a
    ({"nodeSelector": "rack == 'a'"}, {"nodeSelector": "has(tor)"}, "node n1"),
]


@pytest.mark.parametrize("stored,new,overlap", DUPLICATES)
def test_a_second_peer_for_the_same_address_and_node_is_a_duplicate(stored, new, overlap):
    nodes = [node_record("n1", "10.99.1.11/24", rack="a", tor="yes"),
             node_record("n2", "10.99.2.12/24", rack="b")]
    existing = peer_from_spec("first", {**TOR, **stored})
    with pytest.raises(InvalidResource) as caught:
        check_peer(peer_from_spec("second", {**TOR, **new}), [existing], nodes)
    one_sentence(caught.value, "BGPPeer 'first' already peers with 10.99.1.1 for", overlap)


def test_peers_for_the_same_address_on_different_nodes_are_fine():
    nodes = [node_record("n1", "10.99.1.11/24", rack="a"),
             node_record("n2", "10.99.2.12/24", rack="b")]
    stored = [peer_from_spec("a", {**TOR, "nodeSelector": "rack == 'a'"}),
              peer_from_spec("one", {**TOR, "node": "n3"})]
    check_peer(peer_from_spec("b", {**TOR, "nodeSelector": "rack == 'b'"}), stored, nodes)
    check_peer(peer_from_spec("two", {**TOR, "node": "n2"}), stored, nodes)
    check_peer(peer_from_spec("a", {**TOR, "nodeSelector": "rack == 'a'", "holdTime": 9}),
               stored, nodes)  # the same peer, changed
    check_peer(peer_from_spec("other", {**TOR, "peerIP": "10.99.1.2"}), stored, nodes)


# --------------------------------------------------------------------------------------------
# The password: a file, or a key of a mounted Secret

def test_passwords_come_from_a_file_or_a_mounted_secret(tmp_path):
    (tmp_path / "peer.secret").write_text("s3cret\n")
    assert resolve_password(PasswordRef(file=str(tmp_path / "peer.secret")), None) == "s3cret"
    (tmp_path / "secrets" / "bgp").mkdir(parents=True)
    (tmp_path / "secrets" / "bgp" / "tor").write_text("from-a-secret")
    ref = PasswordRef(secret="bgp", key="tor")
    assert resolve_password(ref, tmp_path / "secrets") == "from-a-secret"
    assert str(ref) == "secret:bgp/tor"


@pytest.mark.parametrize("setup,ref,fact", [
    (None, PasswordRef(file="/nonexistent/peer.secret"), "no such file"),
    ("", PasswordRef(file="{dir}/p"), "is empty"),
    ('with"quote', PasswordRef(file="{dir}/p"), "without quotes"),
    ("x" * 81, PasswordRef(file="{dir}/p"), "at most 80"),
    (None, PasswordRef(secret="bgp", key="tor"), "--secrets-dir"),
])
def test_a_password_that_cannot_be_used_is_one_sentence(tmp_path, setup, ref, fact):
    if setup is not None:
        (tmp_path / "p").write_text(setup)
    if ref.file:
        ref = PasswordRef(file=ref.file.format(dir=tmp_path))
    with pytest.raises(PasswordUnavailable) as caught:
        resolve_password(ref, None)
    assert fact in str(caught.value)


# --------------------------------------------------------------------------------------------
# pipitctl against a real etcd

def peer_yaml(name: str = "tor", **spec) -> str:
    return yaml.safe_dump({"apiVersion": "pipit.dev/v1", "kind": "BGPPeer",
                           "metadata": {"name": name}, "spec": spec}, sort_keys=False)


def store_node(etcd, name: str, address: str, **labels: str) -> None:
    record = NodeRecord(name, IPv4Interface(address), None, labels)
    put(etcd, (keys.node_key(name), node_to_document(record)))


def test_apply_get_and_delete_a_peer(etcd, ctl):
    text = peer_yaml("rack-a", peerIP="10.99.1.1", asNumber=65101,
                     nodeSelector="rack == 'a'", maxPrefixes=50,
                     password={"secretKeyRef": {"name": "bgp", "key": "rack-a"}})
    assert ok(ctl("apply", "-f", "-", input=text)) == "bgppeer 'rack-a' created\n"
    assert ok(ctl("apply", "-f", "-", input=text)) == "bgppeer 'rack-a' unchanged\n"
    ok(ctl("apply", "-f", "-", input=peer_yaml("global", peerIP="10.99.0.254",
                                                asNumber=65000)))
    table = ok(ctl("get", "bgppeers"))
    assert table.splitlines()[0].split() == ["NAME", "PEERIP", "NODE", "ASN"]
    assert re.search(r"global\s+10\.99\.0\.254\s+\(global\)\s+65000", table)
    assert re.search(r"rack-a\s+10\.99\.1\.1\s+rack == 'a'\s+65101", table)
    wide = ok(ctl("get", "peers", "-o", "wide"))
    assert "secret:bgp/rack-a" in wide and "MAXPREFIXES" in wide
    stored = snapshot(etcd)[keys.resource_key("bgppeers", "rack-a")][1]
    assert stored["spec"]["password"] == {"secretKeyRef": {"name": "bgp", "key": "rack-a"}}
    exported = ok(ctl("get", "bgppeer", "rack-a", "-o", "yaml"))
    assert yaml.safe_load(exported)["spec"]["maxPrefixes"] == 50
    assert ok(ctl("apply", "-f", "-", input=exported)) == "bgppeer 'rack-a' unchanged\n"
    listing = json.loads(ok(ctl("get", "bgppeers", "-o", "json")))
    assert [i["metadata"]["name"] for i in listing["items"]] == ["global", "rack-a"]
    assert ok(ctl("delete", "peer", "global")) == "bgppeer 'global' deleted\n"
    one_sentence(ctl("delete", "peer", "global"), "bgppeer 'global' not found")
    assert keys.resource_key("bgppeers", "global") not in snapshot(etcd)


def test_a_password_never_reaches_etcd_or_the_output(etcd, ctl, tmp_path):
    before = snapshot(etcd)
    one_sentence(ctl("apply", "-f", "-", input=peer_yaml(peerIP="10.99.1.1", asNumber=65101,
                                                         password="hunter2")),
                 "must not be written into the resource")
    assert snapshot(etcd) == before
    ok(ctl("apply", "-f", "-", input=peer_yaml(peerIP="10.99.1.1", asNumber=65101,
                                               password={"file": "/etc/pipit/tor.secret"})))
    for fmt in ("table", "wide", "yaml", "json"):
        out = ok(ctl("get", "bgppeers", "-o", fmt))
        assert "hunter2" not in out
    assert "file:/etc/pipit/tor.secret" in ok(ctl("get", "bgppeers", "-o", "wide"))


@pytest.mark.parametrize("stored,new,facts", [
    ([], peer_yaml("me", peerIP="10.99.1.11", asNumber=65001, node="n1"),
     ["10.99.1.11 is the address of node n1 itself"]),
    ([peer_yaml("a", peerIP="10.99.1.1", asNumber=65101)],
     peer_yaml("b", peerIP="10.99.1.1", asNumber=65101),
     ["BGPPeer 'a' already peers with 10.99.1.1 for every node"]),
    ([peer_yaml("a", peerIP="10.99.1.1", asNumber=65101, nodeSelector="rack == 'a'")],
     peer_yaml("b", peerIP="10.99.1.1", asNumber=65101, node="n1"),
     ["already peers with 10.99.1.1 for node n1"]),
    ([], peer_yaml("x", peerIP="10.99.1.1", asNumber=0), ["AS number 0"]),
    ([], peer_yaml("x", peerIP="10.99.1.999", asNumber=65001), ["is not an IP address"]),
    ([], peer_yaml("x", peerIP="10.99.1.1", asNumber=65001, nodeSelector="rack ==="),
     ["nodeSelector"]),
    ([], peer_yaml("x", peerIP="10.99.1.1", asNumber=65001) + "---\n"
     + peer_yaml("x", peerIP="10.99.1.2", asNumber=65001),
     ["document 2", "bgppeer 'x' is also document 1"]),
])
def test_refusals_write_nothing(etcd, ctl, stored, new, facts):
    store_node(etcd, "n1", "10.99.1.11/24", rack="a")
    for text in stored:
        ok(ctl("apply", "-f", "-", input=text))
    before = snapshot(etcd)
    one_sentence(ctl("apply", "-f", "-", input=new), *facts)
    assert snapshot(etcd) == before


# --------------------------------------------------------------------------------------------
# How `pipitctl node status` shows peers

def test_node_status_shows_type_state_counts_and_why_a_session_is_down():
    from pipitctl.node_status import render

    def peer(**fields):
        return {"address": "10.99.1.1", "asNumber": 65101, "type": "node", "name": "tor",
                "state": "up", "since": 1000.0, "reason": "", "received": 0, "accepted": 0,
                "rejected": 0, "exported": 0, "stale": 0, "rejectedReasons": {}, **fields}
    status = {"node": "n1", "address": "10.99.1.11/24", "asNumber": 65001, "now": 4723.0,
              "speakerConnected": True, "peers": [
                  peer(received=6, accepted=3, rejected=3, exported=1,
                       rejectedReasons={"it is inside an IP pool": 3}),
                  peer(address="10.99.1.12", type="mesh", name="n2", asNumber=65001,
                       state="down", since=4700.0, reason="notification received (6,3)"),
                  peer(address="10.99.1.2", type="global", name="flood", state="disabled",
                       since=4000.0, received=12, reason="disconnected: it sent 12 prefixes, "
                       "more than its maxPrefixes 10; it stays down until its BGPPeer changes"),
                  peer(address="10.99.1.11", type="global", name="rr", state="skipped",
                       since=0.0, reason="its peerIP is this node's own address")]}
    lines = render(status).splitlines()
    header = next(l for l in lines if l.startswith("PEER ADDRESS"))
    assert header.split() == ["PEER", "ADDRESS", "TYPE", "NAME", "AS", "STATE", "UPTIME",
                              "DOWN", "FOR", "RECEIVED", "ACCEPTED", "REJECTED", "EXPORTED",
                              "INFO"]
    rows = {l.split()[0]: l for l in lines if re.match(r"\d+\.\d+\.\d+\.\d+ ", l)}
    assert re.search(r"node specific\s+tor\s+65101\s+up\s+01:02:03\s+-\s+6\s+3\s+3\s+1\s+"
                     r"Established \(3 rejected: it is inside an IP pool\)", rows["10.99.1.1"])
    assert re.search(r"node-to-node mesh\s+n2\s+65001\s+down\s+-\s+00:00:23\s+.*Idle: "
                     r"notification received \(6,3\): the peer has no session configured "
                     r"for us$", rows["10.99.1.12"])
    assert "Disabled: disconnected: it sent 12 prefixes" in rows["10.99.1.2"]
    assert "Not configured: its peerIP is this node's own address" in rows["10.99.1.11"]


# --------------------------------------------------------------------------------------------
# A peer on another port, for real: ExaBGP connects to BIRD listening on 1179 only

@needs_root
def test_a_peer_listening_on_another_port_gets_its_session(net1, state_dir):
    import asyncio
    from ipaddress import IPv4Network

    from bgp_agent.bgp_config import BGPConfig
    from bgp_agent.policy import select_neighbors

    address = net1.peer_address(1)
    peer = peer_from_spec("rr", {"peerIP": f"{address}:1179", "asNumber": 65001})
    me = NodeRecord("node", IPv4Interface(f"{net1.node_address(1)}/24"))
    [wanted] = select_neighbors(me, [me], BGPConfig(), [peer], lambda ref: "").neighbors
    assert wanted.peer_port == 1179
    routes = [IPv4Network("10.50.0.0/24")]

    async def scenario():
        # passive: BIRD never connects itself, it only accepts on 1179
        with bird_peer(net1, 1, routes, passive=True, local_port=1179):
            async with running(make_speaker(state_dir, net1)) as speaker:
                await speaker.set_neighbors([wanted])
                await eventually(lambda: established(speaker, address), what="session up")
                assert set(speaker.received[address]) == set(routes)
    asyncio.run(scenario())
