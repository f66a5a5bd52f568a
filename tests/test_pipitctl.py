"""pipitctl as users run it: the real console script in a subprocess against a real etcd.

Every refusal must be ONE sentence on stderr (`Error: ... .`), a non-zero exit, no traceback,
and etcd left exactly as it was (every key under /pipit/ with the same value and the same
mod_revision, so not even an identical rewrite slipped through).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import tempfile
import threading
from ipaddress import IPv4Network

import pytest
import yaml

from ipam import block as blocks
from ipam import handle as handles
from ipam import keys
from ipam.snapshot import load_snapshot
from ipam.store import ENV_CA, ENV_CERT, ENV_KEY, EtcdConfig
from lab.etcd import EtcdServer, free_port, make_tls_files
from tests.helpers import add_pool, with_store
from tests.pipitctl_support import assign, ok, pipitctl, pool_yaml, put, snapshot, stream
from tests.sentences import one_sentence


@pytest.fixture
def existing(etcd) -> EtcdConfig:
    """etcd holding one pool, 'existing', 10.244.0.0/16 with blockSize 26."""
    with_store(etcd, lambda store: add_pool(store, "existing", "10.244.0.0/16"))
    return etcd


# --------------------------------------------------------------------------------------------
# 1. Every IPPool rejection: one sentence, non-zero exit, etcd unchanged

ENVELOPE = "apiVersion: pipit.dev/v1\nkind: IPPool\nmetadata: {name: new}\n"

REJECTIONS = [
    ("host-bits", pool_yaml(cidr="10.245.0.1/16"),
     ["'new'", "10.245.0.1/16", "host bits", "10.245.0.0/16"]),
    ("overlap", pool_yaml(cidr="10.244.128.0/17"),
     ["10.244.128.0/17", "overlaps pool 'existing'", "10.244.0.0/16"]),
    ("overlap-superset", pool_yaml(cidr="10.0.0.0/8"), ["overlaps pool 'existing'"]),
    ("link-local", pool_yaml(cidr="169.254.0.0/16"), ["169.254.0.0/16", "link-local"]),
    ("link-local-inside", pool_yaml(cidr="169.254.64.0/20"), ["link-local"]),
    ("loopback", pool_yaml(cidr="127.0.0.0/16"), ["127.0.0.0/16", "loopback"]),
    ("multicast", pool_yaml(cidr="239.1.0.0/16"), ["239.1.0.0/16", "multicast"]),
    ("block-larger-than-pool", pool_yaml(cidr="10.50.0.0/24", blockSize=22),
     ["blockSize /22", "10.50.0.0/24", "at least 24"]),
    ("block-size-19", pool_yaml(cidr="10.50.0.0/16", blockSize=19), ["blockSize 19", "20-32"]),
    ("block-size-33", pool_yaml(cidr="10.50.0.0/16", blockSize=33), ["blockSize 33", "20-32"]),
    ("ipip-mode", pool_yaml(cidr="10.50.0.0/16", ipipMode="always"),
     ["ipipMode 'always'", "Never, Always, CrossSubnet"]),
    ("vxlan-mode", pool_yaml(cidr="10.50.0.0/16", vxlanMode="Sometimes"),
     ["vxlanMode 'Sometimes'", "Never, Always, CrossSubnet"]),
    ("both-encapsulations", pool_yaml(cidr="10.50.0.0/16", ipipMode="CrossSubnet",
                                      vxlanMode="Always"),
     ["ipipMode and vxlanMode", "choose one"]),
    ("unknown-field", pool_yaml(cidr="10.50.0.0/16", natOutgoin=True),
     ["unknown spec field 'natOutgoin'", "natOutgoing"]),
    ("block-size-string", pool_yaml(cidr="10.50.0.0/16", blockSize="26"),
     ["blockSize must be a whole number", "'26'"]),
    ("nat-outgoing-string", pool_yaml(cidr="10.50.0.0/16", natOutgoing="yes"),
     ["natOutgoing must be true or false", "'yes'"]),
    ("ipv6", pool_yaml(cidr="fd00:10::/64"), ["fd00:10::/64", "IPv6"]),
    ("missing-cidr", pool_yaml(blockSize=26), ["'new'", "spec.cidr is required"]),
    ("no-prefix-length", pool_yaml(cidr="10.50.0.0"), ["'10.50.0.0'", "prefix length"]),
    ("not-a-network", pool_yaml(cidr="ten.fifty/16"), ["'ten.fifty/16'", "not an IP network"]),
    ("bad-name", pool_yaml("Pool_A", cidr="10.50.0.0/16"), ["'Pool_A'", "lower-case"]),
    ("no-name", "apiVersion: pipit.dev/v1\nkind: IPPool\nspec: {cidr: 10.50.0.0/16}\n",
     ["no metadata.name"]),
    ("api-version", ENVELOPE.replace("pipit.dev/v1", "pipit.dev/v2")
     + "spec: {cidr: 10.50.0.0/16}\n", ["'pipit.dev/v2'", "'pipit.dev/v1'"]),
    ("unknown-kind", ENVELOPE.replace("IPPool", "NetworkPolicy") + "spec: {}\n",
     ["'NetworkPolicy'", "ippools"]),
    ("invalid-yaml", ENVELOPE + "spec: {cidr: 10.50.0.0/16\n", ["not valid YAML", "line"]),
    ("not-a-mapping", "- cidr: 10.50.0.0/16\n", ["not a mapping"]),
    ("empty-input", "# nothing here\n", ["no resources"]),
    ("bad-selector", pool_yaml(cidr="10.50.0.0/16", nodeSelector="rack == "),
     ["'new'", "selector", "rack =="]),
    ("change-cidr", pool_yaml("existing", cidr="10.248.0.0/16"),
     ["'existing'", "cidr cannot change from 10.244.0.0/16 to 10.248.0.0/16"]),
    ("change-block-size", pool_yaml("existing", cidr="10.244.0.0/16", blockSize=24),
     ["'existing'", "blockSize cannot change from 26 to 24"]),
]


@pytest.mark.parametrize("text, facts", [r[1:] for r in REJECTIONS], ids=[r[0] for r in REJECTIONS])
def test_invalid_pool_is_refused_in_one_sentence_and_nothing_is_written(existing, ctl, text,
                                                                       facts):
    before = snapshot(existing)
    result = ctl("apply", "-f", "-", input=text)
    one_sentence(result, *facts)
    assert result.stdout == ""
    assert snapshot(existing) == before


@pytest.mark.parametrize("name", ["host-bits", "overlap", "unknown-field", "invalid-yaml"])
def test_create_refuses_the_same_way(existing, ctl, name):
    [(text, facts)] = [r[1:] for r in REJECTIONS if r[0] == name]
    before = snapshot(existing)
    result = ctl("create", "-f", "-", input=text)
    one_sentence(result, *facts)
    assert result.stdout == ""
    assert snapshot(existing) == before


@pytest.mark.parametrize("second, facts", [
    (pool_yaml("second", cidr="10.61.0.0/16", blockSize=2), ["blockSize 2"]),
    (pool_yaml("second", cidr="10.60.16.0/20"), ["overlaps pool 'first'"]),
    (pool_yaml("existing", cidr="10.9.0.0/16"), ["'existing'", "cidr cannot change"]),
    ("apiVersion: v1\nkind: IPPool\nmetadata: {name: second}\n", ["apiVersion 'v1'"]),
], ids=["invalid-spec", "overlaps-the-first", "changes-a-stored-pool", "bad-envelope"])
def test_a_bad_second_document_writes_nothing_not_even_the_first(existing, ctl, tmp_path,
                                                                 second, facts):
    path = tmp_path / "pools.yaml"
    path.write_text(stream(pool_yaml("first", cidr="10.60.0.0/16"), second))
    before = snapshot(existing)
    result = ctl("apply", "-f", str(path))
    one_sentence(result, "document 2", *facts)
    assert snapshot(existing) == before
    assert keys.pool_key("first") not in before


def test_an_unreadable_file_is_one_sentence(ctl, tmp_path):
    one_sentence(ctl("apply", "-f", str(tmp_path / "missing.yaml")), "missing.yaml",
                 "No such file")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(ENVELOPE.replace("new", "caf\xe9").encode("latin-1")
                       + b"spec: {cidr: 10.9.0.0/16}\n")
    one_sentence(ctl("apply", "-f", str(latin1)), str(latin1), "not UTF-8")


# --------------------------------------------------------------------------------------------
# 2. apply / create / get / delete


def test_create_then_create_again_fails(etcd, ctl, tmp_path):
    path = tmp_path / "pool.yaml"
    path.write_text(pool_yaml("web", cidr="10.70.0.0/16"))
    assert ok(ctl("create", "-f", str(path))) == "ippool 'web' created\n"
    before = snapshot(etcd)
    one_sentence(ctl("create", "-f", str(path)), "ippool 'web' already exists", "pipitctl apply")
    assert snapshot(etcd) == before
    # Nor does a file that also holds a new pool write that one.
    path.write_text(stream(pool_yaml("api", cidr="10.71.0.0/16"),
                           pool_yaml("web", cidr="10.70.0.0/16")))
    one_sentence(ctl("create", "-f", str(path)), "document 2", "'web' already exists")
    assert snapshot(etcd) == before


def test_apply_reports_created_unchanged_configured(etcd, ctl, tmp_path):
    path = tmp_path / "pools.yaml"
    documents = [pool_yaml("a", cidr="10.80.0.0/16"), pool_yaml("b", cidr="10.81.0.0/24",
                                                                 blockSize=28)]
    path.write_text(stream(*documents))
    assert ok(ctl("apply", "-f", str(path))) == "ippool 'a' created\nippool 'b' created\n"
    before = snapshot(etcd)
    assert ok(ctl("apply", "-f", str(path))) == "ippool 'a' unchanged\nippool 'b' unchanged\n"
    assert snapshot(etcd) == before  # "unchanged" really wrote nothing

    # Spelling out the defaults changes nothing either.
    spelled = pool_yaml("a", cidr="10.80.0.0/16", blockSize=26, ipipMode="Never",
                        natOutgoing=False, nodeSelector="all()")
    assert ok(ctl("apply", "-f", "-", input=spelled)) == "ippool 'a' unchanged\n"

    changed = pool_yaml("a", cidr="10.80.0.0/16", ipipMode="CrossSubnet", natOutgoing=True,
                        nodeSelector="rack == 'r1'")
    assert ok(ctl("apply", "-f", "-", input=changed)) == "ippool 'a' configured\n"
    after = snapshot(etcd)
    assert after[keys.pool_key("b")] == before[keys.pool_key("b")]
    spec = after[keys.pool_key("a")][1]["spec"]
    assert (spec["ipipMode"], spec["natOutgoing"], spec["nodeSelector"]) == (
        "CrossSubnet", True, "rack == 'r1'")


def test_get_table_wide_yaml_json_and_the_output_applies_back_unchanged(etcd, ctl):
    ok(ctl("apply", "-f", "-", input=stream(
        pool_yaml("zeta", cidr="10.90.0.0/16", ipipMode="Always", natOutgoing=True),
        pool_yaml("alpha", cidr="10.91.0.0/24", blockSize=28, vxlanMode="CrossSubnet",
                  disabled=True, nodeSelector="has(edge)", disableBGPExport=True))))

    table = ok(ctl("get", "ippools")).splitlines()
    assert [line.split() for line in table] == [
        ["NAME", "CIDR", "SELECTOR"],
        ["alpha", "10.91.0.0/24", "has(edge)"],
        ["zeta", "10.90.0.0/16", "all()"],
    ]
    assert table[1].index("10.91") == table[0].index("CIDR")  # aligned columns

    wide = ok(ctl("get", "ippools", "-o", "wide")).splitlines()
    assert [line.split() for line in wide] == [
        ["NAME", "CIDR", "BLOCKSIZE", "NAT", "IPIPMODE", "VXLANMODE", "DISABLED",
         "DISABLEBGPEXPORT", "SELECTOR", "ALLOWEDUSES", "ASSIGNMENTMODE"],
        ["alpha", "10.91.0.0/24", "28", "false", "Never", "CrossSubnet", "true", "true",
         "has(edge)", "Workload,Tunnel", "Automatic"],
        ["zeta", "10.90.0.0/16", "26", "true", "Always", "Never", "false", "false", "all()",
         "Workload,Tunnel", "Automatic"],
    ]

    as_yaml = ok(ctl("get", "ippools", "-o", "yaml"))
    documents = list(yaml.safe_load_all(as_yaml))
    assert [d["metadata"]["name"] for d in documents] == ["alpha", "zeta"]
    assert documents[0]["spec"] == {
        "cidr": "10.91.0.0/24", "blockSize": 28, "ipipMode": "Never",
        "vxlanMode": "CrossSubnet", "natOutgoing": False, "disabled": True,
        "nodeSelector": "has(edge)", "disableBGPExport": True}

    as_json = json.loads(ok(ctl("get", "ippools", "-o", "json")))
    assert as_json["kind"] == "List" and as_json["items"] == documents
    one = json.loads(ok(ctl("get", "ippool", "zeta", "-o", "json")))
    assert one == documents[1]

    before = snapshot(etcd)
    for text in (as_yaml, json.dumps(as_json), json.dumps(one)):
        out = ok(ctl("apply", "-f", "-", input=text))
        assert out.splitlines() and all(line.endswith(" unchanged")
                                        for line in out.splitlines()), out
    assert snapshot(etcd) == before


CALICOCTL_OUTPUT = """\
apiVersion: projectcalico.org/v3
items:
- apiVersion: projectcalico.org/v3
  kind: IPPool
  metadata:
    creationTimestamp: "2026-05-02T10:11:12Z"
    name: default-ipv4-ippool
    resourceVersion: "1043"
    uid: 5b2c7a4e-1f0d-4a51-9d55-0c1b2a3d4e5f
  spec:
    allowedUses:
    - Workload
    - Tunnel
    blockSize: 26
    cidr: 10.244.0.0/16
    ipipMode: Always
    natOutgoing: true
    nodeSelector: all()
    vxlanMode: Never
