"""The HTTP side of the fake API server: routing of the Kubernetes REST paths onto the store,
watches streamed as chunked JSON lines (with bookmarks and 410 Expired), and the controls a
test needs: stop, start and restart on the same port with the same data (an API server
restart), injected failures, the log of requests received, a kubeconfig."""

from __future__ import annotations

import json
import re
import select
import socket
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from tests.fakekube import patch, protobuf, resources
from tests.fakekube.errors import ApiError, bad_request
from tests.fakekube.resources import Resource
from tests.fakekube.selectors import SelectorError, fields_match, matches, \
    parse_field_selector, parse_label_selector
from tests.fakekube.store import ADDED, Store

KUBERNETES_VERSION = {"major": "1", "minor": "35", "gitVersion": "v1.35.0-fakekube",
                      "gitCommit": "0000000000000000000000000000000000000000",
                      "gitTreeState": "clean", "buildDate": "2025-12-17T00:00:00Z",
                      "goVersion": "go1.25.0", "compiler": "gc", "platform": "linux/amd64"}
DEFAULT_WATCH_TIMEOUT = 1800.0     # the apiserver's --min-request-timeout
INITIAL_EVENTS_END = "k8s.io/initial-events-end"
PATCH_TYPES = (patch.MEDIA_MERGE, patch.MEDIA_STRATEGIC, patch.MEDIA_JSON)


@dataclass
class Failure:
    """Answer matching requests with `code` instead of serving them, `times` times (None:
    until cleared)."""
    code: int
    times: int | None = 1
    method: str | None = None
    path: str | None = None        # a regular expression searched in the path and query
    message: str = "injected failure"

    def matches(self, method: str, target: str) -> bool:
        return ((self.method is None or self.method == method)
                and (self.path is None or re.search(self.path, target) is not None))


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: bytes


@dataclass(frozen=True)
class Target:
    resource: Resource
    namespace: str | None
    name: str | None
    subresource: str | None


