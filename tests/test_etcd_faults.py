"""etcd as users run it, with real servers: paused under a burst of allocations, far away
behind TLS, listed with several endpoints that do not all answer. (Answers lost between the
agent and etcd, through the plugin, are in test_cni_plugin.py.)"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path

import pytest

from ipam import block as blocks
from ipam.allocator import IPAM
from ipam.cni import handle_id
from ipam.cni_install import install
from ipam.errors import PipitError
from ipam.snapshot import check, load_snapshot
from ipam.store import EtcdConfig, Store
from lab.agent import AgentProcess
from lab.etcd import EtcdServer, free_port, make_tls_files
from tests.cni_support import NET, Plugin, holder
from tests.helpers import add_pool, with_store
from tests.pipitctl_support import pipitctl
from tests.sentences import one_sentence
from tests.tcp_proxy import TCPProxy


# --------------------------------------------------------------------------------------------
# A burst of allocations while etcd is paused (SIGSTOP) again and again

PAUSES = 12
PER_PAUSE = 16


async def allocate_around_pauses(server: EtcdServer) -> tuple[dict, object]:
    """Bursts of idempotent assigns (what an ADD is), each caller giving up after 0.4 s as
    the plugin does at its deadline, etcd paused for longer than the store's 0.5 s timeout
    at a slightly later moment in each burst. Returns each handle's outcome and the
    snapshot once the allocator has served one more request."""
    group = os.getpgid(server.process.pid)
    async with Store(EtcdConfig(endpoints=(server.endpoint,), timeout=0.5)) as store:
        await add_pool(store, "burst", "10.42.0.0/20", blockSize=26)
        ipam = IPAM(store)
        outcomes: dict[str, object] = {}

        async def add(handle: str) -> None:
            try:
                outcomes[handle] = await asyncio.wait_for(
                    ipam.assign("node-1", handle, reuse=True), 0.4)
            except (asyncio.TimeoutError, PipitError) as error:
                outcomes[handle] = error

        await ipam.assign("node-1", "warm", reuse=True)
        for burst in range(PAUSES):
            calls = [asyncio.create_task(add(f"b{burst}-{i}")) for i in range(PER_PAUSE)]
            await asyncio.sleep(0.001 * burst)  # where in the burst etcd stops
            os.killpg(group, signal.SIGSTOP)
            try:
                await asyncio.sleep(0.7)  # the outage, longer than the store's timeout
            finally:
                os.killpg(group, signal.SIGCONT)
            await asyncio.gather(*calls)
        # One more request: the allocator has settled every batch before serving it, and
        # released what callers that gave up were left holding.
        await ipam.assign("node-1", "last", reuse=True)
        return outcomes, await load_snapshot(store)


def test_an_assign_that_failed_around_an_etcd_pause_holds_nothing(own_etcd):
    outcomes, snap = asyncio.run(allocate_around_pauses(own_etcd))
    failed = sorted(h for h, outcome in outcomes.items() if not isinstance(outcome, list))
    served = {h: outcome for h, outcome in outcomes.items() if isinstance(outcome, list)}
    held = {h: [a for b in snap.blocks.values() for a in blocks.addresses_of(b, h)]
            for h in outcomes}
    print(f"{len(served)} served, {len(failed)} failed around {PAUSES} pauses")
    assert failed, "no request failed: the pauses did not hit"
    assert {h: held[h] for h in failed if held[h]} == {}, "failed requests hold addresses"
    assert {h: held[h] for h in served} == served  # and the served hold what they were told
    assert check(snap) == []


# --------------------------------------------------------------------------------------------
# An etcd 100 ms away, behind TLS


@pytest.fixture(scope="module")
def cni_bin() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="pipit-t-ipam-bin-"))
    try:
        install(str(directory))
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


POOL = """apiVersion: pipit.dev/v1
kind: IPPool
metadata: {name: far}
spec: {cidr: 10.77.0.0/22, blockSize: 26}
"""


def test_pipitctl_and_an_agents_first_add_work_through_a_distant_tls_etcd(tmp_path, short_dir,
                                                                          cni_bin):
    """gRPC gives one connection attempt no longer than its minimum reconnect back-off: at
    200 ms, TLS to an etcd 100 ms away (half a second to connect) never connected."""
    tls = make_tls_files(tmp_path / "certs")
    flags = ["--etcd-ca-cert", tls.ca, "--etcd-cert", tls.client_cert, "--etcd-key",
             tls.client_key]
    with EtcdServer(data_dir=tmp_path / "etcd", tls=tls) as server, \
            TCPProxy(("127.0.0.1", server.client_port), delay=0.1) as proxy:
        endpoint = proxy.url("https")
        created = pipitctl("apply", "-f", "-", "--etcd-endpoints", endpoint, *flags, input=POOL,
                           timeout=120)
        assert created.returncode == 0, created.stderr
        for _ in range(3):  # each run connects anew
            shown = pipitctl("get", "ippools", "--etcd-endpoints", endpoint, *flags, timeout=120)
            assert shown.returncode == 0 and "10.77.0.0/22" in shown.stdout, shown.stderr
        agent = AgentProcess("node-1", short_dir / "far.sock", endpoint, short_dir / "far.log",
                             extra_args=flags)
        agent.start(timeout=60)
        try:
            plugin = Plugin(cni_bin, agent)
            address = plugin("ADD", plugin.config(), "first")["ips"][0]["address"]
        finally:
            agent.stop()
        assert proxy.connections >= 4  # it all went through the delay
        snap = with_store(EtcdConfig(endpoints=(server.endpoint,), ca_file=tls.ca,
                                     cert_file=tls.client_cert, key_file=tls.client_key),
                          load_snapshot)
    assert holder(snap, address) == handle_id(NET, "first", "eth0")


# --------------------------------------------------------------------------------------------
# Several endpoints, none answering


def test_several_endpoints_that_do_not_answer_are_each_named_with_the_reason():
    with socket.socket() as silent:  # takes connections (the kernel does), never speaks
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        refused = f"http://127.0.0.1:{free_port()}"
        quiet = f"http://127.0.0.1:{silent.getsockname()[1]}"
        result = pipitctl("get", "ippools", "--etcd-endpoints", f"{refused},{quiet}",
                          timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    one_sentence(result, "cannot reach etcd", f"{refused} (connection refused)",
                 f"{quiet} (no answer within")


# --------------------------------------------------------------------------------------------
# The tests' own etcd: a port chosen for it and taken by another process before etcd binds it

def test_an_etcd_whose_chosen_port_is_taken_meanwhile_starts_on_other_ports(tmp_path,
                                                                            monkeypatch):
    import lab.etcd
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = iter([busy])
        chosen = lab.etcd.free_port
        monkeypatch.setattr(lab.etcd, "free_port", lambda host: next(ports, None) or chosen(host))
        with EtcdServer(data_dir=tmp_path / "etcd") as server:
            assert server.client_port != busy
            assert b"address already in use" in server.log_path.read_bytes()
            with_store(EtcdConfig(endpoints=(server.endpoint,)), lambda store: store.get("/x"))
