"""The watcher's decisions.

State lives in the API, not here. For one build TaskRun (key: its uid) the
reconcile reads the TaskRun and its two PipelineRuns and does the one next
thing:

  active build, no finalizer  -> add finalizer (JSON patch guarded by resourceVersion)
  active build, finalizer     -> ensure mpc-provision-<uid> exists (AlreadyExists = done)
  finished/deleting, finalizer-> cancel provisioning still in flight (wait for it,
                                 bounded by --cancel-grace), ensure mpc-deprovision-<uid>,
                                 then remove the finalizer
  finished, no finalizer      -> not ours (any more): delete our successful runs
  TaskRun gone                -> same

A run is never garbage-collected while its build still holds the finalizer:
as long as the build is live, the existence of mpc-provision-<uid> is the
record that provisioning was started, so it is never started twice.

The in-memory map ``builds`` is a cache of where each live build is (for the
gauges and to skip no-op events); losing it loses nothing.
"""
from __future__ import annotations

import logging
import os
import threading
import time

from mpc.runner import contract as c
from mpc.runner import hostpool

from . import detect, kube as k, objects
from .config import Config
from .informer import Reflector
from .kube import ApiError, Kube
from .metrics import Metrics
from .workqueue import WorkQueue

log = logging.getLogger("mpc.glue")

RUNNING, SUCCEEDED, FAILED = "running", "succeeded", "failed"


class Build:
    """What the watcher remembers about one build (a few dozen bytes)."""

    __slots__ = ("namespace", "name", "platform", "first_seen", "phase", "active",
                 "provision", "reported")

    def __init__(self, namespace: str, name: str, platform: str | None, first_seen: float):
        self.namespace = namespace
        self.name = name
        self.platform = platform
        self.first_seen = first_seen
        self.phase: tuple | None = None   # (ours, finished, detected) from the last event
        self.active = False               # holds our finalizer and is not finished
        self.provision: str | None = None  # running | succeeded | failed
        self.reported: set[str] | None = None  # Event reasons already posted


class Pool:
    """The host pool as mpc.runner.hostpool reads it, like the provisioning run does:
    ConfigMap ``name``, else Konflux's host-config (read, briefly cached).

    ``get()`` gives (pool, []) or, for a missing or invalid pool, (None, errors):
    a pool that cannot be read as a whole never means "every namespace allowed".
    """

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


