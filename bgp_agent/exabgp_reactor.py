"""pipit-exabgp: ExaBGP 5.0 with six fixes to its reactor loop, so that it can sleep when
idle and still answer at once, take many connections and commands at once, and not format
log lines it drops, and a seventh change: a keepalive interval per neighbour. The agent runs
it in place of `exabgp` (same arguments); a sidecar should too.

ExaBGP's reactor is one loop: each turn it runs every peer, tries accept() on each listening
socket, polls the API helper's pipe, then waits in poll() on the peers' sockets and the helper's
pipe for at most `exabgp.reactor.speed / 100` seconds. Idle, every turn is pure overhead
(~0.2 ms of Python here, more per peer), so the idle cost is turns per second: speed 0.1 (1 ms)
burned ~8 % of a core with two sessions, the default 1.0 ~2 %. Pipit runs with speed 10
(100 ms, ~0.3 %), a reflector with 25 (its turns run many peers; exabgp_config). Two things
in ExaBGP 5.0.15 make a long period slow where it should not be, and the first two fixes
remove both; the third is about turns that are busy:

1. An API command that is not done within one turn waits a whole period for the next. ExaBGP
   runs a command's work (e.g. `announce attributes ... nlri` yields once per prefix) 50 steps
   per turn, and `ASYNC.run()` returns whether work is left, but the loop ignores that and
   sleeps anyway. With speed 10, 10k batched announcements took ~24 s instead of ~2.5 s. Fixed:
   no wait while commands are half done.
2. A closed socket is never taken out of the poll set. After a session ends (or a connection
   attempt fails) its descriptor stays registered, so every poll() returns POLLNVAL at once;
   the loop takes that for spinning and, past `speed` such turns in a second, calls
   time.sleep(speed / 100) every turn, during which nothing, not even the API, is served.
   With speed 10 and one peer down, the agent's commands waited ~50 ms on average (up to
   100). Fixed: a descriptor poll() reports as invalid is unregistered (the peer registers its
   next socket again when it has one).

3. One connection is accepted per listening socket per turn: `Listener.incoming()` takes one
   from each socket and no more until the reactor's async work has handed it to its peer.
   Every session to a node comes in on the one socket of its address and port, so 200
   clients connecting to a reflector at once were accepted one a turn, each turn running
   every peer already up: bringing the 200 sessions up took ~1-1.6 s in bench.rr, where
   BIRD takes ~0.25 s. Fixed: every connection waiting on a socket is accepted in one turn
   (`Listener.incoming` and `Listener._connected`, which hands them on, replaced), in the
   order they came.

4. Each route of a received UPDATE made a debug line whether debug lines are logged or not:
   the peer's name formatted (`Peer.id`), a message object built, and `log.debug` going
   through two calls to find its level off (~10 % of a reflector's ExaBGP receiving 15,000
   routes). A peer keeps its name while its neighbour object is the same (the name is made
   of that object's uid, set once); `log.debug` of a message it would drop returns at once
   (anything else still goes through ExaBGP's logger, which reads the level each time too).

5. The API helper's pipe is read 16 KiB per turn: ~6 of a reflector's commands (each names
   its ~200 clients), and every turn then runs every peer, each sending what those few
   commands gave it in a write of its own. A reflector's cold start of 200 clients took ~65
   turns and ~13,000 writes where the commands were waiting in the pipe. Read up to
   API_READ_SIZE (all the pipe holds) per turn: ExaBGP splits the lines as before.

6. GTSM (`incoming-ttl`, ttlSecurity) broke every other session on the address: ExaBGP set the
   minimum TTL on the listening socket, which every neighbour on the node's address and port
   shares, so a node peering with a ToR under GTSM dropped the SYNs of the other nodes (TTL
   64) too, and kept the minimum after that neighbour was gone. Fixed: no listening socket
   has a minimum; one a GTSM neighbour uses keeps the SYN of each connection (TCP_SAVE_SYN)
   and answers with TTL 255 (the SYN-ACK goes with the listening socket's); a connection
   from a neighbour with a minimum is refused (closed before its peer sees it) when its SYN
   came with a lower TTL, and otherwise gets the minimum on its own socket. Sessions ExaBGP
   opens itself it already checks on their socket.

7. ExaBGP sends keepalives every third of the negotiated hold time, and has no setting for
   it. A BGPPeer's keepaliveTime (Calico's, BIRD's `keepalive time`) goes into its
   neighbour's description as `keepalive N` (exabgp_config), and a session's keepalive timer
   takes it when it is below the negotiated hold time (else ExaBGP's third: a peer may offer
   a shorter hold time than ours, and keepalives as far apart as that would end the session).
   A reload that changes only the description keeps the session (ExaBGP does not compare
   descriptions) and gives its peer the new neighbour object: the timer follows it.

The first two fixes replace one method, Reactor._wait_for_io, the third two of Listener's,
the fourth Peer.id and log.debug, the fifth the `os` the API's Processes read with, the sixth
Listener._listen and (with the third's) _connected, and the listener's own minimum-TTL call,
the seventh KA.__init__ and KA.__call__ (wrapped);
they are applied only to the release they were written against (5.0.x); with any other,
pipit-exabgp says so on stderr and runs ExaBGP unchanged (correct, only slower to answer as
above). pipit-exabgp also installs bgp_agent.exabgp_fanout's changes (one command to many
neighbours, a reflector's).
"""

