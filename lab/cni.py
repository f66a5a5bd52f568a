"""A minimal CNI runtime: what libcni does for a container runtime, in Python.

It runs a network configuration (one plugin, or a list of them under `plugins`) for ADD,
CHECK, DEL, STATUS and GC the way the CNI specification (1.1) tells a runtime to:

- each plugin gets its own configuration with the list's `name` and `cniVersion`, a
  `runtimeConfig` holding the capability arguments it declared in `capabilities`, and
  `prevResult`: on ADD the result of the plugin before it, on CHECK and DEL the cached result
  of the last ADD;
- DEL runs the plugins in reverse order; CHECK is skipped for `disableCheck` and refused
  before 0.4.0; STATUS and GC exist from 1.1.0 on (older lists: nothing to do);
- GC first DELs every cached attachment of the network that is not in the valid list, then
  sends GC with `cni.dev/valid-attachments` to every plugin (libcni's two stages);
- plugins are found in the bin directories, get the CNI_* environment, and can run inside a
  given network namespace (the "node"), so that host-side veths, bridges, routes and iptables
  rules land there and never in the machine's own namespace.

A plugin's failure raises `CNIError` carrying the error JSON it printed (code, msg, details).
The ADD result is cached per attachment (in memory, or in a directory that survives the
process, like libcni's /var/lib/cni) for the CHECK and DEL that follow.

    runtime = CNIRuntime(bin_dir, netns="node-1", cache_dir=state / "cni")
    net = NetworkConfig.load(conflist)
    pod = Attachment(container_id="c1", netns="/var/run/netns/pod-1", ifname="eth0",
                     capability_args={"portMappings": [...]})
    result = runtime.add(net, pod)      # parsed result of the last plugin
    runtime.check(net, pod)
    runtime.delete(net, pod)
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
PLUGIN_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins
DEFAULT_TIMEOUT = 60.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_FROM_CACHE = object()


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split("."))
    except (AttributeError, ValueError):
        return (0,)


class InvalidNetworkConfig(ValueError):
    """The network configuration cannot be run (caught before any plugin runs)."""


class CNIError(Exception):
    """A plugin failed. `code`, `msg` and `details` come from the error JSON it printed
    (`error`); `code` is None when it printed none (crash, timeout, plugin missing)."""

    def __init__(self, code: int | None, msg: str, details: str = "", *, plugin: str = "",
                 command: str = "", error: dict | None = None, stderr: str = "",
                 returncode: int | None = None):
        self.code, self.msg, self.details = code, msg, details
        self.plugin, self.command = plugin, command
        self.error = error
        self.stderr = stderr
        self.returncode = returncode
        self.cleanup_error: Exception | None = None  # a failed DEL after a failed ADD
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.plugin} {self.command}".strip() or "plugin"
        code = "" if self.code is None else f" (CNI error {self.code})"
        details = f" [{self.details}]" if self.details else ""
        return f"{where} failed{code}: {self.msg}{details}"


@dataclass(frozen=True)
class NetworkConfig:
    """A network configuration list; a single plugin's configuration becomes a list of one."""
    name: str
    cni_version: str
    plugins: tuple[Mapping[str, Any], ...]
    disable_check: bool = False
    disable_gc: bool = False
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def load(cls, source: Mapping | str | bytes | Path) -> NetworkConfig:
        """From a dict, JSON text, or a .conf / .conflist file."""
        if isinstance(source, Path):
            source = source.read_bytes()
        if isinstance(source, (str, bytes)):
            try:
                source = json.loads(source)
            except ValueError as error:
                raise InvalidNetworkConfig(f"the network configuration is not JSON: {error}")
        if not isinstance(source, Mapping):
            raise InvalidNetworkConfig("the network configuration is not a JSON object.")
        conf = dict(source)
        plugins = conf.get("plugins")
        if plugins is None:  # a single plugin (.conf): the list is just it
            if "type" not in conf:
                raise InvalidNetworkConfig("the network configuration has neither `plugins` "
                                           "nor `type`.")
            plugins = [{k: v for k, v in conf.items() if k not in ("name", "cniVersion",
                                                                    "cniVersions")}]
        if not isinstance(plugins, list) or not plugins:
            raise InvalidNetworkConfig("`plugins` must be a non-empty list.")
        for plugin in plugins:
            if not isinstance(plugin, Mapping) or not isinstance(plugin.get("type"), str) \
                    or not _NAME.fullmatch(plugin["type"]):
                raise InvalidNetworkConfig(f"plugin entry {plugin!r} has no valid `type`.")
        name = conf.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidNetworkConfig(f"network name {name!r} is not valid: letters, digits, "
                                       "'_', '.' and '-', starting with a letter or digit.")
        version = cls._pick_version(conf)
        return cls(name, version, tuple(plugins), _flag(conf.get("disableCheck")),
                   _flag(conf.get("disableGC")), conf)

    @staticmethod
    def _pick_version(conf: Mapping) -> str:
        """`cniVersions` (1.1): the highest one this runtime supports; else `cniVersion`."""
        offered = conf.get("cniVersions")
        if isinstance(offered, list):
            usable = [v for v in offered if v in SUPPORTED_VERSIONS]
            if usable:
                return max(usable, key=_version)
        version = conf.get("cniVersion")
        if version not in SUPPORTED_VERSIONS:
            raise InvalidNetworkConfig(f"cniVersion {version!r} is not supported by this "
                                       f"runtime (supported: {', '.join(SUPPORTED_VERSIONS)}).")
        return version

    def at_least(self, version: str) -> bool:
        return _version(self.cni_version) >= _version(version)


