"""The host pool as the watcher sees it: read through ``mpc.runner.hostpool``, like the
provisioning run reads it, from ConfigMap ``name`` (else Konflux's host-config),
briefly cached.

``get()`` gives (pool, []) or, for a missing or invalid pool, (None, errors): a
pool that cannot be read as a whole never means "every namespace allowed".
"""
from __future__ import annotations

import threading
import time

from mpc.runner import contract as c
from mpc.runner import hostpool
from mpc.runner import kube as k
from mpc.runner.kube import Kube


class PoolReader:
    def __init__(self, kube: Kube, namespace: str, name: str, ttl: float = 15.0):
        self.kube, self.namespace, self.name, self.ttl = kube, namespace, name, ttl
        self._at = -1e9
        self._value: tuple[hostpool.Pool | None, list[str]] = (None, [])
        self._lock = threading.Lock()

    def get(self) -> tuple[hostpool.Pool | None, list[str]]:
        with self._lock:
            if time.monotonic() - self._at < self.ttl:
                return self._value
            self._value = self._read()
            self._at = time.monotonic()
            return self._value

    def _read(self) -> tuple[hostpool.Pool | None, list[str]]:
        for name in dict.fromkeys([self.name, c.KONFLUX_CONFIGMAP]):
            cm = self.kube.get(k.configmap(self.namespace, name))
            if cm is None:
                continue
            where = f"ConfigMap {self.namespace}/{name}"
            try:
                return hostpool.from_configmap_data(where, cm.get("data")), []
            except hostpool.PoolError as e:
                return None, [f"{where}: {m}" for m in e.errors]
        return None, [f"no host pool: ConfigMap {self.namespace}/{self.name} not found"]
