"""pipit-ipam on its own, as a main plugin delegates to it: the installed standalone copy run
with CNI_* variables and a network configuration on stdin, against a real pipit-agent and a
real etcd. Every failure must give the right CNI code, a sentence a person can act on, JSON
on stdout with exit status 1, and leave nothing allocated for the container. (No root needed:
pipit-ipam touches no network namespace.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipam import cni
from ipam.cni import SUPPORTED_VERSIONS, handle_id
from ipam.cni_install import PYTHON_PLUGIN, install
from ipam.snapshot import check
from ipam.store import EtcdConfig
from lab.cni import Invocation
from lab.process import wait
from tests.tcp_proxy import TCPProxy
from tests.cni_support import (
    DEFAULT_POOL,
    NET,
    Plugin,
    add_pools,
    holder,
    holdings,
    new_container_id,
    pipitctl_in_use,
    snapshot,
    start_agent,
    used,
)
from tests.sentences import one_sentence

@pytest.fixture(scope="module", params=["native", "python"])
def cni_bin(request) -> Path:
    """A CNI bin directory holding just the installed pipit-ipam: the native front with the
    Python plugin beside it, or the Python plugin alone (--no-native). Every test runs with
    both: they must give the same answers and the same errors."""
    directory = Path(tempfile.mkdtemp(prefix="pipit-t-ipam-bin-"))
    try:
        install(str(directory), native=request.param == "native")
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def agent(etcd, short_dir):
    add_pools(etcd, DEFAULT_POOL)
    agent = start_agent(etcd, short_dir)
    try:
        yield agent
    finally:
        agent.stop()


@pytest.fixture
def ipam(cni_bin, agent) -> Plugin:
    return Plugin(cni_bin, agent)


def fails(run: Invocation, code: int, *facts: str) -> dict:
    """The plugin failed as the spec says: exit 1, error JSON on stdout; and said why."""
    assert run.returncode == 1, run
    error = json.loads(run.stdout)
    assert error["code"] == code, error
    assert error["cniVersion"] in SUPPORTED_VERSIONS
    one_sentence(error["msg"], *facts, max_length=299)
    return error


def nothing_held(etcd: EtcdConfig, *container_ids: str) -> None:
    snap = snapshot(etcd)
    for container_id in container_ids:
        assert holdings(snap, container_id) == []
    assert check(snap) == []


# --------------------------------------------------------------------------------------------
# The plugin's own JSON (the C halves of json, to start fast) against the json module

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=20)


@given(JSON)
def test_plugin_json_reads_and_writes_what_the_json_module_does(value):
    import json
    text = json.dumps(value)
    assert cni.loads(text) == json.loads(text)
    assert cni.loads(f" \n{text}\t ".encode()) == json.loads(text)
    assert json.loads(cni.dumps(value)) == value
    assert cni.dumps(value) == json.dumps(value)


@pytest.mark.parametrize("text", ["", "{", '{"a": 1} x', "[1,]", "NaN", '{"a": Infinity}',
                                  '"\\ud800', "\xff"])
def test_plugin_json_refuses_what_is_not_json(text):
    with pytest.raises(ValueError):
        cni.loads(text)


# --------------------------------------------------------------------------------------------
# Handles: one per attachment, never shared by two

SPEC_ID = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,300}", fullmatch=True)
IFNAME = st.text(st.characters(blacklist_characters="/:", blacklist_categories=("Cs", "Zs")),
                 min_size=1, max_size=15).filter(lambda n: len(n.encode()) <= 15
                                                 and n not in (".", ".."))


@settings(max_examples=400)
@given(st.tuples(SPEC_ID, SPEC_ID, IFNAME), st.tuples(SPEC_ID, SPEC_ID, IFNAME))
def test_two_attachments_never_share_a_handle(one, two):
    """Injective in (network, container, interface); always a valid handle; and GC's prefix
    of one network never takes another network's handles."""
    from ipam.handle import check_handle_id
    first, second = handle_id(*one), handle_id(*two)
    assert check_handle_id(first) == first
    assert (first == second) == (one == two)
    assert first.startswith(cni.handle_prefix(one[0]))
    assert second.startswith(cni.handle_prefix(one[0])) == (one[0] == two[0])


@settings(max_examples=400)
@given(st.tuples(SPEC_ID, SPEC_ID, IFNAME), st.tuples(SPEC_ID, SPEC_ID, IFNAME))
def test_floating_ip_handles_are_no_attachments_and_one_per_attachment(one, two):
    """The handle of an attachment's floating IPs: a valid handle of the same network (GC's
    prefix), never an attachment's, and different for different attachments."""
    from ipam.handle import check_handle_id
    floating = cni.floating_handle(handle_id(*one))
    assert check_handle_id(floating) == floating
    assert floating.startswith(cni.handle_prefix(one[0]))
    assert floating != handle_id(*two)
    assert (floating == cni.floating_handle(handle_id(*two))) == (one == two)


