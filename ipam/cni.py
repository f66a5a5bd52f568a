"""pipit-ipam: the CNI IPAM plugin (CNI spec 1.1 / 1.0, and the 0.3-0.4 result format).

The reference plugins (`ptp`, `bridge`) call it with `"ipam": {"type": "pipit-ipam", ...}`;
it asks the node's pipit-agent over a unix socket and prints the result. It imports only the
standard library, so it starts in milliseconds and can be copied alone into a CNI bin
directory (`python -m ipam.cni install DIR`).

ipam.cni_install puts two executables there: `pipit-ipam`, a small native front (cni_shim.c)
that hands each call whole to the agent, which runs `plan` below around its own handler, and
this module as `pipit-ipam-python`. The front answers VERSION and an agent it cannot reach (or
that does not answer in time) itself, in the words of `exchange` below, since Kubernetes
hosts have no Python; it executes `pipit-ipam-python` only for input it cannot read, so every
other error is worded here. A runtime starts one plugin process per pod: the native front
starts in well under 1 ms, an interpreter in ~8.

IPAM section:  {"type": "pipit-ipam", "socket": PATH, "pools": [NAMES], "routes": [...],
                "timeout": SECONDS}

`timeout` (default 30) bounds the whole call, whichever front runs it: a refused connect
(the agent's queue full) is retried within it, an agent that does not answer in time gets
code 11 and is never asked a second time, and the agent, told how long is left, answers
before then and keeps nothing for an ADD it could not answer.

Start-up is most of a pod's ADD here, so the plugin imports only what the interpreter has
loaded anyway plus the C halves of `os`, `json`, `socket` and `struct`: `import json,
socket, re` alone pulls in re, enum, functools, collections and selectors and costs ~20 ms
per call, `os` ~2 ms (see bench/README.md).
"""

import posix
import sys
from time import monotonic

try:  # CPython's C parts of json, socket and struct (the modules minus their imports)
    import _socket
    import _struct
    from _json import encode_basestring_ascii as _encode_string
    from _json import make_encoder as _make_encoder
    from _json import make_scanner as _make_scanner
except ImportError:  # another Python: the plain modules
    import socket as _socket
    import struct as _struct
    _make_scanner = None

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
DEFAULT_SOCKET = "/run/pipit/ipam.sock"
TIMEOUT = 30.0  # seconds for the whole call, unless ipam.timeout says otherwise
MAX_TIMEOUT = 600.0
IPAM_FIELDS = {"type", "socket", "pools", "routes", "timeout"}

# CNI error codes (spec "Error codes"); 100 and up are Pipit's own.
INCOMPATIBLE_VERSION, UNSUPPORTED_FIELD, UNKNOWN_CONTAINER = 1, 2, 3
INVALID_ENVIRONMENT, IO_FAILURE, DECODE_FAILURE, INVALID_CONFIG = 4, 5, 6, 7
TRY_AGAIN_LATER, NOT_AVAILABLE = 11, 50
POOL_EXHAUSTED, NO_SUCH_POOL, CHECK_MISMATCH = 100, 101, 102

_AGENT_ERRORS = {  # the agent's error kinds -> CNI codes
    "MalformedRequest": DECODE_FAILURE,
    "PoolExhausted": POOL_EXHAUSTED,
    "NotFound": NO_SUCH_POOL,
    "DatastoreUnavailable": TRY_AGAIN_LATER,
    "Conflict": TRY_AGAIN_LATER,
    "InvalidResource": INVALID_CONFIG,
}


if _make_scanner is not None:
    class _Decoding:  # the settings _json's scanner reads from a json.JSONDecoder
        strict = True
        object_hook = object_pairs_hook = None
        parse_float, parse_int = float, int

        def __init__(self):
            self.parse_constant = self._refuse

        @staticmethod
        def _refuse(name: str):
            raise ValueError(f"{name} is not a JSON number")

    _scan = _make_scanner(_Decoding())
    _WHITESPACE = " \t\n\r"

    def _loads(text: str | bytes):
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        start = len(text) - len(text.lstrip(_WHITESPACE))
        try:
            value, end = _scan(text, start)
            if not text[end:].strip(_WHITESPACE):
                return value
        except (StopIteration, SystemError):  # (_json reports errors through json.decoder)
            pass
        import json  # malformed: the slow path, for json's own words on what is wrong
        return json.loads(text)

    def _unencodable(value):
        raise TypeError(f"{type(value).__name__} is not JSON serializable")

    _encode = _make_encoder(None, _unencodable, _encode_string, None, ": ", ", ", False, False,
                            False)

    def dumps(value) -> str:
        """json.dumps (without importing json)."""
        return "".join(_encode(value, 0))
