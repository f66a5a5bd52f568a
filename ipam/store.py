"""The etcd edge: JSON values, compare-and-swap transactions, one clear error when etcd is away.

Everything above this module sees `Entry` (key, decoded JSON value, mod_revision) and
`Store.txn(expect=..., put=..., delete=...)`, where `expect` maps each key the decision was
based on to the mod_revision it had (0: the key must not exist). A failed transaction hands
back the current entries of the expected keys from the same round trip, so a retry loop
never needs a separate read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TypeVar
from urllib.parse import urlsplit

import aetcd
import grpc
from aetcd import rpc

from ipam.errors import DatastoreUnavailable, InvalidResource
from ipam.metrics import ETCD_TRANSACTIONS, ETCD_UNAVAILABLE

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_ENDPOINTS = "http://127.0.0.1:2379"
ENV_ENDPOINTS = "PIPIT_ETCD_ENDPOINTS"
ENV_CA, ENV_CERT, ENV_KEY = "PIPIT_ETCD_CA_CERT_FILE", "PIPIT_ETCD_CERT_FILE", "PIPIT_ETCD_KEY_FILE"
# etcd's own authentication (Calico's ETCD_USERNAME, ETCD_PASSWORD); the password only ever
# from the environment or pipitctl's configuration file, never a command line
ENV_USERNAME, ENV_PASSWORD = "PIPIT_ETCD_USERNAME", "PIPIT_ETCD_PASSWORD"
PROBE_TIMEOUT = 3.0  # for asking each of several endpoints alone why it does not answer


@dataclass(frozen=True)
class EtcdConfig:
    endpoints: tuple[str, ...] = (DEFAULT_ENDPOINTS,)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    timeout: float = 5.0
    username: str | None = None  # etcd's authentication: a user and its password
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_options(cls, endpoints: str | None = None, ca_file: str | None = None,
                     cert_file: str | None = None, key_file: str | None = None,
                     timeout: float = 5.0, username: str | None = None,
                     password: str | None = None) -> EtcdConfig:
        """Command-line values, else PIPIT_ETCD_* environment variables, else the default."""
        env = os.environ
        text = endpoints or env.get(ENV_ENDPOINTS) or DEFAULT_ENDPOINTS
        config = cls(
            endpoints=tuple(e.strip() for e in text.split(",") if e.strip()),
            ca_file=ca_file or env.get(ENV_CA) or None,
            cert_file=cert_file or env.get(ENV_CERT) or None,
            key_file=key_file or env.get(ENV_KEY) or None,
            timeout=timeout,
            username=username or env.get(ENV_USERNAME) or None,
            password=password or env.get(ENV_PASSWORD) or None,
        )
        config.check()
        return config

    @classmethod
    def from_arguments(cls, args) -> EtcdConfig:
        """From the options `add_arguments` put on a program's parser."""
        return cls.from_options(args.etcd_endpoints, args.etcd_ca_cert, args.etcd_cert,
                                args.etcd_key, username=args.etcd_username)

    @staticmethod
    def add_arguments(parser) -> None:
        """The --etcd-* options of pipit-agent and pipit-controller (argparse)."""
        parser.add_argument("--etcd-endpoints", metavar="URLS",
                            help=f"Comma-separated etcd URLs [env {ENV_ENDPOINTS}].")
        parser.add_argument("--etcd-ca-cert", metavar="FILE", help=f"[env {ENV_CA}]")
        parser.add_argument("--etcd-cert", metavar="FILE", help=f"[env {ENV_CERT}]")
        parser.add_argument("--etcd-key", metavar="FILE", help=f"[env {ENV_KEY}]")
        parser.add_argument("--etcd-username", metavar="USER",
                            help=f"etcd's user, with its password in {ENV_PASSWORD} [env "
                                 f"{ENV_USERNAME}].")

    @property
    def uses_tls(self) -> bool:
        return bool(self.ca_file or self.cert_file) or any(
            e.startswith("https://") for e in self.endpoints)

    def check(self) -> None:
        if not self.endpoints:
            raise InvalidResource("no etcd endpoint given; pass --etcd-endpoints or set "
                                  f"{ENV_ENDPOINTS}.")
        unix = [e for e in self.endpoints if e.startswith("unix://")]
        if unix and len(self.endpoints) > 1:
            raise InvalidResource("a unix:// etcd endpoint cannot be combined with others.")
        for endpoint in self.endpoints:
            if not unix:
                _host_port(endpoint)
        if bool(self.cert_file) != bool(self.key_file):
            raise InvalidResource("an etcd client certificate needs both --etcd-cert and "
                                  "--etcd-key.")
        if bool(self.username) != bool(self.password):
            raise InvalidResource(
                f"etcd authentication needs both a user name ({ENV_USERNAME} or "
                f"--etcd-username) and its password ({ENV_PASSWORD}); only the "
                f"{'user name' if self.username else 'password'} is given.")
        for path in (self.ca_file, self.cert_file, self.key_file):
            if path and not os.path.isfile(path):
                raise InvalidResource(f"etcd TLS file {path} does not exist.")

    def describe(self) -> str:
        return ",".join(self.endpoints)