from __future__ import annotations

import re
import select
import sys

FIXED_RELEASES = ("5.0.",)  # prefixes of the ExaBGP releases the fixes were written against
API_READ_SIZE = 1 << 20  # what a turn reads of the API helper's pipe, at most (5)
READABLE = select.POLLIN | select.POLLPRI
KEEPALIVE = re.compile(r"\bkeepalive (\d+)\b")  # in a neighbour's description (7)


def wait_for_io(reactor, sleeptime: int):
    """Reactor._wait_for_io with the two fixes: yields the descriptors that are readable."""
    if not reactor.asynchronous.ready():
        sleeptime = 0  # (1) a command is half done: come straight back to it
    spinning = False
    try:
        for fd, event in reactor._poller.poll(sleeptime):
            if event & READABLE:
                yield fd
            elif event & select.POLLNVAL and fd not in reactor.processes.fds:
                # (2) a peer's socket that was closed: forget it (the API helper's pipes are
                # the reactor's own business, it registers and unregisters them itself)
                reactor._poller.unregister(fd)
            elif event & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                spinning = True  # a hang-up or error its owner has not handled yet
        if spinning:
            reactor._prevent_spin()
    except KeyboardInterrupt:
        reactor._termination("^C received", reactor.Exit.normal)
    except Exception:
        reactor._prevent_spin()


def incoming(listener) -> bool:
    """Listener.incoming accepting every connection waiting on each listening socket (3),
    kept in the order they came until _connected hands them on; whether any came."""
    from exabgp.logger import log
    from exabgp.reactor.network.error import error
    if not listener.serving:
        return False
    peer_connected = False
    for sock in listener._sockets:
        while True:
            try:
                io, _ = sock.accept()
            except OSError as exc:
                if exc.errno not in error.block:
                    log.critical(lambda exc=exc: str(exc), "network")
                break
            listener._accepted.setdefault(sock, []).append(io)
            peer_connected = True
    return peer_connected


def connected(listener):
    """Listener._connected for the connections `incoming` keeps (3): each as an Incoming,
    the addresses read as ExaBGP reads them."""
    import socket

    from exabgp.logger import log
    from exabgp.reactor.network.error import AcceptError, NetworkError
    from exabgp.reactor.network.incoming import Incoming
    try:
        for sock, waiting in list(listener._accepted.items()):
            del listener._accepted[sock]
            for io in waiting:
                if sock.family not in (socket.AF_INET, socket.AF_INET6):
                    raise AcceptError(f"unexpected address family ({sock.family})")
                # (sic: ExaBGP names the peer's address local_ip, and its own remote_ip)
                local_ip, remote_ip = io.getpeername()[0], io.getsockname()[0]
                yield Incoming(listener._family_AFI_map[sock.family], remote_ip, local_ip, io)
    except NetworkError as exc:
        log.critical(lambda exc=exc: str(exc), "network")


