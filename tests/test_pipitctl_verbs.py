"""The calicoctl verbs operators reach for, through the real `pipitctl` against a real etcd:
replace, patch, label, delete of several (all or none), create --skip-exists, get of several,
by label selector, -o name and custom-columns, -f DIRECTORY, and the empty kind round trip."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import yaml

from ipam import keys
from lab.process import wait
from tests.helpers import add_pool, with_store
from tests.pipitctl_support import ROOT, assign, ok, pool_yaml, snapshot, stream
from tests.sentences import one_sentence


def spec_of(ctl, kind: str, name: str) -> dict:
    return yaml.safe_load(ok(ctl("get", kind, name, "-o", "yaml")))["spec"]


def node_yaml(name: str, **labels: str) -> str:
    return yaml.safe_dump({"apiVersion": "pipit.dev/v1", "kind": "Node",
                           "metadata": {"name": name, "labels": labels}, "spec": {}})


# --------------------------------------------------------------------------------------------
# replace, create --skip-exists


def test_replace_changes_only_what_exists_and_writes_none_if_one_is_missing(etcd, ctl):
    ok(ctl("apply", "-f", "-", input=pool_yaml("a", cidr="10.80.0.0/16")))
    assert ok(ctl("replace", "-f", "-", input=pool_yaml("a", cidr="10.80.0.0/16",
                                                         natOutgoing=True))) == \
        "ippool 'a' configured\n"
    before = snapshot(etcd)
    both = stream(pool_yaml("a", cidr="10.80.0.0/16"), pool_yaml("b", cidr="10.81.0.0/16"))
    one_sentence(ctl("replace", "-f", "-", input=both), "document 2: ippool 'b' does not exist",
                 "pipitctl apply")
    assert snapshot(etcd) == before


def test_create_skip_exists_creates_the_others_and_leaves_the_existing(etcd, ctl):
    ok(ctl("apply", "-f", "-", input=pool_yaml("a", cidr="10.80.0.0/16")))
    before = snapshot(etcd)[keys.pool_key("a")]
    both = stream(pool_yaml("a", cidr="10.80.0.0/16", natOutgoing=True),
                  pool_yaml("b", cidr="10.81.0.0/16"))
    assert ok(ctl("create", "--skip-exists", "-f", "-", input=both)) == \
        "ippool 'a' already exists (skipped)\nippool 'b' created\n"
    assert snapshot(etcd)[keys.pool_key("a")] == before


# --------------------------------------------------------------------------------------------
# patch


def test_patch_merges_removes_with_null_and_validates(etcd, ctl):
    ok(ctl("apply", "-f", "-", input=pool_yaml("a", cidr="10.80.0.0/16",
                                               nodeSelector="rack == 'x'")))
    assert ok(ctl("patch", "ippool", "a", "-p", '{"spec": {"natOutgoing": true}}')) == \
        "ippool 'a' configured\n"
    spec = spec_of(ctl, "ippool", "a")
    assert spec["natOutgoing"] is True and spec["nodeSelector"] == "rack == 'x'"
    ok(ctl("patch", "ippool", "a", "-p", "spec: {nodeSelector: null}"))  # YAML too
    assert spec_of(ctl, "ippool", "a")["nodeSelector"] == "all()"
    assert ok(ctl("patch", "ippool", "a", "-p", '{"metadata": {"labels": {"t": "x"}}}')) == \
        "ippool 'a' configured\n"

    before = snapshot(etcd)
    for patch, facts in [
            ('{"spec": {"blockSize": 24}}', ["blockSize cannot change"]),
            ('{"spec": {"ipipMode": "always"}}', ["ipipMode 'always'"]),
            ('{"metadata": {"name": "b"}}', ["cannot be renamed"]),
            ('{"spec": {"natOutgoing": true', ["not valid YAML"]),
            ('[1, 2]', ["one mapping"]),
            ('{"metadata": {"resourceVersion": "1"}, "spec": {"disabled": true}}',
             ["changed since resourceVersion 1"])]:
        one_sentence(ctl("patch", "ippool", "a", "-p", patch), *facts)
    one_sentence(ctl("patch", "ippool", "nope", "-p", "{}"), "ippool 'nope' not found")
    assert snapshot(etcd) == before


# --------------------------------------------------------------------------------------------
# label, get -l


def test_label_sets_overwrites_removes_and_selects(etcd, ctl):
    for name, rack in (("n1", "a"), ("n2", "b"), ("n3", "a")):
        ok(ctl("apply", "-f", "-", input=node_yaml(name, rack=rack)))
    assert ok(ctl("label", "nodes", "n2", "edge=true", "zone=z1")) == "node 'n2' labeled\n"
    before = snapshot(etcd)
    one_sentence(ctl("label", "node", "n2", "rack=a"), "already has label rack='b'",
                 "--overwrite")
    one_sentence(ctl("label", "node", "n2", "bad key!=x"), "label key 'bad key!'")
    one_sentence(ctl("label", "node", "n2", "justakey"), "KEY=VALUE", "KEY-")
    one_sentence(ctl("label", "node", "nope", "a=b"), "node 'nope' not found")
    assert snapshot(etcd) == before
    ok(ctl("label", "node", "n2", "rack=a", "--overwrite"))
    assert ok(ctl("get", "nodes", "-l", "rack == 'a'", "-o", "name")) == \
        "node/n1\nnode/n2\nnode/n3\n"
    assert ok(ctl("get", "nodes", "-l", "has(edge) && zone == 'z1'", "-o", "name")) == \
        "node/n2\n"
    ok(ctl("label", "node", "n2", "edge-", "--remove", "zone"))
    assert ok(ctl("get", "nodes", "-l", "has(edge) || has(zone)", "-o", "name")) == ""
    assert ok(ctl("label", "node", "n2", "edge-")) == "node 'n2' unchanged\n"
    one_sentence(ctl("get", "nodes", "-l", "rack = 'a'"), "selector", "use == or !=")


# --------------------------------------------------------------------------------------------
# delete several, all or none


def test_delete_of_several_is_all_or_none(etcd, ctl, tmp_path):
    ok(ctl("apply", "-f", "-", input=stream(*(pool_yaml(n, cidr=f"10.8{i}.0.0/24",
                                                        blockSize=28)
                                              for i, n in enumerate("abc")))))
    before = snapshot(etcd)
    one_sentence(ctl("delete", "ippool", "a", "nope", "b"), "ippool 'nope' not found",
                 "nothing was deleted", "--skip-not-exists")
    assert snapshot(etcd) == before
    assign(etcd, ("n1", "pod", 1, {}, ["c"]))
    before = snapshot(etcd)
    path = tmp_path / "pools.yaml"
    path.write_text(stream(pool_yaml("a", cidr="10.80.0.0/24"),
                           pool_yaml("c", cidr="10.82.0.0/24")))
    one_sentence(ctl("delete", "-f", str(path)), "'c' still has 1 address(es) in use",
                 "nothing was deleted", "--force")
    assert snapshot(etcd) == before
    assert ok(ctl("delete", "ippool", "a", "nope", "b", "--skip-not-exists")) == (
        "ippool 'a' deleted\nippool 'nope' does not exist (skipped)\nippool 'b' deleted\n")
    assert ok(ctl("get", "ippools", "-o", "name")) == "ippool/c\n"


# --------------------------------------------------------------------------------------------
# get: several names, -o name, custom-columns


def test_get_several_names_and_output_formats(etcd, ctl):
    ok(ctl("apply", "-f", "-", input=stream(pool_yaml("a", cidr="10.80.0.0/16"),
                                            pool_yaml("b", cidr="10.81.0.0/24", blockSize=28),
                                            pool_yaml("c", cidr="10.82.0.0/16"))))
    assert ok(ctl("get", "ippools", "c", "a", "-o", "name")) == "ippool/c\nippool/a\n"
    table = ok(ctl("get", "ippools", "b", "a", "-o", "custom-columns=NAME,BLOCKSIZE,CIDR"))
    assert [line.split() for line in table.splitlines()] == [
        ["NAME", "BLOCKSIZE", "CIDR"], ["b", "28", "10.81.0.0/24"], ["a", "26", "10.80.0.0/16"]]
    documents = json.loads(ok(ctl("get", "ippools", "a", "b", "-o", "json")))
    assert [d["metadata"]["name"] for d in documents["items"]] == ["a", "b"]
    one_sentence(ctl("get", "ippools", "a", "nope"), "ippool 'nope' not found")
    one_sentence(ctl("get", "ippools", "-o", "custom-columns=NAME,COLOUR"), "'COLOUR'",
                 "BLOCKSIZE")
    one_sentence(ctl("get", "ippools", "-o", "xml"), "'xml'", "custom-columns")
    one_sentence(ctl("get"), "say which kind",
                 "ippools, bgppeers, bgpconfigurations, nodes or workloadendpoints")


def test_an_empty_kind_round_trips_as_a_no_op(etcd, ctl):
    for fmt in ("yaml", "json"):
        shown = ok(ctl("get", "bgppeers", "-o", fmt))
        assert ok(ctl("apply", "-f", "-", input=shown)) == ""
    one_sentence(ctl("apply", "-f", "-", input=""), "no resources")
    assert snapshot(etcd) == {}


# --------------------------------------------------------------------------------------------
# -f DIRECTORY


def test_a_directory_is_one_input(etcd, ctl, tmp_path):
    (tmp_path / "1-pools.yaml").write_text(stream(pool_yaml("a", cidr="10.80.0.0/16"),
                                                  pool_yaml("b", cidr="10.81.0.0/16")))
    (tmp_path / "2-node.json").write_text(json.dumps(yaml.safe_load(node_yaml("n1", r="x"))))
    (tmp_path / "README.md").write_text("not a resource")
    assert ok(ctl("apply", "-f", str(tmp_path))) == (
        "ippool 'a' created\nippool 'b' created\nnode 'n1' created\n")
    (tmp_path / "3-bad.yml").write_text(pool_yaml("c", cidr="10.80.0.0/24"))
    before = snapshot(etcd)
    one_sentence(ctl("apply", "-f", str(tmp_path)), str(tmp_path / "3-bad.yml"),
                 "overlaps pool 'a'")
    (tmp_path / "3-bad.yml").write_text(pool_yaml("a", cidr="10.80.0.0/16"))
    one_sentence(ctl("apply", "-f", str(tmp_path)), "ippool 'a' is also",
                 str(tmp_path / "1-pools.yaml"))
    assert snapshot(etcd) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    one_sentence(ctl("apply", "-f", str(empty)), "holds no .yaml, .yml or .json file")


# --------------------------------------------------------------------------------------------
# Ctrl-C while waiting on stdin


def test_ctrl_c_interrupts_apply_waiting_on_stdin(etcd):
    env = {**os.environ, "PIPIT_ETCD_ENDPOINTS": etcd.endpoints[0]}
    process = subprocess.Popen([sys.executable, "-m", "pipitctl", "apply", "-f", "-"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=ROOT, env=env, text=True,
                               preexec_fn=as_in_a_terminal)
    try:
        wait(lambda: _reading_stdin(process.pid), 20, "pipitctl to wait on stdin")
        process.send_signal(signal.SIGINT)
        wait(lambda: process.poll() is not None, 10, "pipitctl to stop on Ctrl-C")
        assert process.returncode == 130
        assert "Traceback" not in process.stderr.read()
    finally:
        process.kill()
        process.wait()
        process.stdin.close()
        process.stdout.close()
        process.stderr.close()


def as_in_a_terminal() -> None:
    """Ctrl-C as a terminal delivers it: to a process that does not ignore SIGINT. (A run
    started in the background by a script without job control inherits SIGINT ignored, and
    Python then leaves it ignored: Ctrl-C could not be tested from there.)"""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _reading_stdin(pid: int) -> bool:
    """The process is blocked in a read of its stdin (fd 0)."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return False
    return len(fields) > 1 and fields[0] == "0" and int(fields[1], 16) == 0  # read(0, ...)


