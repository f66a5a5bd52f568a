"""Pure tests of ipam.pool and ipam.resource: pool validation, the document envelope, and how a
pool divides into blocks. No etcd; the same rules seen through `pipitctl` are in
test_pipitctl.py."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipam.errors import InvalidResource
from ipam.pool import (
    IPPool,
    check_node_outside_pools,
    check_pool_fits,
    check_pool_holds_no_node,
    pool_from_document,
    pool_from_spec,
    pool_of,
    pool_to_document,
    pool_to_spec,
    search_start,
    unclaimed_blocks,
)
from ipam.resource import parse_documents, read_document
from tests.sentences import one_sentence

DOC = {"apiVersion": "pipit.dev/v1", "kind": "IPPool", "metadata": {"name": "p"},
       "spec": {"cidr": "10.0.0.0/16"}}


def rejected(spec: dict, *facts: str) -> str:
    with pytest.raises(InvalidResource) as caught:
        pool_from_spec("p", spec)
    return one_sentence(caught.value, *facts, prefix="IPPool 'p': ")


def test_defaults_are_calicos():
    pool = pool_from_spec("p", {"cidr": "10.244.0.0/16"})
    assert pool == IPPool("p", IPv4Network("10.244.0.0/16"), block_size=26, ipip_mode="Never",
                          vxlan_mode="Never", nat_outgoing=False, disabled=False,
                          node_selector="all()", disable_bgp_export=False)
    assert pool.block_count == 1024


def test_every_field_is_read():
    spec = {"cidr": " 10.1.0.0/20 ", "blockSize": 28, "ipipMode": "CrossSubnet",
            "natOutgoing": True, "disabled": True, "nodeSelector": "rack == 'a'",
            "disableBGPExport": True}
    pool = pool_from_spec("p", spec)
    assert (pool.cidr, pool.block_size, pool.ipip_mode, pool.vxlan_mode) == (
        IPv4Network("10.1.0.0/20"), 28, "CrossSubnet", "Never")
    assert pool.nat_outgoing and pool.disabled and pool.disable_bgp_export
    assert pool.selects({"rack": "a"}) and not pool.selects({"rack": "b"})


def test_allowed_uses_and_the_assignment_mode_say_what_assigns_from_a_pool_on_its_own():
    """Calico's allowedUses (Workload: pods, Tunnel: tunnel addresses; none given: both) and
    assignmentMode (Manual: only for requests that name the pool)."""
    base = {"cidr": "10.0.0.0/16"}
    both = pool_from_spec("p", base)
    assert both.allowed_uses == ("Workload", "Tunnel") and both.assignment_mode == "Automatic"
    assert both.serves("Workload", {}) and both.serves("Tunnel", {})
    tunnels = pool_from_spec("p", {**base, "allowedUses": ["Tunnel"]})
    assert tunnels.serves("Tunnel", {}) and not tunnels.serves("Workload", {})
    manual = pool_from_spec("p", {**base, "assignmentMode": "Manual"})
    assert not manual.serves("Workload", {}) and not manual.serves("Tunnel", {})
    for pool in (tunnels, manual, pool_from_spec("p", {**base, "allowedUses": [
            "Tunnel", "Workload"]})):
        assert pool_from_spec("p", pool_to_spec(pool)) == pool
    assert "allowedUses" not in pool_to_spec(both) and "assignmentMode" not in pool_to_spec(both)
    assert not pool_from_spec("p", {**base, "disabled": True}).serves("Workload", {})
    assert not pool_from_spec("p", {**base, "nodeSelector": "rack == 'a'"}).serves("Tunnel", {})
    # namespaceSelector: a pod's namespace's labels (unknown: no match); not for tunnels
    team = pool_from_spec("p", {**base, "namespaceSelector": "team == 'a'"})
    assert team.serves("Workload", {}, {"team": "a"})
    assert not team.serves("Workload", {}, {"team": "b"})
    assert not team.serves("Workload", {}, None)
    # LoadBalancer: services' addresses only, namespaceSelector by the service's namespace
    balancers = pool_from_spec("p", {**base, "allowedUses": ["LoadBalancer"],
                                     "namespaceSelector": "team == 'a'"})
    assert balancers.allowed_uses == ("LoadBalancer",)
    assert pool_from_spec("p", pool_to_spec(balancers)) == balancers
    assert balancers.serves("LoadBalancer", {}, {"team": "a"})
    assert not balancers.serves("LoadBalancer", {}, {"team": "b"})
    assert not balancers.serves("Workload", {}, {"team": "a"})
    assert not balancers.serves("Tunnel", {})
    assert team.serves("Tunnel", {})
    assert pool_from_spec("p", pool_to_spec(team)) == team


@pytest.mark.parametrize("spec, facts", [
    ({"cidr": "10.0.0.1/16"}, ["host bits", "10.0.0.0/16"]),
    ({"cidr": "10.0.0.0"}, ["'10.0.0.0'", "prefix length"]),
    ({"cidr": "banana"}, ["'banana'", "not an IP network"]),
    ({"cidr": "10.0.0.0/33"}, ["not an IP network"]),
    ({"cidr": "fd00::/64"}, ["fd00::/64", "IPv6"]),
    ({"cidr": 10}, ["cidr must be a string"]),
    ({}, ["spec.cidr is required"]),
    ({"cidr": ""}, ["spec.cidr is required"]),
    ({"cidr": "0.0.0.0/0"}, ["0.0.0.0/8"]),
    ({"cidr": "127.1.0.0/16"}, ["loopback"]),
    ({"cidr": "169.254.1.0/24"}, ["link-local"]),
    ({"cidr": "224.0.0.0/3"}, ["multicast"]),
    ({"cidr": "240.0.0.0/8"}, ["reserved"]),
    ({"cidr": "10.0.0.0/16", "blockSize": 19}, ["blockSize 19", "20-32"]),
    ({"cidr": "10.0.0.0/16", "blockSize": 33}, ["blockSize 33", "20-32"]),
    ({"cidr": "10.0.0.0/28", "blockSize": 26}, ["/26", "larger than the pool", "at least 28",
                                                "disable the pool"]),
    ({"cidr": "10.0.0.0/16", "blockSize": "26"}, ["blockSize", "whole number", "'26'"]),
    ({"cidr": "10.0.0.0/16", "blockSize": True}, ["blockSize", "whole number"]),
    ({"cidr": "10.0.0.0/16", "blockSize": 26.0}, ["blockSize", "whole number"]),
    ({"cidr": "10.0.0.0/16", "natOutgoing": "yes"}, ["natOutgoing", "true or false", "'yes'"]),
    ({"cidr": "10.0.0.0/16", "disabled": 1}, ["disabled", "true or false"]),
    ({"cidr": "10.0.0.0/16", "ipipMode": "always"}, ["ipipMode 'always'", "CrossSubnet"]),
    ({"cidr": "10.0.0.0/16", "vxlanMode": "On"}, ["vxlanMode 'On'", "CrossSubnet"]),
    ({"cidr": "10.0.0.0/16", "ipipMode": "Always", "vxlanMode": "CrossSubnet"},
     ["ipipMode and vxlanMode", "choose one"]),
    ({"cidr": "10.0.0.0/16", "natOutgoin": True}, ["unknown spec field 'natOutgoin'",
                                                   "natOutgoing"]),
    ({"cidr": "10.0.0.0/16", "nodeSelector": "rack == "}, ["selector", "rack =="]),
    ({"cidr": "10.0.0.0/16", "nodeSelector": ["a"]}, ["nodeSelector must be a string"]),
    ({"cidr": "10.0.0.0/16", "allowedUses": ["LoadBalancer", "Workload"]},
     ["allowedUses LoadBalancer goes alone"]),
    ({"cidr": "10.0.0.0/16", "allowedUses": ["LoadBalancer"], "ipipMode": "Always"},
     ["LoadBalancer pool carries no pod traffic", "ipipMode must be Never"]),
    ({"cidr": "10.0.0.0/16", "allowedUses": ["LoadBalancer"], "vxlanMode": "CrossSubnet"},
     ["vxlanMode must be Never"]),
    ({"cidr": "10.0.0.0/16", "allowedUses": ["LoadBalancer"], "nodeSelector": "a == 'b'"},
     ["belong to no node", "nodeSelector"]),
    ({"cidr": "10.0.0.0/16", "allowedUses": ["Pods"]}, ["allowedUses 'Pods'",
                                                        "Workload, Tunnel or LoadBalancer"]),
    ({"cidr": "10.0.0.0/16", "allowedUses": "Tunnel"}, ["allowedUses must list"]),
    ({"cidr": "10.0.0.0/16", "assignmentMode": "Auto"}, ["assignmentMode 'Auto'",
                                                        "Automatic, Manual"]),
    ({"cidr": "10.0.0.0/16", "namespaceSelector": "team =="}, ["selector", "team =="]),
])
def test_invalid_specs_are_one_sentence(spec, facts):
    rejected(spec, *facts)


def test_an_empty_encapsulation_mode_means_never():
    pool = pool_from_spec("p", {"cidr": "10.0.0.0/16", "ipipMode": "", "vxlanMode": ""})
    assert (pool.ipip_mode, pool.vxlan_mode) == ("Never", "Never")
    assert pool_from_spec("p", {"cidr": "10.0.0.0/16", "ipipMode": "",
                                "vxlanMode": "Always"}).vxlan_mode == "Always"


def test_nothing_between_prefix_length_and_block_size_is_refused():
    for length in range(20, 33):
        pool = pool_from_spec("p", {"cidr": f"10.0.0.0/{length}", "blockSize": 32})
        assert pool.block_count == 1 << (32 - length)
    assert pool_from_spec("p", {"cidr": "10.0.0.0/8", "blockSize": 20}).block_count == 4096


def test_a_disabled_pool_may_be_smaller_than_a_block_and_counts_as_the_clusters():
    """Calico's way to mark a range as in-cluster (kept out of NAT) without serving it."""
    from ipip.nat import ruleset
    small = pool_from_spec("in-cluster", {"cidr": "10.0.0.0/30", "disabled": True})
    assert (small.block_size, small.block_count, small.capacity) == (26, 0, 0)
    assert list(unclaimed_blocks(small, "n1", set())) == []
    assert pool_from_document(pool_to_document(small)) == small
    rejected({"cidr": "10.0.0.0/30", "disabled": False}, "blockSize /26", "or disable the pool")
    nat = ruleset([pool_from_spec("pods", {"cidr": "10.244.0.0/16", "natOutgoing": True}),
                   small])
    assert "10.0.0.0/30" in nat.split("set all-pools")[1].split("}")[0]


