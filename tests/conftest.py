"""Test tiers, and shared fixtures: a real etcd server (Debian etcd-server) on a free loopback
port; the network namespaces (and what runs in them) of crashed earlier runs swept once.

Every test is in one tier (`scripts/test -m unit` runs one; `scripts/test` runs them all):

    unit   pure logic and in-memory doubles: no root, no etcd (seconds for the whole tier)
    etcd   a real etcd server (and agents or the CNI plugin talking to it); no root
    kube   tests/fakekube (the API server double) with real kubectl, helm and Python client
    netns  root: network namespaces, real kernel routes, ExaBGP, BIRD/FRR/GoBGP, CNI plugins
    lab    root: whole lab clusters end to end
    vm     root: Debian's kernel under qemu (the IPIP test)

A module or test says its tier with a marker (`pytestmark = pytest.mark.netns`); one without
is `etcd` if it uses an etcd fixture, else `unit`. A real part a test needs that is missing
(root, a binary) fails the test: a green run means every promise was checked. Locally,
PIPIT_TEST_ALLOW_SKIP=1 turns those failures into skips (never in CI, where CI=true).
"""

from __future__ import annotations

import asyncio
import os

import pytest

from ipam import keys
from ipam.store import EtcdConfig, Store
from lab import netns
from lab.etcd import EtcdServer
from tests.helpers import require


TIERS = ("unit", "etcd", "kube", "netns", "lab", "vm")
ROOT_TIERS = ("netns", "lab", "vm")
ETCD_FIXTURES = {"etcd", "etcd_server", "own_etcd"}


def pytest_configure(config):
    for tier in TIERS:
        config.addinivalue_line("markers", f"{tier}: the {tier} test tier (see tests/conftest.py)")


def tier_of(item) -> str:
    declared = [m.name for m in item.iter_markers() if m.name in TIERS]
    if declared:
        return max(declared, key=TIERS.index)
    return "etcd" if ETCD_FIXTURES & set(item.fixturenames) else "unit"


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(tier_of(item))


def pytest_runtest_setup(item):
    if tier_of(item) in ROOT_TIERS:
        require(os.geteuid() == 0, "needs root (network namespaces): run as root")


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
