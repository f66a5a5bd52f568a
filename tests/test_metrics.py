"""/metrics as Prometheus scrapes it: the agent's counters move when it works (IPAM requests
and their latency, etcd transactions), its gauges say what its status says (sessions, prefixes
per peer, kernel routes, blocks and addresses of the node). Parsed with the client library's
own text parser."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lab.etcd import free_port
from tests.cni_support import (
    DEFAULT_POOL,
    NET,
    Plugin,
    add_pools,
    start_agent,
)
from tests.helpers import running_lab
from tests.metrics_support import samples, scrape


def test_ipam_requests_latency_and_etcd_transactions_are_counted(etcd, cni_bin, short_dir):
    add_pools(etcd, DEFAULT_POOL)
    port = free_port()
    agent = start_agent(etcd, short_dir, extra_args=("--metrics-address", f"127.0.0.1:{port}"))
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        before = scrape(url)
        plugin = Plugin(cni_bin, agent)
        for container in ("m1", "m2", "m3"):
            plugin("ADD", plugin.config(), container)
        plugin("DEL", plugin.config(), "m1")
        plugin.raw("ADD", b'{"cniVersion": "1.0.0", "name": "' + NET.encode() + b'", "ipam": '
                   b'{"type": "pipit-ipam", "socket": "' + str(agent.socket_path).encode()
                   + b'", "pools": ["nope"]}}', "m4")
        after = scrape(url)

        def moved(name: str, **labels) -> float:
            key = (name, tuple(sorted(labels.items())))
            return after.get(key, 0) - before.get(key, 0)
        assert moved("pipit_ipam_requests_total", command="ADD", result="ok") == 3
        assert moved("pipit_ipam_requests_total", command="DEL", result="ok") == 1
        assert moved("pipit_ipam_requests_total", command="ADD", result="NotFound") == 1
        assert moved("pipit_ipam_request_duration_seconds_count", command="ADD") == 4
        assert moved("pipit_etcd_transactions_total", result="committed") >= 3
        assert ("process_cpu_seconds_total", ()) in after  # the library's own, beside ours
    finally:
        agent.stop()


def test_a_bad_metrics_address_is_one_sentence(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bgp_agent.agent", "--node", "n1",
                          "--metrics-address", "9091"], capture_output=True, text=True)
    assert run.returncode == 2
    assert "'9091' is not HOST:PORT" in run.stderr


@pytest.mark.lab
def test_a_lab_node_reports_its_sessions_prefixes_routes_and_blocks(tmp_path_factory):
    from lab import netns
    with running_lab(tmp_path_factory.mktemp("metrics"), "metrics", node_count=2,
                     pods_per_node=1) as lab:
        text = subprocess.run([*netns.exec_prefix(lab.node_ns("n1")), sys.executable, "-c",
                               "import urllib.request, sys; sys.stdout.write(urllib.request."
                               "urlopen('http://127.0.0.1:9091/metrics', timeout=5).read()"
                               ".decode())"], capture_output=True, text=True, check=True).stdout
        found = samples(text)
        n2 = str(lab.node_ip("n2"))
        assert found[("pipit_bgp_sessions", (("state", "up"), ("type", "mesh")))] == 1
        assert found[("pipit_bgp_prefixes_accepted", (("peer", n2), ("type", "mesh")))] == 1
        assert found[("pipit_kernel_routes", (("kind", "learned"),))] == 1
        assert found[("pipit_kernel_routes", (("kind", "blackhole"),))] == 1
        assert found[("pipit_ipam_blocks_owned", (("pool", "default"),))] == 1
        assert found[("pipit_ipam_addresses_in_use", (("pool", "default"),))] == 1
        assert found[("pipit_reconcile_passes_total", (("result", "ok"),))] > 0
        assert found[("pipit_speaker_connected", ())] == 1