def test_a_pool_may_not_overlap_another_or_change_its_shape():
    a = pool_from_spec("a", {"cidr": "10.0.0.0/16"})
    check_pool_fits(pool_from_spec("b", {"cidr": "10.1.0.0/16"}), [a])
    check_pool_fits(pool_from_spec("a", {"cidr": "10.0.0.0/16", "natOutgoing": True}), [a])
    cases = [
        (pool_from_spec("b", {"cidr": "10.0.128.0/17"}), "overlaps pool 'a' (10.0.0.0/16)"),
        (pool_from_spec("b", {"cidr": "10.0.0.0/8"}), "overlaps pool 'a' (10.0.0.0/16)"),
        (pool_from_spec("a", {"cidr": "10.9.0.0/16"}),
         "cidr cannot change from 10.0.0.0/16 to 10.9.0.0/16"),
        (pool_from_spec("a", {"cidr": "10.0.0.0/16", "blockSize": 24}),
         "blockSize cannot change from 26 to 24"),
    ]
    for pool, fact in cases:
        with pytest.raises(InvalidResource, match=fact.replace("(", r"\(").replace(")", r"\)")):
            check_pool_fits(pool, [a])


def node(name: str, address: str | None):
    from bgp_agent.node import NodeRecord
    return NodeRecord(name, IPv4Interface(address) if address else None)


