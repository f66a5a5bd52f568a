"""Test tiers, and the fixtures more than one test module uses (pytest finds them here: no
test module imports a fixture): a real etcd server (Debian etcd-server) on a free loopback port;
the network namespaces (and what runs in them) of crashed earlier runs swept once; a short temp
dir, a CNI bin dir, pipitctl bound to the test's etcd, a node namespace with BIRD peers' ones.

Every test is in one tier (`scripts/test -m unit` runs one; `scripts/test` runs them all):

    unit   pure logic and in-memory doubles: no root, no etcd (seconds for the whole tier)
    etcd   a real etcd server (and agents or the CNI plugin talking to it); no root
    kube   tests/fakekube (the API server double) with real kubectl, helm and Python client
    netns  root: network namespaces, real kernel routes, ExaBGP, BIRD/FRR/GoBGP, CNI plugins
    lab    root: whole lab clusters end to end
    vm     root: Debian's kernel under qemu (the IPIP test)
    soak   root: a lab under minutes of churn and faults (PIPIT_SOAK_SECONDS, default 150)

A module or test says its tier with a marker (`pytestmark = pytest.mark.netns`); one without
is `etcd` if it uses an etcd fixture, else `unit`. A real part a test needs that is missing
(root, a binary) fails the test: a green run means every promise was checked. Locally,
PIPIT_TEST_ALLOW_SKIP=1 turns those failures into skips (never in CI, where CI=true).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from ipam import keys
from ipam.store import EtcdConfig, Store
from lab import netns
from lab.cni import PLUGIN_DIR, install_bin_dir
from lab.etcd import EtcdServer
from tests.cni_support import short_temp_dir
from tests.helpers import require
from tests.pipitctl_support import pipitctl
from tests.speaker_support import kill_exabgp, network


TIERS = ("unit", "etcd", "kube", "netns", "lab", "vm", "soak")
ROOT_TIERS = ("netns", "lab", "vm", "soak")
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


@pytest.fixture
def short_dir():
    """A temp dir with a short path (unix socket paths are limited to 107 bytes)."""
    with short_temp_dir() as path:
        yield path


@pytest.fixture(scope="session")
def cni_bin() -> Path:
    """Symlinks to the reference plugins plus pipit-ipam as installed (native front).
    test_cni_plugin.py and test_etcd_faults.py override it with a dir holding pipit-ipam alone."""
    require(os.access(Path(PLUGIN_DIR) / "ptp", os.X_OK),
            f"needs the CNI reference plugins in {PLUGIN_DIR} (Debian "
            "containernetworking-plugins): run scripts/setup.sh")
    path = Path(tempfile.mkdtemp(prefix="pipit-t-cni-bin-"))
    try:
        yield install_bin_dir(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ctl(etcd):
    """pipitctl bound to the test's etcd (through PIPIT_ETCD_ENDPOINTS): ctl(*args, input=)
    runs it in a subprocess and returns the CompletedProcess (tests/pipitctl_support.py)."""
    def run(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return pipitctl(*args, input=input, endpoints=etcd.endpoints[0])
    return run


@pytest.fixture
def net1():
    """A node namespace linked to one BIRD peer's namespace (tests/speaker_support.network)."""
    with network(1) as net:
        yield net


@pytest.fixture
def net2():
    """A node namespace linked to two peers' namespaces (tests/speaker_support.network)."""
    with network(2) as net:
        yield net


@pytest.fixture
def state_dir(tmp_path):
    """The Speaker's directory; any ExaBGP still recorded in it is killed afterwards."""
    yield tmp_path / "state"
    kill_exabgp(tmp_path / "state")