kind: IPPoolList
metadata:
  resourceVersion: "1100"
---
apiVersion: projectcalico.org/v3
kind: BGPConfiguration
metadata: {name: default, resourceVersion: "7"}
spec: {asNumber: 64512, logSeverityScreen: Info, nodeToNodeMeshEnabled: false}
---
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata: {name: rack1-tor, resourceVersion: "55"}
spec: {asNumber: 64513, nodeSelector: "rack == 'rack-1'", peerIP: 10.99.0.1}
---
apiVersion: projectcalico.org/v3
kind: Node
metadata:
  annotations:
    projectcalico.org/kube-labels: '{"kubernetes.io/hostname":"w1"}'
  labels: {kubernetes.io/hostname: w1, route-reflector: "true"}
  name: w1
  resourceVersion: "987"
spec:
  addresses:
  - {address: 10.99.0.11/24, type: CalicoNodeIP}
  - {address: 10.99.0.11, type: InternalIP}
  bgp:
    ipv4Address: 10.99.0.11/24
    ipv4IPIPTunnelAddr: 10.244.190.128
    routeReflectorClusterID: 244.0.0.1
  ipv4VXLANTunnelAddr: 10.244.190.129
  vxlanTunnelMACAddr: 66:1f:4b:2a:7c:01
  orchRefs:
  - {nodeName: w1, orchestrator: k8s}
status:
  podCIDRs: [10.244.1.0/24]
