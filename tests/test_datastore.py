"""The datastore as users run it: a 3-member etcd cluster whose leader dies in the middle of
a burst of pods, and etcd with TLS client certificates under a whole lab."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ipam.snapshot import check
from ipam.store import EtcdConfig
from lab.etcd import EtcdCluster
from lab.process import wait
from tests.cni_support import (
    Plugin,
    add_pools,
    holdings,
    snapshot,
    start_agent,
)
from tests.helpers import assert_pods_reach_each_other, running_lab

BURST = 200


@pytest.mark.etcd
def test_a_burst_of_adds_survives_the_etcd_leader_being_killed(cni_bin, short_dir, tmp_path):
    with EtcdCluster(3, tmp_path / "etcd") as cluster:
        etcd = EtcdConfig(endpoints=tuple(cluster.endpoints))
        add_pools(etcd, ("default", "10.244.0.0/20", {"blockSize": 26}))
        agent = start_agent(etcd, short_dir)
        try:
            plugin = Plugin(cni_bin, agent)
            started = threading.Semaphore(0)
            killed_at: list[float] = []

            def add(n: int) -> tuple[str, dict, float]:
                started.release()
                run = plugin.raw("ADD", json.dumps(plugin.config()).encode(), f"burst-{n}")
                return f"burst-{n}", json.loads(run.stdout or "{}"), time.monotonic()

            with ThreadPoolExecutor(max_workers=32) as pool:
                futures = [pool.submit(add, n) for n in range(BURST)]
                for _ in range(BURST // 4):  # a quarter of the burst under way: the leader dies
                    started.acquire()
                leader = cluster.leader()
                os.kill(leader.process.pid, signal.SIGKILL)
                killed_at.append(time.monotonic())
                results = [f.result() for f in futures]
            ok = {c: r for c, r, _ in results if "ips" in r}
            failed = {c: r for c, r, _ in results if "ips" not in r}
            addresses = [r["ips"][0]["address"] for r in ok.values()]
            assert len(addresses) == len(set(addresses)), "two pods got one address"
            assert {r.get("code") for r in failed.values()} <= {11}, failed
            # the service is back: a new ADD succeeds (the etcd client moves to a new leader)
            wait(lambda: "ips" in plugin("ADD", plugin.config(), "after-the-kill"), 30,
                 "an ADD to succeed after the leader was killed")
            recovered = [t for c, r, t in results if "ips" in r and t > killed_at[0]]
            snap = snapshot(etcd)
            for container in failed:  # an ADD that answered failure holds nothing
                assert holdings(snap, container) == [], container
            assert check(snap) == []
            print(f"\n{len(ok)} of {BURST} ADDs succeeded, {len(failed)} answered code 11; "
                  f"first success {min(recovered, default=killed_at[0]) - killed_at[0]:.2f} s "
                  "after the kill")
        finally:
            agent.stop()


@pytest.mark.lab
def test_a_lab_over_etcd_with_tls_client_certificates(tmp_path_factory):
    # a lab over TLS: agents, pods (the plugin path), pipitctl
    with running_lab(tmp_path_factory.mktemp("tls"), "tls", node_count=2, pods_per_node=1,
                     etcd_tls=True) as lab:
        assert_pods_reach_each_other(lab)
        assert lab.etcd_host_endpoint.startswith("https://")
        out = lab.pipitctl("ipam", "check")
        assert out.returncode == 0, out.stderr
        wrong = tmp_path_factory.mktemp("wrong-ca")
        from lab.etcd import make_tls_files
        other = make_tls_files(wrong)
        flags = lab.etcd_tls_flags()
        flags[1] = other.ca  # another CA: the server's certificate is not trusted
        result = lab.pipitctl("get", "ippools", *flags)
        assert result.returncode != 0
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "TLS" in result.stderr or "certificate" in result.stderr, result.stderr
