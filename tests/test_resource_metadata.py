"""metadata on every kind, through the real `pipitctl` against a real etcd: labels and
annotations are stored, shown and checked by Kubernetes' rules."""

from __future__ import annotations

import pytest
import yaml

from bgp_agent.node import NodeRecord, register
from ipam import keys
from ipam.errors import InvalidResource
from tests.helpers import with_store
from tests.pipitctl_support import ok, snapshot
from tests.sentences import one_sentence


def document(kind: str, name: str, spec: dict, **metadata) -> str:
    return yaml.safe_dump({"apiVersion": "pipit.dev/v1", "kind": kind,
                           "metadata": {"name": name, **metadata}, "spec": spec},
                          sort_keys=False)


ONE_OF_EACH = [
    ("IPPool", "pools", "p1", {"cidr": "10.80.0.0/16"}),
    ("BGPPeer", "peers", "tor", {"peerIP": "10.99.1.1", "asNumber": 65101}),
    ("BGPConfiguration", "bgpconfig", "default", {"asNumber": 64512}),
    ("Node", "nodes", "n1", {"bgp": {"ipv4Address": "10.99.0.11/24"}}),
]
LABELS = {"team": "net", "pipit.dev/tier": "edge-1", "empty": ""}
ANNOTATIONS = {"owner": "Alice <alice@example.com>", "example.com/Note": "any text at all\n"}


@pytest.mark.parametrize("kind, plural, name, spec", ONE_OF_EACH,
                         ids=[k for k, *_ in ONE_OF_EACH])
def test_labels_and_annotations_are_stored_shown_and_compared(etcd, ctl, kind, plural, name,
                                                              spec):
    text = document(kind, name, spec, labels=LABELS, annotations=ANNOTATIONS)
    assert ok(ctl("apply", "-f", "-", input=text)).endswith(" created\n")
    [shown] = yaml.safe_load_all(ok(ctl("get", plural, name, "-o", "yaml")))
    assert shown["metadata"]["labels"] == LABELS
    assert shown["metadata"]["annotations"] == ANNOTATIONS
    assert ok(ctl("apply", "-f", "-", input=text)).endswith(" unchanged\n")
    # changing only a label, or only an annotation, is a change
    relabelled = document(kind, name, spec, labels={**LABELS, "team": "ops"},
                          annotations=ANNOTATIONS)
    assert ok(ctl("apply", "-f", "-", input=relabelled)).endswith(" configured\n")
    bare = document(kind, name, spec, labels={**LABELS, "team": "ops"})
    assert ok(ctl("apply", "-f", "-", input=bare)).endswith(" configured\n")
    [shown] = yaml.safe_load_all(ok(ctl("get", plural, name, "-o", "yaml")))
    assert shown["metadata"]["labels"]["team"] == "ops" and "annotations" not in shown["metadata"]


BAD_METADATA = [
    ({"labels": {"bad key!": "x"}}, ["label key 'bad key!'", "NAME at most 63"]),
    ({"labels": {"a" * 64: "x"}}, ["label key", "at most 63"]),
    ({"labels": {"Example.COM/x": "y"}}, ["prefix 'Example.COM'", "DNS subdomain"]),
    ({"labels": {"/x": "y"}}, ["empty prefix"]),
    ({"labels": {"rack": "a b"}}, ["label rack='a b'", "a label value is empty or"]),
    ({"labels": {"rack": "-a"}}, ["label rack='-a'"]),
    ({"labels": {"rack": "x" * 64}}, ["label rack=", "at most 63"]),
    ({"labels": {"rack": 1}}, ["metadata.labels must map strings to strings"]),
    ({"annotations": {"bad key": "x"}}, ["annotation key 'bad key'"]),
    ({"annotations": {"big": "x" * (256 * 1024)}}, ["annotations take 262147 bytes",
                                                     "262144"]),
    ({"annotations": {"n": True}}, ["metadata.annotations must map strings to strings"]),
]


@pytest.mark.parametrize("metadata, facts", BAD_METADATA,
                         ids=[str(i) for i in range(len(BAD_METADATA))])