NODE_IN_POOL = ("a pod could be given it, and the routes to the pool's blocks would take "
                "traffic meant for the node")


@pytest.mark.parametrize("cidr, refused", [
    ("10.99.0.0/24", "cidr 10.99.0.0/24 holds the address of node n2 (10.99.0.12)"),
    ("10.99.0.0/26", "cidr 10.99.0.0/26 holds the address of node n2 (10.99.0.12)"),
    ("10.0.0.0/8", "cidr 10.0.0.0/8 holds the address of node n2 (10.99.0.12)"),
    ("10.99.1.0/24", None),  # the nodes' subnet, but no node's address: routed, not taken
    ("10.244.0.0/16", None),
])
def test_a_new_pool_may_not_hold_a_nodes_address(cidr, refused):
    nodes = [node("n1", None), node("n2", "10.99.0.12/16")]
    pool = pool_from_spec("p", {"cidr": cidr})
    if refused is None:
        check_pool_holds_no_node(pool, [], nodes)
        return
    with pytest.raises(InvalidResource) as error:
        check_pool_holds_no_node(pool, [], nodes)
    one_sentence(error.value, f"IPPool 'p': {refused}: {NODE_IN_POOL}",
                 "choose a cidr that holds no node's address")
    check_pool_holds_no_node(pool, [pool], nodes)  # stored already: its cidr cannot change


