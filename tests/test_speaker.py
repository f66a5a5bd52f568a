"""The speaker end to end: a real ExaBGP 5.0 (spawned by the Speaker or run as a sidecar) with
pipit-exabgp-bridge, against real BIRD 2 peers, in network namespaces the tests create and
remove. Plus the bridge alone against a scripted ExaBGP (bad input, reconnects, errors).

Run as a script (`python -m tests.test_speaker agent ...`) this module is the agent process
the restart test SIGKILLs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import time
import signal
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from bgp_agent.bridge_protocol import announcement_from_json, decode, routes_of
from bgp_agent.exabgp_process import exabgp_command
from bgp_agent.model import Announcement, SpeakerError
from bgp_agent.speaker import ExaBGPSpeaker
from lab.bird import Bird, BirdPeer, bgp_config
from lab.process import wait, wait_async
from tests.helpers import blocks
from tests.speaker_support import (
    NODE_AS,
    Net,
    bird_count,
    bird_peer,
    established,
    eventually,
    make_speaker,
    needs_root,
    neighbor,
    running,
)

A, N = IPv4Address, IPv4Network
ROOT = Path(__file__).resolve().parents[1]
BRIDGE = str(Path(sys.executable).parent / "pipit-exabgp-bridge")


# --------------------------------------------------------------------------------------------
# Sessions and routes

@needs_root
def test_routes_flow_both_ways_with_bird(net1, state_dir):
    """Over a TCP-MD5 session."""
    own = [N("10.50.0.0/24"), N("10.50.1.0/24"), N("10.50.2.0/24")]
    ours = blocks(500)
    tagged = Announcement(ours[-1], communities=((NODE_AS, 100),), med=5,
                          large_communities=((4200000000, 1, 2),))

    async def scenario():
        with bird_peer(net1, 1, own, password="pipit-md5") as bird:
            async with running(make_speaker(state_dir, net1)) as speaker:
                await speaker.set_neighbors([neighbor(1, password="pipit-md5")])
                await eventually(lambda: established(speaker, net1.peer_address(1)), what="up")
                # pipit-exabgp: the settings in exabgp.env count on its reactor fixes
                assert "with Pipit's reactor fixes" in speaker.process.log_path.read_text()
                received = speaker.received[net1.peer_address(1)]
                assert set(received) == set(own)
                assert all(p.next_hop == net1.peer_address(1) and p.as_path == (65001,)
                           for p in received.values())

                await speaker.announce(net1.peer_address(1),
                                       [Announcement(p) for p in ours[:-1]] + [tagged])
                assert len(speaker.announced[net1.peer_address(1)]) == 500
                await eventually(bird_count(bird, 500), what="500 routes in BIRD")
                seen = bird.routes(protocol="node")
                assert seen[ours[0]].via == net1.node_address(1) and seen[ours[0]].as_path == (NODE_AS,)
                assert seen[tagged.prefix].communities == ((NODE_AS, 100),)
                assert seen[tagged.prefix].large_communities == ((4200000000, 1, 2),)

                await speaker.withdraw(net1.peer_address(1), ours[:250])
                assert set(speaker.announced[net1.peer_address(1)]) == set(ours[250:])
                await eventually(bird_count(bird, 250), what="250 withdrawn from BIRD")
                assert set(bird.routes(protocol="node")) == set(ours[250:])

                bird.configure(bgp_config(
                    net1.peer_address(1), net1.peer_address(1), 65001,
                    [BirdPeer("node", net1.node_address(1), NODE_AS, password="pipit-md5")],
                    own[1:]))
                await eventually(lambda: set(speaker.received[net1.peer_address(1)]) == set(own[1:]),
                                 what="BIRD's withdrawal to arrive")

    asyncio.run(scenario())


def segments_sent(netns_name: str, peer: IPv4Address) -> int:
    """Segments with data the node's end of its BGP session to `peer` has sent (the kernel's
    count, `ss -ti`): every BGP message goes in one of its own while nothing else is sent."""
    out = subprocess.run(["ip", "netns", "exec", netns_name, "ss", "-tinH", "state",
                          "established", "dst", str(peer)], capture_output=True, text=True,
                         check=True).stdout
    counts = re.findall(r"\bdata_segs_out:(\d+)", out)
    assert len(counts) == 1, out
    return int(counts[0])


@needs_root
def test_a_neighbour_s_keepalive_time_is_how_often_it_sends(net1, state_dir):
    """BGPPeer keepaliveTime through pipit-exabgp, with a 30 s hold time: without it, one
    keepalive every 10 s (a third of the hold time, ExaBGP's: at most one over 4 s, counted
    by the kernel); set to 1 on the running session (a reload, which keeps the session), one
    a second (3-5 over 4 s)."""
    address = net1.peer_address(1)

    async def sent_over_4_seconds() -> int:
        before = segments_sent(net1.node, address)
        await asyncio.sleep(4)  # the window the keepalives are counted over
        return segments_sent(net1.node, address) - before

    async def scenario():
        with bird_peer(net1, 1, hold_time=30):
            async with running(make_speaker(state_dir, net1)) as speaker:
                await speaker.set_neighbors([neighbor(1, hold_time=30)])
                await eventually(lambda: established(speaker, address), what="up")
                since = speaker.peers[address].since
                assert await sent_over_4_seconds() <= 1
                await speaker.set_neighbors([neighbor(1, hold_time=30, keepalive_time=1)])
                assert 3 <= await sent_over_4_seconds() <= 5
                assert speaker.peers[address].since == since  # the same session

    asyncio.run(scenario())


@needs_root
def test_a_peer_going_down_is_reported_and_its_routes_dropped(net1, state_dir):
    async def scenario():
        bird = bird_peer(net1, 1, [N("10.50.0.0/24")]).start()
        try:
            async with running(make_speaker(state_dir, net1)) as speaker:
                await speaker.set_neighbors([neighbor(1)])
                address = net1.peer_address(1)
                await eventually(lambda: established(speaker, address), what="up")
                assert speaker.received[address]
                up = speaker.peers[address]
                assert up.graceful_restart and up.restart_time == 120
                assert up.router_id == address
                bird.stop()
                down = await eventually(lambda: speaker.peers[address].state == "down"
                                        and speaker.peers[address], what="down")
                assert down.reason  # as ExaBGP said it, e.g. "notification received (6,0)"
                assert down.since > up.since
                assert down.graceful_restart and down.restart_time == 120  # for the agent
                assert address not in speaker.received
        finally:
            bird.destroy()

    asyncio.run(scenario())


@needs_root
def test_changing_the_neighbour_set_keeps_the_other_sessions(net2, state_dir):
    first, second = net2.peer_address(1), net2.peer_address(2)
    ours = blocks(5000, 20)

    async def scenario():
        with bird_peer(net2, 1) as bird1, bird_peer(net2, 2) as bird2:
            async with running(make_speaker(state_dir, net2)) as speaker:
                await speaker.set_neighbors([neighbor(1)])
                await eventually(lambda: established(speaker, first), what="first up")
                before_bird = bird1.protocol("node").since
                before_exabgp = speaker.peers[first].since

                # while routes are on their way to the first peer
                await speaker.announce(first, [Announcement(p) for p in ours])
                await speaker.set_neighbors([neighbor(1), neighbor(2)])
                await eventually(lambda: established(speaker, second), what="second up")
                await speaker.announce(second, [Announcement(p) for p in blocks(10)])
                await eventually(bird_count(bird2, 10), what="routes at the second peer")
                await eventually(bird_count(bird1, 5000), what="routes at the first peer")

                await speaker.set_neighbors([neighbor(1)])
                await eventually(lambda: not bird2.protocol("node").established, what="second gone")
                await eventually(lambda: second not in speaker.peers
                                 and second not in speaker.announced, what="second forgotten")

                assert bird1.protocol("node").since == before_bird
                assert speaker.peers[first].since == before_exabgp
                assert bird1.route_stats("node")["Import withdraws"]["accepted"] == 0
                assert bird1.route_count("node") == 5000

    asyncio.run(scenario())


@needs_root
def test_retire_withdraws_everything_before_returning(net1, state_dir):
    address = net1.peer_address(1)

    async def scenario():
        with bird_peer(net1, 1) as bird:
            async with running(make_speaker(state_dir, net1)) as speaker:
                await speaker.set_neighbors([neighbor(1)])
                await eventually(lambda: established(speaker, address), what="up")
                await speaker.announce(address, [Announcement(p) for p in blocks(800)])
                await eventually(bird_count(bird, 800), what="800 routes in BIRD")
                await speaker.retire()
                assert not speaker.announced
                # sent before retire() returned; BIRD may still be reading them
                await eventually(bird_count(bird, 0), what="BIRD to drop our routes")
                assert bird.protocol("node").established

    asyncio.run(scenario())


@needs_root
def test_a_refused_command_is_an_error_and_changes_nothing(net1, state_dir):
    async def scenario():
        async with running(make_speaker(state_dir, net1)) as speaker:
            await speaker.set_neighbors([neighbor(1)])
            await eventually(lambda: speaker.connected, what="bridge")
            with pytest.raises(SpeakerError, match="ExaBGP refused"):
                await speaker.announce(A("10.99.9.9"), [Announcement(N("10.1.0.0/26"))])
            assert not speaker.announced
            assert "10.99.1.2" in "\n".join(await speaker.command("show neighbor summary"))

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------
# ExaBGP's life: sidecar, supervision, adoption, an absent agent

@needs_root
def test_sidecar_mode_reloads_through_the_api(net1, state_dir):
    address = net1.peer_address(1)

    async def scenario():
        with bird_peer(net1, 1) as bird:
            speaker = make_speaker(state_dir, net1, mode="sidecar")
            await speaker.start()
            exabgp = subprocess.Popen(["ip", "netns", "exec", net1.node, *exabgp_command(state_dir)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True)
            try:
                await eventually(lambda: speaker.connected, what="the sidecar's bridge")
                assert not speaker.peers
                await speaker.set_neighbors([neighbor(1)])
                await eventually(lambda: established(speaker, address), what="up")
                await speaker.announce(address, [Announcement(p) for p in blocks(20)])
                await eventually(bird_count(bird, 20), what="routes in BIRD")
                await speaker.stop(stop_exabgp=True)  # asks ExaBGP to shut down
                await eventually(lambda: exabgp.poll() is not None, what="ExaBGP to exit")
            finally:
                if exabgp.poll() is None:
                    exabgp.kill()
                exabgp.wait()

    asyncio.run(scenario())


@needs_root
def test_a_dead_exabgp_is_restarted(net1, state_dir):
    address = net1.peer_address(1)

    async def scenario():
        with bird_peer(net1, 1):
            async with running(make_speaker(state_dir, net1)) as speaker:
                await speaker.set_neighbors([neighbor(1)])
                await eventually(lambda: established(speaker, address), what="up")
                first = speaker.exabgp_pid
                os.kill(first, signal.SIGKILL)
                await eventually(lambda: speaker.exabgp_pid != first and established(speaker, address),
                                 what="a new ExaBGP with the session back")
                assert int((state_dir / "exabgp.pid").read_text()) == speaker.exabgp_pid

    asyncio.run(scenario())


@needs_root
def test_a_killed_agent_is_replaced_without_a_flap(net1, state_dir):
    address = net1.peer_address(1)
    ours = blocks(300)
    agent = subprocess.Popen(
        [sys.executable, "-m", "tests.test_speaker", "agent", str(state_dir), net1.node, "300"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        with bird_peer(net1, 1, [N("10.50.0.0/24")]) as bird:
            ready = json.loads(read_line(agent, timeout=60))
            wait(bird_count(bird, 300), what="the agent's routes in BIRD")
            since, routes_before = bird.protocol("node").since, bird.routes(protocol="node")
            agent.send_signal(signal.SIGKILL)
            agent.wait()

            async def scenario():
                speaker = make_speaker(state_dir, net1)
                await speaker.start()
                try:
                    await eventually(lambda: speaker.connected, what="the bridge to reconnect")
                    assert speaker.exabgp_pid == ready["exabgp_pid"]  # adopted, not restarted
                    assert set(speaker.announced[address]) == set(ours)
                    assert set(speaker.received[address]) == {N("10.50.0.0/24")}
                    assert speaker.peers[address].since == ready["since"]
                    await speaker.set_neighbors([neighbor(1)])  # the same: nothing to do
                    await speaker.announce(address, [Announcement(p) for p in ours])
                    assert speaker.peers[address].since == ready["since"]
                    assert bird.protocol("node").since == since
                    assert bird.routes(protocol="node") == routes_before  # same routes, same times
                    assert bird.route_stats("node")["Import withdraws"]["accepted"] == 0
                finally:
                    await speaker.stop(stop_exabgp=True)

            asyncio.run(scenario())
    finally:
        if agent.poll() is None:
            agent.kill()
        agent.wait()


def read_line(process: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"no line from the agent within {timeout:g} s")
    line = process.stdout.readline()
    if not line:
        raise AssertionError(f"the agent exited with {process.wait()}")
    return line


def agent_main(state: str, netns: str, count: str) -> None:
    """The agent process of the restart test: brings a session up, announces, says so, waits."""
    async def main():
        net = Net(netns, [])
        speaker = make_speaker(Path(state), net)
        await speaker.start()
        await speaker.set_neighbors([neighbor(1)])
        address = net.peer_address(1)
        await eventually(lambda: established(speaker, address), what="up")
        await speaker.announce(address, [Announcement(p) for p in blocks(int(count))])
        print(json.dumps({"since": speaker.peers[address].since,
                          "exabgp_pid": speaker.exabgp_pid}), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


@needs_root
def test_the_bridge_keeps_exabgp_alive_while_no_agent_listens(net1, state_dir):
    """With no agent, ExaBGP still writes events to the bridge: here 20k routes announced,
    withdrawn and announced again, well over 1.5 MB of JSON: about 25 times the 64 KiB pipe
    buffer that 13k unread acks fill (trap 2). A bridge that stopped reading would freeze
    ExaBGP (no keepalives: the session dies) and could not hand over the routes afterwards."""
    address = net1.peer_address(1)
    flood = blocks(20000, 20)

    def export(bird: Bird, routes) -> None:
        bird.configure(bgp_config(net1.peer_address(1), net1.peer_address(1), 65001,
                                  [BirdPeer("node", net1.node_address(1), NODE_AS)], routes))

    def sent(bird: Bird) -> tuple[int, int]:
        stats = bird.route_stats("node")
        return stats["Export updates"]["accepted"], stats["Export withdraws"]["accepted"]

    async def scenario():
        with bird_peer(net1, 1) as bird:
            speaker = make_speaker(state_dir, net1)
            await speaker.start()
            await speaker.set_neighbors([neighbor(1)])
            await eventually(lambda: established(speaker, address), what="up")
            await speaker.announce(address, [Announcement(p) for p in blocks(10)])
            since = bird.protocol("node").since
            await speaker.stop(stop_exabgp=False)  # the agent is gone; ExaBGP and bridge stay

            updates, withdraws = sent(bird)
            for routes, more_updates, more_withdraws in ((flood, 20000, 0), ([], 0, 20000),
                                                         (flood, 20000, 0)):
                export(bird, routes)
                updates, withdraws = updates + more_updates, withdraws + more_withdraws
                await eventually(lambda: sent(bird) == (updates, withdraws), timeout=60,
                                 what="BIRD to send its routes")
            speaker = make_speaker(state_dir, net1)
            await speaker.start()
            try:
                await eventually(lambda: speaker.connected and len(speaker.received.get(address, ()))
                                 == len(flood), what="the snapshot with every route", timeout=60)
                assert bird.protocol("node").since == since
                assert len(speaker.announced[address]) == 10
            finally:
                await speaker.stop(stop_exabgp=True)

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------
# Volume: ten thousand routes announced and withdrawn (slow)

@needs_root
@pytest.mark.slow
def test_ten_thousand_announcements_reach_bird_and_are_withdrawn(net1, state_dir):
    address = net1.peer_address(1)

    async def scenario():
        with bird_peer(net1, 1) as bird:
            async with running(make_speaker(state_dir, net1)) as speaker:
                await speaker.set_neighbors([neighbor(1)])
                await eventually(lambda: established(speaker, address), what="up")
                for count, first in ((1000, 20), (10000, 40)):
                    routes = [Announcement(p) for p in blocks(count, first)]
                    await speaker.announce(address, routes)
                    await eventually(bird_count(bird, count), what=f"{count} in BIRD", timeout=120)
                    await speaker.withdraw(address, [r.prefix for r in routes])
                    await eventually(bird_count(bird, 0), what="withdrawn", timeout=120)
                    assert not speaker.announced.get(address)

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------
# The bridge alone, against a scripted ExaBGP (no root, no BGP)

UP = ('{ "exabgp": "5.0.0", "time": 100.5, "type": "state", "neighbor": { "address": '
      '{ "local": "10.0.0.1", "peer": "10.0.0.2" }, "asn": { "local": 64512, "peer": 64512 }, '
      '"router-id": "10.0.0.1", "state": "up" } }')
ROUTE = ('{ "exabgp": "5.0.0", "time": 101.0, "type": "update", "neighbor": { "address": '
         '{ "local": "10.0.0.1", "peer": "10.0.0.2" }, "asn": { "local": 64512, "peer": 64512 }, '
         '"direction": "receive", "message": { "update": { "attribute": { "origin": "igp" }, '
         '"announce": { "ipv4 unicast": { "10.0.0.2": [ { "nlri": "%s" } ] } } } } } }')


class ScriptedExaBGP:
    """Plays ExaBGP to a real bridge process: writes events to its stdin, reads its commands."""

    def __init__(self, socket_path: Path):
        self.process = subprocess.Popen([BRIDGE, "--socket", str(socket_path)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE)
        self.unread = b""

    def send(self, *lines: str) -> None:
        self.process.stdin.write("".join(line + "\n" for line in lines).encode())
        self.process.stdin.flush()

    def command(self, timeout: float = 10) -> str:
        """The bridge's next command line (read from the pipe itself: the bridge may write
        several at once, more than one readline() would leave for select() to see)."""
        deadline = time.monotonic() + timeout
        fd = self.process.stdout.fileno()
        while b"\n" not in self.unread:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, "the bridge sent no command"
            chunk = os.read(fd, 65536)
            assert chunk, "the bridge exited"
            self.unread += chunk
        line, self.unread = self.unread.split(b"\n", 1)
        return line.decode()

    def close(self) -> str:
        self.process.stdin.close()
        self.process.wait(10)
        return self.process.stderr.read().decode()


class FakeAgent:
    def __init__(self, path: Path):
        self.path = path
        self.connections: asyncio.Queue = asyncio.Queue()

    async def start(self):
        self.server = await asyncio.start_unix_server(
            lambda r, w: self.connections.put_nowait((r, w)), str(self.path))

    async def accept(self):
        return await asyncio.wait_for(self.connections.get(), 10)

    async def close(self):
        self.server.close()
        self.path.unlink(missing_ok=True)


async def receive(reader, until: str, timeout: float = 10) -> list[dict]:
    messages = []
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        assert line, "the bridge closed the connection"
        messages.append(json.loads(line))
        if messages[-1]["type"] == until:
            return messages


@pytest.mark.parametrize("protocol,form", [(3, "routes"), (4, "groups")])
def test_routes_are_sent_in_the_form_the_connected_bridge_reads(tmp_path, protocol, form):
    """A bridge older than protocol 4 (an ExaBGP left running by an older Pipit) reads routes
    listed one by one; a current one, in groups. The same routes either way. What is asked is
    written at the call, in order, awaited or not."""
    socket_path = tmp_path / "bridge.sock"
    routes = [Announcement(p, next_hop=A("10.0.0.7")) for p in blocks(3)]

    async def scenario():
        speaker = ExaBGPSpeaker(tmp_path, socket_path, "sidecar", A("10.0.0.1"),
                                A("10.0.0.1"), 64512)
        await speaker.start()
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        try:
            writer.write(b"".join(json.dumps(m).encode() + b"\n" for m in (
                {"type": "hello", "protocol": protocol, "bridge_pid": 1, "exabgp_pid": 2,
                 "digest": None}, {"type": "snapshot-begin"}, {"type": "snapshot-end"})))
            await wait_async(lambda: speaker.connected, 10, "the speaker sees the bridge")
            sending = speaker.announce_to([A("10.0.0.2")], routes)  # written now: not awaited
            withdrawing = speaker.withdraw_from([A("10.0.0.2")], [routes[0].prefix])
            request = json.loads(await asyncio.wait_for(reader.readline(), 10))
            assert request["op"] == "announce" and request["neighbors"] == ["10.0.0.2"]
            assert {"routes", "groups"} & set(request) == {form}
            assert routes_of(request, "routes", announcement_from_json) == tuple(routes)
            after = json.loads(await asyncio.wait_for(reader.readline(), 10))
            assert after["op"] == "withdraw" and after["id"] > request["id"]  # asked after it
            writer.write(b"".join(json.dumps({"type": "done", "id": r["id"]}).encode() + b"\n"
                                  for r in (request, after)))
            await asyncio.wait_for(asyncio.gather(sending, withdrawing), 10)
        finally:
            writer.close()
            await speaker.stop(stop_exabgp=False)
    asyncio.run(scenario())


def test_bridge_survives_bad_input_and_the_agent_coming_and_going(tmp_path):
    socket_path = tmp_path / "bridge.sock"
    exabgp = ScriptedExaBGP(socket_path)

    async def scenario():
        # no agent yet: garbage and real events are read all the same, and a lot of them
        exabgp.send("not json", '{"exabgp": "5.0.0", "type": "state"}', '{"exabgp": "5.0", "ty',
                    UP.replace('"10.0.0.2"', '"10.0.0.300"'), "{" * 100, "done", UP)
        exabgp.send(*(ROUTE % N((0x0A010000 + 64 * i, 26)) for i in range(5000)))  # ~1.5 MB
        agent = FakeAgent(socket_path)
        await agent.start()
        reader, writer = await agent.accept()
        snapshot = await receive(reader, "snapshot-end")
        assert snapshot[0]["type"] == "hello" and snapshot[0]["digest"] is None
        routes = sum(len(decode(m).announce) for m in snapshot if m["type"] == "received")
        while routes < 5000:  # the rest, live, if the bridge had not read them all yet
            message = (await receive(reader, "received"))[-1]
            routes += len(decode(message).announce)
        assert routes == 5000

        writer.write(b"garbage\n[1, 2]\n" + json.dumps({"id": 1, "op": "nonsense"}).encode()
                     + b"\n" + json.dumps({"id": 2, "op": "announce", "neighbors": ["10.0.0.2"],
                                           "routes": [{"prefix": "10.9.0.0/26"}]}).encode() + b"\n")
        await writer.drain()
        assert (await receive(reader, "error"))[-1]["id"] == 1
        assert exabgp.command() == ("neighbor 10.0.0.2 announce attributes next-hop self "
                                    "nlri 10.9.0.0/26")
        exabgp.send("error")  # ExaBGP's whole word on the matter
        reply = (await receive(reader, "error"))[-1]
        assert reply["id"] == 2 and "ExaBGP refused" in reply["message"]

        writer.write(json.dumps({"id": 3, "op": "announce", "neighbors": ["10.0.0.2"],
                                 "routes": [{"prefix": "10.9.0.0/26"}]}).encode() + b"\n")
        await writer.drain()
        assert "announce attributes" in exabgp.command()
        exabgp.send("done")
        messages = await receive(reader, "done")
        assert [m["type"] for m in messages] == ["announced", "done"]

        # the agent goes away and comes back: a fresh snapshot, with the announcement
        writer.close()
        reader, writer = await agent.accept()
        snapshot = await receive(reader, "snapshot-end")
        announced = [r for m in snapshot if m["type"] == "announced" for r in decode(m).routes]
        assert announced == [Announcement(N("10.9.0.0/26"))]
        writer.close()
        await agent.close()

    try:
        asyncio.run(scenario())
        assert exabgp.process.poll() is None  # alive through all of it
    finally:
        log = exabgp.close()
    assert "could not handle a line from ExaBGP" in log and "bad request from the agent" in log


def request(writer, **fields) -> None:
    writer.write(json.dumps(fields).encode() + b"\n")


# ExaBGP's report of a withdrawal it sent (api send-update): ROUTE % prefix, as a sent withdraw
SENT_WITHDRAW = (ROUTE.replace('"receive"', '"send"').replace('"announce"', '"withdraw"')
                 .replace('{ "10.0.0.2": [ { "nlri": "%s" } ] }', '[ { "nlri": "%s" } ]'))


def with_bridge(socket_path: Path, scenario, peers: tuple[str, ...] = ("10.0.0.2",)) -> None:
    """`await scenario(exabgp, agent, reader, writer)` against a real bridge process, its ExaBGP
    played by ScriptedExaBGP, once a FakeAgent has the bridge's snapshot and `peers` up; the
    agent's connection, the agent and the bridge are closed after, also when it fails."""
    exabgp = ScriptedExaBGP(socket_path)

    async def run():
        agent = FakeAgent(socket_path)
        await agent.start()
        exabgp.send(*(UP.replace("10.0.0.2", peer) for peer in peers))
        reader, writer = await agent.accept()
        try:
            snapshot = await receive(reader, "snapshot-end")
            while sum(m["type"] == "peer" for m in snapshot) < len(peers):
                snapshot += await receive(reader, "peer")
            await scenario(exabgp, agent, reader, writer)
        finally:
            writer.close()
            await agent.close()

    try:
        asyncio.run(run())
    finally:
        exabgp.close()