# gRPC's words (any case) for a failed TLS set-up in its error details -> what to check.
_TLS_FAILURES = (
    ("CERTIFICATE_VERIFY_FAILED", "its TLS certificate is not trusted (check --etcd-ca-cert)"),
    ("hostname verification", "its TLS certificate does not name it (give the endpoint by a "
                              "host name or address its certificate carries)"),
    ("security handshaker", "the TLS set-up failed (are --etcd-ca-cert, --etcd-cert and "
                            "--etcd-key PEM files, and the key the certificate's?)"),
    ("TSI_DATA_CORRUPTED", "it refused the TLS connection (it may require a client certificate: "
                           "--etcd-cert and --etcd-key)"),
    ("handshake", "the TLS handshake failed (check --etcd-ca-cert, --etcd-cert and --etcd-key)"),
)


def _host_port(endpoint: str) -> tuple[str, int]:
    parts = urlsplit(endpoint if "://" in endpoint else "http://" + endpoint)
    try:
        port = parts.port or 2379
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise InvalidResource(f"etcd endpoint {endpoint!r} is not of the form "
                              "http(s)://HOST:PORT.")
    return parts.hostname, port


def connect_timeout_ms(config: EtcdConfig) -> int:
    """How long one connection attempt to etcd may take (never less than a second)."""
    return max(1000, int(config.timeout * 1000))


