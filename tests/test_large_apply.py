"""pipitctl against an etcd holding many resources: etcd takes at most 128 operations per
transaction, so an apply that guarded every stored object of its kind could not be written
past ~125 nodes or pools. With 1,000 nodes and 300 pools stored, applies still work, a file
of 1,000 resources lands whole, and a change that needs several transactions is still all or
nothing when someone else writes in between."""

from __future__ import annotations

import threading
from ipaddress import IPv4Network

import pytest
import yaml

from ipam import keys
from ipam.pool import pool_from_spec, pool_to_document
from ipam.errors import DatastoreUnavailable
from ipam.store import EtcdConfig, Store
from pipitctl import commit as commit_module
from pipitctl.resources import apply_objects, read_objects
from tests.helpers import with_store
from tests.pipitctl_support import ok, snapshot
from tests.sentences import one_sentence

NODES, POOLS = 1000, 300


def node_document(i: int) -> dict:
    return {"apiVersion": "pipit.dev/v1", "kind": "Node",
            "metadata": {"name": f"node-{i:04d}", "labels": {"rack": f"r{i % 20}"}},
            "spec": {"bgp": {"ipv4Address": f"172.{16 + i // 250}.{i % 250}.1/16"}}}


def pool_document(i: int, name: str | None = None) -> dict:
    cidr = IPv4Network((0x0A000000 + (i << 16), 16))  # 10.i.0.0/16 ... 10.255, then 11.x
    return {"apiVersion": "pipit.dev/v1", "kind": "IPPool",
            "metadata": {"name": name or f"pool-{i:03d}"},
            "spec": {"cidr": str(cidr), "blockSize": 26}}


def dump(documents: list[dict]) -> str:
    return yaml.safe_dump_all(documents, sort_keys=False)


def test_a_thousand_nodes_and_three_hundred_pools(etcd, ctl, tmp_path):
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text(dump([node_document(i) for i in range(NODES)]))
    out = ok(ctl("apply", "-f", str(nodes))).splitlines()
    assert len(out) == NODES and all(line.endswith(" created") for line in out)
    stored = snapshot(etcd)
    assert len([k for k in stored if k.startswith(keys.NODES)]) == NODES

    before = snapshot(etcd)
    out = ok(ctl("apply", "-f", str(nodes))).splitlines()
    assert len(out) == NODES and all(line.endswith(" unchanged") for line in out)
    assert snapshot(etcd) == before

    # one more node, and a peer that rests on the nodes, beside 1,000 stored nodes
    assert ok(ctl("apply", "-f", "-", input=dump([node_document(NODES)]))) == \
        f"node 'node-{NODES:04d}' created\n"
    peer = {"apiVersion": "pipit.dev/v1", "kind": "BGPPeer", "metadata": {"name": "tor"},
            "spec": {"peerIP": "10.99.1.1", "asNumber": 65101, "nodeSelector": "rack == 'r1'"}}
    assert ok(ctl("apply", "-f", "-", input=dump([peer]))) == "bgppeer 'tor' created\n"

    pools = tmp_path / "pools.yaml"
    pools.write_text(dump([pool_document(i) for i in range(1, POOLS + 1)]))
    out = ok(ctl("apply", "-f", str(pools))).splitlines()
    assert len(out) == POOLS and all(line.endswith(" created") for line in out)
    assert ok(ctl("apply", "-f", "-", input=dump([pool_document(POOLS + 1)]))) == \
        f"ippool 'pool-{POOLS + 1:03d}' created\n"
    # the overlap check still sees every stored pool
    before = snapshot(etcd)
    one_sentence(ctl("apply", "-f", "-", input=dump([pool_document(7, "intruder")])),
                 "overlaps pool 'pool-007'")
    assert snapshot(etcd) == before
    assert len(ok(ctl("get", "nodes")).splitlines()) == NODES + 2  # header, 1,001 nodes


# --------------------------------------------------------------------------------------------
# All or nothing across transactions


def pools_file(count: int) -> list:
    return read_objects(dump([pool_document(i) for i in range(1, count + 1)]))


@pytest.fixture
def interference(monkeypatch):
    """Runs `action(store)` once, right after the first transaction of a change lands (another
    writer, or etcd going away)."""
    actions = []
    real = commit_module._txn

    async def txn(store, compares, operations):
        result = await real(store, compares, operations)
        if result[0] and actions:
            await actions.pop()(store)
        return result
    monkeypatch.setattr(commit_module, "_txn", txn)
    return actions.append


def test_a_write_between_parts_undoes_them_and_the_apply_decides_again(etcd, interference):
    """A pool created elsewhere while 250 pools are being written: the parts already written
    are undone and the apply runs again on what is there now, so the file lands whole."""
    async def other_writer(store: Store):
        pool = pool_from_spec("elsewhere", {"cidr": "172.16.0.0/16"})
        await store.put(keys.pool_key("elsewhere"), pool_to_document(pool))

    interference(other_writer)

    async def scenario(store: Store):
        lines = await apply_objects(store, pools_file(250))
        assert len(lines) == 250 and all(line.endswith(" created") for line in lines)
        names = {k.removeprefix(keys.POOLS) for k in await store.list_keys(keys.POOLS)}
        assert len(names) == 251 and "elsewhere" in names
    with_store(etcd, scenario)


