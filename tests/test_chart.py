"""charts/pipit: `helm lint --strict`, the `helm template` matrix (mesh, reflectors, IPIP,
VXLAN, etcd TLS, no RBAC: charts/pipit/ci/*.yaml), every rendering validated by
kubernetes-validate --strict for two Kubernetes versions, assertions on the rendered objects
(what a user relies on: privileges, probes, wiring, RBAC), and values the schema refuses with
a message naming the key. The wiring is also checked against Pipit's own parsers: the
agent's arguments, install-cni's, the conflist template and the hook's resources.

The lab (tests/test_lab_chart.py) runs what the chart renders."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest

from bgp_agent import agent
from bgp_agent.cni_conflist import ConflistWriter
from bgp_agent.exabgp_process import exabgp_command
from ipam import image_plugins
from lab.chart import CHART, HELM, ChartError, container, find, of_kind, render
from pipitctl.resources import read_objects
from tests.helpers import require

pytestmark = pytest.mark.kube
MATRIX = sorted((CHART / "ci").glob("*-values.yaml"))
KUBERNETES = ("1.30.0", "1.35.0")  # the oldest minor the chart's kubeVersion allows that the
#                                    validator knows well, and the current one
ENDPOINTS = {"etcd.endpoints": "{http://10.0.0.10:2379}"}


@pytest.fixture(scope="module", autouse=True)
def helm():
    require(HELM.exists(), f"needs helm at {HELM}: run scripts/setup.sh")


def rendered(name: str, **set_values) -> list[dict]:
    return render(values=[CHART / "ci" / f"{name}-values.yaml"], set_values=set_values)


def pod(objects, kind: str, name: str) -> dict:
    return find(objects, kind, name)["spec"]["template"]["spec"]


def env_of(entry: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in entry.get("env", [])}


# -- lint, the matrix, the Kubernetes schemas -------------------------------------------------

@pytest.mark.parametrize("values", MATRIX, ids=lambda p: p.stem)
def test_helm_lint_strict_passes(values):
    result = subprocess.run([str(HELM), "lint", "--strict", str(CHART), "--values", str(values)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout


@pytest.mark.parametrize("version", KUBERNETES)
@pytest.mark.parametrize("values", MATRIX, ids=lambda p: p.stem)
def test_every_rendering_is_valid_kubernetes_strictly(values, version):
    objects = render(values=[values], kube_version=version)
    assert objects
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)  # raises on a bad field


def test_a_misspelt_field_is_caught_by_the_strict_validation():
    """The check above can fail: a field Kubernetes does not know is an error."""
    daemonset = find(rendered("mesh"), "DaemonSet", "pipit-node")
    container(daemonset["spec"]["template"]["spec"], "agent")["securityContext"]["privilegd"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, KUBERNETES[-1], strict=True)


# -- the node DaemonSet -------------------------------------------------------------------------

def test_the_node_daemonset_runs_everywhere_on_the_host_network_and_is_node_critical():
    objects = rendered("mesh", **{"node.maxUnavailable": "3"})
    daemonset = find(objects, "DaemonSet", "pipit-node")
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert daemonset["spec"]["updateStrategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 3}}
    assert [c["name"] for c in spec["initContainers"]] == ["install-cni"]
    assert [c["name"] for c in spec["containers"]] == ["agent", "exabgp"]


def test_each_container_has_only_the_privileges_it_needs():
    spec = pod(rendered("mesh"), "DaemonSet", "pipit-node")
    caps = {c["name"]: c["securityContext"]["capabilities"]
            for c in spec["initContainers"] + spec["containers"]}
    assert caps == {"install-cni": {"drop": ["ALL"]},
                    "agent": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
                    "exabgp": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}
    for entry in spec["initContainers"] + spec["containers"]:
        assert entry["securityContext"]["allowPrivilegeEscalation"] is False
        assert entry["securityContext"]["readOnlyRootFilesystem"] is True
        assert "privileged" not in entry["securityContext"]


def test_the_agent_is_wired_to_its_node_name_health_endpoints_and_the_sidecar():
    spec = pod(rendered("mesh"), "DaemonSet", "pipit-node")
    agent_container = container(spec, "agent")
    assert env_of(agent_container)["NODENAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env_of(agent_container)["PIPIT_ETCD_ENDPOINTS"] == "http://10.0.0.10:2379"
    args = agent_container["args"]
    assert "--node=$(NODENAME)" in args and "--sigterm=exit" in args
    assert "--exabgp=sidecar" in args
    for probe, path in (("startupProbe", "/livez"), ("livenessProbe", "/livez"),
                        ("readinessProbe", "/readyz")):
        assert agent_container[probe]["httpGet"] == {"host": "127.0.0.1", "port": 9199,
                                                     "path": path}
    assert "--health-listen=127.0.0.1:9199" in args
    # ExaBGP shares the agent's state directory (where the agent writes its configuration)
    exabgp = container(spec, "exabgp")
    state = {"name": "state", "mountPath": "/run/pipit"}
    assert state in agent_container["volumeMounts"] and state in exabgp["volumeMounts"]
    script = exabgp["command"][-1].replace("$state", "/run/pipit/exabgp").replace('"', "")
    # the same command as the agent's own (pipit-exabgp: ExaBGP with Pipit's reactor fixes)
    command = exabgp_command(Path("/run/pipit/exabgp"))
    assert " ".join(["exec", Path(command[0]).name, *command[1:]]) in script


def test_the_agent_arguments_the_chart_renders_are_pipit_agents():
    """Every flag the chart passes exists and parses (with $(NODENAME) as the kubelet fills
    it in), whatever the matrix entry."""
    for values in MATRIX:
        spec = pod(render(values=[values]), "DaemonSet", "pipit-node")
        entry = container(spec, "agent")
        assert entry["command"] == ["pipit-agent"]
        args = agent.parse_args([a.replace("$(NODENAME)", "node-1") for a in entry["args"]])
        assert args.node == "node-1" and args.sigterm == "exit" and args.exabgp == "sidecar"
        assert args.cni_conf_file == "/host/etc/cni/net.d/10-pipit.conflist"
        install = container(spec, "install-cni")
        assert install["command"][0] == "pipit-install-cni"
        parsed = image_plugins.parse_args(install["command"][1:] + install["args"])
        assert parsed.to == "/host/opt/cni/bin" and parsed.plugin


def test_install_cni_copies_the_plugins_asked_for(tmp_path):
    spec = pod(rendered("mesh", **{"node.cni.installPlugins": "{ptp,bridge}"}),
               "DaemonSet", "pipit-node")
    entry = container(spec, "install-cni")
    assert entry["command"] + entry["args"] == [
        "pipit-install-cni", "--to", "/host/opt/cni/bin", "--plugin=ptp", "--plugin=bridge"]
    assert {"name": "cni-bin", "mountPath": "/host/opt/cni/bin"} in entry["volumeMounts"]


def test_the_conflist_template_makes_a_conflist_the_agent_accepts():
    objects = rendered("mesh")
    template = find(objects, "ConfigMap", "pipit-cni")["data"]["conflist.template"]
    conf = json.loads(ConflistWriter(Path("/x"), template, "/run/pipit/ipam.sock",
                                     "n1").render(1450))
    assert conf["plugins"][0] == {"type": "ptp", "mtu": 1450, "ipam": {
        "type": "pipit-ipam", "socket": "/run/pipit/ipam.sock"}}


def test_a_changed_conflist_template_rolls_the_daemonset(tmp_path):
    def checksum(*values):
        return find(render(values=[CHART / "ci" / "mesh-values.yaml", *values]),
                    "DaemonSet", "pipit-node")["spec"]["template"]["metadata"]["annotations"][
                        "checksum/cni-template"]
    other = tmp_path / "bridge.yaml"
    other.write_text(json.dumps({"node": {"cni": {"conflistTemplate": json.dumps(
        {"name": "pipit", "plugins": [{"type": "bridge", "ipam": {"type": "pipit-ipam"}}]})}}}))
    assert checksum() != checksum(other)


# -- etcd TLS, BGP passwords ------------------------------------------------------------------

def test_etcd_tls_from_values_and_a_user_are_in_every_component():
    objects = rendered("etcd-tls")
    secret = find(objects, "Secret", "pipit-etcd-tls")
    assert set(secret["data"]) == {"ca.crt", "tls.crt", "tls.key"}
    pods = [pod(objects, "DaemonSet", "pipit-node"), pod(objects, "Deployment", "pipit-controller"),
            pod(objects, "Job", "pipit-config"), find(objects, "Pod", "pipit-test-ipam")["spec"]]
    for spec in pods:
        [volume] = [v for v in spec["volumes"] if v["name"] == "etcd-tls"]
        assert volume["secret"]["secretName"] == "pipit-etcd-tls"
        assert volume["secret"]["defaultMode"] == 0o400
        for entry in spec["containers"]:
            if entry["name"] == "exabgp":
                assert all(m["name"] != "etcd-tls" for m in entry["volumeMounts"])
                continue
            assert {"name": "etcd-tls", "mountPath": "/etc/pipit/etcd",
                    "readOnly": True} in entry["volumeMounts"]
            env = env_of(entry)
            assert env["PIPIT_ETCD_CERT_FILE"] == "/etc/pipit/etcd/tls.crt"
            # etcd's user and password, from the Secret named (its keys as given)
            assert (env["PIPIT_ETCD_USERNAME"], env["PIPIT_ETCD_PASSWORD"]) == (
                {"secretKeyRef": {"name": "etcd-user", "key": "username"}},
                {"secretKeyRef": {"name": "etcd-user", "key": "secret"}})


def test_an_existing_etcd_secret_is_used_and_none_is_made():
    objects = rendered("no-rbac")
    assert not of_kind(objects, "Secret")
    assert not {"PIPIT_ETCD_USERNAME", "PIPIT_ETCD_PASSWORD"} & set(env_of(
        pod(objects, "DaemonSet", "pipit-node")["containers"][0]))  # no etcd user given
    [volume] = [v for v in pod(objects, "DaemonSet", "pipit-node")["volumes"]
                if v["name"] == "etcd-tls"]
    assert volume["secret"]["secretName"] == "etcd-client"


def test_bgp_passwords_come_from_secrets_laid_out_for_the_agents_secrets_dir():
    spec = pod(rendered("reflectors"), "DaemonSet", "pipit-node")
    [volume] = [v for v in spec["volumes"] if v["name"] == "bgp-secrets"]
    assert volume["projected"]["sources"] == [{"secret": {"name": "bgp-passwords", "items": [
        {"key": "rack-a", "path": "bgp-passwords/rack-a", "mode": 0o400}]}}]
    assert "--secrets-dir=/etc/pipit/bgp-secrets" in container(spec, "agent")["args"]


def test_the_mesh_password_comes_from_a_secret_mounted_once_beside_the_peers():
    mesh = {"bgp.nodeMeshPassword.secretKeyRef.name": "bgp-passwords",
            "bgp.nodeMeshPassword.secretKeyRef.key": "mesh"}
    objects = rendered("reflectors", **mesh, **{"routeReflector.enabled": "false"})
    [volume] = [v for v in pod(objects, "DaemonSet", "pipit-node")["volumes"]
                if v["name"] == "bgp-secrets"]
    assert volume["projected"]["sources"] == [
        {"secret": {"name": "bgp-passwords", "items": [
            {"key": key, "path": f"bgp-passwords/{key}", "mode": 0o400}]}}
        for key in ("mesh", "rack-a")]
    resources = read_objects(find(objects, "ConfigMap", "pipit-config")["data"]["resources.yaml"])
    [config] = [i.obj for i in resources if i.kind.name == "BGPConfiguration"]
    assert str(config.node_mesh_password) == "secret:bgp-passwords/mesh"
    # the same key for a peer and the mesh is mounted once (a projected volume refuses a
    # path twice)
    same = rendered("reflectors", **{**mesh, "bgp.nodeMeshPassword.secretKeyRef.key": "rack-a",
                                     "routeReflector.enabled": "false"})
    [volume] = [v for v in pod(same, "DaemonSet", "pipit-node")["volumes"]
                if v["name"] == "bgp-secrets"]
    assert [item["path"] for source in volume["projected"]["sources"]
            for item in source["secret"]["items"]] == ["bgp-passwords/rack-a"]
    assert "bgp-secrets" not in {v["name"] for v in pod(rendered("mesh"), "DaemonSet",
                                                         "pipit-node")["volumes"]}


def test_service_ranges_reach_the_bgp_configuration():
    objects = rendered("mesh", **{"bgp.serviceClusterIPs[0].cidr": "10.96.0.0/12",
                                  "bgp.serviceLoadBalancerIPs[0].cidr": "203.0.113.0/24"})
    resources = read_objects(find(objects, "ConfigMap", "pipit-config")["data"]["resources.yaml"])
    [config] = [i.obj for i in resources if i.kind.name == "BGPConfiguration"]
    assert [str(p) for p in config.service_prefixes] == ["10.96.0.0/12", "203.0.113.0/24"]
    plain = read_objects(find(rendered("mesh"), "ConfigMap", "pipit-config")["data"][
        "resources.yaml"])
    assert [i.obj.service_prefixes for i in plain if i.kind.name == "BGPConfiguration"] == [()]
    assert [i.obj.aggregate_balancers for i in plain if i.kind.name == "BGPConfiguration"] == [
        True]
    objects = rendered("mesh", **{"bgp.serviceLoadBalancerAggregation": "Disabled"})
    resources = read_objects(find(objects, "ConfigMap", "pipit-config")["data"]["resources.yaml"])
    assert [i.obj.aggregate_balancers for i in resources
            if i.kind.name == "BGPConfiguration"] == [False]


def test_listen_port_communities_and_prefix_advertisements_reach_the_bgp_configuration():
    """A chart upgrade applies the BGPConfiguration whole: what it can carry, it must, or an
    upgrade would drop what was set by hand."""
    objects = rendered("mesh", **{"bgp.listenPort": "1179",
                                  "bgp.communities[0]": "64512:100",
                                  "bgp.communities[1].name": "rack-a",
                                  "bgp.communities[1].value": "64512:300",
                                  "bgp.prefixAdvertisements[0].cidr": "10.244.0.0/16",
                                  "bgp.prefixAdvertisements[0].communities[0]": "rack-a"})
    resources = read_objects(find(objects, "ConfigMap", "pipit-config")["data"]["resources.yaml"])
    [config] = [i.obj for i in resources if i.kind.name == "BGPConfiguration"]
    assert config.listen_port == 1179 and config.communities == ((64512, 100),)
    assert config.named_communities == (("rack-a", (64512, 300)),)
    assert [(str(cidr), tokens) for cidr, tokens in config.prefix_advertisements] == [
        ("10.244.0.0/16", ("rack-a",))]
    plain = read_objects(find(rendered("mesh"), "ConfigMap", "pipit-config")["data"][
        "resources.yaml"])
    assert [(i.obj.listen_port, i.obj.prefix_advertisements) for i in plain
            if i.kind.name == "BGPConfiguration"] == [(179, ())]


def test_ipam_settings_reach_the_hook_only_when_asked_to():
    """Opt-in: applied whole on every upgrade, they would undo `pipitctl ipam configure`."""
    def ipam_configs(**values):
        resources = read_objects(find(rendered("mesh", **values), "ConfigMap",
                                      "pipit-config")["data"]["resources.yaml"])
        return [i.obj for i in resources if i.kind.name == "IPAMConfiguration"]
    assert ipam_configs() == []
    [config] = ipam_configs(**{"ipam.configure": "true", "ipam.strictAffinity": "true",
                               "ipam.maxBlocksPerHost": "4", "ipam.ipCooldownSeconds": "30",
                               "ipam.autoAllocateBlocks": "false"})
    assert (config.strict_affinity, config.max_blocks_per_host, config.ip_cooldown_seconds,
            config.auto_allocate_blocks) == (True, 4, 30, False)


# -- route reflectors, controller, RBAC, hooks ----------------------------------------------------

def test_route_reflectors_run_apart_from_the_agents_with_a_disruption_budget():
    objects = rendered("reflectors")
    rr = pod(objects, "DaemonSet", "pipit-route-reflector")
    assert rr["nodeSelector"] == {"pipit.dev/route-reflector": "true"}
    reflector = container(rr, "reflector")
    assert reflector["command"] == ["pipit-rr"]
    assert "--route-reflector-cluster-id=244.0.0.1" in reflector["args"]
    assert [c["name"] for c in rr["containers"]] == ["reflector", "exabgp"]
    budget = find(objects, "PodDisruptionBudget", "pipit-route-reflector")
    assert budget["spec"]["maxUnavailable"] == 1
    # the agents stay off the reflectors, and the user's own affinity still holds
    node = pod(objects, "DaemonSet", "pipit-node")
    [term] = node["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    assert term["matchExpressions"] == [
        {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]},
        {"key": "pipit.dev/route-reflector", "operator": "NotIn", "values": ["true"]}]


def test_without_reflectors_there_is_no_reflector_daemonset_and_no_affinity():
    objects = rendered("mesh")
    assert [d["metadata"]["name"] for d in of_kind(objects, "DaemonSet")] == ["pipit-node"]
    assert "affinity" not in pod(objects, "DaemonSet", "pipit-node")


def test_one_controller_with_the_flags_named_in_values():
    objects = rendered("mesh", **{"controller.gcGracePeriod": "20m",
                                  "controller.flags.gcGracePeriod": "--grace"})
    deployment = find(objects, "Deployment", "pipit-controller")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    entry = container(deployment["spec"]["template"]["spec"], "controller")
    assert entry["command"] == ["pipit-controller"]
    assert entry["args"][:4] == ["--grace=20m", "--lease-name=pipit-controller",
                                 "--lease-namespace=kube-system",
                                 "--load-balancer-ips=AllServices"]
    assert entry["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def rules(objects, kind: str, name: str) -> list[tuple]:
    return sorted((tuple(r.get("apiGroups", [])), tuple(r["resources"]), tuple(r["verbs"]),
                   tuple(r.get("resourceNames", ())))
                  for r in find(objects, kind, name)["rules"])


def test_rbac_per_component_grants_only_what_each_needs():
    objects = rendered("reflectors")
    assert rules(objects, "ClusterRole", "pipit-node") == [
        (("",), ("nodes",), ("get", "list", "watch"), ()),
        (("",), ("nodes/status",), ("patch",), ()),
        (("",), ("pods", "namespaces"), ("get", "list", "watch"), ()),
        (("",), ("services",), ("list", "watch"), ()),
        (("discovery.k8s.io",), ("endpointslices",), ("list", "watch"), ())]
    assert rules(objects, "ClusterRole", "pipit-route-reflector") == [
        (("",), ("nodes",), ("get", "list", "watch"), ())]
    assert rules(objects, "ClusterRole", "pipit-controller") == [
        (("",), ("nodes", "pods", "namespaces"), ("get", "list", "watch"), ()),
        (("",), ("services",), ("get", "list", "watch"), ()),
        (("",), ("services/status",), ("update",), ()),
        (("", "events.k8s.io"), ("events",), ("create", "patch"), ())]
    assert (("",), ("services",), ("get", "list", "watch"), ()) not in rules(
        rendered("reflectors", **{"controller.loadBalancerIPs": "Disabled"}), "ClusterRole",
        "pipit-controller")
    assert rules(objects, "Role", "pipit-controller") == [
        (("coordination.k8s.io",), ("leases",), ("create",), ()),
        (("coordination.k8s.io",), ("leases",), ("get", "update", "patch"),
         ("pipit-controller",))]
    for binding in of_kind(objects, "ClusterRoleBinding") + of_kind(objects, "RoleBinding"):
        [subject] = binding["subjects"]
        assert subject["name"] == binding["roleRef"]["name"]  # each component its own account
    for kind, name in (("DaemonSet", "pipit-node"), ("DaemonSet", "pipit-route-reflector"),
                       ("Deployment", "pipit-controller")):
        assert pod(objects, kind, name)["serviceAccountName"] == name


def test_rbac_create_false_renders_no_rbac_and_uses_the_named_accounts():
    objects = rendered("no-rbac")
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
                        "ServiceAccount"}
    assert pod(objects, "DaemonSet", "pipit-node")["serviceAccountName"] == "pipit-agent"


def test_the_hook_applies_resources_pipitctl_accepts():
    for name, expect in (("mesh", {"IPPool", "BGPConfiguration"}),
                         ("reflectors", {"IPPool", "BGPConfiguration", "BGPFilter",
                                         "BGPPeer"}),
                         ("vxlan", {"IPPool", "BGPConfiguration"})):
        objects = rendered(name)
        config = find(objects, "ConfigMap", "pipit-config")
        assert config["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
        parsed = read_objects(config["data"]["resources.yaml"])  # raises on anything wrong
        assert {incoming.kind.name for incoming in parsed} == expect
        job = find(objects, "Job", "pipit-config")
        assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
        spec = job["spec"]["template"]["spec"]
        assert spec["hostNetwork"] is True  # no pod address before the pool exists
        assert container(spec, "apply")["command"] == [
            "pipitctl", "apply", "-f", "/etc/pipit/resources/resources.yaml"]
    vxlan = read_objects(find(rendered("vxlan"), "ConfigMap", "pipit-config")["data"][
        "resources.yaml"])
    [pool] = [incoming.obj for incoming in vxlan if incoming.kind.name == "IPPool"]
    assert (pool.ipip_mode, pool.vxlan_mode) == ("Never", "Always")


def test_helm_test_runs_ipam_check():
    test = find(rendered("mesh"), "Pod", "pipit-test-ipam")
    assert test["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert container(test["spec"], "ipam-check")["command"] == ["pipitctl", "ipam", "check"]


def test_the_hook_resources_apply_twice_to_a_real_etcd(etcd, tmp_path):
    """Idempotent: the post-upgrade run finds everything applied and changes nothing."""
    import sys
    resources = tmp_path / "resources.yaml"
    resources.write_text(find(rendered("reflectors"), "ConfigMap", "pipit-config")["data"][
        "resources.yaml"])
    pipitctl = [str(Path(sys.executable).parent / "pipitctl"), "--etcd-endpoints",
                etcd.endpoints[0]]
    for _ in range(2):
        result = subprocess.run([*pipitctl, "apply", "-f", str(resources)], capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stderr
    listed = subprocess.run([*pipitctl, "get", "bgppeers", "-o", "json"], capture_output=True,
                            text=True, check=True).stdout
    assert "pipit-route-reflectors" in listed and "rack-a-tor" in listed
    tor = json.loads(listed)["items"][-1]["spec"]
    assert (tor["filters"], tor["reachableBy"]) == (["tor-in"], "10.99.1.254")


# -- values the schema refuses --------------------------------------------------------------------

@pytest.mark.parametrize("values, words", [
    ({}, "/etcd/endpoints"),
    ({"etcd.endpoints": "{10.0.0.1:2379}"}, "/etcd/endpoints/0"),
    ({"ipPool.cidr": "10.244.0.0/33"}, "/ipPool/cidr"),
    ({"ipPool.encapsulation": "GRE"}, "value must be one of 'None', 'IPIP', 'VXLAN'"),
    ({"ipPool.blockSize": "33"}, "/ipPool/blockSize"),
    ({"node.sigterm": "stop"}, "value must be one of 'exit', 'retire'"),
    ({"bgp.asNumber": "0"}, "/bgp/asNumber"),
    ({"bgp.asNumber": "4294967296"}, "/bgp/asNumber"),
    ({"routeReflector.clusterID": "cluster-1"}, "/routeReflector/clusterID"),
    ({"node.ipAutodetectionMethod": "first"}, "/node/ipAutodetectionMethod"),
    ({"bgp.peers[0].name": "tor", "bgp.peers[0].password": "hunter2"},
     "/bgp/peers/0/password"),
    ({"node.cni.installPlugin": "ptp"}, "additional properties 'installPlugin' not allowed"),
    ({"etcd.tls.source": "existingSecret"}, "/etcd/tls/existingSecret"),
    ({"etcd.tls.source": "existingSecret", "etcd.tls.existingSecret": "etcd"},
     "/etcd/endpoints/0"),  # TLS needs https:// endpoints
    ({"controller.gcGracePeriod": "soon"}, "/controller/gcGracePeriod"),
    ({"bgp.listenPort": "0"}, "/bgp/listenPort"),
    ({"bgp.prefixAdvertisements[0].cidr": "10.0.0.0/8"}, "/bgp/prefixAdvertisements/0"),
    ({"ipam.ipCooldownSeconds": "1201"}, "/ipam/ipCooldownSeconds"),
    ({"ipam.autoAllocateBlocks": "false"}, "/ipam/strictAffinity"),
])
def test_bad_values_are_refused_with_the_key_named(values, words):
    values = {**({} if values == {} else ENDPOINTS), **values}
    with pytest.raises(ChartError) as refused:
        render(set_values=values)
    assert "don't meet the specifications of the schema" in str(refused.value)
    assert words in str(refused.value)


def test_extra_volumes_args_and_env_reach_their_component():
    objects = rendered("reflectors")
    spec = pod(objects, "Deployment", "pipit-controller")
    entry = container(spec, "controller")
    assert {"name": "kubeconfig", "secret": {"secretName": "pipit-kubeconfig"}} in spec["volumes"]
    assert {"name": "kubeconfig", "mountPath": "/etc/pipit/kube",
            "readOnly": True} in entry["volumeMounts"]
    assert entry["args"][-1] == "--kubeconfig=/etc/pipit/kube/config"


def notes(*values: Path) -> str:
    """NOTES.txt as `helm install --dry-run=client` prints it (offline)."""
    argv = [str(HELM), "install", "pipit", str(CHART), "--dry-run=client", "-n", "kube-system"]
    for path in values:
        argv += ["--values", str(path)]
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.split("NOTES:", 1)[1]


def test_notes_say_how_to_check_the_rollout_and_warn_where_it_is_risky():
    mesh = notes(CHART / "ci" / "mesh-values.yaml")
    assert "kubectl -n kube-system rollout status daemonset/pipit-node" in mesh
    assert "WARNING: etcd is reached without TLS" in mesh
    assert "fine up to about 100 nodes" in mesh
    reflectors = notes(CHART / "ci" / "reflectors-values.yaml")
    assert "A single route reflector is a single point of\nfailure" in reflectors
    assert "rollout status daemonset/pipit-route-reflector" in reflectors
    tls = notes(CHART / "ci" / "etcd-tls-values.yaml")
    assert "WARNING" not in tls  # TLS and a mesh (of no known size): nothing to warn of
