"""pipit-agent as a subprocess, for tests, benchmarks and the lab: started in its own process
group with its log in a file, ready once its IPAM socket answers, stopped (SIGTERM), killed
(SIGKILL) and restarted on demand.

    with AgentProcess("node-1", socket_path, etcd.endpoint, log_path) as agent:
        ...                    # the socket answers here
        agent.kill()           # crash it
        agent.start()          # and bring it back
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ipam.cni import CNIError, ask_agent
from lab.process import stop_group

ROOT = Path(__file__).resolve().parent.parent


class AgentProcess:
    def __init__(self, node: str, socket_path: str | Path, etcd_endpoints: str | Sequence[str],
                 log_path: str | Path, *, extra_args: Sequence[str] = (),
                 python: str = sys.executable, log_level: str = "INFO"):
        self.node = node
        self.socket_path = Path(socket_path)
        self.endpoints = (etcd_endpoints if isinstance(etcd_endpoints, str)
                          else ",".join(etcd_endpoints))
        self.log_path = Path(log_path)
        self.extra_args = list(extra_args)
        self.python = python
        self.log_level = log_level
        self.process: subprocess.Popen | None = None

    @property
    def argv(self) -> list[str]:
        return [self.python, "-m", "bgp_agent.agent", "--node", self.node, "--no-bgp",
                "--ipam-socket", str(self.socket_path), "--status-socket", str(self.status_path),
                "--etcd-endpoints", self.endpoints,
                "--log-level", self.log_level, *self.extra_args]

    @property
    def status_path(self) -> Path:
        """Its status socket, beside the IPAM socket (as long a path: sockets' are limited)."""
        return self.socket_path.with_suffix(".stat")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout: float = 30.0, *, answering: bool = True) -> AgentProcess:
        """Start it and wait until the socket answers a STATUS request (unless not
        `answering`: an agent waiting for etcd or the Kubernetes API serves no socket yet)."""
        if self.running:
            raise RuntimeError(f"pipit-agent for {self.node} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=log, cwd=ROOT, env=env,
                                            start_new_session=True)
        if not answering:
            return self
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def answers(self) -> bool:
        """Whether the socket takes a request and sends back an answer (an error answer too:
        its details name the agent's error kind)."""
        try:
            ask_agent(str(self.socket_path), {"command": "STATUS"}, timeout=2.0)
        except CNIError as error:
            return bool(error.details)
        return True

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process is None or self.process.poll() is not None:
                code = self.process.returncode if self.process else None
                raise RuntimeError(f"pipit-agent for {self.node} exited with {code} before its "
                                   f"socket answered:\n{self.log_tail()}")
            if self.answers():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"pipit-agent for {self.node} did not answer on "
                                   f"{self.socket_path} within {timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit status."""
        return self._end(signal.SIGTERM, timeout)

    def kill(self) -> int | None:
        """SIGKILL the whole process group at once (a crash: the socket file stays behind)."""
        return self._end(signal.SIGKILL, 10.0)

    def restart(self, *, kill: bool = False, timeout: float = 30.0) -> AgentProcess:
        (self.kill if kill else self.stop)()
        return self.start(timeout)

    def _end(self, sig: int, timeout: float) -> int | None:
        return stop_group(self.process, sig, timeout)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class NodeAgentProcess(AgentProcess):
    """pipit-agent with routing (ExaBGP spawned unless `extra_args` say `--exabgp sidecar`)
    inside network namespace `netns`, keeping everything (its sockets, ExaBGP's files, the pod
    MTU, its log) in `state`. Ready, as AgentProcess, once its IPAM socket answers.

        agent = NodeAgentProcess("a", "pipit-t-pid1-node-1", state, "unix:///.../etcd.sock:0",
                                 extra_args=["--ip", "192.168.1.10/24"]).start()
        agent.status()["address"]
    """

    def __init__(self, node: str, netns: str, state: str | Path,
                 etcd_endpoints: str | Sequence[str], *, extra_args: Sequence[str] = (),
                 python: str = sys.executable, log_level: str = "INFO"):
        self.netns = netns
        self.state = Path(state)
        super().__init__(node, self.state / "ipam.sock", etcd_endpoints,
                         self.state / "agent.log", extra_args=extra_args, python=python,
                         log_level=log_level)

    @property
    def argv(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns, self.python, "-m", "bgp_agent.agent",
                "--node", self.node, "--etcd-endpoints", self.endpoints,
                "--state-dir", str(self.state), "--ipam-socket", str(self.socket_path),
                "--status-socket", str(self.status_path), "--exabgp", "spawn",
                "--log-level", self.log_level, *self.extra_args]

    @property
    def status_path(self) -> Path:
        return self.state / "status.sock"

    def status(self) -> dict | None:
        """Its status document (what `pipitctl node status` shows), None while it does not
        answer."""
        from bgp_agent.status import AgentUnavailable, read_status
        try:
            return read_status(str(self.status_path), timeout=2.0)
        except AgentUnavailable:
            return None
