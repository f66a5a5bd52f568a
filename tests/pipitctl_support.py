"""Helpers for the tests that run pipitctl as users do (test_pipitctl.py and the others that
check a pipitctl verb): run it in a subprocess, read its answer, look at etcd before and after.
The `ctl` fixture (pipitctl bound to the test's etcd) is in conftest.py; the one-sentence check
of a refusal is tests.sentences.one_sentence."""

from __future__ import annotations

import os
import subprocess
import sys
from ipaddress import IPv4Address
from pathlib import Path

import yaml

from ipam import keys
from ipam.allocator import IPAM
from ipam.store import ENV_ENDPOINTS, EtcdConfig, Store
from tests.helpers import with_store

ROOT = Path(__file__).resolve().parents[1]


def pipitctl(*args: str, input: str | None = None, endpoints: str | None = None,
             env: dict[str, str] | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `python -m pipitctl ARGS` with only the etcd settings given here."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PIPIT_ETCD_")}
    if endpoints:
        environ[ENV_ENDPOINTS] = endpoints
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "pipitctl", *args], input=input, env=environ,
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert result.stderr == "", result.stderr
    return result.stdout


def snapshot(config: EtcdConfig) -> dict[str, tuple[int, dict]]:
    """Every key under /pipit/ -> (mod_revision, value)."""
    async def read(store: Store):
        return {e.key: (e.mod_revision, e.value) for e in await store.list(keys.ROOT)}
    return with_store(config, read)


def put(config: EtcdConfig, *items: tuple[str, dict]) -> None:
    async def write(store: Store):
        for key, value in items:
            await store.put(key, value)
    with_store(config, write)


def assign(config: EtcdConfig, *requests: tuple) -> list[list[IPv4Address]]:
    """(node, handle, count, attributes[, pools]) each, through the real allocator."""
    async def run(store: Store):
        ipam = IPAM(store)
        return [await ipam.assign(*r) for r in requests]
    return with_store(config, run)


def pool_yaml(name: str = "new", **spec) -> str:
    return yaml.safe_dump({"apiVersion": "pipit.dev/v1", "kind": "IPPool",
                           "metadata": {"name": name}, "spec": spec}, sort_keys=False)


def stream(*documents: str) -> str:
    return "---\n".join(documents)
