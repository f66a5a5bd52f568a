"""lab.cni, the runtime, against recording fake plugins: what each plugin is executed with
(configuration, prevResult, runtimeConfig, CNI_* environment), in which order, and what the
runtime makes of their answers. No root needed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lab.cni import (
    Attachment,
    CNIError,
    CNIRuntime,
    InvalidNetworkConfig,
    NetworkConfig,
    ResultCache,
)

FAKE = r'''#!{python} -IS
import json, os, sys, time
conf = json.loads(sys.stdin.read() or "{{}}")
command = os.environ.get("CNI_COMMAND", "")
name = os.path.basename(sys.argv[0])
with open({record!r}, "a") as log:
    log.write(json.dumps({{"plugin": name, "command": command, "conf": conf,
                          "env": {{k: v for k, v in os.environ.items()
                                  if k.startswith("CNI_")}}}}) + "\n")
fail = conf.get("fail", {{}})
if command in fail:
    how = fail[command]
    if how == "crash":
        sys.stderr.write("panic: something broke\n")
        sys.exit(2)
    if how == "hang":
        time.sleep(60)
    print(json.dumps({{"cniVersion": conf.get("cniVersion"), "code": how,
                      "msg": "it failed.", "details": name}}))
    sys.exit(1)
if command == "ADD":
    result = conf.get("prevResult") or {{"cniVersion": conf["cniVersion"], "ips": [],
                                        "interfaces": []}}
    result["interfaces"] = result["interfaces"] + [{{"name": name}}]
    print(json.dumps(result))
elif command == "VERSION":
    print(json.dumps({{"cniVersion": "1.1.0", "supportedVersions": ["1.0.0", "1.1.0"]}}))
'''


@pytest.fixture
def fakes(tmp_path) -> tuple[CNIRuntime, Path]:
    """Plugins one, two and three (all the same recording script) and the record they write."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record.jsonl"
    bin_dir.mkdir()
    for name in ("one", "two", "three"):
        path = bin_dir / name
        path.write_text(FAKE.format(python=sys.executable, record=str(record)))
        path.chmod(0o755)
    return CNIRuntime(bin_dir, cache_dir=tmp_path / "cache", timeout=5.0), record


def calls(record: Path) -> list[dict]:
    if not record.exists():
        return []
    lines = record.read_text().splitlines()
    record.unlink()
    return [json.loads(line) for line in lines]


def chain(version: str = "1.0.0", **extra) -> NetworkConfig:
    return NetworkConfig.load({"cniVersion": version, "name": "chain", **extra, "plugins": [
        {"type": "one", "capabilities": {"portMappings": True, "bandwidth": False}},
        {"type": "two", "cniVersion": "0.1.0", "name": "ignored"},
        {"type": "three", "capabilities": {"ips": True}},
    ]})


POD = Attachment("ctr1", "/var/run/netns/pod1", "eth0", (("K8S_POD_NAME", "web"),),
                 {"portMappings": [{"hostPort": 80}], "bandwidth": {"rate": 1}})


def test_add_chains_results_and_injects_name_version_runtime_config(fakes):
    runtime, record = fakes
    result = runtime.add(chain(), POD)
    assert [i["name"] for i in result["interfaces"]] == ["one", "two", "three"]
    seen = calls(record)
    assert [(c["plugin"], c["command"]) for c in seen] == [
        ("one", "ADD"), ("two", "ADD"), ("three", "ADD")]
    for c in seen:
        assert c["conf"]["name"] == "chain" and c["conf"]["cniVersion"] == "1.0.0"
        assert c["env"] == {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "ctr1",
                            "CNI_NETNS": "/var/run/netns/pod1", "CNI_IFNAME": "eth0",
                            "CNI_ARGS": "K8S_POD_NAME=web", "CNI_PATH": runtime.bin_dirs[0]}
    one, two, three = (c["conf"] for c in seen)
    assert "prevResult" not in one
    assert [i["name"] for i in two["prevResult"]["interfaces"]] == ["one"]
    assert [i["name"] for i in three["prevResult"]["interfaces"]] == ["one", "two"]
    # runtimeConfig: only capabilities the plugin declared true and the runtime was given
    assert one["runtimeConfig"] == {"portMappings": [{"hostPort": 80}]}
    assert "runtimeConfig" not in two and "runtimeConfig" not in three
    assert runtime.cached_result(chain(), POD) == result


