"""What every pipitctl command that talks to etcd shares: where etcd is (flags, environment,
configuration file), the -f input (files, directories, stdin), and shell completion of kinds
and names."""

from __future__ import annotations

import asyncio
import functools
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace

import click

from ipam.errors import DatastoreUnavailable, InvalidResource
from ipam.resource import MAX_INPUT_BYTES
from ipam.store import (ENV_CA, ENV_CERT, ENV_ENDPOINTS, ENV_KEY, ENV_PASSWORD, ENV_USERNAME,
                        EtcdConfig, Store)
from pipitctl.config import DEFAULT_CONFIG, read_config
from pipitctl import workloads
from pipitctl.resources import KINDS, kind_named


_ETCD_OPTIONS = (
    click.option("--etcd-endpoints", metavar="URLS",
                 help=f"Comma-separated etcd URLs [env {ENV_ENDPOINTS}; default "
                      "http://127.0.0.1:2379]."),
    click.option("--etcd-ca-cert", metavar="FILE",
                 help=f"CA certificate to verify etcd with [env {ENV_CA}]."),
    click.option("--etcd-cert", metavar="FILE", help=f"Client certificate for etcd [env {ENV_CERT}]."),
    click.option("--etcd-key", metavar="FILE", help=f"Client key for etcd [env {ENV_KEY}]."),
    click.option("--etcd-username", metavar="USER",
                 help=f"etcd's user, when its authentication is on; its password from "
                      f"{ENV_PASSWORD} or the config file [env {ENV_USERNAME}]."),
    click.option("-c", "--config", "config_file", metavar="FILE",
                 help=f"Where etcd is, as a PipitctlConfig [default {DEFAULT_CONFIG}, if it "
                      "exists]; flags and the environment win over it."),
)
_ETCD_NAMES = ("etcd_endpoints", "etcd_ca_cert", "etcd_cert", "etcd_key", "etcd_username",
               "etcd_password")  # (no flag for the password: it would show in ps)
_ETCD_ENV = {"etcd_endpoints": ENV_ENDPOINTS, "etcd_ca_cert": ENV_CA, "etcd_cert": ENV_CERT,
             "etcd_key": ENV_KEY, "etcd_username": ENV_USERNAME, "etcd_password": ENV_PASSWORD}


def with_etcd_options(function: Callable) -> Callable:
    for option in reversed(_ETCD_OPTIONS):
        function = option(function)
    return function


def etcd_config(given: Mapping[str, str | None]) -> tuple[EtcdConfig, bool]:
    """Where etcd is: each setting from its flag, else the environment, else the config
    file, else the default; and whether the endpoints were named at all."""
    from_file = read_config(given.get("config_file"))
    values = [given.get(n) or os.environ.get(_ETCD_ENV[n]) or from_file.get(n)
              for n in _ETCD_NAMES]
    *where, username, password = values
    return EtcdConfig.from_options(*where, username=username, password=password), bool(values[0])


def etcd_options(command: Callable) -> Callable:
    """--etcd-* options on a command (also accepted before it, on pipitctl itself); the async
    command gets a connected `store` as its first argument."""
    @with_etcd_options
    @functools.wraps(command)
    def wrapper(**kwargs):
        parent = click.get_current_context().find_root().params
        given = {n: kwargs.pop(n, None) or parent.get(n) for n in (*_ETCD_NAMES, "config_file")}
        config, named = etcd_config(given)

        async def main():
            async with Store(config) as store:
                return await command(store, **kwargs)
        try:
            return asyncio.run(main())
        except DatastoreUnavailable as error:
            if named:
                raise
            raise DatastoreUnavailable(
                f"{str(error).rstrip('.')}; no etcd was named, so pipitctl tried its default: "
                f"name yours with --etcd-endpoints, {ENV_ENDPOINTS} or etcdEndpoints in "
                f"{DEFAULT_CONFIG}.") from None
    return wrapper


def read_input(filename: str) -> list[tuple[str, str]]:
    """(name, text) of each file the -f argument names: a file, stdin for -, or every .yaml,
    .yml and .json file of a directory (in name order); at most MAX_INPUT_BYTES in all, UTF-8."""
    if filename != "-" and os.path.isdir(filename):
        names = sorted(n for n in os.listdir(filename)
                       if n.endswith((".yaml", ".yml", ".json")) and not n.startswith("."))
        if not names:
            raise InvalidResource(f"directory {filename} holds no .yaml, .yml or .json file.")
        paths = [os.path.join(filename, n) for n in names]
    else:
        paths = [filename]
    sources, left = [], MAX_INPUT_BYTES
    for path in paths:
        text = _read_text(path, left, filename)
        left -= len(text.encode())
        sources.append((path if len(paths) > 1 else "", text))
    return sources


def _read_text(path: str, limit: int, named: str) -> str:
    where = "stdin" if path == "-" else named if path == named else f"{named} (in all)"
    try:
        if path == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
        if len(data) > limit:
            raise InvalidResource(f"{where} is larger than the {MAX_INPUT_BYTES} bytes pipitctl "
                                  "reads at once; split it into smaller files.")
        return data.decode("utf-8")
    except OSError as error:
        raise InvalidResource(f"cannot read {path}: {error.strerror}.") from None
    except UnicodeDecodeError:
        raise InvalidResource(f"cannot read {'stdin' if path == '-' else path}: it is not "
                              "UTF-8 text.") from None


def _read_file_option(ctx, param, value):
    # read while the command line is parsed, before any event loop: Ctrl-C then interrupts a
    # read of stdin at once (inside asyncio.run the first SIGINT only waits for the read);
    # not while the shell completes a word
    return None if value is None or ctx.resilient_parsing else read_input(value)


# -- shell completion: kinds, and the names etcd holds of one -------------------------------

def complete_kinds(ctx, param, incomplete: str) -> list[str]:
    return [plural for plural in (*(k.plural for k in KINDS), workloads.WORDS[0])
            if plural.startswith(incomplete.lower())]


def complete_names(ctx, param, incomplete: str) -> list[str]:
    """The names of the kind typed before, from etcd (nothing if it cannot be read soon)."""
    try:
        kind = kind_named(ctx.params.get("kind") or "")
        given = {**ctx.find_root().params, **{k: v for k, v in ctx.params.items() if v}}
        config, _ = etcd_config(given)

        async def names() -> list[str]:
            async with Store(replace(config, timeout=2.0)) as store:
                return [key.removeprefix(kind.prefix)
                        for key in await store.list_keys(kind.prefix)]
        found = asyncio.run(names())
    except Exception:  # completing must never print an error into the command line
        return []
    typed = set(ctx.params.get("names") or ())
    return [n for n in sorted(found) if n.startswith(incomplete) and n not in typed]


def file_option(required: bool = True, help: str = "YAML or JSON file with one or more "
                "resources, a directory of them, or - for stdin."):
    return click.option("-f", "--filename", "sources", required=required, metavar="FILE|DIR|-",
                        callback=_read_file_option, help=help)


def echo_lines(lines: list[str]) -> None:
    for line in lines:
        click.echo(line)
