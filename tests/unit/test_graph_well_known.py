"""The Graph driver's well-known-folder lookup under concurrency: one lookup for every call waiting on it, its answer
or its error shared, and a failed lookup not remembered. (The integration suite counts the requests a hundred calls
make against the Microsoft emulator; here the timing is under the test's control.)"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from server.domain.blocking import BlockingPool
from server.errors import ProviderUnavailable
from server.providers.microsoft.graph import WELL_KNOWN, GraphDriver, GraphSettings


@pytest.fixture
async def driver() -> Any:
    blocking = BlockingPool(1, name="test-graph")
    graph = GraphDriver(tokens=None, pool=blocking, settings=GraphSettings())  # type: ignore[arg-type]
    yield graph
    await graph.close()
    blocking.shutdown()


async def test_waiters_share_one_failed_lookup_and_the_next_call_looks_again(driver: GraphDriver) -> None:
    asked: list[str] = []
    all_asked, answer = asyncio.Event(), asyncio.Event()

    async def failing(url: str, **_: Any) -> dict[str, Any]:
        asked.append(url)
        if len(asked) == len(WELL_KNOWN):
            all_asked.set()
        await answer.wait()
        raise ProviderUnavailable("the provider failed", reason="PROVIDER_ERROR")

    driver._get = failing  # type: ignore[method-assign]
    waiting = [asyncio.create_task(driver.well_known()) for _ in range(10)]
    await asyncio.wait_for(all_asked.wait(), 10)
    await asyncio.sleep(0.05)  # room for any call that would ask again on its own
    answer.set()
    outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    assert [getattr(o, "reason", None) for o in outcomes] == ["PROVIDER_ERROR"] * 10
    assert len(asked) == len(WELL_KNOWN)  # one lookup for the ten

    async def found(url: str, **_: Any) -> dict[str, Any]:
        asked.append(url)
        return {"id": "id-" + url.rsplit("/", 1)[1]}

    driver._get = found  # type: ignore[method-assign]
    assert await driver.well_known() == {f"id-{name}": name for name in WELL_KNOWN}
    assert len(asked) == 2 * len(WELL_KNOWN)
    assert await driver.well_known() == {f"id-{name}": name for name in WELL_KNOWN}
    assert len(asked) == 2 * len(WELL_KNOWN)  # remembered once found


async def test_a_waiter_that_gives_up_leaves_the_lookup_to_the_others(driver: GraphDriver) -> None:
    answer = asyncio.Event()

    async def slow(url: str, **_: Any) -> dict[str, Any]:
        await answer.wait()
        return {"id": "id-" + url.rsplit("/", 1)[1]}

    driver._get = slow  # type: ignore[method-assign]
    impatient = asyncio.create_task(driver.well_known())
    patient = asyncio.create_task(driver.well_known())
    await asyncio.sleep(0)
    impatient.cancel()  # a caller's deadline
    answer.set()
    assert await patient == {f"id-{name}": name for name in WELL_KNOWN}
    with pytest.raises(asyncio.CancelledError):
        await impatient
