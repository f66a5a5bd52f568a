"""etcd with its authentication on (Calico's ETCD_USERNAME / ETCD_PASSWORD, calicoctl.cfg's
etcdUsername / etcdPassword), against a real etcd whose users and roles etcdctl made: every
kind of call carries the user's token, a token etcd refuses once it lapsed is renewed without
the caller seeing it, and a missing user, a wrong password or a user without rights on
/pipit/ is one sentence saying what to do (pipitctl: nothing written; the agent: it exits
saying so rather than waiting for a password to change)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from dataclasses import replace

import pytest
from aetcd import rpc

from ipam import keys
from ipam.errors import DatastoreUnavailable, InvalidResource
from ipam.store import ENV_PASSWORD, ENV_USERNAME, EtcdConfig, Store
from lab.etcd import EtcdServer
from lab.process import wait
from tests.helpers import started_now, with_store
from tests.pipitctl_support import ok, pipitctl, pool_yaml, snapshot
from tests.sentences import one_sentence
from tests.test_agent_lifecycle import no_bgp_agent

pytestmark = pytest.mark.etcd

TOKEN_TTL = 1  # s: etcd's --auth-token-ttl, so that a test sees a token lapse


def etcdctl(endpoint: str, *args: str, user: str | None = None) -> None:
    result = subprocess.run(["etcdctl", "--endpoints", endpoint,
                             *(["--user", user] if user else []), *args],
                            env={**os.environ, "ETCDCTL_API": "3"}, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, (args, result.stderr)


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory):
    """An etcd with users root and pipit (read and write on /pipit/) and its authentication
    on; the config of user pipit."""
    server = EtcdServer(data_dir=tmp_path_factory.mktemp("auth") / "etcd",
                        extra_args=("--auth-token-ttl", str(TOKEN_TTL)))
    server.start()
    try:
        endpoint = server.endpoint
        etcdctl(endpoint, "user", "add", "root", "--new-user-password=root-secret")
        etcdctl(endpoint, "user", "grant-role", "root", "root")
        for user in ("pipit", "nobody"):
            etcdctl(endpoint, "user", "add", user, f"--new-user-password={user}-secret")
        etcdctl(endpoint, "role", "add", "pipit")
        etcdctl(endpoint, "role", "grant-permission", "pipit", "--prefix=true", "readwrite",
                "/pipit/")
        etcdctl(endpoint, "user", "grant-role", "pipit", "pipit")
        etcdctl(endpoint, "auth", "enable")
        yield EtcdConfig((endpoint,), username="pipit", password="pipit-secret")
    finally:
        server.destroy()


def test_every_call_carries_the_users_token_and_a_lapsed_token_is_renewed(auth_etcd):
    async def scenario(store: Store):
        await store.put("/pipit/test/a", {"n": 1})
        assert (await store.get("/pipit/test/a")).value == {"n": 1}
        result = await store.txn({"/pipit/test/a": (await store.get("/pipit/test/a")).mod_revision},
                                 put={"/pipit/test/b": {"n": 2}})
        assert result.succeeded
        lease = await store.grant_lease(30)
        assert await store.keep_lease_alive(lease) > 0
        changes = store.watch("/pipit/test/", result.revision + 1)
        await store.put("/pipit/test/c", {"n": 3})
        assert [key for key, _ in await asyncio.wait_for(anext(changes), 10)] == \
            ["/pipit/test/c"]
        await changes.aclose()

        kv = rpc.KVStub(store._client.channel)

        async def idle_until_lapsed(token: str) -> None:
            """Leave the token unused past its TTL (each use renews it), until etcd refuses
            it: etcd drops lapsed tokens once a second."""
            for idle in (TOKEN_TTL + 2, TOKEN_TTL + 4, TOKEN_TTL + 8):
                await asyncio.sleep(idle)
                try:
                    await kv.Range(rpc.RangeRequest(key=b"/pipit/test/a"),
                                   metadata=(("token", token),), timeout=5)
                except Exception as error:
                    if "invalid auth token" in str(error):
                        return
                    raise
            raise AssertionError("etcd kept taking the token")

        token = store._client.token
        await idle_until_lapsed(token)
        assert (await store.get("/pipit/test/b")).value == {"n": 2}  # renewed unseen
        assert store._client.token not in (None, "", token)
        await idle_until_lapsed(store._client.token)
        assert await store.keep_lease_alive(lease) > 0  # the lease's stream too
    with_store(auth_etcd, scenario)


def test_a_user_given_before_etcd_turns_its_authentication_on_logs_in_once_it_does(tmp_path):
    with EtcdServer(data_dir=tmp_path / "etcd") as server:
        config = EtcdConfig((server.endpoint,), username="root", password="root-secret")

        async def scenario(store: Store):
            await store.put("/pipit/test/a", {"n": 1})  # authentication off: no token needed
            assert store._client.token == ""
            etcdctl(server.endpoint, "user", "add", "root", "--new-user-password=root-secret")
            etcdctl(server.endpoint, "user", "grant-role", "root", "root")
            etcdctl(server.endpoint, "auth", "enable")
            assert (await store.get("/pipit/test/a")).value == {"n": 1}
            assert store._client.token
        with_store(config, scenario)


@pytest.mark.parametrize("user, password, sentence", [
    (None, None, ["refused the request: etcdserver: user name is empty", "its authentication "
                  f"is on: give a user and password, {ENV_USERNAME} and {ENV_PASSWORD}"]),
    ("pipit", "wrong", ["authentication failed, invalid user ID or password", "user 'pipit'",
                        ENV_PASSWORD]),
    ("nobody", "nobody-secret", ["permission denied", "user 'nobody' needs read and write on "
                                 "/pipit/: etcdctl role grant-permission ROLE --prefix=true "
                                 "readwrite /pipit/"]),
])
def test_a_missing_user_a_wrong_password_or_no_rights_are_said_and_not_waited_for(
        auth_etcd, user, password, sentence):
    config = replace(auth_etcd, username=user, password=password)
    with pytest.raises(DatastoreUnavailable) as raised:
        with_store(config, lambda store: store.list(keys.ROOT))
    assert all(part in str(raised.value) for part in sentence), raised.value
    assert raised.value.refused  # (the agent exits on it, saying so: below)


def test_a_user_without_a_password_is_refused_before_etcd_is_asked(monkeypatch):
    monkeypatch.setenv(ENV_USERNAME, "pipit")
    monkeypatch.delenv(ENV_PASSWORD, raising=False)
    with pytest.raises(InvalidResource, match=f"needs both a user name .* and its password "
                       rf"\({ENV_PASSWORD}\); only the user name is given"):
        EtcdConfig.from_options("http://127.0.0.1:2379")


def test_pipitctl_takes_the_user_from_its_environment_or_its_config_file(auth_etcd, tmp_path):
    endpoint = auth_etcd.endpoints[0]
    credentials = {ENV_USERNAME: "pipit", ENV_PASSWORD: "pipit-secret"}
    before = snapshot(auth_etcd)
    one_sentence(pipitctl("apply", "-f", "-", input=pool_yaml("p1", cidr="10.50.0.0/16"),
                          endpoints=endpoint),
                 "user name is empty", ENV_USERNAME)
    assert snapshot(auth_etcd) == before
    ok(pipitctl("apply", "-f", "-", input=pool_yaml("p1", cidr="10.50.0.0/16"),
                endpoints=endpoint, env=credentials))
    config = tmp_path / "pipitctl.yaml"
    config.write_text(f"apiVersion: pipit.dev/v1\nkind: PipitctlConfig\nspec:\n"
                      f"  etcdEndpoints: {endpoint}\n  etcdUsername: pipit\n"
                      f"  etcdPassword: pipit-secret\n")
    assert "p1" in ok(pipitctl("get", "ippools", "-c", str(config)))
    assert "p1" in ok(pipitctl("get", "ippools", "--etcd-username", "pipit",
                               endpoints=endpoint, env={ENV_PASSWORD: "pipit-secret"}))


def test_the_agent_registers_with_its_user_and_exits_saying_why_without_one(
        auth_etcd, short_dir, monkeypatch):
    monkeypatch.delenv(ENV_USERNAME, raising=False)
    monkeypatch.delenv(ENV_PASSWORD, raising=False)
    agent = no_bgp_agent(auth_etcd, short_dir)
    with started_now(agent) as process:
        wait(lambda: process.poll() is not None, 30, "the agent to exit")
        assert process.returncode != 0
        assert "user name is empty" in agent.log_path.read_text()
        assert ENV_USERNAME in agent.log_path.read_text()
    monkeypatch.setenv(ENV_USERNAME, "pipit")
    monkeypatch.setenv(ENV_PASSWORD, "pipit-secret")
    with no_bgp_agent(auth_etcd, short_dir):
        assert keys.node_key("node-1") in snapshot(auth_etcd)