def _flag(value) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


@dataclass(frozen=True)
class Attachment:
    """One container's interface on a network (libcni's RuntimeConf)."""
    container_id: str
    netns: str  # path of the container's network namespace, e.g. /var/run/netns/pod-1
    ifname: str = "eth0"
    args: tuple[tuple[str, str], ...] = ()  # CNI_ARGS, e.g. (("K8S_POD_NAME", "web-0"),)
    capability_args: Mapping[str, Any] = field(default_factory=dict)  # e.g. portMappings

    def __post_init__(self):  # what libcni checks before running anything
        if not isinstance(self.container_id, str) or not _NAME.fullmatch(self.container_id):
            raise InvalidNetworkConfig(f"container ID {self.container_id!r} is not valid: "
                                       "letters, digits, '_', '.' and '-'.")
        name = self.ifname
        if (not isinstance(name, str) or not 0 < len(name) <= 15 or name in (".", "..")
                or any(c in name for c in "/: \t\n")):
            raise InvalidNetworkConfig(f"interface name {name!r} is not valid: 1-15 "
                                       "characters, no '/', ':' or whitespace.")

    @property
    def cni_args(self) -> str:
        return ";".join(f"{k}={v}" for k, v in self.args)


class ResultCache:
    """ADD results per (network, container, interface): in memory, or one JSON file each in
    `directory` (libcni's layout: results/<network>-<container>-<ifname>)."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) / "results" if directory else None
        self._memory: dict[tuple[str, str, str], dict] = {}
        self._lock = threading.Lock()
        if self.directory:
            self.directory.mkdir(parents=True, exist_ok=True)

    def _file(self, key: tuple[str, str, str]) -> Path:
        return self.directory / "-".join(key)

    def put(self, net: NetworkConfig, attachment: Attachment, result: dict | None) -> None:
        key = (net.name, attachment.container_id, attachment.ifname)
        entry = {
            "kind": "cniCacheV1", "networkName": net.name,
            "containerId": attachment.container_id, "ifName": attachment.ifname,
            "netns": attachment.netns, "cniArgs": [list(a) for a in attachment.args],
            "capabilityArgs": dict(attachment.capability_args),
            "config": base64.b64encode(json.dumps(net.raw).encode()).decode(),
            "result": result,
        }
        with self._lock:
            if self.directory is None:
                self._memory[key] = entry
                return
            tmp = self._file(key).with_suffix(".tmp")
            tmp.write_text(json.dumps(entry))
            os.replace(tmp, self._file(key))

    def get(self, net: NetworkConfig, attachment: Attachment) -> dict | None:
        key = (net.name, attachment.container_id, attachment.ifname)
        with self._lock:
            if self.directory is None:
                return self._memory.get(key)
            try:
                return json.loads(self._file(key).read_text())
            except (FileNotFoundError, ValueError):
                return None

    def remove(self, net: NetworkConfig, attachment: Attachment) -> None:
        key = (net.name, attachment.container_id, attachment.ifname)
        with self._lock:
            if self.directory is None:
                self._memory.pop(key, None)
            else:
                self._file(key).unlink(missing_ok=True)

    def entries(self) -> list[dict]:
        with self._lock:
            if self.directory is None:
                return list(self._memory.values())
            found = []
            for path in sorted(self.directory.iterdir()):
                if path.suffix == ".tmp":
                    continue
                try:
                    found.append(json.loads(path.read_text()))
                except (OSError, ValueError):
                    continue
            return found


@dataclass
class Invocation:
    """What one plugin run got and gave, for callers who need the raw exchange."""
    argv: list[str]
    env: dict[str, str]
    stdin: bytes
    returncode: int
    stdout: bytes
    stderr: bytes


class CNIRuntime:
    """Runs CNI plugins from `bin_dirs` (CNI_PATH), inside network namespace `netns` (a name
    under /var/run/netns) if given, through `wrapper` (an argv prefix, e.g. one that gives the
    plugin a lab node's own /run: lab.chart.node_view) if given. Thread-safe: many attachments
    may be added at once."""

    def __init__(self, bin_dirs: str | Path | Sequence[str | Path], *, netns: str | None = None,
                 cache_dir: str | Path | None = None, timeout: float = DEFAULT_TIMEOUT,
                 env: Mapping[str, str] | None = None, wrapper: Sequence[str] = ()):
        if isinstance(bin_dirs, (str, Path)):
            bin_dirs = [bin_dirs]
        self.bin_dirs = [str(d) for d in bin_dirs]
        self.netns = netns
        self.cache = ResultCache(cache_dir)
        self.timeout = timeout
        self.env = dict(env or {})  # added to (or replacing) the inherited environment
        self.wrapper = list(wrapper)

    # -- network lists ------------------------------------------------------------------

    def add(self, net: NetworkConfig, attachment: Attachment, *,
            cleanup_on_failure: bool = True) -> dict:
        """ADD every plugin in order; returns the last plugin's result (also cached). If a
        plugin fails and `cleanup_on_failure`, the whole list is DELeted (as the spec asks a
        runtime to) before the error is raised."""
        result: dict | None = None
        try:
            for plugin in net.plugins:
                result = self.exec_plugin(plugin["type"], "ADD",
                                          self.plugin_config(net, plugin, attachment, result),
                                          attachment)
                if not isinstance(result, dict):
                    raise CNIError(None, "printed no result", plugin=plugin["type"],
                                   command="ADD")
        except CNIError as error:
            if cleanup_on_failure:
                try:
                    self.delete(net, attachment, prev_result=None)
                except CNIError as cleanup:
                    error.cleanup_error = cleanup
            raise
        self.cache.put(net, attachment, result)
        return result

    def check(self, net: NetworkConfig, attachment: Attachment) -> None:
        """CHECK every plugin in order against the cached ADD result."""
        if not net.at_least("0.4.0"):
            raise InvalidNetworkConfig(f"cniVersion {net.cni_version} has no CHECK (0.4.0+).")
        if net.disable_check:
            return
        cached = self.cache.get(net, attachment)
        if cached is None or cached.get("result") is None:
            raise CNIError(None, f"no cached ADD result for container "
                           f"{attachment.container_id} on network {net.name}", command="CHECK")
        for plugin in net.plugins:
            self.exec_plugin(plugin["type"], "CHECK",
                             self.plugin_config(net, plugin, attachment, cached["result"]),
                             attachment)

    def delete(self, net: NetworkConfig, attachment: Attachment, *,
               prev_result: Any = _FROM_CACHE) -> None:
        """DEL every plugin in reverse order, with the cached ADD result as prevResult (0.4.0+,
        if there is one); the cache entry goes once all plugins succeeded."""
        if prev_result is _FROM_CACHE:
            cached = self.cache.get(net, attachment) if net.at_least("0.4.0") else None
            prev_result = cached.get("result") if cached else None
        for plugin in reversed(net.plugins):
            self.exec_plugin(plugin["type"], "DEL",
                             self.plugin_config(net, plugin, attachment, prev_result),
                             attachment)
        self.cache.remove(net, attachment)

    def status(self, net: NetworkConfig) -> None:
        """STATUS (1.1.0+) of every plugin; raises the first failure (50: not available)."""
        if not net.at_least("1.1.0"):
            return
        for plugin in net.plugins:
            self.exec_plugin(plugin["type"], "STATUS", self.plugin_config(net, plugin))

    def gc(self, net: NetworkConfig, valid: Iterable[Attachment | tuple[str, str]]) -> None:
        """Garbage-collect the network: DEL the cached attachments not in `valid`, then (1.1.0+)
        GC every plugin with `cni.dev/valid-attachments`. Raises the first error after trying
        everything."""
        if net.disable_gc:
            return
        keep = [(v.container_id, v.ifname) if isinstance(v, Attachment) else tuple(v)
                for v in valid]
        errors: list[CNIError] = []
        for entry in self.cache.entries():
            if entry.get("networkName") != net.name:
                continue
            if (entry["containerId"], entry["ifName"]) in keep:
                continue
            stale = Attachment(entry["containerId"], entry.get("netns", ""), entry["ifName"],
                               tuple(tuple(a) for a in entry.get("cniArgs") or ()),
                               entry.get("capabilityArgs") or {})
            try:
                self.delete(net, stale)
            except CNIError as error:
                errors.append(error)
        if net.at_least("1.1.0"):
            listed = [{"containerID": c, "ifname": i} for c, i in keep]
            for plugin in net.plugins:
                conf = self.plugin_config(net, plugin)
                conf["cni.dev/valid-attachments"] = listed
                conf["cni.dev/attachments"] = listed  # libcni sends both spellings
                try:
                    self.exec_plugin(plugin["type"], "GC", conf)
                except CNIError as error:
                    errors.append(error)
        if errors:
            raise errors[0]

    def version(self, plugin_type: str) -> dict:
        """The plugin's VERSION answer: {"cniVersion": ..., "supportedVersions": [...]}."""
        return self.exec_plugin(plugin_type, "VERSION", {"cniVersion": SUPPORTED_VERSIONS[-1]})

    def validate(self, net: NetworkConfig) -> None:
        """Every plugin exists and supports the list's cniVersion (libcni ValidateNetworkList)."""
        for plugin in net.plugins:
            supported = self.version(plugin["type"]).get("supportedVersions") or []
            if net.cni_version not in supported:
                raise InvalidNetworkConfig(f"plugin {plugin['type']} does not support cniVersion "
                                           f"{net.cni_version} (it supports "
                                           f"{', '.join(supported)}).")

    def cached_result(self, net: NetworkConfig, attachment: Attachment) -> dict | None:
        entry = self.cache.get(net, attachment)
        return entry.get("result") if entry else None

    # -- one plugin ---------------------------------------------------------------------

    @staticmethod
    def plugin_config(net: NetworkConfig, plugin: Mapping, attachment: Attachment | None = None,
                      prev_result: dict | None = None) -> dict:
        """The configuration one plugin is executed with (spec: "Deriving execution
        configuration from plugin configuration")."""
        conf = dict(plugin)
        conf["name"] = net.name
        conf["cniVersion"] = net.cni_version
        if attachment is not None:
            capabilities = plugin.get("capabilities") or {}
            runtime = {cap: attachment.capability_args[cap] for cap, on in capabilities.items()
                       if on and cap in attachment.capability_args}
            if runtime:
                conf["runtimeConfig"] = runtime
        if prev_result is not None:
            conf["prevResult"] = prev_result
        return conf

    def find(self, plugin_type: str) -> str:
        for directory in self.bin_dirs:
            path = os.path.join(directory, plugin_type)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
        raise CNIError(None, f"plugin {plugin_type!r} is not in {os.pathsep.join(self.bin_dirs)}",
                       plugin=plugin_type)

    def environment(self, command: str, attachment: Attachment | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
        env.update(self.env)
        env["CNI_COMMAND"] = command
        env["CNI_PATH"] = os.pathsep.join(self.bin_dirs)
        if attachment is not None:
            env["CNI_CONTAINERID"] = attachment.container_id
            env["CNI_NETNS"] = attachment.netns
            env["CNI_IFNAME"] = attachment.ifname
            if attachment.args:
                env["CNI_ARGS"] = attachment.cni_args
        return env

    def exec_plugin(self, plugin_type: str, command: str, config: Mapping | bytes,
                    attachment: Attachment | None = None) -> dict | None:
        """Run one plugin; returns its parsed stdout (None if it printed nothing)."""
        stdin = config if isinstance(config, bytes) else json.dumps(config).encode()
        run = self.invoke(self.find(plugin_type), self.environment(command, attachment), stdin)
        return parse_output(run, plugin_type, command)

    def invoke(self, path: str, env: Mapping[str, str], stdin: bytes) -> Invocation:
        """Execute a plugin binary with exactly this environment and stdin (inside the
        runtime's namespace); the raw exchange, whatever the exit code."""
        argv = [*self.wrapper, path]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=dict(env),
                                   start_new_session=True)
        try:
            stdout, stderr = process.communicate(stdin, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            raise CNIError(None, f"did not finish within {self.timeout:g} s and was killed",
                           plugin=os.path.basename(path), command=env.get("CNI_COMMAND", ""))
        except BaseException:
            _kill_group(process)
            raise
        return Invocation(argv, dict(env), stdin, process.returncode, stdout, stderr)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.communicate()


def parse_output(run: Invocation, plugin: str = "", command: str = "") -> dict | None:
    """A plugin's answer: its result on success; `CNIError` from its error JSON otherwise."""
    plugin = plugin or os.path.basename(run.argv[-1])
    command = command or run.env.get("CNI_COMMAND", "")
    stderr = run.stderr.decode(errors="replace").strip()
    text = run.stdout.decode(errors="replace").strip()
    if run.returncode != 0:
        try:
            error = json.loads(text)
        except ValueError:
            error = None
        if isinstance(error, dict) and isinstance(error.get("code"), int):
            raise CNIError(error["code"], str(error.get("msg", "")), str(error.get("details", "")),
                           plugin=plugin, command=command, error=error, stderr=stderr,
                           returncode=run.returncode)
        raise CNIError(None, stderr or text or f"exit status {run.returncode}", plugin=plugin,
                       command=command, stderr=stderr, returncode=run.returncode)
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        raise CNIError(None, f"printed output that is not JSON: {text[:200]!r}", plugin=plugin,
                       command=command, stderr=stderr, returncode=0) from None


def ipv4_only_iptables(directory: str | Path) -> dict[str, str]:
    """Environment for plugins that hides ip6tables from them (a stub that fails first in
    PATH). Works around containernetworking/plugins#819 in portmap 1.1.1 (Debian 12): its
    CHECK also looks for IPv6 DNAT chains that ADD never made for an IPv4-only pod, and fails;
    with ip6tables unusable portmap handles IPv4 alone, for ADD, CHECK and DEL."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("ip6tables", "ip6tables-save", "ip6tables-restore"):
        stub = directory / name
        stub.write_text("#!/bin/sh\necho 'ip6tables is hidden from CNI plugins here' >&2\n"
                        "exit 1\n")
        stub.chmod(0o755)
    return {"PATH": os.pathsep.join([str(directory), os.environ.get("PATH", os.defpath)])}


def install_bin_dir(path: str | Path, plugin_dir: str | Path = PLUGIN_DIR,
                    python: str | None = None) -> Path:
    """A CNI bin directory: symlinks to the reference plugins in `plugin_dir`, plus pipit-ipam
    as `python -m ipam.cni install` puts it there (the native front, and the Python plugin
    run by `python` beside it)."""
    from ipam.cni_install import install  # the plugin's own installer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for source in sorted(Path(plugin_dir).iterdir()):
        link = path / source.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
    install(str(path), python)
    return path
