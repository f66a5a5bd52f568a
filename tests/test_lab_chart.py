"""End to end: the rendered chart (charts/pipit) starts a working cluster when run the way a
kubelet runs it (lab.chart, lab.kubelet): each node's DaemonSet pod from the image
scripts/build-image makes (install-cni, then the agent and its ExaBGP sidecar, with the
chart's command lines, environment, volumes, capabilities and probes), the post-install hook
Job, pods attached through the conflist the agent wrote, and a rolling update that loses no
ping. The image is rebuilt first when it was built from other sources than these."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from lab import netns
from lab.chart import CHART, ChartNodes, image_archive
from lab.cluster import Lab
from lab.oci_image import built_from, source_digest, unpack
from lab.process import wait
from tests.helpers import assert_pods_reach_each_other, require, running_lab

pytestmark = [pytest.mark.slow, pytest.mark.lab]
ROOT = Path(__file__).resolve().parents[1]
NET_ADMIN, NET_RAW, NET_BIND_SERVICE = 12, 13, 10


@pytest.fixture(scope="module")
def image() -> Path:
    """The image of these sources (built when missing or stale: minutes)."""
    archive = image_archive()
    fresh = archive.exists() and built_from(unpack(archive)) == source_digest()
    if not fresh:
        result = subprocess.run([str(ROOT / "scripts" / "build-image")], capture_output=True,
                                text=True, timeout=1800)
        require(result.returncode == 0, "scripts/build-image could not build the image: "
                + (result.stderr.strip().splitlines() or ["no output"])[-1])
    return archive


@pytest.fixture(scope="module")
def lab(image, tmp_path_factory):
    directory = tmp_path_factory.mktemp("chart-lab")
    with running_lab(directory, "chart", node_count=3, pods_per_node=1, hold_time=6,
                     restart_time=30, chart=ChartNodes(directory, CHART, image=image)) as cluster:
        yield cluster


def pod_dir(lab: Lab, node: str) -> Path:
    return Path(lab.node_record(node)["pod"]["dir"])


def containers(lab: Lab, node: str) -> dict:
    return ChartNodes.pod_status(pod_dir(lab, node))["containers"]


def capability_set(pid: int, line: str = "CapBnd") -> set[int]:
    status = Path(f"/proc/{pid}/status").read_text()
    value = int(re.search(rf"^{line}:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
    return {bit for bit in range(64) if value >> bit & 1}


def test_the_rendered_chart_starts_a_cluster_whose_pods_reach_each_other(lab):
    assert_pods_reach_each_other(lab)
    for node in lab.nodes():
        status = ChartNodes.pod_status(pod_dir(lab, node))
        assert status["ready"] and status["phase"] == "Running"
        assert status["initContainers"]["install-cni"]["exitCode"] == 0
        assert {n: c["state"] for n, c in status["containers"].items()} == {
            "agent": "running", "exabgp": "running"}
        root = lab.chart.node_root(lab, node)
        # install-cni put the plugins on the node; the agent wrote the conflist pods use
        assert {"pipit-ipam", "ptp", "portmap", "loopback"} <= set(
            os.listdir(root / "opt" / "cni" / "bin"))
        conflist = json.loads((root / "etc" / "cni" / "net.d" / "10-pipit.conflist").read_text())
        assert conflist["plugins"][0]["ipam"] == {"type": "pipit-ipam",
                                                  "socket": "/run/pipit/ipam.sock"}


def test_each_container_runs_with_the_chart_s_privileges_only(lab):
    running = containers(lab, "n1")
    agent, exabgp = running["agent"]["pid"], running["exabgp"]["pid"]
    assert capability_set(agent, "CapEff") == {NET_ADMIN, NET_RAW}
    assert capability_set(exabgp, "CapEff") == {NET_BIND_SERVICE}
    for pid in (agent, exabgp):
        assert "NoNewPrivs:\t1" in Path(f"/proc/{pid}/status").read_text()
        mounts = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        [root] = [m for m in mounts if m.split()[4] == "/"]
        assert " ro," in f" {root.split()[5]},"  # readOnlyRootFilesystem
    # the agent is the image's, with the chart's arguments and NODENAME from the downward API
    argv = Path(f"/proc/{agent}/cmdline").read_bytes().split(b"\0")
    assert argv[1] == b"/opt/pipit/bin/pipit-agent" and b"--node=n1" in argv
    assert os.readlink(f"/proc/{agent}/root").endswith("/containers/agent/merged")


def test_the_hook_job_configured_the_cluster_and_helm_test_passes(lab):
    pools = json.loads(lab.pipitctl("get", "ippools", "-o", "json").stdout)["items"]
    assert [p["metadata"]["name"] for p in pools] == ["default"]
    config = json.loads(lab.pipitctl("get", "bgpconfig", "default", "-o", "json").stdout)
    assert config["spec"]["nodeMeshHoldTime"] == lab.hold_time
    lab.chart.run_pod(lab, "n1", "Pod", "pipit-test-ipam")  # pipitctl ipam check


class Pinger:
    """ping every 0.1 s from one pod to another, recording which sequence numbers came
    back, until stop()."""

    def __init__(self, source, target):
        self.name = f"{source.name}->{target.name}"
        self.process = subprocess.Popen(
            [*netns.exec_prefix(source.netns), "ping", "-n", "-O", "-i", "0.1",
             target.address], stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.replied: set[int] = set()
        self.started = time.monotonic()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            match = re.search(r"icmp_seq=(\d+) ttl=", line)
            if match:
                self.replied.add(int(match.group(1)))

    def stop(self) -> list[int]:
        """The sequence numbers lost, leaving out the last second's (still in flight)."""
        self.process.send_signal(signal.SIGINT)
        self.process.wait(10)
        self.reader.join(10)
        last = int((time.monotonic() - self.started) / 0.1) - 10
        return [seq for seq in range(1, max(self.replied, default=0)) if seq not in
                self.replied and seq < last]


def test_a_rolling_update_replaces_every_node_pod_and_loses_no_ping(lab):
    pods = {p.node: p for p in lab.all_pods()}
    before = {node: pod_dir(lab, node) for node in lab.nodes()}
    pingers = [Pinger(pods["n1"], pods["n2"]), Pinger(pods["n2"], pods["n3"]),
               Pinger(pods["n3"], pods["n1"])]
    try:
        wait(lambda: all(len(p.replied) >= 5 for p in pingers), 10, "the pings to start")
        lab.chart.upgrade(lab, set_values={"node.logLevel": "DEBUG"})
        lab.wait_mesh()
    finally:
        lost = {p.name: p.stop() for p in pingers}
    for node in lab.nodes():
        assert pod_dir(lab, node) != before[node], f"{node}'s pod was not replaced"
        agent = containers(lab, node)["agent"]["pid"]
        assert b"--log-level=DEBUG" in Path(f"/proc/{agent}/cmdline").read_bytes()
    assert all(len(p.replied) > 50 for p in pingers)
    assert lost == {p.name: [] for p in pingers}
    assert_pods_reach_each_other(lab)
