"""The fake's storage and its watch hub, like etcd behind the apiserver: every write takes the
next resourceVersion of one counter shared by all objects and is kept in a history that
watches read from, until it is compacted (then watching from before the compaction point is
410 Expired). Deleting a namespace deletes what it holds; an object with finalizers is only
marked for deletion until they are gone. Pods are deleted at once (no kubelet here)."""

from __future__ import annotations

import base64
import bisect
import copy
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from tests.fakekube import objects
from tests.fakekube.errors import already_exists, bad_request, conflict, expired, not_found
from tests.fakekube.resources import NAMESPACES, RESOURCES, Resource

ADDED, MODIFIED, DELETED = "ADDED", "MODIFIED", "DELETED"
Match = Callable[[dict], bool]
INITIAL_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


@dataclass(frozen=True)
class Change:
    rv: int
    resource: str          # Resource.key
    type: str              # ADDED | MODIFIED | DELETED
    object: dict           # as stored after the change; for DELETED its last state at `rv`
    previous: dict | None  # as it was before (None for ADDED)


def _key(resource: Resource, namespace: str | None, name: str) -> tuple[str, str, str]:
    return resource.key, (namespace or "") if resource.namespaced else "", name


def _rv(obj: dict) -> str:
    return obj["metadata"]["resourceVersion"]


def _as_list_item(obj: dict) -> dict:
    """List items come without kind and apiVersion, as from the real server."""
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


