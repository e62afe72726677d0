"""The work queue: coalescing, one in flight per key, delayed adds, backoff."""

from __future__ import annotations

import asyncio

import pytest

from trainyard.operator.workqueue import QueueClosed, WorkQueue, backoff_delay


async def test_events_for_a_waiting_key_are_coalesced():
    queue: WorkQueue[str] = WorkQueue()
    for _ in range(100):
        queue.add("a")
    queue.add("b")
    assert queue.depth == 2 and queue.coalesced == 99
    assert [await queue.get(), await queue.get()] == ["a", "b"]


async def test_a_key_being_processed_is_queued_again_once_when_done():
    queue: WorkQueue[str] = WorkQueue()
    queue.add("a")
    key = await queue.get()
    for _ in range(5):
        queue.add("a")  # events while its reconcile runs
    assert queue.depth == 0, "never handed to a second worker while in flight"
    queue.done(key)
    assert queue.depth == 1
    assert await queue.get() == "a"
    queue.done("a")
    assert queue.depth == 0


async def test_add_after_keeps_the_earliest_schedule():
    queue: WorkQueue[str] = WorkQueue()
    queue.add_after("a", 0.05)
    queue.add_after("a", 5.0)  # later wish: ignored
    assert queue.depth == 0 and queue.is_pending("a")
    assert await asyncio.wait_for(queue.get(), 2) == "a"


async def test_rate_limited_retries_back_off_and_forget_resets():
    queue: WorkQueue[str] = WorkQueue(backoff_base=0.01, backoff_cap=0.04)
    delays = [queue.add_rate_limited("a") for _ in range(4)]
    assert delays == [0.01, 0.02, 0.04, 0.04]
    queue.forget("a")
    assert queue.add_rate_limited("a") == 0.01


async def test_remove_cancels_schedules_of_a_deleted_object():
    queue: WorkQueue[str] = WorkQueue()
    queue.add_after("a", 0.05)
    queue.add_rate_limited("a")
    queue.remove("a")
    await asyncio.sleep(0.1)
    assert queue.depth == 0 and not queue.is_pending("a") and queue.failures("a") == 0


async def test_close_wakes_waiting_workers():
    queue: WorkQueue[str] = WorkQueue()
    waiter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    queue.close()
    with pytest.raises(QueueClosed):
        await asyncio.wait_for(waiter, 2)


@pytest.mark.parametrize(
    ("failures", "expected"), [(1, 0.5), (2, 1.0), (3, 2.0), (10, 60.0)], ids=str
)
def test_backoff_doubles_up_to_the_cap(failures, expected):
    assert backoff_delay(failures, base=0.5, cap=60.0) == expected


async def test_events_during_a_backoff_join_the_retry_instead_of_bypassing_it():
    queue: WorkQueue[str] = WorkQueue(backoff_base=0.2, backoff_cap=1.0)
    queue.add("a")
    key = await queue.get()
    queue.add("a")  # an event while the failing reconcile runs
    queue.add_rate_limited(key)
    queue.done(key)
    queue.add("a")  # and one while it waits for its retry
    assert queue.depth == 0, "no retry before the backoff"
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await asyncio.wait_for(queue.get(), 2) == "a"
    assert loop.time() - started >= 0.15