def test_an_overlap_appearing_between_parts_leaves_nothing_of_the_file(etcd, interference):
    async def overlapping_writer(store: Store):
        pool = pool_from_spec("squatter", {"cidr": "10.200.0.0/16"})  # = pool-200's
        await store.put(keys.pool_key("squatter"), pool_to_document(pool))

    interference(overlapping_writer)

    async def scenario(store: Store):
        from ipam.errors import InvalidResource
        with pytest.raises(InvalidResource, match="document 200: .* overlaps pool 'squatter'"):
            await apply_objects(store, pools_file(250))
        assert [k.removeprefix(keys.POOLS) for k in await store.list_keys(keys.POOLS)] == \
            ["squatter"]
    with_store(etcd, scenario)


def test_a_split_into_many_pools_undone_between_parts_keeps_the_pool_it_deleted(
        etcd, interference):
    """A split into 256 pools is three transactions, the first deleting the pool split. A pool
    written elsewhere after the first: the undo must bring the deleted pool back (its key is
    absent, not at the revision of our write) and the split then runs again on what is there."""
    from pipitctl.split import split_stored_pool

    async def other_writer(store: Store):
        pool = pool_from_spec("elsewhere", {"cidr": "172.16.0.0/16"})
        await store.put(keys.pool_key("elsewhere"), pool_to_document(pool))

    async def scenario(store: Store):
        pool = pool_from_spec("big", {"cidr": "10.0.0.0/16", "blockSize": 26})
        await store.put(keys.pool_key("big"), pool_to_document(pool))
        interference(other_writer)
        new = await split_stored_pool(store, "big", 256)
        names = {k.removeprefix(keys.POOLS) for k in await store.list_keys(keys.POOLS)}
        assert names == {p.name for p in new} | {"elsewhere"} and len(new) == 256
    with_store(etcd, scenario)


def test_an_undo_whose_keys_were_deleted_puts_them_back(etcd):
    """The undo alone: a part that deleted a key and wrote another, undone."""
    async def scenario(store: Store):
        await store.put("/pipit/test/a", {"v": 1})
        entry = await store.get("/pipit/test/a")
        writes = [commit_module.Write("/pipit/test/a", entry.mod_revision, None, old={"v": 1}),
                  commit_module.Write("/pipit/test/b", 0, {"v": 2})]
        succeeded, revision = await commit_module._txn(
            store, [commit_module._key_unchanged(w.key, w.revision) for w in writes],
            [commit_module._operation(w.key, w.value) for w in writes])
        assert succeeded
        await commit_module._put_back(store, commit_module._restores([(writes, revision)]))
        assert await store.snapshot("/pipit/test/") == {"/pipit/test/a": {"v": 1}}
    with_store(etcd, scenario)


def test_an_undo_cut_short_and_resumed_still_names_the_key_someone_else_changed(
        etcd, monkeypatch):
    """etcd lost in the middle of a change: its undo finds one key changed by someone else
    (theirs stands), then etcd goes away again before the next key is put back. Tried again,
    the undo puts that one back and still says the first could not be (it had forgotten it,
    and said everything of the change was undone)."""
    from ipam.errors import Conflict
    real_txn, calls = commit_module._txn, []

    async def txn_cut_once(store, compares, operations):
        calls.append(len(operations))
        if len(calls) == 3:  # the whole chunk, then key a alone, then b: cut short
            raise DatastoreUnavailable("cannot reach etcd at the test's endpoint.")
        return await real_txn(store, compares, operations)

    async def scenario(store: Store):
        writes = [commit_module.Write("/pipit/test/a", 0, {"v": 1}),
                  commit_module.Write("/pipit/test/b", 0, {"v": 2})]
        succeeded, revision = await real_txn(
            store, [commit_module._key_unchanged(w.key, 0) for w in writes],
            [commit_module._operation(w.key, w.value) for w in writes])
        assert succeeded
        await store.put("/pipit/test/a", {"v": "theirs"})
        monkeypatch.setattr(commit_module, "_txn", txn_cut_once)
        monkeypatch.setattr(commit_module, "UNDO_PAUSE", 0)
        outage = DatastoreUnavailable("cannot reach etcd at the test's endpoint.")
        next_part = [commit_module.Write("/pipit/test/c", 0, {"v": 3})]  # never written
        with pytest.raises(Conflict) as raised:  # etcd lost while writing the next part
            await commit_module._after_outage(store, [(writes, revision)], next_part, False, 2,
                                              outage)
        assert len(calls) == 4  # the undo was tried again after the cut
        one_sentence(str(raised.value), "1 of the keys written could not be put back",
                     "/pipit/test/a")
        assert await store.snapshot("/pipit/test/") == {"/pipit/test/a": {"v": "theirs"}}
    with_store(etcd, scenario)


