"""List+watch that survives everything the API server can do to a watch.

* LIST in pages (only one page alive at a time), then WATCH from the list's
  resourceVersion with bookmarks, so an idle watch still advances.
* A stream that ends (server timeout, load balancer) is resumed from the last
  resourceVersion seen: nothing is missed, nothing re-listed.
* 410 Gone (the resourceVersion was compacted away), as an HTTP status or as
  an ``ERROR`` event, means events were lost: LIST again. The official
  client's Watch does not do that; this does.
* Any other failure: back off (capped, jittered) and resume or re-list.

The reflector keeps no objects. It hands each one to ``handler(type, obj)``,
which extracts what it needs and returns whether it keeps anything of it. Of
those kept, the reflector remembers the name, namespace and uid: one that a
LIST after a gap (410, a restart of the watch) no longer shows was deleted
while nobody watched, and is handed over as ``DELETED`` with that metadata
alone (client-go's DeletedFinalStateUnknown). ``on_listed()`` follows every
full LIST.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from typing import Callable

from mpc.runner.kube import ApiError, Kube

log = logging.getLogger("mpc.glue.informer")


class Reflector:
    def __init__(self, kube: Kube, name: str, path: str, handler: Callable[[str, dict], bool],
                 on_listed: Callable[[], None] | None = None,
                 label_selector: str | None = None, page_size: int = 100,
                 watch_timeout: int = 300, resync_period: float = 0.0,
                 on_error: Callable[[str], None] | None = None,
                 wanted: Callable[[bytes], bool] | None = None,
                 after: threading.Event | None = None):
        self.kube = kube
        self.name = name
        self.path = path
        self.handler = handler
        self.on_listed = on_listed or (lambda: None)
        self.on_error = on_error or (lambda kind: None)
        self.label_selector = label_selector
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self.resync_period = resync_period
        self.wanted = wanted        # raw watch events it rejects reach the handler as a
                                    # stub: type and resourceVersion only (Kube.watch)
        self.after = after          # the first LIST waits for this (another one's sync)
        self.known: dict[str, dict] = {}    # uid -> metadata of the objects the handler keeps
        self.synced = threading.Event()
        self.heartbeat = time.monotonic()
        self.lists = 0
        self.resource_version = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Reflector":
        self._thread = threading.Thread(target=self._run, name=f"reflector-{self.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _query(self) -> dict:
        return {"labelSelector": self.label_selector} if self.label_selector else {}

    def _handle(self, etype: str, obj: dict) -> str:
        """Hand ``obj`` over and remember it while the handler keeps it; its uid."""
        kept = self.handler(etype, obj)
        md = obj.get("metadata") or {}
        uid = md.get("uid", "")
        if uid and kept and etype != "DELETED":
            if uid not in self.known:       # a uid's name and namespace never change
                self.known[uid] = {k: md.get(k, "") for k in ("name", "namespace", "uid")}
        elif uid:
            self.known.pop(uid, None)
        return uid

    def _list(self) -> str:
        rv = ""
        listed = set()
        for items, rv in self.kube.list_pages(self.path, self._query(), self.page_size):
            for obj in items:
                listed.add(self._handle("ADDED", obj))
            self.heartbeat = time.monotonic()
            if self._stop.is_set():
                return rv
        for uid in set(self.known) - listed:   # deleted while nobody watched
            self._handle("DELETED", {"metadata": self.known[uid]})
        self.on_listed()
        self.lists += 1
        self.synced.set()
        log.info("listed", extra={"fields": {"informer": self.name, "resourceVersion": rv}})
        return rv

    def _run(self) -> None:
        while self.after is not None and not self.after.wait(1.0):
            if self._stop.is_set():
                return
        backoff = 0.2
        rv = ""
        listed_at = 0.0
        while not self._stop.is_set():
            try:
                if not rv or (self.resync_period and
                              time.monotonic() - listed_at > self.resync_period):
                    rv = self._list()
                    listed_at = time.monotonic()
                rv = self._watch(rv)
                backoff = 0.2
            except ApiError as e:
                if e.status == 410:
                    log.info("watch expired, re-listing",
                             extra={"fields": {"informer": self.name}})
                    self.on_error("watch_expired")
                    rv = ""
                    continue
                kind = "watch_disconnected" if e.status == 0 else f"watch_http_{e.status}"
                self.on_error(kind)
                log.warning("watch failed, resuming", extra={"fields": {
                    "informer": self.name, "error": str(e), "backoff": round(backoff, 2)}})
                if e.status not in (0, 429, 500, 502, 503, 504):
                    rv = ""  # unexpected answer: start over from a fresh LIST
                self._stop.wait(backoff * (1 + random.random()))
                backoff = min(backoff * 2, 30.0)
            except Exception as e:  # never let the watch thread die
                self.on_error("watch_internal")
                log.exception("informer error", extra={"fields": {"informer": self.name,
                                                                  "error": repr(e)}})
                rv = ""
                self._stop.wait(backoff * (1 + random.random()))
                backoff = min(backoff * 2, 30.0)

    def _watch(self, rv: str) -> str:
        """Watch from ``rv`` until the stream ends; returns the last resourceVersion."""
        timeout = int(self.watch_timeout * (1 + random.random() * 0.2))
        q = dict(self._query(), resourceVersion=rv)
        for ev in self.kube.watch(self.path, q, timeout, self.wanted):
            self.heartbeat = time.monotonic()
            if self._stop.is_set():
                break
            etype = ev.get("type")
            obj = ev.get("object") or {}
            if etype == "ERROR":
                code = obj.get("code")
                raise ApiError(code or 500, obj.get("reason") or "watch error", obj)
            new_rv = (obj.get("metadata") or {}).get("resourceVersion")
            if etype != "BOOKMARK":
                self._handle(etype, obj)
            if new_rv:
                rv = new_rv
            self.resource_version = rv
        self.heartbeat = time.monotonic()
        return rv