class _Client(aetcd.Client):
    """aetcd's client with what it lacks: TLS and several endpoints.

    The endpoints are grouped by the name a TLS server certificate must carry (without TLS:
    one group). Each group is one gRPC channel over the group's addresses, on which gRPC
    picks a live one; with several groups (members with certificates of their own), a call
    that reaches no member of one group is tried on the next (`fail_over`). An endpoint whose
    name does not resolve is left out while another one does, until no member answers: then
    every name is resolved again (`reconnect_if_names_were_left_out`)."""

    def __init__(self, config: EtcdConfig):
        super().__init__(timeout=config.timeout)
        self._config = config
        self.channels: list = []
        self.kvstubs: list = []  # one per channel, made with it
        self._current = 0
        self.unresolved: list[str] = []  # endpoints left out at the last connect
        self.generation = 0  # how many times the channels were made
        self.token: str | None = None  # etcd's for our user ("": its authentication is off)
        self._authenticating = asyncio.Lock()

    @property
    def auth_metadata(self) -> tuple[tuple[str, str], ...] | None:
        """What every call carries: the user's token, once it has one."""
        return (("token", self.token),) if self.token else None

    async def authenticate(self, stale: str | None = None) -> None:
        """Get a token for the configured user, if there is one and it has none yet, or
        again if its token is still `stale` (etcd refused it: expired, or the users changed
        since); the first group that answers gives it (a token is the cluster's)."""
        config = self._config
        if not config.username:
            return
        async with self._authenticating:
            if self.token is not None and self.token != stale:
                return  # another call got one meanwhile
            request = rpc.AuthenticateRequest(name=config.username, password=config.password)
            groups = self.groups_in_turn()
            for index, _ in groups:
                try:
                    response = await rpc.AuthStub(self.channels[index]).Authenticate(
                        request, timeout=config.timeout)
                except grpc.aio.AioRpcError as error:
                    if "authentication is not enabled" in (error.details() or ""):
                        self.token = ""  # nothing to present: calls go without
                        return
                    if index == groups[-1][0] or not _never_sent(error):
                        raise
                    continue
                self.token = response.token
                return

    async def connect(self) -> None:  # replaces aetcd's insecure-only channel set-up
        if self._connected.is_set():
            return
        config = self._config
        groups: dict[str, list[str]] = {}  # TLS name -> addresses
        unresolved: list[tuple[str, str]] = []
        for endpoint in config.endpoints:
            if endpoint.startswith("unix://"):  # etcd's unix listener (the lab's nodes use it)
                groups["localhost"] = ["unix:" + endpoint.removeprefix("unix://")]
                break
            host, port = _host_port(endpoint)
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, port, family=socket.AF_INET, type=socket.SOCK_STREAM)
            except socket.gaierror as error:
                unresolved.append((endpoint, error.strerror))
                continue
            group = groups.setdefault(host if config.uses_tls else "", [])
            group.extend(a for a in dict.fromkeys(f"{info[4][0]}:{port}" for info in infos)
                         if a not in group)
        if not groups:
            if len(unresolved) == 1:
                endpoint, reason = unresolved[0]
                raise DatastoreUnavailable(f"cannot resolve etcd endpoint {endpoint}: {reason}.")
            raise DatastoreUnavailable(
                "cannot resolve any etcd endpoint: "
                + ", ".join(f"{endpoint} ({reason})" for endpoint, reason in unresolved) + ".")
        for endpoint, reason in unresolved:
            log.warning("etcd endpoint %s left out: its name does not resolve (%s)", endpoint,
                        reason)
        self.unresolved = [endpoint for endpoint, _ in unresolved]
        self.generation += 1
        self.channels = [self._channel(name, addresses) for name, addresses in groups.items()]
        self.kvstubs = [rpc.KVStub(channel) for channel in self.channels]
        self._use(0)
        self._connected.set()

    def _channel(self, name: str, addresses: list[str]):
        config = self._config
        if addresses[0].startswith("unix:"):
            target = addresses[0]
        else:
            target = "ipv4:" + ",".join(addresses)
        options = [
            ("grpc.max_receive_message_length", 64 << 20),
            # After etcd restarts, be back within a second or two, not gRPC's default of
            # up to two minutes of back-off (calls fail fast meanwhile).
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
            # gRPC takes its "minimum reconnect backoff" as the least time it gives one
            # connection attempt (TCP, TLS and HTTP/2 settings): as long as a call, so that a
            # distant etcd (TLS at 100 ms is half a second to connect) is reached at all.
            ("grpc.min_reconnect_backoff_ms", connect_timeout_ms(config)),
        ]
        if not config.uses_tls:
            return rpc.insecure_channel(target, options=options)

        def read(path):
            with open(path, "rb") as f:
                return f.read()
        credentials = grpc.ssl_channel_credentials(
            root_certificates=read(config.ca_file) if config.ca_file else None,
            private_key=read(config.key_file) if config.key_file else None,
            certificate_chain=read(config.cert_file) if config.cert_file else None,
        )
        options.append(("grpc.ssl_target_name_override", name))
        return rpc.secure_channel(target, credentials, options=options)

    def _use(self, index: int) -> None:
        self._current = index
        self.channel = self.channels[index]
        self.kvstub = self.kvstubs[index]
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)

    def groups_in_turn(self) -> list[tuple[int, object]]:
        """(index, KV stub) of every group, the one that last answered first: a call tries
        them in this order. Each call walks its own list, so calls failing at the same time
        on a dead group do not move each other back onto it."""
        count = len(self.channels)
        order = [(self._current + step) % count for step in range(count)]
        return [(i, self.kvstubs[i]) for i in order]

    async def reconnect_if_names_were_left_out(self, generation: int) -> None:
        """No member answered a call made on the channels of `generation`: if endpoints were
        left out because their names did not resolve, close those channels, so that the next
        call resolves every name again (a member whose name has come back since may be the one
        still up). Channels made since are left alone."""
        if self.unresolved and self._connected.is_set() and generation == self.generation:
            log.info("no etcd member answers: resolving %s again",
                     ", ".join(self.unresolved))
            await self.close()

    def answered(self, index: int) -> None:
        """Group `index` answered a call: calls start there from now on."""
        if index != self._current and index < len(self.channels):
            self._use(index)

    async def close(self) -> None:
        channels, self.channels, self.kvstubs = self.channels, [], []
        for channel in channels:
            await channel.close()
        self._init_channel_attrs()
        self._connected.clear()


