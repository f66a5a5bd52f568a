"""How pipitctl, the agent and the CNI plugin reach etcd: through a unix socket (etcd's
`--listen-client-urls unix://...`, plain or with TLS), and through several endpoints of which
one is dead: a member that is down, a name that no longer resolves, and, with TLS, a member
down while the next one's certificate names only that next member.

TLS to one etcd (pipitctl, and an agent's ADD through the plugin) is in test_etcd_faults.py,
a whole lab over TLS in test_datastore.py; these add what only several endpoints or a unix
socket exercise."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ipam.cni import handle_id
from ipam.store import EtcdConfig, Store
from lab.agent import AgentProcess
from lab.etcd import EtcdCluster, EtcdServer, free_port, make_tls_files
from tests.cni_support import NET, Plugin
from tests.tcp_proxy import TCPProxy
from tests.pipitctl_support import ok, pipitctl, pool_yaml
from tests.sentences import one_sentence

pytestmark = pytest.mark.etcd

ROOT = Path(__file__).resolve().parents[1]
GONE = "http://etcd-gone.invalid:2379"  # a member whose name was taken out of DNS


def unix_endpoint(server: EtcdServer) -> str:
    """etcd creates its unix listener `etcd.sock:0` ("host:port") in its working directory,
    its data directory here."""
    return f"unix://{server.data_dir}/etcd.sock:0"


def tls_flags(tls) -> list[str]:
    return ["--etcd-ca-cert", tls.ca, "--etcd-cert", tls.client_cert, "--etcd-key",
            tls.client_key]


# --------------------------------------------------------------------------------------------
# unix://


def test_pipitctl_reaches_etcd_through_its_unix_socket(short_dir):
    with EtcdServer(data_dir=short_dir / "etcd", unix_socket=True) as server:
        unix = unix_endpoint(server)
        assert ok(pipitctl("apply", "-f", "-", "--etcd-endpoints", unix,
                           input=pool_yaml("by-socket", cidr="10.61.0.0/16"))) \
            == "ippool 'by-socket' created\n"
        # the environment and the configuration file take it too
        assert "10.61.0.0/16" in ok(pipitctl("get", "ippools", endpoints=unix))
        config = short_dir / "pipitctl.yaml"
        config.write_text(yaml.safe_dump({"apiVersion": "pipit.dev/v1",
                                          "kind": "PipitctlConfig",
                                          "spec": {"etcdEndpoints": unix}}))
        assert "10.61.0.0/16" in ok(pipitctl("get", "ippools", "--config", str(config)))
        # the same etcd as its TCP listener
        assert "by-socket" in ok(pipitctl("get", "ippools", endpoints=server.endpoint))

        missing = f"unix://{short_dir}/nothing.sock"
        one_sentence(pipitctl("get", "ippools", endpoints=missing), "cannot reach etcd",
                     missing, "no such file or directory")
        one_sentence(pipitctl("get", "ippools", endpoints=f"{unix},{server.endpoint}"),
                     "unix://", "cannot be combined")


def test_pipitctl_reaches_a_tls_etcd_through_its_unix_socket(short_dir):
    tls = make_tls_files(short_dir / "certs")
    with EtcdServer(data_dir=short_dir / "etcd", unix_socket=True, tls=tls) as server:
        unix = unix_endpoint(server)  # etcd listens with TLS there (`unixs://`)
        ok(pipitctl("apply", "-f", "-", *tls_flags(tls), endpoints=unix,
                    input=pool_yaml("tls-socket", cidr="10.62.0.0/16")))
        assert "10.62.0.0/16" in ok(pipitctl("get", "ippools", *tls_flags(tls), endpoints=unix))
        one_sentence(pipitctl("get", "ippools", endpoints=unix), "cannot reach etcd", unix)


# --------------------------------------------------------------------------------------------
# Several endpoints, one of them dead


def serves_with(endpoints: str, cni_bin, short_dir, flags: list[str] = (),
                pool: str = "10.63.0.0/16") -> str:
    """pipitctl writes and reads through `endpoints`, an agent started with them registers
    and answers a CNI ADD through pipit-ipam; the address it gave."""
    assert ok(pipitctl("apply", "-f", "-", *flags, endpoints=endpoints,
                       input=pool_yaml("default", cidr=pool))) == "ippool 'default' created\n"
    assert pool in ok(pipitctl("get", "ippools", *flags, endpoints=endpoints))
    agent = AgentProcess("node-1", short_dir / "a.sock", endpoints, short_dir / "agent.log",
                         extra_args=flags)
    agent.start(timeout=60)
    try:
        plugin = Plugin(cni_bin, agent)
        address = plugin("ADD", plugin.config(), "c1")["ips"][0]["address"]
    finally:
        agent.stop()
    nodes = ok(pipitctl("get", "nodes", "-o", "name", *flags, endpoints=endpoints))
    assert nodes.split() == ["node/node-1"], nodes
    shown = ok(pipitctl("ipam", "show", "--ip", address.split("/")[0], *flags,
                        endpoints=endpoints))
    assert f"in use by handle {handle_id(NET, 'c1', 'eth0')}" in shown, shown
    return address


def test_one_member_of_three_down_and_one_name_gone_pipitctl_agent_and_plugin_carry_on(
        cni_bin, short_dir, tmp_path):
    with EtcdCluster(3, tmp_path / "etcd") as cluster:
        down = cluster.members[0]
        down.stop()  # the first endpoint: refused
        endpoints = ",".join([GONE, *cluster.endpoints])
        serves_with(endpoints, cni_bin, short_dir)


def test_a_tls_member_down_the_next_is_checked_against_its_own_name(cni_bin, short_dir):
    """Each member's certificate names that member only (as etcd members' usually do): with
    the first down, the second must be verified as 127.0.0.2, not as the first's name."""
    tls = make_tls_files(short_dir / "certs", host="127.0.0.2")
    with EtcdServer(data_dir=short_dir / "etcd", host="127.0.0.2", tls=tls) as server:
        down = f"https://127.0.0.1:{free_port()}"
        serves_with(f"{down},{server.endpoint}", cni_bin, short_dir, tls_flags(tls))
        # and the name is still checked: 127.0.0.1 (a proxy to the same server) is not in its
        # certificate
        with TCPProxy(("127.0.0.2", server.client_port)) as proxy:
            one_sentence(pipitctl("get", "ippools", *tls_flags(tls),
                                  endpoints=proxy.url("https")),
                         proxy.url("https"), "its TLS certificate does not name it")