@pytest.mark.parametrize("one,two", [
    (("net", "coll-a_b", "eth0"), ("net", "coll-a.b", "eth0")),  # folded alike before
    (("n.a", "b", "eth0"), ("n", "a.b", "eth0")),  # the separator inside a name
    (("x" * 241, "c", "eth0"), ("x" * 241, "c", "net1")),  # cut to 253 alike before
    (("net", "c" * 250, "eth0"), ("net", "c" * 250, "net1")),
])
def test_attachments_that_once_shared_a_handle_get_two_addresses(ipam, etcd, one, two):
    results = [ipam("ADD", ipam.config(name=network), container, ifname)
               for network, container, ifname in (one, two)]
    addresses = {r["ips"][0]["address"] for r in results}
    assert len(addresses) == 2, results
    for (network, container, ifname), result in zip((one, two), results):
        assert holder(snapshot(etcd), result["ips"][0]["address"]) == handle_id(
            network, container, ifname)
        assert ipam("DEL", ipam.config(name=network), container, ifname) is None
    nothing_held(etcd, one[1], two[1])


@pytest.mark.parametrize("variable,value,fact", [
    ("CNI_CONTAINERID", "coll-a:b", "CNI_CONTAINERID"),
    ("CNI_CONTAINERID", "-leading-dash", "CNI_CONTAINERID"),
    ("CNI_CONTAINERID", "caf\udcc3", "CNI_CONTAINERID"),  # a byte that is not UTF-8
    ("CNI_IFNAME", "eth0/1", "CNI_IFNAME"),
    ("CNI_IFNAME", "a-name-of-16-chr", "CNI_IFNAME"),
    ("CNI_ARGS", "K8S_POD_NAME=\udcff", "CNI_ARGS"),
])
def test_names_the_spec_forbids_are_an_invalid_environment(ipam, etcd, variable, value, fact):
    for command in ("ADD", "DEL", "CHECK"):
        fails(ipam.raw(command, json.dumps(ipam.config()).encode(), **{variable: value}), 4,
              fact)
    nothing_held(etcd, "c1", value)


@pytest.mark.parametrize("name", ["", "-net", "my net", "caf\u00e9"])
def test_a_network_name_the_spec_forbids_is_invalid_config(ipam, etcd, name):
    fails(ipam.raw("ADD", json.dumps(ipam.config(name=name)).encode()), 7, "network name")
    nothing_held(etcd, "c1")


def test_a_configuration_that_is_not_utf8_is_a_decode_failure(ipam, etcd):
    stdin = json.dumps(ipam.config(name="net-X")).encode().replace(b"X", b"\xe9")
    fails(ipam.raw("ADD", stdin), 6, "UTF-8")
    nothing_held(etcd, "c1")


# --------------------------------------------------------------------------------------------
# VERSION, results


def test_version_reports_every_supported_spec_version(ipam):
    assert ipam.runtime.version("pipit-ipam") == {
        "cniVersion": "1.1.0",
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}
    run = ipam.raw("VERSION", b"")  # VERSION needs no configuration at all
    assert run.returncode == 0 and json.loads(run.stdout)["cniVersion"] == "1.1.0"


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_add_answers_in_the_format_of_the_requested_version(ipam, etcd, version):
    container = new_container_id()
    result = ipam("ADD", ipam.config(version), container)
    assert result["cniVersion"] == version
    (ip,) = result["ips"]
    assert ip["address"].startswith("10.244.") and ip["address"].endswith("/26")
    assert ip["gateway"].endswith(".0")
    assert ("version" in ip) == version.startswith("0.")  # 0.3/0.4 results name the family
    assert result["routes"] == [{"dst": "0.0.0.0/0"}]
    assert holder(snapshot(etcd), ip["address"]) == handle_id(NET, container, "eth0")
    assert ipam("DEL", ipam.config(version), container) is None
    nothing_held(etcd, container)


def test_add_is_idempotent_check_compares_and_del_releases(ipam, etcd):
    container = new_container_id()
    first = ipam("ADD", ipam.config(), container, CNI_ARGS="K8S_POD_NAMESPACE=web;K8S_POD_NAME=a")
    assert ipam("ADD", ipam.config(), container) == first
    assert used(snapshot(etcd), "default") == 1
    block = next(iter(snapshot(etcd).blocks.values()))
    attrs = block.holder(block.cidr.network_address + 1).secondary
    assert (attrs["namespace"], attrs["pod"], attrs["containerID"]) == ("web", "a", container)

    assert ipam("CHECK", {**ipam.config(), "prevResult": first}, container) is None
    wrong = {**first, "ips": [{"address": "10.244.3.3/26", "gateway": "10.244.3.0"}]}
    fails(ipam.raw("CHECK", json.dumps({**ipam.config(), "prevResult": wrong}).encode(),
                   container), 102, container, "10.244.3.3/26")
    fails(ipam.raw("CHECK", json.dumps(ipam.config()).encode(), "other"), 3, "other")

    assert ipam("DEL", ipam.config(), container) is None
    assert ipam("DEL", ipam.config(), container) is None  # DEL is idempotent
    assert ipam("DEL", ipam.config(), "never-added") is None
    nothing_held(etcd, container)
    assert pipitctl_in_use(etcd, "default") == 0


