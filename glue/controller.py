"""The watcher's wiring: watches fill the cache and queue builds; workers reconcile them.

* Watches (``informer.Reflector``): TaskRuns and, for the look-ahead
  (predict.py), other PipelineRuns (every namespace, or the --watch-namespace
  list), mpc's PipelineRuns and sweep TaskRuns, the slot
  Leases and the dynamic hosts' Leases, all in the controller namespace. Handlers are cheap: they
  update ``store`` and queue the build a change concerns.
* Workers take build uids from the queue and run ``Reconciler.reconcile``
  (reconcile.py) one build at a time; a ``("run", name)`` key deletes a
  finished run of a released build. Nothing is reconciled before every watch
  has listed once, so no decision is made on a partial cache.
* Periodic: garbage collection of finished runs and the sweep (gc.py).

State lives in the API; the cache is rebuilt by the first LIST after a restart,
so losing this process loses nothing.
"""
from __future__ import annotations

import logging
import threading
import time

from mpc.runner import contract as c
from mpc.runner import kube as k
from mpc.runner.kube import ApiError, Kube

from . import detect, gc, objects, predict
from .config import Config
from .informer import Reflector
from .metrics import Metrics
from .poolreader import PoolReader
from .reconcile import Reconciler
from .store import Store
from .workqueue import WorkQueue

log = logging.getLogger("mpc.glue")
MANAGED = f"{c.LABEL_MANAGED}={c.MANAGED_VALUE}"


