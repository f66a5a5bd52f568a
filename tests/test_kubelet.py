"""The lab's kubelet (lab.kubelet) does what a kubelet does with a pod spec, so that running
the rendered chart in the lab tests the chart's wiring: $(VAR) expansion, the downward API,
command and args against the image's entrypoint, Kubernetes' capability rule, volumes and
their mounts; and lab.chart maps a path inside a container to the lab node's file."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from lab.chart import flag, host_side
from lab.kubelet import (
    PodContext,
    PodError,
    capabilities,
    container_argv,
    container_env,
    container_mounts,
    expand,
    host_path,
    prepare_volumes,
)

CTX = PodContext("pipit-node-n1", "kube-system", "uid-1", "n1", "10.99.0.11",
                 labels={"app": "pipit"})


def test_var_references_expand_as_kubernetes_does():
    env = {"NODENAME": "n1", "EMPTY": ""}
    assert expand("--node=$(NODENAME)", env) == "--node=n1"
    assert expand("$(UNDEFINED)/$(EMPTY)x", env) == "$(UNDEFINED)/x"
    assert expand("$$(NODENAME) costs $$5", env) == "$(NODENAME) costs $5"


def test_the_environment_takes_the_image_s_then_the_downward_api_and_references():
    container = {"name": "agent", "env": [
        {"name": "NODENAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "WHERE", "value": "$(NODENAME) in $(NS)"},
        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
        {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
        {"name": "PATH", "value": "/x:$(PATH)"}]}
    objects = {"Secret": {"s": {"k": "secret"}}}
    env = container_env(container, ["PATH=/usr/bin", "LANG=C"], CTX, objects)
    assert env["NODENAME"] == "n1" and env["NS"] == "kube-system" and env["APP"] == "pipit"
    assert env["WHERE"] == "n1 in $(NS)"  # only variables defined before it
    assert env["IP"] == "10.99.0.11" and env["KEY"] == "secret"
    assert env["PATH"] == "/x:/usr/bin" and env["LANG"] == "C" and env["HOSTNAME"] == "n1"


def test_a_reference_that_does_not_resolve_stops_the_pod():
    container = {"name": "agent", "env": [
        {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "missing", "key": "k"}}}]}
    with pytest.raises(PodError, match="Secret missing does not exist"):
        container_env(container, [], CTX, {})
    container["env"][0]["valueFrom"]["secretKeyRef"]["optional"] = True
    assert "KEY" not in container_env(container, [], CTX, {})


@pytest.mark.parametrize("container, argv", [
    ({"name": "c"}, ["pipit-agent", "--help"]),                         # the image's
    ({"name": "c", "args": ["--version"]}, ["/entry", "--version"]),
    ({"name": "c", "command": ["pipitctl"]}, ["pipitctl"]),             # no image Cmd then
    ({"name": "c", "command": ["a"], "args": ["--node=$(N)"]}, ["a", "--node=n1"]),
])
def test_command_and_args_combine_with_the_image_as_kubernetes_says(container, argv):
    config = {"Entrypoint": ["/entry"], "Cmd": ["--help"]}
    if container == {"name": "c"}:
        config = {"Cmd": ["pipit-agent", "--help"]}
    assert container_argv(container, config, {"N": "n1"}) == argv


@pytest.mark.parametrize("security, kept", [
    ({"capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}},
     ["NET_ADMIN", "NET_RAW"]),
    ({"capabilities": {"drop": ["ALL"]}}, []),
    ({"capabilities": {"drop": ["NET_RAW", "CAP_MKNOD"]}},
     ["AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "NET_BIND_SERVICE",
      "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"]),
    ({"privileged": True}, None),
])
def test_capabilities_follow_the_runtime_default_drop_and_add(security, kept):
    assert capabilities(security) == kept


def test_volumes_become_files_and_directories_and_mounts_come_parents_first(tmp_path):
    spec = {"volumes": [
        {"name": "state", "hostPath": {"path": "/run/pipit", "type": "DirectoryOrCreate"}},
        {"name": "etcd", "hostPath": {"path": "/shared/etcd"}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "tls", "secret": {"secretName": "etcd-tls", "defaultMode": 0o400,
                                   "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"name": "cni", "configMap": {"name": "cni"}},
        {"name": "bgp", "projected": {"defaultMode": 0o400, "sources": [{"secret": {
            "name": "pw", "items": [{"key": "tor", "path": "pw/tor"}]}}]}},
        {"name": "info", "downwardAPI": {"items": [
            {"path": "node", "fieldRef": {"fieldPath": "spec.nodeName"}}]}}]}
    objects = {"Secret": {"etcd-tls": {"ca.crt": base64.b64encode(b"CA").decode(),
                                       "tls.key": base64.b64encode(b"K").decode()},
                          "pw": {"tor": base64.b64encode(b"hunter2").decode()}},
               "ConfigMap": {"cni": {"conflist.template": "{}"}}}
    node_root = tmp_path / "n1"
    volumes = prepare_volumes(spec, tmp_path / "pod", node_root, ["/shared/etcd"], CTX, objects)
    assert volumes["state"] == node_root / "run" / "pipit" and volumes["state"].is_dir()
    assert volumes["etcd"] == Path("/shared/etcd")  # the same on every node
    assert sorted(os.listdir(volumes["tls"])) == ["ca.crt"]  # only the items asked for
    assert stat.S_IMODE(os.stat(volumes["tls"] / "ca.crt").st_mode) == 0o400
    assert (volumes["bgp"] / "pw" / "tor").read_bytes() == b"hunter2"
    assert (volumes["cni"] / "conflist.template").read_text() == "{}"
    assert (volumes["info"] / "node").read_text() == "n1"
    container = {"name": "agent", "volumeMounts": [
        {"name": "tls", "mountPath": "/etc/pipit/etcd", "readOnly": True},
        {"name": "state", "mountPath": "/run/pipit"},
        {"name": "cni", "mountPath": "/etc/pipit/cni/conflist.json",
         "subPath": "conflist.template"},
        {"name": "tmp", "mountPath": "/"}]}
    mounts = container_mounts(container, volumes, ["/shared/etcd"])
    assert [m["target"] for m in mounts][0] == "/"
    assert {m["target"]: m["readOnly"] for m in mounts}["/etc/pipit/etcd"] is True
    assert {m["target"]: m["file"] for m in mounts}["/etc/pipit/cni/conflist.json"] is True
    with pytest.raises(PodError, match="mounts volume nope"):
        container_mounts({"name": "x", "volumeMounts": [{"name": "nope", "mountPath": "/a"}]},
                         volumes, [])


def test_a_host_path_that_must_exist_and_does_not_stops_the_pod(tmp_path):
    with pytest.raises(PodError, match="not a directory"):
        host_path({"path": "/lib/modules", "type": "Directory"}, tmp_path, [])


def test_a_container_path_maps_to_the_node_s_file_through_its_mounts():
    spec = {"volumes": [{"name": "state", "hostPath": {"path": "/run/pipit"}},
                        {"name": "conf", "hostPath": {"path": "/etc/cni/net.d"}},
                        {"name": "tmp", "emptyDir": {}}]}
    agent = {"name": "agent", "args": ["--state-dir=/run/pipit",
                                       "--cni-conf-file=/host/etc/cni/net.d/10-pipit.conflist"],
             "volumeMounts": [{"name": "state", "mountPath": "/run/pipit"},
                              {"name": "conf", "mountPath": "/host/etc/cni/net.d"},
                              {"name": "tmp", "mountPath": "/tmp"}]}
    root = Path("/lab/n1/root")
    assert host_side(flag(agent["args"], "cni-conf-file"), agent, spec, root) == \
        root / "etc/cni/net.d/10-pipit.conflist"
    assert host_side("/run/pipit/status.sock", agent, spec, root) == root / "run/pipit/status.sock"
    with pytest.raises(LookupError):
        host_side("/tmp/x", agent, spec, root)  # an emptyDir is nowhere on the node