def test_a_configuration_larger_than_the_agent_takes_is_still_served(ipam, etcd):
    """Over 1 MiB (a runtime's prevResult, say): the native front leaves it to the Python
    plugin, which sends the agent only what it needs."""
    container = new_container_id()
    big = {**ipam.config(), "runtimeConfig": {"padding": "x" * (3 << 19)}}
    assert ipam("ADD", big, container)["ips"]
    assert ipam("DEL", big, container) is None
    nothing_held(etcd, container)


# --------------------------------------------------------------------------------------------
# Errors the caller makes


@pytest.mark.parametrize("stdin", [b"{not json", b"", b"[1, 2]", b"\xff\xfe"])
def test_malformed_stdin_is_a_decode_failure(ipam, etcd, stdin):
    error = fails(ipam.raw("ADD", stdin), 6, "network configuration")
    assert error["cniVersion"] == "1.1.0"  # no version to echo: the newest
    nothing_held(etcd, "c1")


@pytest.mark.parametrize("command,missing", [
    ("ADD", "CNI_CONTAINERID"), ("ADD", "CNI_IFNAME"), ("ADD", "CNI_NETNS"),
    ("DEL", "CNI_CONTAINERID"), ("CHECK", "CNI_IFNAME"), (None, "CNI_COMMAND"),
])
def test_missing_cni_variables_are_named(ipam, etcd, command, missing):
    stdin = json.dumps(ipam.config("0.4.0")).encode()
    cleared = {"CNI_CONTAINERID": "container_id", "CNI_IFNAME": "ifname", "CNI_NETNS": "netns"}
    run = ipam.raw(command, stdin, **({cleared[missing]: None} if missing in cleared else {}))
    error = fails(run, 4, missing)
    if command is not None:
        assert error["cniVersion"] == "0.4.0"  # errors echo the configuration's version
    nothing_held(etcd, "c1")


def test_an_unknown_command_is_named(ipam):
    fails(ipam.raw("ATTACH", json.dumps(ipam.config()).encode()), 4, "'ATTACH'")


def test_an_unsupported_cni_version_is_refused_with_the_supported_ones(ipam, etcd):
    error = fails(ipam.raw("ADD", json.dumps(ipam.config("9.9.9")).encode()), 1, "'9.9.9'")
    assert "1.1.0" in error["details"] and "0.3.0" in error["details"]
    nothing_held(etcd, "c1")


def test_an_unknown_ipam_field_is_refused_by_name(ipam, etcd):
    error = fails(ipam.raw("ADD", json.dumps(ipam.config(subnet="10.0.0.0/8")).encode()), 2,
                  "'subnet'")
    assert "pools" in error["details"]
    nothing_held(etcd, "c1")


@pytest.mark.parametrize("ipam_fields,fact", [
    ({"pools": "default"}, "ipam.pools"),
    ({"routes": ["0.0.0.0/0"]}, "ipam.routes"),
    ({"socket": 5}, "ipam.socket"),
    ({"timeout": 0}, "ipam.timeout"),
    ({"timeout": -1}, "ipam.timeout"),
    ({"timeout": 601}, "ipam.timeout"),
    ({"timeout": "5"}, "ipam.timeout"),
    ({"timeout": True}, "ipam.timeout"),
])
def test_invalid_ipam_values_are_invalid_config(ipam, etcd, ipam_fields, fact):
    fails(ipam.raw("ADD", json.dumps(ipam.config(**ipam_fields)).encode()), 7, fact)
    nothing_held(etcd, "c1")


def test_a_configuration_without_ipam_is_invalid(ipam):
    fails(ipam.raw("ADD", json.dumps({"cniVersion": "1.0.0", "name": NET}).encode()), 7, "ipam")


# --------------------------------------------------------------------------------------------
# Pools


def test_a_pool_that_does_not_exist(ipam, etcd):
    fails(ipam.raw("ADD", json.dumps(ipam.config(pools=["nope"])).encode()), 101,
          "IP pool 'nope' does not exist")
    nothing_held(etcd, "c1")