class Controller:
    def __init__(self, kube: Kube, cfg: Config):
        self.kube = kube
        self.cfg = cfg
        self.ns = cfg.namespace
        self.store = Store(objects.ANN_CANCEL_REQUESTED)
        self.queue = WorkQueue()
        self.pool = PoolReader(kube, self.ns, cfg.pool_configmap)
        self.metrics = Metrics(self.store, self.pool, lambda: len(self.queue))
        self.reconciler = Reconciler(kube, cfg, self.store, self.pool, self.metrics, self.queue)
        self.stale: set = set()         # builds whose last write met a newer version (409):
                                        # the watch event that brings it reconciles them
        self._stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.reflectors: list[Reflector] = []

    # --- lifecycle ----------------------------------------------------------------
    def _on_listed(self) -> None:
        """After a full LIST (the reflector has handed over what it no longer shows as
        deleted): events may have been missed, so every build is looked at once more."""
        with self.store.lock:
            uids = list(self.store.builds)
        for uid in uids:
            self.queue.add(uid)

    def _reflect(self, name: str, path: str, handler, selector: str | None = None,
                 wanted=None, after=None) -> Reflector:
        self.reflectors.append(Reflector(
            self.kube, name, path, handler, on_listed=self._on_listed, label_selector=selector,
            page_size=self.cfg.page_size, watch_timeout=self.cfg.watch_timeout,
            resync_period=self.cfg.resync_period, on_error=self._count_error, wanted=wanted,
            after=after))
        return self.reflectors[-1]

    def start(self) -> "Controller":
        runs = self._reflect("pipelineruns", k.pipelineruns(self.ns), self.on_run,
                             selector=MANAGED)
        # Builds are listed after mpc's runs: a TaskRun that came while no watcher ran is
        # found as the build predicted for it by its runs (Store.key_for) at once.
        for wns in self.cfg.watch_namespaces or [None]:
            self._reflect(f"taskruns{'/' + wns if wns else ''}", k.taskruns(wns),
                          self.on_taskrun, wanted=self._wanted_taskrun, after=runs.synced)
            # look-ahead (predict.py): the PipelineRuns that will create builds
            self._reflect(f"pipelineruns-ahead{'/' + wns if wns else ''}", k.pipelineruns(wns),
                          self.on_pipelinerun, wanted=predict.may_predict,
                          selector=f"{c.LABEL_MANAGED}!={c.MANAGED_VALUE}", after=runs.synced)
        self._reflect("sweeps", k.taskruns(self.ns), self.on_run,
                      selector=f"{MANAGED},{c.LABEL_ROLE}={objects.ROLE_SWEEP}")
        leases = k.path("coordination.k8s.io", "v1", "leases", self.ns)
        self._reflect("slots", leases, self.on_slot, selector=f"{MANAGED},{c.LABEL_ROLE}=slot")
        self._reflect("vms", leases, self.on_vm_lease, selector=(
            f"{MANAGED},{c.LABEL_ROLE} in ({c.ROLE_VM},{c.ROLE_VM_BUILD},{c.ROLE_VM_STATS},waiter)"))
        for r in self.reflectors:
            r.start()
        self._thread("start", self._start_workers)
        return self

    def _start_workers(self) -> None:
        for r in self.reflectors:           # decide on a whole cache, never on part of one
            while not r.synced.wait(1.0):
                if self._stop.is_set():
                    return
        for i in range(self.cfg.workers):
            self._thread(f"worker-{i}", self._worker)
        self._thread("gc", self._periodic, self.cfg.gc_interval, lambda: gc.collect_garbage(
            self.store, self.reconciler, self.cfg.retention), "collect_garbage")
        if self.cfg.sweep_interval > 0:
            self._thread("sweep", self._periodic, self.cfg.sweep_interval, lambda: gc.start_sweep(
                self.kube, self.cfg, self.metrics, self.store), "start_sweep")

    def stop(self) -> None:
        self._stop.set()
        self.queue.close()
        for r in self.reflectors:
            r.stop()

    def _thread(self, name, target, *args) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def ready(self) -> bool:
        return all(r.synced.is_set() for r in self.reflectors)

    def healthy(self) -> bool:
        limit = self.cfg.watch_timeout * 1.2 + 120
        return (all(t.is_alive() for t in self.threads if t.name != "start")
                and all(r.alive() and time.monotonic() - r.heartbeat < limit
                        for r in self.reflectors))

    def _count_error(self, kind: str) -> None:
        self.metrics.errors.labels(kind).inc()

    # --- event handlers (reflector threads; must be cheap; True: something of the object
    # is kept, so the reflector reports it deleted if a later LIST no longer shows it) ------
    def _wanted_taskrun(self, raw: bytes) -> bool:
        """Decode a TaskRun event if it may be a build, or a child of a PipelineRun with a
        build predicted and not seen yet (it may turn out not to be a build)."""
        if detect.may_be_build(raw):
            return True
        owner = predict.pipelinerun_of(raw)
        return owner is not None and self.store.has_unborn(owner)

    def on_taskrun(self, etype: str, tr: dict) -> bool:
        self.metrics.watch_events.labels("taskrun").inc()
        uid = detect.meta(tr, "uid")
        if not uid:
            return False
        if etype == "DELETED":
            b = self.store.mark_gone(uid)
            if b is not None:
                self.queue.add(b.uid)
            return False
        ours = detect.has_finalizer(tr)
        platform = detect.build_platform(tr)
        key = self.store.key_for(tr, platform)
        if key == uid and platform is not None:
            # predicted for another platform than it asks for: a build of its own, and the
            # host taken for the prediction goes back
            stale = self.store.prediction_for(tr)
            if stale is not None and self.store.never(stale.uid) is not None:
                self.reconciler.log_prediction(stale, f"asks for {platform}")
                self.queue.add(stale.uid)
        known = self.store.build(key)
        if platform is None and not ours and key != uid:
            # the TaskRun a build was predicted for: once Tekton resolved its Task, it
            # shows whether it is one; if not, the host taken for it goes back (cached
            # below if only its runs knew the prediction, after a restart)
            if not detect.resolved(tr):
                return False
            if known is not None and known.unborn:
                if self.store.never(key) is not None:
                    self.reconciler.log_prediction(known, "not a build")
                    self.queue.add(key)
                return False
        if not ours and known is None and (detect.is_done(tr) or detect.deleting(tr)) \
                and key == uid:
            return False    # a finished build without our finalizer is left alone
        if platform is None and not ours and known is None and key == uid:
            return False    # not a build: the common case, nothing stored
        before = known.view() if known is not None else None
        if self.store.put_taskrun(tr, platform, time.time()).view() != before:
            self.queue.add(key)     # else nothing a decision reads changed: Tekton's status
                                    # updates, the echo of our own write stored from its answer
        elif key in self.stale:     # a write of ours conflicted: try again with this version
            self.stale.discard(key)  # now, not only after the backoff (a TaskRun written
            self.queue.add(key)      # all the time would outrun every backed-off retry)
        return True

    def on_pipelinerun(self, etype: str, pr: dict) -> bool:
        """A PipelineRun outside mpc's own: predict the builds it will create (the pool's
        ``lookAhead``), and give back what was taken for those it will not create."""
        self.metrics.watch_events.labels("pipelinerun-ahead").inc()
        uid = detect.meta(pr, "uid")
        if not uid:
            return False
        for b in self.store.predicted_by(uid):
            why = predict.never_created(None if etype == "DELETED" else pr, b.name,
                                        b.pipeline_task)
            if b.unborn and why is not None and self.store.never(b.uid) is not None:
                self.reconciler.log_prediction(b, why)
                self.queue.add(b.uid)
        if etype != "DELETED":
            self._predict(pr, uid)
        return bool(self.store.predicted_by(uid))

    def _predict(self, pr: dict, uid: str) -> None:
        try:
            pool, _ = self.pool.get()
        except ApiError:
            return          # no prediction now: the build is provisioned when it appears
        if pool is None or not pool.namespace_allowed(detect.meta(pr, "namespace", "")):
            return          # a namespace the pool refuses gets its answer when the build comes
        remote = set(pool.platforms) - set(pool.local_platforms)
        for child in predict.children(pr, remote):
            # a prediction made before (its runs say so) is kept, even with lookAhead off now
            if not pool.look_ahead and not self.store.has_runs(
                    c.predicted_uid(uid, child.name)):
                continue
            b = self.store.put_prediction(pr, child, time.time())
            if b is not None:
                self.metrics.predictions.labels(self.metrics.platform(b.platform)).inc()
                self.reconciler.log_prediction(b, None)
                self.queue.add(b.uid)

    def on_run(self, etype: str, obj: dict) -> bool:
        self.metrics.watch_events.labels("pipelinerun").inc()
        name = detect.meta(obj, "name", "")
        if etype == "DELETED":
            self.store.drop_run(name, detect.meta(obj, "uid"))
            self.metrics.forget_run(name)
            return False
        old = self.store.run(name)
        run = self.store.put_run(obj)
        if run is None or not run.build_uid or run.same_state(old):
            return True     # nothing a decision reads changed (the echo of our own write too)
        if run.succeeded is not None:
            self.metrics.run_finished(run, obj)
            if run.role == objects.ROLE_PROVISION:
                self.reconciler.wake(run.platform)   # a slot may be free (or never taken)
        if self.store.build(run.build_uid) is not None:
            self.queue.add(run.build_uid)
        elif run.succeeded is True:
            self.queue.add(("run", name))         # a released build's run: delete it
        return True

    def on_slot(self, etype: str, lease: dict) -> bool:
        self.metrics.watch_events.labels("lease").inc()
        if etype != "DELETED":
            self.store.put_slot(lease)
        elif self.store.drop_slot(detect.meta(lease, "name", ""),
                                  detect.meta(lease, "uid")) is not None:
            self.reconciler.wake(None)             # a slot is free: the oldest waiters look
        return True

    def on_vm_lease(self, etype: str, lease: dict) -> bool:
        self.metrics.watch_events.labels("lease").inc()
        if etype == "DELETED":
            self.store.drop_vm_lease(detect.meta(lease, "name", ""), detect.meta(lease, "uid"))
        else:
            self.store.put_vm_lease(lease)
        return True

    # --- workers ------------------------------------------------------------------
    def _worker(self) -> None:
        while not self._stop.is_set():
            key = self.queue.get(timeout=1.0)
            if key is None:
                continue
            try:
                if isinstance(key, tuple):
                    self.reconciler.collect_run(key[1])
                else:
                    self.reconciler.reconcile(key)
                self.queue.forget(key)
                self.stale.discard(key)
                self.metrics.reconciles.labels("ok").inc()
            except ApiError as e:
                kind = "conflict" if e.conflict else f"api_{e.status}"
                if e.conflict:
                    self.stale.add(key)
                self.metrics.errors.labels(kind).inc()
                self.metrics.reconciles.labels("retry").inc()
                delay = self.queue.retry(key)
                log.warning("reconcile failed, will retry", extra={"fields": {
                    "key": str(key), "error": str(e), "retryIn": round(delay, 2)}})
            except Exception as e:  # a bug must not stop the worker
                self.metrics.errors.labels("internal").inc()
                self.metrics.reconciles.labels("error").inc()
                delay = self.queue.retry(key)
                log.exception("reconcile crashed, will retry", extra={"fields": {
                    "key": str(key), "error": repr(e), "retryIn": round(delay, 2)}})
            finally:
                self.queue.done(key)

    def _periodic(self, interval: float, fn, name: str) -> None:
        while not self._stop.is_set():
            try:
                fn()
            except Exception as e:
                self.metrics.errors.labels(name).inc()
                log.warning("periodic task failed", extra={"fields": {
                    "task": name, "error": repr(e)}})
            self._stop.wait(interval)