@pytest.mark.parametrize("stored, address, refused", [
    (None, "10.244.3.7/24", "its address 10.244.3.7 is inside IPPool 'pods' (10.244.0.0/16)"),
    ("10.99.0.11/24", "10.244.3.7/24", "its address 10.244.3.7 is inside IPPool 'pods'"),
    ("10.244.3.7/24", "10.244.3.7/24", None),  # unchanged: an agent restarting re-registers
    (None, "10.99.0.11/24", None),
    (None, None, None),
])
def test_a_node_address_new_to_the_node_may_not_be_inside_a_pool(stored, address, refused):
    pools = [pool_from_spec("pods", {"cidr": "10.244.0.0/16"})]
    nodes = [node("n1", stored)] if stored else []
    incoming = node("n1", address)
    if refused is None:
        check_node_outside_pools(incoming, nodes, pools)
        return
    with pytest.raises(InvalidResource) as error:
        check_node_outside_pools(incoming, nodes, pools)
    one_sentence(error.value, f"node n1: {refused}", NODE_IN_POOL,
                 "give the node an address outside every pool")


@given(st.integers(0, (1 << 32) - 1), st.integers(8, 32), st.integers(20, 32),
       st.sampled_from([("Never", "Never"), ("Always", "Never"), ("CrossSubnet", "Never"),
                        ("Never", "Always"), ("Never", "CrossSubnet")]), st.booleans())
def test_a_valid_pool_survives_its_document(address, length, block_size, modes, nat):
    cidr = IPv4Network((address, length), strict=False)
    spec = {"cidr": str(cidr), "blockSize": max(block_size, length), "ipipMode": modes[0],
            "vxlanMode": modes[1], "natOutgoing": nat}
    try:
        pool = pool_from_spec("p", spec)
    except InvalidResource as error:  # only the reserved ranges may refuse a well-formed spec
        assert "cannot hold pod addresses" in str(error)
        return
    assert pool_from_document(pool_to_document(pool)) == pool
    assert read_document(pool_to_document(pool)).name == "p"


@given(st.integers(0, (1 << 32) - 1), st.integers(8, 31))
def test_host_bits_suggest_the_network(address, length):
    network = IPv4Network((address, length), strict=False)
    if int(network.network_address) == address:
        return
    text = f"{IPv4Address(address)}/{length}"
    try:
        pool_from_spec("p", {"cidr": text})
    except InvalidResource as error:
        assert f"write it as {network}." in str(error) or "cannot hold pod" in str(error)
    else:
        pytest.fail(f"{text} was accepted")


networks = st.tuples(st.integers(0, (1 << 32) - 1), st.integers(0, 32)).map(
    lambda t: IPv4Network(t, strict=False))


@given(networks, networks)
def test_a_pool_holds_a_prefix_equal_to_or_inside_it(cidr, prefix):
    pool = IPPool("p", cidr)
    assert pool.holds(prefix) == prefix.subnet_of(cidr)
    assert pool.holds(cidr) and pool.holds(IPv4Network((int(cidr.broadcast_address), 32)))
    if cidr.prefixlen:
        assert not pool.holds(cidr.supernet())