def test_an_exhausted_pool_and_its_addresses_coming_back(ipam, etcd):
    # 2 usable addresses: .0 is the gateway, .3 the broadcast address of the pods' /30
    add_pools(etcd, ("tiny", "10.245.0.0/30", {"blockSize": 30}))
    config = ipam.config(pools=["tiny"])
    held = [ipam("ADD", config, f"c{i}")["ips"][0]["address"] for i in range(2)]
    assert sorted(held) == ["10.245.0.1/30", "10.245.0.2/30"]
    fails(ipam.raw("ADD", json.dumps(config).encode(), "c2"), 100, "'tiny'", "cannot provide")
    nothing_held(etcd, "c2")
    ipam("DEL", config, "c0")
    assert ipam("ADD", config, "c2")["ips"][0]["address"] == held[0]  # the freed one
    for container in ("c1", "c2"):
        ipam("DEL", config, container)
    assert used(snapshot(etcd), "tiny") == 0


# --------------------------------------------------------------------------------------------
# The agent or etcd away


def test_agent_stopped_means_try_again_later(ipam, etcd):
    ipam.agent.stop()
    stdin = json.dumps(ipam.config()).encode()
    for command in ("ADD", "DEL", "CHECK"):
        fails(ipam.raw(command, stdin), 11, "pipit-agent is not reachable",
              str(ipam.agent.socket_path), "is it running")
    ipam.agent.start()
    nothing_held(etcd, "c1")


def test_a_crashed_agent_socket_left_behind_means_try_again_later(ipam, etcd):
    ipam.agent.kill()
    assert ipam.agent.socket_path.exists()  # SIGKILL: nobody removed it
    fails(ipam.raw("ADD", json.dumps(ipam.config()).encode()), 11, "connection refused")
    ipam.agent.start()  # takes the stale socket over
    assert ipam("ADD", ipam.config(), "c1")["ips"]
    ipam("DEL", ipam.config(), "c1")


def test_etcd_stopped_means_try_again_and_the_agent_serves_again_when_it_is_back(
        own_etcd, cni_bin, short_dir):
    etcd = EtcdConfig(endpoints=(own_etcd.endpoint,))
    add_pools(etcd, DEFAULT_POOL)
    agent = start_agent(etcd, short_dir)
    try:
        ipam = Plugin(cni_bin, agent)
        config = ipam.config()
        kept = ipam("ADD", config, "kept")["ips"][0]["address"]

        own_etcd.stop()
        for command, container in (("ADD", "during"), ("DEL", "kept")):
            fails(ipam.raw(command, json.dumps(config).encode(), container), 11,
                  "etcd", own_etcd.endpoint)
        assert agent.running

        own_etcd.start()
        snap = snapshot(etcd)
        assert holdings(snap, "during") == []
        assert holder(snap, kept) == handle_id(NET, "kept", "eth0")  # the failed DEL kept it

        def added() -> subprocess.CompletedProcess | None:
            run = ipam.raw("ADD", json.dumps(config).encode(), "after")
            if run.returncode == 0:
                return run
            assert json.loads(run.stdout)["code"] == 11, run.stdout
            return None

        wait(added, 30.0, "the same agent process to serve once etcd is back", interval=0.1)
        assert agent.pid is not None and agent.running
        for container in ("kept", "after"):
            ipam("DEL", config, container)
        nothing_held(etcd, "kept", "after", "during")
        assert used(snapshot(etcd), "default") == 0
    finally:
        agent.stop()


# --------------------------------------------------------------------------------------------
# One deadline for the whole call: a hung agent, a full listen queue, etcd's answer lost


class FakeAgent:
    """A unix socket in the agent's place that takes connections and reads the requests,
    then never answers (`hang`) or closes without a word. `requests()` is every request
    received, once the plugin that sent them has exited."""

    def __init__(self, path: Path, hang: bool = True):
        self.path, self.hang = str(path), hang
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(64)
        self.held: list[socket.socket] = []
        self.received: list[bytes] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.05)
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self._take(conn)

    def _take(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        data = b""
        while not data.endswith(b"\n") and (chunk := conn.recv(65536)):
            data += chunk
        self.received.append(data)
        if self.hang:
            self.held.append(conn)
        else:
            conn.close()

    def requests(self) -> list[dict]:
        """Everything sent so far, the connections still queued included."""
        self.stopping.set()
        self.thread.join()
        self.listener.setblocking(False)
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                break
            self._take(conn)
        return [json.loads(data) for data in self.received]

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()
        for conn in self.held + [self.listener]:
            conn.close()


@pytest.fixture
def hung_agent(short_dir):
    agent = FakeAgent(short_dir / "hung.sock")
    try:
        yield agent
    finally:
        agent.close()


def test_a_hung_agent_is_asked_once_and_the_call_ends_with_code_11(cni_bin, hung_agent):
    """One deadline (ipam.timeout) for the whole call, whichever front runs it: the request
    goes out once, saying how long the agent has, and nothing asks again after it."""
    plugin = Plugin(cni_bin, socket=hung_agent.path)
    calls = (("ADD", "1.0.0", 11), ("DEL", "0.4.0", 11), ("STATUS", "1.1.0", 50))
    for command, version, code in calls:
        error = fails(plugin.raw(command, json.dumps(plugin.config(version, timeout=1))
                                 .encode()), code, "pipit-agent did not answer",
                      hung_agent.path, "within 1 s")
        assert error["cniVersion"] == version
    requests = hung_agent.requests()
    assert len(requests) == len(calls), requests  # never a second attempt
    for request in requests:
        assert 0 < request["timeout"] <= 1, request


def test_an_agent_that_closes_without_an_answer_is_not_asked_again(cni_bin, short_dir):
    closing = FakeAgent(short_dir / "closing.sock", hang=False)
    try:
        plugin = Plugin(cni_bin, socket=closing.path)
        fails(plugin.raw("ADD", json.dumps(plugin.config()).encode()), 11, closing.path,
              "closed the connection without an answer")
        assert len(closing.requests()) == 1
    finally:
        closing.close()


@pytest.fixture(scope="module")
def python_bin() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="pipit-t-ipam-python-"))
    try:
        install(str(directory), native=False)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("agent_is", ["missing", "hung", "closing"])
