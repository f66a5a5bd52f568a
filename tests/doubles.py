"""In-memory doubles of the routing loop's interfaces, for its fast unit tier: a store (the part
of ipam.store.Store that mirrors use), a BGP speaker (bgp_agent.model.Speaker) that the test
drives as a peer would, a kernel (what ipip.route_table.RouteTable needs of KernelRoutes), and
a clock. The real parts have their own tests; these only stand beside them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

from bgp_agent.model import Announcement, Neighbor, Path, PeerState
from ipam.store import Entry
from ipip.routes import MAIN_TABLE, FibMatch, Route, RouteError


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class MemoryStore:
    """Keys and JSON values with etcd's revisions; watches get every change under their
    prefix. `settled()` returns once every watcher has taken what was sent to it."""

    def __init__(self):
        self.entries: dict[str, Entry] = {}
        self.revision = 1
        self._watchers: list[tuple[str, asyncio.Queue]] = []

    def put(self, key: str, value: dict) -> None:
        self.revision += 1
        self.entries[key] = Entry(key, value, self.revision)
        self._notify(key, self.entries[key])

    def delete(self, key: str) -> None:
        if self.entries.pop(key, None) is not None:
            self.revision += 1
            self._notify(key, None)

    def _notify(self, key: str, entry: Entry | None) -> None:
        for prefix, queue in self._watchers:
            if key.startswith(prefix):
                queue.put_nowait((key, entry))

    async def list_with_revision(self, prefix: str) -> tuple[list[Entry], int]:
        return [e for k, e in sorted(self.entries.items()) if k.startswith(prefix)], self.revision

    async def watch(self, prefix: str, start_revision: int):
        queue: asyncio.Queue = asyncio.Queue()
        watcher = (prefix, queue)
        self._watchers.append(watcher)
        try:
            while True:
                change = await queue.get()
                yield [change]
                queue.task_done()  # the consumer came back for more: it applied that one
        finally:
            self._watchers.remove(watcher)

    async def settled(self) -> None:
        for _, queue in list(self._watchers):
            await queue.join()


class MemorySpeaker:
    """A speaker whose peers the test plays: sessions come up and down, routes arrive."""

    def __init__(self):
        self.connected = True
        self.peers: dict[IPv4Address, PeerState] = {}
        self.received: dict[IPv4Address, dict[IPv4Network, Path]] = {}
        self.announced: dict[IPv4Address, dict[IPv4Network, Announcement]] = {}
        self.neighbors: list[Neighbor] = []
        self.end_of_rib_sent: list[IPv4Address] = []
        self.announcements_sent: list[tuple[IPv4Address, IPv4Network]] = []  # announce_to's
        # every route asked for, as (announce|withdraw, neighbour, prefix), in the order asked
        self.requests: list[tuple[str, IPv4Address, IPv4Network]] = []
        self._time = 0.0

    # what the routing loop calls
    @property
    def own(self) -> dict[IPv4Address, set[IPv4Network]]:
        return {n: {p for p, a in table.items() if a.next_hop is None}
                for n, table in self.announced.items()}

    async def set_neighbors(self, neighbors: Sequence[Neighbor]) -> None:
        self.neighbors = list(neighbors)
        wanted = {n.address for n in neighbors}
        for table in (self.peers, self.received, self.announced):
            for address in set(table) - wanted:
                del table[address]

    async def announce(self, neighbor: IPv4Address, routes: Sequence[Announcement]) -> None:
        self.requests += [("announce", neighbor, r.prefix) for r in routes]
        self._put(neighbor, routes)

    async def withdraw(self, neighbor: IPv4Address, prefixes: Sequence[IPv4Network]) -> None:
        self.requests += [("withdraw", neighbor, p) for p in prefixes]
        self._drop(neighbor, prefixes)

    def _put(self, neighbor: IPv4Address, routes: Sequence[Announcement]) -> None:
        self.announced.setdefault(neighbor, {}).update({r.prefix: r for r in routes})

    def _drop(self, neighbor: IPv4Address, prefixes: Sequence[IPv4Network]) -> None:
        for prefix in prefixes:
            self.announced.get(neighbor, {}).pop(prefix, None)

    def announce_to(self, neighbors: Sequence[IPv4Address],
                    routes: Sequence[Announcement]) -> Awaitable[None]:
        self.requests += [("announce", n, r.prefix) for n in neighbors for r in routes]
        return self._asked(self._announce_to, neighbors, routes)

    def withdraw_from(self, neighbors: Sequence[IPv4Address],
                      prefixes: Sequence[IPv4Network]) -> Awaitable[None]:
        self.requests += [("withdraw", n, p) for n in neighbors for p in prefixes]
        return self._asked(self._withdraw_from, neighbors, prefixes)

    def _announce_to(self, neighbors, routes) -> None:
        for neighbor in neighbors:
            self.announcements_sent += [(neighbor, r.prefix) for r in routes]
            self._put(neighbor, routes)

    def _withdraw_from(self, neighbors, prefixes) -> None:
        for neighbor in neighbors:
            self._drop(neighbor, prefixes)

    def _asked(self, do, *arguments) -> asyncio.Future:
        """Done at once (as asked: in order); a future of it. (HeldSpeaker holds them.)"""
        do(*arguments)
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def send_end_of_rib(self, neighbor: IPv4Address) -> None:
        self.end_of_rib_sent.append(neighbor)

    # what the test does as the peers
    def up(self, address: IPv4Address, graceful_restart: bool = True,
           restart_time: int = 120) -> None:
        self._time += 1
        self.peers[address] = PeerState(address, "up", self._time,
                                        graceful_restart=graceful_restart,
                                        restart_time=restart_time)
        self.received[address] = {}

    def down(self, address: IPv4Address, reason: str = "closing connection",
             notification: bool = False) -> None:
        self._time += 1
        self.peers[address] = replace(self.peers[address], state="down", since=self._time,
                                      reason=reason, notification=notification)
        self.received.pop(address, None)

    def send(self, address: IPv4Address, *paths: Path) -> None:
        self.received[address].update({p.prefix: p for p in paths})

    def end_of_rib(self, address: IPv4Address) -> None:
        self.peers[address] = replace(self.peers[address], end_of_rib=True)


class HeldSpeaker(MemorySpeaker):
    """A MemorySpeaker whose fan-out requests (announce_to, withdraw_from; End-of-RIB if
    asked) wait for the test, as ExaBGP's answers come later: asked in order (`requests`),
    done in that order by release() or failed by fail()."""

    def __init__(self, hold_end_of_rib: bool = False):
        super().__init__()
        self.held: list[tuple[object, tuple, asyncio.Future]] = []
        self.hold_end_of_rib = hold_end_of_rib  # End-of-RIB waits for the test too

    async def send_end_of_rib(self, neighbor: IPv4Address) -> None:
        if not self.hold_end_of_rib:
            return await super().send_end_of_rib(neighbor)
        await self._asked(self.end_of_rib_sent.append, neighbor)

    def _asked(self, do, *arguments) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.held.append((do, arguments, future))
        return future

    def release(self) -> None:
        held, self.held = self.held, []
        for do, arguments, future in held:
            do(*arguments)
            future.set_result(None)

    def fail(self) -> None:
        from bgp_agent.model import SpeakerError
        held, self.held = self.held, []
        for _, _, future in held:
            future.set_exception(SpeakerError("the session went down meanwhile"))


class MemoryKernel:
    """Pipit's routes of one table; `refuse` holds prefixes the kernel will not install."""

    def __init__(self, routes: Iterable[Route] = ()):
        self.routes: dict[IPv4Network, Route] = {r.dst: r for r in routes}
        self.refuse: set[IPv4Network] = set()
        self.dumps = 0
        self.underlay: dict[IPv4Address, FibMatch] = {}  # lookup(): the kernel's other routes
        self.lookups: list[IPv4Address] = []

    def dump(self, table: int = MAIN_TABLE, reuse=()) -> dict[IPv4Network, Route]:
        self.dumps += 1
        return dict(self.routes)

    def lookup(self, address: IPv4Address) -> FibMatch | None:
        self.lookups.append(address)
        return self.underlay.get(address)

    def apply(self, replace: Iterable[Route] = (), delete: Iterable[Route] = (), *,
              add: Iterable[Route] = ()) -> list[RouteError]:
        errors = []
        for route in delete:
            self.routes.pop(route.dst, None)
        for op, routes in (("replace", replace), ("add", add)):
            for route in routes:
                if route.dst in self.refuse:
                    errors.append(RouteError(route, op, 101, "refused by the test"))
                else:
                    self.routes[route.dst] = route
        return errors