# --------------------------------------------------------------------------------------------
# Stored resources that fail today's validation


def test_invalid_stored_resources_are_listed_got_fixed_and_deleted(etcd, ctl):
    from aetcd import rpc
    from ipam.store import Store

    async def damage(store: Store):
        await add_pool(store, "good", "10.80.0.0/16")
        await store.put(keys.pool_key("hostbits"), {
            "apiVersion": "pipit.dev/v1", "kind": "IPPool", "metadata": {"name": "hostbits"},
            "spec": {"cidr": "10.81.0.1/16"}})
        await store.put(keys.pool_key("renamed"), {
            "apiVersion": "pipit.dev/v1", "kind": "IPPool", "metadata": {"name": "other"},
            "spec": {"cidr": "10.82.0.0/16"}})
        await store._call("Put", rpc.PutRequest(key=keys.node_key("garbled").encode(),
                                                value=b"{not json"))
    with_store(etcd, damage)

    rows = {line.split()[0]: line for line in ok(ctl("get", "ippools")).splitlines()[1:]}
    assert sorted(rows) == ["good", "hostbits", "renamed"]
    assert "(invalid: IPPool 'hostbits': cidr 10.81.0.1/16 has host bits set" in rows["hostbits"]
    assert "(invalid: it is named 'other' inside)" in rows["renamed"]
    assert "(invalid" in ok(ctl("get", "ippools", "-o", "wide"))
    assert "(invalid: it is not a JSON object)" in ok(ctl("get", "nodes", "garbled"))
    shown = yaml.safe_load(ok(ctl("get", "ippool", "hostbits", "-o", "yaml")))
    assert shown["spec"]["cidr"] == "10.81.0.1/16" and shown["metadata"]["resourceVersion"]

    # fixed by applying a valid one over it (its resourceVersion is the invalid one's)
    shown["spec"]["cidr"] = "10.81.0.0/16"
    assert ok(ctl("apply", "-f", "-", input=yaml.safe_dump(shown))) == \
        "ippool 'hostbits' configured\n"
    assert ok(ctl("delete", "ippool", "renamed")) == "ippool 'renamed' deleted\n"
    assert ok(ctl("delete", "node", "garbled")) == "node 'garbled' deleted\n"
    assert ok(ctl("get", "ippools", "-o", "name")) == "ippool/good\nippool/hostbits\n"
    assert keys.node_key("garbled") not in snapshot(etcd)


