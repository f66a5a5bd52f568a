"""End to end in a lab cluster: promises of the README that only a whole cluster can check.

- SIGUSR1: "the agent exits and nothing else changes": no session flaps, no route changes
  anywhere, and the next agent adopts the running ExaBGP.
- A disabled pool stays routed: its pods keep their addresses and every pod still reaches
  every pod; a new ADD gets no address from it (fails cleanly while no other pool is enabled,
  then takes one from the pool that is).
- Borrowed addresses are routed (strictAffinity false, the default): a node whose blocks are
  full borrows from another node's block, and every pod reaches that pod, those on the
  block's owner too, which takes the /32 inside its own block.

The tests share one lab and run in order; each sets up what it relies on (the pools are
applied again, a pod added again is the one already there), so one can also run alone.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import threading

import pytest

from lab import netns
from lab.cluster import Lab
from lab.cni import CNIError
from lab.process import command_line, wait
from tests.helpers import assert_pods_reach_each_other, running_lab

pytestmark = [pytest.mark.slow, pytest.mark.lab]

DISABLED_DEFAULT_POOL = """\
apiVersion: pipit.dev/v1
kind: IPPool
metadata: {name: default}
spec: {cidr: 10.244.0.0/16, blockSize: 26, disabled: true}
"""
# Two blocks of four addresses: the first of each is its gateway, the last its broadcast
# address, so each holds two pods.
TIGHT_POOL = """\
apiVersion: pipit.dev/v1
kind: IPPool
metadata: {name: tight}
spec: {cidr: 10.251.0.0/29, blockSize: 30}
"""
TIGHT = ipaddress.ip_network("10.251.0.0/29")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with running_lab(tmp_path_factory.mktemp("lab"), "promise", node_count=3, pods_per_node=2,
                     hold_time=6, restart_time=20) as cluster:
        yield cluster


def apply(lab: Lab, documents: str) -> None:
    result = lab.pipitctl("apply", "-f", "-", input=documents)
    assert result.returncode == 0, result.stderr


def node_ip(lab: Lab, node: str) -> str:
    """The node's address on the fabric, as its agent says."""
    return str(ipaddress.ip_interface(lab.status(node)["address"]).ip)


def peer_since(lab: Lab, node: str) -> dict[str, tuple[str, float]]:
    """Each of a node's sessions: its state and since when it is in that state."""
    return {p["name"]: (p["state"], p["since"]) for p in lab.status(node)["peers"]}


def exabgp_pids(lab: Lab, node: str) -> list[int]:
    """The ExaBGP processes running in a node's namespace (not its API bridge)."""
    return [pid for pid in netns.pids(lab.node_ns(node))
            if any(os.path.basename(arg) == "pipit-exabgp" for arg in command_line(pid))]


def who_holds(lab: Lab, address: str) -> str:
    result = lab.pipitctl("ipam", "show", "--ip", address)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def own_tight_block(lab: Lab, node: str) -> str:
    """The block of pool tight that a node holds (its blackhole route), once it has one."""
    def found() -> list[str]:
        return [p for p, hop in lab.pipit_routes(node).items()
                if hop == "blackhole" and ipaddress.ip_network(p).subnet_of(TIGHT)]
    [block] = wait(found, 30, f"{node} to blackhole its block of pool tight")
    return block


class RouteEvents:
    """Every IPv4 route change in a node's namespace (`ip -4 monitor route`) from now on. A
    marker route added and deleted again brackets the watch: once its deletion is seen, the
    monitor is listening (at the start), or has passed on everything that happened before (at
    the end)."""

    MARKER = "198.18.0.1"  # the benchmarking range: in no pool, no daemon's route

    def __init__(self, namespace: str):
        self.namespace = namespace
        self.lines: list[str] = []
        self.process = subprocess.Popen(["ip", "-4", "-n", namespace, "monitor", "route"],
                                        stdout=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        try:
            self._bracket()
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.strip())

    def _marker_deletions(self) -> int:
        return sum(line.startswith("Deleted") and self.MARKER in line for line in self.lines)

    def _bracket(self) -> None:
        seen = self._marker_deletions()
        for verb in ("add", "del"):
            subprocess.run(["ip", "-n", self.namespace, "route", verb, "blackhole",
                            self.MARKER], check=True)
        wait(lambda: self._marker_deletions() > seen, 10,
             f"ip monitor in {self.namespace} to see the marker route go")

    def changes(self) -> list[str]:
        """The route changes seen so far (the marker's excepted)."""
        self._bracket()
        return [line for line in self.lines if self.MARKER not in line]

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        self.reader.join(5)


