"""etcd full: its NOSPACE alarm raised, it takes reads and deletes and no other write until an
operator frees space. pipitctl says so in one sentence naming the fix and writes nothing; an
agent started meanwhile waits, as for an etcd away, instead of exiting into a restart
back-off; a CNI ADD is told to try again later, with the reason. Once freed as the sentence
says, each works again without a restart."""

from __future__ import annotations

import json
import signal

import pytest

from ipam import cni
from ipam.store import EtcdConfig
from lab.etcd import EtcdServer
from lab.process import wait
from tests.helpers import add_pool, fill_etcd, free_etcd, started_now, with_store
from tests.pipitctl_support import ok, pipitctl, snapshot
from tests.sentences import one_sentence
from tests.test_agent_lifecycle import logged, no_bgp_agent, node_record

POOL = """apiVersion: pipit.dev/v1
kind: IPPool
metadata: {name: p1}
spec: {cidr: 10.50.0.0/16, blockSize: 26}
"""


@pytest.fixture
def small_etcd(tmp_path):
    """An etcd of 2 MB (its default is 2 GiB), quick to fill."""
    server = EtcdServer(data_dir=tmp_path / "etcd", quota_bytes=2_000_000)
    server.start()
    yield server
    server.destroy()


def test_pipitctl_says_how_to_free_a_full_etcd_and_works_once_it_is_freed(small_etcd):
    endpoint = small_etcd.endpoint
    fill_etcd(endpoint)
    result = pipitctl("apply", "-f", "-", input=POOL, endpoints=endpoint)
    one_sentence(result, f"etcd at {endpoint} is full (etcdserver: mvcc: database space "
                 "exceeded)", "etcdctl compact, etcdctl defrag, etcdctl alarm disarm")
    config = EtcdConfig(endpoints=(endpoint,))
    assert not [k for k in snapshot(config) if "ippools" in k]
    free_etcd(endpoint)
    ok(pipitctl("apply", "-f", "-", input=POOL, endpoints=endpoint))
    assert [k for k in snapshot(config) if "ippools" in k]


def test_an_agent_started_on_a_full_etcd_waits_until_it_is_freed(small_etcd, short_dir):
    config = EtcdConfig(endpoints=(small_etcd.endpoint,))
    fill_etcd(small_etcd.endpoint)
    conflist = short_dir / "net.d" / "10-pipit.conflist"
    agent = no_bgp_agent(config, short_dir)
    with started_now(agent) as process:
        wait(logged(agent.log_path, "node node-1 not registered yet, trying again: etcd at "
                    f"{small_etcd.endpoint} is full"), 20, "the agent saying it waits")
        assert agent.running and not conflist.exists()
        free_etcd(small_etcd.endpoint)
        wait(conflist.exists, 30, "the conflist, once registered")
        assert node_record(config, "node-1") is not None
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0


def add(socket_path, container: str) -> dict:
    """A CNI ADD through the pipit-ipam plugin, as a runtime makes it."""
    config = {"cniVersion": "1.0.0", "name": "pipit-net", "type": "ptp",
              "ipam": {"type": "pipit-ipam", "pools": ["p1"], "socket": str(socket_path)}}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": container, "CNI_IFNAME": "eth0",
           "CNI_NETNS": "/var/run/netns/x"}
    try:
        return cni.run("ADD", env, json.dumps(config))
    except cni.CNIError as error:
        return {"code": error.code, "msg": error.msg}


def test_a_cni_add_on_a_full_etcd_is_told_to_try_again_and_succeeds_once_freed(
        small_etcd, short_dir):
    config = EtcdConfig(endpoints=(small_etcd.endpoint,))
    with_store(config, lambda store: add_pool(store, "p1", "10.50.0.0/16", blockSize=26))
    with no_bgp_agent(config, short_dir) as agent:
        wait(lambda: node_record(config, "node-1") is not None, 30, "the node registered")
        fill_etcd(small_etcd.endpoint)
        answer = add(agent.socket_path, "c-1")
        assert answer["code"] == cni.TRY_AGAIN_LATER
        assert f"etcd at {small_etcd.endpoint} is full" in answer["msg"], answer
        assert agent.running
        free_etcd(small_etcd.endpoint)
        answer = add(agent.socket_path, "c-2")
        assert answer.get("ips"), answer
