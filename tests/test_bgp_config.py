"""BGPConfiguration: the resource (parsing, Calico's rules, one-sentence refusals) and what the
agent makes of it. Pure: no etcd, no routers (the large community on the wire, to a real
BIRD, is in test_speaker.py)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from bgp_agent import policy
from bgp_agent.bgp_config import (LOG_SEVERITIES, BGPConfig, config_from_spec,
                                  config_to_document, for_node)
from bgp_agent.exabgp_bridge import announce_commands
from bgp_agent.model import Neighbor
from ipam.errors import InvalidResource
from tests.sentences import one_sentence

A = IPv4Address
MESH = Neighbor(A("10.0.0.2"), 64512, A("10.0.0.1"), 64512, kind="mesh", name="b")
TOR = Neighbor(A("10.0.0.254"), 65001, A("10.0.0.1"), 64512, kind="global", name="tor")


def refused(spec: dict, *facts: str) -> str:
    with pytest.raises(InvalidResource) as caught:
        config_from_spec("default", spec)
    # a long value is quoted cut short
    return one_sentence(caught.value, *facts, prefix="BGPConfiguration 'default': ",
                        max_length=299)


def round_trip(config: BGPConfig) -> BGPConfig:
    document = config_to_document(config)
    return config_from_spec(document["metadata"]["name"], document["spec"])


# --------------------------------------------------------------------------------------------
# Communities: standard (RFC 1997) and large (RFC 8092)

def test_large_communities_carry_32_bit_parts_to_every_peer():
    config = config_from_spec("default", {"asNumber": 4200000000, "communities": [
        "64512:100", "4200000000:1:2", "4294967295:4294967295:0"]})
    assert config.communities == ((64512, 100),)
    assert config.large_communities == ((4200000000, 1, 2), (4294967295, 4294967295, 0))
    assert round_trip(config) == config
    prefix = IPv4Network("10.244.0.0/26")
    exports = policy.announcements([prefix], [MESH, TOR], config)
    # to other nodes too, as Calico's export filter: a reflector passes them on to routers
    assert exports[MESH.address][prefix] == exports[TOR.address][prefix]
    sent = exports[TOR.address][prefix]
    assert sent.large_communities == config.large_communities
    [(line, _)] = announce_commands([TOR.address], [sent])
    assert "community [ 64512:100 ]" in line
    assert "large-community [ 4200000000:1:2 4294967295:4294967295:0 ]" in line


@pytest.mark.parametrize("community", [
    "65536:1", "1:65536", "4294967296:1:1", "1:1:4294967296", "1", "1:2:3:4", "a:b", "1::2",
    ":1", 64512, "-1:5",
])
def test_a_community_out_of_range_or_malformed_is_one_sentence(community):
    refused({"communities": [community]}, repr(community), "0-65535", "0-4294967295")


# --------------------------------------------------------------------------------------------
# AS numbers: a number, a quoted number, or asdot, on every kind that holds one

@pytest.mark.parametrize("written, number", [
    (65001, 65001), ("65001", 65001), ("1.10", 65546), ("0.65001", 65001),
    ("4200000000", 4200000000), ("65535.65534", 4294967294), (" 1.0 ", 65536),
])
def test_as_numbers_in_every_form_calico_reads(written, number):
    from bgp_agent.bgp_peer import peer_from_spec
    from bgp_agent.node import node_from_document
    assert config_from_spec("default", {"asNumber": written}).as_number == number
    assert peer_from_spec("tor", {"peerIP": "10.0.0.9", "asNumber": written}).as_number == number
    record = node_from_document({"apiVersion": "pipit.dev/v1", "kind": "Node",
                                 "metadata": {"name": "n1"},
                                 "spec": {"bgp": {"asNumber": written}}})
    assert record.as_number == number
    # stored and shown as the number
    assert config_to_document(config_from_spec("default", {"asNumber": written})
                              )["spec"]["asNumber"] == number


@pytest.mark.parametrize("written, facts", [
    ("1.65536", ["'1.65536' is not an AS number"]), ("1.2.3", ["'1.2.3'"]),
    ("AS64512", ["'AS64512'"]), (1.5, ["1.5"]), (False, ["False"]), ("", ["''"]),
    ("9" * 5000, ["is not an AS number"]), ("4294967295", ["4294967295", "1-4294967294"]),
    ("0.23456", ["AS_TRANS"]),
])
def test_an_as_number_that_is_none_is_one_sentence(written, facts):
    refused({"asNumber": written}, *facts)


def test_the_agent_takes_asdot_too():
    from bgp_agent.agent import node_identity, parse_args
    args = parse_args(["--node", "n1", "--ip", "10.0.0.11/24", "--as", "1.10"])
    assert node_identity(args).as_number == 65546
    with pytest.raises(InvalidResource, match=r"--as: the AS number '1\.x' is not an AS number"):
        node_identity(parse_args(["--node", "n1", "--ip", "10.0.0.11/24", "--as", "1.x"]))


# --------------------------------------------------------------------------------------------
# Times: whole seconds, or durations as Calico writes them

@pytest.mark.parametrize("written, seconds", [
    (90, 90), ("90s", 90), ("2m", 120), ("1m30s", 90), ("0", 0), ("0s", 0), ("1h", 3600),
    ("1500ms", None), ("4095s", 4095), (".5m", 30),
])
def test_times_take_seconds_or_durations(written, seconds):
    from bgp_agent.bgp_peer import peer_from_spec
    fields = {"nodeMeshMaxRestartTime": written}
    if seconds is None:  # not whole seconds
        refused(fields, "nodeMeshMaxRestartTime '1500ms' is not a whole number of seconds")
        return
    assert config_from_spec("default", fields).node_mesh_restart_time == seconds
    if seconds == 0 or seconds >= 3:
        assert config_from_spec("default", {"nodeMeshHoldTime": written}
                                ).node_mesh_hold_time == seconds
        peer = peer_from_spec("tor", {"peerIP": "10.0.0.9", "asNumber": 65001,
                                      "holdTime": written, "maxRestartTime": written})
        assert (peer.hold_time, peer.restart_time) == (seconds, seconds)


@pytest.mark.parametrize("written, facts", [
    ("90", ["'90'", "whole seconds or a duration such as '90s'"]), ("-5s", ["'-5s'"]),
    ("5 s", ["'5 s'"]), ("1d", ["'1d'"]), (1.5, ["1.5"]), (True, ["True"]),
    ("1.5s", ["not a whole number of seconds"]), ("2h", ["7200", "0-4095"]),
])
def test_a_time_that_is_none_is_one_sentence(written, facts):
    refused({"nodeMeshMaxRestartTime": written}, *facts)


# --------------------------------------------------------------------------------------------
# Mesh settings without a mesh

def test_mesh_settings_while_the_mesh_is_off_are_refused_on_input_only():
    from bgp_agent.bgp_config import check_config_input
    for field, value in (("nodeMeshMaxRestartTime", "60s"), ("nodeMeshHoldTime", "60s"),
                         ("nodeMeshPassword", {"file": "/etc/pipit/mesh"})):
        spec = {"nodeToNodeMeshEnabled": False, field: value}
        with pytest.raises(InvalidResource, match=f"{field} cannot be set when "
                                                  "nodeToNodeMeshEnabled is false"):
            check_config_input(spec)
        # an agent still reads such a stored configuration (an older pipitctl wrote them)
        assert config_from_spec("default", spec).node_to_node_mesh is False
    check_config_input({"nodeToNodeMeshEnabled": True, "nodeMeshMaxRestartTime": 60})
    check_config_input({"nodeMeshMaxRestartTime": 60})
    # what pipitctl writes and shows passes its own rule
    off = config_from_spec("default", {"nodeToNodeMeshEnabled": False})
    document = config_to_document(off)
    check_config_input(document["spec"])
    assert round_trip(off) == off


# --------------------------------------------------------------------------------------------
# nodeMeshPassword: TCP MD5 on every mesh session (Calico's field)

@pytest.mark.parametrize("where", [{"secretKeyRef": {"name": "bgp", "key": "mesh"}},
                                   {"file": "/etc/pipit/mesh.secret"}])
def test_the_mesh_password_says_where_it_is_and_survives_the_document(where):
    from bgp_agent.md5_password import PasswordRef
    config = config_from_spec("default", {"nodeMeshPassword": where})
    assert isinstance(config.node_mesh_password, PasswordRef)
    assert config_to_document(config)["spec"]["nodeMeshPassword"] == where
    assert round_trip(config) == config
    assert "nodeMeshPassword" not in config_to_document(config_from_spec("default", {}))["spec"]


@pytest.mark.parametrize("written, facts", [
    ("s3cret", ["nodeMeshPassword must not be written into the resource", "secretKeyRef"]),
    ({"file": "relative/path"}, ["nodeMeshPassword file 'relative/path'", "absolute path"]),
    ({"secretKeyRef": {"name": "Bad_Name", "key": "k"}}, ["nodeMeshPassword", "'Bad_Name'"]),
    ({"env": "X"}, ["nodeMeshPassword must say where the password is"]),
])
def test_a_mesh_password_that_is_none_is_one_sentence(written, facts):
    refused({"nodeMeshPassword": written}, *facts)


# --------------------------------------------------------------------------------------------
# Service ranges (Calico's serviceClusterIPs, serviceExternalIPs, serviceLoadBalancerIPs)

def test_service_ranges_go_to_external_peers_only_and_survive_the_document():
    config = config_from_spec("default", {
        "serviceClusterIPs": [{"cidr": "10.96.0.0/12"}],
        "serviceExternalIPs": [{"cidr": "198.51.100.0/24"}, {"cidr": "10.96.0.0/12"}],
        "serviceLoadBalancerIPs": [{"cidr": "203.0.113.8/29"}]})
    assert config.service_prefixes == (IPv4Network("10.96.0.0/12"),
                                       IPv4Network("198.51.100.0/24"),
                                       IPv4Network("203.0.113.8/29"))
    assert round_trip(config) == config
    assert config_to_document(config)["spec"]["serviceExternalIPs"] == [
        {"cidr": "198.51.100.0/24"}, {"cidr": "10.96.0.0/12"}]
    block = IPv4Network("10.244.0.0/26")
    exports = policy.announcements([block], [MESH, TOR], config, config.service_prefixes)
    assert set(exports[MESH.address]) == {block}
    assert set(exports[TOR.address]) == {block, *config.service_prefixes}
    assert exports[TOR.address][IPv4Network("10.96.0.0/12")].communities == config.communities
    assert "serviceClusterIPs" not in config_to_document(config_from_spec("default", {}))["spec"]


@pytest.mark.parametrize("written, facts", [
    ("10.96.0.0/12", ["serviceClusterIPs must be a list such as [{cidr: 10.96.0.0/12}]"]),
    (["10.96.0.0/12"], ["serviceClusterIPs must be a list", "'10.96.0.0/12'"]),
    ([{"cidr": "10.96.0.1/12"}], ["serviceClusterIPs: 10.96.0.1/12 has host bits set",
                                  "10.96.0.0/12"]),
    ([{"cidr": "fd00::/108"}], ["fd00::/108 is IPv6"]),
    ([{"cidr": "ten/12"}], ["'ten/12' is not a CIDR"]),
    ([{"cidr": "10.96.0.0/12", "name": "x"}], ["is not one {cidr: ...}"]),
])
def test_a_service_range_that_is_none_is_one_sentence(written, facts):
    refused({"serviceClusterIPs": written}, *facts)


def test_every_node_announces_ranges_but_not_single_addresses_or_disaggregated_balancers():
    """As Calico: a /32 of serviceExternalIPs or serviceLoadBalancerIPs goes per service
    (bgp_agent.service_addresses), and with serviceLoadBalancerAggregation Disabled so does
    every load-balancer IP; a /32 of serviceClusterIPs is a range like any other. Routes inside
    any of them are still refused from peers (service_prefixes)."""
    spec = {"serviceClusterIPs": [{"cidr": "10.96.0.0/12"}, {"cidr": "10.112.0.1/32"}],
            "serviceExternalIPs": [{"cidr": "198.51.100.0/24"}, {"cidr": "192.0.2.7/32"}],
            "serviceLoadBalancerIPs": [{"cidr": "203.0.113.0/24"}, {"cidr": "192.0.2.9/32"}]}
    config = config_from_spec("default", spec)
    assert config.aggregate_balancers
    assert config.announced_service_ranges == tuple(IPv4Network(p) for p in (
        "10.96.0.0/12", "10.112.0.1/32", "198.51.100.0/24", "203.0.113.0/24"))
    assert len(config.service_prefixes) == 6
    assert "serviceLoadBalancerAggregation" not in config_to_document(config)["spec"]
    disaggregated = config_from_spec("default", {**spec,
                                                 "serviceLoadBalancerAggregation": "Disabled"})
    assert not disaggregated.aggregate_balancers
    assert disaggregated.announced_service_ranges == tuple(IPv4Network(p) for p in (
        "10.96.0.0/12", "10.112.0.1/32", "198.51.100.0/24"))
    assert disaggregated.service_prefixes == config.service_prefixes
    assert round_trip(disaggregated) == disaggregated
    assert config_to_document(disaggregated)["spec"]["serviceLoadBalancerAggregation"] == \
        "Disabled"
    assert config_from_spec("default", {"serviceLoadBalancerAggregation": "Enabled"}) == \
        config_from_spec("default", {})


def test_an_aggregation_that_is_none_is_one_sentence():
    refused({"serviceLoadBalancerAggregation": "Off"},
            "serviceLoadBalancerAggregation 'Off' is not one of Enabled, Disabled")


# --------------------------------------------------------------------------------------------
# prefixAdvertisements and named communities (Calico's form)

def test_prefix_advertisements_add_communities_to_the_prefixes_they_hold():
    config = config_from_spec("default", {
        "communities": ["64512:100", {"name": "rack-a", "value": "4200000000:1:2"}],
        "prefixAdvertisements": [{"cidr": "10.244.0.0/16", "communities": ["rack-a"]},
                                 {"cidr": "10.244.8.0/24", "communities": ["64512:120"]}]})
    assert round_trip(config) == config
    assert config.communities == ((64512, 100),)  # a named community goes nowhere by itself
    inside, deeper, outside = (IPv4Network(p) for p in (
        "10.244.1.0/26", "10.244.8.64/26", "10.96.0.0/12"))
    assert config.communities_for(inside) == (((64512, 100),), ((4200000000, 1, 2),))
    assert config.communities_for(deeper) == (((64512, 100), (64512, 120)),
                                              ((4200000000, 1, 2),))
    assert config.communities_for(outside) == (((64512, 100),), ())
    exports = policy.announcements([inside, outside], [MESH, TOR], config)
    assert exports[TOR.address][inside].large_communities == ((4200000000, 1, 2),)
    assert exports[MESH.address][inside] == exports[TOR.address][inside]  # every peer


@pytest.mark.parametrize("spec, facts", [
    ({"communities": [{"name": "a"}]}, ["is either a value such as '64512:100' or {name, value}"]),
    ({"communities": [{"name": "A_b", "value": "1:2"}]}, ["community name 'A_b'"]),
    ({"communities": [{"name": "a", "value": "1:2"}, {"name": "a", "value": "1:3"}]},
     ["community name 'a' is given twice"]),
    ({"communities": [{"name": "a", "value": "70000:1"}]}, ["'70000:1'", "0-65535"]),
    ({"prefixAdvertisements": {"cidr": "10.0.0.0/8"}}, ["prefixAdvertisements must be a list"]),
    ({"prefixAdvertisements": [{"cidr": "10.0.0.0/8", "communities": []}]},
     ["at least one community"]),
    ({"prefixAdvertisements": [{"cidr": "10.0.0.1/8", "communities": ["1:2"]}]},
     ["10.0.0.1/8 has host bits set", "10.0.0.0/8"]),
    ({"prefixAdvertisements": [{"cidr": "10.0.0.0/8", "communities": ["nosuch"]}]},
     ["community 'nosuch' for 10.0.0.0/8 is neither a name given in communities"]),
])
def test_a_bad_prefix_advertisement_or_named_community_is_one_sentence(spec, facts):
    refused(spec, *facts)


def test_log_severity_screen_takes_calicos_levels_and_survives_the_document():
    config = config_from_spec("default", {"logSeverityScreen": "Info"})
    assert config.log_severity == "Info"
    assert config_from_spec("default", dict(config_to_document(config)["spec"])) == config
    assert config_from_spec("default", {}).log_severity is None
    # in any case, as Calico's pattern; Trace is Debug's level (Python has none finer)
    assert [config_from_spec("default", {"logSeverityScreen": s}).log_severity
            for s in ("info", "WARNING", "trace")] == ["Info", "Warning", "Trace"]
    assert LOG_SEVERITIES["Trace"] == LOG_SEVERITIES["Debug"] == "DEBUG"
    with pytest.raises(InvalidResource) as error:
        config_from_spec("default", {"logSeverityScreen": "verbose"})
    one_sentence(str(error.value), "logSeverityScreen 'verbose'", "Debug, Info, Warning")


@pytest.mark.parametrize("spec, facts", [
    ({"ignoredInterfaces": ["eth9"]}, ["ignoredInterfaces is not supported", "no device routes"]),
    ({"localWorkloadPeeringIPV4": "169.254.0.179"},
     ["localWorkloadPeeringIPV4 is not supported", "does not peer with workloads"]),
    ({"programClusterRoutes": "Enabled"}, ["programClusterRoutes is not supported",
                                           "programs every route"]),
    ({"ipv4NormalRoutePriority": 1024}, ["ipv4NormalRoutePriority is not supported"]),
])
def test_calicos_fields_pipit_does_not_do_are_refused_saying_why(spec, facts):
    refused(spec, *facts)
    with pytest.raises(InvalidResource, match="is not supported"):  # a node's, the same way
        config_from_spec("node.n1", spec)
    assert config_from_spec("default", {"ignoredInterfaces": []}) == BGPConfig()  # empty: none


def test_bind_mode_node_ip_is_pipit_s_way_and_none_is_one_sentence():
    """Calico's bindMode: NodeIP, listening on the node's address only, is what Pipit's
    sessions do (ExaBGP listens on each session's local address); None (every address) is
    refused rather than silently not done."""
    config = config_from_spec("default", {"bindMode": "NodeIP"})
    assert config.bind_node_ip and round_trip(config) == config
    assert config_to_document(config)["spec"]["bindMode"] == "NodeIP"
    assert "bindMode" not in config_to_document(config_from_spec("default", {}))["spec"]
    refused({"bindMode": "None"}, "bindMode 'None' is not supported",
            "the node's address only (NodeIP)")


def test_a_node_specific_configuration_sets_that_nodes_log_level_and_port():
    """Calico's node.<node name> BGPConfiguration: Pipit takes its logSeverityScreen (the
    agent's routing loop prefers it over the default's) and listenPort (test_policy: where
    the node listens and the others connect); the cluster's fields are refused."""
    node = config_from_spec("node.n1", {"logSeverityScreen": "Debug", "listenPort": 1179})
    assert (node.name, node.node, node.log_severity, node.listen_port) == (
        "node.n1", "n1", "Debug", 1179)
    assert config_from_spec("node.n1", config_to_document(node)["spec"]) == node
    assert config_to_document(config_from_spec("node.n1", {}))["spec"] == {}
    assert config_from_spec("default", {}).name == "default"
    with pytest.raises(InvalidResource, match="asNumber is the cluster's"):
        config_from_spec("node.n1", {"asNumber": 65001, "logSeverityScreen": "Info"})
    with pytest.raises(InvalidResource, match="'N_1' is not a valid node name"):
        config_from_spec("node.N_1", {})