@pytest.mark.parametrize("command,version", [("ADD", "0.3.1"), ("STATUS", "1.1.0"),
                                             ("DEL", "1.0.0")])
def test_the_native_front_says_what_the_python_plugin_says(native_bin, python_bin, short_dir,
                                                           agent_is, command, version):
    """The answers the native front words itself (no Python plugin beside it) are the
    Python plugin's, byte for byte."""
    path = short_dir / "agent.sock"
    fake = None if agent_is == "missing" else FakeAgent(path, hang=agent_is == "hung")
    try:
        config = {"cniVersion": version, "name": NET, "type": "ptp",
                  "ipam": {"type": "pipit-ipam", "socket": str(path), "timeout": 0.5}}
        stdin = json.dumps(config).encode()
        native, python = (Plugin(directory, socket=path).raw(command, stdin)
                          for directory in (native_bin, python_bin))
        assert (native.returncode, native.stdout) == (python.returncode, python.stdout)
        error = json.loads(native.stdout)
        assert native.returncode == 1
        assert (error["code"], error["cniVersion"]) == (50 if command == "STATUS" else 11,
                                                        version)
    finally:
        if fake:
            fake.close()
    version_of = {directory: Plugin(directory, socket=path).raw("VERSION", b"")
                  for directory in (native_bin, python_bin)}
    assert version_of[native_bin].stdout == version_of[python_bin].stdout


def _blocked_in_connect(process: subprocess.Popen) -> bool:
    """Whether the process sleeps in connect() on a full unix listen queue (or has exited)."""
    if process.poll() is not None:
        return True
    try:
        with open(f"/proc/{process.pid}/wchan") as wchan:
            return wchan.read() == "unix_wait_for_peer"
    except FileNotFoundError:
        return True


