"""The main job as a user runs it, through its own commands: `./scripts/lab` (etcd, three
nodes, two pods each, node status and the ping matrix), `pipitctl lab up` again (safe:
nothing restarted), `up --nodes 4` (a node and its pods added), `lab status` (an etcd
endpoint that works, every node, the matrix, FAIL where a pod is cut off), `lab down` (no
namespace, process or file left). One lab for all (they are slow), in order; its namespaces
carry this run's prefix (`--prefix`, here through PIPIT_LAB_PREFIX)."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab import netns
from lab.cluster import BIN, Lab
from lab.process import alive, command_line
from tests.helpers import assert_pods_reach_each_other

pytestmark = [pytest.mark.slow, pytest.mark.lab]
ROOT = Path(__file__).resolve().parents[1]
DAEMONS = ("etcd", "pipit-agent", "pipit-exabgp", "pipit-exabgp-bridge")


@dataclass
class MainJob:
    directory: Path
    prefix: str

    @property
    def lab(self) -> Lab:  # what the commands made, seen through the lab's own reader
        return Lab(self.directory, prefix=self.prefix, log=lambda *a: None)

    def env(self) -> dict[str, str]:
        return {**{k: v for k, v in os.environ.items() if not k.startswith("PIPIT_")},
                "PIPIT_LAB_PREFIX": self.prefix}

    def script(self, *args: str) -> subprocess.CompletedProcess:
        """./scripts/lab, as the README says to run it."""
        return subprocess.run([str(ROOT / "scripts" / "lab"), "--dir", str(self.directory),
                               *args], env=self.env(), cwd=ROOT, capture_output=True,
                              text=True, timeout=900)

    def pipitctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "pipitctl"), *args], env=self.env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=900)

    def lab_command(self, verb: str, *args: str) -> subprocess.CompletedProcess:
        return self.pipitctl("lab", verb, "--dir", str(self.directory), *args)

    def processes(self) -> dict[int, list[str]]:
        """Every process of the lab: whatever runs in its namespaces, and whatever names its
        directory on its command line (etcd runs in the machine's namespace)."""
        pids = {pid for ns in netns.names(self.prefix) for pid in netns.pids(ns)}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and any(str(self.directory) in a for a in command_line(int(entry))):
                pids.add(int(entry))
        found = {pid: command_line(pid) for pid in pids if alive(pid)}
        return {pid: args for pid, args in found.items() if args}

    def daemons(self) -> dict[int, list[str]]:
        """The lab's long-running processes: etcd, and each node's agent, ExaBGP, bridge."""
        return {pid: args for pid, args in self.processes().items()
                if any(os.path.basename(a) in DAEMONS for a in args[:3])}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    job = MainJob(tmp_path_factory.mktemp("main") / "lab",
                  f"{netns.TEST_PREFIX}pid{os.getpid()}-main-")
    try:
        yield job
    finally:  # whatever a failed test left behind
        Lab(job.directory, prefix=job.prefix, log=lambda *a: None).down()


def succeeded(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout[-3000:], result.stderr)
    return result.stdout


def pairs_reached(out: str) -> tuple[int, int]:
    [(good, total)] = re.findall(r"^(\d+)/(\d+) pod pairs reach each other\.$", out, re.M)
    return int(good), int(total)


def matrix(out: str) -> dict[tuple[str, str], str]:
    """The ping matrix a report printed: (row, column) -> ok | FAIL."""
    lines = out.split("ping matrix (row pings column):\n", 1)[1].splitlines()
    columns = lines[0].split()
    cells = {}
    for line in lines[1:1 + len(columns)]:
        row, *values = line.split()
        assert len(values) == len(columns), line
        for column, value in zip(columns, values):
            assert (value == "-") == (row == column), line
            if row != column:
                cells[(row, column)] = value
    return cells


def pods_of(lab: Lab) -> dict[str, tuple[str, str]]:
    return {p.name: (p.node, p.address) for p in lab.all_pods()}


def sessions_since(lab: Lab) -> dict[str, dict[str, float]]:
    return {n: {p["name"]: p["since"] for p in lab.status(n)["peers"]} for n in lab.nodes()}


def test_scripts_lab_starts_three_nodes_whose_pods_all_reach_each_other(job):
    out = succeeded(job.script())
    lab = job.lab
    assert lab.nodes() == ["n1", "n2", "n3"]
    assert sorted(pods_of(lab)) == sorted(f"n{i}-p{k}" for i in (1, 2, 3) for k in (1, 2))
    assert pairs_reached(out) == (30, 30)
    assert set(matrix(out).values()) == {"ok"} and len(matrix(out)) == 30
    assert netns.names(job.prefix) == sorted(
        [lab.fabric] + [lab.node_ns(n) for n in lab.nodes()] + [p.netns for p in lab.all_pods()])
    assert all(lab.established(n) for n in lab.nodes())
    # etcd, and per node an agent, its ExaBGP and the bridge between them
    commands = [os.path.basename(a) for args in job.daemons().values() for a in args[:3]]
    for daemon, count in (("etcd", 1), ("pipit-agent", 3), ("pipit-exabgp", 3),
                          ("pipit-exabgp-bridge", 3)):
        assert commands.count(daemon) == count, (daemon, commands)


def test_up_again_is_safe_and_restarts_nothing(job):
    lab = job.lab
    daemons, pods, since = job.daemons(), pods_of(lab), sessions_since(lab)
    names = netns.names(job.prefix)
    out = succeeded(job.lab_command("up"))
    assert pairs_reached(out) == (30, 30)
    # nothing started again: no agent, pod or etcd line in what it printed
    assert not re.search(r"agent running|has 10\.244\.|etcd running", out), out
    assert job.daemons() == daemons
    assert pods_of(lab) == pods and netns.names(job.prefix) == names
    assert sessions_since(lab) == since  # no session was reset


def test_up_with_four_nodes_adds_one_node_and_its_pods(job):
    lab = job.lab
    daemons, pods = job.daemons(), pods_of(lab)
    out = succeeded(job.lab_command("up", "--nodes", "4"))
    assert lab.nodes() == ["n1", "n2", "n3", "n4"]
    added = {name: node for name, (node, _) in pods_of(lab).items() if name not in pods}
    assert added == {"n4-p1": "n4", "n4-p2": "n4"}
    assert {n: pods_of(lab)[n] for n in pods} == pods
    assert pairs_reached(out) == (56, 56)
    assert all(job.daemons().get(pid) == args for pid, args in daemons.items()), \
        "a process of the first three nodes (or etcd) was restarted"
    assert netns.exists(lab.node_ns("n4")) and lab.status("n4") is not None
    assert all(lab.established(n) for n in lab.nodes())  # n4 in everyone's mesh
    assert_pods_reach_each_other(lab)


def test_status_prints_a_working_etcd_endpoint_every_node_and_the_matrix(job):
    lab = job.lab
    out = succeeded(job.lab_command("status"))
    [endpoint] = re.findall(r"^etcd: (\S+) \(for pipitctl: export PIPIT_ETCD_ENDPOINTS=\1\)$",
                            out, re.M)
    shown = succeeded(job.pipitctl("--etcd-endpoints", endpoint, "get", "nodes", "-o", "name"))
    assert shown.split() == ["node/n1", "node/n2", "node/n3", "node/n4"]
    assert re.findall(r"^== (\S+)$", out, re.M) == ["n1", "n2", "n3", "n4"]
    for node in lab.nodes():  # each node's section is its node status
        assert f"Pipit agent is running on node {node} (" in out
    cells = matrix(out)
    assert set(cells) == {(a, b) for a in pods_of(lab) for b in pods_of(lab) if a != b}
    assert set(cells.values()) == {"ok"} and pairs_reached(out) == (56, 56)


def test_status_says_fail_where_a_pod_is_cut_off_and_exits_1(job):
    lab = job.lab
    pods = {p.name: p for p in lab.all_pods()}
    source, target = pods["n1-p1"], pods["n2-p1"]
    cut = ["ip", "-n", source.netns, "route", "add", "blackhole", f"{target.address}/32"]
    subprocess.run(cut, check=True)
    try:
        result = job.lab_command("status")
    finally:
        subprocess.run(["ip", "-n", source.netns, "route", "del", "blackhole",
                        f"{target.address}/32"], check=True)
    assert result.returncode == 1, result.stdout
    cells = matrix(result.stdout)
    # n2-p1's answers to n1-p1 go into the blackhole too
    assert {pair for pair, value in cells.items() if value == "FAIL"} == {
        ("n1-p1", "n2-p1"), ("n2-p1", "n1-p1")}
    assert pairs_reached(result.stdout) == (54, 56)


def test_down_leaves_no_namespace_process_or_file(job):
    processes = job.processes()
    assert processes and netns.names(job.prefix)
    out = succeeded(job.lab_command("down"))
    assert out == "lab removed\n"
    assert netns.names(job.prefix) == []
    assert [pid for pid in processes if alive(pid)] == []
    assert job.processes() == {}
    assert not job.directory.exists()
