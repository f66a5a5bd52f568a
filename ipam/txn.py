"""A change set: the entries a decision was based on and the writes it led to, committed as one
etcd transaction that succeeds only if none of those entries moved in the meantime."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from ipam.errors import Conflict, DatastoreUnavailable
from ipam.metrics import ETCD_GAVE_UP
from ipam.store import Entry, Store, TxnResult

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_ATTEMPTS = 50
# etcd refuses transactions with more than 128 compares or operations (--max-txn-ops).
TXN_KEY_BUDGET = 110


class Changes:
    def __init__(self, store: Store):
        self.store = store
        self.expect: dict[str, int] = {}
        self.unchanged_since: dict[str, int] = {}  # prefix -> revision it was read at
        self.puts: dict[str, dict] = {}
        self.deletes: set[str] = set()

    def saw(self, key: str, revision: int) -> None:
        """Record that the decision depends on `key` being at `revision` (0: absent)."""
        self.expect.setdefault(key, revision)

    def saw_prefix(self, prefix: str, revision: int) -> None:
        """Record that the decision depends on no key under `prefix` having been written
        after `revision` (the one it was listed at)."""
        self.unchanged_since.setdefault(prefix, revision)

    async def get(self, key: str) -> Entry | None:
        entry = await self.store.get(key)
        self.saw(key, entry.mod_revision if entry else 0)
        return entry

    async def get_many(self, keys) -> dict[str, Entry | None]:
        entries = await self.store.get_many(keys)
        for key, entry in entries.items():
            self.saw(key, entry.mod_revision if entry else 0)
        return entries

    def put(self, key: str, value: dict) -> None:
        self.deletes.discard(key)
        self.puts[key] = value

    def delete(self, key: str) -> None:
        self.puts.pop(key, None)
        self.deletes.add(key)

    @property
    def empty(self) -> bool:
        return not self.puts and not self.deletes

    async def commit(self) -> TxnResult:
        for key in self.puts:
            self.expect.setdefault(key, 0)  # a put of a key not read means "create it"
        return await self.store.txn(self.expect, self.puts, self.deletes,
                                    unchanged_since=self.unchanged_since)


async def transact(store: Store, decide: Callable[[Changes], Awaitable[T]], what: str) -> T:
    """Run `decide` on fresh reads and commit its changes; start over while others interfere."""
    for _ in range(MAX_ATTEMPTS):
        changes = Changes(store)
        outcome = await decide(changes)
        if changes.empty or (await changes.commit()).succeeded:
            return outcome
    ETCD_GAVE_UP.inc()
    raise Conflict(f"{what} kept colliding with concurrent changes after {MAX_ATTEMPTS} attempts; "
                   "try again.")


async def outcome(store: Store, fence: str, written: Mapping[str, dict | None]) -> bool:
    """Whether a transaction whose answer was lost (etcd paused, restarted or cut off after
    the request went out) was committed. The transaction compared the `fence` key: writing
    that key first means it can no longer commit later; then the keys it wrote are read back
    and compared with what it wrote (`written`: key -> value, None for a deletion). Waits
    for etcd as long as it takes; cancel the caller to stop."""
    pause = 0.1
    while True:
        try:
            await store.put(fence, {})
            found = await store.get_many(written)
            break
        except DatastoreUnavailable as error:
            log.warning("cannot yet learn whether a transaction was committed: %s", error)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)
    return all((found[key].value if found[key] else None) == value
               for key, value in written.items())
