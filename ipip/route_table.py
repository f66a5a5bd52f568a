"""Pipit's route table: one object that knows which of Pipit's routes the kernel holds and
makes them what the agent wants (Felix's RouteTable is the idea).

`sync(desired)` is the one call: the first one, and one every RESYNC_SECONDS after (or when
asked), dumps Pipit's routes from the kernel (a restart adopts what is there; a route someone
removed comes back); the others diff against what this table applied, so a routing pass costs
only its changes. A route the kernel refuses is reported and not recorded as applied, so the
next sync tries it again; the routes around it are still applied.

A prefix is replaced only where the kernel holds a Pipit route; any other prefix is created
exclusively, so a route another daemon holds there is reported (EEXIST), never overwritten.
`python -m bench.routes` measures this call against `ip -batch`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Protocol

from ipip.routes import MAIN_TABLE, FibMatch, Route, RouteError, diff

RESYNC_SECONDS = 60.0


class Kernel(Protocol):
    """What the table needs of the kernel (ipip.kernel_routes.KernelRoutes)."""

    def dump(self, table: int = MAIN_TABLE, reuse: Iterable[IPv4Network] = ()
             ) -> dict[IPv4Network, Route]: ...

    def apply(self, replace: Iterable[Route] = (), delete: Iterable[Route] = (), *,
              add: Iterable[Route] = ()) -> list[RouteError]: ...

    def lookup(self, address: IPv4Address) -> FibMatch | None: ...


@dataclass(frozen=True)
class SyncStats:
    desired: int
    resynced: bool  # the kernel's table was dumped for this sync
    added: int
    replaced: int
    deleted: int
    errors: list[RouteError] = field(default_factory=list)

    @property
    def changes(self) -> int:
        return self.added + self.replaced + self.deleted


class RouteTable:
    """Not thread-safe: one owner, which may run `sync` in a worker thread."""

    def __init__(self, kernel: Kernel, table: int = MAIN_TABLE,
                 resync_seconds: float = RESYNC_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.kernel = kernel
        self.table = table
        self.resync_seconds = resync_seconds
        self.clock = clock
        self._applied: dict[IPv4Network, Route] | None = None  # None: not read yet
        self.resync_at = 0.0  # when the next sync dumps the kernel again

    @property
    def applied(self) -> Mapping[IPv4Network, Route]:
        """Pipit's routes as the kernel holds them, as far as this table knows."""
        return self._applied or {}

    def sync(self, desired: Mapping[IPv4Network, Route], *, keep_unlisted: bool = False,
             resync: bool = False) -> SyncStats:
        """Make Pipit's routes in the kernel `desired`. With `keep_unlisted`, only blackholes
        that are not desired go: learned routes the caller cannot vouch for yet (just started,
        its BGP speaker not connected) stay as they are."""
        for route in desired.values():
            if route.table != self.table:
                raise ValueError(f"route {route} is for table {route.table}, this route table "
                                 f"is table {self.table}")
        now = self.clock()
        resynced = resync or self._applied is None or now >= self.resync_at
        if resynced:
            self._applied = self.kernel.dump(self.table, reuse=desired.keys())
            self.resync_at = now + self.resync_seconds
        applied = self._applied
        to_replace, to_delete = diff(desired, applied)
        if keep_unlisted:
            to_delete = [route for route in to_delete if route.blackhole]
        new = [route for route in to_replace if route.dst not in applied]
        changed = [route for route in to_replace if route.dst in applied]
        errors = (self.kernel.apply(replace=changed, delete=to_delete, add=new)
                  if to_replace or to_delete else [])
        self._record(to_replace, to_delete, errors)
        failed = {error.route.dst for error in errors}
        return SyncStats(desired=len(desired), resynced=resynced,
                         added=sum(1 for r in new if r.dst not in failed),
                         replaced=sum(1 for r in changed if r.dst not in failed),
                         deleted=sum(1 for r in to_delete if r.dst not in failed),
                         errors=errors)

    def _record(self, replaced: Sequence[Route], deleted: Sequence[Route],
                errors: Sequence[RouteError]) -> None:
        """What the kernel now holds: a refused route stays as it was (a failed install is
        still missing, a failed delete still there), so the next sync tries it again."""
        failed = {error.route.dst for error in errors}
        for route in deleted:
            if route.dst not in failed:
                self._applied.pop(route.dst, None)
        for route in replaced:
            if route.dst not in failed:
                self._applied[route.dst] = route
