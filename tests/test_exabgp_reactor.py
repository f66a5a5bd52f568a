"""pipit-exabgp's fixes to ExaBGP's reactor loop (bgp_agent.exabgp_reactor): the fixed
Reactor._wait_for_io on ExaBGP's own ASYNC queue and a real poll set, and pipit-exabgp
running ExaBGP with them. (That the agent's ExaBGP runs through it: tests/test_speaker.py.)"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from exabgp.environment import getenv
from exabgp.logger import _log, log
from exabgp.reactor.asynchronous import ASYNC
from exabgp.reactor.loop import Reactor
from exabgp.reactor.peer import Peer

from bgp_agent import exabgp_reactor
from bgp_agent.exabgp_config import render
from bgp_agent.exabgp_reactor import wait_for_io

PIPIT_EXABGP = str(Path(sys.executable).parent / "pipit-exabgp")
EXABGP_PEER_ID = Peer.__dict__["id"]  # (pipit-exabgp's fix 4 replaces it in its own process)
WATCHED = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLNVAL | select.POLLERR
AN_HOUR_MS = 3_600_000


class Processes:
    def __init__(self):
        self.fds: list[int] = []  # the API helpers' pipes


class ReactorParts:
    """What Reactor._wait_for_io uses of the reactor. (A whole Reactor cannot be built in a
    test process: it changes directory to / and sets the umask.) _prevent_spin, which sleeps
    in ExaBGP, only counts here."""
    Exit = Reactor.Exit

    def __init__(self):
        self._poller = select.poll()
        self.asynchronous = ASYNC()
        self.processes = Processes()
        self.spins = 0

    def _prevent_spin(self) -> bool:
        self.spins += 1
        return True

    def _termination(self, reason, exit_code) -> None:
        raise AssertionError(f"the reactor would stop: {reason}")


@pytest.fixture
def reactor():
    log.init(getenv())  # ExaBGP's logger, as its own start-up sets it (ASYNC logs through it)
    return ReactorParts()


def closed_socket_fd() -> int:
    """The number of a socket descriptor that has been closed again."""
    one, other = socket.socketpair()
    fd = one.fileno()
    one.close()
    other.close()
    return fd


def test_a_closed_peer_socket_leaves_the_poll_set_instead_of_making_the_loop_sleep(reactor):
    fd = closed_socket_fd()  # a session that ended; ExaBGP never unregisters its socket
    reactor._poller.register(fd, WATCHED)
    assert list(wait_for_io(reactor, 0)) == []
    assert reactor.spins == 0  # ExaBGP's version sleeps speed/100 s here, on every turn
    assert reactor._poller.poll(0) == []  # gone: the next turns wait on the live sockets


def test_a_closed_api_pipe_is_left_to_the_reactor(reactor):
    """The reactor unregisters its helpers' pipes itself (and would fail on one already gone)."""
    fd = closed_socket_fd()
    reactor.processes.fds = [fd]
    reactor._poller.register(fd, WATCHED)
    list(wait_for_io(reactor, 0))
    assert reactor.spins == 1
    assert reactor._poller.poll(0) == [(fd, select.POLLNVAL)]


def test_readable_descriptors_are_still_handed_out(reactor):
    read, write = os.pipe()
    try:
        reactor._poller.register(read, WATCHED)
        os.write(write, b"announce route 10.1.0.0/26 next-hop self\n")
        assert list(wait_for_io(reactor, AN_HOUR_MS)) == [read]
        assert reactor.spins == 0
    finally:
        os.close(read)
        os.close(write)


def test_a_half_done_command_is_resumed_without_waiting_for_the_period(reactor):
    """ExaBGP works through a command 50 steps per turn (one step per prefix of an `announce
    attributes`); with work left the loop must come straight back, not wait a period."""
    def announcement():
        for _ in range(120):
            yield False
    reactor.asynchronous.schedule("pipit", "announce attributes ... nlri ...", announcement())
    reactor.asynchronous.run()
    assert not reactor.asynchronous.ready()  # 50 of 120 steps done
    wake, waker = os.pipe()  # frees the wait below, should it block after all
    reactor._poller.register(wake, WATCHED)
    returned = threading.Event()
    waiting = threading.Thread(
        target=lambda: (list(wait_for_io(reactor, AN_HOUR_MS)), returned.set()), daemon=True)
    try:
        waiting.start()
        came_back = returned.wait(30)  # a deadline for the test, not a figure: the period is 1 h
    finally:
        os.write(waker, b"x")
        waiting.join(10)
        os.close(wake)
        os.close(waker)
    assert came_back, "the loop waited for the period with a command half done"


