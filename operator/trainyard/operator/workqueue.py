"""A deduplicating, rate-limited, delaying work queue of object keys.

The shape of client-go's `workqueue.RateLimitingInterface`, which controller-runtime
puts under every controller:

- a key is queued at most once: events that arrive while it waits are coalesced;
- a key is processed by one worker at a time: an event that arrives while it is being
  reconciled marks it dirty, and it is queued again when that reconcile is `done`;
- `add_after` schedules a delayed add (the earliest pending one wins), which is how a
  reconcile asks to look again later (a TTL, a deadline, the next progress read);
- `add_rate_limited` retries a failed key with exponential backoff per key, capped;
  events for a key that waits for its retry join that retry instead of bypassing it;
  `forget` resets it after a success.

Pure asyncio, no I/O: the runtime feeds it keys and drains it with workers.

>>> import asyncio
>>> async def demo():
...     queue = WorkQueue()
...     for _ in range(3):
...         queue.add("ml/demo")
...     key = await queue.get()
...     queue.done(key)
...     return key, queue.depth, queue.coalesced
>>> asyncio.run(demo())
('ml/demo', 0, 2)
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


def backoff_delay(failures: int, *, base: float, cap: float) -> float:
    """Seconds before retry number `failures` (1-based): base·2^(n-1), at most `cap`.

    >>> [backoff_delay(n, base=0.5, cap=5.0) for n in range(1, 7)]
    [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    """
    return min(cap, base * 2 ** max(0, failures - 1))


class WorkQueue(Generic[K]):
    """Keys waiting for a reconcile; see the module docstring for the rules."""

    def __init__(
        self,
        *,
        backoff_base: float = 0.5,
        backoff_cap: float = 300.0,
        on_depth: Callable[[int], None] | None = None,
        on_wait: Callable[[float], None] | None = None,
    ):
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self._on_depth, self._on_wait = on_depth, on_wait
        self._queue: deque[K] = deque()
        self._queued_at: dict[K, float] = {}  # queued (waiting) keys → when first added
        self._processing: set[K] = set()
        self._dirty: set[K] = set()  # added while processing
        self._timers: dict[K, tuple[float, asyncio.TimerHandle]] = {}
        self._failures: dict[K, int] = {}
        self._ready = asyncio.Condition()
        self._closed = False
        self.added = 0
        self.coalesced = 0

    @property
    def depth(self) -> int:
        """Keys waiting for a worker (not counting delayed ones or those being processed)."""
        return len(self._queue)

    def failures(self, key: K) -> int:
        return self._failures.get(key, 0)

    def is_pending(self, key: K) -> bool:
        """Queued, being processed, or scheduled for later."""
        return key in self._queued_at or key in self._processing or key in self._timers

    def add(self, key: K) -> None:
        """Queue `key` now (a no-op when it already waits)."""
        if self._closed:
            return
        self.added += 1
        if key in self._queued_at or key in self._dirty or self._backing_off(key):
            self.coalesced += 1
            return
        if key in self._processing:
            self._dirty.add(key)
            return
        self._push(key)

    def _push(self, key: K) -> None:
        self._queued_at[key] = time.monotonic()
        self._queue.append(key)
        self._report_depth()
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._ready:
            self._ready.notify()

    def add_after(self, key: K, delay: float) -> None:
        """Queue `key` after `delay` seconds; an earlier pending schedule is kept."""
        if self._closed:
            return
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        pending = self._timers.get(key)
        if pending is not None:
            if pending[0] <= when:
                return
            pending[1].cancel()
        self._timers[key] = (when, loop.call_at(when, self._fire, key))

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def _backing_off(self, key: K) -> bool:
        """A failing key waits for its retry: events meanwhile join that retry rather than
        bypass the backoff (a reconcile that keeps failing must not become a hot loop)."""
        return key in self._failures and key in self._timers

    def add_rate_limited(self, key: K) -> float:
        """Queue `key` again after its backoff; returns the delay."""
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        delay = backoff_delay(failures, base=self.backoff_base, cap=self.backoff_cap)
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        """The key succeeded: its next failure starts the backoff again."""
        self._failures.pop(key, None)

    def remove(self, key: K) -> None:
        """The object is gone: drop its schedule and failures (a queued add still runs once)."""
        pending = self._timers.pop(key, None)
        if pending is not None:
            pending[1].cancel()
        self._failures.pop(key, None)
        self._dirty.discard(key)

    async def get(self) -> K:
        """The next key to process; it is then being processed until `done`."""
        async with self._ready:
            await self._ready.wait_for(lambda: bool(self._queue) or self._closed)
            if not self._queue:
                raise QueueClosed
            key = self._queue.popleft()
        queued_at = self._queued_at.pop(key)
        self._processing.add(key)
        self._report_depth()
        if self._on_wait is not None:
            self._on_wait(time.monotonic() - queued_at)
        return key

    def done(self, key: K) -> None:
        """Processing of `key` ended; queue it again if events came meanwhile."""
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            if not self._backing_off(key):
                self._push(key)

    def close(self) -> None:
        """Wake every waiting worker with QueueClosed; cancel schedules."""
        self._closed = True
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        asyncio.get_running_loop().create_task(self._wake_all())

    async def _wake_all(self) -> None:
        async with self._ready:
            self._ready.notify_all()

    def _report_depth(self) -> None:
        if self._on_depth is not None:
            self._on_depth(len(self._queue))


class QueueClosed(Exception):
    """The queue was closed while a worker waited."""