def test_metadata_breaking_kubernetes_rules_is_one_sentence_and_writes_nothing(etcd, ctl,
                                                                               metadata, facts):
    before = snapshot(etcd)
    for kind, _, name, spec in ONE_OF_EACH:
        result = ctl("apply", "-f", "-", input=document(kind, name, spec, **metadata))
        one_sentence(result, f"{kind} '{name}'", *facts)
    assert snapshot(etcd) == before


def test_the_agent_refuses_labels_no_selector_could_match_and_keeps_annotations(etcd):
    async def scenario(store):
        with pytest.raises(InvalidResource, match="node n1: label key 'bad key!'"):
            await register(store, NodeRecord("n1", labels={"bad key!": "x"}))
        assert await store.get(keys.node_key("n1")) is None
        await store.put(keys.node_key("n1"), {
            "apiVersion": "pipit.dev/v1", "kind": "Node",
            "metadata": {"name": "n1", "labels": {"rack": "a"},
                         "annotations": {"pipit.dev/note": "kept"}}, "spec": {}})
        record = await register(store, NodeRecord("n1", labels={"zone": "z1"}))
        assert record.labels == {"rack": "a", "zone": "z1"}
        stored = (await store.get(keys.node_key("n1"))).value["metadata"]
        assert stored["annotations"]["pipit.dev/note"] == "kept"
    with_store(etcd, scenario)


# --------------------------------------------------------------------------------------------
# resourceVersion: optimistic concurrency for edits


def test_a_stale_edit_is_a_conflict_instead_of_overwriting_someone_elses(etcd, ctl):
    ok(ctl("apply", "-f", "-", input=document("IPPool", "p1", {"cidr": "10.80.0.0/16"})))
    mine = ok(ctl("get", "ippool", "p1", "-o", "yaml"))
    version = yaml.safe_load(mine)["metadata"]["resourceVersion"]
    assert version == str(snapshot(etcd)[keys.pool_key("p1")][0])
    assert ok(ctl("apply", "-f", "-", input=mine)) == "ippool 'p1' unchanged\n"
    # someone else changes the pool...
    theirs = yaml.safe_load(mine)
    theirs["spec"]["natOutgoing"] = True
    assert ok(ctl("apply", "-f", "-", input=yaml.safe_dump(theirs))) == \
        "ippool 'p1' configured\n"
    # ...so my edit of the old copy is refused, and theirs stands
    before = snapshot(etcd)
    edited = yaml.safe_load(mine)
    edited["spec"]["disabled"] = True
    stale = yaml.safe_dump(edited)
    one_sentence(ctl("apply", "-f", "-", input=stale), "ippool 'p1' changed since "
                 f"resourceVersion {version}", "get it again")
    assert snapshot(etcd) == before
    # a document without resourceVersion still applies over whatever is there
    fresh = yaml.safe_load(stale)
    del fresh["metadata"]["resourceVersion"]
    assert ok(ctl("apply", "-f", "-", input=yaml.safe_dump(fresh))) == \
        "ippool 'p1' configured\n"


def test_resource_version_of_a_deleted_object_or_on_create_or_malformed(etcd, ctl):
    ok(ctl("apply", "-f", "-", input=document("IPPool", "p1", {"cidr": "10.80.0.0/16"})))
    shown = ok(ctl("get", "ippool", "p1", "-o", "yaml"))
    ok(ctl("delete", "ippool", "p1"))
    one_sentence(ctl("apply", "-f", "-", input=shown), "ippool 'p1' changed since",
                 "it was deleted")
    one_sentence(ctl("create", "-f", "-", input=shown), "metadata.resourceVersion",
                 "remove it to create one")
    for bad in ("abc", "-1", "0", "1.5", "１２"):
        text = document("IPPool", "p1", {"cidr": "10.80.0.0/16"}, resourceVersion=bad)
        one_sentence(ctl("apply", "-f", "-", input=text), "metadata.resourceVersion",
                     "remove it")
    assert snapshot(etcd) == {}