else:
    from json import dumps
    from json import loads as _loads


def loads(text: str | bytes):
    """json.loads for one document (without importing json); ValueError also for nesting
    deeper than the interpreter's recursion allows."""
    try:
        return _loads(text)
    except RecursionError:
        raise ValueError("the JSON nests too deeply") from None


class CNIError(Exception):
    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


# What the spec allows in a network name and a container ID (libcni's ValidateNetworkName and
# ValidateContainerID), as sets so that the plugin needs no `re`.
_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_ID_CHARS = _ALNUM | frozenset("_.-")
_PLAIN = _ALNUM | frozenset("_-")  # kept as they are in a handle; anything else is escaped
HANDLE_MAX = 253  # ipam.handle's bound on a handle's length
_NETWORK_MAX = 64  # a longer network name is cut and hashed in handles
_HASH_HEX = 32  # 128 bits of SHA-256 name what did not fit


def _spec_id(value: str) -> bool:
    return bool(value) and value[0] in _ALNUM and all(c in _ID_CHARS for c in value)


def _escape(part: str) -> str:
    """`part` with '.' (the handle's separator) and everything outside [A-Za-z0-9_-] written
    as ':xx' per UTF-8 byte, so that no two parts escape alike and no escaped part holds a
    '.'. Common names (pipit-net, 64 hex digits, eth0) stay as they are."""
    return "".join(c if c in _PLAIN else "".join(f":{b:02x}" for b in c.encode())
                   for c in part)


def _digest(*parts: str) -> str:
    import hashlib  # only for names too long to write out: not on the common path
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:_HASH_HEX]


def handle_prefix(network: str) -> str:
    """What every handle of `network` starts with, and no handle of another network: the
    escaped name (cut and hashed past 64 characters) and a '.'."""
    escaped = _escape(network)
    if len(escaped) > _NETWORK_MAX:  # '::' never occurs in an escaped part
        escaped = f"{_escape(network[:32])[:40]}::{_digest(network)}"
    return escaped + "."


def handle_id(network: str, container_id: str, ifname: str) -> str:
    """One handle per attachment (network, container, interface), as the spec keys them, and
    a different handle for every different attachment: the parts escaped (`_escape`) and
    joined with '.'; when that exceeds 253 characters, the container and interface are
    written as a cut of the container ID and a hash of both."""
    prefix = handle_prefix(network)
    rest = f"{_escape(container_id)}.{_escape(ifname)}"
    if len(prefix) + len(rest) > HANDLE_MAX:
        rest = f"{_escape(container_id[:64])[:80]}::{_digest(container_id, ifname)}"
    return prefix + rest


def floating_handle(handle: str) -> str:
    """The handle of an attachment's floating IPs: its own with '.floating' after it (the
    handle of no attachment), or, past HANDLE_MAX, a cut of it and a hash."""
    name = f"{handle}.floating"
    if len(name) > HANDLE_MAX:
        name = f"{handle[:200]}::{_digest(handle)}.floating"
    return name


def check_network(network: str) -> None:
    if not _spec_id(network):
        raise CNIError(INVALID_CONFIG, f"the network name {network!r} is not valid: it must "
                       "start with a letter or digit, followed by letters, digits, '_', '.' "
                       "or '-'.")


def check_attachment(network: str, env: dict) -> None:
    """Refuse what the spec forbids in the names a handle is made of, so that a runtime bug
    gets an error rather than a guess."""
    check_network(network)
    container_id, ifname = env["CNI_CONTAINERID"], env["CNI_IFNAME"]
    if not _spec_id(container_id):
        raise CNIError(INVALID_ENVIRONMENT, f"CNI_CONTAINERID {container_id!r} is not a valid "
                       "container ID: it must start with a letter or digit, followed by "
                       "letters, digits, '_', '.' or '-'.")
    if (len(ifname.encode()) > 15 or ifname in (".", "..")
            or any(c == "/" or c == ":" or c.isspace() for c in ifname)):
        raise CNIError(INVALID_ENVIRONMENT, f"CNI_IFNAME {ifname!r} is not a valid interface "
                       "name: at most 15 bytes, not '.' or '..', without '/', ':' or spaces.")


