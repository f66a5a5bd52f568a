"""Shared fixtures: a real etcd server (Debian etcd-server) on a free loopback port; the
network namespaces (and what runs in them) of crashed earlier runs swept once."""

from __future__ import annotations

import asyncio
import os

import pytest

from ipam import keys
from ipam.store import EtcdConfig, Store
from lab import netns
from lab.etcd import EtcdServer


@pytest.fixture(scope="session", autouse=True)
def no_leftovers_of_dead_runs():
    """Test namespaces are named `pipit-t-pid<pid>-...`: those of runs that are gone go, with
    the agents, ExaBGP and routers still running inside them."""
    if os.geteuid() == 0:
        netns.remove_leftovers(netns.TEST_PREFIX)


@pytest.fixture(scope="session")
def etcd_server():
    with EtcdServer() as server:
        yield server


async def _wipe(config: EtcdConfig) -> None:
    async with Store(config) as store:
        for key in await store.list_keys(keys.ROOT):
            await store.txn({}, delete=[key])


@pytest.fixture
def etcd(etcd_server) -> EtcdConfig:
    """Connection settings for an etcd that holds no Pipit data; wiped again afterwards."""
    config = EtcdConfig(endpoints=(etcd_server.endpoint,))
    asyncio.run(_wipe(config))
    yield config
    asyncio.run(_wipe(config))


@pytest.fixture
def own_etcd(tmp_path):
    """A private etcd server the test may stop and restart."""
    server = EtcdServer(data_dir=tmp_path / "etcd")
    server.start()
    yield server
    server.destroy()


@pytest.fixture
def fakekube():
    """Pipit's fake Kubernetes API server (tests/fakekube: no real one can run here) on a free
    loopback port, empty but for the usual namespaces; the test may restart it, inject
    failures or compact its history."""
    from tests.fakekube import FakeKube
    with FakeKube() as kube:
        yield kube