def listening(count: int):
    """ExaBGP's Listener on a real non-blocking socket on loopback, and `count` clients
    connected to it (from 127.0.0.1 .. 127.0.0.count), not yet accepted."""
    from exabgp.reactor.listener import Listener
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.setblocking(False)
    listener = Listener(reactor=None)
    listener.serving = True
    listener._sockets[server] = ("127.0.0.1", server.getsockname()[1], False, False)
    clients = []
    for n in range(1, count + 1):
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.bind((f"127.0.0.{n}", 0))
        client.connect(server.getsockname())
        clients.append(client)
    return listener, server, clients


def described(incoming) -> tuple:
    return (incoming.afi, incoming.peer, incoming.local, incoming.io.getpeername())


def test_every_waiting_connection_is_accepted_in_one_turn_as_exabgp_would_take_them():
    from exabgp.reactor.listener import Listener
    log.init(getenv())
    theirs_listener, theirs_server, theirs_clients = listening(5)
    ours_listener, ours_server, ours_clients = listening(5)
    theirs, ours = [], []
    try:
        # ExaBGP: one connection per turn (taken, then handed on), five turns
        for _ in range(5):
            assert Listener.incoming(theirs_listener)
            theirs += Listener._connected(theirs_listener)
        # pipit-exabgp: one turn takes them all, in the order they came
        assert exabgp_reactor.incoming(ours_listener)
        ours += exabgp_reactor.connected(ours_listener)
        assert not exabgp_reactor.incoming(ours_listener)  # nothing left waiting
        assert list(exabgp_reactor.connected(ours_listener)) == []
        assert [described(i)[:3] for i in ours] == [described(i)[:3] for i in theirs]
        assert [described(i)[3][0] for i in ours] == [f"127.0.0.{n}" for n in range(1, 6)]
        assert ({described(i)[3][0] for i in theirs}
                == {f"127.0.0.{n}" for n in range(1, 6)})
    finally:
        for sock in [theirs_server, ours_server, *theirs_clients, *ours_clients,
                     *(i.io for i in theirs + ours)]:
            sock.close()


IP_MINTTL = 21  # linux/in.h


class Reactor6:
    """What fix 6 asks of ExaBGP's reactor: its peers' neighbours, as ExaBGP holds them."""

    def __init__(self, minimums: dict[str, int | None]):
        from exabgp.protocol.ip import IP
        self._neighbors = {address: {"peer-address": IP.create(address),
                                     "incoming-ttl": minimum}
                           for address, minimum in minimums.items()}

    def peers(self):
        return list(self._neighbors)

    def neighbor(self, key):
        return self._neighbors[key]