# --------------------------------------------------------------------------------------------
# etcd going away in the middle of a change written in parts


def test_etcd_gone_between_parts_and_back_leaves_nothing_of_the_file(
        own_etcd, interference, monkeypatch):
    monkeypatch.setattr(commit_module, "UNDO_ATTEMPTS", 60)  # however long etcd takes to start
    config = EtcdConfig(endpoints=(own_etcd.endpoint,))
    restart = threading.Thread(target=own_etcd.start)

    async def outage(store: Store):
        own_etcd.stop()
        restart.start()  # back while the undo is tried again
    interference(outage)

    async def scenario(store: Store):
        with pytest.raises(DatastoreUnavailable) as raised:
            await apply_objects(store, pools_file(250))
        restart.join()
        one_sentence(str(raised.value), "cannot reach etcd",
                     "what was written of the change was undone, so nothing of it stays")
        assert await store.list_keys(keys.POOLS) == []
    try:
        with_store(config, scenario)
    finally:
        if restart.is_alive():
            restart.join()


def test_etcd_gone_for_good_between_parts_says_the_change_is_partly_written(
        own_etcd, interference, monkeypatch):
    monkeypatch.setattr(commit_module, "UNDO_PAUSE", 0.1)
    config = EtcdConfig(endpoints=(own_etcd.endpoint,))

    async def outage(store: Store):
        own_etcd.stop()
    interference(outage)

    async def scenario(store: Store):
        with pytest.raises(DatastoreUnavailable) as raised:
            await apply_objects(store, pools_file(250))
        one_sentence(str(raised.value), "cannot reach etcd", "the change is partly written "
                     "(1 of its 3 etcd transactions) and could not be undone",
                     "check with `pipitctl get` once etcd answers, then apply it again")
    with_store(config, scenario)
    own_etcd.start()
    written = with_store(config, lambda store: store.list_keys(keys.POOLS))
    assert 0 < len(written) < 250  # what the sentence said: the first part is there


def losing_answers(monkeypatch, *which: int):
    """etcd's answers to the `which`-th transactions (counted from 1) of a change lost after
    they were written, as a connection cut after the request went out loses them."""
    real, count = commit_module._txn, [0]

    async def txn(store, compares, operations):
        result = await real(store, compares, operations)
        count[0] += 1
        if count[0] in which:
            lost = DatastoreUnavailable(f"etcd at {store.config.describe()} did not answer "
                                        "within 5 s.")
            lost.maybe_written = True
            raise lost
        return result
    monkeypatch.setattr(commit_module, "_txn", txn)
    return count


@pytest.mark.parametrize("count, parts", [(3, 1), (250, 3)])
def test_a_change_whose_last_answer_was_lost_has_landed(etcd, monkeypatch, count, parts):
    transactions = losing_answers(monkeypatch, parts)

    async def scenario(store: Store):
        lines = await apply_objects(store, pools_file(count))
        assert len(lines) == count and all(line.endswith(" created") for line in lines)
        assert len(await store.list_keys(keys.POOLS)) == count
    with_store(etcd, scenario)
    assert transactions == [parts]  # the lost one was the last


def test_a_lost_answer_to_a_written_first_part_is_undone_with_the_rest(etcd, monkeypatch):
    losing_answers(monkeypatch, 1)

    async def scenario(store: Store):
        with pytest.raises(DatastoreUnavailable, match="undone, so nothing of it stays"):
            await apply_objects(store, pools_file(250))
        assert await store.list_keys(keys.POOLS) == []
    with_store(etcd, scenario)


def test_an_undo_cut_short_by_etcd_goes_on_from_where_it_stopped(etcd, monkeypatch):
    """Three parts: the third finds no etcd; putting back the second works, then etcd is away
    for the first; the next try puts back the first only (the second, already back, is not
    put back again, which would fail its guard and count its keys as lost)."""
    monkeypatch.setattr(commit_module, "UNDO_PAUSE", 0.1)
    real, calls = commit_module._txn, [0]

    async def txn(store, compares, operations):
        calls[0] += 1
        if calls[0] in (3, 5):  # the third part, then the second put-back: etcd away
            raise DatastoreUnavailable(f"cannot reach etcd at {store.config.describe()}: "
                                       "connection refused.")
        return await real(store, compares, operations)
    monkeypatch.setattr(commit_module, "_txn", txn)

    async def scenario(store: Store):
        with pytest.raises(DatastoreUnavailable, match="undone, so nothing of it stays"):
            await apply_objects(store, pools_file(250))
        assert await store.list_keys(keys.POOLS) == []
    with_store(etcd, scenario)
    assert calls == [6]  # 3 parts, put back: the second, the first (away), the first again