def test_a_full_listen_queue_is_waited_out_within_the_deadline(ipam, etcd, short_dir):
    """A burst fills the agent's listen queue: the plugin's connect waits for room (within
    its deadline) instead of failing at once with EAGAIN. A relay with a queue of one,
    filled, stands in front of the real agent until the plugin is seen waiting."""
    relay_path = str(short_dir / "relay.sock")
    relay = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    relay.bind(relay_path)
    relay.listen(0)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    filler.connect(relay_path)  # the queue is full now
    plugin = Plugin(ipam.runtime.bin_dirs[0], socket=relay_path)
    env = {**plugin.runtime.environment("ADD"), "CNI_CONTAINERID": "queued",
           "CNI_IFNAME": "eth0", "CNI_NETNS": "/var/run/netns/x"}
    process = subprocess.Popen([plugin.path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               env=env)
    try:
        process.stdin.write(json.dumps(plugin.config(timeout=30)).encode())
        process.stdin.close()
        wait(lambda: _blocked_in_connect(process), 30, "the plugin to wait in connect()")
        assert process.poll() is None, process.stdout.read()  # not refused at once
        relay.accept()[0].close()  # the filler's turn
        conn, _ = relay.accept()
        with conn, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as agent:
            agent.connect(str(ipam.agent.socket_path))
            request = conn.makefile("rb").readline()
            agent.sendall(request)
            conn.sendall(agent.makefile("rb").readline())
        out = process.stdout.read()  # the plugin ends by its own deadline at the latest
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        filler.close()
        relay.close()
    assert process.returncode == 0, out
    address = json.loads(out)["ips"][0]["address"]
    assert holder(snapshot(etcd), address) == handle_id(NET, "queued", "eth0")


def test_a_burst_of_connections_all_get_answers(agent):
    """The agent listens with the system's largest backlog: connections made while it is
    busy (here: stopped) wait in its queue instead of being refused (EAGAIN)."""
    with open("/proc/sys/net/core/somaxconn") as limit:
        count = min(500, int(limit.read()))
    path = str(agent.socket_path)
    conns, refused = [], 0
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        for _ in range(count):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.setblocking(False)  # what the probe did: a refusal shows at once
            try:
                conn.connect(path)
            except BlockingIOError:
                refused += 1
                conn.close()
                continue
            conn.setblocking(True)
            conn.sendall(b'{"command": "STATUS"}\n')
            conns.append(conn)
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    try:
        assert refused == 0, f"{refused} of {count} connections refused"
        for conn in conns:
            conn.settimeout(30)
            assert json.loads(conn.makefile("rb").readline()) == {"pools": ["default"]}
    finally:
        for conn in conns:
            conn.close()


def lost_answer_scenario(cni_bin, own_etcd, short_dir, container, then):
    """An ADD whose etcd transaction is committed while its answer is held back on the way
    (an etcd cut off after the request went out): `then(proxy)` decides what happens next.
    Returns the plugin's exchange and a plugin for more calls."""
    etcd = EtcdConfig(endpoints=(own_etcd.endpoint,))
    add_pools(etcd, DEFAULT_POOL)
    with TCPProxy(("127.0.0.1", own_etcd.client_port)) as proxy:
        agent = start_agent(EtcdConfig(endpoints=(proxy.url(),)), short_dir)
        try:
            plugin = Plugin(cni_bin, agent)
            config = plugin.config(timeout=4)
            assert plugin("ADD", config, "warm")["ips"]  # blocks claimed, views loaded
            handle = handle_id(NET, container, "eth0")
            proxy.hold_after(f'"handleID":"{handle}"'.encode())  # its commit's answer
            outcome = {}
            call = threading.Thread(target=lambda: outcome.update(
                run=plugin.raw("ADD", json.dumps(config).encode(), container)))
            call.start()
            try:
                wait(lambda: handle in snapshot(etcd).handles, 30,
                     "the ADD's transaction to be committed")
                assert proxy.holding
                then(proxy, call, agent)
            finally:
                call.join(60)
            after = plugin.raw("ADD", json.dumps(config).encode(), "after")
            assert after.returncode == 0, after
            return outcome["run"], etcd
        finally:
            agent.stop()


def test_an_add_whose_commit_answer_was_lost_answers_the_address_it_holds(
        own_etcd, cni_bin, short_dir):
    """The connection to etcd breaks after the transaction went out: the agent learns from
    etcd that it was committed and answers with the address."""
    def cut(proxy, call, agent):
        proxy.cut()
    run, etcd = lost_answer_scenario(cni_bin, own_etcd, short_dir, "lost", cut)
    assert run.returncode == 0, run
    address = json.loads(run.stdout)["ips"][0]["address"]
    snap = snapshot(etcd)
    assert holder(snap, address) == handle_id(NET, "lost", "eth0")
    assert check(snap) == []


def test_an_add_that_answered_failure_holds_nothing(own_etcd, cni_bin, short_dir):
    """The answer does not come back before the plugin's deadline (nor before the agent's
    own deadline for etcd): the ADD fails with code 11, and once etcd answers again the agent
    learns that the transaction was committed and gives back what it held (by the time it
    serves the next request)."""
    def too_late(proxy, call, agent):
        call.join(60)  # the plugin gave up
        wait(lambda: "learning whether the batch was committed" in agent.log_tail(), 30,
             "the agent's call to etcd to time out")
        proxy.release()
    run, etcd = lost_answer_scenario(cni_bin, own_etcd, short_dir, "gave-up", too_late)
    fails(run, 11, "did not finish within", "etcd")
    nothing_held(etcd, "gave-up")


# --------------------------------------------------------------------------------------------
# Nesting deeper than a JSON reader can follow


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("where", ["the whole configuration", "one of its values"])
def test_deeply_nested_json_is_a_decode_failure(ipam, etcd, where):
    config = json.dumps(ipam.config()).encode()
    stdin = DEEP if where == "the whole configuration" else config[:-1] + b', "x": ' + DEEP + b"}"
    fails(ipam.raw("ADD", stdin), 6, "network configuration", "not valid JSON")
    nothing_held(etcd, "c1")


def test_a_deeply_nested_request_to_the_agent_is_answered_with_code_6(agent):
    def ask(line: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(30)
            conn.connect(str(agent.socket_path))
            conn.sendall(line + b"\n")
            return conn.makefile("rb").readline()

    answer = ask(b'{"command": "ADD", "handle": "h", "attributes": ' + DEEP + b"}")
    with pytest.raises(cni.CNIError) as error:
        cni.agent_reply(json.loads(answer), str(agent.socket_path))
    assert error.value.code == 6 and "nests too deeply" in error.value.msg
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0",
           "CNI_NETNS": "/x"}
    forwarded = json.dumps({"command": "CNI", "env": env, "stdin": DEEP.decode()}).encode()
    status, _, line = ask(forwarded).partition(b" ")
    assert status == b"1" and json.loads(line)["code"] == 6
    assert cni.ask_agent(str(agent.socket_path), {"command": "STATUS"}) == {"pools": ["default"]}


# --------------------------------------------------------------------------------------------
# STATUS and GC (CNI 1.1)


def test_status(ipam, etcd):
    assert ipam("STATUS", ipam.config("1.1.0"), container_id=None) is None
    ipam.agent.stop()
    fails(ipam.raw("STATUS", json.dumps(ipam.config("1.1.0")).encode()), 50,
          "pipit-agent is not reachable")


def test_status_without_any_pool_is_not_available(cni_bin, etcd, short_dir):
    agent = start_agent(etcd, short_dir)
    try:
        ipam = Plugin(cni_bin, agent)
        fails(ipam.raw("STATUS", json.dumps(ipam.config("1.1.0")).encode()), 50, "IP pool")
    finally:
        agent.stop()


def test_gc_releases_only_this_nodes_stale_attachments_of_this_network(cni_bin, etcd,
                                                                        short_dir):
    add_pools(etcd, DEFAULT_POOL)
    one, two = start_agent(etcd, short_dir, "node-1"), None
    try:
        two = start_agent(etcd, short_dir, "node-2")
        ipam1, ipam2 = Plugin(cni_bin, one), Plugin(cni_bin, two)
        net, dotted = "net", "net.blue"  # "net.blue.c.eth0" starts like a handle of "net"
        for plugin, name, container in ((ipam1, net, "keep"), (ipam1, net, "stale"),
                                        (ipam1, dotted, "c"), (ipam1, "other", "stale"),
                                        (ipam2, net, "remote")):
            plugin("ADD", plugin.config(name=name), container)
        before = set(snapshot(etcd).handles)
        for bad in ({}, {"cni.dev/valid-attachments": "keep"}):  # no list: release nothing
            fails(ipam1.raw("GC", json.dumps({**ipam1.config("1.1.0", name=net), **bad})
                            .encode()), 7, "cni.dev/valid-attachments", "nothing was released")
        assert set(snapshot(etcd).handles) == before
        valid = [{"containerID": "keep", "ifname": "eth0"}]
        ipam1("GC", {**ipam1.config("1.1.0", name=net), "cni.dev/valid-attachments": valid},
              container_id=None)
        handles = set(snapshot(etcd).handles)
        assert handles == {handle_id(net, "keep", "eth0"), handle_id(dotted, "c", "eth0"),
                           handle_id("other", "stale", "eth0"),
                           handle_id(net, "remote", "eth0")}
        assert check(snapshot(etcd)) == []
    finally:
        one.stop()
        if two:
            two.stop()


# --------------------------------------------------------------------------------------------
# The native front alone: what it answers, the agent answered (no Python plugin beside it)


@pytest.fixture(scope="module")
def native_bin() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="pipit-t-ipam-native-"))
    try:
        install(str(directory))
        (directory / PYTHON_PLUGIN).unlink()
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def native(native_bin, agent) -> Plugin:
    return Plugin(native_bin, agent)


