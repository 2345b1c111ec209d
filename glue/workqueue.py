"""A work queue of keys: de-duplicated, one worker per key at a time, delayed retries.

Shaped like client-go's rate-limited queue: a key added while it is being
processed is marked dirty and comes back once the worker is done, so a
burst of events for one object means one reconcile at a time, never two in
parallel and never a lost update.
"""
from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from typing import Hashable


class WorkQueue:
    def __init__(self, base_delay: float = 0.5, max_delay: float = 300.0):
        self._cv = threading.Condition()
        self._queue: deque = deque()
        self._queued: set = set()
        self._processing: set = set()
        self._dirty: set = set()
        self._delayed: list = []  # heap of (due, seq, key)
        self._seq = 0
        self._failures: dict = {}
        self._closed = False
        self.base_delay = base_delay
        self.max_delay = max_delay

    def add(self, key: Hashable) -> None:
        with self._cv:
            self._add_locked(key)

    def _add_locked(self, key: Hashable) -> None:
        if self._closed:
            return
        if key in self._processing:
            self._dirty.add(key)
            return
        if key in self._queued:
            return
        self._queued.add(key)
        self._queue.append(key)
        self._cv.notify()

    def add_after(self, key: Hashable, delay: float) -> None:
        if delay <= 0:
            return self.add(key)
        with self._cv:
            self._seq += 1
            heapq.heappush(self._delayed, (time.monotonic() + delay, self._seq, key))
            self._cv.notify()

    def retry(self, key: Hashable) -> float:
        """Re-add after an exponential backoff for this key; returns the delay."""
        with self._cv:
            n = self._failures.get(key, 0)
            self._failures[key] = n + 1
        delay = min(self.base_delay * (2 ** n), self.max_delay)
        self.add_after(key, delay)
        return delay

    def forget(self, key: Hashable) -> None:
        with self._cv:
            self._failures.pop(key, None)

    def get(self, timeout: float | None = None) -> Hashable | None:
        """Next key to work on (marked processing), or None on close/timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while True:
                if self._closed:
                    return None
                now = time.monotonic()
                while self._delayed and self._delayed[0][0] <= now:
                    _, _, k = heapq.heappop(self._delayed)
                    self._add_locked(k)
                if self._queue:
                    key = self._queue.popleft()
                    self._queued.discard(key)
                    self._processing.add(key)
                    return key
                wait = None
                if self._delayed:
                    wait = self._delayed[0][0] - now
                if deadline is not None:
                    left = deadline - now
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                self._cv.wait(wait)

    def done(self, key: Hashable) -> None:
        with self._cv:
            self._processing.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                self._add_locked(key)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def __len__(self) -> int:
        with self._cv:
            return len(self._queue) + len(self._delayed)