def test_bridge_asks_again_until_exabgp_shows_the_reload_applied(tmp_path):
    """ExaBGP drops a reload that arrives while routes are queued for a peer, and says nothing:
    the bridge only answers once `show neighbor configuration` carries the new digest, and then
    tells the agent to forget the peers that are no longer configured."""
    def configuration(digest: str) -> list[str]:
        return ["neighbor 10.0.0.2 {", f'\tdescription "pipit:{digest}";', "}", "done"]

    async def scenario(exabgp, agent, reader, writer):
        request(writer, id=1, op="reload", digest="bbbb", neighbors=["10.0.0.2"])
        for answer in (configuration("aaaa"), configuration("bbbb")):
            assert exabgp.command() == "reload"
            exabgp.send("reload in progress", "done")
            assert exabgp.command() == "show neighbor configuration"
            exabgp.send(*answer)
        messages = await receive(reader, "done")
        assert messages == [{"type": "forget", "peer": "10.0.0.3"},
                            {"type": "done", "id": 1, "output": []}]
        writer.close()
        reader, writer = await agent.accept()
        hello = (await receive(reader, "snapshot-end"))[0]
        assert hello["digest"] == "bbbb"
        writer.close()

    with_bridge(tmp_path / "bridge.sock", scenario, peers=("10.0.0.2", "10.0.0.3"))