def test_check_and_del_get_the_cached_result_and_del_runs_in_reverse(fakes):
    runtime, record = fakes
    result = runtime.add(chain(), POD)
    calls(record)
    runtime.check(chain(), POD)
    seen = calls(record)
    assert [(c["plugin"], c["command"]) for c in seen] == [
        ("one", "CHECK"), ("two", "CHECK"), ("three", "CHECK")]
    assert all(c["conf"]["prevResult"] == result for c in seen)
    runtime.delete(chain(), POD)
    seen = calls(record)
    assert [(c["plugin"], c["command"]) for c in seen] == [
        ("three", "DEL"), ("two", "DEL"), ("one", "DEL")]
    assert all(c["conf"]["prevResult"] == result for c in seen)
    assert runtime.cached_result(chain(), POD) is None
    runtime.delete(chain(), POD)  # again: no cached result, so no prevResult
    assert all("prevResult" not in c["conf"] for c in calls(record))


def test_check_is_refused_before_0_4_0_and_skipped_when_disabled(fakes):
    runtime, record = fakes
    with pytest.raises(InvalidNetworkConfig):
        runtime.check(chain("0.3.1"), POD)
    runtime.add(chain(disableCheck=True), POD)
    calls(record)
    runtime.check(chain(disableCheck=True), POD)
    assert calls(record) == []
    with pytest.raises(CNIError, match="no cached ADD result"):
        runtime.check(chain(), Attachment("never", "/x"))


def test_a_failing_plugin_raises_its_error_and_the_list_is_deleted(fakes):
    runtime, record = fakes
    net = NetworkConfig.load({"cniVersion": "1.0.0", "name": "chain", "plugins": [
        {"type": "one"}, {"type": "two", "fail": {"ADD": 7}}, {"type": "three"}]})
    with pytest.raises(CNIError) as caught:
        runtime.add(net, POD)
    error = caught.value
    assert (error.code, error.msg, error.details, error.plugin, error.command) == (
        7, "it failed.", "two", "two", "ADD")
    assert error.error == {"cniVersion": "1.0.0", "code": 7, "msg": "it failed.",
                           "details": "two"}
    assert [(c["plugin"], c["command"]) for c in calls(record)] == [
        ("one", "ADD"), ("two", "ADD"), ("three", "DEL"), ("two", "DEL"), ("one", "DEL")]
    with pytest.raises(CNIError):
        runtime.add(net, POD, cleanup_on_failure=False)
    assert [c["command"] for c in calls(record)] == ["ADD", "ADD"]
    assert runtime.cached_result(net, POD) is None


def test_crashes_hangs_and_missing_plugins_are_errors_without_a_code(fakes):
    runtime, _ = fakes
    crash = NetworkConfig.load({"cniVersion": "1.0.0", "name": "n", "type": "one",
                                "fail": {"ADD": "crash"}})
    with pytest.raises(CNIError) as caught:
        runtime.add(crash, POD, cleanup_on_failure=False)
    assert caught.value.code is None and "panic: something broke" in caught.value.msg
    assert caught.value.returncode == 2
    hang = NetworkConfig.load({"cniVersion": "1.0.0", "name": "n", "type": "one",
                               "fail": {"ADD": "hang"}})
    runtime.timeout = 0.5
    with pytest.raises(CNIError, match="killed"):
        runtime.add(hang, POD, cleanup_on_failure=False)
    with pytest.raises(CNIError, match="'nope' is not in"):
        runtime.add(NetworkConfig.load({"cniVersion": "1.0.0", "name": "n", "type": "nope"}),
                    POD)


