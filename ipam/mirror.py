"""A live, local copy of everything under one etcd prefix (an "informer"): list once, follow
the watch, and after any break (etcd restarted, history compacted) list again. Long-running
processes build their view of the cluster from mirrors instead of polling."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from ipam.errors import PipitError
from ipam.store import Entry, Store

log = logging.getLogger(__name__)
T = TypeVar("T")


class Mirror(Generic[T]):
    """`items` maps each key to `decode(entry)`; entries that decode to None (or raise a
    PipitError, logged once) are left out. `changed` is set after every update; the consumer
    clears it before reading `items`."""

    def __init__(self, store: Store, prefix: str, decode: Callable[[Entry], T | None],
                 changed: asyncio.Event | None = None, retry_seconds: float = 1.0):
        self.store = store
        self.prefix = prefix
        self.decode = decode
        self.items: dict[str, T] = {}
        self.revision = 0
        self.generation = 0  # counts the changes applied (a deletion too): "has it changed?"
        self.ready = asyncio.Event()  # set once the first listing is in
        self.changed = changed or asyncio.Event()
        self.retry_seconds = retry_seconds

    def _apply(self, key: str, entry: Entry | None) -> None:
        value = None
        if entry is not None:
            try:
                value = self.decode(entry)
            except PipitError as error:
                log.warning("ignoring %s: %s", key, error)
            except Exception as error:  # malformed beyond what the decoder checks
                log.warning("ignoring %s: cannot decode it (%r)", key, error)
        self.generation += 1
        if value is None:
            self.items.pop(key, None)
        else:
            self.items[key] = value
        if entry is not None:
            self.revision = max(self.revision, entry.mod_revision)

    async def run(self) -> None:
        """Keep the copy current until cancelled."""
        while True:
            try:
                entries, revision = await self.store.list_with_revision(self.prefix)
                self.items = {}
                self.generation += 1
                for entry in entries:
                    self._apply(entry.key, entry)
                self.revision = revision
                self.ready.set()
                self.changed.set()
                async for changes in self.store.watch(self.prefix, revision + 1):
                    for key, entry in changes:
                        self._apply(key, entry)
                    self.changed.set()
            except PipitError as error:
                log.warning("following %s: %s; retrying", self.prefix, error)
            except Exception:  # a bug must not leave the copy frozen for good: say, retry
                log.exception("following %s failed; retrying", self.prefix)
            await asyncio.sleep(self.retry_seconds)