def test_a_neighbour_renewed_by_a_reload_has_lost_what_it_was_sent(tmp_path):
    """A node readdressed: its neighbours become new peers inside ExaBGP (a new local
    address). A route announced between the agent's clear and the reload went to the old peer
    and is gone with it: once the reload is applied it is reported withdrawn, and the agent
    announces it again (it was missing on a peer before)."""
    def configuration(*neighbors: str) -> list[str]:
        return [line for n in neighbors
                for line in (f"neighbor {n} {{", '\tdescription "pipit:bbbb";', "}")] + ["done"]

    async def scenario(exabgp, agent, reader, writer):
        request(writer, id=1, op="announce", neighbors=["10.0.0.2", "10.0.0.3"],
                routes=[{"prefix": "10.9.0.0/26"}])
        exabgp.command()
        exabgp.send("done")
        await receive(reader, "done")
        request(writer, id=2, op="reload", digest="bbbb", neighbors=["10.0.0.2", "10.0.0.3"],
                renewed=["10.0.0.2"])
        assert exabgp.command() == "reload"
        exabgp.send("reload in progress", "done")
        assert exabgp.command() == "show neighbor configuration"
        exabgp.send(*configuration("10.0.0.2", "10.0.0.3"))
        messages = await receive(reader, "done")
        assert messages == [{"type": "withdrawn", "neighbors": ["10.0.0.2"],
                             "prefixes": ["10.9.0.0/26"]},
                            {"type": "done", "id": 2, "output": []}]

    with_bridge(tmp_path / "bridge.sock", scenario, peers=("10.0.0.2", "10.0.0.3"))


