"""The Kubernetes API, for the agent and pipit-controller: optional (no kubeconfig and not in
a pod: no Kubernetes, and everything works from etcd alone), through the official client.

Objects come and go as plain dicts, as the API serves them (no model classes: a list of 10,000
pods decodes in a fraction of the time). Blocking calls run in a thread.

`Informer` keeps a cache of one kind (optionally by label or field selector) with its own
list + watch loop over the client's REST calls, instead of kubernetes.informer.SharedInformer:
that informer's stop() can block forever when called during a (re-)list, and it reconnects
in a tight loop with no backoff while the API server is down; and watch.Watch's
deserialize=False mode fails on an ERROR event (it reads `raw_object`, which only its
deserializing mode sets), so 410 Expired could not be told from a crash. Here: a watch from the
list's resourceVersion with bookmarks, `410 Expired` answered with a new list (whose
differences with the cache come out as events, deletions included, so nothing deleted while
the watch was down is missed: the tombstone case), any other failure retried with an
exponential backoff (0.2 s to 10 s), and stop() that interrupts a blocked read and never
waits for the thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ipam.errors import PipitError

log = logging.getLogger(__name__)

ADDED, MODIFIED, DELETED = "ADDED", "MODIFIED", "DELETED"
REQUEST_TIMEOUT = 10.0  # seconds for one API call
WATCH_SECONDS = 240  # the server ends each watch after this; the informer watches again
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 10.0


class KubernetesUnavailable(PipitError):
    """The Kubernetes API could not be reached, or refused a request."""
    # the API answered with a client error (401, 403, 404...; not 408 or 429): asking again
    # later will not change its answer
    refused = False


def in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def api_client(kubeconfig: str | None):
    """A configured ApiClient: from `kubeconfig`, else the pod's service account when running
    in a pod, else None (no Kubernetes)."""
    if not kubeconfig and not in_cluster():
        return None
    # ~0.5 s and ~17 MiB to import: only where Kubernetes is used
    from kubernetes import client, config

    if kubeconfig:
        if not os.path.isfile(kubeconfig):
            raise KubernetesUnavailable(f"the kubeconfig {kubeconfig} does not exist.")
        try:
            return config.new_client_from_config(kubeconfig)
        except Exception as error:  # the client raises ConfigException and plain ones
            raise KubernetesUnavailable(f"cannot use the kubeconfig {kubeconfig}: "
                                        f"{error}.") from None
    configuration = client.Configuration()
    config.load_incluster_config(client_configuration=configuration)
    return client.ApiClient(configuration)


def _describe(error: Exception) -> str:
    status = getattr(error, "status", None)
    if status:
        try:
            message = json.loads(error.body).get("message")
        except (TypeError, ValueError, AttributeError):
            message = None
        return f"HTTP {status}" + (f": {message}" if message else f" {error.reason}")
    return " ".join(str(error).split())[:200] or type(error).__name__


class KubeAPI:
    """The calls Pipit makes, each answering a dict (or None for 404)."""

    def __init__(self, client, timeout: float = REQUEST_TIMEOUT):
        from kubernetes import client as k8s

        self.client = client
        self.core = k8s.CoreV1Api(client)
        self.coordination = k8s.CoordinationV1Api(client)
        self.discovery = k8s.DiscoveryV1Api(client)
        self.timeout = timeout
        self.url = client.configuration.host

    @classmethod
    def connect(cls, kubeconfig: str | None) -> KubeAPI | None:
        client = api_client(kubeconfig)
        return None if client is None else cls(client)

    def call_sync(self, method: Callable, *args, missing_ok: bool = False, **kwargs):
        """One API call in this thread: its JSON answer as a dict."""
        from kubernetes.client.exceptions import ApiException

        try:
            response = method(*args, _preload_content=False, _request_timeout=self.timeout,
                              **kwargs)
            return json.loads(response.data)
        except ApiException as error:
            if missing_ok and error.status == 404:
                return None
            answer = KubernetesUnavailable(f"the Kubernetes API at {self.url} answered "
                                           f"{_describe(error)}.")
            answer.refused = 400 <= (error.status or 0) < 500 and error.status not in (408, 429)
            raise answer from None
        except Exception as error:  # urllib3's connection errors, timeouts
            raise KubernetesUnavailable(f"cannot reach the Kubernetes API at {self.url}: "
                                        f"{_describe(error)}.") from None

    async def call(self, method: Callable, *args, missing_ok: bool = False, **kwargs):
        return await asyncio.to_thread(self.call_sync, method, *args, missing_ok=missing_ok,
                                       **kwargs)

    async def node(self, name: str) -> dict | None:
        return await self.call(self.core.read_node, name, missing_ok=True)

    async def pod(self, namespace: str, name: str) -> dict | None:
        return await self.call(self.core.read_namespaced_pod, name, namespace, missing_ok=True)

    async def namespace(self, name: str) -> dict | None:
        return await self.call(self.core.read_namespace, name, missing_ok=True)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass


def key_of(obj: Mapping) -> str:
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace")
    return f"{namespace}/{meta.get('name')}" if namespace else str(meta.get("name"))


@dataclass(frozen=True)
class Event:
    type: str  # ADDED | MODIFIED | DELETED
    obj: dict


class Informer:
    """A cache of one kind's objects kept by list + watch in a thread of its own. `items`
    (key "ns/name" or "name" -> object) is replaced only in the event loop; `changed` is set
    on every event, which also goes to `on_event` (called in the event loop); `ready` is set
    once the first list is in."""

    def __init__(self, api: KubeAPI, list_method: Callable, what: str, *,
                 on_event: Callable[[Event], None] | None = None, watch_seconds: int =
                 WATCH_SECONDS, **selectors):
        self.api = api
        self.list_method = list_method
        self.what = what
        self.on_event = on_event
        self.watch_seconds = watch_seconds
        self.selectors = selectors  # label_selector=..., field_selector=...
        self.items: dict[str, dict] = {}
        self.ready = asyncio.Event()
        self.changed = asyncio.Event()
        self.lists = 0  # how many times it listed (first list and after 410 Expired)
        self._stopped = threading.Event()
        self._response = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self) -> None:
        """Keep the cache until cancelled (stops the thread without waiting for it)."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._follow, name=f"informer-{self.what}",
                                        daemon=True)
        self._thread.start()
        try:
            await asyncio.Event().wait()
        finally:
            self.stop()

    def stop(self) -> None:
        self._stopped.set()
        response = self._response
        if response is not None:
            try:
                response.shutdown()  # wakes a read blocked in the thread
            except Exception:
                pass

    # -- in the thread ------------------------------------------------------------------

    def _post(self, events: list[Event], listed: dict[str, dict] | None = None) -> None:
        loop = self._loop
        if loop is None or loop.is_closed() or self._stopped.is_set():
            return
        try:
            loop.call_soon_threadsafe(self._apply, events, listed)
        except RuntimeError:  # the loop closed meanwhile
            pass

    def _apply(self, events: list[Event], listed: dict[str, dict] | None) -> None:
        if listed is not None:
            self.items = listed
        else:
            for event in events:
                if event.type == DELETED:
                    self.items.pop(key_of(event.obj), None)
                else:
                    self.items[key_of(event.obj)] = event.obj
        if listed is not None:
            self.ready.set()
        for event in events:
            if self.on_event is not None:
                try:
                    self.on_event(event)
                except Exception:
                    log.exception("handling a %s event", self.what)
        if events or listed is not None:
            self.changed.set()

    def _list(self, known: dict[str, dict]) -> tuple[dict[str, dict], str]:
        answer = self.api.call_sync(self.list_method, **self.selectors)
        self.lists += 1
        items = {}
        for obj in answer.get("items") or []:
            obj.setdefault("kind", answer.get("kind", "").removesuffix("List"))
            items[key_of(obj)] = obj
        events = [Event(DELETED, obj) for key, obj in known.items() if key not in items]
        for key, obj in items.items():
            old = known.get(key)
            if old is None:
                events.append(Event(ADDED, obj))
            elif (old.get("metadata") or {}).get("resourceVersion") != \
                    (obj.get("metadata") or {}).get("resourceVersion"):
                events.append(Event(MODIFIED, obj))
        self._post(events, dict(items))
        return items, answer["metadata"]["resourceVersion"]

    def _follow(self) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        known: dict[str, dict] = {}
        version: str | None = None
        pause = BACKOFF_FIRST
        while not self._stopped.is_set():
            try:
                if version is None:
                    known, version = self._list(known)
                    log.info("listed %d %s", len(known), self.what)
                response = self.list_method(
                    watch=True, resource_version=version, allow_watch_bookmarks=True,
                    timeout_seconds=self.watch_seconds, _preload_content=False,
                    _request_timeout=(self.api.timeout, self.watch_seconds + 30),
                    **self.selectors)
                self._response = response
                started, events = time.monotonic(), 0
                try:
                    for line in iter_resp_lines(response):
                        if self._stopped.is_set():
                            return
                        if not line:
                            continue
                        event = json.loads(line)
                        kind, obj = event.get("type"), event.get("object") or {}
                        if kind == "ERROR":
                            if obj.get("code") == 410:
                                log.info("watch of %s expired (%s); listing again", self.what,
                                         obj.get("message"))
                                version = None
                                break
                            raise KubernetesUnavailable(f"watch of {self.what}: "
                                                        f"{obj.get('message')}")
                        version = (obj.get("metadata") or {}).get("resourceVersion", version)
                        if kind == "BOOKMARK":
                            continue
                        if kind == DELETED:
                            known.pop(key_of(obj), None)
                        else:
                            known[key_of(obj)] = obj
                        self._post([Event(kind, obj)])
                        events += 1
                        pause = BACKOFF_FIRST
                finally:
                    self._response = None
                    response.release_conn()
                if version is not None and not events and time.monotonic() - started < 1.0:
                    self._stopped.wait(pause)  # a server that ends every watch at once
                    pause = min(pause * 2, BACKOFF_MAX)
            except Exception as error:
                if self._stopped.is_set():
                    return
                if getattr(error, "status", None) == 410:
                    version = None
                    continue
                log.warning("%s: %s; trying again in %.1f s", self.what,
                            error if isinstance(error, PipitError) else _describe(error), pause)
                self._stopped.wait(pause)
                pause = min(pause * 2, BACKOFF_MAX)