def test_the_native_front_serves_every_command_through_the_agent(native, etcd):
    container = new_container_id()
    old = native("ADD", native.config("0.4.0"), container)
    assert old["ips"][0]["version"] == "4" and old["cniVersion"] == "0.4.0"
    new = native("ADD", native.config("1.1.0"), container,
                 CNI_ARGS="K8S_POD_NAMESPACE=web;K8S_POD_NAME=a")
    assert [ip["address"] for ip in new["ips"]] == [ip["address"] for ip in old["ips"]]
    assert holder(snapshot(etcd), new["ips"][0]["address"]) == handle_id(NET, container, "eth0")
    assert native("CHECK", {**native.config(), "prevResult": new}, container) is None
    fails(native.raw("CHECK", json.dumps(native.config()).encode(), "other"), 3, "other")
    assert native("STATUS", native.config("1.1.0"), container_id=None) is None
    fails(native.raw("ADD", json.dumps(native.config(pools=["nope"])).encode(), "c2"), 101,
          "nope")
    fails(native.raw("ADD", json.dumps(native.config(colour="red")).encode(), "c2"), 2,
          "colour")
    fails(native.raw("ADD", json.dumps(native.config("9.9.9")).encode(), "c2"), 1, "9.9.9")
    fails(native.raw("ADD", json.dumps(native.config()).encode(), "c2", netns=None), 4,
          "CNI_NETNS")
    gc = {**native.config("1.1.0"), "cni.dev/valid-attachments": []}
    assert native("GC", gc, container_id=None) is None  # the only attachment was stale
    nothing_held(etcd, container, "c2")
    assert native("DEL", native.config(), container) is None


