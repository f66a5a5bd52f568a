"""Writing a set of resource changes to etcd as one change, whatever its size.

etcd takes at most 128 operations per transaction (`--max-txn-ops`) and 1.5 MiB per request.
A change is guarded only by what it was decided on:

- each written key by the mod_revision it had when read (0: it did not exist);
- the keys a write depends on (a BGPPeer on the node it names), by theirs;
- a whole kind, when the decision read all of it (an IPPool must not overlap any other), by
  ONE range comparison: no key under the prefix was modified after the listing.

A change that fits is one transaction. A larger one is written in parts, in order; each part
re-checks the ranges against the revision of the part before, so nothing else may touch them
in between. If a part fails, the parts already written are undone (each key back to what it
held, guarded by the revision our write gave it) and the caller decides again: all of it lands
or, in the end, none of it. If etcd stops answering in the middle, the written parts are
undone once it answers again (a few tries, a second apart); a change whose last transaction
was written but whose answer was lost has landed. Only an etcd that stays away leaves part
of a change written, and the error says so.

This talks to etcd below `Store.txn` (which compares single keys only), through
`Store.transaction` (etcd's own comparisons and operations, the store's connection and errors).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from aetcd import rpc

from ipam.errors import Conflict, DatastoreUnavailable
from ipam.store import Store, encode
from ipam.txn import TXN_KEY_BUDGET

log = logging.getLogger(__name__)
MAX_REQUEST_BYTES = 1024 * 1024  # below etcd's default --max-request-bytes (1.5 MiB)
# etcd gone in the middle of a change: its written parts are undone, tried again while etcd
# comes back (each try waits for etcd as long as any call does)
UNDO_ATTEMPTS, UNDO_PAUSE = 3, 1.0


@dataclass(frozen=True)
class Write:
    key: str
    revision: int  # the key's mod_revision the change was decided on (0: absent)
    value: dict | None  # None deletes the key
    old: dict | None = None  # what the key held, to restore if a later part fails
    depends: tuple[tuple[str, int], ...] = ()  # other keys the write rests on, at revisions

    @property
    def compares(self) -> int:
        return 1 + len(self.depends)


def _range_end(prefix: bytes) -> bytes:
    from aetcd.utils import prefix_range_end
    return prefix_range_end(prefix)


def _key_unchanged(key: str, revision: int):
    return rpc.Compare(key=key.encode(), target=rpc.Compare.MOD, result=rpc.Compare.EQUAL,
                       mod_revision=revision)


def _range_unchanged(prefix: str, revision: int):
    """No key under prefix was created or modified after `revision` (deletions pass)."""
    raw = prefix.encode()
    return rpc.Compare(key=raw, range_end=_range_end(raw), target=rpc.Compare.MOD,
                       result=rpc.Compare.LESS, mod_revision=revision + 1)


def _operation(key: str, value: dict | None):
    if value is None:
        return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key.encode()))
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key.encode(), value=encode(value)))


async def _txn(store: Store, compares: list, operations: list) -> tuple[bool, int]:
    return await store.transaction(compares, operations)


def split(writes: Sequence[Write], fixed_compares: int,
          budget: int = TXN_KEY_BUDGET) -> list[list[Write]]:
    """Consecutive parts that each fit one transaction beside `fixed_compares` range checks:
    at most `budget` comparisons and operations, and MAX_REQUEST_BYTES of values."""
    parts: list[list[Write]] = [[]]
    compares = size = 0
    for write in writes:
        cost = len(encode(write.value)) if write.value is not None else 0
        if parts[-1] and (fixed_compares + compares + write.compares > budget
                          or len(parts[-1]) + 1 > budget or size + cost > MAX_REQUEST_BYTES):
            parts.append([])
            compares = size = 0
        parts[-1].append(write)
        compares += write.compares
        size += cost
    return [p for p in parts if p]


async def commit(store: Store, writes: Sequence[Write], ranges: Mapping[str, int]) -> bool:
    """Write everything if nothing it was decided on has changed: True. False if something
    has (then nothing stays written; decide again on fresh reads)."""
    if not writes:
        return True
    ranges = dict(ranges)
    done: list[tuple[list[Write], int]] = []
    parts = split(writes, len(ranges))
    for part in parts:
        compares = [_range_unchanged(prefix, revision) for prefix, revision in ranges.items()]
        for write in part:
            compares.append(_key_unchanged(write.key, write.revision))
            compares += [_key_unchanged(k, r) for k, r in write.depends]
        try:
            succeeded, revision = await _txn(store, compares,
                                             [_operation(w.key, w.value) for w in part])
        except DatastoreUnavailable as error:
            if not done and not error.maybe_written:
                raise  # nothing was written
            return await _after_outage(store, done, part, part is parts[-1], len(parts), error)
        if not succeeded:
            await _put_back(store, _restores(done))
            return False
        done.append((part, revision))
        ranges = dict.fromkeys(ranges, revision)  # nothing else may touch them from here on
    return True


async def _landed(store: Store, part: list[Write]) -> int | None:
    """The revision at which `part` was written, if it was (its answer lost): every key holds
    what the part wrote (a put key its value, at the one revision of the transaction; a
    deleted key nothing). None if it was not."""
    current = await store.get_many(w.key for w in part)
    revisions = set()
    for write in part:
        entry = current[write.key]
        if write.value is None:
            if entry is not None:
                return None
        elif entry is None or entry.value != write.value:
            return None
        else:
            revisions.add(entry.mod_revision)
    if len(revisions) > 1:
        return None
    return revisions.pop() if revisions else 0  # deletes only: guarded by absence anyway


async def _after_outage(store: Store, done: list[tuple[list[Write], int]], part: list[Write],
                        last: bool, count: int, error: DatastoreUnavailable) -> bool:
    """etcd stopped answering during a change: True if it landed whole after all (its last
    part was written, only the answer was lost). Otherwise what was written of it is put back
    (the part it failed on too, if that was written), tried again while etcd comes back, up
    to UNDO_ATTEMPTS, going on from where the last try stopped; the error raised says whether
    anything of the change stays."""
    reason = str(error).rstrip(".")
    chunks: list[list[Write]] | None = None  # what is left to put back, once known
    lost: list[str] = []  # keys someone else changed meanwhile, over every try
    for attempt in range(UNDO_ATTEMPTS):
        try:
            if chunks is None:
                written = list(done)
                if error.maybe_written:
                    revision = await _landed(store, part)
                    if revision is not None:
                        if last:
                            return True
                        written.append((part, revision))
                if not written:
                    raise error  # the one part in doubt was not written: nothing was
                chunks = _restores(written)
            await _put_back(store, chunks, lost)
        except DatastoreUnavailable as again:
            if again is error:
                raise
            if attempt + 1 < UNDO_ATTEMPTS:
                await asyncio.sleep(UNDO_PAUSE)
            continue
        raise DatastoreUnavailable(f"{reason}; what was written of the change was undone, so "
                                   "nothing of it stays.")
    if not done:
        raise DatastoreUnavailable(f"{reason}; whether the change was written is not known "
                                   "(etcd's answer was lost): check with `pipitctl get` once "
                                   "etcd answers.")
    raise DatastoreUnavailable(
        f"{reason}; the change is partly written ({len(done)} of its {count} etcd "
        f"transactions{', perhaps one more' if error.maybe_written else ''}) and could not be "
        "undone: check with `pipitctl get` once etcd answers, then apply it again.")


async def _restore(store: Store, writes: list[Write]) -> bool:
    succeeded, _ = await _txn(store, [_key_unchanged(w.key, w.revision) for w in writes],
                              [_operation(w.key, w.value) for w in writes])
    return succeeded


def _restores(done: list[tuple[list[Write], int]]) -> list[list[Write]]:
    """What puts back the written parts (newest first), in transactions: each key to what it
    held, only if it still holds our write (a key we put is at its part's revision, one we
    deleted is absent: etcd compares an absent key's mod_revision as 0)."""
    return [chunk for part, revision in reversed(done)
            for chunk in split([Write(w.key, revision if w.value is not None else 0, w.old)
                                for w in part], 0)]


async def _put_back(store: Store, chunks: list[list[Write]], lost: list[str] | None = None
                    ) -> None:
    """Apply `_restores` chunks, taking each off the list once applied (and each key of a
    chunk put back one by one), so that a call cut short by etcd going away goes on from
    there when made again, with the same `lost` (the keys found changed by someone else, which
    keep their value: a Conflict names them once everything else is back)."""
    lost = [] if lost is None else lost
    while chunks:
        chunk = chunks[0]
        if not await _restore(store, chunk):
            while chunk:  # one of them changed since: put back the others one by one
                if not await _restore(store, chunk[:1]):  # someone changed it: theirs stands
                    lost.append(chunk[0].key)
                del chunk[0]
        chunks.pop(0)
    if lost:
        raise Conflict(f"the resources changed while being applied and {len(lost)} of the "
                       f"keys written could not be put back (first {lost[0]}); check them and "
                       "apply again.")
    log.info("put back what a change that could not be completed had written")