def test_a_nodes_prefix_advertisements_replace_the_defaults_for_that_node():
    """Calico's rule: a node.<name> configuration's prefixAdvertisements, with the named
    communities they use (its own), are that node's in place of the default's, even an
    empty list; the cluster's communities on every export stay; not given, the default's."""
    default = config_from_spec("default", {
        "communities": ["64512:100", {"name": "svc", "value": "64512:200"}],
        "prefixAdvertisements": [{"cidr": "10.96.0.0/12", "communities": ["svc"]}]})
    node = config_from_spec("node.n1", {
        "communities": [{"name": "rack", "value": "4200000000:1:2"}],
        "prefixAdvertisements": [{"cidr": "10.244.0.0/16", "communities": ["rack", "64512:9"]}]})
    assert config_from_spec("node.n1", config_to_document(node)["spec"]) == node
    block, services = IPv4Network("10.244.1.0/26"), IPv4Network("10.96.0.0/12")
    mine = for_node(default, node)
    assert mine.communities_for(block) == (((64512, 100), (64512, 9)), ((4200000000, 1, 2),))
    assert mine.communities_for(services) == (((64512, 100),), ())  # the default's: not n1's
    exports = policy.announcements([block], [MESH, TOR], mine, [services])
    assert exports[TOR.address][block].large_communities == ((4200000000, 1, 2),)
    assert exports[MESH.address][block] == exports[TOR.address][block]
    none = config_from_spec("node.n1", {"prefixAdvertisements": []})
    assert none.prefix_advertisements == () and round_trip(none) == none
    assert for_node(default, none).communities_for(services) == (((64512, 100),), ())
    for own in (None, config_from_spec("node.n1", {"logSeverityScreen": "Debug"})):
        assert for_node(default, own) == default
        assert for_node(default, own).communities_for(services) == (
            ((64512, 100), (64512, 200)), ())


@pytest.mark.parametrize("spec, facts", [
    ({"communities": ["64512:1"], "prefixAdvertisements": []},
     ["a node's communities only name values for its prefixAdvertisements",
      "communities on every export are the cluster's"]),
    ({"communities": [{"name": "rack", "value": "64512:1"}]},
     ["communities are named but no prefixAdvertisements uses them"]),
    ({"prefixAdvertisements": [{"cidr": "10.244.0.0/16", "communities": ["svc"]}]},
     ["community 'svc' for 10.244.0.0/16 is neither a name given in communities"]),
])
def test_a_bad_node_prefix_advertisement_is_one_sentence(spec, facts):
    with pytest.raises(InvalidResource) as caught:
        config_from_spec("node.n1", spec)
    one_sentence(caught.value, *facts, prefix="BGPConfiguration 'node.n1': ")
