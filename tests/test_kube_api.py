"""bgp_agent.kube_api against tests/fakekube: the informer's list + watch through API server
restarts, 410 Expired (a new list whose differences come out as events, deletions included),
an API server that is down (retries back off, not a tight loop), and stop() that returns at
once even in the middle of a list or a watch."""

from __future__ import annotations

import asyncio
import time

import pytest

from bgp_agent.kube_api import ADDED, DELETED, MODIFIED, Informer, KubeAPI, \
    KubernetesUnavailable
from lab.process import wait_async
from tests.fakekube.resources import NODES, PODS

pytestmark = pytest.mark.kube


def node(name: str, labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name,
                                                             "labels": labels or {}}}


def pod(name: str, node_name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"nodeName": node_name, "containers": [{"name": "c", "image": "x"}]}}


def connect(fakekube, tmp_path) -> KubeAPI:
    return KubeAPI.connect(str(fakekube.write_kubeconfig(tmp_path / "kubeconfig")))


async def following(informer: Informer):
    task = asyncio.create_task(informer.run())
    await asyncio.wait_for(informer.ready.wait(), 20)
    return task


async def stop(task: asyncio.Task) -> float:
    started = time.monotonic()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return time.monotonic() - started


def test_informer_follows_restarts_and_410_with_deletions_as_events(fakekube, tmp_path):
    api = connect(fakekube, tmp_path)
    fakekube.store.create(NODES, None, node("a"))
    events = []

    async def scenario():
        informer = Informer(api, api.core.list_node, "nodes",
                            on_event=lambda e: events.append((e.type, e.obj["metadata"]["name"])))
        task = await following(informer)
        try:
            assert set(informer.items) == {"a"} and events == [(ADDED, "a")]
            fakekube.store.create(NODES, None, node("b"))
            await wait_async(lambda: "b" in informer.items, 20, "b")
            # an API server restart: the watch resumes from where it was, no new list
            fakekube.stop()
            fakekube.store.patch(NODES, None, "b", lambda n: {**n, "metadata": {
                **n["metadata"], "labels": {"x": "1"}}})
            fakekube.start()
            await wait_async(lambda: (MODIFIED, "b") in events, 30, "b modified")
            assert informer.lists == 1
            # down long enough for its history to be compacted: a new list, and what was
            # deleted meanwhile comes out as a deletion
            fakekube.stop()
            fakekube.store.delete(NODES, None, "a")
            fakekube.store.create(NODES, None, node("c"))
            fakekube.store.compact()
            fakekube.start()
            await wait_async(lambda: (DELETED, "a") in events and (ADDED, "c") in events, 30,
                             "a deleted and c added after the re-list")
            assert set(informer.items) == {"b", "c"} and informer.lists == 2
        finally:
            assert await stop(task) < 1.0
    asyncio.run(scenario())


def test_informer_on_a_field_selector_and_stop_during_a_watch(fakekube, tmp_path):
    api = connect(fakekube, tmp_path)

    async def scenario():
        informer = Informer(api, api.core.list_pod_for_all_namespaces, "pods",
                            field_selector="spec.nodeName=n1")
        task = await following(informer)
        fakekube.store.create(PODS, "default", pod("elsewhere", "n2"))
        fakekube.store.create(PODS, "default", pod("here", "n1"))
        await wait_async(lambda: "default/here" in informer.items, 20, "the pod on n1")
        assert "default/elsewhere" not in informer.items
        assert await stop(task) < 1.0  # a watch blocked in a read is interrupted
    asyncio.run(scenario())


def test_informer_backs_off_while_the_api_server_is_down(fakekube, tmp_path):
    api = connect(fakekube, tmp_path)
    fakekube.fail(503, times=None, path=r"^/api/v1/nodes")

    async def scenario():
        informer = Informer(api, api.core.list_node, "nodes")
        task = asyncio.create_task(informer.run())
        await asyncio.sleep(3.0)  # measuring a rate: how many tries in this time
        tries = sum(r.path == "/api/v1/nodes" for r in fakekube.requests)
        # 0.2 + 0.4 + 0.8 + 1.6 s: at most 5 tries in 3 s (a tight loop makes hundreds)
        assert 2 <= tries <= 5, tries
        assert not informer.ready.is_set()
        fakekube.clear_failures()
        await asyncio.wait_for(informer.ready.wait(), 20)
        assert await stop(task) < 1.0
    asyncio.run(scenario())


def test_stop_during_a_list_returns_at_once(fakekube, tmp_path):
    api = connect(fakekube, tmp_path)

    async def scenario():
        informer = Informer(api, api.core.list_node, "nodes")
        fakekube.stop()  # the list hangs in connection attempts / retries
        task = asyncio.create_task(informer.run())
        await asyncio.sleep(0.3)
        assert await stop(task) < 1.0
        fakekube.start()
    asyncio.run(scenario())


def test_calls_say_what_failed_in_one_sentence(fakekube, tmp_path):
    api = connect(fakekube, tmp_path)

    async def scenario():
        assert await api.node("nope") is None
        fakekube.fail(500, message="boom")
        with pytest.raises(KubernetesUnavailable, match=r"answered HTTP 500: boom\.$"):
            await api.node("x")
        fakekube.stop()
        with pytest.raises(KubernetesUnavailable, match="cannot reach the Kubernetes API"):
            await api.node("x")
        fakekube.start()
    asyncio.run(scenario())


@pytest.mark.parametrize("code, refused", [(401, True), (403, True),
                                           (408, False), (429, False), (500, False),
                                           (503, False)])
def test_a_refusal_is_told_from_a_passing_failure(fakekube, tmp_path, code, refused):
    """The agent waits at start through what may pass (an API server starting or
    overloaded), never through an answer that asking again will not change."""
    api = connect(fakekube, tmp_path)
    fakekube.fail(code, times=None, path="/nodes/x")  # the client retries some itself
    with pytest.raises(KubernetesUnavailable, match=f"answered HTTP {code}") as error:
        asyncio.run(api.node("x"))
    assert error.value.refused is refused


def test_an_agent_without_kubernetes_never_imports_the_client():
    """The client costs ~17 MiB of the agent's memory (bench/README.md, converge: the goal is
    60 MiB): without --kubeconfig and outside a pod there is no Kubernetes and no import."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    out = subprocess.run([sys.executable, "-c", (
        "import sys; from bgp_agent.kube_api import KubeAPI; "
        "assert KubeAPI.connect(None) is None; print('kubernetes' in sys.modules)")],
        capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "False"
