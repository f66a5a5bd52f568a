"""pipit-ipam on its own, as a main plugin delegates to it: the installed standalone copy run
with CNI_* variables and a network configuration on stdin, against a real pipit-agent and a
real etcd. Every failure must give the right CNI code, a sentence a person can act on, JSON
on stdout with exit status 1, and leave nothing allocated for the container. (No root needed:
pipit-ipam touches no network namespace.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipam import cni
from ipam.cni import SUPPORTED_VERSIONS, handle_id, install
from ipam.snapshot import check
from ipam.store import EtcdConfig
from lab.agent import AgentProcess
from lab.cni import CNIRuntime, Invocation, parse_output
from lab.process import wait
from tests.cni_support import (  # noqa: F401 (fixtures)
    DEFAULT_POOL,
    add_pools,
    assert_actionable,
    holder,
    holdings,
    new_container_id,
    pipitctl_in_use,
    short_dir,
    snapshot,
    start_agent,
    used,
)

NET = "pipit-net"


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


class Plugin:
    """pipit-ipam called directly (CNI_PATH, stdin and the environment exactly as given)."""

    def __init__(self, bin_dir: Path, agent: AgentProcess):
        self.runtime = CNIRuntime(bin_dir)
        self.path = self.runtime.find("pipit-ipam")
        self.agent = agent

    def config(self, version: str = "1.0.0", name: str = NET, **ipam) -> dict:
        return {"cniVersion": version, "name": name, "type": "ptp",
                "ipam": {"type": "pipit-ipam", "socket": str(self.agent.socket_path), **ipam}}

    def raw(self, command: str | None, stdin: bytes, container_id: str | None = "c1",
            ifname: str | None = "eth0", netns: str | None = "/var/run/netns/x",
            **extra: str) -> Invocation:
        env = self.runtime.environment(command or "")
        if command is None:
            del env["CNI_COMMAND"]
        for name, value in (("CNI_CONTAINERID", container_id), ("CNI_IFNAME", ifname),
                            ("CNI_NETNS", netns)):
            if value is not None:
                env[name] = value
        env.update(extra)
        return self.runtime.invoke(self.path, env, stdin)

    def __call__(self, command: str, config: dict, container_id: str = "c1",
                 ifname: str = "eth0", **extra: str) -> dict | None:
        run = self.raw(command, json.dumps(config).encode(), container_id, ifname, **extra)
        return parse_output(run, "pipit-ipam", command)


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
    assert_actionable(error["msg"], *facts)
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
    add_pools(etcd, ("tiny", "10.245.0.0/30", {"blockSize": 30}))  # 3 usable addresses
    config = ipam.config(pools=["tiny"])
    held = [ipam("ADD", config, f"c{i}")["ips"][0]["address"] for i in range(3)]
    assert sorted(held) == ["10.245.0.1/30", "10.245.0.2/30", "10.245.0.3/30"]
    fails(ipam.raw("ADD", json.dumps(config).encode(), "c3"), 100, "'tiny'", "cannot provide")
    nothing_held(etcd, "c3")
    ipam("DEL", config, "c1")
    assert ipam("ADD", config, "c3")["ips"][0]["address"] == held[1]  # the freed one
    for container in ("c0", "c2", "c3"):
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
        (directory / cni.PYTHON_PLUGIN).unlink()
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


def test_the_native_front_without_its_python_plugin_says_to_install_again(native):
    native.agent.stop()  # unreachable: the front hands the call to the missing Python plugin
    for command, stdin in (("ADD", json.dumps(native.config()).encode()), ("VERSION", b"")):
        fails(native.raw(command, stdin), 5, cni.PYTHON_PLUGIN, "install the plugin again")


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
        assert out.returncode == 1 and out.stderr.startswith("Error: ") and fact in out.stderr
        assert len(out.stderr.splitlines()) == 1 and "Traceback" not in out.stderr
    out = install_command(str(tmp_path), "--no-native")
    assert out.returncode == 0
    assert (tmp_path / "pipit-ipam").read_bytes() == (tmp_path / cni.PYTHON_PLUGIN).read_bytes()
    out = install_command(str(tmp_path), env={"CC": "/bin/false"})
    assert out.returncode == 1 and "could not build" in out.stderr and "--no-native" in out.stderr
    out = install_command()  # no DIR: usage, never the plugin waiting on stdin
    assert out.returncode == 2 and "DIR" in out.stderr
