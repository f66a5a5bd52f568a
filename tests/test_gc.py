"""Leak GC decisions (ipam/gc.py), by property over generated IPAM snapshots and Kubernetes
states: nothing valid is ever released, nothing before its grace period unless its node is
gone, every leak once its grace is over, handles all or none, never a node's last block, empty
blocks only on the second sighting; and the etcd side (ipam.release.release_leaks) that
re-validates each address by its sequence number."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from hypothesis import given, settings
from hypothesis import strategies as st

from ipam import block as blocks
from ipam import gc, keys
from ipam.allocator import IPAM
from ipam.release import release_leaks
from ipam.snapshot import Snapshot, load_snapshot
from tests.helpers import add_pool, with_store

NODES = ("n0", "n1", "n2", "n3")
POD_STATES = ("missing", "all", "first", "none", "other", "elsewhere", "evicted")
GRACE = 900.0


@st.composite
def worlds(draw):
    """(snapshot, cluster): nodes with records in and out of Kubernetes or none, blocks, pod
    addresses (several per handle, borrowed ones too), tunnel addresses, allocations of unknown
    owners, and pods in every state."""
    snap = Snapshot()
    kinds = {n: draw(st.sampled_from(("k8s", "plain", "none"))) for n in NODES}
    for node, kind in kinds.items():
        if kind != "none":
            snap.nodes.add(node)
            snap.kubernetes_nodes[node] = node if kind == "k8s" else None
    kube_nodes = frozenset(n for n in NODES if draw(st.booleans()))
    cidrs = iter(IPv4Network(f"10.0.{i}.0/29") for i in range(256))
    for node in NODES:
        for _ in range(draw(st.integers(0, 3))):
            cidr = next(cidrs)
            snap.blocks[cidr] = blocks.new_block(cidr, node)
            snap.affinities[(node, cidr)] = "confirmed"
    if not snap.blocks:
        return snap, gc.Cluster(kube_nodes, {})
    handle_node = {}
    pod_states = {}
    for _ in range(draw(st.integers(0, 30))):
        cidr = draw(st.sampled_from(sorted(snap.blocks)))
        kind = draw(st.sampled_from(("pod", "pod", "pod", "tunnel", "other")))
        if kind == "tunnel":
            node = draw(st.sampled_from(NODES))
            handle, attrs = f"ipip-tunnel-addr-{node}", {"node": node, "type": "ipip-tunnel"}
        elif kind == "other":
            handle, attrs = f"other{draw(st.integers(0, 2))}", {"node": snap.blocks[cidr].node}
        else:
            handle = f"pod{draw(st.integers(0, 9))}"
            node = handle_node.setdefault(handle, draw(st.sampled_from(NODES)))
            pod_states.setdefault(handle, draw(st.sampled_from(POD_STATES)))
            attrs = {"node": node, "namespace": "ns", "pod": handle}
        if kind != "pod":
            holder = next((a for b in snap.blocks.values() for a in b.attributes
                           if a.handle_id == handle), None)
            if holder is not None:
                attrs = dict(holder.secondary)
        snap.blocks[cidr], _ = blocks.assign(snap.blocks[cidr], 1, handle, attrs)
    pods = {}
    for handle, state in pod_states.items():
        held = sorted(a for b in snap.blocks.values() for a in blocks.addresses_of(b, handle))
        node = handle_node[handle]
        ips = {"all": held, "first": held[:1], "other": [IPv4Address("192.0.2.1")]}.get(
            state, [])
        if state != "missing":
            pods[("ns", handle)] = gc.Pod("ns", handle,
                                          "elsewhere" if state == "elsewhere" else node,
                                          frozenset(ips), state == "evicted")
    return snap, gc.Cluster(kube_nodes, pods)


def kube_of(snap, node):
    return gc.kubernetes_node(snap, node)


def valid(snap, cluster, allocation: gc.Allocation) -> bool:
    """Whether the rules protect this allocation whatever the time."""
    kube = kube_of(snap, allocation.node)
    if kube is None:
        return True
    if allocation.tunnel:
        return kube in cluster.nodes
    return gc.invalid_reason(allocation, cluster.pods, kube) is None


def released_addresses(result: gc.Plan) -> set[IPv4Address]:
    return {r.address for leak in result.leaks for r in leak.releases}


@settings(max_examples=100, deadline=None)
@given(worlds(), st.floats(0, 5 * GRACE))
def test_nothing_valid_is_ever_released(world, elapsed):
    snap, cluster = world
    first = gc.plan(snap, cluster, gc.State(), now=0.0, grace=GRACE)
    second = gc.plan(snap, cluster, first.state, now=elapsed, grace=GRACE)
    by_handle = {}
    for allocation in gc.allocations(snap):
        by_handle.setdefault(allocation.handle_id, []).append(allocation)
    for result in (first, second):
        for leak in result.leaks:
            held = by_handle[leak.handle_id]
            # all or none: the leak names every address of the handle, none of them valid
            assert {r.address for r in leak.releases} == {a.address for a in held}
            assert not any(valid(snap, cluster, a) for a in held), leak
            assert all(r.sequence == a.sequence for r, a in zip(leak.releases, held))


@settings(max_examples=100, deadline=None)
@given(worlds())
def test_no_release_within_the_grace_period_unless_the_node_is_gone(world):
    snap, cluster = world
    result = gc.plan(snap, cluster, gc.State(), now=1000.0, grace=GRACE)
    again = gc.plan(snap, cluster, result.state, now=1000.0 + GRACE - 1, grace=GRACE)
    for leak in result.leaks + again.leaks:
        assert kube_of(snap, leak.node) not in cluster.nodes, leak


@settings(max_examples=100, deadline=None)
@given(worlds())
def test_every_leak_is_released_once_its_grace_is_over(world):
    snap, cluster = world
    first = gc.plan(snap, cluster, gc.State(), now=0.0, grace=GRACE)
    second = gc.plan(snap, cluster, first.state, now=GRACE, grace=GRACE)
    released = released_addresses(first) | released_addresses(second)
    by_handle = {}
    for allocation in gc.allocations(snap):
        by_handle.setdefault(allocation.handle_id, []).append(allocation)
    for handle, held in by_handle.items():
        if all(not a.tunnel and not valid(snap, cluster, a) for a in held):
            assert {a.address for a in held} <= released, handle


@settings(max_examples=100, deadline=None)
@given(worlds())
def test_tunnel_addresses_go_only_with_their_node(world):
    snap, cluster = world
    result = gc.plan(snap, cluster, gc.State(), now=0.0, grace=GRACE)
    cleaned = set(result.nodes)
    for leak in result.leaks:
        if leak.handle_id.startswith("ipip-tunnel-addr-"):
            assert leak.node in cleaned
    for node in cleaned:  # cleaned up: nothing valid left on it
        assert kube_of(snap, node) not in cluster.nodes
        assert not any(a.node == node and not a.tunnel and valid(snap, cluster, a)
                       for a in gc.allocations(snap))


@settings(max_examples=100, deadline=None)
@given(worlds(), st.integers(1, 4))
def test_empty_blocks_go_on_the_second_sighting_never_a_nodes_last(world, passes):
    snap, cluster = world
    state, now = gc.State(), 0.0
    owners = {b.node for b in snap.blocks.values()}
    for number in range(passes):
        result = gc.plan(snap, cluster, state, now=now, grace=GRACE)
        if number == 0:
            assert result.empty_blocks == ()
        for node, cidr in result.empty_blocks:
            assert snap.blocks[cidr].empty and snap.blocks[cidr].node == node
            assert cidr in state.empty_blocks
            del snap.blocks[cidr]
            del snap.affinities[(node, cidr)]
        for node in owners - set(result.nodes):  # never a node's last block
            assert any(b.node == node for b in snap.blocks.values()), node
        state, now = result.state, now + 1.0


def test_a_pod_restarted_under_its_name_frees_its_old_address_only():
    """The new pod (same name, new container, new address) keeps its address; the old one is
    a candidate, released after the grace period."""
    snap = Snapshot(nodes={"n1"}, kubernetes_nodes={"n1": "n1"})
    cidr = IPv4Network("10.0.0.0/29")
    block = blocks.new_block(cidr, "n1")
    attrs = {"node": "n1", "namespace": "ns", "pod": "web-0"}
    block, [old] = blocks.assign(block, 1, "net.c1.eth0", attrs)
    block, [new] = blocks.assign(block, 1, "net.c2.eth0", attrs)
    snap.blocks[cidr] = block
    cluster = gc.Cluster(frozenset({"n1"}), {("ns", "web-0"): gc.Pod("ns", "web-0", "n1",
                                                                       frozenset({new}))})
    first = gc.plan(snap, cluster, gc.State(), now=0.0, grace=60)
    assert first.leaks == () and first.waiting == 1
    second = gc.plan(snap, cluster, first.state, now=60, grace=60)
    assert [(leak.handle_id, released_addresses(second)) for leak in second.leaks] == \
        [("net.c1.eth0", {old})]
    assert "has 10.0.0.2, not 10.0.0.1" in second.leaks[0].reason


def test_a_floating_ip_is_valid_while_its_pod_has_the_address_it_leads_to():
    """A pod's floating IP is never the pod's reported IP: it is judged by the address it
    leads to, and goes (after the grace) with the sandbox it was given to."""
    snap = Snapshot(nodes={"n1"}, kubernetes_nodes={"n1": "n1"})
    cidr = IPv4Network("10.0.0.0/29")
    block = blocks.new_block(cidr, "n1")
    attrs = {"node": "n1", "namespace": "ns", "pod": "web-0"}
    block, [old] = blocks.assign(block, 1, "net.c1.eth0", attrs)
    block, [old_floating] = blocks.assign(block, 1, "net.c1.eth0.floating", {
        **attrs, blocks.FLOATING_FOR: str(old), blocks.ATTACHMENT: "net.c1.eth0"})
    snap.blocks[cidr] = block
    running = gc.Cluster(frozenset({"n1"}), {("ns", "web-0"): gc.Pod("ns", "web-0", "n1",
                                                                     frozenset({old}))})
    assert gc.plan(snap, running, gc.State(), now=0.0, grace=60).waiting == 0
    block, [new] = blocks.assign(block, 1, "net.c2.eth0", attrs)  # restarted: a new sandbox
    snap.blocks[cidr] = block
    restarted = gc.Cluster(running.nodes, {("ns", "web-0"): gc.Pod("ns", "web-0", "n1",
                                                                   frozenset({new}))})
    first = gc.plan(snap, restarted, gc.State(), now=0.0, grace=60)
    second = gc.plan(snap, restarted, first.state, now=60, grace=60)
    assert {leak.handle_id: released for leak in second.leaks
            for released in [{r.address for r in leak.releases}]} == {
        "net.c1.eth0": {old}, "net.c1.eth0.floating": {old_floating}}
    assert "has 10.0.0.3, not 10.0.0.1" in second.leaks[1].reason


def test_load_balancer_addresses_are_left_to_their_controller(etcd):
    """Addresses on the virtual node `load-balancer` (controller.load_balancer's): no
    Kubernetes Node has that name and no record exists, yet the GC judges none of them and
    never cleans that node up, even when its block is empty; `ipam check` finds nothing."""
    async def scenario(store):
        await add_pool(store, "public", "203.0.113.0/28", blockSize=28,
                       allowedUses=["LoadBalancer"])
        ipam = IPAM(store)
        [address] = await ipam.assign("load-balancer", "lb.web.shop", use="LoadBalancer",
                                      attributes={"namespace": "web", "service": "shop"})
        assert await ipam.addresses_under("lb.") == {"lb.web.shop": [address]}
        assert await ipam.addresses_under("lb.web.shop") == {
            "lb.web.shop": await ipam.addresses("lb.web.shop")}
        snap = await load_snapshot(store)
        cluster = gc.Cluster(frozenset({"n1"}), {})
        first = gc.plan(snap, cluster, gc.State(), now=0.0, grace=0)
        assert (first.leaks, first.nodes, first.kept) == ((), (), ())
        from ipam.snapshot import check
        assert check(snap) == []
        await ipam.release("load-balancer", "lb.web.shop")
        empty = await load_snapshot(store)
        second = gc.plan(empty, cluster, first.state, now=1.0, grace=0)
        assert (second.nodes, second.empty_blocks) == ((), ())  # its only block stays
        return address
    assert with_store(etcd, scenario) in IPv4Network("203.0.113.0/28")


# -- etcd: releasing what was decided, re-validated ---------------------------------------------

def test_release_leaks_takes_only_what_is_still_that_allocation(etcd):
    async def scenario(store):
        await add_pool(store, "p", "10.9.0.0/28", blockSize=30)
        ipam = IPAM(store)
        for name in ("a", "b", "c"):
            await ipam.assign("n1", name, count=2 if name == "a" else 1,
                              attributes={"namespace": "ns", "pod": name})
        snap = await load_snapshot(store)
        cluster = gc.Cluster(frozenset(), {})  # node n1 gone: everything is a leak
        leaks = gc.plan(snap, cluster, gc.State(), now=0.0).leaks
        assert {leak.handle_id for leak in leaks} == {"a", "b", "c"}
        # since the snapshot: b freed and its address given to d (a new allocation)
        [b_address] = await ipam.release("n1", "b")
        await ipam.assign("n1", "d", attributes={"namespace": "ns", "pod": "d"})
        assert await ipam.addresses("d") == [b_address]
        released = await release_leaks(store, leaks)
        assert sorted(released) == ["a", "c"]
        assert await ipam.addresses("a") == [] and await ipam.addresses("c") == []
        assert await ipam.addresses("d") == [b_address]  # the new holder keeps it
        assert await release_leaks(store, leaks) == []  # nothing twice
        after = await load_snapshot(store)
        assert set(after.handles) == {"d"}
        from ipam.snapshot import check
        assert check(after) == []
        return True
    assert with_store(etcd, scenario)


def test_release_leaks_batches_many_handles_per_transaction(etcd):
    async def scenario(store):
        await add_pool(store, "p", "10.9.0.0/22", blockSize=26)
        ipam = IPAM(store)
        for i in range(120):
            await ipam.assign(f"n{i % 4}", f"h{i}", attributes={"namespace": "ns",
                                                                "pod": f"p{i}"})
        snap = await load_snapshot(store)
        leaks = gc.plan(snap, gc.Cluster(frozenset(), {}), gc.State(), now=0.0).leaks
        before = (await store.get(keys.ROOT + "x")) is None
        released = await release_leaks(store, leaks)
        assert before and len(released) == 120
        assert (await load_snapshot(store)).handles == {}
        return True
    assert with_store(etcd, scenario)