def connected_checked(listener):
    """connected() refusing a connection whose SYN came with a TTL below the minimum
    (`incoming-ttl`) of the neighbour at its address, and giving the others that minimum on
    their own socket (6)."""
    minimums = None  # address -> minimum TTL, read once per turn that has connections
    for connection in connected(listener):
        if minimums is None:
            minimums = _minimum_ttls(listener._reactor)
        # (ExaBGP's Incoming names the peer's address `local`, as connected() says)
        minimum = minimums.get(connection.local)
        if not minimum:
            yield connection
            continue
        arrived = syn_ttl(connection.io)
        if arrived is not None and arrived < minimum:
            from exabgp.logger import log
            log.warning(lambda c=connection, a=arrived, m=minimum: (
                f"refused the connection from {c.local}: it came with TTL {a}, below the "
                f"{m} GTSM (ttlSecurity) wants: the peer does not run GTSM or is farther away"),
                "network")
            connection.close()
            continue
        from exabgp.reactor.network.tcp import set_minimum_ttl
        set_minimum_ttl(connection.io, connection.afi, connection.local, minimum)
        yield connection


def _minimum_ttls(reactor) -> dict[str, int]:
    """The minimum TTL each configured neighbour's address asks for (the highest, if several
    neighbours share one), for the neighbours that ask for one."""
    found: dict[str, int] = {}
    for key in reactor.peers():
        neighbor = reactor.neighbor(key)
        minimum = neighbor["incoming-ttl"]
        if minimum:
            address = neighbor["peer-address"].top()
            found[address] = max(found.get(address, 0), minimum)
    return found


TCP_SAVE_SYN, TCP_SAVED_SYN = 27, 28  # linux/tcp.h (Python's socket module has neither)


def syn_ttl(io) -> int | None:
    """The TTL (hop limit) of the SYN an accepted socket came from, as its listening socket
    saved it (TCP_SAVE_SYN); None if it did not."""
    import socket
    try:
        syn = io.getsockopt(socket.IPPROTO_TCP, TCP_SAVED_SYN, 512)
    except OSError:
        return None
    if len(syn) >= 20 and syn[0] >> 4 == 4:
        return syn[8]
    if len(syn) >= 40 and syn[0] >> 4 == 6:
        return syn[7]
    return None


def listen_saving_syns(original):
    """Listener._listen where a listening socket that a neighbour with a minimum TTL uses
    keeps each connection's SYN (its TTL is checked once the connection's neighbour is
    known) and answers SYNs with TTL 255: the kernel sends the SYN-ACK with the listening
    socket's TTL, and a GTSM peer drops one below its own minimum (anyone else takes 255 as
    well as 64) (6)."""
    def _listen(listener, local_ip, peer_ip, local_port, use_md5, md5_base64, ttl_in):
        import socket
        original(listener, local_ip, peer_ip, local_port, use_md5, md5_base64, ttl_in)
        if not ttl_in:
            return
        for sock, (address, port, *_) in listener._sockets.items():
            if (address, port) == (local_ip.top(), local_port):
                sock.setsockopt(socket.IPPROTO_TCP, TCP_SAVE_SYN, 1)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 255)
    _listen.__wrapped__ = original
    return _listen


def _no_shared_minimum(io, afi, ip, minimum) -> None:
    """The listener's set_minimum_ttl: a listening socket is every neighbour's (6)."""


def peer_id(peer) -> str:
    """Peer.id, made once per neighbour object (4)."""
    kept = peer.__dict__.get("_pipit_id")
    if kept is None or kept[0] is not peer.neighbor:
        kept = peer._pipit_id = peer.neighbor, f"peer-{peer.neighbor.uid}"
    return kept[1]


def quiet_debug(original):
    """log.debug returning at once for a message it would drop (4): a lazy (callable) one,
    at a level not logged. `original`: ExaBGP's, as a function of the class."""
    from exabgp.logger.option import option

    def debug(cls, message, source="", level="DEBUG"):
        if callable(message) and not option.logit.get(level, False):
            return
        original(cls, message, source, level)
    debug.__wrapped__ = original
    return classmethod(debug)


def keepalive_of(description: str | None) -> int:
    """The keepalive interval a neighbour's description gives (`keepalive N`), 0 if none (7)."""
    match = KEEPALIVE.search(description or "")
    return int(match[1]) if match else 0


