"""Helpers for the tests of the speaker against real BIRD peers (test_speaker.py,
test_bgp_peer.py, test_agent_lifecycle.py): a node namespace with one namespace per peer, BIRD
in a peer, an ExaBGPSpeaker in the node, and polling until a session is up. The fixtures built
on them (net1, net2, state_dir) are in conftest.py."""

from __future__ import annotations

import os
import signal
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from bgp_agent.model import Neighbor
from bgp_agent.speaker import ExaBGPSpeaker
from lab.bird import Bird, BirdPeer, bgp_config
from lab.netns import Namespaces
from lab.process import command_line, wait_async
from tests.helpers import sh

A = IPv4Address
NODE_AS = 64512

needs_root = pytest.mark.netns  # real ExaBGP and BIRD in network namespaces


# --------------------------------------------------------------------------------------------
# Network namespaces: the node, and one namespace per peer on its own link 10.99.<k>.0/24

@dataclass
class Net:
    node: str
    peers: list[str]

    @staticmethod
    def node_address(k: int) -> IPv4Address:
        return A(f"10.99.{k}.1")

    @staticmethod
    def peer_address(k: int) -> IPv4Address:
        return A(f"10.99.{k}.2")


@contextmanager
def network(peers: int):
    with Namespaces() as namespaces:
        node = namespaces.create("node")
        peer_names = namespaces.create_many("peer", peers)
        for k, peer in enumerate(peer_names, 1):
            sh("ip", "-n", node, "link", "add", f"v{k}", "type", "veth", "peer", "name", "v0",
               "netns", peer)
            sh("ip", "-n", node, "addr", "add", f"{Net.node_address(k)}/24", "dev", f"v{k}")
            sh("ip", "-n", peer, "addr", "add", f"{Net.peer_address(k)}/24", "dev", "v0")
            for ns, dev in ((node, f"v{k}"), (peer, "v0")):
                sh("ip", "-n", ns, "link", "set", dev, "up")
        yield Net(node, peer_names)


def kill_exabgp(state: Path) -> None:
    try:
        pid = int((state / "exabgp.pid").read_text())
        if any("exabgp" in arg for arg in command_line(pid)):
            os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass


def bird_peer(net: Net, k: int, routes=(), **options) -> Bird:
    """BIRD in peer namespace k, AS 65000+k, one session ("node") to the node, exporting
    `routes` as blackholes."""
    config = bgp_config(net.peer_address(k), net.peer_address(k), 65000 + k,
                        [BirdPeer("node", net.node_address(k), NODE_AS, **options)], routes)
    return Bird(f"p{k}", config, netns=net.peers[k - 1])


def neighbor(k: int, **options) -> Neighbor:
    return Neighbor(Net.peer_address(k), 65000 + k, Net.node_address(k), NODE_AS, kind="global",
                    **options)


def make_speaker(state: Path, net: Net, mode: str = "spawn") -> ExaBGPSpeaker:
    return ExaBGPSpeaker(state, state / "bridge.sock", mode, Net.node_address(1),
                         Net.node_address(1), NODE_AS, netns=net.node)


@asynccontextmanager
async def running(speaker: ExaBGPSpeaker):
    await speaker.start()
    try:
        yield speaker
    finally:
        await speaker.stop(stop_exabgp=True)


async def eventually(condition, timeout: float = 30.0, what: str = "condition"):
    """Poll `condition` (sync) every 20 ms until it returns something truthy (returned), or
    raise TimeoutError at the deadline."""
    return await wait_async(condition, timeout, what, interval=0.02)


def established(speaker: ExaBGPSpeaker, address: IPv4Address) -> bool:
    peer = speaker.peers.get(address)
    return bool(speaker.connected and peer and peer.state == "up" and peer.end_of_rib)


def bird_count(bird: Bird, expected: int):
    return lambda: bird.route_count("node") == expected
