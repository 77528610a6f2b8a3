"""What bounds the viewer server's work: the slots heavy requests run in, and the cache
of encoded answers. Both are plain objects the server holds one of each; their sizes
are the server's memory bound (see :mod:`actstore.view.server`)."""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

QUEUE_WAIT_S = 30.0  # longest wait for a slot before a 503
CACHE_BYTES = 64 * 2**20  # encoded answers kept (a 512 x 512 heatmap is ~2.5 MB)


def default_slots() -> int:
    """Heavy requests at once: 2 to 4, following the machine's cores."""
    import os

    return max(2, min(4, (os.cpu_count() or 2) // 2))



class Slots:
    """At most ``n`` heavy requests at once; at most ``queue`` more wait (each up to
    ``wait_s``); the rest are turned away (503)."""

    def __init__(self, n: int, queue: int, wait_s: float = QUEUE_WAIT_S):
        self.n, self.queue, self.wait_s = n, queue, wait_s
        self._sem = asyncio.Semaphore(n)
        self.waiting = 0
        self.busy = 0

    async def acquire(self) -> bool:
        if self._sem.locked() and self.waiting >= self.queue:
            return False
        self.waiting += 1
        try:
            async with asyncio.timeout(self.wait_s):
                await self._sem.acquire()
        except TimeoutError:
            return False
        finally:
            self.waiting -= 1
        self.busy += 1
        return True

    def release(self) -> None:
        self.busy -= 1
        self._sem.release()


class AnswerCache:
    """Encoded answers of GET routes, most recent kept, up to ``max_bytes`` in all (0:
    no cache). The store's runs do not change once committed, so an answer stays right;
    the page asks for the same heatmap again whenever a control goes back and forth.
    One computation per key at a time: a request for a key being computed waits for it
    instead of computing it again (so a burst of identical heavy requests costs one)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[Any, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self._running: dict[Any, threading.Event] = {}
        self.hits = self.misses = 0

    def get_or_compute(self, key: Any, compute: Callable[[], tuple[int, bytes]]) -> tuple[int, bytes]:
        if self.max_bytes <= 0:
            return compute()
        while True:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    self.hits += 1
                    return 200, self._items[key]
                running = self._running.get(key)
                if running is None:
                    self._running[key] = threading.Event()
                    self.misses += 1
                    break
            running.wait()  # then: cached, or it failed and this request computes it itself
        try:
            status, body = compute()
            if status == 200 and len(body) <= self.max_bytes // 4:
                with self._lock:
                    self._items[key] = body
                    self._size += len(body)
                    while self._size > self.max_bytes:
                        self._size -= len(self._items.popitem(last=False)[1])
            return status, body
        finally:
            with self._lock:
                self._running.pop(key).set()
