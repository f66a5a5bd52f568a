"""A mirror follows etcd: puts, deletes, and etcd restarts (it lists again); its generation
moves with every change (the routing loop keeps what it derived while it stays)."""

import asyncio

from ipam.mirror import Mirror
from ipam.store import EtcdConfig, Store


async def wait_for(condition, event: asyncio.Event, seconds: float = 20.0) -> None:
    """Until `condition` holds, woken only by `event` (the mirror's `changed`): not
    lab.process.wait_async, whose polling would also pass a mirror that never signals."""
    async def loop():
        while not condition():
            event.clear()
            if condition():
                return
            await event.wait()
    await asyncio.wait_for(loop(), seconds)


def test_mirror_follows_changes_and_survives_an_etcd_restart(own_etcd):
    config = EtcdConfig(endpoints=(own_etcd.endpoint,), timeout=2.0)

    async def scenario():
        async with Store(config) as store, Store(config) as writer:
            await writer.put("/pipit/t/a", {"n": 1})
            mirror = Mirror(store, "/pipit/t/", lambda e: e.value["n"] or None,
                            retry_seconds=0.2)
            task = asyncio.create_task(mirror.run())
            seen = []

            def moved() -> bool:  # the generation differs from every one seen before
                fresh = mirror.generation not in seen
                seen.append(mirror.generation)
                return fresh
            try:
                await wait_for(lambda: mirror.items == {"/pipit/t/a": 1}, mirror.changed)
                assert moved()
                await writer.put("/pipit/t/b", {"n": 2})
                await writer.put("/pipit/t/a", {"n": 0})  # decodes to None: left out
                await wait_for(lambda: mirror.items == {"/pipit/t/b": 2}, mirror.changed)
                assert moved()
                own_etcd.stop()
                own_etcd.start()
                await writer.put("/pipit/t/c", {"n": 3})
                await wait_for(lambda: mirror.items == {"/pipit/t/b": 2, "/pipit/t/c": 3},
                               mirror.changed)
                assert moved()
                await writer.txn({}, delete=["/pipit/t/b"])
                await wait_for(lambda: mirror.items == {"/pipit/t/c": 3}, mirror.changed)
                assert moved()
            finally:
                task.cancel()
    asyncio.run(scenario())