def test_bridge_retires_once_the_withdrawals_were_sent(tmp_path):
    async def scenario(exabgp, agent, reader, writer):
        request(writer, id=1, op="announce", neighbors=["10.0.0.2"],
                routes=[{"prefix": "10.9.0.0/26"}, {"prefix": "10.9.0.64/26"}])
        exabgp.command()
        exabgp.send("done")
        await receive(reader, "done")

        request(writer, id=2, op="retire", timeout=10)
        assert exabgp.command() == "clear adj-rib out"
        exabgp.send(SENT_WITHDRAW % "10.9.0.0/26", "done")  # a withdrawal may leave first
        messages = await receive(reader, "withdrawn")
        assert messages[-1]["prefixes"] == ["10.9.0.0/26", "10.9.0.64/26"]
        # one withdrawal is still to leave: an answer now would come before this "received"
        exabgp.send(ROUTE % "10.7.0.0/24")
        assert [m["type"] for m in await receive(reader, "received")] == ["received"]
        exabgp.send(SENT_WITHDRAW % "10.9.0.64/26")
        assert await receive(reader, "done") == [{"type": "done", "id": 2, "output": []}]

    with_bridge(tmp_path / "bridge.sock", scenario)


def test_queued_announcements_go_to_exabgp_together_and_are_answered_each(tmp_path):
    """A reflector's pass is hundreds of requests: the bridge writes those queued without
    waiting for each answer (ExaBGP then takes them in one turn of its loop), and still
    answers each request with its own outcome, in ExaBGP's order."""
    async def scenario(exabgp, agent, reader, writer):
        for i in range(3):  # queued together, as an agent's pass leaves them
            request(writer, id=10 + i, op="announce", neighbors=["10.0.0.2", "10.0.0.3"],
                    routes=[{"prefix": f"10.9.{i}.0/26", "next_hop": "10.0.0.7"}])
        await writer.drain()
        commands = [exabgp.command() for _ in range(3)]  # all three before any answer
        assert [c.split(" nlri ")[1] for c in commands] == [f"10.9.{i}.0/26" for i in range(3)]
        exabgp.send("done", "error", "done")
        messages = []
        while len([m for m in messages if m["type"] in ("done", "error")]) < 3:
            messages += await receive(reader, "done")
        replies = {m["id"]: m["type"] for m in messages if m["type"] in ("done", "error")}
        assert replies == {10: "done", 11: "error", 12: "done"}
        announced = [(m["neighbors"], m["groups"][0]["prefixes"]) for m in messages
                     if m["type"] == "announced"]
        assert announced == [(["10.0.0.2", "10.0.0.3"], ["10.9.0.0/26"]),
                             (["10.0.0.2", "10.0.0.3"], ["10.9.2.0/26"])]

    with_bridge(tmp_path / "bridge.sock", scenario)