def _check_utf8(env: dict, stdin: str) -> None:
    """Bytes that are not UTF-8 (decoded with surrogateescape) are refused, never folded:
    folding would make two different names one."""
    for name, value in env.items():
        if name.startswith("CNI_") and not _encodable(value):
            raise CNIError(INVALID_ENVIRONMENT, f"the environment variable {name} is not valid "
                           "UTF-8.")
    if not _encodable(stdin):
        raise CNIError(DECODE_FAILURE, "the network configuration on stdin is not valid "
                       "UTF-8.")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_cni_args(text: str) -> dict[str, str]:
    pairs = (item.split("=", 1) for item in text.split(";") if "=" in item)
    return {k.strip(): v.strip() for k, v in pairs}


def read_config(raw: str) -> dict:
    try:
        config = loads(raw)
    except ValueError as error:
        raise CNIError(DECODE_FAILURE, "the network configuration on stdin is not valid JSON.",
                       str(error)) from None
    if not isinstance(config, dict):
        raise CNIError(DECODE_FAILURE, "the network configuration on stdin is not a JSON object.")
    version = config.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(INCOMPATIBLE_VERSION,
                       f"pipit-ipam does not support cniVersion {version!r}.",
                       f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    ipam = config.get("ipam")
    if not isinstance(ipam, dict):
        raise CNIError(INVALID_CONFIG, "the network configuration has no ipam section.")
    unknown = sorted(set(ipam) - IPAM_FIELDS)
    if unknown:
        raise CNIError(UNSUPPORTED_FIELD, f"pipit-ipam does not know the ipam field "
                       f"{unknown[0]!r}.", f"known: {', '.join(sorted(IPAM_FIELDS))}")
    pools = ipam.get("pools", [])
    if not isinstance(pools, list) or not all(isinstance(p, str) and p for p in pools):
        raise CNIError(INVALID_CONFIG, "ipam.pools must be a list of IP pool names.")
    routes = ipam.get("routes", [{"dst": "0.0.0.0/0"}])
    if not isinstance(routes, list) or not all(isinstance(r, dict) and "dst" in r
                                               for r in routes):
        raise CNIError(INVALID_CONFIG, 'ipam.routes must be a list of {"dst": CIDR} objects.')
    if not isinstance(ipam.get("socket", DEFAULT_SOCKET), str):
        raise CNIError(INVALID_CONFIG, "ipam.socket must be a path.")
    timeout = ipam.get("timeout", TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not 0 < timeout <= MAX_TIMEOUT:
        raise CNIError(INVALID_CONFIG, "ipam.timeout must be a number of seconds, more than 0 "
                       f"and at most {MAX_TIMEOUT:g}.")
    return config


def require_env(env: dict, *names: str) -> None:
    missing = [n for n in names if not env.get(n)]
    if missing:
        raise CNIError(INVALID_ENVIRONMENT, f"the environment variable {missing[0]} is not set.",
                       f"missing: {', '.join(missing)}")


def ask_agent(path: str, request: dict, timeout: float = TIMEOUT) -> dict:
    """One request to the node's pipit-agent; its errors become CNI errors."""
    return agent_reply(exchange(path, request, timeout), path)


def exchange(path: str, request: dict, timeout: float = TIMEOUT) -> dict:
    """One request to the node's pipit-agent and its answer as sent (errors included), all
    within `timeout` seconds; the request tells the agent how long is left."""
    deadline = monotonic() + timeout

    def left() -> float:
        remaining = deadline - monotonic()
        if remaining <= 0:
            raise TimeoutError
        return remaining

    try:
        conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            _connect(conn, path, left())
            conn.settimeout(left())
            conn.sendall(dumps({**request, "timeout": round(left(), 3)}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                conn.settimeout(left())
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
        finally:
            conn.close()
    except TimeoutError:
        raise CNIError(TRY_AGAIN_LATER, f"pipit-agent did not answer on {path} within "
                       f"{timeout:g} s.") from None
    except OSError as error:
        reason = (error.strerror or str(error)).lower()
        raise CNIError(TRY_AGAIN_LATER, f"pipit-agent is not reachable on {path} ({reason}); "
                       "is it running on this node?") from None
    if not data:  # it went away mid-request (stopped, crashed): the outcome is for a retry
        raise CNIError(TRY_AGAIN_LATER, f"pipit-agent on {path} closed the connection without "
                       "an answer (did it stop or restart?); try again.")
    try:
        reply = loads(data)
        if not isinstance(reply, dict):
            raise ValueError
    except ValueError:
        raise CNIError(IO_FAILURE, f"pipit-agent on {path} sent an answer that is not JSON.",
                       data[:200].decode(errors="replace")) from None
    return reply


def _connect(conn, path: str, timeout: float) -> None:
    """Connect, waiting up to `timeout` while the agent's listen queue is full (a burst of
    pods): a blocking connect with a send timeout sleeps in the kernel until there is room,
    where a non-blocking one would be refused at once (EAGAIN)."""
    seconds = int(timeout)
    micro = max(int((timeout - seconds) * 1e6), 0 if seconds else 1)  # (0, 0): no timeout
    conn.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDTIMEO, _struct.pack("ll", seconds, micro))
    try:
        conn.connect(path)
    except BlockingIOError:  # still full at the deadline
        raise TimeoutError from None


def agent_reply(reply: dict, path: str) -> dict:
    """The agent's answer, or its error as a CNI error."""
    error = reply.get("error")
    if error:
        raise CNIError(_AGENT_ERRORS.get(error.get("kind"), IO_FAILURE), error.get("msg", ""),
                       error.get("kind", ""))
    return reply


def cni_result(version: str, ips: list[dict], routes: list[dict]) -> dict:
    """The IPAM result in the format of the requested CNI version."""
    entries = []
    for ip in ips:
        if ip.get("gateway") is None:
            raise CNIError(INVALID_CONFIG,
                           f"address {ip['address']} comes from a /{ip['prefix']} block, too "
                           "small for a gateway; ptp and bridge need pools with a blockSize of "
                           "30 or less.")
        entry = {"address": f"{ip['address']}/{ip['prefix']}", "gateway": ip["gateway"]}
        if version.startswith("0."):
            entry["version"] = "4"
        entries.append(entry)
    return {"cniVersion": version, "ips": entries, "routes": routes, "dns": {}}


def plan(command: str, env: dict, stdin: str):
    """One CNI call as (socket path, request for the agent or None, finish): `finish` takes
    the agent's answer as sent (its errors included) and returns the result to print (None:
    print nothing) or raises CNIError. No I/O: the plugin runs it around a socket exchange
    (`run`), the agent around its own handler (the native plugin's calls)."""
    if command == "VERSION":
        return DEFAULT_SOCKET, None, lambda _: {"cniVersion": SUPPORTED_VERSIONS[-1],
                                                "supportedVersions": list(SUPPORTED_VERSIONS)}
    if command not in ("ADD", "DEL", "CHECK", "STATUS", "GC"):
        raise CNIError(INVALID_ENVIRONMENT, f"CNI_COMMAND {command!r} is not one of ADD, DEL, "
                       "CHECK, STATUS, GC, VERSION." if command else
                       "the environment variable CNI_COMMAND is not set.")
    _check_utf8(env, stdin)
    config = read_config(stdin)
    version, ipam = config["cniVersion"], config["ipam"]
    path = ipam.get("socket", DEFAULT_SOCKET)
    timeout = ipam.get("timeout", TIMEOUT)  # the whole call's; the agent is told what is left
    network = str(config.get("name") or "")

    def nothing(reply: dict) -> None:
        agent_reply(reply, path)

    if command == "STATUS":
        def available(reply: dict) -> None:
            try:
                agent_reply(reply, path)
            except CNIError as error:
                raise CNIError(NOT_AVAILABLE, error.msg, error.details) from None
            if not reply.get("pools"):
                raise CNIError(NOT_AVAILABLE, "no enabled IP pool exists yet.")
        return path, {"command": "STATUS", "timeout": timeout}, available
    if command == "GC":
        # Without the list every attachment would look stale: refuse rather than release all.
        # ("cni.dev/attachments" is the same list under the name an early 1.1 draft used.)
        attachments = config.get("cni.dev/valid-attachments", config.get("cni.dev/attachments"))
        if not isinstance(attachments, list) or not all(isinstance(a, dict)
                                                        for a in attachments):
            raise CNIError(INVALID_CONFIG, "GC needs cni.dev/valid-attachments, a list of "
                           '{"containerID", "ifname"} objects; nothing was released.')
        check_network(network)
        valid = [handle_id(network, str(a.get("containerID", "")), str(a.get("ifname", "")))
                 for a in attachments]
        return path, {"command": "GC", "prefix": handle_prefix(network), "valid": valid,
                      "timeout": timeout}, nothing
    require_env(env, "CNI_CONTAINERID", "CNI_IFNAME",
                *(("CNI_NETNS",) if command == "ADD" else ()))
    check_attachment(network, env)
    handle = handle_id(network, env["CNI_CONTAINERID"], env["CNI_IFNAME"])
    if command == "DEL":
        return path, {"command": "DEL", "handle": handle, "timeout": timeout}, nothing
    if command == "CHECK":
        def matches(reply: dict) -> None:
            held = agent_reply(reply, path)["ips"]
            if not held:
                raise CNIError(UNKNOWN_CONTAINER, f"container {env['CNI_CONTAINERID']} has no "
                               "address from pipit-ipam.")
            expected = {ip.get("address")
                        for ip in (config.get("prevResult") or {}).get("ips", [])}
            have = {f"{ip['address']}/{ip['prefix']}" for ip in held}
            if expected and expected != have:
                raise CNIError(CHECK_MISMATCH, f"container {env['CNI_CONTAINERID']} holds "
                               f"{', '.join(sorted(have))}, not {', '.join(sorted(expected))}.")
        return path, {"command": "CHECK", "handle": handle, "timeout": timeout}, matches
    args = parse_cni_args(env.get("CNI_ARGS", ""))
    attributes = {"containerID": env["CNI_CONTAINERID"], "ifname": env["CNI_IFNAME"]}
    if args.get("K8S_POD_NAMESPACE"):
        attributes["namespace"] = args["K8S_POD_NAMESPACE"]
    if args.get("K8S_POD_NAME"):
        attributes["pod"] = args["K8S_POD_NAME"]

    def result(reply: dict) -> dict:
        return cni_result(version, agent_reply(reply, path)["ips"],
                          ipam.get("routes", [{"dst": "0.0.0.0/0"}]))
    return path, {"command": "ADD", "handle": handle, "pools": ipam.get("pools", []),
                  "attributes": attributes, "timeout": timeout}, result


def run(command: str, env: dict, stdin: str) -> dict | None:
    """One CNI call, asking the agent over its socket."""
    path, request, finish = plan(command, env, stdin)
    if request is None:
        return finish({})
    try:
        reply = exchange(path, request, request["timeout"])
    except CNIError as error:  # STATUS: "not available" is the one answer for any failure
        if command == "STATUS":
            raise CNIError(NOT_AVAILABLE, error.msg, error.details) from None
        raise
    return finish(reply)


def error_output(error: CNIError, stdin: str) -> dict:
    """The spec's error JSON for `error`, in the cniVersion the caller asked for if known."""
    out = {"cniVersion": _version_of(stdin), "code": error.code, "msg": error.msg}
    if error.details:
        out["details"] = error.details
    return out


def main() -> None:
    env = {k.decode(errors="surrogateescape"): v.decode(errors="surrogateescape")
           for k, v in posix.environ.items()}  # what os.environ holds
    stdin = ("" if env.get("CNI_COMMAND") == "VERSION"
             else sys.stdin.buffer.read().decode("utf-8", "surrogateescape"))  # bad: a 6
    try:
        result = run(env.get("CNI_COMMAND", ""), env, stdin)
    except CNIError as error:
        sys.stdout.write(dumps(error_output(error, stdin)) + "\n")
        sys.exit(1)
    if result is not None:
        sys.stdout.write(dumps(result) + "\n")


def _version_of(stdin: str) -> str:
    try:
        version = loads(stdin).get("cniVersion")
    except (ValueError, AttributeError):
        version = None
    return version if version in SUPPORTED_VERSIONS else SUPPORTED_VERSIONS[-1]


if __name__ == "__main__":
    if sys.argv[1:2] == ["install"]:  # `python -m ipam.cni install DIR`, as documented
        from ipam.cni_install import install_main
        install_main(sys.argv[2:])
    else:
        main()