def test_status_and_gc_exist_from_1_1_0(fakes, tmp_path):
    runtime, record = fakes
    runtime.status(chain("1.0.0"))
    runtime.gc(chain("1.0.0"), [])
    assert calls(record) == []
    runtime.status(chain("1.1.0"))
    seen = calls(record)
    assert [(c["plugin"], c["command"]) for c in seen] == [
        ("one", "STATUS"), ("two", "STATUS"), ("three", "STATUS")]
    assert seen[0]["env"] == {"CNI_COMMAND": "STATUS", "CNI_PATH": runtime.bin_dirs[0]}
    down = NetworkConfig.load({"cniVersion": "1.1.0", "name": "n", "type": "one",
                               "fail": {"STATUS": 50}})
    with pytest.raises(CNIError) as caught:
        runtime.status(down)
    assert caught.value.code == 50


def test_gc_deletes_stale_cached_attachments_then_sends_the_valid_list(fakes):
    runtime, record = fakes
    net, other = chain("1.1.0"), NetworkConfig.load({"cniVersion": "1.1.0", "name": "other",
                                                     "type": "one"})
    keep, stale = Attachment("keep", "/ns/keep"), Attachment("stale", "/ns/stale", "net1")
    for attachment in (keep, stale):
        runtime.add(net, attachment)
    runtime.add(other, stale)
    calls(record)
    runtime.gc(net, [keep])
    seen = calls(record)
    assert [(c["plugin"], c["command"], c["env"].get("CNI_CONTAINERID")) for c in seen] == [
        ("three", "DEL", "stale"), ("two", "DEL", "stale"), ("one", "DEL", "stale"),
        ("one", "GC", None), ("two", "GC", None), ("three", "GC", None)]
    assert seen[0]["env"]["CNI_IFNAME"] == "net1" and seen[0]["env"]["CNI_NETNS"] == "/ns/stale"
    valid = [{"containerID": "keep", "ifname": "eth0"}]
    assert seen[3]["conf"]["cni.dev/valid-attachments"] == valid
    assert runtime.cached_result(net, stale) is None
    assert runtime.cached_result(net, keep) is not None
    assert runtime.cached_result(other, stale) is not None  # another network's: untouched


def test_the_cache_directory_outlives_the_runtime(fakes, tmp_path):
    runtime, _ = fakes
    result = runtime.add(chain(), POD)
    again = CNIRuntime(runtime.bin_dirs, cache_dir=tmp_path / "cache")
    assert again.cached_result(chain(), POD) == result
    assert [e["containerId"] for e in ResultCache(tmp_path / "cache").entries()] == ["ctr1"]


def test_network_configurations():
    single = NetworkConfig.load('{"cniVersion": "0.4.0", "name": "n", "type": "ptp", "x": 1}')
    assert single.plugins == ({"type": "ptp", "x": 1},)
    picked = NetworkConfig.load({"cniVersions": ["0.4.0", "1.1.0", "9.0.0"], "name": "n",
                                 "plugins": [{"type": "ptp"}]})
    assert picked.cni_version == "1.1.0"
    for bad in ({"cniVersion": "1.0.0", "name": "-bad", "type": "ptp"},
                {"cniVersion": "2.0.0", "name": "n", "type": "ptp"},
                {"cniVersion": "1.0.0", "name": "n", "plugins": []},
                {"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "../x"}]},
                "{not json"):
        with pytest.raises(InvalidNetworkConfig):
            NetworkConfig.load(bad)


def test_validate_asks_every_plugin_for_its_versions(fakes):
    runtime, _ = fakes
    runtime.validate(chain("1.1.0"))
    with pytest.raises(InvalidNetworkConfig, match="does not support cniVersion 0.4.0"):
        runtime.validate(chain("0.4.0"))


@pytest.mark.parametrize("container_id,ifname", [
    ("", "eth0"), ("../etc", "eth0"), ("-x", "eth0"), ("c1", ""), ("c1", "a" * 16),
    ("c1", "eth/0"), ("c1", "eth:0"), ("c1", ".."),
])
def test_attachments_with_unusable_ids_or_interface_names_are_refused(container_id, ifname):
    with pytest.raises(InvalidNetworkConfig):
        Attachment(container_id, "/var/run/netns/x", ifname)