class Controller:
    def __init__(self, kube: Kube, cfg: Config):
        self.kube = kube
        self.cfg = cfg
        self.ns = cfg.namespace
        self.builds: dict[str, Build] = {}
        self.lock = threading.Lock()
        self.queue = WorkQueue()
        self.metrics = Metrics(self.snapshot, lambda: len(self.queue))
        self.pool = Pool(kube, self.ns, cfg.pool_configmap)
        self.counted: set[str] = set()  # finished PipelineRuns already counted
        self.started_wall = time.time()
        self._stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.reflectors: list[Reflector] = []

    # --- lifecycle ----------------------------------------------------------------
    def start(self) -> "Controller":
        ns_list = self.cfg.watch_namespaces or [None]
        for wns in ns_list:
            self.reflectors.append(Reflector(
                self.kube, f"taskruns{'/' + wns if wns else ''}", k.taskruns(wns),
                self.on_taskrun, on_list=self.on_list, page_size=self.cfg.page_size,
                watch_timeout=self.cfg.watch_timeout, resync_period=self.cfg.resync_period,
                on_error=self._count_error))
        self.reflectors.append(Reflector(
            self.kube, "pipelineruns", k.pipelineruns(self.ns), self.on_pipelinerun,
            label_selector=f"{c.LABEL_MANAGED}={c.MANAGED_VALUE}",
            page_size=self.cfg.page_size, watch_timeout=self.cfg.watch_timeout,
            resync_period=self.cfg.resync_period, on_error=self._count_error))
        for r in self.reflectors:
            r.start()
        for i in range(self.cfg.workers):
            self._thread(f"worker-{i}", self._worker)
        self._thread("gc", self._periodic, self.cfg.gc_interval, self.collect_garbage)
        if self.cfg.sweep_interval > 0:
            self._thread("sweep", self._periodic, self.cfg.sweep_interval, self.start_sweep)
        return self

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
        return (all(t.is_alive() for t in self.threads)
                and all(r.alive() and time.monotonic() - r.heartbeat < limit
                        for r in self.reflectors))

    def _count_error(self, kind: str) -> None:
        self.metrics.errors.labels(kind).inc()

    def _step(self, name: str) -> None:
        """Test hook: die right after a write, to prove restarts lose and duplicate nothing."""
        if self.cfg.crash_after == name:
            log.warning("crashing on purpose", extra={"fields": {"after": name}})
            os._exit(70)

    # --- event handlers (reflector threads; must be cheap) --------------------------------
    def on_list(self, phase: str, name: str) -> None:
        if phase == "end":
            # A full LIST (start-up, 410, resync): events may have been missed, so
            # look at every build we know once more.
            with self.lock:
                uids = list(self.builds)
            for uid in uids:
                self.queue.add(uid)

    def on_taskrun(self, etype: str, tr: dict) -> None:
        self.metrics.watch_events.labels("taskrun").inc()
        md = tr.get("metadata") or {}
        uid = md.get("uid")
        if not uid:
            return
        if etype == "DELETED":
            with self.lock:
                known = uid in self.builds
            if known:
                self.queue.add(uid)
            return
        ours = detect.has_finalizer(tr)
        finished = detect.is_done(tr) or detect.deleting(tr)
        if not ours and finished:
            return  # a finished build without our finalizer is left alone
        platform = detect.build_platform(tr)
        if platform is None and not ours:
            return  # not a build: the common case, nothing stored
        phase = (ours, finished, platform is not None)
        with self.lock:
            b = self.builds.get(uid)
            if b is None:
                b = self.builds[uid] = Build(md.get("namespace"), md.get("name"), platform,
                                             time.time())
            if platform:
                b.platform = platform
            if b.phase == phase:
                return
            b.phase = phase
        self.queue.add(uid)

    def on_pipelinerun(self, etype: str, pr: dict) -> None:
        self.metrics.watch_events.labels("pipelinerun").inc()
        md = pr.get("metadata") or {}
        labels = md.get("labels") or {}
        ann = md.get("annotations") or {}
        role, uid = labels.get(c.LABEL_ROLE), labels.get(c.LABEL_TASKRUN_UID)
        if role not in (objects.ROLE_PROVISION, objects.ROLE_DEPROVISION) or not uid:
            return
        run = md.get("name", "")
        if etype == "DELETED":
            with self.lock:
                self.counted.discard(run)
            return
        ok = detect.succeeded(pr)
        platform = ann.get(c.ANN_PLATFORM)
        if ok is not None:
            with self.lock:
                fresh = run not in self.counted
                self.counted.add(run)
                b = self.builds.get(uid)
                seen = b.first_seen if b else objects.parse_time(md.get("creationTimestamp"))
            done_at = objects.parse_time((pr.get("status") or {}).get("completionTime"))
            # Count each run once, and only if it finished while this process ran
            # (a restart re-lists old runs; counters restart from 0 anyway).
            if fresh and (done_at is None or done_at >= self.started_wall - 1):
                p = self.metrics.platform(platform)
                (self.metrics.runs_succeeded if ok else self.metrics.runs_failed).labels(
                    role, p).inc()
                if ok and role == objects.ROLE_PROVISION and seen:
                    self.metrics.provision_seconds.labels(p).observe(
                        max(0.0, (done_at or time.time()) - seen))
        state = RUNNING if ok is None else SUCCEEDED if ok else FAILED
        with self.lock:
            b = self.builds.get(uid)
            if b is None:
                ns = labels.get(c.LABEL_TASKRUN_NAMESPACE)
                name = ann.get(c.ANN_TASKRUN_NAME)
                if not ns or not name:
                    return
                b = self.builds[uid] = Build(ns, name, platform, time.time())
            elif role == objects.ROLE_PROVISION and b.provision == state:
                return
            if role == objects.ROLE_PROVISION:
                b.provision = state
        self.queue.add(uid)

    def snapshot(self) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        with self.lock:
            items = [(b.platform, b.provision) for b in self.builds.values() if b.active]
        for platform, prov in items:
            p = self.metrics.platform(platform)
            w, r = out.get(p, (0, 0))
            if prov == SUCCEEDED:
                r += 1
            elif prov != FAILED:  # a failed provisioning is neither waiting nor running
                w += 1
            out[p] = (w, r)
        return out

    # --- workers ------------------------------------------------------------------
    def _worker(self) -> None:
        while not self._stop.is_set():
            uid = self.queue.get(timeout=1.0)
            if uid is None:
                continue
            try:
                self.reconcile(uid)
                self.queue.forget(uid)
                self.metrics.reconciles.labels("ok").inc()
            except ApiError as e:
                kind = "conflict" if e.conflict else f"api_{e.status}"
                self.metrics.errors.labels(kind).inc()
                self.metrics.reconciles.labels("retry").inc()
                delay = self.queue.retry(uid)
                log.warning("reconcile failed, will retry", extra={"fields": {
                    "uid": uid, "error": str(e), "retryIn": round(delay, 2)}})
            except Exception as e:  # a bug must not stop the worker
                self.metrics.errors.labels("internal").inc()
                self.metrics.reconciles.labels("error").inc()
                delay = self.queue.retry(uid)
                log.exception("reconcile crashed, will retry", extra={"fields": {
                    "uid": uid, "error": repr(e), "retryIn": round(delay, 2)}})
            finally:
                self.queue.done(uid)

    def _periodic(self, interval: float, fn) -> None:
        while not self._stop.is_set():
            try:
                fn()
            except Exception as e:
                self.metrics.errors.labels(f"{fn.__name__}").inc()
                log.warning("periodic task failed", extra={"fields": {
                    "task": fn.__name__, "error": repr(e)}})
            self._stop.wait(interval)

    # --- the reconcile ---------------------------------------------------------------
    def _decision(self, msg: str, b: Build, uid: str, **fields) -> None:
        log.info(msg, extra={"fields": dict(namespace=b.namespace, name=b.name, uid=uid,
                                            platform=b.platform, **fields)})

    def _forget(self, uid: str) -> None:
        with self.lock:
            self.builds.pop(uid, None)

    def reconcile(self, uid: str) -> None:
        with self.lock:
            b = self.builds.get(uid)
        if b is None:
            return
        tr_path = k.taskruns(b.namespace, b.name)
        tr = self.kube.get(tr_path)
        for _ in range(10):
            if tr is not None and detect.meta(tr, "uid") != uid:
                tr = None  # same name, another TaskRun: ours is gone
            if tr is None or (not detect.has_finalizer(tr)
                              and (detect.is_done(tr) or detect.deleting(tr))):
                b.active = False
                self._collect_runs(uid, b)
                self._forget(uid)
                return
            ours = detect.has_finalizer(tr)
            platform = detect.build_platform(tr)
            if platform:
                b.platform = platform
            if detect.is_done(tr) or detect.deleting(tr) or (ours and platform is None):
                self._release(uid, b, tr, tr_path)
                return
            if platform is None:
                self._forget(uid)
                return
            if ours:
                self._ensure_provision(uid, b, platform)
                return
            try:
                tr = self.kube.json_patch(tr_path, objects.finalizer_add_patch(tr))
                self._decision("finalizer added", b, uid)
                self._step("finalizer-added")
            except ApiError as e:
                if not e.conflict:
                    raise
                self.metrics.errors.labels("conflict").inc()
                tr = self.kube.get(tr_path)  # re-read, decide again
        raise ApiError(409, "Conflict", {"message": "TaskRun kept changing; will retry"})

    def _event(self, b: Build, uid: str, reason: str, message: str, warning: bool) -> None:
        if b.reported is None:
            b.reported = set()
        if reason in b.reported:
            return
        try:
            self.kube.create(k.events(b.namespace), objects.event(
                b.namespace, b.name, uid, reason, message, warning, self.cfg.instance))
        except ApiError as e:
            # Events are best effort: never block a decision on them.
            self.metrics.errors.labels("event").inc()
            log.warning("could not post event", extra={"fields": {
                "namespace": b.namespace, "name": b.name, "reason": reason, "error": str(e)}})
            return
        b.reported.add(reason)

    def _ensure_provision(self, uid: str, b: Build, platform: str) -> None:
        run = c.provision_run_name(uid)
        with self.lock:
            known = b.provision  # only ever set from what the API said about this run
        if known == RUNNING:
            # Already seen in flight; the PipelineRun watch brings us back when it ends.
            b.active = True
            return
        pr = self.kube.get(k.pipelineruns(self.ns, run)) if known else None
        created = None
        pool, pool_errors = self._pool() if pr is None else (None, [])
        if pr is None:
            # Tekton's timeouts follow the pool's queue bound (plus the work), so Tekton never
            # cancels a run that may still be waiting, and its error-secret finally always runs
            max_wait = (pool or hostpool.Pool()).max_wait_seconds
            created = self.kube.create(k.pipelineruns(self.ns), objects.provision_run(
                self.ns, self.cfg.tasks_service_account, b.namespace, b.name, uid, platform,
                bundle=self.cfg.pipeline_bundle, max_wait_seconds=max_wait))
            self._step("provision-created")
            if created is None:  # it existed (restart): learn its state instead
                pr = self.kube.get(k.pipelineruns(self.ns, run))
        ok = None if pr is None or created is not None else detect.succeeded(pr)
        state = RUNNING if ok is None else SUCCEEDED if ok else FAILED
        if created is not None:
            self.metrics.runs_started.labels(objects.ROLE_PROVISION,
                                             self.metrics.platform(platform)).inc()
            self._decision("provisioning run created", b, uid, run=run)
        if ok is None:
            # Posted again (idempotent names) after a restart right after creation.
            if pr is not None:     # a restart found the run in flight: check the pool now
                pool, pool_errors = self._pool()
            self._event(b, uid, "ProvisioningStarted",
                        f"Started PipelineRun {self.ns}/{run} to provision a {platform} host",
                        warning=False)
            if (pool_errors or (pool is not None and not pool.namespace_allowed(b.namespace))) \
                    and "NamespaceNotAllowed" not in (b.reported or ()):
                self.metrics.not_allowed.labels(self.metrics.platform(platform)).inc()
                self._decision("namespace not allowed", b, uid, run=run,
                               **({"poolErrors": pool_errors} if pool_errors else {}))
                why = (f"Namespace {b.namespace} is not in allowedNamespaces of the host "
                       f"pool ({self.ns}/{self.cfg.pool_configmap})" if not pool_errors else
                       f"No namespace may use the host pool while it is invalid: "
                       f"{'; '.join(pool_errors)}")
                self._event(b, uid, "NamespaceNotAllowed",
                            f"{why}; the build gets an error secret instead of a host",
                            warning=True)
        else:
            if ok is True:
                self._event(b, uid, "Provisioned", f"PipelineRun {self.ns}/{run} succeeded",
                            warning=False)
            elif ok is False:
                reason = detect.condition_reason(pr) or "Failed"
                # its finally wrote the error secret, unless the run was cancelled or the
                # finally could not run: make sure the waiting build gets an answer
                if self.kube.create(k.pipelineruns(self.ns), objects.provision_failed_run(
                        self.ns, self.cfg.tasks_service_account, b.namespace, b.name, uid,
                        platform, run, reason, bundle=self.cfg.pipeline_bundle)) is not None:
                    self._decision("provisioning failed; error-secret run created", b, uid,
                                   run=c.provision_failed_run_name(uid), reason=reason)
                self._event(b, uid, "ProvisioningFailed",
                            f"PipelineRun {self.ns}/{run} failed ({reason}); see its logs in "
                            f"namespace {self.ns}", warning=True)
        with self.lock:
            # The PipelineRun watch may have reported a newer state while the Events
            # were posted (it re-queued the build then): never overwrite it.
            if b.provision == known:
                b.provision = state
            b.active = True

    def _pool(self) -> tuple[hostpool.Pool | None, list[str]]:
        try:
            pool, errors = self.pool.get()
        except ApiError as e:
            self.metrics.errors.labels("pool_read").inc()
            log.warning("cannot read the host pool; not checking namespaces here "
                        "(the provisioning run checks again)", extra={"fields": {"error": str(e)}})
            return None, []
        if errors:
            self.metrics.errors.labels("pool_invalid").inc()
            log.warning("host pool invalid: no namespace is allowed, builds get an error "
                        "secret", extra={"fields": {"errors": errors}})
        self.metrics.platform.set_known(pool.platforms if pool is not None else ())
        return pool, errors

    def _release(self, uid: str, b: Build, tr: dict, tr_path: str) -> None:
        b.active = False
        prov_path = k.pipelineruns(self.ns, c.provision_run_name(uid))
        pr = self.kube.get(prov_path)
        if pr is not None and not detect.is_done(pr):
            requested = objects.parse_time(
                (detect.meta(pr, "annotations") or {}).get(objects.ANN_CANCEL_REQUESTED))
            if (pr.get("spec") or {}).get("status") != "Cancelled" or requested is None:
                requested = time.time()
                self.kube.merge_patch(prov_path, {
                    "metadata": {"annotations": {objects.ANN_CANCEL_REQUESTED:
                                                 objects.now_rfc3339()}},
                    "spec": {"status": "Cancelled"}})
                self._decision("provisioning run cancelled", b, uid,
                               run=c.provision_run_name(uid))
                self._step("cancel-requested")
            left = requested + self.cfg.cancel_grace - time.time()
            if left > 0:
                # The PipelineRun watch brings us back when it stops; this is the bound.
                self.queue.add_after(uid, left + 0.5)
                return
            self._decision("provisioning run did not stop in time; deprovisioning anyway",
                           b, uid, run=c.provision_run_name(uid))
        run = c.deprovision_run_name(uid)
        created = self.kube.create(k.pipelineruns(self.ns), objects.deprovision_run(
            self.ns, self.cfg.tasks_service_account, b.namespace, b.name, uid, b.platform,
            bundle=self.cfg.pipeline_bundle))
        self._step("deprovision-created")
        if created is not None:
            self.metrics.runs_started.labels(objects.ROLE_DEPROVISION,
                                             self.metrics.platform(b.platform)).inc()
            self._decision("deprovisioning run created", b, uid, run=run)
        if not detect.deleting(tr):
            self._event(b, uid, "Deprovisioning",
                        f"Build finished; started PipelineRun {self.ns}/{run} to release its host",
                        warning=False)
        for _ in range(10):
            if tr is None or detect.meta(tr, "uid") != uid or not detect.has_finalizer(tr):
                break
            try:
                self.kube.json_patch(tr_path, objects.finalizer_remove_patch(tr))
                self._decision("finalizer removed", b, uid)
                self._step("finalizer-removed")
                break
            except ApiError as e:
                if e.status == 404:
                    break
                if not e.conflict:
                    raise
                self.metrics.errors.labels("conflict").inc()
                tr = self.kube.get(tr_path)
        else:
            raise ApiError(409, "Conflict", {"message": "TaskRun kept changing; will retry"})
        # Look again: successful runs of a released build are deleted at once.
        self.queue.add(uid)

    # --- garbage collection and sweep ---------------------------------------------------
    def _build_holds_us(self, labels: dict, ann: dict, uid: str) -> bool:
        ns, name = labels.get(c.LABEL_TASKRUN_NAMESPACE), ann.get(c.ANN_TASKRUN_NAME)
        if not ns or not name:
            return False
        tr = self.kube.get(k.taskruns(ns, name))
        return (tr is not None and detect.meta(tr, "uid") == uid
                and detect.has_finalizer(tr))

    def _delete_run(self, path: str, obj: dict, role: str, why: str) -> None:
        if self.kube.delete(path, uid=detect.meta(obj, "uid")):
            self.metrics.runs_deleted.labels(role).inc()
            log.info("run deleted", extra={"fields": {
                "run": detect.meta(obj, "name"), "role": role, "why": why}})

    def _collect_runs(self, uid: str, b: Build) -> None:
        """The build no longer holds us: delete its successful runs now."""
        for name in (c.provision_run_name(uid), c.provision_failed_run_name(uid),
                     c.deprovision_run_name(uid)):
            p = k.pipelineruns(self.ns, name)
            pr = self.kube.get(p)
            if pr is not None and detect.succeeded(pr) is True:
                self._delete_run(p, pr, (detect.meta(pr, "labels") or {}).get(c.LABEL_ROLE, "?"),
                                 "succeeded")

    def _expired(self, obj: dict, now: float) -> bool:
        done_at = objects.parse_time((obj.get("status") or {}).get("completionTime"))
        if done_at is None:
            for cond in (obj.get("status") or {}).get("conditions") or ():
                if cond.get("type") == "Succeeded":
                    done_at = objects.parse_time(cond.get("lastTransitionTime"))
        return done_at is None or now - done_at >= self.cfg.retention

    def collect_garbage(self) -> None:
        """Delete finished runs: successful at once, failed after --retention; never a
        provisioning/deprovisioning run whose build still holds our finalizer."""
        now = time.time()
        sel = {"labelSelector": f"{c.LABEL_MANAGED}={c.MANAGED_VALUE}"}
        for items, _ in self.kube.list_pages(k.pipelineruns(self.ns), sel, self.cfg.page_size):
            for pr in items:
                ok = detect.succeeded(pr)
                if ok is None:
                    continue
                labels = detect.meta(pr, "labels") or {}
                role = labels.get(c.LABEL_ROLE, "?")
                uid = labels.get(c.LABEL_TASKRUN_UID, "")
                if not ok and not self._expired(pr, now):
                    continue
                if self._build_holds_us(labels, detect.meta(pr, "annotations") or {}, uid):
                    continue
                self._delete_run(k.pipelineruns(self.ns, detect.meta(pr, "name")), pr, role,
                                 "succeeded" if ok else "retention expired")
        sel = {"labelSelector": f"{c.LABEL_MANAGED}={c.MANAGED_VALUE},"
                                f"{c.LABEL_ROLE}={objects.ROLE_SWEEP}"}
        for items, _ in self.kube.list_pages(k.taskruns(self.ns), sel, self.cfg.page_size):
            for tr in items:
                ok = detect.succeeded(tr)
                if ok is None or (not ok and not self._expired(tr, now)):
                    continue
                self._delete_run(k.taskruns(self.ns, detect.meta(tr, "name")), tr,
                                 objects.ROLE_SWEEP, "succeeded" if ok else "retention expired")

    def start_sweep(self) -> None:
        bucket = int(time.time() // self.cfg.sweep_interval)
        if self.kube.create(k.taskruns(self.ns), objects.sweep_run(
                self.ns, self.cfg.tasks_service_account, bucket, bundle=self.cfg.sweep_bundle)) is not None:
            self.metrics.sweeps.inc()
            log.info("sweep started", extra={"fields": {"run": objects.sweep_run_name(bucket)}})
