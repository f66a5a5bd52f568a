"""ExaBGP as a process the agent looks after (`--exabgp spawn`): started in its own session
on the files the speaker writes into the state directory, adopted instead of started again
when a previous agent left it running, restarted with backoff when it dies, stopped on request.

ExaBGP's own session means a SIGKILLed agent does not take it down, and its output goes to a
file (exabgp.log, rotated at start when large), not a pipe that dies with the agent. A sidecar
runs the same command (`exabgp_command`) in another container of the pod.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bgp_agent.metrics import EXABGP_RESTARTS

log = logging.getLogger("pipit-agent.exabgp")

LOG_ROTATE_BYTES = 10 * 2**20
CONFIG_FILE = "exabgp.conf"  # ExaBGP's files in the state directory
ENV_FILE = "exabgp.env"
PID_FILE = "exabgp.pid"
LOG_FILE = "exabgp.log"


def exabgp_command(state_dir: Path) -> list[str]:
    """How ExaBGP runs on the files in `state_dir` (spawned here, or as a sidecar):

        until [ -s STATE/exabgp.conf ]; do sleep 1; done
        exec pipit-exabgp --env-file STATE/exabgp.env server STATE/exabgp.conf

    pipit-exabgp is ExaBGP with fixes to its reactor loop (bgp_agent.exabgp_reactor) that
    the settings in exabgp.env count on.
    """
    state_dir = Path(state_dir)
    return [tool("pipit-exabgp"), "--env-file", str(state_dir / ENV_FILE), "server",
            str(state_dir / CONFIG_FILE)]


def tool(name: str) -> str:
    """A console script of this installation (beside the interpreter), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


class ExaBGPProcess:
    def __init__(self, state_dir: Path, netns: str | None = None):
        self.state_dir = Path(state_dir)
        self.netns = netns  # start ExaBGP inside this network namespace (lab, tests)
        self._process: subprocess.Popen | None = None  # ExaBGP, when we started it
        self._supervisor: asyncio.Task | None = None
        self._stopping = False

    @property
    def pid_path(self) -> Path:
        return self.state_dir / PID_FILE

    @property
    def log_path(self) -> Path:
        return self.state_dir / LOG_FILE

    def adoptable_pid(self) -> int | None:
        """The pid in exabgp.pid if it is still an ExaBGP running our configuration."""
        try:
            pid = int(self.pid_path.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return None
        config = str(self.state_dir / CONFIG_FILE).encode()
        if config in cmdline and any(b"exabgp" in a for a in cmdline):
            return pid
        return None

    def start(self) -> None:
        """Adopt the running ExaBGP or start one, and keep it running until stop()."""
        pid = self.adoptable_pid()
        if pid:
            log.info("adopting the running ExaBGP, pid %d", pid)
        else:
            pid = self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(pid))

    async def stop(self, terminate: bool) -> None:
        """Stop looking after ExaBGP; with `terminate`, stop it too (else the next agent
        adopts it)."""
        self._stopping = True
        if self._supervisor:
            self._supervisor.cancel()
        if terminate:
            pid = self._process.pid if self._process else self.adoptable_pid()
            if pid:
                await self._terminate(pid)
            self.pid_path.unlink(missing_ok=True)

    def _spawn(self) -> int:
        argv = exabgp_command(self.state_dir)
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        if self.log_path.exists() and self.log_path.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(self.log_path, self.log_path.with_suffix(".log.1"))
        # settings come from the env file only: variables inherited from our own environment
        # would silently override it
        env = {k: v for k, v in os.environ.items() if not k.lower().startswith("exabgp")}
        with open(self.log_path, "ab") as output:
            self._process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output,
                                             stderr=output, env=env, start_new_session=True)
        tmp = self.pid_path.with_name(PID_FILE + ".tmp")
        tmp.write_text(f"{self._process.pid}\n")
        os.replace(tmp, self.pid_path)
        log.info("started ExaBGP, pid %d (log %s)", self._process.pid, self.log_path)
        return self._process.pid

    async def _supervise(self, pid: int) -> None:
        backoff = 1.0
        while True:
            started = time.monotonic()
            await wait_exit(pid)
            if self._stopping:
                return
            status = "unknown status (not our child)"
            if self._process and self._process.pid == pid:
                status = f"status {self._process.wait()}"
            if time.monotonic() - started > 60:
                backoff = 1.0
            log.error("ExaBGP (pid %d) exited with %s; restarting it in %g s. Its last words:\n%s",
                      pid, status, backoff, self.log_tail())
            EXABGP_RESTARTS.inc()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
            pid = self._spawn()

    def log_tail(self, lines: int = 10) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def _terminate(self, pid: int, timeout: float = 10.0) -> None:
        try:
            os.kill(pid, signal.SIGTERM)
            await asyncio.wait_for(wait_exit(pid), timeout)
        except ProcessLookupError:
            pass
        except asyncio.TimeoutError:
            log.warning("ExaBGP (pid %d) ignored SIGTERM for %g s; killing it", pid, timeout)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await wait_exit(pid)
        if self._process and self._process.pid == pid:
            self._process.wait()


async def wait_exit(pid: int) -> None:
    """Until process `pid` has exited (a pidfd: works for a process that is not our child)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
    try:
        await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)
