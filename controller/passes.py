"""How pipit-controller's loops run their passes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ipam.errors import PipitError

log = logging.getLogger("pipit-controller")


async def run_passes(run_pass: Callable[[], Awaitable[None]], wake: asyncio.Event,
                     interval: float, what: str, debounce: float) -> None:
    """Run `run_pass` now, then `debounce` seconds after `wake` is set or `interval` after
    the last pass; a pass that fails on etcd or the API away (a PipitError) is said and
    tried again, backing off from 1 s to 30 s."""
    pause = 1.0
    while True:
        wake.clear()
        try:
            await run_pass()
            timeout, pause = interval, 1.0
        except PipitError as error:
            log.warning("%s failed: %s; trying again in %gs", what, error, pause)
            timeout, pause = pause, min(pause * 2, 30.0)
        try:
            await asyncio.wait_for(wake.wait(), timeout)
            await asyncio.sleep(debounce)
        except asyncio.TimeoutError:
            pass
