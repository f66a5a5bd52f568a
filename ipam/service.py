"""The node agent's local IPAM service: a unix socket the CNI plugin (`pipit-ipam`) talks to.

One request per connection, one JSON object per line each way:

    -> {"command": "ADD", "handle": H, "pools": [names], "attributes": {...}}
    <- {"ips": [{"address": "10.244.3.5", "prefix": 26, "gateway": "10.244.3.0",
                 "pool": "default"}]}
    -> {"command": "DEL", "handle": H}               <- {"released": ["10.244.3.5"]}
    -> {"command": "CHECK", "handle": H}             <- {"ips": [...]} (empty: unknown)
    -> {"command": "STATUS"}                         <- {"pools": ["default"]}
    -> {"command": "GC", "prefix": P, "valid": [H]}   (P: ipam.cni.handle_prefix)
                                                     <- {"released": [handles]}
    <- on failure: {"error": {"kind": "PoolExhausted", "msg": "one sentence"}}

and a whole CNI call from the native plugin (ipam/cni_shim.c), run with the Python plugin's
own code (`ipam.cni.plan`) around the handler above:

    -> {"command": "CNI", "env": {"CNI_COMMAND": "ADD", ...}, "stdin": "{...}"}
    <- EXIT-STATUS SP [the plugin's stdout: one line of JSON]

Every request may say how long its caller still waits, `"timeout": SECONDS` (the plugin's
deadline, `ipam.timeout` of the CNI configuration); the agent answers a little before that,
with a try-again error if etcd did not let it finish, and then keeps nothing for an ADD it
could not answer (see ipam.allocator).

ADD is idempotent (a handle that holds addresses gets them back) and answers only after the
allocation is committed to etcd. All requests for the node go through the allocator's batch
queue, so a burst of pods costs a few etcd transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address, IPv4Network

from ipam import block as blocks
from ipam import cni, keys
from ipam.allocator import IPAM
from ipam.block import ATTACHMENT, FLOATING_FOR, block_capacity
from ipam.annotations import PodRequest, pool_names
from ipam.errors import (Conflict, DatastoreUnavailable, InvalidResource, MalformedRequest,
                         PipitError)
from ipam.local_socket import start_private_server
from ipam.metrics import IPAM_REQUEST_SECONDS, IPAM_REQUESTS
from ipam.pool import IPPool, pool_of, read_pools
from ipam.release import stale_attachments

log = logging.getLogger(__name__)

DEFAULT_SOCKET = cni.DEFAULT_SOCKET
MAX_REQUEST = 1 << 20
REQUEST_TIMEOUT = 10.0
POOLS_TTL = 5.0
METERED_COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "GC")


def budget(timeout) -> float:
    """How long the agent may take over a request whose caller waits `timeout` more seconds
    (none given: the plugin's default): a little less, so that the answer arrives in time."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        timeout = cni.TIMEOUT
    timeout = min(float(timeout), cni.MAX_TIMEOUT)
    return timeout - min(1.0, timeout / 5)


def describe(pools: list[IPPool], address: IPv4Address) -> dict:
    """What the CNI result needs about one address: its block's prefix and gateway."""
    pool = pool_of(pools, address)
    if pool is None:
        return {"address": str(address), "prefix": 32, "gateway": None, "pool": None}
    block = IPv4Network((address, pool.block_size), strict=False)
    has_gateway = block_capacity(block.num_addresses) < block.num_addresses
    return {"address": str(address), "prefix": pool.block_size,
            "gateway": str(block.network_address) if has_gateway else None, "pool": pool.name}


class IPAMService:
    """`pod_request`, when the agent has the Kubernetes API: an async (namespace, pod) ->
    ipam.annotations.PodRequest, the pools and addresses the pod's annotations ask for."""

    def __init__(self, ipam: IPAM, node: str, path: str = DEFAULT_SOCKET,
                 pod_request: Callable[[str, str], Awaitable[PodRequest]] | None = None):
        self.ipam = ipam
        self.node = node
        self.path = path
        self.pod_request = pod_request
        self._server: asyncio.base_events.Server | None = None
        self._known_pools: list[IPPool] = []  # for describing answers (see _describe)
        self._pools_read = float("-inf")
        self._undoing: set[asyncio.Future] = set()  # releases outliving a cancelled ADD
        # Attachments this agent gave addresses without floating IPs: their DEL need not look
        # for a floating IP handle (an etcd read). Others' DELs, and all after a restart, do.
        self._no_floating: set[str] = set()

    async def start(self) -> None:
        _take_over_stale_socket(self.path)
        # root's only, with the system's largest backlog (a burst of pods connects at once)
        self._server = await start_private_server(self._serve, self.path, limit=MAX_REQUEST)
        log.info("IPAM service listening on %s for node %s", self.path, self.node)

    @property
    def serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError
            except ValueError:
                answer = _line(_error(MalformedRequest("the request is not a JSON object.")))
            except RecursionError:
                answer = _line(_error(MalformedRequest("the request nests too deeply to be "
                                                       "read as JSON.")))
            else:
                answer = (await self.cni_call(request) if request.get("command") == "CNI"
                          else _line(await self.handle(request)))
            writer.write(answer)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass  # the client went away or sent garbage: nothing to answer
        finally:
            writer.close()

    async def handle(self, request: dict, limit: float | None = None) -> dict:
        """The answer to one request, within `limit` seconds (default: from the request's
        timeout); past that, a try-again error, and whatever the request was about to get
        is given back (the allocator sees its caller cancelled)."""
        limit = budget(request.get("timeout")) if limit is None else limit
        command = str(request.get("command"))
        started = time.monotonic()
        try:
            answer = await asyncio.wait_for(self._dispatch(request), limit)
        except asyncio.TimeoutError:
            log.warning("%s %s did not finish within %.3g s", command, request.get("handle", ""),
                        limit)
            answer = _error(DatastoreUnavailable(
                f"{command} did not finish within {limit:.3g} s: etcd at "
                f"{self.ipam.store.config.describe()} is slow or unreachable; try again."))
        if command in METERED_COMMANDS:  # not whatever a client sends as a label value
            IPAM_REQUESTS.labels(command, answer["error"]["kind"] if "error" in answer
                                 else "ok").inc()
            IPAM_REQUEST_SECONDS.labels(command).observe(time.monotonic() - started)
        return answer

    async def _dispatch(self, request: dict) -> dict:
        command = request.get("command")
        try:
            if command == "ADD":
                return {"ips": await self._describe(await self._add(request))}
            if command == "DEL":
                handle = _handle(request)
                held = [handle]
                if handle not in self._no_floating:  # or not known since this agent started
                    held.append(cni.floating_handle(handle))
                released = await asyncio.gather(*(self.ipam.release(self.node, h)
                                                  for h in held))  # one batch
                self._no_floating.discard(handle)
                return {"released": [str(a) for a in sum(released, [])]}
            if command == "CHECK":
                return {"ips": await self._describe(await self.ipam.addresses(_handle(request)))}
            if command == "STATUS":
                return {"pools": [p.name for p in await self._pools() if not p.disabled]}
            if command == "GC":
                return {"released": await self._collect(str(request.get("prefix") or ""),
                                                        set(request.get("valid") or ()))}
            raise InvalidResource(f"unknown command {command!r}.")
        except PipitError as error:
            if not isinstance(error, InvalidResource):
                log.warning("%s %s failed: %s", command, request.get("handle", ""), error)
            return _error(error)
        except Exception as error:  # a bug: say so instead of dropping the connection
            log.exception("%s failed", command)
            return _error(DatastoreUnavailable(f"pipit-agent failed: {error}."))

    async def _add(self, request: dict) -> list[IPv4Address]:
        """Allocate for an ADD: the pools (or addresses) the pod's annotations ask for, else
        the CNI configuration's; an error caused by an annotation names it."""
        attributes, pools = _attributes(request), _names(request.get("pools"))
        handle = _handle(request)
        chosen = PodRequest()
        namespace, pod = attributes.get("namespace"), attributes.get("pod")
        if self.pod_request is not None and namespace and pod:
            chosen = await self.pod_request(namespace, pod)
        try:
            if chosen.pools:
                pools = list(pool_names(chosen, await self._pools()))
            addresses = await self.ipam.assign(self.node, handle, attributes=attributes,
                                               pools=pools, reuse=True,
                                               addresses=chosen.addresses,
                                               namespace_labels=chosen.namespace_labels)
        except PipitError as error:
            raise _named(error, chosen.addresses_from if chosen.addresses
                         else chosen.pools_from) from None
        if chosen.floating:
            self._no_floating.discard(handle)
            await self._add_floating(handle, attributes, chosen, addresses[0])
        else:
            self._no_floating.add(handle)
        return addresses

    async def _add_floating(self, handle: str, attributes: dict[str, str], chosen: PodRequest,
                            target: IPv4Address) -> None:
        """Hold the pod's floating IPs under a handle of their own (so its results and CHECK
        name only its own addresses), each recording the address it leads to; if they cannot
        be had, the pod's own addresses go too (the ADD is all or nothing)."""
        try:
            await self.ipam.assign(
                self.node, cni.floating_handle(handle), reuse=True,
                attributes={**attributes, FLOATING_FOR: str(target), ATTACHMENT: handle},
                addresses=chosen.floating, namespace_labels=chosen.namespace_labels)
        except BaseException as error:
            undo = asyncio.ensure_future(self.ipam.release(self.node, handle))
            if not isinstance(error, PipitError):  # cancelled: the release goes on without us
                self._undoing.add(undo)  # (the loop keeps only a weak reference to a task)
                undo.add_done_callback(self._undoing.discard)
                raise
            await undo
            raise _named(error, chosen.floating_from) from None

    async def cni_call(self, request: dict) -> bytes:
        """A CNI call forwarded whole by the native plugin: the answer line it prints from
        (exit status, then the result or error JSON), the same as the Python plugin's."""
        env, stdin = request.get("env"), request.get("stdin")
        try:
            if not isinstance(env, dict) or not isinstance(stdin, str):
                raise cni.CNIError(cni.DECODE_FAILURE, "the forwarded CNI call has no env "
                                   "mapping or stdin text; install the plugin again.")
            _, call, finish = cni.plan(str(env.get("CNI_COMMAND", "")), env, stdin)
            limit = budget(request.get("timeout"))  # what the native plugin has left
            result = finish(await self.handle(call, limit) if call is not None else {})
        except cni.CNIError as error:
            return b"1 " + _line(cni.error_output(error, stdin or ""))
        return b"0 " + (b"\n" if result is None else _line(result))

    async def _pools(self) -> list[IPPool]:
        pools = [pool for pool, _ in read_pools(await self.ipam.store.list(keys.POOLS))]
        self._known_pools, self._pools_read = pools, time.monotonic()
        return pools

    async def _describe(self, addresses: list[IPv4Address]) -> list[dict]:
        """Prefix and gateway of each address, from the pools as last read (a pool's CIDR and
        blockSize cannot change while it holds addresses); read again for an address that
        lies in none of them, and at least every POOLS_TTL seconds."""
        if not addresses:
            return []
        pools = self._known_pools
        if (time.monotonic() - self._pools_read > POOLS_TTL
                or any(pool_of(pools, a) is None for a in addresses)):
            pools = await self._pools()
        return [describe(pools, a) for a in addresses]

    async def _collect(self, prefix: str, valid: set[str]) -> list[str]:
        """Release this node's handles under `prefix` that the runtime no longer knows. The
        prefix ends in the handle's '.', which no escaped network name holds, so network
        "net" never takes "net.blue"'s handles."""
        if not prefix.endswith("."):
            raise InvalidResource("GC needs the handle prefix of the network (ending in '.').")
        found = [blocks.from_json(e.value) for e in await self.ipam.store.list(keys.BLOCKS)]
        stale = stale_attachments(found, self.node, prefix, valid)
        self._no_floating.difference_update(stale)
        # all at once: the allocator's queue releases them in a few transactions
        await asyncio.gather(*(self.ipam.release(self.node, h) for h in stale))
        for handle_id in stale:
            log.info("GC released %s", handle_id)
        return stale


def _named(error: PipitError, source: str) -> PipitError:
    """`error` beginning with the annotation that caused it (`source`), unless it is etcd's
    (nothing the annotation did) or names it already."""
    if (isinstance(error, (DatastoreUnavailable, Conflict)) or not source
            or str(error).startswith(source)):
        return error
    return type(error)(f"{source}: {error}")


def _handle(request: dict) -> str:
    handle = request.get("handle")
    if not isinstance(handle, str) or not handle:
        raise InvalidResource("the request has no handle.")
    return handle


def _names(value) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidResource("pools must be a list of pool names.")
    return value


def _attributes(request: dict) -> dict[str, str]:
    attributes = request.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise InvalidResource("attributes must be a mapping of strings.")
    return {str(k): str(v) for k, v in attributes.items()}


def _line(answer: dict) -> bytes:
    return json.dumps(answer).encode() + b"\n"


def _error(error: PipitError) -> dict:
    return {"error": {"kind": type(error).__name__, "msg": str(error)}}


def _take_over_stale_socket(path: str) -> None:
    """Remove a socket left by a dead agent; refuse if a live one still answers on it."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise InvalidResource(f"another pipit-agent is already serving on {path}.")