def test_a_request_coming_while_commands_await_answers_is_written_at_once(tmp_path):
    """An agent's pass sends its requests one after another: one that reaches the bridge while
    earlier commands wait for ExaBGP's answers joins them in the pipeline (not after they are
    all answered), End-of-RIB too (ExaBGP sends it once the routes queued before it are out);
    a request of another kind (a raw command) waits until those before it are answered."""
    def announce(writer, i: int) -> None:
        request(writer, id=i, op="announce", neighbors=["10.0.0.2"],
                groups=[{"attributes": {"next_hop": "10.0.0.7"}, "prefixes": [f"10.9.{i}.0/26"]}])

    async def scenario(exabgp, agent, reader, writer):
        announce(writer, 1)
        await writer.drain()
        assert exabgp.command().endswith("nlri 10.9.1.0/26")
        announce(writer, 2)
        request(writer, id=3, op="eor", neighbor="10.0.0.2")
        request(writer, id=4, op="command", line="show neighbor summary")
        await writer.drain()
        assert exabgp.command().endswith("nlri 10.9.2.0/26")  # the first still unanswered
        assert exabgp.command() == "neighbor 10.0.0.2 announce eor ipv4 unicast"
        with pytest.raises(AssertionError, match="no command"):
            exabgp.command(timeout=0.5)  # and the raw command not yet
        exabgp.send("done", "done", "done")
        assert exabgp.command() == "show neighbor summary"
        exabgp.send("done")
        messages = []
        while len([m for m in messages if m["type"] == "done"]) < 4:
            messages += await receive(reader, "done")
        assert [m["id"] for m in messages if m["type"] == "done"] == [1, 2, 3, 4]
        assert not [m for m in messages if m["type"] not in ("done", "announced")]

    with_bridge(tmp_path / "bridge.sock", scenario)