def _token_refused(error: grpc.aio.AioRpcError, config: EtcdConfig) -> bool:
    """etcd refused our token: expired (simple tokens lapse after --auth-token-ttl idle, JWTs
    at their expiry), issued before its users or roles changed, or none while we have a
    user (its authentication was turned on since). A new one is asked for."""
    details = error.details() or ""
    return ("invalid auth token" in details or "revision of auth store is old" in details
            or bool(config.username) and "user name is empty" in details)


def _never_sent(error: grpc.aio.AioRpcError) -> bool:
    """gRPC failed the call before sending it: no connection to any endpoint was up."""
    return (error.code() == grpc.StatusCode.UNAVAILABLE
            and "failed to connect to all addresses" in (error.details() or ""))


# What etcd answers before applying anything: a write answered so was not written.
_REFUSED_UNAPPLIED = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT,
                      grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


def _auth_hint(error: grpc.aio.AioRpcError, config: EtcdConfig) -> str:
    """What to do about a refusal by etcd's authentication, if it is one."""
    details = error.details() or ""
    if "user name is empty" in details:
        return (f" (its authentication is on: give a user and password, {ENV_USERNAME} and "
                f"{ENV_PASSWORD})")
    if "authentication failed" in details:
        return f" (for user {config.username!r}: check {ENV_USERNAME} and {ENV_PASSWORD})"
    if "permission denied" in details:
        who = f"user {config.username!r}" if config.username else "the etcd user"
        return (f" ({who} needs read and write on /pipit/: etcdctl role grant-permission "
                "ROLE --prefix=true readwrite /pipit/)")
    return ""


def _reason(error: grpc.aio.AioRpcError, timeout: float) -> str:
    """Why a call found no etcd, in a few words (gRPC's details name the last address)."""
    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer within {timeout:g} s"
    details = error.details() or ""
    for marker, what in _TLS_FAILURES:
        if marker.lower() in details.lower():
            return what
    if "timed out" in details:  # the connection attempt, before etcd's first words
        return f"no answer within {timeout:g} s"
    last = details.rsplit(": ", 1)[-1].rstrip(".")  # "...: Connection refused"
    return last[:1].lower() + last[1:] if last else "unreachable"


async def _probe(config: EtcdConfig, endpoint: str) -> str:
    """Why `endpoint` alone does not answer (or that it does now)."""
    alone = replace(config, endpoints=(endpoint,), timeout=min(config.timeout, PROBE_TIMEOUT))
    client = _Client(alone)
    try:
        await client.connect()
        await client.authenticate()
        await client.kvstub.Range(rpc.RangeRequest(key=b"/pipit/", limit=1, keys_only=True),
                                  timeout=alone.timeout, metadata=client.auth_metadata)
        return "it answers when asked alone"
    except grpc.aio.AioRpcError as error:
        return _reason(error, alone.timeout)
    except DatastoreUnavailable:  # raised by connect() only for a name that does not resolve
        return "its host name does not resolve"
    finally:
        try:
            await client.close()
        except Exception:
            pass


@dataclass(frozen=True)
class Entry:
    key: str
    value: dict
    mod_revision: int
    lease: int = 0  # the etcd lease the key lives by (0: none, it stays until deleted)


@dataclass
class TxnResult:
    succeeded: bool
    revision: int
    # On failure: the current entry (or None) of every expected key.
    current: dict[str, Entry | None] = field(default_factory=dict)
    # ... and the entries under every prefix expected unchanged (read at `revision`)
    current_prefixes: dict[str, list[Entry]] = field(default_factory=dict)