# --------------------------------------------------------------------------------------------
# Versions


def test_every_executable_says_its_version_and_pipitctl_the_agents(etcd, ctl):
    from pathlib import Path

    from bgp_agent.node import NodeRecord, register
    from bgp_agent.version import software_version

    version = software_version()
    assert version != "unknown"  # the tests run on an installed tree
    bin_dir = Path(sys.executable).parent
    for executable in ("pipitctl", "pipit-agent", "pipit-exabgp-bridge"):
        result = subprocess.run([str(bin_dir / executable), "--version"], capture_output=True,
                                text=True, timeout=30)
        assert (result.returncode, result.stdout) == (0, f"{executable} {version}\n"), result

    assert ok(ctl("version")) == (f"Client Version:  {version}\n"
                                  "Agent Versions:  (no node has registered)\n")

    async def nodes(store):
        for name in ("n1", "n2"):
            await register(store, NodeRecord(name))
    with_store(etcd, nodes)
    ok(ctl("apply", "-f", "-", input=node_yaml("by-hand")))
    assert ok(ctl("version")).splitlines() == [
        f"Client Version:  {version}",
        f"Agent Versions:  {version} (2 nodes: n1, n2)",
        "                 unknown (1 node: by-hand)"]
    assert ok(ctl("version", "--client", "--etcd-endpoints", "http://127.0.0.1:1")) == \
        f"Client Version:  {version}\n"