def keepalive_interval(description: str | None, holdtime) -> int:
    """A session's keepalive interval (7): the description's when the negotiated hold time
    (ExaBGP's HoldTime) is not 0 and longer than it, else ExaBGP's third of the hold time."""
    wanted, hold = keepalive_of(description), int(holdtime)
    return wanted if wanted and hold and wanted < hold else holdtime.keepalive()


def with_keepalive(original):
    """KA.__init__ with the neighbour's own keepalive interval (7). `original`: ExaBGP's."""
    def __init__(self, session, proto):
        original(self, session, proto)
        self._pipit_proto, self._pipit_neighbor = proto, proto.neighbor
        self.send_timer.keepalive = keepalive_interval(proto.neighbor["description"],
                                                       proto.negotiated.holdtime)
    __init__.__wrapped__ = original
    return __init__


def following_reloads(original):
    """KA.__call__ (each turn of the session's loop) taking the interval of the neighbour
    object a reload gave the peer (7). `original`: ExaBGP's."""
    def __call__(self):
        neighbor = self._pipit_proto.peer.neighbor
        if neighbor is not self._pipit_neighbor:
            self._pipit_neighbor = neighbor
            self.send_timer.keepalive = keepalive_interval(
                neighbor["description"], self._pipit_proto.negotiated.holdtime)
        return original(self)
    __call__.__wrapped__ = original
    return __call__


class ReadingMore:
    """The `os` module as ExaBGP's API Processes use it, with read() taking up to
    API_READ_SIZE however little it is asked for (5); the rest is os's."""

    def __init__(self, os_module):
        self.os = os_module

    def __getattr__(self, name: str):
        return getattr(self.os, name)

    def read(self, fd: int, size: int) -> bytes:
        return self.os.read(fd, max(size, API_READ_SIZE))


def apply() -> str | None:
    """Install the fixes into ExaBGP's Reactor, Listener, Peer, logger and API Processes.
    None if done, else why not."""
    from exabgp.logger import _log, log
    from exabgp.reactor.api import processes
    from exabgp.reactor import listener as listener_module
    from exabgp.reactor.keepalive import KA
    from exabgp.reactor.listener import Listener
    from exabgp.reactor.loop import Reactor
    from exabgp.reactor.peer import Peer
    from exabgp.version import release
    if (not release.startswith(FIXED_RELEASES) or not hasattr(Reactor, "_wait_for_io")
            or not hasattr(Listener, "_connected") or not hasattr(Listener, "_listen")
            or not hasattr(listener_module, "set_minimum_ttl")):
        return f"ExaBGP {release} is not a release these fixes were written for"
    Reactor._wait_for_io = wait_for_io
    Listener.incoming, Listener._connected = incoming, connected_checked
    Listener._listen = listen_saving_syns(getattr(Listener._listen, "__wrapped__",
                                                  Listener._listen))
    listener_module.set_minimum_ttl = _no_shared_minimum
    Peer.id = peer_id
    processes.os = ReadingMore(getattr(processes.os, "os", processes.os))
    log.debug = quiet_debug(_log.__dict__["debug"].__func__)  # (log's base keeps ExaBGP's)
    KA.__init__ = with_keepalive(getattr(KA.__init__, "__wrapped__", KA.__init__))
    KA.__call__ = following_reloads(getattr(KA.__call__, "__wrapped__", KA.__call__))
    return None


def main() -> None:
    from bgp_agent import exabgp_fanout, long_lived
    from exabgp.version import release
    problem = apply()
    if problem:
        print(f"pipit-exabgp: running ExaBGP without Pipit's reactor fixes: {problem}; it will "
              "answer slowly after a session ends and on long commands", file=sys.stderr)
    else:
        print(f"pipit-exabgp: ExaBGP {release} with Pipit's reactor fixes", file=sys.stderr)
    problem = exabgp_fanout.apply()
    if problem:
        print(f"pipit-exabgp: running ExaBGP without Pipit's fan-out changes: {problem}; "
              "commands to many neighbours (a reflector's) will be slow", file=sys.stderr)
    sys.stderr.flush()
    from exabgp.application.main import main as exabgp_main
    long_lived.freeze()  # ExaBGP's modules and classes, out of the collector's walks
    sys.exit(exabgp_main())


if __name__ == "__main__":
    main()