def test_a_retiring_reflector_withdraws_its_own_routes_and_leaves_what_it_reflects(tmp_path):
    async def scenario(exabgp, agent, reader, writer):
        request(writer, id=1, op="announce", neighbors=["10.0.0.2"],
                routes=[{"prefix": "10.9.0.0/26"}])  # our own block
        exabgp.command()
        exabgp.send("done")
        await receive(reader, "done")
        request(writer, id=2, op="announce", neighbors=["10.0.0.2"],
                routes=[{"prefix": "10.8.0.0/26", "next_hop": "10.0.0.7",
                         "originator_id": "10.0.0.7", "cluster_list": ["244.0.0.1"]}])
        exabgp.command()
        exabgp.send("done")
        await receive(reader, "done")

        request(writer, id=3, op="retire", timeout=10)
        assert exabgp.command() == "neighbor 10.0.0.2 withdraw attributes nlri 10.9.0.0/26"
        exabgp.send("done", SENT_WITHDRAW % "10.9.0.0/26")
        messages = await receive(reader, "done")
        assert [m["prefixes"] for m in messages if m["type"] == "withdrawn"] == [
            ["10.9.0.0/26"]]

    with_bridge(tmp_path / "bridge.sock", scenario)


if __name__ == "__main__":
    if sys.argv[1:2] == ["agent"]:
        agent_main(*sys.argv[2:])