def _entry(kv) -> Entry:
    """An entry with its JSON value decoded; a value that is not JSON (written by something
    else) comes as None, for the reader to refuse, instead of failing a whole listing."""
    try:
        value = json.loads(kv.value)
    except ValueError:
        value = None
    return Entry(kv.key.decode(), value, kv.mod_revision, kv.lease)


def encode(value: Mapping) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _range_end(prefix: bytes) -> bytes:
    return aetcd.utils.prefix_range_end(prefix)


class Store:
    """A connection to etcd. Use `async with Store(config) as store:`."""

    def __init__(self, config: EtcdConfig):
        self.config = config
        self._client = _Client(config)

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        try:
            await self._client.close()
        except Exception:  # closing a channel that never connected
            pass

    async def _call(self, method: str, request, timeout: float | None = None,
                    writes: bool = False, service: str = "KV"):
        await self._client.connect()
        generation = self._client.generation
        timeout = self.config.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            return await self._with_token(
                lambda: self._call_groups(method, request, service, deadline))
        except grpc.aio.AioRpcError as error:
            failure = await self._unavailable(error, timeout)
            failure.maybe_written = (writes and not _never_sent(error)
                                     and error.code() not in _REFUSED_UNAPPLIED)
            if _never_sent(error):
                await self._client.reconnect_if_names_were_left_out(generation)
        except asyncio.TimeoutError:
            failure = DatastoreUnavailable(
                f"etcd at {self.config.describe()} did not answer within {timeout:g} s.")
            failure.maybe_written = writes
        raise failure

    async def _with_token(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """attempt(), carrying the user's token (none without a user); once more with a new
        token if etcd refused that one (_token_refused)."""
        if not self.config.username:  # most clusters' etcd: not a step for them
            return await attempt()
        await self._client.authenticate()
        token = self._client.token
        try:
            return await attempt()
        except grpc.aio.AioRpcError as error:
            if not _token_refused(error, self.config):
                raise
        await self._client.authenticate(stale=token)
        return await attempt()

    async def _call_groups(self, method: str, request, service: str, deadline: float):
        """The call on each group of endpoints in turn until one answers (or refuses)."""
        loop = asyncio.get_running_loop()
        groups = self._client.groups_in_turn()
        for index, stub in groups:
            if service != "KV":
                stub = getattr(rpc, f"{service}Stub")(self._client.channels[index])
            try:
                response = await getattr(stub, method)(
                    request, timeout=max(0.0, deadline - loop.time()),
                    metadata=self._client.auth_metadata)
            except grpc.aio.AioRpcError as error:
                if (index == groups[-1][0] or not _never_sent(error)
                        or loop.time() >= deadline):
                    raise
                continue  # that group's members are all away: the next
            self._client.answered(index)
            return response

    async def _unavailable(self, error: grpc.aio.AioRpcError,
                           timeout: float | None = None) -> DatastoreUnavailable:
        """One sentence for a failed call; with several endpoints that none answered, each
        is asked alone so that the sentence says why each failed (gRPC keeps only the last
        reason)."""
        ETCD_UNAVAILABLE.inc()
        where = self.config.describe()
        code = error.code()
        timeout = self.config.timeout if timeout is None else timeout
        single = len(self.config.endpoints) == 1
        connected = self._client.channel.get_state() == grpc.ChannelConnectivity.READY
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and (connected or single):
            return DatastoreUnavailable(f"etcd at {where} did not answer within {timeout:g} s.")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "space exceeded" in (error.details()
                                                                              or ""):
            # writes refused until an operator frees space: not the caller's doing, and over
            # once they have (so the agent waits for it, as for an etcd away)
            return DatastoreUnavailable(
                f"etcd at {where} is full ({error.details()}): it takes no write until its "
                "history is compacted, its members defragmented and its NOSPACE alarm disarmed "
                "(etcdctl compact, etcdctl defrag, etcdctl alarm disarm).")
        if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            refused = DatastoreUnavailable(
                f"etcd at {where} refused the request: {error.details() or code.name}"
                f"{_auth_hint(error, self.config)}.")
            refused.refused = True
            return refused
        if single:
            return DatastoreUnavailable(f"cannot reach etcd at {where}: "
                                        f"{_reason(error, timeout)}.")
        reasons = await asyncio.gather(*(_probe(self.config, endpoint)
                                         for endpoint in self.config.endpoints))
        tried = [f"{endpoint} ({reason})" for endpoint, reason in
                 zip(self.config.endpoints, reasons)]
        return DatastoreUnavailable(f"cannot reach etcd at any of its {len(tried)} endpoints: "
                                    f"{', '.join(tried[:-1])} and {tried[-1]}.")

    async def get(self, key: str) -> Entry | None:
        response = await self._call("Range", rpc.RangeRequest(key=key.encode()))
        return _entry(response.kvs[0]) if response.kvs else None

    async def get_many(self, keys: Iterable[str]) -> dict[str, Entry | None]:
        """Several keys in one round trip (a read-only transaction)."""
        keys = list(dict.fromkeys(keys))
        if not keys:
            return {}
        result: dict[str, Entry | None] = {}
        for start in range(0, len(keys), 100):
            chunk = keys[start:start + 100]
            ops = [rpc.RequestOp(request_range=rpc.RangeRequest(key=k.encode())) for k in chunk]
            response = await self._call("Txn", rpc.TxnRequest(success=ops))
            for key, op in zip(chunk, response.responses):
                kvs = op.response_range.kvs
                result[key] = _entry(kvs[0]) if kvs else None
        return result

    async def list(self, prefix: str) -> list[Entry]:
        return (await self.list_with_revision(prefix))[0]

    async def list_with_revision(self, prefix: str) -> tuple[list[Entry], int]:
        """Every entry under prefix, and the store revision they were read at."""
        raw = prefix.encode()
        response = await self._call("Range", rpc.RangeRequest(key=raw, range_end=_range_end(raw)))
        return [_entry(kv) for kv in response.kvs], response.header.revision

    async def watch(self, prefix: str, start_revision: int
                    ) -> AsyncIterator[list[tuple[str, Entry | None]]]:
        """Changes under prefix from start_revision on, one list per etcd revision: (key,
        new entry) or (key, None) for a deletion. Ends with DatastoreUnavailable when the
        stream breaks (etcd restarted, revision compacted): list again and resume."""
        await self._client.connect()
        try:
            await self._client.authenticate()
        except grpc.aio.AioRpcError as error:
            raise await self._unavailable(error) from None
        raw = prefix.encode()
        create = rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=raw, range_end=_range_end(raw), start_revision=start_revision))
        closed = asyncio.Event()

        async def requests():
            yield create
            await closed.wait()  # half-closing the stream would end the watch

        call = rpc.WatchStub(self._client.channel).Watch(requests(),
                                                         metadata=self._client.auth_metadata)
        try:
            async for response in call:
                if response.compact_revision:
                    raise DatastoreUnavailable(f"the etcd history before revision "
                                               f"{response.compact_revision} is compacted.")
                if response.canceled:
                    raise DatastoreUnavailable(f"etcd canceled the watch of {prefix}: "
                                               f"{response.cancel_reason or 'no reason given'}.")
                if response.events:
                    yield [(e.kv.key.decode(),
                            _entry(e.kv) if e.type == rpc.Event.PUT else None)
                           for e in response.events]
        except grpc.aio.AioRpcError as error:
            if _token_refused(error, self.config):  # a new token, for the caller's next listing
                with contextlib.suppress(grpc.aio.AioRpcError):  # (that says why, if need be)
                    await self._client.authenticate(stale=self._client.token)
                raise DatastoreUnavailable(f"etcd refused the watch of {prefix}: "
                                           f"{error.details()}.") from None
            raise await self._unavailable(error) from None
        finally:
            closed.set()
            call.cancel()

    async def list_keys(self, prefix: str) -> list[str]:
        raw = prefix.encode()
        response = await self._call(
            "Range", rpc.RangeRequest(key=raw, range_end=_range_end(raw), keys_only=True))
        return [kv.key.decode() for kv in response.kvs]

    async def txn(self, expect: Mapping[str, int], put: Mapping[str, Mapping] = {},
                  delete: Iterable[str] = (), lease: int = 0,
                  unchanged_since: Mapping[str, int] = {}) -> TxnResult:
        """Apply all puts and deletes if every key in `expect` still has that mod_revision
        (0: absent) and no key under a prefix in `unchanged_since` was written after that
        revision (one deleted since is not seen); the keys put live by `lease` (0: none)."""
        compare = [rpc.Compare(key=k.encode(), target=rpc.Compare.MOD,
                               result=rpc.Compare.EQUAL, mod_revision=rev)
                   for k, rev in expect.items()]
        compare += [rpc.Compare(key=p.encode(), range_end=_range_end(p.encode()),
                                target=rpc.Compare.MOD, result=rpc.Compare.LESS,
                                mod_revision=rev + 1)
                    for p, rev in unchanged_since.items()]
        success = [rpc.RequestOp(request_put=rpc.PutRequest(key=k.encode(), value=encode(v),
                                                             lease=lease))
                   for k, v in put.items()]
        success += [rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=k.encode()))
                    for k in delete]
        failure = [rpc.RequestOp(request_range=rpc.RangeRequest(key=k.encode())) for k in expect]
        failure += [rpc.RequestOp(request_range=rpc.RangeRequest(
            key=p.encode(), range_end=_range_end(p.encode()))) for p in unchanged_since]
        response = await self._call(
            "Txn", rpc.TxnRequest(compare=compare, success=success, failure=failure),
            writes=True)
        result = TxnResult(response.succeeded, response.header.revision)
        ETCD_TRANSACTIONS.labels("committed" if response.succeeded else "conflict").inc()
        if not response.succeeded:
            answers = iter(response.responses)
            for key, op in zip(expect, answers):
                kvs = op.response_range.kvs
                result.current[key] = _entry(kvs[0]) if kvs else None
            for prefix, op in zip(unchanged_since, answers):
                result.current_prefixes[prefix] = [_entry(kv) for kv in op.response_range.kvs]
        return result

    async def transaction(self, compare: list, success: list) -> tuple[bool, int]:
        """A transaction of etcd's own comparisons and operations (range comparisons, for
        pipitctl.commit): whether its comparisons held, and the revision it was decided at."""
        response = await self._call("Txn", rpc.TxnRequest(compare=compare, success=success),
                                    writes=True)
        return response.succeeded, response.header.revision

    async def put(self, key: str, value: Mapping, timeout: float | None = None) -> int:
        """Unconditional write (tests, tools, the allocator's fence); returns the new
        mod_revision."""
        response = await self._call("Put", rpc.PutRequest(key=key.encode(), value=encode(value)),
                                    timeout, writes=True)
        return response.header.revision

    async def grant_lease(self, ttl: int) -> int:
        """A new lease of `ttl` seconds: its id."""
        response = await self._call("LeaseGrant", rpc.LeaseGrantRequest(TTL=ttl),
                                    writes=True, service="Lease")
        return response.ID

    async def keep_lease_alive(self, lease: int) -> int:
        """Renew a lease: the seconds it has again, 0 if it has lapsed (its keys are gone)."""
        await self._client.connect()
        try:
            return await self._with_token(lambda: self._keep_alive(lease))
        except grpc.aio.AioRpcError as error:
            raise await self._unavailable(error) from None

    async def _keep_alive(self, lease: int) -> int:
        call = rpc.LeaseStub(self._client.channel).LeaseKeepAlive(
            iter([rpc.LeaseKeepAliveRequest(ID=lease)]), timeout=self.config.timeout,
            metadata=self._client.auth_metadata)
        try:
            async for response in call:
                return response.TTL
            return 0
        finally:
            call.cancel()

    async def revoke_lease(self, lease: int, timeout: float | None = None) -> None:
        """End a lease now, deleting its keys (one that lapsed already: nothing to do)."""
        try:
            await self._call("LeaseRevoke", rpc.LeaseRevokeRequest(ID=lease), timeout,
                             writes=True, service="Lease")
        except DatastoreUnavailable as error:
            if "lease not found" not in str(error):
                raise

    async def snapshot(self, prefix: str = "/pipit/") -> dict[str, dict]:
        """Every key and value under prefix (for checks and tests)."""
        return {e.key: e.value for e in await self.list(prefix)}