def parse_target(path: str) -> Target | None:
    """The resource a REST path names, or None."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        held = resources.find(group, version, rest[2])
        if held is not None and held.namespaced:
            namespace, rest = rest[1], rest[2:]
    if not rest or len(rest) > 3:
        return None
    resource = resources.find(group, version, rest[0])
    if resource is None:
        return None
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    if sub is not None and (sub != "status" or not resource.status):
        return None
    if resource.namespaced and name is not None and namespace is None:
        return None
    return Target(resource, namespace, name, sub)


def deleted_answer(resource: Resource, obj: dict) -> dict:
    """What DELETE answers: the object if it is only marked for deletion (finalizers) or the
    resource returns deleted objects (pods), else a Status of success, as the real server."""
    meta = obj["metadata"]
    if resource.returns_deleted or meta.get("deletionTimestamp"):
        return obj
    details = {"name": meta["name"], "kind": resource.plural, "uid": meta["uid"]}
    if resource.group:
        details["group"] = resource.group
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
            "details": details}


def kubeconfig(url: str, namespace: str = "default") -> dict:
    """A kubeconfig for kubectl, helm and the Python client (no credentials)."""
    return {"apiVersion": "v1", "kind": "Config", "current-context": "fakekube",
            "clusters": [{"name": "fakekube", "cluster": {"server": url}}],
            "users": [{"name": "fakekube", "user": {}}],
            "contexts": [{"name": "fakekube", "context": {"cluster": "fakekube",
                                                          "user": "fakekube",
                                                          "namespace": namespace}}]}


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], kube: FakeKube):
        self.kube = kube
        self.stopping = threading.Event()
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def close_connections(self) -> None:
        with self.connections_lock:
            for conn in list(self.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class FakeKube:
    """Pipit's stand-in for kube-apiserver, on `host` and a free port (or `port`).

    `store` holds the objects (it outlives a restart); `bookmark_interval` is how often a
    watch that asked for bookmarks gets one (the real server: about a minute)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 bookmark_interval: float = 1.0, store: Store | None = None):
        self.host, self.port = host, port
        self.bookmark_interval = bookmark_interval
        self.store = store or Store()
        self.requests: deque[Request] = deque(maxlen=2000)
        self._failures: list[Failure] = []
        self._watch_epoch = 0   # watches started before end_watches() end
        self._lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeKube:
        self._httpd = _HTTPServer((self.host, self.port), self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fakekube",
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop every connection (watches end as on a server crash)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.stopping.set()
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
        self.store.wake()
        if self._thread is not None:
            self._thread.join()

    def restart(self) -> None:
        """An API server restart: connections dropped, same port, same data."""
        self.stop()
        self.start()

    def __enter__(self) -> FakeKube:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def end_watches(self) -> None:
        """End every open watch cleanly, as the real server does at its request timeout
        (clients watch again from their last resourceVersion)."""
        self._watch_epoch += 1
        self.store.wake()

    def fail(self, code: int = 503, *, times: int | None = 1, method: str | None = None,
             path: str | None = None, message: str = "injected failure") -> Failure:
        """Answer the next `times` requests that match (method, regex on path?query) with
        a Status of `code`."""
        failure = Failure(code, times, method, path, message)
        with self._lock:
            self._failures.append(failure)
        return failure

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def _take_failure(self, method: str, target: str) -> Failure | None:
        with self._lock:
            for failure in self._failures:
                if failure.matches(method, target):
                    if failure.times is not None:
                        failure.times -= 1
                        if failure.times <= 0:
                            self._failures.remove(failure)
                    return failure
        return None

    def write_kubeconfig(self, path: str | Path, namespace: str = "default") -> Path:
        path = Path(path)
        path.write_text(json.dumps(kubeconfig(self.url, namespace), indent=1))
        return path


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # -----------------------------------------------------------------------------------------
    # plumbing

    def _send(self, code: int, body: object, content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: ApiError) -> None:
        headers = {"Retry-After": "1"} if error.code == 429 else None
        self._send(error.code, error.status(), headers=headers)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self, method: str) -> None:
        kube = self.server.kube
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        self._content_type = content_type
        body = self._read_body()
        kube.requests.append(Request(method, url.path, query, content_type, body))
        failure = kube._take_failure(method, self.path)
        try:
            if failure is not None:
                raise ApiError(failure.code, failure.message)
            self._route(method, url.path.rstrip("/") or "/", query, body)
        except ApiError as e:
            self._send_error(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:   # a bug of the fake: say so, as the real server would
            traceback.print_exc()
            self._send_error(ApiError(500, f"fakekube: {type(e).__name__}: {e}"))

    # -----------------------------------------------------------------------------------------
    # routing

    def _route(self, method: str, path: str, query: dict[str, str], body: bytes) -> None:
        if method == "GET" and self._discovery(path):
            return
        target = parse_target(path)
        if target is None:
            if path.startswith(("/openapi", "/swagger")) or not path.startswith(("/api/",
                                                                                  "/apis/")):
                self._send(404, b"404 page not found\n", "text/plain; charset=utf-8")
                return
            raise ApiError(404, "the server could not find the requested resource")
        store = self.server.kube.store
        res, ns, name, sub = target.resource, target.namespace, target.name, target.subresource
        dry_run = query.get("dryRun") == "All"
        if name is None:
            if method == "GET":
                self._watch(target, query) if query.get("watch") in ("1", "true", "True") \
                    else self._list(target, query)
            elif method == "POST" and (ns or not res.namespaced):
                self._send(200 if dry_run else 201,
                           store.create(res, ns, self._json(body), dry_run))
            elif method == "DELETE" and (ns or not res.namespaced):
                deleted = store.delete_collection(res, ns, self._match(res, query), dry_run)
                self._send(200, {"kind": f"{res.kind}List", "apiVersion": res.api_version,
                                 "metadata": {"resourceVersion": str(store.resource_version)},
                                 "items": deleted})
            else:
                raise ApiError(405, "the server does not allow this method on the requested "
                                    "resource")
        elif method == "GET":
            self._send(200, store.get(res, ns, name))
        elif method == "PUT":
            self._send(200, store.update(res, ns, name, self._json(body), sub, dry_run))
        elif method == "PATCH":
            self._send(200, store.patch(res, ns, name, self._patcher(self._content_type, body),
                                        sub, dry_run))
        elif method == "DELETE" and sub is None:
            options = self._json(body) if body else {}
            self._send(200, deleted_answer(
                res, store.delete(res, ns, name, options.get("preconditions"), dry_run)))
        else:
            raise ApiError(405, "the server does not allow this method on the requested "
                                "resource")

    def _discovery(self, path: str) -> bool:
        host = f"{self.server.kube.host}:{self.server.kube.port}"
        parts = [p for p in path.split("/") if p]
        if path == "/version":
            doc = KUBERNETES_VERSION
        elif path in ("/healthz", "/livez", "/readyz"):
            self._send(200, b"ok", "text/plain; charset=utf-8")
            return True
        elif path == "/api":
            doc = resources.api_versions(host)
        elif path == "/apis":
            doc = resources.api_group_list()
        elif len(parts) == 2 and parts[0] == "api":
            doc = resources.api_resource_list("", parts[1])
        elif len(parts) == 2 and parts[0] == "apis":
            doc = resources.api_group(parts[1])
        elif len(parts) == 3 and parts[0] == "apis":
            doc = resources.api_resource_list(parts[1], parts[2])
        else:
            return False
        if doc is None:
            raise ApiError(404, "the server could not find the requested resource")
        self._send(200, doc)
        return True

    def _json(self, body: bytes) -> object:
        """The request's object (JSON, or protobuf from kubectl's typed clients)."""
        if self._content_type == protobuf.MEDIA_TYPE:
            try:
                return protobuf.decode(body)
            except protobuf.UnsupportedBody as e:
                raise ApiError(415, f"fakekube reads no such protobuf body: {e}") from None
        if self._content_type not in ("application/json", ""):
            raise ApiError(415, f"the body of the request was in an unknown format - accepted "
                                f"media types include: application/json, "
                                f"{protobuf.MEDIA_TYPE}")
        try:
            return json.loads(body)
        except ValueError as e:
            raise bad_request(f"the body of the request could not be decoded as JSON: {e}") \
                from None

    @staticmethod
    def _patcher(content_type: str, body: bytes):
        if content_type not in PATCH_TYPES:
            raise ApiError(415, f"the body of the request was in an unknown format - accepted "
                                f"media types include: {', '.join(PATCH_TYPES)}")

        def transform(current: dict) -> dict:
            try:
                return patch.apply(content_type, current, body)
            except patch.PatchError as e:
                raise ApiError(422, str(e)) from None
        return transform

    @staticmethod
    def _match(resource: Resource, query: dict[str, str]):
        try:
            labels = parse_label_selector(query.get("labelSelector"))
            fields = parse_field_selector(query.get("fieldSelector"), resource.field_selectors)
        except SelectorError as e:
            raise bad_request(str(e)) from None
        return lambda obj: matches(labels, obj["metadata"].get("labels")) and \
            fields_match(fields, obj)

    def _list(self, target: Target, query: dict[str, str]) -> None:
        res = target.resource
        try:
            limit = int(query.get("limit") or 0)
        except ValueError:
            raise bad_request(f"invalid limit: {query['limit']!r}") from None
        items, rv, token, remaining = self.server.kube.store.list(
            res, target.namespace, self._match(res, query), limit, query.get("continue"))
        metadata: dict[str, object] = {"resourceVersion": rv}
        if token:
            metadata["continue"] = token
            metadata["remainingItemCount"] = remaining
        self._send(200, {"kind": f"{res.kind}List", "apiVersion": res.api_version,
                         "metadata": metadata, "items": items})

    # -----------------------------------------------------------------------------------------
    # watch

    def _watch(self, target: Target, query: dict[str, str]) -> None:
        kube, res = self.server.kube, target.resource
        match = self._match(res, query)
        since_text = query.get("resourceVersion") or "0"
        initial_end = query.get("sendInitialEvents") == "true"
        try:
            since = None if since_text == "0" or initial_end else int(since_text)
            timeout = float(query.get("timeoutSeconds") or DEFAULT_WATCH_TIMEOUT)
        except ValueError:
            raise bad_request(f"invalid resourceVersion or timeoutSeconds: {query}") from None
        bookmarks = query.get("allowWatchBookmarks") in ("1", "true", "True")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        watch, current = kube.store.watch(res, target.namespace, match, since)
        for obj in current:
            self._chunk({"type": ADDED, "object": obj})
        if initial_end:
            self._bookmark(res, watch.position, {INITIAL_EVENTS_END: "true"})
        deadline = time.monotonic() + timeout
        next_bookmark = time.monotonic() + kube.bookmark_interval
        epoch = kube._watch_epoch
        while not self.server.stopping.is_set() and kube._watch_epoch == epoch:
            now = time.monotonic()
            wake = min(deadline, next_bookmark if bookmarks else deadline, now + 1.0)
            try:
                events = watch.next(max(0.0, wake - now))
            except ApiError as e:   # 410: from before the compaction point
                self._chunk({"type": "ERROR", "object": e.status()})
                break
            if self.server.stopping.is_set():
                return
            for kind, obj in events:
                self._chunk({"type": kind, "object": obj})
            now = time.monotonic()
            if bookmarks and (now >= next_bookmark or now >= deadline):
                self._bookmark(res, watch.position)
                next_bookmark = now + kube.bookmark_interval
            if now >= deadline or self._client_gone():
                break
        if not self.server.stopping.is_set():
            self._end_chunks()

    def _bookmark(self, res: Resource, position: int,
                  annotations: dict[str, str] | None = None) -> None:
        metadata: dict[str, object] = {"resourceVersion": str(position),
                                       "creationTimestamp": None}
        if annotations:
            metadata["annotations"] = annotations
        self._chunk({"type": "BOOKMARK", "object": {"kind": res.kind,
                                                    "apiVersion": res.api_version,
                                                    "metadata": metadata}})

    def _chunk(self, event: dict) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _end_chunks(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def _client_gone(self) -> bool:
        """The client closed its end (nothing to read but end of file)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True