def test_the_native_front_answers_version_and_an_unreachable_agent_without_python(native,
                                                                                 etcd):
    """Kubernetes hosts have no Python: what needs no agent, or finds none, is answered by
    the front itself; only what it cannot read goes to the (missing) Python plugin."""
    assert native.runtime.version("pipit-ipam") == {
        "cniVersion": "1.1.0", "supportedVersions": list(SUPPORTED_VERSIONS)}
    stdin = json.dumps(native.config("0.4.0")).encode()
    native.agent.kill()  # its socket stays behind: refused
    for command in ("ADD", "DEL", "CHECK"):
        error = fails(native.raw(command, stdin), 11, "pipit-agent is not reachable",
                      native.socket, "(connection refused)", "is it running")
        assert error["cniVersion"] == "0.4.0"
    fails(native.raw("STATUS", json.dumps(native.config("1.1.0")).encode()), 50,
          "pipit-agent is not reachable")
    os.unlink(native.socket)
    fails(native.raw("ADD", stdin), 11, "(no such file or directory)")
    fails(native.raw("ADD", b"{not json"), 5, PYTHON_PLUGIN, "install the plugin again")
    nothing_held(etcd, "c1")


# Strings json.dumps writes without a \u escape (the front hands those to Python).
PLAIN_TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs"))
                     | st.sampled_from('"\\/\t\n'), max_size=8)


def plain_containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(inner, max_size=3) | st.dictionaries(PLAIN_TEXT, inner, max_size=3)


PLAIN_JSON = st.recursive(st.none() | st.booleans() | st.integers() | PLAIN_TEXT,
                          plain_containers, max_leaves=8)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=st.dictionaries(PLAIN_TEXT, PLAIN_JSON, max_size=3),
       after=st.dictionaries(PLAIN_TEXT, PLAIN_JSON, max_size=3),
       socket_first=st.booleans(), indent=st.sampled_from([None, 0, 2, "\t"]))
def test_the_native_front_finds_the_socket_wherever_the_configuration_puts_it(
        native, before, after, socket_first, indent):
    ipam_section = ({"socket": str(native.agent.socket_path), "type": "pipit-ipam"}
                    if socket_first else
                    {"type": "pipit-ipam", "routes": [{"dst": "0.0.0.0/0"}],
                     "socket": str(native.agent.socket_path)})
    reserved = {"cniVersion", "ipam", "name"}
    config = {**{k: v for k, v in before.items() if k not in reserved}, "cniVersion": "1.1.0",
              "name": NET, "ipam": ipam_section,
              **{k: v for k, v in after.items() if k not in reserved}}
    stdin = json.dumps(config, indent=indent, ensure_ascii=False).encode()
    run = native.raw("STATUS", stdin, container_id=None)
    assert run.returncode == 0 and run.stdout == b"", (stdin, run)


def test_the_native_front_takes_the_last_ipam_section_as_python_does(native):
    stdin = ('{"cniVersion": "1.0.0", "name": "n", "ipam": {"socket": "/nonexistent"}, '
             f'"ipam": {{"type": "pipit-ipam", "socket": "{native.agent.socket_path}"}}}}')
    run = native.raw("STATUS", stdin.encode(), container_id=None)
    assert run.returncode == 0, run


# --------------------------------------------------------------------------------------------
# python -m ipam.cni install


def install_command(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-m", "ipam.cni", "install", *args], cwd=root,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})


def test_install_command_writes_the_plugin_and_refuses_in_one_sentence(tmp_path):
    out = install_command(str(tmp_path))
    assert out.returncode == 0 and out.stdout == f"{tmp_path / 'pipit-ipam'}\n", out.stderr
    assert os.access(tmp_path / "pipit-ipam", os.X_OK)
    old = tmp_path / "python2"
    old.write_text("#!/bin/sh\necho 2 7\n")
    old.chmod(0o755)
    for args, fact in (([str(tmp_path / "missing")], "is not a directory"),
                       ([str(tmp_path), "--python", str(old)], "is Python 2.7"),
                       ([str(tmp_path), "--python", str(tmp_path / "none")],
                        "does not run as a Python interpreter")):
        out = install_command(*args)
        assert out.returncode == 1
        one_sentence(out, fact)
    out = install_command(str(tmp_path), "--no-native")
    assert out.returncode == 0
    assert (tmp_path / "pipit-ipam").read_bytes() == (tmp_path / PYTHON_PLUGIN).read_bytes()
    out = install_command(str(tmp_path), env={"CC": "/bin/false"})
    assert out.returncode == 1 and "could not build" in out.stderr and "--no-native" in out.stderr
    out = install_command()  # no DIR: usage, never the plugin waiting on stdin
    assert out.returncode == 2 and "DIR" in out.stderr