def test_gtsm_is_checked_per_connection_never_on_the_shared_listening_socket(monkeypatch):
    """ExaBGP's own Listener._listen and _connected with fix 6 on real loopback sockets: the
    listening socket every neighbour shares gets no minimum TTL (the GTSM neighbour's 255
    dropped the SYNs of every other one, TTL 64); a connection from the GTSM neighbour that
    came with TTL 64 is refused, one that came with 255 gets the minimum on its own socket,
    and a neighbour without GTSM connects as before."""
    from exabgp.protocol.ip import IP
    from exabgp.reactor import listener as listener_module
    from exabgp.reactor.listener import Listener
    from exabgp.reactor.network import tcp
    log.init(getenv())
    listen = getattr(Listener._listen, "__wrapped__", Listener._listen)
    monkeypatch.setattr(listener_module, "set_minimum_ttl", tcp.set_minimum_ttl)
    plain = Listener(None)  # ExaBGP as it is: the shared socket takes the GTSM minimum
    listen(plain, IP.create("127.0.0.1"), IP.create("127.0.0.2"), 0, None, False, 255)
    [shared] = plain._sockets
    assert shared.getsockopt(socket.IPPROTO_IP, IP_MINTTL) == 255
    shared.close()
    monkeypatch.setattr(Listener, "_listen", exabgp_reactor.listen_saving_syns(listen))
    monkeypatch.setattr(listener_module, "set_minimum_ttl", exabgp_reactor._no_shared_minimum)
    listener = Listener(Reactor6({"127.0.0.2": 255, "127.0.0.3": 255, "127.0.0.4": None}))
    listener._listen(IP.create("127.0.0.1"), IP.create("127.0.0.2"), 0, None, False, 255)
    [server] = listener._sockets
    assert server.getsockopt(socket.IPPROTO_IP, IP_MINTTL) == 0
    assert server.getsockopt(socket.IPPROTO_IP, socket.IP_TTL) == 255  # SYN-ACKs for GTSM
    clients = {}
    for address, ttl in (("127.0.0.2", 64), ("127.0.0.3", 255), ("127.0.0.4", 64)):
        client = clients[address] = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
        client.bind((address, 0))
        client.connect(server.getsockname())
    try:
        assert exabgp_reactor.incoming(listener)
        accepted = {c.local: c for c in exabgp_reactor.connected_checked(listener)}
        assert set(accepted) == {"127.0.0.3", "127.0.0.4"}
        assert accepted["127.0.0.3"].io.getsockopt(socket.IPPROTO_IP, IP_MINTTL) == 255
        assert accepted["127.0.0.4"].io.getsockopt(socket.IPPROTO_IP, IP_MINTTL) == 0
        clients["127.0.0.2"].settimeout(10)
        assert clients["127.0.0.2"].recv(1) == b""  # closed on it
    finally:
        for sock in [server, *clients.values(), *(c.io for c in accepted.values())]:
            sock.close()


def test_a_syns_ttl_is_read_from_what_the_listening_socket_saved():
    with socket.socket() as server:
        server.setsockopt(socket.IPPROTO_TCP, exabgp_reactor.TCP_SAVE_SYN, 1)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.socket() as client:
            client.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 77)
            client.connect(server.getsockname())
            io, _ = server.accept()
            with io:
                assert exabgp_reactor.syn_ttl(io) == 77
                assert exabgp_reactor.syn_ttl(io) is None  # saved once, read once


@pytest.fixture
def original_logger():
    """log.debug as ExaBGP has it, put back after the test (apply() replaces it)."""
    had = log.__dict__.get("debug")
    yield
    if had is None:
        if "debug" in log.__dict__:
            delattr(log, "debug")
    else:
        log.debug = had


def test_the_fixes_are_installed_only_on_the_release_they_were_written_for(monkeypatch,
                                                                           original_logger):
    import exabgp.version
    from exabgp.reactor import listener as listener_module
    from exabgp.reactor.listener import Listener
    from exabgp.reactor.api import processes
    from exabgp.reactor.keepalive import KA
    listen = getattr(Listener._listen, "__wrapped__", Listener._listen)
    ka_init = getattr(KA.__init__, "__wrapped__", KA.__init__)
    ka_call = getattr(KA.__call__, "__wrapped__", KA.__call__)
    monkeypatch.setattr(KA, "__init__", ka_init)
    monkeypatch.setattr(KA, "__call__", ka_call)
    originals = (Reactor._wait_for_io, Listener.incoming, Listener._connected, Peer.id,
                 log.debug, processes.os, listen, listener_module.set_minimum_ttl)
    for owner, name, original in ((Reactor, "_wait_for_io", originals[0]),
                                  (Listener, "incoming", originals[1]),
                                  (Listener, "_connected", originals[2]),
                                  (Peer, "id", originals[3]), (processes, "os", originals[5]),
                                  (Listener, "_listen", listen),
                                  (listener_module, "set_minimum_ttl", originals[7])):
        monkeypatch.setattr(owner, name, original)  # restored after the test
    monkeypatch.setattr(exabgp.version, "release", "5.1.0")
    assert "5.1.0" in exabgp_reactor.apply()
    assert (Reactor._wait_for_io, Listener.incoming, Listener._connected, Peer.id,
            log.debug, processes.os, Listener._listen,
            listener_module.set_minimum_ttl) == originals
    assert (KA.__init__, KA.__call__) == (ka_init, ka_call)
    monkeypatch.setattr(exabgp.version, "release", "5.0.15")
    for _ in range(2):  # twice: still one layer
        assert exabgp_reactor.apply() is None
        assert Reactor._wait_for_io is wait_for_io
        assert (Listener.incoming, Listener._connected) == (exabgp_reactor.incoming,
                                                             exabgp_reactor.connected_checked)
        assert Listener._listen.__wrapped__ is listen
        assert listener_module.set_minimum_ttl is exabgp_reactor._no_shared_minimum
        assert Peer.id is exabgp_reactor.peer_id
        assert log.debug.__func__.__wrapped__ is _log.__dict__["debug"].__func__
        assert processes.os.os is os
        assert (KA.__init__.__wrapped__, KA.__call__.__wrapped__) == (ka_init, ka_call)


