"""Label sync from Kubernetes Nodes to node records, so that pools' and peers' nodeSelectors
can use topology.kubernetes.io/zone and friends.

The labels a record got from Kubernetes are remembered in its annotation
`pipit.dev/kube-labels` (JSON), so that a label removed from the Node is removed from the
record too, while labels set on the record by hand (`pipitctl apply`, `--labels`) stay.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import replace

from bgp_agent.node import NodeRecord, node_from_document, node_to_document
from ipam import keys
from ipam.errors import PipitError
from ipam.store import Store
from ipam.txn import Changes, transact

log = logging.getLogger(__name__)

SYNCED = "pipit.dev/kube-labels"


def synced_labels(record: NodeRecord, kube_labels: Mapping[str, str]) -> NodeRecord:
    """The record with the Node's labels: those it had from Kubernetes and the Node no longer
    has are removed, every label of the Node is set, the others are kept."""
    try:
        before = json.loads(record.annotations.get(SYNCED, "{}"))
        if not isinstance(before, dict):
            before = {}
    except ValueError:
        before = {}
    labels = {k: v for k, v in record.labels.items() if k not in before or k in kube_labels}
    labels.update(kube_labels)
    annotations = {**record.annotations,
                   SYNCED: json.dumps(dict(sorted(kube_labels.items())),
                                      separators=(",", ":"))}
    return replace(record, labels=labels, annotations=annotations)


async def sync_node_labels(store: Store, nodes: Mapping[str, Mapping[str, str]]) -> list[str]:
    """Bring every node record that belongs to a Kubernetes Node in `nodes` (name -> labels)
    up to date; returns the records changed."""
    changed: list[str] = []
    for entry in await store.list(keys.NODES):
        try:
            record = node_from_document(entry.value)
        except PipitError:
            continue
        if record.kubernetes_node not in nodes:
            continue
        if synced_labels(record, nodes[record.kubernetes_node]) == record:
            continue

        async def decide(changes: Changes, key=entry.key) -> bool:
            current = await changes.get(key)
            if current is None:
                return False
            stored = node_from_document(current.value)
            updated = synced_labels(stored, nodes[stored.kubernetes_node])
            if updated != stored:
                changes.put(key, node_to_document(updated))
            return updated != stored
        if await transact(store, decide, f"syncing the labels of node {record.name}"):
            log.info("node %s: labels synced from Kubernetes Node %s", record.name,
                     record.kubernetes_node)
            changed.append(record.name)
    return changed