# --------------------------------------------------------------------------------------------
# Shell completion, through bash itself


def complete(words: list[str], env: dict[str, str]) -> list[str]:
    """What bash offers for the last word after `source <(pipitctl completion bash)`."""
    from pathlib import Path
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    script = ("source <(pipitctl completion bash); COMP_WORDS=(\"$@\"); "
              "COMP_CWORD=$(($# - 1)); _pipitctl_completion pipitctl; "
              "printf '%s\\n' \"${COMPREPLY[@]}\"")
    result = subprocess.run(["bash", "-c", script, "bash", *words], capture_output=True,
                            text=True, timeout=60, env={**os.environ, **env, "PATH": path})
    assert result.returncode == 0 and result.stderr == "", result
    return [line for line in result.stdout.splitlines() if line]


def test_bash_completes_verbs_kinds_and_the_names_etcd_holds(etcd, ctl):
    ok(ctl("apply", "-f", "-", input=stream(pool_yaml("web-a", cidr="10.80.0.0/16"),
                                            pool_yaml("web-b", cidr="10.81.0.0/16"),
                                            pool_yaml("db", cidr="10.82.0.0/16"))))
    env = {"PIPIT_ETCD_ENDPOINTS": etcd.endpoints[0]}
    assert sorted(complete(["pipitctl", "la"], env)) == ["lab", "label"]
    assert sorted(complete(["pipitctl", "get", "bgp"], env)) == ["bgpconfigurations",
                                                                   "bgpfilters", "bgppeers"]
    assert complete(["pipitctl", "get", "ippools", "web"], env) == ["web-a", "web-b"]
    assert complete(["pipitctl", "delete", "ippool", "web-a", ""], env) == ["db", "web-b"]
    assert complete(["pipitctl", "patch", "ipp", "d"], env) == ["db"]
    # etcd away: nothing offered, nothing printed
    assert complete(["pipitctl", "get", "ippools", ""],
                    {"PIPIT_ETCD_ENDPOINTS": "http://127.0.0.1:1"}) == []
    assert "_pipitctl_completion" in ok(ctl("completion", "zsh"))