@pytest.mark.parametrize("fixed", [False, True])
def test_one_turn_takes_every_command_waiting_in_the_api_pipe(fixed, monkeypatch):
    """ExaBGP's own Processes.received() over a real pipe full of a reflector's commands
    (each names 199 clients, ~2.5 KB): one call, one turn of its loop, yields 6 of them;
    with fix 5 all the pipe holds."""
    import fcntl
    from types import SimpleNamespace

    from exabgp.reactor.api import processes
    if fixed:
        monkeypatch.setattr(processes, "os", exabgp_reactor.ReadingMore(os))
    log.init(getenv())
    reader, writer = os.pipe()
    fcntl.fcntl(reader, fcntl.F_SETFL, os.O_NONBLOCK)
    size = fcntl.fcntl(writer, 1032)  # F_GETPIPE_SZ
    clients = " , ".join(f"neighbor 10.77.{i // 250}.{i % 250 + 1}" for i in range(199))
    command = f"{clients} announce attributes next-hop 10.77.1.5 nlri 10.1.0.0/26\n".encode()
    fitting = size // len(command)
    try:
        os.write(writer, command * fitting)
        api = processes.Processes()
        api._process = {"bridge": SimpleNamespace(stdout=os.fdopen(reader, "rb", buffering=0),
                                                  poll=lambda: None)}
        taken = [line for _, line in api.received()]
        assert len(taken) == (fitting if fixed else 16384 // len(command))
        assert all(line == command.decode().strip() for line in taken)
    finally:
        os.close(writer)


@pytest.mark.parametrize("description, hold, keepalive", [
    ("pipit:0123abcd", 90, 30),  # none given: ExaBGP's third of the hold time
    ("pipit:0123abcd keepalive 5", 90, 5),
    ("pipit:0123abcd keepalive 5", 9, 5),
    ("pipit:0123abcd keepalive 20", 9, 3),  # the peer offered a shorter hold time
    ("pipit:0123abcd keepalive 5", 0, 0),  # no hold time: no keepalives
    ("", 30, 10),
])
def test_a_session_sends_keepalives_at_its_neighbours_own_interval(description, hold, keepalive):
    """Fix 7 on ExaBGP's own keepalive sender (KA) and its hold time: the description's
    `keepalive N` where the negotiated hold time allows it, else ExaBGP's third."""
    from types import SimpleNamespace

    from exabgp.bgp.message.open.holdtime import HoldTime
    from exabgp.reactor.keepalive import KA
    original = getattr(KA.__init__, "__wrapped__", KA.__init__)
    neighbor = {"description": description}
    proto = SimpleNamespace(neighbor=neighbor, peer=SimpleNamespace(neighbor=neighbor),
                            negotiated=SimpleNamespace(holdtime=HoldTime(hold)))
    sender = object.__new__(KA)
    exabgp_reactor.with_keepalive(original)(sender, lambda: "peer-1", proto)
    assert sender.send_timer.keepalive == keepalive
    plain = object.__new__(KA)
    original(plain, lambda: "peer-1", proto)
    assert plain.send_timer.keepalive == HoldTime(hold).keepalive()  # ExaBGP's, unchanged


def test_a_reload_changing_a_neighbours_keepalive_reaches_its_running_session():
    """ExaBGP's reload gives the peer a new neighbour object when only the description
    changed (the session stays): the session's next turn takes its interval."""
    from types import SimpleNamespace

    from exabgp.bgp.message.open.holdtime import HoldTime
    from exabgp.reactor.keepalive import KA
    original_init = getattr(KA.__init__, "__wrapped__", KA.__init__)
    original_call = getattr(KA.__call__, "__wrapped__", KA.__call__)
    first = {"description": "pipit:0123abcd"}
    proto = SimpleNamespace(neighbor=first, peer=SimpleNamespace(neighbor=first),
                            negotiated=SimpleNamespace(holdtime=HoldTime(30)))
    sender = object.__new__(KA)
    exabgp_reactor.with_keepalive(original_init)(sender, lambda: "peer-1", proto)
    turn = exabgp_reactor.following_reloads(original_call)
    assert turn(sender) is False and sender.send_timer.keepalive == 10  # nothing due yet
    proto.peer.neighbor = {"description": "pipit:4567cdef keepalive 2"}  # reconfigure()
    turn(sender)
    assert sender.send_timer.keepalive == 2
    proto.peer.neighbor = {"description": "pipit:89abcdef"}  # and taken out again
    turn(sender)
    assert sender.send_timer.keepalive == 10


def test_a_peer_s_name_is_made_once_per_neighbour_object_as_exabgp_makes_it():
    from types import SimpleNamespace
    first, second = SimpleNamespace(uid="7"), SimpleNamespace(uid="8")
    peer = SimpleNamespace(neighbor=first)
    assert exabgp_reactor.peer_id(peer) == EXABGP_PEER_ID(peer) == "peer-7"
    first.uid = "changed"  # (ExaBGP never does: a neighbour's uid is set when it is made)
    assert exabgp_reactor.peer_id(peer) == "peer-7"  # kept
    peer.neighbor = second  # a reload gave the peer another neighbour object
    assert exabgp_reactor.peer_id(peer) == EXABGP_PEER_ID(peer) == "peer-8"


@pytest.mark.parametrize("logged", [False, True])
def test_a_debug_line_is_made_only_if_it_is_logged(logged, monkeypatch, original_logger):
    from exabgp.logger.history import _history, history
    from exabgp.logger.option import option
    log.init(getenv())
    _history.clear()
    monkeypatch.setitem(option.logit, "DEBUG", logged)
    monkeypatch.setitem(option.enabled, "reactor", True)
    log.debug = exabgp_reactor.quiet_debug(_log.__dict__["debug"].__func__)
    made = []
    log.debug(lambda: made.append(1) or "a line for the test", "reactor")
    assert made == ([1] if logged else [])
    assert ("a line for the test" in history()) is logged
    log.debug("not lazy", "reactor")  # ExaBGP warns of it, logged or not: still its logger
    assert "non-callable log message detected" in history()
    # and what goes through ExaBGP's logger: only what it would not drop on the spot
    calls = []
    debug = exabgp_reactor.quiet_debug(lambda cls, *args: calls.append(args)).__get__(None, log)
    debug(str, "reactor")
    debug("not lazy", "reactor")
    assert calls == [(str, "reactor", "DEBUG"), ("not lazy", "reactor", "DEBUG")][
        0 if logged else 1:]


def test_pipit_exabgp_runs_exabgp_with_the_fixes(tmp_path):
    config = tmp_path / "exabgp.conf"
    me = IPv4Address("10.0.0.1")
    config.write_text(render(me, me, 64512, [], ["/bin/true"]))
    result = subprocess.run([PIPIT_EXABGP, "validate", str(config)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "with Pipit's reactor fixes" in result.stderr
