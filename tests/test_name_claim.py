"""One agent per node name (bgp_agent.name_claim), against a real etcd: a name is taken when
free, its lease lapsed, or held from the same host (an agent restarting); held from another
host, the newcomer waits for that claim to lapse and stops in one sentence if it is still
renewed; a claim that lapsed while etcd was away is taken again. End to end: two agents
given one name on two hosts (network namespaces), the second stops naming the first."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bgp_agent import name_claim
from bgp_agent.name_claim import Holder, claim_node_name, holder_of, may_take, this_host
from ipam import keys
from ipam.errors import InvalidResource
from ipam.store import EtcdConfig, Entry, Store
from lab.agent import AgentProcess
from lab.etcd import EtcdServer
from lab.netns import Namespaces, exec_prefix
from lab.process import wait, wait_async
from tests.sentences import one_sentence

ROOT = Path(__file__).resolve().parents[1]
HERE = Holder("boot-a/net:1", "alpha", 100, "2026-12-05T00:00:00Z")
THERE = Holder("boot-b/net:1", "beta", 200, "2026-12-05T00:00:01Z")


def entry(value, lease: int = 7) -> Entry:
    return Entry(keys.agent_key("n1"), value, 5, lease)


@pytest.mark.parametrize("stored, free_for_here", [
    (None, True),
    (entry(vars(HERE)), True),  # this host's: an agent restarting
    (entry({**vars(HERE), "pid": 999}), True),
    (entry(vars(THERE)), False),
    (entry(vars(THERE), lease=0), True),  # no lease: written by hand, nobody's
    (entry({"host": "x"}), True),  # not a holder
    (entry(None), True),
])
def test_who_may_take_a_name(stored, free_for_here):
    assert may_take(stored, HERE) is free_for_here
    assert (holder_of(stored) is not None and holder_of(stored).host != HERE.host) is \
        (not free_for_here)


def test_this_host_is_the_same_for_every_agent_of_a_network_namespace():
    here = this_host()
    assert here.host == this_host().host
    inside = subprocess.run(
        ["unshare", "--net", sys.executable, "-c",
         "from bgp_agent.name_claim import this_host; print(this_host().host)"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert inside != here.host and inside.split("/")[0] == here.host.split("/")[0]


def scenario(etcd: EtcdConfig, body):
    async def run():
        async with Store(etcd) as store:
            return await body(store)
    return asyncio.run(run())


def test_a_name_is_taken_when_free_or_from_the_same_host(etcd):
    async def body(store):
        stop = asyncio.Event()
        first = await claim_node_name(store, "n1", stop, me=HERE)
        again = await claim_node_name(store, "n1", stop, me=replace(HERE, pid=101))
        assert again.lease != first.lease  # the restarted agent's own lease
        stored = await store.get(keys.agent_key("n1"))
        assert stored.value["pid"] == 101 and stored.lease == again.lease
        await name_claim.release(store, again)
        assert await store.get(keys.agent_key("n1")) is None
        other = await claim_node_name(store, "n1", stop, me=THERE)
        assert holder_of(await store.get(keys.agent_key("n1"))) == THERE
        await name_claim.release(store, other)
    scenario(etcd, body)


def test_another_hosts_claim_still_renewed_is_one_sentence_and_one_lapsing_is_waited_for(etcd):
    async def body(store):
        stop = asyncio.Event()
        held = await claim_node_name(store, "n1", stop, me=THERE)
        with pytest.raises(InvalidResource) as error:
            await claim_node_name(store, "n1", stop, me=HERE, patience=1.5)
        one_sentence(error.value, "node n1 is run by another agent, on host beta (pid 200, "
                     "since 2026-12-05T00:00:01Z), which still renews its claim: give each "
                     "host its own node name (--node, or NODENAME), or stop that agent.")
        told = []
        waiting = asyncio.create_task(claim_node_name(store, "n1", stop, told.append, me=HERE,
                                                      patience=20))
        await wait_async(lambda: told, 10, "the newcomer to say whose claim it waits for")
        assert told == [THERE.describe()] and not waiting.done()
        await store.revoke_lease(held.lease)  # that host died: its lease lapses
        claim = await asyncio.wait_for(waiting, 10)
        assert holder_of(await store.get(keys.agent_key("n1"))) == HERE
        stop.set()  # and a stop while waiting ends the wait
        assert await claim_node_name(store, "n1", stop, me=THERE) is None
        await name_claim.release(store, claim)
    scenario(etcd, body)


def test_a_claim_that_lapsed_is_taken_again_or_the_other_host_is_named(etcd, monkeypatch,
                                                                        caplog):
    monkeypatch.setattr(name_claim, "RENEW_EVERY", 0.1)

    async def body(store):
        stop = asyncio.Event()
        claim = await claim_node_name(store, "n1", stop, me=HERE)
        keeping = asyncio.create_task(name_claim.keep(store, claim))
        lapsed = claim.lease
        await store.revoke_lease(lapsed)  # etcd away longer than the lease: it lapsed
        async def taken_again():  # in etcd, and by the claim (keep() learns its new lease
            stored = await store.get(keys.agent_key("n1"))  # once etcd's answer reaches it)
            return stored if stored is not None and stored.lease not in (0, lapsed) \
                and stored.lease == claim.lease else None
        stored = await wait_async(taken_again, 10, "the lapsed claim taken again")
        assert holder_of(stored) == HERE
        await store.revoke_lease(claim.lease)
        await claim_node_name(store, "n1", stop, me=THERE)  # another host, meanwhile
        with caplog.at_level(logging.ERROR, logger="pipit-agent"):
            await wait_async(lambda: "node n1 is now also run by an agent on host beta"
                             in caplog.text, 10, "the other host named")
        assert "give each host its own node name" in caplog.text
        keeping.cancel()
    scenario(etcd, body)


@pytest.fixture
def socket_etcd(short_dir):
    """An etcd that agents in other network namespaces reach through its unix socket."""
    with EtcdServer(data_dir=short_dir / "etcd", unix_socket=True) as server:
        yield server


@pytest.mark.slow
def test_two_hosts_given_one_node_name_the_second_agent_stops_naming_the_first(
        socket_etcd, short_dir):
    endpoint = f"unix://{socket_etcd.data_dir}/etcd.sock:0"
    with Namespaces() as namespaces, AgentProcess(
            "node-1", short_dir / "a.sock", endpoint, short_dir / "a.log") as first:
        other_host = namespaces.create("host")
        second = subprocess.run(
            [*exec_prefix(other_host), sys.executable, "-m", "bgp_agent.agent", "--node",
             "node-1", "--no-bgp", "--ipam-socket", str(short_dir / "b.sock"),
             "--status-socket", str(short_dir / "b.stat"), "--etcd-endpoints", endpoint],
            cwd=ROOT, capture_output=True, text=True, timeout=name_claim.CLAIM_TTL + 60)
    assert second.returncode == 1
    lines = second.stderr.splitlines()
    assert "is held by an agent on host" in lines[0] and "waiting up to 35 s" in lines[0]
    assert ("ERROR pipit-agent: node node-1 is run by another agent, on host "
            f"{this_host().hostname} (pid {first.pid}, since ") in lines[-1], lines[-1]
    assert lines[-1].endswith("which still renews its claim: give each host its own node "
                              "name (--node, or NODENAME), or stop that agent."), lines[-1]
    assert not (short_dir / "b.sock").exists()  # it served nothing


def test_an_agent_restarted_on_its_host_takes_its_name_at_once(etcd, short_dir):
    agent = AgentProcess("node-1", short_dir / "a.sock", etcd.endpoints, short_dir / "a.log")
    with agent:
        agent.kill()  # its claim stays for the lease's time
        agent.start(timeout=10)
        assert "is held by an agent" not in agent.log_path.read_text()
        wait(lambda: scenario(etcd, lambda s: s.get(keys.agent_key("node-1"))).value["pid"]
             == agent.pid, 10, "the new agent's claim")
