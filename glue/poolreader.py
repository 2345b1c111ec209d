"""The host pool as the watcher sees it: ``mpc.runner.poolsource.load_pool``, the reader
the provisioning Tasks use, briefly cached.

``get()`` gives (pool, []) or, for a missing or invalid pool, (None, errors): a
pool that cannot be read as a whole never means "every namespace allowed". An
API error is raised (``ApiError``): the caller decides what it means.
"""
from __future__ import annotations

import threading
import time

from mpc.runner import hostpool
from mpc.runner.kube import Kube
from mpc.runner.poolsource import load_pool


class PoolReader:
    def __init__(self, kube: Kube, namespace: str, name: str, ttl: float = 15.0):
        self.kube, self.namespace, self.name, self.ttl = kube, namespace, name, ttl
        self._at = -1e9
        self._value: tuple[hostpool.Pool | None, list[str]] = (None, [])
        self._lock = threading.Lock()

    def get(self) -> tuple[hostpool.Pool | None, list[str]]:
        with self._lock:
            if time.monotonic() - self._at >= self.ttl:
                try:
                    self._value = load_pool(self.kube, self.namespace, self.name, retry=False), []
                except hostpool.PoolError as e:
                    self._value = None, list(e.errors)
                self._at = time.monotonic()
            return self._value
