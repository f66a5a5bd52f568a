"""The node's local sockets (status, ExaBGP bridge; the IPAM service in test_cni_plugin) are
root's only: 0600 in a 0700 directory, whatever the process umask, from the first moment."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from contextlib import contextmanager

from bgp_agent.speaker import ExaBGPSpeaker
from bgp_agent.status import StatusServer, read_status
from ipam.local_socket import bind_private, start_private_server


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_private_socket_is_0600_in_a_new_0700_directory_under_any_umask(tmp_path):
    path = tmp_path / "run" / "pipit" / "x.sock"
    with umask(0):
        sock = bind_private(str(path))
    try:
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert mode(path) == 0o600
        assert mode(path.parent) == 0o700
    finally:
        sock.close()


def test_an_existing_directory_is_left_as_the_operator_made_it(tmp_path):
    (tmp_path / "shared").mkdir(mode=0o755)
    with umask(0):
        bind_private(str(tmp_path / "shared" / "x.sock")).close()
    assert mode(tmp_path / "shared") == 0o755
    assert mode(tmp_path / "shared" / "x.sock") == 0o600


def test_the_status_and_bridge_sockets_are_private(tmp_path):
    async def scenario():
        status = StatusServer(str(tmp_path / "status" / "status.sock"), lambda: {"node": "n1"})
        speaker = ExaBGPSpeaker(tmp_path / "state" / "exabgp", tmp_path / "bridge" / "b.sock",
                                "sidecar", "10.0.0.1", "10.0.0.1", 64512)
        with umask(0):
            await status.start()
            await speaker.start()
        try:
            for path in (tmp_path / "status" / "status.sock", tmp_path / "bridge" / "b.sock"):
                assert (mode(path), mode(path.parent)) == (0o600, 0o700), path
            document = await asyncio.to_thread(read_status, str(tmp_path / "status" /
                                                                "status.sock"))
            assert document["node"] == "n1"
        finally:
            await status.close()
            await speaker.stop(stop_exabgp=False)
    asyncio.run(scenario())


def test_the_listen_backlog_takes_a_burst_of_connections(tmp_path):
    """Connections queue until the server accepts them: 500 at once (a burst of pods) must
    not see EAGAIN, which asyncio's default backlog of 100 gave."""
    async def scenario():
        server = await start_private_server(lambda r, w: w.close(), str(tmp_path / "s.sock"))
        clients = []
        try:
            for _ in range(500):  # no await: the server accepts none meanwhile
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                clients.append(client)
                client.setblocking(False)
                client.connect(str(tmp_path / "s.sock"))  # BlockingIOError once it is full
        finally:
            for client in clients:
                client.close()
            server.close()
            await server.wait_closed()
    asyncio.run(scenario())