def test_agent_sigusr1_exits_and_changes_nothing_and_the_next_agent_adopts_exabgp(lab):
    node = "n1"
    others = [n for n in lab.nodes() if n != node]
    lab.wait_mesh()
    before_routes = {n: lab.pipit_routes(n) for n in lab.nodes()}
    before_since = {n: peer_since(lab, n) for n in lab.nodes()}
    assert all(state == "up" for n in lab.nodes() for state, _ in before_since[n].values())
    [exabgp] = exabgp_pids(lab, node)
    events = {n: RouteEvents(lab.node_ns(n)) for n in lab.nodes()}
    log = lab.node_dir(node) / "agent.log"
    logged_before = log.stat().st_size
    try:
        lab.stop_agent(node, signal.SIGUSR1)  # returns once the agent has exited
        # an exit as every rolling update makes: nothing in the log that calls for attention
        said = log.read_bytes()[logged_before:].decode(errors="replace")
        assert " ERROR " not in said and " WARNING " not in said, said
        # The agent is gone; its ExaBGP runs on, holding the sessions and the routes.
        assert exabgp_pids(lab, node) == [exabgp], "ExaBGP did not outlive the agent"
        assert lab.pipit_routes(node) == before_routes[node]
        for other in others:
            assert peer_since(lab, other)[node] == before_since[other][node]
            assert lab.pipit_routes(other) == before_routes[other]
        lab.start_agent(node)
        wait(lambda: lab.status(node)["speakerConnected"], 30, "the restarted agent's speaker")
        lab.wait_mesh()
        # The new agent adopted that ExaBGP: no other one was started.
        assert exabgp_pids(lab, node) == [exabgp]
        # Same sessions on both sides (no reset: "up since" as it was), the same routes, and
        # not one route changed on any node at any moment in between.
        assert {n: peer_since(lab, n) for n in lab.nodes()} == before_since
        assert {n: lab.pipit_routes(n) for n in lab.nodes()} == before_routes
        assert {n: watch.changes() for n, watch in events.items()} == {n: [] for n in events}
    finally:
        for watch in events.values():
            watch.close()
    assert_pods_reach_each_other(lab)


def test_a_disabled_pool_stays_routed_and_hands_out_no_address(lab):
    pods = lab.all_pods()
    before_routes = {n: lab.pipit_routes(n) for n in lab.nodes()}
    held = {pod.address: who_holds(lab, pod.address) for pod in pods}
    assert all(" is in use by handle " in line for line in held.values()), held
    apply(lab, DISABLED_DEFAULT_POOL)
    # No enabled pool is left: an ADD fails with one sentence, allocating nothing (n1 still
    # has free addresses in its block of the disabled pool; none of them is taken).
    usage = lab.pipitctl("ipam", "show", "--show-blocks").stdout
    with pytest.raises(CNIError, match="no enabled IP pool selects node n1"):
        lab.add_pod("n1", "n1-nopool")
    assert lab.pipitctl("ipam", "show", "--show-blocks").stdout == usage
    lab.remove_pod("n1-nopool", node="n1")  # DEL, as a runtime does after a failed ADD
    # With another pool enabled, a new pod gets its address from that one.
    apply(lab, TIGHT_POOL)
    new = lab.add_pod("n1", "n1-tight")
    assert ipaddress.ip_address(new.address) in TIGHT
    tight_block = own_tight_block(lab, "n1")
    # The others routing n1's new block shows that they have read etcd past the pool's
    # disabling: what they would have done about it, they have done by now.
    for other in ("n2", "n3"):
        wait(lambda other=other: lab.pipit_routes(other).get(tight_block) == node_ip(lab, "n1"),
             30, f"{other} to route {tight_block} via n1")
    # The disabled pool's pods keep their addresses, and their blocks stay routed.
    for pod in pods:
        assert f"{pod.address}/26" in netns.addresses(pod.netns)
        assert who_holds(lab, pod.address) == held[pod.address]
    for node, routes in before_routes.items():
        now = lab.pipit_routes(node)
        assert {p: hop for p, hop in now.items() if p in routes} == routes, node
    assert_pods_reach_each_other(lab)


def test_an_address_borrowed_from_another_nodes_block_is_routed_to_and_from_every_pod(lab):
    apply(lab, DISABLED_DEFAULT_POOL + "---\n" + TIGHT_POOL)
    owner_pod = lab.add_pod("n1", "n1-tight")  # n1 claims a tight block (or holds it already)
    owner_block = own_tight_block(lab, "n1")
    assert ipaddress.ip_address(owner_pod.address) in ipaddress.ip_network(owner_block)
    # n2 claims the other block and fills it (two pods)...
    filling = [lab.add_pod("n2", f"n2-tight{i}") for i in (1, 2)]
    n2_block = own_tight_block(lab, "n2")
    assert n2_block != owner_block
    assert all(ipaddress.ip_address(p.address) in ipaddress.ip_network(n2_block)
               for p in filling)
    # ...so the next pod on n2 borrows a free address of n1's block.
    borrower = lab.add_pod("n2", "n2-borrower")
    assert ipaddress.ip_address(borrower.address) in ipaddress.ip_network(owner_block)
    shown = lab.pipitctl("ipam", "show", "--show-borrowed").stdout
    assert any(line.split()[:4] == [borrower.address, owner_block, "n1", "n2"]
               for line in shown.splitlines()), shown
    # Every node routes that /32 to n2: n1 inside its own block (more specific than its
    # blackhole), n3 beside n1's route for the whole block.
    host = borrower.address  # as `ip route` names a /32
    for node in ("n1", "n3"):
        wait(lambda node=node: lab.pipit_routes(node).get(host) == node_ip(lab, "n2"), 30,
             f"{node} to route {host} via n2")
    assert lab.pipit_routes("n1")[owner_block] == "blackhole"
    assert lab.pipit_routes("n3")[owner_block] == node_ip(lab, "n1")
    assert_pods_reach_each_other(lab)