def test_blocks_cover_the_pool_once_in_a_node_specific_order():
    pool = pool_from_spec("p", {"cidr": "10.0.0.0/22", "blockSize": 26})
    order_a = list(unclaimed_blocks(pool, "node-a", set()))
    order_b = list(unclaimed_blocks(pool, "node-b", set()))
    assert sorted(order_a) == sorted(order_b) == [pool.block(i) for i in range(16)]
    assert order_a[0] == pool.block(search_start(pool, "node-a"))
    assert order_a != order_b  # different nodes start in different places (for these names)
    taken = set(order_a[:15])
    assert list(unclaimed_blocks(pool, "node-a", taken)) == order_a[15:]
    assert list(unclaimed_blocks(pool, "node-a", set(order_a))) == []


def test_pool_of():
    a = pool_from_spec("a", {"cidr": "10.0.0.0/16", "blockSize": 24})
    b = pool_from_spec("b", {"cidr": "10.1.0.0/16"})
    assert pool_of([a, b], IPv4Address("10.1.2.3")) is b
    assert pool_of([a, b], IPv4Address("10.2.0.0")) is None


# --------------------------------------------------------------------------------------------
# The document envelope


@pytest.mark.parametrize("change, facts", [
    ({"apiVersion": "crd.projectcalico.org/v1"}, ["'crd.projectcalico.org/v1'",
                                                  "'pipit.dev/v1'", "'projectcalico.org/v3'"]),
    ({"apiVersion": "projectcalico.org/v3", "kind": "FelixConfiguration"},
     ["Calico's FelixConfiguration is not a resource Pipit has", "IPPool"]),
    ({"apiVersion": "projectcalico.org/v3", "status": {}, "bogus": 1},
     ["unknown top-level field 'bogus'"]),
    ({"apiVersion": None}, ["apiVersion None"]),
    ({"kind": None}, ["no kind"]),
    ({"metadata": {"name": "Pool_A"}}, ["'Pool_A'", "lower-case"]),
    ({"metadata": {"name": "-a"}}, ["'-a'"]),
    ({"metadata": {"name": "a" * 254}}, ["is not valid"]),
    ({"metadata": {"name": 7}}, ["7 is not valid"]),
    ({"metadata": {}}, ["no metadata.name"]),
    ({"metadata": None}, ["no metadata.name"]),
    ({"metadata": "p"}, ["metadata must be a mapping"]),
    ({"metadata": {"name": "p", "labels": {"a": 1}}}, ["labels must map strings to strings"]),
    ({"spec": ["cidr"]}, ["spec must be a mapping"]),
    ({"status": {}}, ["unknown top-level field 'status'"]),
])
def test_invalid_envelopes_are_one_sentence(change, facts):
    with pytest.raises(InvalidResource) as caught:
        read_document({**DOC, **change})
    one_sentence(caught.value, *facts)


def test_calicos_envelope_leaves_out_its_status_and_resource_version():
    document = read_document({**DOC, "apiVersion": "projectcalico.org/v3", "status": {"x": 1},
                              "metadata": {"name": "p", "resourceVersion": "1043",
                                           "uid": "5b2c7a4e", "creationTimestamp": "2026"}})
    assert (document.kind, document.name, document.resource_version, document.calico) == (
        "IPPool", "p", None, True)


def test_names_may_use_dots_and_dashes_and_labels_are_read():
    document = read_document({**DOC, "metadata": {"name": "pool-1.rack-a",
                                                  "labels": {"tier": "edge"}}})
    assert (document.name, dict(document.labels)) == ("pool-1.rack-a", {"tier": "edge"})
    assert read_document({**DOC, "spec": None}).spec == {}


def test_parse_documents_skips_empty_documents_and_reads_json():
    assert parse_documents("---\n---\na: 1\n---\n") == [{"a": 1}]
    assert parse_documents('{"a": [1, 2]}') == [{"a": [1, 2]}]
    assert parse_documents("") == []


@pytest.mark.parametrize("text, facts", [
    ("a: {b: 1\nc: 2\n", ["not valid YAML", "line 2"]),
    ("a: 1\n  b: 2\n", ["not valid YAML", "line 2"]),
    ("a: 1\n---\n- x\n", ["document 2 is not a mapping"]),
    ("just words", ["document 1 is not a mapping"]),
])
def test_parse_documents_errors_are_one_sentence(text, facts):
    with pytest.raises(InvalidResource) as caught:
        parse_documents(text)
    one_sentence(caught.value, *facts)