class Store:
    """Thread-safe; objects handed out are shared and must not be changed by the caller."""

    def __init__(self, max_history: int = 10000, max_continues: int = 64):
        self._cond = threading.Condition()
        self._rv = 0
        self._objects: dict[tuple[str, str, str], dict] = {}
        self._history: list[Change] = []
        self._compacted = 0        # a watch may start from this resourceVersion or later
        self._wakes = 0
        self._max_history = max_history
        self._continues: OrderedDict[str, tuple[int, list[dict]]] = OrderedDict()
        self._max_continues = max_continues
        for name in INITIAL_NAMESPACES:
            self.create(NAMESPACES, None, {"metadata": {"name": name}})

    # -----------------------------------------------------------------------------------------
    # reads

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    @property
    def compacted(self) -> int:
        with self._cond:
            return self._compacted

    def get(self, resource: Resource, namespace: str | None, name: str) -> dict:
        with self._cond:
            obj = self._objects.get(_key(resource, namespace, name))
            if obj is None:
                raise not_found(resource.plural, name, resource.group)
            return obj

    def _select(self, resource: Resource, namespace: str | None, match: Match) -> list[dict]:
        found = [obj for (res, ns, _), obj in self._objects.items()
                 if res == resource.key and (not namespace or ns == namespace) and match(obj)]
        return sorted(found, key=lambda o: (o["metadata"].get("namespace", ""),
                                            o["metadata"]["name"]))

    def list(self, resource: Resource, namespace: str | None, match: Match,
             limit: int = 0, token: str | None = None) -> tuple[list[dict], str, str, int]:
        """(items, resourceVersion, continue token or '', remaining item count): a page of at
        most `limit` items (0: all), each page of one list from the same snapshot."""
        with self._cond:
            if token:
                rv, items = self._take_continue(token)
            else:
                rv, items = self._rv, self._select(resource, namespace, match)
            page, rest = (items[:limit], items[limit:]) if limit > 0 else (items, [])
            following = self._keep_continue(rv, rest) if rest else ""
            return [_as_list_item(o) for o in page], str(rv), following, len(rest)

    def _keep_continue(self, rv: int, rest: list[dict]) -> str:
        token = base64.urlsafe_b64encode(json.dumps(
            {"rv": rv, "id": f"{rv}-{id(rest)}-{len(self._continues)}"}).encode()).decode()
        self._continues[token] = (rv, rest)
        while len(self._continues) > self._max_continues:
            self._continues.popitem(last=False)
        return token

    def _take_continue(self, token: str) -> tuple[int, list[dict]]:
        kept = self._continues.pop(token, None)
        if kept is None:
            try:
                json.loads(base64.urlsafe_b64decode(token.encode()))
            except ValueError:
                raise bad_request(f"invalid continue token: {token!r}") from None
        if kept is None or kept[0] < self._compacted:
            raise expired("The provided continue parameter is too old to display a consistent "
                          "list result. You can start a new list without the continue "
                          "parameter.")
        return kept

    # -----------------------------------------------------------------------------------------
    # writes

    def _commit(self, resource: Resource, kind: str, obj: dict, previous: dict | None) -> dict:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        key = _key(resource, obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if kind == DELETED:
            self._objects.pop(key, None)
        else:
            self._objects[key] = obj
        self._history.append(Change(self._rv, resource.key, kind, obj, previous))
        if len(self._history) > self._max_history:
            dropped = len(self._history) - self._max_history // 2
            self._compacted = self._history[dropped - 1].rv
            del self._history[:dropped]
        self._cond.notify_all()
        return obj

    def create(self, resource: Resource, namespace: str | None, body: object,
               dry_run: bool = False) -> dict:
        obj = objects.prepare_create(resource, objects.check_identity(resource, namespace, body))
        with self._cond:
            name = obj["metadata"]["name"]
            if resource.namespaced and (NAMESPACES.key, "", namespace) not in self._objects:
                raise not_found(NAMESPACES.plural, namespace or "")
            if _key(resource, namespace, name) in self._objects:
                raise already_exists(resource.plural, name, resource.group)
            if dry_run:
                obj["metadata"]["resourceVersion"] = ""
                return obj
            return self._commit(resource, ADDED, obj, None)

    def update(self, resource: Resource, namespace: str | None, name: str, body: object,
               subresource: str | None = None, dry_run: bool = False) -> dict:
        new = objects.check_identity(resource, namespace, body, name)
        with self._cond:
            old = self.get(resource, namespace, name)
            wanted = new["metadata"].get("resourceVersion")
            if wanted and wanted != _rv(old):
                raise conflict(resource.plural, name, resource.group)
            return self._replace(resource, old, new, subresource, dry_run)

    def patch(self, resource: Resource, namespace: str | None, name: str,
              transform: Callable[[dict], dict], subresource: str | None = None,
              dry_run: bool = False) -> dict:
        """`transform` turns (a copy of) the stored object into the new one; a
        resourceVersion the patch sets is a precondition, as on the real server."""
        with self._cond:
            old = self.get(resource, namespace, name)
            new = transform(copy.deepcopy(old))
            objects.check_immutable(resource, old, new)
            new = objects.check_identity(resource, namespace, new, name)
            if new["metadata"].get("resourceVersion") not in (None, _rv(old)):
                raise conflict(resource.plural, name, resource.group)
            return self._replace(resource, old, new, subresource, dry_run)

    def _replace(self, resource: Resource, old: dict, new: dict, subresource: str | None,
                 dry_run: bool) -> dict:
        new = objects.prepare_update(resource, old, new, subresource)
        if objects.same_content(old, new):
            return old
        if dry_run:
            return new
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            return self._commit(resource, DELETED, new, old)
        return self._commit(resource, MODIFIED, new, old)

    def delete(self, resource: Resource, namespace: str | None, name: str,
               preconditions: dict | None = None, dry_run: bool = False) -> dict:
        """The object as deleted (or as marked for deletion while it has finalizers)."""
        with self._cond:
            old = self.get(resource, namespace, name)
            for field in ("uid", "resourceVersion"):
                wanted = (preconditions or {}).get(field)
                if wanted and wanted != old["metadata"].get(field):
                    raise conflict(resource.plural, name, resource.group,
                                   f"Precondition failed: {field} in precondition: {wanted}, "
                                   f"{field} in object meta: {old['metadata'].get(field)}")
            if dry_run:
                return old
            if old["metadata"].get("finalizers"):
                if old["metadata"].get("deletionTimestamp"):
                    return old
                marked = copy.deepcopy(old)
                marked["metadata"]["deletionTimestamp"] = objects.now()
                marked["metadata"]["deletionGracePeriodSeconds"] = 0
                return self._commit(resource, MODIFIED, marked, old)
            if resource is NAMESPACES:
                for held in RESOURCES:
                    if held.namespaced:
                        for obj in self._select(held, name, lambda _: True):
                            self._commit(held, DELETED, copy.deepcopy(obj), obj)
            return self._commit(resource, DELETED, copy.deepcopy(old), old)

    def delete_collection(self, resource: Resource, namespace: str | None, match: Match,
                          dry_run: bool = False) -> list[dict]:
        with self._cond:
            return [self.delete(resource, obj["metadata"].get("namespace"),
                                obj["metadata"]["name"], dry_run=dry_run)
                    for obj in self._select(resource, namespace, match)]

    # -----------------------------------------------------------------------------------------
    # history and watches

    def compact(self, resource_version: int | None = None) -> int:
        """Forget the changes up to `resource_version` (default: all so far): watches from an
        older version get 410 Expired. Returns the compaction point."""
        with self._cond:
            point = self._rv if resource_version is None else min(resource_version, self._rv)
            self._compacted = max(self._compacted, point)
            del self._history[:bisect.bisect_right(self._history, self._compacted,
                                                   key=lambda c: c.rv)]
            return self._compacted

    def wake(self) -> None:
        """Wake every waiting watch (they return early, e.g. to see the server stopping)."""
        with self._cond:
            self._wakes += 1
            self._cond.notify_all()

    def watch(self, resource: Resource, namespace: str | None, match: Match,
              since: int | None) -> tuple[Watch, list[dict]]:
        """A watch from `since` (None: from now, with the current objects first, returned
        as the second element); its first `next` is 410 Expired if `since` is older than the
        compaction point."""
        with self._cond:
            if since is not None:
                return Watch(self, resource, namespace, match, since), []
            current = self._select(resource, namespace, match)
            return Watch(self, resource, namespace, match, self._rv), current


class Watch:
    """The events one watcher sees: changes of one resource (in one namespace) after
    `position`, translated through its selectors as the apiserver's cache does (an object
    that stops matching is DELETED for this watcher, one that starts matching is ADDED)."""

    def __init__(self, store: Store, resource: Resource, namespace: str | None, match: Match,
                 position: int):
        self._store = store
        self._resource = resource
        self._namespace = namespace
        self._match = match
        self.position = position   # every change up to here has been seen

    def _visible(self, obj: dict | None) -> bool:
        return obj is not None and (not self._namespace or obj["metadata"].get(
            "namespace") == self._namespace) and self._match(obj)

    def next(self, timeout: float) -> list[tuple[str, dict]]:
        """The events after `position`, waiting up to `timeout` for one (or a wake-up);
        410 Expired once the history this watch needs has been compacted away."""
        store = self._store
        with store._cond:
            wakes = store._wakes
            store._cond.wait_for(lambda: store._rv > self.position or store._wakes != wakes
                                 or self.position < store._compacted, timeout)
            if self.position < store._compacted:
                raise expired(f"too old resource version: {self.position} "
                              f"({store._compacted})")
            start = bisect.bisect_right(store._history, self.position, key=lambda c: c.rv)
            changes = store._history[start:]
            self.position = max(self.position, store._rv)
        events = []
        for change in changes:
            if change.resource != self._resource.key:
                continue
            now, before = self._visible(change.object), self._visible(change.previous)
            if change.type == DELETED:
                if before or now:
                    events.append((DELETED, change.object))
            elif now:
                events.append((MODIFIED if before else ADDED, change.object))
            elif before:
                gone = copy.deepcopy(change.previous)
                gone["metadata"]["resourceVersion"] = str(change.rv)
                events.append((DELETED, gone))
        return events

