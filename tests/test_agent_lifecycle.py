"""What a DaemonSet needs of the agent: the health endpoints its probes use, the CNI
configuration written once IPAM can be served (atomically, never removed), and SIGTERM that
exits without withdrawing anything (`--sigterm exit`) or retires the node (`retire`).

The pure parts are unit tests; an agent without routing runs against a real etcd; the routing
agent runs in a network namespace with ExaBGP against a real BIRD peer (netns tier)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bgp_agent import health
from bgp_agent.cni_conflist import DEFAULT_TEMPLATE, ConflistWriter
from ipam.cni import ask_agent
from ipam.errors import InvalidResource
from bgp_agent.node import NodeRecord, parse_explicit_address, register
from ipam import keys
from ipam.store import EtcdConfig, Store
from lab.agent import AgentProcess, NodeAgentProcess
from lab.process import alive, wait
from tests.helpers import add_pool, started_now, with_store
from tests.sentences import one_sentence

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Pure parts

@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9199", health.Listen(host="127.0.0.1", port=9199)),
    ("[::1]:9199", health.Listen(host="::1", port=9199)),
    ("unix:/run/pipit/health.sock", health.Listen(path="/run/pipit/health.sock")),
])
def test_health_listen_takes_a_port_or_a_socket(text, expected):
    assert health.parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9199", "127.0.0.1:", "127.0.0.1:70000", ":9199",
                                  "unix:health.sock", "localhost:http"])
def test_a_bad_health_listen_is_one_sentence(text):
    with pytest.raises(InvalidResource) as caught:
        health.parse_listen(text)
    one_sentence(caught.value, "--health-listen ")


@pytest.mark.parametrize("argv, env, seconds", [
    ([], None, 60.0),  # calico-node's default
    ([], "90s", 90.0),  # calico-node's variable
    (["--autodetect-poll-interval", "5m"], "90s", 300.0),
    (["--autodetect-poll-interval", "0"], None, 0.0),  # never
])
def test_the_address_is_looked_for_again_as_calico_node_looks(monkeypatch, argv, env, seconds):
    from bgp_agent.agent import parse_args
    if env is None:
        monkeypatch.delenv("AUTODETECT_POLL_INTERVAL", raising=False)
    else:
        monkeypatch.setenv("AUTODETECT_POLL_INTERVAL", env)
    assert parse_args(["--node", "n1", *argv]).autodetect_poll_interval == seconds


def test_a_poll_interval_that_is_no_duration_is_one_sentence(capsys):
    from bgp_agent.agent import parse_args
    with pytest.raises(SystemExit) as exit:
        parse_args(["--node", "n1", "--autodetect-poll-interval", "soon"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "argument --autodetect-poll-interval: 'soon' is not a duration such as 15m, 90s or 900")


def test_a_failing_check_fails_the_endpoint_and_says_why():
    checks = health.Health()
    checks.ready("etcd", lambda: None)
    checks.ready("exabgp", lambda: "ExaBGP's bridge is not connected")

    def broken():
        raise KeyError("x")
    checks.live("routing", broken)
    ok, body = asyncio.run(checks.run("readyz"))
    assert not ok
    assert body == ("[+]etcd ok\n[-]exabgp failed: ExaBGP's bridge is not connected\n"
                    "readyz check failed\n")
    ok, body = asyncio.run(checks.run("livez"))
    assert not ok and "[-]routing failed: KeyError" in body


def writer(tmp_path, template=DEFAULT_TEMPLATE, socket="/run/pipit/ipam.sock") -> ConflistWriter:
    return ConflistWriter(tmp_path / "net.d" / "10-pipit.conflist", template, socket, "n1")


def test_the_conflist_carries_the_pod_mtu_and_the_agents_socket(tmp_path):
    conf = json.loads(writer(tmp_path).render(1450))
    assert conf["name"] == "pipit"
    ptp, portmap = conf["plugins"]
    assert ptp == {"type": "ptp", "mtu": 1450,
                   "ipam": {"type": "pipit-ipam", "socket": "/run/pipit/ipam.sock"}}
    assert portmap["capabilities"] == {"portMappings": True}


def test_a_socket_path_needing_escapes_stays_valid_json(tmp_path):
    conf = json.loads(writer(tmp_path, socket='/run/a "b"\\c').render(1500))
    assert conf["plugins"][0]["ipam"]["socket"] == '/run/a "b"\\c'


@pytest.mark.parametrize("template, words", [
    ("{not json", "is not JSON once its placeholders are filled in"),
    ('{"cniVersion": "1.0.0", "plugins": []}', "it needs a `name`"),
    ('{"name": "x", "plugins": [{"ipam": {}}]}', "each with a `type`"),
    ('{"name": "x", "plugins": [{"type": "ptp", "ipam": {"type": "host-local"}}]}',
     "no plugin whose ipam type is pipit-ipam"),
])
def test_a_template_that_makes_no_usable_conflist_is_refused(tmp_path, template, words):
    with pytest.raises(InvalidResource) as refused:
        writer(tmp_path, template).render(1500)
    one_sentence(refused.value, words)


def test_the_conflist_is_replaced_atomically_and_only_when_it_changes(tmp_path):
    conf = writer(tmp_path)
    assert conf.check() is not None  # not ready before the first write
    assert conf.publish(1500)
    assert conf.check() is None
    assert stat.S_IMODE(os.stat(conf.path).st_mode) == 0o644
    inode = os.stat(conf.path).st_ino
    assert not conf.publish(1500)  # the same: untouched
    assert os.stat(conf.path).st_ino == inode
    assert conf.publish(1450)  # a new file renamed over the old one
    assert os.stat(conf.path).st_ino != inode
    assert json.loads(conf.path.read_text())["plugins"][0]["mtu"] == 1450
    assert sorted(p.name for p in conf.path.parent.iterdir()) == ["10-pipit.conflist"]


def test_a_conflist_that_cannot_be_written_is_reported_not_raised(tmp_path):
    (tmp_path / "net.d").write_text("a file where the directory should be")
    conf = writer(tmp_path)
    assert not conf.publish(1500)
    assert "cannot write" in conf.check()


# --------------------------------------------------------------------------------------------
# An agent without routing, on a real etcd

def no_bgp_agent(etcd: EtcdConfig, directory: Path, *extra: str) -> AgentProcess:
    return AgentProcess("node-1", directory / "ipam.sock", etcd.endpoints,
                        directory / "agent.log",
                        extra_args=["--health-listen", f"unix:{directory}/health.sock",
                                    "--cni-conf-file", str(directory / "net.d" / "10-pipit.conflist"),
                                    *extra])


def test_an_agent_writes_its_conflist_serves_probes_and_leaves_the_conflist_when_stopped(
        etcd, short_dir):
    conflist = short_dir / "net.d" / "10-pipit.conflist"
    listen = health.Listen(path=str(short_dir / "health.sock"))
    with no_bgp_agent(etcd, short_dir, "--sigterm", "exit") as agent:
        wait(conflist.exists, 10, "the conflist")
        conf = json.loads(conflist.read_text())
        socket = conf["plugins"][0]["ipam"]["socket"]
        assert socket == str(agent.socket_path)
        assert ask_agent(socket, {"command": "STATUS"})  # what the conflist names answers
        assert health.get(listen, "/livez") == (200, "[+]ipam ok\nlivez check passed\n")
        code, body = health.get(listen, "/readyz")
        assert code == 200, body
        assert body.splitlines() == ["[+]ipam ok", "[+]etcd ok", "[+]cni-config ok",
                                     "readyz check passed"]
        assert health.get(listen, "/metrics")[0] == 404
        agent.process.send_signal(signal.SIGTERM)
        assert agent.process.wait(10) == 0
    assert json.loads(conflist.read_text()) == conf  # never removed
    assert not os.path.exists(listen.path)


def test_readyz_fails_and_says_so_while_etcd_is_away(own_etcd, short_dir):
    listen = health.Listen(path=str(short_dir / "health.sock"))
    config = EtcdConfig(endpoints=(own_etcd.endpoint,))
    with no_bgp_agent(config, short_dir):
        wait(lambda: health.get(listen, "/readyz")[0] == 200, 10, "ready")
        own_etcd.stop()
        try:
            code, body = health.get(listen, "/readyz", timeout=10)
            assert code == 503
            assert "[-]etcd failed: " in body and own_etcd.endpoint in body
            assert health.get(listen, "/livez")[0] == 200  # alive: no reason to restart it
        finally:
            own_etcd.start()
        wait(lambda: health.get(listen, "/readyz")[0] == 200, 20, "ready again")


def node_record(config: EtcdConfig, node: str):
    async def read():
        async with Store(config) as store:
            return await store.get(keys.node_key(node))
    return asyncio.run(read())


def logged(path: Path, words: str):
    return lambda: words in path.read_text()


def test_an_agent_started_before_etcd_waits_for_it_then_registers(own_etcd, short_dir):
    """As calico-node waits for its datastore: a rack powered on together must not leave every
    agent exited (or in a kubelet's restart back-off) because etcd came up a little later."""
    listen = health.Listen(path=str(short_dir / "health.sock"))
    conflist = short_dir / "net.d" / "10-pipit.conflist"
    config = EtcdConfig(endpoints=(own_etcd.endpoint,))
    own_etcd.stop()
    agent = no_bgp_agent(config, short_dir)
    with started_now(agent) as process:
        wait(logged(agent.log_path, "node node-1 not registered yet, trying again: cannot "
                    f"reach etcd at {own_etcd.endpoint}"), 20, "the agent saying it waits")
        assert agent.running
        code, body = health.get(listen, "/readyz", timeout=10)
        assert code == 503 and "[-]start failed: waiting for etcd: cannot reach etcd" in body
        assert health.get(listen, "/livez")[0] == 200  # waiting is no reason to restart it
        assert not conflist.exists() and not agent.socket_path.exists()  # no IPAM served
        own_etcd.start()
        wait(conflist.exists, 30, "the conflist, once registered")
        assert node_record(config, "node-1") is not None
        assert "etcd answered after" in agent.log_path.read_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0


def test_sigterm_while_waiting_for_etcd_exits_having_written_nothing(own_etcd, short_dir):
    config = EtcdConfig(endpoints=(own_etcd.endpoint,))
    own_etcd.stop()
    agent = no_bgp_agent(config, short_dir)
    with started_now(agent) as process:
        wait(logged(agent.log_path, "not registered yet"), 20, "the agent saying it waits")
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    own_etcd.start()
    assert node_record(config, "node-1") is None
    assert not (short_dir / "net.d").exists()


def test_an_etcd_refusing_the_agent_ends_it_in_one_sentence(own_etcd, short_dir):
    """Waiting does not help an agent etcd will not serve (auth enabled, no credentials):
    it stops, saying so, as calico-node stops when the datastore says it is unauthorised."""
    for command in (["user", "add", "root:pipit-test"], ["auth", "enable"]):
        subprocess.run(["etcdctl", "--endpoints", own_etcd.endpoint, *command], check=True,
                       capture_output=True, timeout=30)
    result = subprocess.run(
        [sys.executable, "-m", "bgp_agent.agent", "--node", "node-1", "--no-bgp",
         "--ipam-socket", str(short_dir / "ipam.sock"), "--status-socket",
         str(short_dir / "status.sock"), "--etcd-endpoints", own_etcd.endpoint],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"etcd at {own_etcd.endpoint} refused the request: " in result.stderr
    assert "trying again" not in result.stderr


@pytest.mark.parametrize("address, refusal", [
    ("10.99.1.1/24", "node node-0 already has the address 10.99.1.1"),
    ("10.244.1.1/24", "node node-1: its address 10.244.1.1 is inside IPPool 'pods' "
                      "(10.244.0.0/16): a pod could be given it"),
])
def test_a_refused_registration_still_ends_the_agent_in_one_sentence(etcd, short_dir, address,
                                                                     refusal):
    asyncio.run(_register_other(etcd))
    with_store(etcd, lambda store: add_pool(store, "pods", "10.244.0.0/16"))
    result = subprocess.run(
        [sys.executable, "-m", "bgp_agent.agent", "--node", "node-1", "--no-bgp",
         "--ip", address, "--ipam-socket", str(short_dir / "ipam.sock"),
         "--status-socket", str(short_dir / "status.sock"), "--etcd-endpoints",
         etcd.endpoints[0]], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert refusal in result.stderr
    assert node_record(etcd, "node-1") is None


async def _register_other(config: EtcdConfig) -> None:
    async with Store(config) as store:
        await register(store, NodeRecord("node-0", parse_explicit_address("10.99.1.1/24")))


def test_a_bad_template_stops_the_agent_before_it_serves_or_writes_anything(etcd, short_dir):
    template = short_dir / "template.json"
    template.write_text('{"name": "pipit", "plugins": [{"type": "ptp", "mtu": __CNI_MTU__}]}')
    result = subprocess.run(
        [sys.executable, "-m", "bgp_agent.agent", "--node", "node-1", "--no-bgp",
         "--ipam-socket", str(short_dir / "ipam.sock"), "--etcd-endpoints", etcd.endpoints[0],
         "--cni-conf-file", str(short_dir / "net.d" / "x.conflist"),
         "--cni-conf-template", str(template)],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "no plugin whose ipam type is pipit-ipam" in result.stderr
    assert not (short_dir / "net.d").exists() and not (short_dir / "ipam.sock").exists()


# --------------------------------------------------------------------------------------------
# The routing agent in a namespace, ExaBGP spawned, a real BIRD peer (netns tier)

PEER_AS = 65001


def routing_agent(state: Path, netns: str, etcd_endpoint: str, sigterm: str
                  ) -> NodeAgentProcess:
    """Not started yet: `start()` returns once its IPAM socket answers."""
    return NodeAgentProcess("node-1", netns, state, etcd_endpoint, extra_args=[
        "--ip", "10.99.1.1/24", "--health-listen", f"unix:{state}/health.sock",
        "--cni-conf-file", str(state / "net.d" / "10-pipit.conflist"), "--sigterm", sigterm])


def exabgp_pid(state: Path) -> int:
    return int((state / "exabgp" / "exabgp.pid").read_text())


@pytest.mark.netns
def test_sigterm_exit_leaves_the_session_and_routes_and_retire_withdraws_them(tmp_path):
    from lab.etcd import EtcdServer
    from tests.speaker_support import bird_peer, kill_exabgp, network

    state = Path(tmp_path) / "s"  # unix socket paths stay short
    state.mkdir()
    listen = health.Listen(path=str(state / "health.sock"))
    resources = f"""\
apiVersion: pipit.dev/v1
kind: IPPool
metadata: {{name: default}}
spec: {{cidr: 10.244.0.0/16, blockSize: 26}}
---
apiVersion: pipit.dev/v1
kind: BGPPeer
metadata: {{name: bird}}
spec: {{peerIP: 10.99.1.2, asNumber: {PEER_AS}}}
"""
    agents: list[NodeAgentProcess] = []
    with EtcdServer(data_dir=tmp_path / "etcd", unix_socket=True) as etcd, network(1) as net, \
            bird_peer(net, 1) as bird:
        try:
            subprocess.run([str(Path(sys.executable).parent / "pipitctl"), "--etcd-endpoints",
                            etcd.endpoint, "apply", "-f", "-"], input=resources, text=True,
                           check=True, capture_output=True)
            endpoint = f"unix://{tmp_path / 'etcd'}/etcd.sock:0"
            agents.append(routing_agent(state, net.node, endpoint, "exit").start(timeout=30))
            wait(listen_answers(listen), 30, "the health endpoint")
            ask_agent(str(state / "ipam.sock"), {"command": "ADD", "handle": "pod-1"})
            wait(lambda: bird.route_count("node") == 1, 30, "the node's block in BIRD")
            wait(lambda: health.get(listen, "/readyz")[0] == 200, 30, "readiness")
            conf = json.loads((state / "net.d" / "10-pipit.conflist").read_text())
            assert conf["plugins"][0]["mtu"] == 1500  # the veth's: no encapsulation
            since, exabgp = bird.protocol("node").since, exabgp_pid(state)

            agents[0].process.send_signal(signal.SIGTERM)  # --sigterm exit: nothing changes
            assert agents[0].process.wait(20) == 0
            assert alive(exabgp)
            assert bird.protocol("node").since == since and bird.route_count("node") == 1
            assert (state / "net.d" / "10-pipit.conflist").exists()

            agents.append(routing_agent(state, net.node, endpoint, "retire").start(timeout=60))
            wait(lambda: listen_answers(listen)() and
                 health.get(listen, "/readyz")[0] == 200, 60, "the next agent to be ready")
            assert exabgp_pid(state) == exabgp  # adopted
            assert bird.protocol("node").since == since and bird.route_count("node") == 1

            # --sigterm retire: withdrawn, ExaBGP gone
            agents[1].process.send_signal(signal.SIGTERM)
            assert agents[1].process.wait(30) == 0
            assert bird.route_count("node") == 0
            assert not alive(exabgp)
        finally:
            for agent in agents:
                agent.kill()
            kill_exabgp(state / "exabgp")


def listen_answers(listen: health.Listen):
    def answers() -> bool:
        try:
            health.get(listen, "/livez", timeout=2)
            return True
        except OSError:
            return False
    return answers