"""


def test_calicos_documents_as_calicoctl_prints_them_apply(etcd, ctl):
    """A cluster moving from Calico pipes `calicoctl get ... -o yaml` into `pipitctl apply`:
    Calico's apiVersion, its List, what its datastore set (status, a resourceVersion of its
    own, uid) and what calico-node wrote about its host (addresses, the tunnel addresses of
    Calico's IPAM) are taken or left out; what is stored is Pipit's."""
    assert ok(ctl("apply", "-f", "-", input=CALICOCTL_OUTPUT)).splitlines() == [
        "ippool 'default-ipv4-ippool' created", "bgpconfiguration 'default' created",
        "bgppeer 'rack1-tor' created", "node 'w1' created"]
    before = snapshot(etcd)
    assert ok(ctl("apply", "-f", "-", input=CALICOCTL_OUTPUT)).count(" unchanged") == 4
    assert snapshot(etcd) == before
    pool = before[keys.pool_key("default-ipv4-ippool")][1]
    assert pool["apiVersion"] == "pipit.dev/v1"
    assert (pool["spec"]["ipipMode"], pool["spec"]["natOutgoing"]) == ("Always", True)
    node = yaml.safe_load(ok(ctl("get", "node", "w1", "-o", "yaml")))
    assert node["apiVersion"] == "pipit.dev/v1"
    assert node["spec"]["bgp"] == {"ipv4Address": "10.99.0.11/24",
                                   "routeReflectorClusterID": "244.0.0.1"}
    assert "ipv4VXLANTunnelAddr" not in node["spec"] and "addresses" not in node["spec"]
    assert node["metadata"]["labels"]["route-reflector"] == "true"
    # Calico's resources Pipit has no counterpart of: one sentence, nothing written
    felix = ("apiVersion: projectcalico.org/v3\nkind: FelixConfiguration\n"
             "metadata: {name: default}\nspec: {bpfEnabled: false}\n")
    one_sentence(ctl("apply", "-f", "-", input=stream(CALICOCTL_OUTPUT.replace(
        "10.244.0.0/16", "10.245.0.0/16"), felix)),
        "Calico's FelixConfiguration is not a resource Pipit has", "IPPool")
    one_sentence(ctl("apply", "-f", "-", input=ENVELOPE.replace(
        "pipit.dev/v1", "crd.projectcalico.org/v1") + "spec: {cidr: 10.50.0.0/16}\n"),
        "apiVersion 'crd.projectcalico.org/v1'", "'projectcalico.org/v3'")
    assert snapshot(etcd) == before


def test_a_node_applied_over_its_running_agents_record_keeps_what_the_agent_wrote(etcd, ctl):
    """Applying a Node to set its labels or cluster id (a Calico document, or one written by
    hand) leaves out the address, tunnel addresses, Kubernetes Node and version its agent
    wrote: they stay, or the other nodes would drop their sessions and tunnels to it until
    the agent wrote them again. What the document does say is taken."""
    from ipaddress import IPv4Address, ip_interface

    from bgp_agent.node import NodeRecord, register, set_tunnel_fields
    from bgp_agent.version import software_version

    async def running_agent(store):
        await register(store, NodeRecord("w1", ip_interface("10.99.0.11/24"),
                                         kubernetes_node="w1"))
        await set_tunnel_fields(store, "w1", IPv4Address("10.244.190.128"),
                                IPv4Address("10.244.190.129"), "66:1f:4b:2a:7c:01")
    with_store(etcd, running_agent)
    agents = yaml.safe_load(ok(ctl("get", "node", "w1", "-o", "yaml")))
    by_hand = {"apiVersion": "pipit.dev/v1", "kind": "Node",
               "metadata": {"name": "w1", "labels": {"rack": "r1"}}, "spec": {}}
    assert ok(ctl("apply", "-f", "-", input=yaml.safe_dump(by_hand))) == \
        "node 'w1' configured\n"
    node = yaml.safe_load(ok(ctl("get", "node", "w1", "-o", "yaml")))
    assert node["metadata"]["labels"] == {"rack": "r1"}
    assert node["spec"] == agents["spec"]
    assert node["metadata"]["annotations"] == {"pipit.dev/agent-version": software_version()}
    assert f"Agent Versions:  {software_version()} (1 node: w1)" in ok(ctl("version"))

    calicos = CALICOCTL_OUTPUT[CALICOCTL_OUTPUT.index("apiVersion: projectcalico.org/v3\n"
                                                      "kind: Node"):]
    assert ok(ctl("apply", "-f", "-", input=calicos)) == "node 'w1' configured\n"
    node = yaml.safe_load(ok(ctl("get", "node", "w1", "-o", "yaml")))
    assert node["spec"] == {**agents["spec"], "bgp": {**agents["spec"]["bgp"],
                                                     "routeReflectorClusterID": "244.0.0.1"}}
    assert node["metadata"]["annotations"]["pipit.dev/agent-version"] == software_version()
    assert ok(ctl("apply", "-f", "-", input=calicos)) == "node 'w1' unchanged\n"
    moved = yaml.safe_dump({**by_hand, "spec": {"bgp": {"ipv4Address": "10.99.0.12/24"}}})
    ok(ctl("apply", "-f", "-", input=moved))
    node = yaml.safe_load(ok(ctl("get", "node", "w1", "-o", "yaml")))
    assert node["spec"]["bgp"] == {**agents["spec"]["bgp"], "ipv4Address": "10.99.0.12/24"}


def test_workload_endpoints_are_the_pods_ipam_holds_addresses_for(existing, ctl):
    """calicoctl's `get wep`: each pod attachment with its node, addresses and floating IPs,
    under Calico's names; tunnel addresses and others are no workload endpoints."""
    pod = {"namespace": "shop", "pod": "cart-1", "ifname": "eth0", "containerID": "c1"}
    [[cart], _, [other], _] = assign(
        existing, ("node-a", "pipit.c1.eth0", 1, pod),
        ("node-a", "ipip-tunnel-addr-node-a", 1, {"type": "ipip-tunnel"}),
        ("node-b", "pipit.c2.eth0", 1, {**pod, "pod": "web", "containerID": "c2",
                                        "namespace": "default"}),
        ("node-a", "pipit.c1.eth0.floating", 2, {**pod, "floatingFor": "x",
                                                 "attachment": "pipit.c1.eth0"}))
    floating = sorted(a for b in with_store(existing, lambda s: load_snapshot(s)).blocks.values()
                      for a in blocks.addresses_of(b, "pipit.c1.eth0.floating"))
    assert [line.split() for line in ok(ctl("get", "workloadendpoints")).splitlines()] == [
        ["NAMESPACE", "WORKLOAD", "NODE", "NETWORKS", "INTERFACE"],
        ["default", "web", "node-b", f"{other}/32", "eth0"],
        ["shop", "cart-1", "node-a", f"{cart}/32", "eth0"]]
    wide = ok(ctl("get", "wep", "cart-1", "-o", "wide")).splitlines()
    assert wide[1].split() == ["shop", "node--a-k8s-cart--1-eth0", "cart-1", "node-a",
                               f"{cart}/32", "eth0", "c1",
                               ",".join(f"{f}:{cart}" for f in floating)]
    [document] = yaml.safe_load_all(ok(ctl("get", "wep", "node--a-k8s-cart--1-eth0",
                                           "-o", "yaml")))
    assert document["kind"] == "WorkloadEndpoint"
    assert document["metadata"] == {"name": "node--a-k8s-cart--1-eth0", "namespace": "shop"}
    assert document["spec"]["ipNetworks"] == [f"{cart}/32"]
    assert document["spec"]["ipNATs"] == [{"internalIP": str(cart), "externalIP": str(f)}
                                          for f in floating]
    assert "is in use by handle pipit.c1.eth0.floating, a floating IP of pod shop/cart-1 " \
        "(leads to x) (" in ok(ctl("ipam", "show", "--ip", str(floating[0])))
    one_sentence(ctl("get", "wep", "nope"), "workload endpoint 'nope' not found")
    assert [line.split()[:2] for line in ok(ctl("get", "wep", "-n", "shop")).splitlines()] == [
        ["NAMESPACE", "WORKLOAD"], ["shop", "cart-1"]]
    assert ok(ctl("get", "wep", "-A")) == ok(ctl("get", "wep"))
    one_sentence(ctl("get", "wep", "web", "-n", "shop"),
                 "workload endpoint 'web' not found", "in namespace shop")
    one_sentence(ctl("get", "ippools", "-n", "shop"), "ippools are not namespaced")
    one_sentence(ctl("get", "wep", "-n", "shop", "-A"), "-n NAMESPACE or -A, not both")
    one_sentence(ctl("get", "wep", "-l", "app == 'x'"), "-l selects by labels")
    one_sentence(ctl("apply", "-f", "-", input=ok(ctl("get", "wep", "-o", "yaml"))),
                 "workload endpoints are what a pod's CNI ADD made")
    one_sentence(ctl("delete", "wep", "cart-1"), "are not applied, patched, labelled or deleted")


def test_get_of_a_missing_pool_or_unknown_kind_is_one_sentence(ctl):
    one_sentence(ctl("get", "ippools", "nope"), "'nope'", "not found")
    one_sentence(ctl("get", "widgets"), "'widgets'", "ippools")
    one_sentence(ctl("get", "ippools", "-o", "xml"), "'xml'")


def test_every_alias_names_ip_pools(existing, ctl):
    for alias in ("ippool", "ippools", "ipp", "pool", "IPPool"):
        out = ok(ctl("get", alias, "existing"))
        assert out.splitlines()[1].split() == ["existing", "10.244.0.0/16", "all()"], alias


def test_delete_by_name_and_by_file(etcd, ctl, tmp_path):
    path = tmp_path / "pools.yaml"
    path.write_text(stream(pool_yaml("a", cidr="10.80.0.0/16"),
                           pool_yaml("b", cidr="10.81.0.0/16"),
                           pool_yaml("c", cidr="10.82.0.0/16")))
    ok(ctl("apply", "-f", str(path)))

    assert ok(ctl("delete", "ipp", "b")) == "ippool 'b' deleted\n"
    assert sorted(snapshot(etcd)) == [keys.pool_key("a"), keys.pool_key("c")]

    path.write_text(stream(pool_yaml("a", cidr="10.80.0.0/16"),
                           pool_yaml("c", cidr="10.82.0.0/16")))
    assert ok(ctl("delete", "-f", str(path))) == "ippool 'a' deleted\nippool 'c' deleted\n"
    assert snapshot(etcd) == {}
    assert ok(ctl("get", "ippools")) == "NAME   CIDR   SELECTOR\n"

    one_sentence(ctl("delete", "ippool", "a"), "ippool 'a' not found")
    one_sentence(ctl("delete"), "pipitctl delete ippool NAME")


# --------------------------------------------------------------------------------------------
# 3. Deleting a pool whose addresses are in use


def test_delete_refuses_a_pool_in_use_unless_forced(etcd, ctl):
    with_store(etcd, lambda s: add_pool(s, "doomed", "10.1.0.0/24", blockSize=28))
    with_store(etcd, lambda s: add_pool(s, "kept", "10.2.0.0/24", blockSize=28))
    assign(etcd,
           ("node-1", "pod-a", 2, {"pod": "a"}, ["doomed"]),
           ("node-2", "pod-b", 1, {"pod": "b"}, ["doomed"]),
           ("node-1", "pod-both", 1, {"pod": "both"}, ["doomed"]),
           ("node-1", "pod-both", 1, {"pod": "both"}, ["kept"]))
    before = snapshot(etcd)

    one_sentence(ctl("delete", "ippool", "doomed"), "'doomed'", "4 address(es) in use",
                 "--force")
    assert snapshot(etcd) == before

    assert ok(ctl("delete", "ippool", "doomed", "--force")) == "ippool 'doomed' deleted\n"
    after = snapshot(etcd)
    doomed = IPv4Network("10.1.0.0/24")
    assert keys.pool_key("doomed") not in after
    assert not [k for k in after if k.startswith(keys.BLOCKS)
                and keys.block_cidr(k).subnet_of(doomed)]
    assert not [k for k in after if k.startswith(keys.HOSTS)
                and keys.affinity_parts(k)[1].subnet_of(doomed)]
    assert keys.handle_key("pod-a") not in after and keys.handle_key("pod-b") not in after
    # The handle with an address in the other pool keeps that one, and only that one; the other
    # pool is untouched.
    both = handles.from_json(after[keys.handle_key("pod-both")][1])
    assert both.total == 1 and all(IPv4Network(c).subnet_of(IPv4Network("10.2.0.0/24"))
                                   for c in both.blocks)
    assert {k: v for k, v in after.items() if "10.2.0." in k or k == keys.pool_key("kept")} == \
        {k: v for k, v in before.items() if "10.2.0." in k or k == keys.pool_key("kept")}
    assert "no problems found" in ok(ctl("ipam", "check"))


def node_yaml(name: str, address: str = "10.99.0.11/24") -> str:
    return yaml.safe_dump({"apiVersion": "pipit.dev/v1", "kind": "Node",
                           "metadata": {"name": name},
                           "spec": {"bgp": {"ipv4Address": address}}})


def test_a_pool_holding_a_node_and_a_node_inside_a_pool_are_refused(existing, ctl):
    """Either way round a pod could be given the node's address and the routes to the pool's
    blocks would take the node's traffic: one sentence, nothing written."""
    ok(ctl("apply", "-f", "-", input=node_yaml("n1")))  # 10.99.0.11/24
    before = snapshot(existing)
    one_sentence(ctl("apply", "-f", "-", input=pool_yaml(cidr="10.99.0.0/16")),
                 "IPPool 'new': cidr 10.99.0.0/16 holds the address of node n1 (10.99.0.11)")
    one_sentence(ctl("apply", "-f", "-", input=node_yaml("n2", "10.244.9.9/16")),
                 "node n2: its address 10.244.9.9 is inside IPPool 'existing' (10.244.0.0/16)")
    assert snapshot(existing) == before
    # in one file too: the pool as the node would find it
    one_sentence(ctl("apply", "-f", "-", input=stream(pool_yaml("later", cidr="10.98.0.0/16"),
                                                       node_yaml("n3", "10.98.0.3/16"))),
                 "node n3: its address 10.98.0.3 is inside IPPool 'later'")
    assert snapshot(existing) == before


def services_yaml(**ranges: str) -> str:
    return yaml.safe_dump({"apiVersion": "pipit.dev/v1", "kind": "BGPConfiguration",
                           "metadata": {"name": "default"},
                           "spec": {field: [{"cidr": cidr}] for field, cidr in ranges.items()}})


def test_a_pool_of_pods_and_a_service_range_that_overlap_are_refused(etcd, ctl):
    """Either way round: no node takes a route inside a service range (kube-proxy serves
    those), so the pods of the overlap would be unreachable. A LoadBalancer pool belongs
    inside serviceLoadBalancerIPs. One sentence, nothing written."""
    ok(ctl("apply", "-f", "-", input=pool_yaml("pods", cidr="10.50.0.0/16")))
    ok(ctl("apply", "-f", "-", input=services_yaml(serviceClusterIPs="10.96.0.0/12",
                                                   serviceLoadBalancerIPs="10.200.0.0/24")))
    ok(ctl("apply", "-f", "-", input=pool_yaml("lb", cidr="10.200.0.0/24",
                                               allowedUses=["LoadBalancer"])))
    before = snapshot(etcd)
    why = "no node takes a route inside a service range (kube-proxy serves it)"
    one_sentence(ctl("apply", "-f", "-", input=pool_yaml("more", cidr="10.100.0.0/16")),
                 "IPPool 'more': cidr 10.100.0.0/16 overlaps service range 10.96.0.0/12 "
                 "(BGPConfiguration 'default' serviceClusterIPs)", why)
    one_sentence(ctl("apply", "-f", "-", input=services_yaml(
        serviceClusterIPs="10.96.0.0/12", serviceExternalIPs="10.50.7.0/24")),
        "BGPConfiguration 'default': serviceExternalIPs 10.50.7.0/24 overlaps IPPool 'pods' "
        "(10.50.0.0/16)", why)
    one_sentence(ctl("apply", "-f", "-", input=stream(  # also within one file
        services_yaml(serviceClusterIPs="10.96.0.0/12", serviceLoadBalancerIPs="10.60.0.0/16"),
        pool_yaml("tunnels", cidr="10.60.0.0/24", allowedUses=["Tunnel"]))),
        "IPPool 'tunnels': cidr 10.60.0.0/24 overlaps service range 10.60.0.0/16", why)
    assert snapshot(etcd) == before


def test_a_node_with_another_nodes_address_is_refused(etcd, ctl):
    """As the agent refuses to register it: sessions to that address, and the routes of the
    blocks either node owns, would be taken for the other's. Also two in one file; nothing
    written."""
    ok(ctl("apply", "-f", "-", input=node_yaml("n1", "10.99.0.11/24")))
    before = snapshot(etcd)
    refusal = ("node n1 already has the address 10.99.0.11", "pipitctl delete node n1")
    one_sentence(ctl("apply", "-f", "-", input=node_yaml("n2", "10.99.0.11/16")), *refusal)
    one_sentence(ctl("apply", "-f", "-", input=stream(node_yaml("n3", "10.99.0.13/24"),
                                                       node_yaml("n4", "10.99.0.13/24"))),
                 "node n3 already has the address 10.99.0.13")
    assert snapshot(etcd) == before
    assert ok(ctl("apply", "-f", "-", input=node_yaml("n1", "10.99.0.12/24"))) == \
        "node 'n1' configured\n"  # moving to a free address
    assert ok(ctl("apply", "-f", "-", input=node_yaml("n2", "10.99.0.11/24"))) == \
        "node 'n2' created\n"  # the one it left


def test_delete_node_releases_its_tunnel_addresses_and_block_claims(etcd, ctl):
    with_store(etcd, lambda s: add_pool(s, "default", "10.3.0.0/24", blockSize=28))
    ok(ctl("apply", "-f", "-", input=node_yaml("node-1")))
    assign(etcd, ("node-1", "vxlan-tunnel-addr-node-1", 1, {"type": "vxlan-tunnel"}),
           ("node-1", "ipip-tunnel-addr-node-1", 1, {"type": "ipip-tunnel"}),
           ("node-1", "pod-a", 1, {"pod": "a"}))

    assert ok(ctl("delete", "node", "node-1")) == "node 'node-1' deleted\n"
    after = snapshot(etcd)
    assert keys.node_key("node-1") not in after
    assert sorted(k for k in after if k.startswith(keys.HANDLES)) == [keys.handle_key("pod-a")]
    assert not [k for k in after if k.startswith(keys.HOSTS)]  # no affinity left behind
    # the block with pod-a's address stays, owned by nobody
    [block] = [blocks.from_json(v) for k, (_, v) in after.items() if k.startswith(keys.BLOCKS)]
    assert block.node is None and block.used == 1
    one_sentence(ctl("delete", "node", "node-1"), "'node-1'", "not found")


def test_delete_refuses_a_node_whose_agent_runs_unless_forced(etcd, ctl):
    """Its blocks would go from under its pods and every other node would stop routing to
    them while the agent carries on: stop the agent first (which gives its claim up)."""
    from bgp_agent.name_claim import Holder, release, take
    ok(ctl("apply", "-f", "-", input=node_yaml("node-1")))
    ok(ctl("apply", "-f", "-", input=node_yaml("node-2", "10.99.0.12/24")))
    agent = Holder("boot/net:1", "rack1-host7", 4242, "2026-12-05T04:00:00Z")
    claim = with_store(etcd, lambda store: take(store, "node-1", agent))
    before = snapshot(etcd)
    for argv in (["node-1"], ["node-2", "node-1"]):
        one_sentence(ctl("delete", "node", *argv),
                     "node 'node-1' is run by an agent on host rack1-host7 (pid 4242, since "
                     "2026-12-05T04:00:00Z)", "stop that agent first, or delete with --force")
        assert snapshot(etcd) == before
    with_store(etcd, lambda store: release(store, claim))  # the agent stopped
    assert ok(ctl("delete", "node", "node-2", "node-1")) == \
        "node 'node-2' deleted\nnode 'node-1' deleted\n"
    ok(ctl("apply", "-f", "-", input=node_yaml("node-1")))
    with_store(etcd, lambda store: take(store, "node-1", agent))
    assert ok(ctl("delete", "node", "node-1", "--force")) == "node 'node-1' deleted\n"


# --------------------------------------------------------------------------------------------
# 4. ipam show / release / configure


def test_ipam_show_totals_bar_blocks_and_addresses(etcd, ctl):
    # Each /26 block keeps its first address as the gateway and its last as the broadcast
    # address: 62 for pods, 4 x 62 in the /24.
    with_store(etcd, lambda s: add_pool(s, "small", "10.3.0.0/24", blockSize=26))
    with_store(etcd, lambda s: add_pool(s, "big", "10.4.0.0/16"))
    [pods] = assign(etcd, ("node-1", "web", 62, {"namespace": "prod", "pod": "web-1"},
                           ["small"]))
    assign(etcd, ("node-2", "db", 1, {"namespace": "prod", "pod": "db-0"}, ["small"]),
           ("node-2", "tiny", 1, {"pod": "tiny"}, ["big"]))

    rows = [line.split() for line in ok(ctl("ipam", "show")).splitlines()]
    assert rows == [
        ["POOL", "CIDR", "TOTAL", "IN", "USE", "FREE", "USED"],
        ["big", "10.4.0.0/16", "63488", "1", "63487", "[#-------------------]", "<0.1%"],
        ["small", "10.3.0.0/24", "248", "63", "185", "[#####---------------]", "25.4%"],
    ]

    out = ok(ctl("ipam", "show", "--show-blocks")).split("\n\n")
    assert len(out) == 2 and out[0] == ok(ctl("ipam", "show")).rstrip("\n")
    block_rows = [line.split() for line in out[1].splitlines()]
    assert block_rows[0] == ["POOL", "BLOCK", "NODE", "IN", "USE", "FREE"]
    web_block = str(IPv4Network((pods[0], 26), strict=False))
    by_pool_and_node = sorted((row[0], row[2], row[3], row[4]) for row in block_rows[1:])
    assert by_pool_and_node == [("big", "node-2", "1", "61"), ("small", "node-1", "62", "0"),
                                ("small", "node-2", "1", "61")]
    assert ["small", web_block, "node-1", "62", "0"] in block_rows
    node_2_block = next(row for row in block_rows if row[:3:2] == ["small", "node-2"])

    held = ok(ctl("ipam", "show", "--ip", str(pods[5])))
    for fact in (str(pods[5]), "in use", "handle web", "pod=web-1", "namespace=prod",
                 "node node-1"):
        assert fact in held, (fact, held)
    unused = IPv4Network(node_2_block[1]).network_address + 10
    assert ok(ctl("ipam", "show", "--ip", str(unused))) == (
        f"{unused} is free, in block {node_2_block[1]} (node node-2).\n")
    broadcast = IPv4Network(node_2_block[1]).broadcast_address
    assert ok(ctl("ipam", "show", "--ip", str(broadcast))) == (
        f"{broadcast} is reserved as the broadcast address of block {node_2_block[1]} "
        "(node node-2).\n")
    assert ok(ctl("ipam", "show", "--ip", "192.0.2.1")) == "192.0.2.1 is not in any IP pool.\n"
    one_sentence(ctl("ipam", "show", "--ip", "10.3.0.999"), "'10.3.0.999'", "IPv4 address")


def test_ipam_release_frees_an_address_once(etcd, ctl):
    with_store(etcd, lambda s: add_pool(s, "p", "10.5.0.0/24"))
    [[address, other]] = assign(etcd, ("node-1", "pod-x", 2, {"pod": "x"}))

    one_sentence(ctl("ipam", "release", "--ip", str(address)), f"{address} is in use by "
                 "handle pod-x (node=node-1 pod=x); if its pod is gone", "--force",
                 "nothing was released")
    [[tunnel]] = assign(etcd, ("node-1", "ipip-tunnel-addr-node-1", 1,
                               {"node": "node-1", "type": "ipipTunnelAddress"}))
    one_sentence(ctl("ipam", "release", "--ip", str(tunnel)), f"{tunnel} is in use by handle "
                 "ipip-tunnel-addr-node-1", "if node node-1 is gone", "--force")
    assert ok(ctl("ipam", "release", "--ip", str(address), "--force")) == \
        f"released {address}\n"
    assert f"{address} is free" in ok(ctl("ipam", "show", "--ip", str(address)))
    assert "in use by handle pod-x" in ok(ctl("ipam", "show", "--ip", str(other)))
    handle = handles.from_json(snapshot(etcd)[keys.handle_key("pod-x")][1])
    assert handle.total == 1
    assert "no problems found" in ok(ctl("ipam", "check"))

    before = snapshot(etcd)
    again = ctl("ipam", "release", "--ip", str(address))
    one_sentence(again, str(address), "not in use")
    assert snapshot(etcd) == before
    one_sentence(ctl("ipam", "release", "--ip", "192.0.2.7"), "192.0.2.7 is outside every IP "
                 "pool")
    gateway = IPv4Network((address, 26), strict=False).network_address
    one_sentence(ctl("ipam", "release", "--ip", str(gateway)), f"{gateway} is the gateway of "
                 "block", "never handed out")
    broadcast = IPv4Network((address, 26), strict=False).broadcast_address
    one_sentence(ctl("ipam", "release", "--ip", str(broadcast)), f"{broadcast} is the "
                 "broadcast address of block", "never handed out")
    # several: all or none
    one_sentence(ctl("ipam", "release", "--ip", str(other), "--ip", str(address), "--force"),
                 f"{address} is not in use", "nothing was released")
    assert snapshot(etcd) == before


def test_ipam_configure_shows_and_changes_the_settings(etcd, ctl):
    shown = ok(ctl("ipam", "configure"))
    assert shown == ("strictAffinity: false\nmaxBlocksPerHost: 0 (means 20)\n"
                     "ipCooldownSeconds: 0\nautoAllocateBlocks: true\n")
    assert snapshot(etcd) == {}  # showing writes nothing

    ok(ctl("ipam", "configure", "--strict-affinity", "true", "--max-blocks-per-host", "3"))
    assert ok(ctl("ipam", "configure")) == ("strictAffinity: true\nmaxBlocksPerHost: 3\n"
                                            "ipCooldownSeconds: 0\nautoAllocateBlocks: true\n")
    assert ok(ctl("ipam", "show", "--show-configuration")) == ok(ctl("ipam", "configure"))
    stored = snapshot(etcd)[keys.IPAM_CONFIG][1]["spec"]
    assert stored == {"strictAffinity": True, "maxBlocksPerHost": 3}

    before = snapshot(etcd)
    one_sentence(ctl("ipam", "configure", "--max-blocks-per-host", "-1"), "maxBlocksPerHost",
                 "-1")
    one_sentence(ctl("ipam", "configure", "--strict-affinity", "maybe"), "'maybe'")
    one_sentence(ctl("ipam", "configure", "--ip-cooldown-seconds", "1201"),
                 "ipCooldownSeconds must be 0-1200, not 1201")
    assert snapshot(etcd) == before
    ok(ctl("ipam", "configure", "--strict-affinity", "false", "--ip-cooldown-seconds", "60"))
    assert ok(ctl("ipam", "configure")) == ("strictAffinity: false\nmaxBlocksPerHost: 3\n"
                                            "ipCooldownSeconds: 60\nautoAllocateBlocks: true\n")
    assert snapshot(etcd)[keys.IPAM_CONFIG][1]["spec"]["ipCooldownSeconds"] == 60
    # Calico's autoAllocateBlocks false needs strictAffinity, set before or with it
    before = snapshot(etcd)
    one_sentence(ctl("ipam", "configure", "--auto-allocate-blocks", "false"),
                 "autoAllocateBlocks false needs strictAffinity true")
    assert snapshot(etcd) == before
    assert "autoAllocateBlocks: false" in ok(ctl("ipam", "configure", "--auto-allocate-blocks",
                                                 "false", "--strict-affinity", "true"))
    one_sentence(ctl("ipam", "configure", "--strict-affinity", "false"),
                 "autoAllocateBlocks false needs strictAffinity true")


def test_the_ipam_configuration_is_a_resource_as_calicos(etcd, ctl):
    """Calico's IPAMConfiguration 'default': applied whole, shown by get and by ipam
    configure, its labels kept when ipam configure changes a field; deleted, the defaults."""
    document = """apiVersion: pipit.dev/v1
kind: IPAMConfiguration
metadata: {name: default, labels: {team: net}}
spec: {strictAffinity: true, maxBlocksPerHost: 4, ipCooldownSeconds: 30,
       autoAllocateBlocks: false}
"""
    assert ok(ctl("apply", "-f", "-", input=document)) == \
        "ipamconfiguration 'default' created\n"
    assert ok(ctl("ipam", "configure")) == ("strictAffinity: true\nmaxBlocksPerHost: 4\n"
                                            "ipCooldownSeconds: 30\nautoAllocateBlocks: false\n")
    assert ok(ctl("get", "ipamconfig")).split() == [
        "NAME", "STRICTAFFINITY", "MAXBLOCKSPERHOST", "default", "true", "4"]
    ok(ctl("ipam", "configure", "--max-blocks-per-host", "5"))
    shown = json.loads(ok(ctl("get", "ipamconfig", "default", "-o", "json")))
    assert shown["metadata"]["labels"] == {"team": "net"}
    assert shown["spec"] == {"strictAffinity": True, "maxBlocksPerHost": 5,
                             "ipCooldownSeconds": 30, "autoAllocateBlocks": False}
    before = snapshot(etcd)
    one_sentence(ctl("apply", "-f", "-", input=document.replace("strictAffinity: true",
                                                                "strictAffinity: false")),
                 "autoAllocateBlocks false needs strictAffinity true")
    one_sentence(ctl("apply", "-f", "-", input=document.replace("name: default", "name: x")),
                 "Pipit reads the IPAMConfiguration named 'default' only")
    assert snapshot(etcd) == before
    ok(ctl("delete", "ipamconfig", "default"))
    assert ok(ctl("ipam", "configure")).startswith("strictAffinity: false\nmaxBlocksPerHost: 0")


# --------------------------------------------------------------------------------------------
# 5. ipam check

BLOCK = IPv4Network("10.6.0.0/26")


def consistent_state(config: EtcdConfig) -> None:
    """A pool, one block of node-1 (confirmed) with one address held by handle pod-a."""
    block, _ = blocks.assign(blocks.new_block(BLOCK, "node-1"), 1, "pod-a", {"pod": "a"})
    with_store(config, lambda s: add_pool(s, "p", "10.6.0.0/24"))
    put(config,
        (keys.block_key(BLOCK), blocks.to_json(block)),
        (keys.affinity_key("node-1", BLOCK), {"state": "confirmed"}),
        (keys.handle_key("pod-a"), handles.to_json(handles.Handle("pod-a", {str(BLOCK): 1}))))


def leak(config):
    entry = snapshot(config)[keys.block_key(BLOCK)][1]
    block, _ = blocks.assign(blocks.from_json(entry), 2, "ghost", {"pod": "gone"})
    put(config, (keys.block_key(BLOCK), blocks.to_json(block)))


def orphan_handle(config):
    put(config, (keys.handle_key("pod-b"),
                 handles.to_json(handles.Handle("pod-b", {str(BLOCK): 2}))))


def affinity_without_block(config):
    put(config, (keys.affinity_key("node-2", IPv4Network("10.6.0.128/26")),
                 {"state": "confirmed"}))


def block_without_affinity(config):
    put(config, (keys.block_key(IPv4Network("10.6.0.64/26")),
                 blocks.to_json(blocks.new_block(IPv4Network("10.6.0.64/26"), "node-1"))))


@pytest.mark.parametrize("damage, kind, subject, detail", [
    (leak, "leaked-address", "ghost", "2 address(es) in 10.6.0.0/26"),
    (orphan_handle, "orphan-handle", "pod-b", "counts 2 address(es) in 10.6.0.0/26"),
    (affinity_without_block, "affinity-without-block", "node-2/10.6.0.128/26", "no block"),
    (block_without_affinity, "block-without-affinity", "10.6.0.64/26", "missing"),
])
def test_ipam_check_finds_each_inconsistency_and_its_report_fixes_it(etcd, ctl, tmp_path,
                                                                       damage, kind, subject,
                                                                       detail):
    consistent_state(etcd)
    assert ok(ctl("ipam", "check")) == (
        "checked 1 blocks, 1 handles and 1 affinities: no problems found.\n")
    healthy = snapshot(etcd)
    damage(etcd)
    report = tmp_path / "report.json"
    result = ctl("ipam", "check", "-o", str(report))
    assert result.returncode == 1 and result.stderr == "", result
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["PROBLEM", "SUBJECT", "DETAIL", "FIX"]
    assert [line.split()[:2] for line in lines[1:-1]] == [[kind, subject]], result.stdout
    assert detail in lines[1]
    assert lines[1].endswith(f"pipitctl ipam release --from-report {report}")
    assert lines[-1].endswith(f": 1 problem(s) found; written to {report}.")
    [problem] = json.loads(report.read_text())["problems"]
    assert (problem["kind"], problem["subject"]) == (kind, subject)

    fixed = ok(ctl("ipam", "release", "--from-report", str(report)))
    assert fixed and "left:" not in fixed, fixed
    assert "no problems found" in ok(ctl("ipam", "check"))
    after = snapshot(etcd)
    if damage in (orphan_handle, affinity_without_block, block_without_affinity):
        # what was there before the damage is what is there now (revisions aside)
        assert {k: v for k, (_, v) in after.items()} == \
            {k: v for k, (_, v) in healthy.items()} | ({} if damage is not
                                                      block_without_affinity else {
                k: v for k, (_, v) in after.items() if "10.6.0.64" in k})
    # run again, it finds the problem gone and changes nothing
    assert ok(ctl("ipam", "release", "--from-report", str(report))) == \
        f"left: {kind} {subject}: no longer found\n"
    assert snapshot(etcd) == after


def test_a_leaked_address_is_released_without_force(etcd, ctl):
    consistent_state(etcd)
    leak(etcd)
    block = blocks.from_json(snapshot(etcd)[keys.block_key(BLOCK)][1])
    leaked = [a for a in BLOCK if (h := block.holder(a)) and h.handle_id == "ghost"]
    live = [a for a in BLOCK if (h := block.holder(a)) and h.handle_id == "pod-a"]
    assert len(leaked) == 2 and len(live) == 1
    one_sentence(ctl("ipam", "release", "--ip", str(live[0])), "in use by handle pod-a")
    assert ok(ctl("ipam", "release", *(f"--ip={a}" for a in leaked))) == "".join(
        f"released {a}\n" for a in leaked)
    assert "no problems found" in ok(ctl("ipam", "check"))


def test_the_report_fixes_blocks_of_gone_nodes_and_empty_blocks_outside_pools(etcd, ctl,
                                                                               tmp_path):
    consistent_state(etcd)  # node-1's block, one address in use
    outside = IPv4Network("10.99.0.0/26")
    put(etcd, (keys.node_key("node-2"), {"apiVersion": "pipit.dev/v1", "kind": "Node",
                                         "metadata": {"name": "node-2"}, "spec": {}}),
        (keys.block_key(outside), blocks.to_json(blocks.new_block(outside, "node-2"))),
        (keys.affinity_key("node-2", outside), {"state": "confirmed"}))
    report = tmp_path / "report.json"
    kinds = {p["kind"] for p in json.loads(
        (ctl("ipam", "check", "-o", str(report)), report.read_text())[1])["problems"]}
    assert kinds == {"block-of-unknown-node", "block-outside-pools"}
    assert ok(ctl("ipam", "release", "--from-report", str(report))).splitlines() == [
        f"released block {BLOCK} of unregistered node node-1: kept without an owner",
        f"removed empty block {outside}, outside every pool"]
    assert "no problems found" in ok(ctl("ipam", "check"))
    held = ok(ctl("ipam", "show", "--ip", str(BLOCK.network_address + 1)))
    assert "in use by handle pod-a" in held and "(node none)" in held


def test_problem_ips_a_stale_report_and_problems_only_a_person_can_fix(etcd, ctl, tmp_path):
    consistent_state(etcd)
    leak(etcd)
    block = blocks.from_json(snapshot(etcd)[keys.block_key(BLOCK)][1])
    leaked = sorted(a for a in BLOCK if (h := block.holder(a)) and h.handle_id == "ghost")
    report = tmp_path / "report.json"
    out = ctl("ipam", "check", "--show-problem-ips", "-o", str(report)).stdout
    problem_rows = out.split("\n\n")[1].splitlines()
    assert problem_rows[0].split() == ["ADDRESS", "BLOCK", "HANDLE", "PROBLEM"]
    assert [r.split() for r in problem_rows[1:3]] == [
        [str(a), str(BLOCK), "ghost", "leaked-address"] for a in leaked]

    # meanwhile one leaked address is released and handed to a new pod: the report must not
    # free it
    ok(ctl("ipam", "release", "--ip", str(leaked[0])))
    freed = blocks.from_json(snapshot(etcd)[keys.block_key(BLOCK)][1])
    first = freed.ordinal(leaked[0])
    freed = dataclasses.replace(freed, unallocated=(first, *(o for o in freed.unallocated
                                                             if o != first)))
    again, [reused] = blocks.assign(freed, 1, "pod-new", {"pod": "new"})
    assert reused == leaked[0]
    put(etcd, (keys.block_key(BLOCK), blocks.to_json(again)),
        (keys.handle_key("pod-new"), handles.to_json(handles.Handle("pod-new",
                                                                    {str(BLOCK): 1}))))
    done = ok(ctl("ipam", "release", "--from-report", str(report)))
    assert done == f"released {leaked[1]} (leaked by handle ghost)\n"
    assert "in use by handle pod-new" in ok(ctl("ipam", "show", "--ip", str(reused)))
    assert "no problems found" in ok(ctl("ipam", "check"))

    # what pipitctl leaves to a person says what to do
    put(etcd, (keys.affinity_key("node-9", IPv4Network("10.6.0.192/26")), {"state": "pending"}),
        (keys.block_key(IPv4Network("10.99.0.0/26")),
         blocks.to_json(blocks.assign(blocks.new_block(IPv4Network("10.99.0.0/26"), None), 1,
                                      "x", {})[0])),
        (keys.handle_key("x"), handles.to_json(handles.Handle("x", {"10.99.0.0/26": 1}))))
    with_store(etcd, lambda s: s._call("Put", __import__("aetcd").rpc.PutRequest(
        key=(keys.HANDLES + "garbled").encode(), value=b"{")))
    result = ctl("ipam", "check", "-o", str(report))
    assert result.returncode == 1
    text = " ".join(result.stdout.split())
    assert "none needed while node node-9 runs: its agent settles the claim; if the node is " \
           "gone: pipitctl delete node node-9" in text
    assert "apply a pool covering 10.99.0.0/26, or release its addresses" in text
    assert f"etcdctl del {keys.HANDLES}garbled" in text
    before = snapshot(etcd)
    left = ok(ctl("ipam", "release", "--from-report", str(report))).splitlines()
    assert len(left) == 3 and all(line.startswith("left: ") for line in left), left
    assert snapshot(etcd) == before
    one_sentence(ctl("ipam", "release", "--from-report", str(tmp_path / "nope.json")),
                 "cannot read the report")
    (tmp_path / "bad.json").write_text('{"kind": "IPPool"}')
    one_sentence(ctl("ipam", "release", "--from-report", str(tmp_path / "bad.json")),
                 "is not one `pipitctl ipam check -o FILE` wrote")
    one_sentence(ctl("ipam", "release"), "--ip ADDRESS... or --from-report FILE")


# --------------------------------------------------------------------------------------------
# 6. etcd away, and TLS


def test_unreachable_etcd_is_one_sentence_naming_the_endpoint(tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    one_sentence(pipitctl("get", "ippools", endpoints=endpoint), "cannot reach etcd", endpoint)
    path = tmp_path / "pool.yaml"
    path.write_text(pool_yaml("a", cidr="10.7.0.0/16"))
    one_sentence(pipitctl("apply", "-f", str(path), "--etcd-endpoints", endpoint), endpoint)
    one_sentence(pipitctl("get", "ippools", "--etcd-endpoints", "ftp://x"), "'ftp://x'",
                 "http(s)://HOST:PORT")


def test_etcd_stopping_midway_is_one_sentence_and_loses_nothing(own_etcd):
    endpoint = own_etcd.endpoint
    ok(pipitctl("apply", "-f", "-", input=pool_yaml("a", cidr="10.7.0.0/16"), endpoints=endpoint))
    own_etcd.stop()
    for args in (["get", "ippools"], ["ipam", "show"], ["delete", "ippool", "a"]):
        one_sentence(pipitctl(*args, endpoints=endpoint), "cannot reach etcd", endpoint)
    own_etcd.start()
    assert "10.7.0.0/16" in ok(pipitctl("get", "ippools", endpoints=endpoint))


def test_ipam_check_that_cannot_read_etcd_exits_3_not_1(own_etcd, tmp_path):
    """1 means problems were found; 3 that nothing could be checked."""
    endpoint = own_etcd.endpoint
    assert "no problems found" in ok(pipitctl("ipam", "check", endpoints=endpoint))
    own_etcd.stop()
    result = pipitctl("ipam", "check", endpoints=endpoint)
    one_sentence(result, "cannot reach etcd", endpoint)
    assert result.returncode == 3 and result.stdout == ""
    own_etcd.start()
    kubeconfig = tmp_path / "kubeconfig"  # an API server nobody runs
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": f"http://127.0.0.1:{free_port()}"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "users": [{"name": "u", "user": {}}]}))
    result = pipitctl("ipam", "check", "--kubeconfig", str(kubeconfig), endpoints=endpoint)
    one_sentence(result, "cannot reach the Kubernetes API")
    assert result.returncode == 3 and result.stdout == ""


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    tls = make_tls_files(directory / "certs")
    with EtcdServer(data_dir=directory / "etcd", tls=tls) as server:
        yield server


def test_tls_needs_the_client_certificate(tls_etcd):
    tls, endpoint = tls_etcd.tls, tls_etcd.endpoint
    flags = ["--etcd-ca-cert", tls.ca, "--etcd-cert", tls.client_cert,
             "--etcd-key", tls.client_key]
    out = ok(pipitctl("apply", "-f", "-", *flags, input=pool_yaml("tls", cidr="10.8.0.0/16"),
                      endpoints=endpoint))
    assert out == "ippool 'tls' created\n"
    env = {ENV_CA: tls.ca, ENV_CERT: tls.client_cert, ENV_KEY: tls.client_key}
    assert "10.8.0.0/16" in ok(pipitctl("get", "ippools", endpoints=endpoint, env=env))

    one_sentence(pipitctl("get", "ippools", "--etcd-ca-cert", tls.ca, endpoints=endpoint),
                 "cannot reach etcd", endpoint)
    one_sentence(pipitctl("get", "ippools", endpoints=endpoint), endpoint, "--etcd-ca-cert")
    one_sentence(pipitctl("get", "ippools", "--etcd-cert", tls.client_cert, endpoints=endpoint),
                 "--etcd-cert and --etcd-key")
    mismatched = ["--etcd-ca-cert", tls.ca, "--etcd-cert", tls.client_cert,
                  "--etcd-key", tls.server_key]
    one_sentence(pipitctl("get", "ippools", *mismatched, endpoints=endpoint), endpoint, "TLS")


# --------------------------------------------------------------------------------------------
# 7. Where --etcd-endpoints may go


def test_etcd_endpoints_option_before_or_after_the_subcommand(existing):
    endpoint = existing.endpoints[0]
    closed = f"http://127.0.0.1:{free_port()}"
    before = ok(pipitctl("--etcd-endpoints", endpoint, "get", "ippools"))
    after = ok(pipitctl("get", "ippools", "--etcd-endpoints", endpoint))
    nested = ok(pipitctl("--etcd-endpoints", endpoint, "ipam", "show"))
    assert "existing" in before and before == after
    assert "10.244.0.0/16" in nested
    # The option wins over the environment, and the one after the subcommand wins over both.
    assert ok(pipitctl("get", "ippools", "--etcd-endpoints", endpoint, endpoints=closed)) == after
    assert ok(pipitctl("--etcd-endpoints", closed, "get", "ippools", "--etcd-endpoints",
                       endpoint)) == after


# --------------------------------------------------------------------------------------------
# 8. node status and lab without what they talk to


def test_node_status_of_an_agent_that_closes_without_answering_is_one_sentence():
    with tempfile.TemporaryDirectory(dir="/tmp") as directory:  # a unix socket path is short
        path = os.path.join(directory, "status.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(path)
            server.listen()
            closer = threading.Thread(target=lambda: server.accept()[0].close())
            closer.start()
            result = pipitctl("node", "status", "--socket", path)
            closer.join()
    one_sentence(result, path, "closed the connection")
    one_sentence(pipitctl("node", "status", "--socket", path), path, "not running")


def test_lab_status_without_a_lab_and_a_lab_that_cannot_start_are_one_sentence(tmp_path):
    one_sentence(pipitctl("lab", "status", "--dir", str(tmp_path / "none")),
                 f"no lab is running in {tmp_path / 'none'}")
    blocker = tmp_path / "file"
    blocker.write_text("")
    one_sentence(pipitctl("lab", "up", "--dir", str(blocker / "lab")), "the lab failed",
                 "Not a directory", str(blocker / "lab"))


def test_a_lab_keeps_the_namespace_prefix_it_was_started_with(tmp_path):
    (tmp_path / "lab.json").write_text(json.dumps({"topology": "mesh",
                                                   "prefix": "pipit-lab-mine-"}))
    one_sentence(pipitctl("lab", "down", "--dir", str(tmp_path), "--prefix", "other-"),
                 f"the lab in {tmp_path} was started with --prefix pipit-lab-mine-, not other-")
    one_sentence(pipitctl("lab", "status", "--dir", str(tmp_path),
                          env={"PIPIT_LAB_PREFIX": "other-"}), "--prefix pipit-lab-mine-")
    assert (tmp_path / "lab.json").exists()  # refused: nothing removed
    one_sentence(pipitctl("lab", "status", "--dir", str(tmp_path / "none"), "--prefix",
                          "no spaces"), "--prefix 'no spaces' is not a plain name")


# --------------------------------------------------------------------------------------------
# 9. Calico's resource rules seen through pipitctl


def test_a_disabled_pool_smaller_than_a_block_is_shown_and_stays_disabled(etcd, ctl):
    tiny = pool_yaml("in-cluster", cidr="10.9.9.0/30", disabled=True)
    assert ok(ctl("apply", "-f", "-", input=tiny)) == "ippool 'in-cluster' created\n"
    rows = [line.split() for line in ok(ctl("ipam", "show")).splitlines()]
    assert rows[1][:5] == ["in-cluster", "10.9.9.0/30", "0", "0", "0"]
    before = snapshot(etcd)
    one_sentence(ctl("apply", "-f", "-", input=pool_yaml("in-cluster", cidr="10.9.9.0/30")),
                 "'in-cluster'", "blockSize /26", "disable the pool")
    assert snapshot(etcd) == before


def bgp_config_yaml(**spec) -> str:
    return yaml.safe_dump({"apiVersion": "pipit.dev/v1", "kind": "BGPConfiguration",
                           "metadata": {"name": "default"}, "spec": spec}, sort_keys=False)


def test_mesh_settings_without_a_mesh_are_refused_and_durations_read(etcd, ctl):
    before = snapshot(etcd)
    one_sentence(ctl("apply", "-f", "-", input=bgp_config_yaml(
        nodeToNodeMeshEnabled=False, nodeMeshMaxRestartTime="120s")),
        "nodeMeshMaxRestartTime cannot be set when nodeToNodeMeshEnabled is false")
    assert snapshot(etcd) == before
    ok(ctl("apply", "-f", "-", input=bgp_config_yaml(nodeToNodeMeshEnabled=False)))
    shown = ok(ctl("get", "bgpconfig", "-o", "yaml"))
    assert "nodeMesh" not in shown
    assert ok(ctl("apply", "-f", "-", input=shown)) == "bgpconfiguration 'default' unchanged\n"
    ok(ctl("apply", "-f", "-", input=bgp_config_yaml(nodeMeshMaxRestartTime="2m",
                                                      nodeMeshHoldTime="1m30s")))
    spec = yaml.safe_load(ok(ctl("get", "bgpconfig", "-o", "yaml")))["spec"]
    assert (spec["nodeMeshMaxRestartTime"], spec["nodeMeshHoldTime"]) == (120, 90)


@pytest.mark.parametrize("metadata, spec, facts", [
    ({"name": "other"}, {}, ["'other'", "the BGPConfiguration named 'default', and one named "
                                        "node.<node name> per node"]),
    ({"name": "node.n1"}, {"nodeMeshHoldTime": 30},
     ["'node.n1': nodeMeshHoldTime is the cluster's", "may set only communities, listenPort"]),
    ({"name": "node.n1"}, {"communities": ["64512:1"], "prefixAdvertisements": []},
     ["'node.n1': a node's communities only name values for its prefixAdvertisements"]),
    ({"name": "node.n1"}, {"listenPort": 0}, ["listenPort 0 is outside 1-65535"]),
    ({"name": "node.n1"}, {"logSeverity": "Debug"}, ["unknown spec field 'logSeverity'"]),
    ({"name": "node.N_1"}, {}, ["name 'node.N_1' is not valid"]),
    ({"name": "node.n1"}, {"logSeverityScreen": "Verbose"}, ["logSeverityScreen 'Verbose'"]),
    ({"name": "default"}, {"listenPort": 0}, ["listenPort 0 is outside 1-65535"]),
    ({"name": "default"}, {"listenPort": 65536}, ["listenPort 65536 is outside 1-65535"]),
    ({"name": "default"}, {"communities": "64512:100"}, ["communities must be a list"]),
    ({"name": "default"}, {"communities": ["64512/100"]},
     ["community '64512/100' is neither AS:VALUE", "AS:VALUE:VALUE"]),
    ({"name": "default"}, {"communities": ["64512:100", "65536:1"]},
     ["community '65536:1'", "both parts 0-65535"]),
])
def test_a_bgp_configuration_refused_is_one_sentence_and_writes_nothing(etcd, ctl, metadata,
                                                                        spec, facts):
    ok(ctl("apply", "-f", "-", input=bgp_config_yaml(listenPort=1179)))
    before = snapshot(etcd)
    document = yaml.safe_dump({"apiVersion": "pipit.dev/v1", "kind": "BGPConfiguration",
                               "metadata": metadata, "spec": spec})
    one_sentence(ctl("apply", "-f", "-", input=document), *facts)
    assert snapshot(etcd) == before


def test_get_bgpconfig_and_get_nodes_show_what_is_stored(etcd, ctl):
    assert ok(ctl("get", "bgpconfig")).split() == ["NAME", "ASNUMBER", "MESH", "LOGSEVERITY"]
    ok(ctl("apply", "-f", "-", input=stream(
        bgp_config_yaml(asNumber="1.10", listenPort=1179, nodeMeshHoldTime="30s",
                        communities=["64512:100", "4200000000:1:2"]),
        "apiVersion: pipit.dev/v1\nkind: Node\nmetadata: {name: n1, labels: {rack: a, zone: z1}}\n"
        "spec: {bgp: {ipv4Address: 10.0.0.1/24, asNumber: 65001, "
        "routeReflectorClusterID: 244.0.0.1}}\n",
        "apiVersion: pipit.dev/v1\nkind: Node\nmetadata: {name: n2}\n"
        "spec: {bgp: {ipv4Address: 10.0.0.2/24}}\n",
        "apiVersion: pipit.dev/v1\nkind: Node\nmetadata: {name: n3}\nspec: {}\n")))
    ok(ctl("apply", "-f", "-", input="apiVersion: pipit.dev/v1\nkind: BGPConfiguration\n"
                                     "metadata: {name: node.n1}\nspec: {logSeverityScreen: "
                                     "Debug}\n"))
    rows = [line.split() for line in ok(ctl("get", "bgpconfig")).splitlines()]
    assert rows == [["NAME", "ASNUMBER", "MESH", "LOGSEVERITY"], ["default", "65546", "true", "-"],
                    ["node.n1", "-", "-", "Debug"]]
    rows = [line.split() for line in ok(ctl("get", "bgpconfig", "-o", "wide")).splitlines()]
    assert rows[:2] == [["NAME", "ASNUMBER", "MESH", "LOGSEVERITY", "LISTENPORT", "COMMUNITIES",
                         "MESHHOLDTIME", "MESHRESTARTTIME"],
                        ["default", "65546", "true", "-", "1179", "64512:100,4200000000:1:2",
                         "30", "120"]]
    shown = yaml.safe_load(ok(ctl("get", "bgpconfig", "node.n1", "-o", "yaml")))
    assert (shown["metadata"]["name"], shown["spec"]) == ("node.n1", {"logSeverityScreen": "Debug"})
    ok(ctl("delete", "bgpconfig", "node.n1"))
    assert [line.split()[0] for line in ok(ctl("get", "bgpconfig")).splitlines()] == [
        "NAME", "default"]
    rows = [line.split() for line in ok(ctl("get", "nodes")).splitlines()]
    assert rows == [["NAME", "ADDRESS", "AS"], ["n1", "10.0.0.1/24", "65001"],
                    ["n2", "10.0.0.2/24", "(cluster)"], ["n3", "-", "(cluster)"]]
    rows = [line.split() for line in ok(ctl("get", "nodes", "-o", "wide")).splitlines()]
    assert rows == [["NAME", "ADDRESS", "AS", "RRCLUSTERID", "LABELS"],
                    ["n1", "10.0.0.1/24", "65001", "244.0.0.1", "rack=a,zone=z1"],
                    ["n2", "10.0.0.2/24", "(cluster)", "-", "-"],
                    ["n3", "-", "(cluster)", "-", "-"]]
    assert ok(ctl("get", "nodes", "n2", "-o", "name")) == "node/n2\n"


# --------------------------------------------------------------------------------------------
# 10. Hostile or careless YAML: one sentence at once, nothing written


def laughs(levels: int = 9, width: int = 9) -> str:
    """A "billion laughs": each anchor holds `width` aliases of the one before."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


HOSTILE = [
    ("alias-bomb-as-kind", laughs() + "apiVersion: pipit.dev/v1\nkind: *l8\n",
     ["holds more than 500000 values", "aliases counted as what they expand to"]),
    ("alias-bomb-as-name", laughs() + "apiVersion: pipit.dev/v1\nkind: IPPool\n"
     "metadata: {name: *l8}\nspec: {cidr: 10.50.0.0/16}\n", ["holds more than 500000 values"]),
    ("recursive-alias", "apiVersion: pipit.dev/v1\nkind: &k [*k]\n", ["alias *k inside"]),
    ("deep-flow", ENVELOPE + "spec: " + "[" * 20000 + "]" * 20000 + "\n", ["line 4"]),
    ("deep-block", ENVELOPE + "spec:\n" + "".join(f"{' ' * (i + 1)}k{i}:\n"
                                                   for i in range(2000)), ["nests", "32 deep"]),
    ("huge-integer", ENVELOPE + "spec: {cidr: 10.50.0.0/16, blockSize: 1" + "0" * 4999 + "}\n",
     ["number of 5000 characters", "30 at most"]),
    ("duplicate-key", ENVELOPE + "spec:\n  cidr: 10.50.0.0/16\n  blockSize: 26\n"
     "  cidr: 10.51.0.0/16\n", ["line 7", "gives key 'cidr' twice", "first at line 5"]),
    ("duplicate-key-json", '{"apiVersion": "pipit.dev/v1", "kind": "IPPool", "metadata": '
     '{"name": "new"}, "spec": {"cidr": "10.50.0.0/16", "cidr": "10.9.0.0/16"}}',
     ["gives key 'cidr' twice"]),
    ("duplicate-document-key", ENVELOPE + "kind: IPPool\nspec: {cidr: 10.50.0.0/16}\n",
     ["gives key 'kind' twice"]),
    ("list-as-key", ENVELOPE + "spec: {[cidr]: 10.50.0.0/16}\n", ["list or mapping as a key"]),
    ("too-many-documents", "---\n{}\n" * 10001, ["more than 10000 documents", "split"]),
    ("too-large", pool_yaml(cidr="10.50.0.0/16") + "#" * (4 * 1024 * 1024),
     ["stdin is larger than the 4194304 bytes", "split"]),
]


@pytest.mark.parametrize("text, facts", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_yaml_is_refused_in_one_sentence_and_writes_nothing(existing, ctl, text, facts):
    before = snapshot(existing)
    for verb in ("apply", "create", "delete"):
        result = ctl(verb, "-f", "-", input=text)
        one_sentence(result, *facts)
        assert len(result.stderr) < 300, result.stderr
    assert snapshot(existing) == before


def test_a_file_over_the_size_limit_is_refused_by_its_name(ctl, tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("#" * (4 * 1024 * 1024 + 1))
    one_sentence(ctl("apply", "-f", str(big)), str(big), "larger than the 4194304 bytes")


def test_aliases_within_bounds_and_merge_keys_still_work(etcd, ctl):
    text = ("kind: List\nitems:\n"
            "- {apiVersion: pipit.dev/v1, kind: IPPool, metadata: {name: a},\n"
            "   spec: &spec {cidr: 10.50.0.0/24, blockSize: 28, natOutgoing: true}}\n"
            "- apiVersion: pipit.dev/v1\n  kind: IPPool\n  metadata: {name: b}\n"
            "  spec:\n    <<: *spec\n    cidr: 10.51.0.0/24\n")
    assert ok(ctl("apply", "-f", "-", input=text)) == "ippool 'a' created\nippool 'b' created\n"
    spec = yaml.safe_load(ok(ctl("get", "ippool", "b", "-o", "yaml")))["spec"]
    assert (spec["cidr"], spec["blockSize"], spec["natOutgoing"]) == ("10.51.0.0/24", 28, True)


# --------------------------------------------------------------------------------------------
# 11. Where etcd is: the configuration file, and what to do when none was named


def test_a_configuration_file_names_etcd_and_flags_and_environment_win(existing, tmp_path):
    endpoint = existing.endpoints[0]
    closed = f"http://127.0.0.1:{free_port()}"
    config = tmp_path / "pipitctl.yaml"
    config.write_text(yaml.safe_dump({"apiVersion": "pipit.dev/v1", "kind": "PipitctlConfig",
                                      "spec": {"etcdEndpoints": endpoint}}))
    assert "existing" in ok(pipitctl("--config", str(config), "get", "ippools"))
    assert "existing" in ok(pipitctl("get", "ippools", "-c", str(config)))
    one_sentence(pipitctl("get", "ippools", "--config", str(config), endpoints=closed), closed)
    one_sentence(pipitctl("get", "ippools", "--config", str(config), "--etcd-endpoints", closed),
                 closed)
    # relative certificate paths are the file's neighbours
    config.write_text(yaml.safe_dump({"apiVersion": "pipit.dev/v1", "kind": "PipitctlConfig",
                                      "spec": {"etcdEndpoints": endpoint,
                                               "etcdCACertFile": "ca.pem"}}))
    one_sentence(pipitctl("get", "ippools", "--config", str(config)),
                 f"etcd TLS file {tmp_path / 'ca.pem'} does not exist")
    for text, facts in [
            ("kind: CalicoAPIConfig\n", ["must say apiVersion: pipit.dev/v1 and kind: "
                                         "PipitctlConfig"]),
            ("apiVersion: pipit.dev/v1\nkind: PipitctlConfig\nspec: {datastoreType: etcdv3}\n",
             ["unknown spec field 'datastoreType'", "etcdEndpoints"]),
            ("apiVersion: pipit.dev/v1\nkind: PipitctlConfig\nspec: {etcdEndpoints: [a]}\n",
             ["etcdEndpoints must be a string"]),
            ("a: 1\na: 2\n", ["gives key 'a' twice"])]:
        config.write_text(text)
        one_sentence(pipitctl("get", "ippools", "--config", str(config)), str(config), *facts)
    one_sentence(pipitctl("get", "ippools", "--config", str(tmp_path / "nope.yaml")),
                 "nope.yaml does not exist")


def test_the_default_etcd_refusing_says_how_to_name_yours():
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 2379)) == 0:
            pytest.skip("something listens on etcd's default port here")
    one_sentence(pipitctl("get", "ippools"), "cannot reach etcd at http://127.0.0.1:2379",
                 "--etcd-endpoints", "PIPIT_ETCD_ENDPOINTS", "/etc/pipit/pipitctl.yaml")
    # named etcds that refuse get no such advice: the user knows where they pointed
    closed = f"http://127.0.0.1:{free_port()}"
    assert "no etcd was named" not in pipitctl("get", "ippools", endpoints=closed).stderr


# --------------------------------------------------------------------------------------------
# 12. ipam show --show-borrowed, ipam split


def test_show_borrowed_lists_who_borrowed_what_from_whom(etcd, ctl):
    with_store(etcd, lambda s: add_pool(s, "p", "10.13.0.0/28", blockSize=29))
    ok(ctl("ipam", "configure", "--max-blocks-per-host", "1"))
    assign(etcd, ("n1", "a", 6, {"pod": "a"}), ("n2", "b", 1, {"pod": "b"}))
    [borrowed] = assign(etcd, ("n1", "c", 2, {"pod": "c"}))
    out = ok(ctl("ipam", "show", "--show-borrowed")).split("\n\n")[1].splitlines()
    assert out[0].split() == ["ADDRESS", "BLOCK", "BLOCK", "OWNER", "BORROWED", "BY", "HANDLE"]
    block = str(IPv4Network((borrowed[0], 29), strict=False))
    assert sorted(line.split() for line in out[1:]) == sorted(
        [str(a), block, "n2", "n1", "c"] for a in borrowed)


def test_split_keeps_every_block_and_address_and_allocation_goes_on(etcd, ctl):
    ok(ctl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "pipit.dev/v1", "kind": "IPPool",
        "metadata": {"name": "big", "labels": {"team": "net"}},
        "spec": {"cidr": "10.20.0.0/22", "blockSize": 26, "natOutgoing": True}})))
    held = assign(etcd, *[(f"n{i}", f"pod-{i}", 3, {"pod": str(i)}) for i in range(6)])
    before = {k: v for k, (_, v) in snapshot(etcd).items() if not k.startswith(keys.POOLS)}
    assert ok(ctl("ipam", "split", "big", "4")) == (
        "ippool 'split-big-0' created with cidr 10.20.0.0/24\n"
        "ippool 'split-big-1' created with cidr 10.20.1.0/24\n"
        "ippool 'split-big-2' created with cidr 10.20.2.0/24\n"
        "ippool 'split-big-3' created with cidr 10.20.3.0/24\n"
        "ippool 'big' deleted (split into 4)\n")
    after = snapshot(etcd)
    assert {k: v for k, (_, v) in after.items() if not k.startswith(keys.POOLS)} == before
    pools = yaml.safe_load_all(ok(ctl("get", "ippools", "-o", "yaml")))
    for pool in pools:
        assert pool["spec"]["natOutgoing"] is True and pool["spec"]["blockSize"] == 26
        assert pool["metadata"]["labels"] == {"team": "net"}
    assert "no problems found" in ok(ctl("ipam", "check"))
    more = assign(etcd, ("n0", "pod-more", 40, {}))[0]
    assert not set(more) & {a for addresses in held for a in addresses}

    before = snapshot(etcd)
    for args, facts in [(("split-big-0", "3"), ["power of two", "not 3"]),
                        (("split-big-0", "8"), ["/27, smaller than its blockSize /26"]),
                        (("nope", "2"), ["'nope' not found"])]:
        one_sentence(ctl("ipam", "split", *args), *facts)
    assert snapshot(etcd) == before
    ok(ctl("apply", "-f", "-", input=pool_yaml("split-split-big-1-0", cidr="10.30.0.0/16")))
    one_sentence(ctl("ipam", "split", "split-big-1", "2"), "'split-split-big-1-0' exists")
