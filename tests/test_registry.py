"""The registry's tasks, with a canary factory of the test's own (no API server): a task that crashes is started
again from the newest object seen, and none starts for a BirdWatch forgotten while it waited."""

from __future__ import annotations

import asyncio
from typing import Any

from birdwatch.registry import Registry
from birdwatch.spec import Phase
from birdwatch.updates import Updates


def birdwatch(resource_version: str, *, generation: int = 1) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "ns",
            "name": "aleph",
            "uid": "u-1",
            "generation": generation,
            "resourceVersion": resource_version,
        },
        "spec": {"service": "aleph"},
    }


async def test_a_crashed_task_starts_again_from_the_newest_object() -> None:
    seen: list[str] = []
    done = asyncio.Event()

    async def factory(obj: dict[str, Any], stop: asyncio.Event, updates: Updates) -> Phase | None:
        seen.append(obj["metadata"]["resourceVersion"])
        if len(seen) == 1:
            await asyncio.sleep(0.05)
            raise RuntimeError("a bug")
        done.set()
        return Phase.PROMOTED

    registry = Registry(factory, grace=1.0)
    registry.observe(birdwatch("1"))
    await asyncio.sleep(0.01)
    registry.observe(birdwatch("2"))  # e.g. its own status write coming back: same generation, no new task
    await asyncio.wait_for(done.wait(), 5)  # after the first restart back-off (1 s)
    assert seen == ["1", "2"]
    await registry.close()


async def test_no_task_starts_for_a_birdwatch_forgotten_while_it_waited() -> None:
    calls: list[int] = []
    release = asyncio.Event()

    async def factory(obj: dict[str, Any], stop: asyncio.Event, updates: Updates) -> Phase | None:
        calls.append(int(obj["metadata"]["generation"]))
        await release.wait()  # the first task does not stop at once: the next one waits for it
        return None

    registry = Registry(factory, grace=5.0)
    registry.observe(birdwatch("1"))
    await asyncio.sleep(0.01)
    registry.observe(birdwatch("2", generation=2))  # a spec change: a new task, after the old one stops
    await asyncio.sleep(0.01)
    registry.forget("ns", "aleph")
    release.set()
    await asyncio.sleep(0.05)
    assert calls == [1]
    assert registry.tasks() == []
    await registry.close()