def test_calls_at_once_with_the_first_tls_member_down_all_reach_the_next(short_dir):
    """Many calls on a fresh client (an agent's first moments: registration, the first ADDs,
    the status probe) all find the first member down at once; each must go on to the next
    member. (They used to move one shared "current member" forward in turn, so half of them
    moved it back onto the dead one and failed: the agent exited at registration.)"""
    tls = make_tls_files(short_dir / "certs", host="127.0.0.2")
    with EtcdServer(data_dir=short_dir / "etcd", host="127.0.0.2", tls=tls) as server:
        config = EtcdConfig((f"https://127.0.0.1:{free_port()}", server.endpoint),
                            tls.ca, tls.client_cert, tls.client_key)

        async def many_at_once():
            async with Store(config) as store:
                first = await asyncio.gather(*(store.list("/pipit/") for _ in range(20)))
                later = await asyncio.gather(*(store.list("/pipit/") for _ in range(20)))
                return first + later
        assert asyncio.run(many_at_once()) == [[]] * 40


# --------------------------------------------------------------------------------------------
# A member's name that did not resolve at first, and does once the others are gone

RESOLVING_AGAIN = """
import asyncio, json, sys, time
from pathlib import Path
from ipam.errors import DatastoreUnavailable
from ipam.store import EtcdConfig, Store
from lab.etcd import EtcdCluster

hosts, work = Path(sys.argv[1]), Path(sys.argv[2])
with EtcdCluster(3, work) as cluster:
    first, second, _ = cluster.members
    named = "http://etcd-m1.pipit.test:" + second.endpoint.rsplit(":", 1)[1]

    async def main():
        async with Store(EtcdConfig(endpoints=(first.endpoint, named), timeout=2)) as store:
            await store.put("/pipit/test/a", {"v": 1})  # the name resolves to nothing yet
            first.stop()
            with hosts.open("a") as f:  # in place: the bind mount shows the same file
                f.write("127.0.0.1 etcd-m1.pipit.test\\n")
            errors, deadline = [], time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    entry = await store.get("/pipit/test/a")
                    return {"value": entry.value, "errors": errors}
                except DatastoreUnavailable as error:
                    errors.append(str(error))
                    await asyncio.sleep(0.2)
            return {"value": None, "errors": errors}
    print(json.dumps(asyncio.run(main())))
"""


@pytest.mark.netns  # root: a mount namespace of its own, where /etc/hosts is the test's file
def test_a_name_left_out_at_first_is_resolved_again_once_no_member_answers(tmp_path):
    """An endpoint whose name did not resolve when the client connected (a member not yet in
    DNS) must not stay out for the process's lifetime: once the members it did reach are all
    gone, every name is resolved again and the member now named is used."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c", 'mount --bind "$1" /etc/hosts && exec "$2" -c "$3" '
         '"$1" "$4"', "-", str(hosts), sys.executable, RESOLVING_AGAIN, str(tmp_path / "etcd")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["value"] == {"v": 1}, outcome["errors"]
    assert len(outcome["errors"]) <= 1  # the call that found no member; the next one resolves
