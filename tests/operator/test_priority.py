"""WritePriority: a status refresh waits for the reconciles in flight, and never longer than its bound."""

from __future__ import annotations

import asyncio

from kubellm.operator.priority import WritePriority


def test_a_refresh_waits_until_no_reconcile_is_in_flight() -> None:
    async def scenario() -> list[str]:
        priority, order = WritePriority(), []
        first, second = asyncio.Event(), asyncio.Event()

        async def reconcile(name: str, done: asyncio.Event) -> None:
            async with priority.reconcile():
                await done.wait()
                order.append(name)

        async def refresh() -> None:
            await priority.refresh_turn(max_wait=30)
            order.append("refresh")

        tasks = [asyncio.create_task(reconcile("a", first)), asyncio.create_task(reconcile("b", second))]
        await asyncio.sleep(0)  # both reconciles are in flight
        assert priority.reconciling == 2
        waiting = asyncio.create_task(refresh())
        first.set()
        await tasks[0]
        await asyncio.sleep(0)
        assert not waiting.done(), "one reconcile is still in flight"
        second.set()
        await asyncio.gather(tasks[1], waiting)
        return order

    assert asyncio.run(scenario()) == ["a", "b", "refresh"]


def test_a_refresh_goes_ahead_after_its_bound_under_endless_reconciles() -> None:
    async def scenario() -> float:
        priority = WritePriority()
        stuck = asyncio.Event()

        async def reconcile() -> None:
            async with priority.reconcile():
                await stuck.wait()

        task = asyncio.create_task(reconcile())
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await priority.refresh_turn(max_wait=0.2)
        waited = loop.time() - started
        stuck.set()
        await task
        assert priority.reconciling == 0
        return waited

    assert 0.2 <= asyncio.run(scenario()) < 5


def test_a_refresh_with_nothing_in_flight_does_not_wait() -> None:
    async def scenario() -> bool:
        priority = WritePriority()
        try:
            async with priority.reconcile():
                raise RuntimeError("a failed reconcile still ends its turn")
        except RuntimeError:
            pass
        await asyncio.wait_for(priority.refresh_turn(max_wait=30), 1)
        return priority.reconciling == 0

    assert asyncio.run(scenario())
