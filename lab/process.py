"""Helpers every lab part uses: waiting on a condition with a deadline (never a fixed sleep),
whether a process runs (and is the one we started), and stopping or killing a process group."""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import subprocess
import time
from collections.abc import Callable


def wait(condition: Callable[[], object], timeout: float = 30.0, what: str = "condition",
         interval: float = 0.05):
    """Poll `condition` until it returns something truthy (returned) or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


async def wait_async(condition: Callable[[], object], timeout: float = 30.0,
                     what: str = "condition", interval: float = 0.05):
    """`wait` for coroutines: polls `condition` with `asyncio.sleep` between tries, so the
    event loop runs on meanwhile. `condition` is a plain function or one returning an
    awaitable (an `async def`), whose result is then awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


def signal_group(pid: int, sig: int) -> None:
    """Signal a process group (quietly: it may be gone already)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(process: subprocess.Popen | None, sig: int = signal.SIGTERM,
               timeout: float = 10.0) -> int | None:
    """`sig` to the process's group (it was started with start_new_session), SIGKILL after
    `timeout`; returns the exit status."""
    if process is None:
        return None
    if process.poll() is None:
        signal_group(process.pid, sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            signal_group(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode


def alive(pid: int) -> bool:
    """Running (a zombie is not: reaped here if it is our child, else left to its parent)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def command_line(pid: int) -> list[str]:
    """The arguments a process runs with ([] if it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return [a.decode(errors="replace") for a in cmdline.read().split(b"\0") if a]
    except (FileNotFoundError, ProcessLookupError):
        return []


def kill(pid: int) -> None:
    """SIGKILL a process and, if it leads one, its process group."""
    for send in (os.killpg, os.kill):
        try:
            send(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
