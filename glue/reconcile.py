"""The reconcile of one build: state from the watch cache in, the one next write out.

For one build TaskRun (key: its uid), from ``store``:

  active build, no finalizer     -> add the finalizer (JSON patch guarded by resourceVersion)
  active build, finalizer        -> once ``admission`` admits it, ensure mpc-provision-<uid>
                                    (AlreadyExists = done); while its platform is full, wait in
                                    memory; past maxWaitSeconds start mpc-provision-failed
  provisioning run failed        -> start mpc-provision-failed (its error secret, unless one exists)
  a run of ours unresolved       -> (Tekton could not fetch its Pipeline or Tasks, it started
                                    nothing) delete it and make it again after a pause,
                                    at most RESOLVE_ATTEMPTS times in all
  finished/deleting, finalizer   -> cancel provisioning still in flight (wait for it, bounded
                                    by --cancel-grace), ensure mpc-deprovision-<uid>, then
                                    remove the finalizer
  finished or gone, no finalizer -> not ours (any more): delete our successful runs, forget it

A run is never deleted while its build still holds the finalizer: as long as the
build is live, mpc-provision-<uid> existing is the record that provisioning was
started, so it is never started twice. A write that conflicts with a newer
version raises (the worker retries with backoff; the watch brings that version).
"""
from __future__ import annotations

import logging
import os
import time

from mpc.runner import contract as c
from mpc.runner import hostpool
from mpc.runner import kube as k
from mpc.runner.kube import ApiError, Kube

from . import admission, objects
from .config import Config
from .metrics import Metrics
from .poolreader import PoolReader
from .store import Build, Run, Store
from .workqueue import WorkQueue

log = logging.getLogger("mpc.glue")

RECHECK_SECONDS = 30.0     # a waiting build looks again at least this often (pool edits)
RESOLVE_ATTEMPTS = 4       # an unresolved run is made at most this often (per process), after
                           # pauses of 1, 3 and 9 x --unresolved-pause (5 s: 65 s in all,
                           # outlasting an API server restart or a short registry outage)


class Reconciler:
    def __init__(self, kube: Kube, cfg: Config, store: Store, pool: PoolReader,
                 metrics: Metrics, queue: WorkQueue):
        self.kube, self.cfg, self.store, self.pool = kube, cfg, store, pool
        self.metrics, self.queue = metrics, queue
        self.ns = cfg.namespace
        self.parked: set[str] = set()      # builds told to wait (admission.WAIT), by uid

    def _step(self, name: str) -> None:
        """Test hook: die right after a write, to prove restarts lose and duplicate nothing."""
        if self.cfg.crash_after == name:
            log.warning("crashing on purpose", extra={"fields": {"after": name}})
            os._exit(70)

    def _decision(self, msg: str, b: Build, **fields) -> None:
        log.info(msg, extra={"fields": dict(namespace=b.namespace, name=b.name, uid=b.uid,
                                            platform=b.platform, **fields)})

    def _event(self, b: Build, reason: str, message: str, warning: bool) -> None:
        if reason in b.reported:
            return
        # a build whose TaskRun does not exist yet: on the PipelineRun that will create it
        on = ((b.owner, b.owner_uid, f"{b.name}: {message}", "PipelineRun") if b.unborn
              else (b.name, b.uid, message, "TaskRun"))
        try:
            self.kube.create(k.events(b.namespace), objects.event(
                b.namespace, on[0], on[1], reason, on[2], warning, self.cfg.instance,
                kind=on[3], key=b.uid))
        except ApiError as e:
            # Events are best effort: never block a decision on them.
            self.metrics.errors.labels("event").inc()
            log.warning("could not post event", extra={"fields": {
                "namespace": b.namespace, "name": b.name, "reason": reason, "error": str(e)}})
            return
        b.reported.add(reason)

    def _create_run(self, body: dict) -> Run | None:
        """Create one of our runs; the created run (None if it existed) goes into the cache."""
        created = self.kube.create(k.pipelineruns(self.ns), body)
        return self.store.put_run(created) if created is not None else None

    # --- the reconcile ---------------------------------------------------------------
    def reconcile(self, uid: str) -> None:
        b = self.store.build(uid)
        if b is None:
            return
        if (b.gone and not b.held) or (not b.ours and b.finished):
            self.collect_runs(uid)
            self.store.forget(uid)
            return
        if b.finished or (b.ours and b.platform is None):
            self._release(b)
        elif b.platform is None:
            self.store.forget(uid)
        elif b.unborn or c.FINALIZER in b.finalizers:
            self._provision(b)
        else:
            tr = self.kube.json_patch(k.taskruns(b.namespace, b.name),
                                      objects.finalizer_add_patch(b.patch_target()))
            self.store.put_taskrun(tr, b.platform, time.time())
            self._decision("finalizer added", b)
            self._step("finalizer-added")
            self._provision(b)      # the next write right away, not behind every other build

    def _provision(self, b: Build) -> None:
        run = self.store.run(b.provision_run)
        failed = self.store.run(b.failed_run)
        if failed is not None and self._remade(b, failed):
            return
        if run is None:
            if failed is None:
                self._admit(b)          # else it waited too long and has its answer
        elif run.succeeded is True:
            self._event(b, "Provisioned", f"PipelineRun {self.ns}/{run.name} succeeded",
                        warning=False)
        elif run.succeeded is False and not self._remade(b, run):
            reason = run.reason or "Failed"
            # its finally wrote the error secret, unless the run was cancelled or the
            # finally could not run: make sure the waiting build gets an answer
            if failed is None and self._answer(b, run.name, reason):
                self._decision("provisioning failed; error-secret run created", b,
                               run=b.failed_run, reason=reason)
            self._event(b, "ProvisioningFailed", f"PipelineRun {self.ns}/{run.name} failed "
                        f"({reason}); see its logs in namespace {self.ns}", warning=True)

    def _remade(self, b: Build, run: Run) -> bool:
        """Tekton could not resolve ``run`` (a bundle registry or the API server did not
        answer for a moment) and it started nothing: delete it, to be made again after a
        pause (``_attempt``), instead of failing the build. True if so."""
        if not run.unresolved or run.attempt >= RESOLVE_ATTEMPTS:
            return False
        pause = self.cfg.unresolved_pause * 3 ** (run.attempt - 1)
        self.kube.delete(k.pipelineruns(self.ns, run.name), uid=run.uid)
        self.store.drop_run(run.name, run.uid)
        b.remake[run.name] = (run.attempt + 1, time.time() + pause)
        self.metrics.runs_remade.labels(run.role, self.metrics.platform(b.platform)).inc()
        self._decision("run unresolved by Tekton; making it again after a pause", b,
                       run=run.name, reason=run.reason, attempt=run.attempt + 1, pause=pause)
        self._event(b, "RunUnresolved", f"Tekton could not resolve PipelineRun "
                    f"{self.ns}/{run.name} ({run.reason}); mpc makes it again in "
                    f"{pause:.0f} s (attempt {run.attempt + 1} of {RESOLVE_ATTEMPTS})",
                    warning=True)
        self.queue.add_after(b.uid, pause + 0.1)
        return True

    def _answer(self, b: Build, failed_run: str, status: str) -> bool:
        """Start the run that gives the waiting build its error secret (``status``: why,
        ``failed_run``: the provisioning run that failed, if any); True if started now."""
        attempt = self._attempt(b, b.failed_run)
        return bool(attempt and self._create_run(objects.provision_failed_run(
            self.ns, self.cfg.tasks_service_account, b.namespace, b.name, b.uid, b.platform,
            failed_run, status, bundle=self.cfg.pipeline_bundle, attempt=attempt,
            owner=self._owner(b))))

    def _attempt(self, b: Build, name: str) -> int | None:
        """The attempt number to make run ``name`` with now, or None while the pause after
        its unresolved predecessor lasts (the queue brings the build back then)."""
        attempt, not_before = b.remake.get(name, (1, 0.0))
        left = not_before - time.time()
        if left > 0:
            self.queue.add_after(b.uid, left + 0.1)
            return None
        return attempt

    def _admit(self, b: Build) -> None:
        pool, pool_errors = self._pool()
        d = admission.decide(pool, self.store, b.uid, time.time())
        p = self.metrics.platform(b.platform)
        with self.store.lock:
            (self.parked.add if d.verdict == admission.WAIT else self.parked.discard)(b.uid)
        if d.verdict == admission.WAIT:
            if b.queue_position != d.position:      # every status update of a pending
                b.queue_position = d.position       # build comes here: log news only
                self._decision("platform full; build waits", b, position=d.position,
                               waiting=d.waiting)
            self._event(b, "Queued", f"Waiting for a free {b.platform} host: {d.position} "
                        f"build(s) ahead, {d.free} slot(s) free", warning=False)
            self.queue.add_after(b.uid, min(RECHECK_SECONDS, d.timeout_in + 0.5))
            return
        if d.verdict == admission.TIMED_OUT:
            if self._answer(b, "", c.PROVISION_STATUS_QUEUE_TIMEOUT):
                self.metrics.queue_timeouts.labels(p).inc()
                self._decision("waited past maxWaitSeconds; error-secret run created", b)
            self._event(b, "QueueTimeout", f"No {b.platform} host became free within the host "
                        f"pool's maxWaitSeconds ({pool.max_wait_seconds}s)", warning=True)
            return
        # Tekton's timeouts follow the pool's queue bound (plus the work), so Tekton never
        # cancels a run that may still be waiting, and its error-secret finally always runs
        max_wait = (pool or hostpool.Pool()).max_wait_seconds
        run = b.provision_run
        attempt = self._attempt(b, run)
        if attempt is None:
            return
        created = self._create_run(objects.provision_run(
            self.ns, self.cfg.tasks_service_account, b.namespace, b.name, b.uid, b.platform,
            bundle=self.cfg.pipeline_bundle, max_wait_seconds=max_wait, attempt=attempt,
            owner=self._owner(b)))
        self._step("provision-created")
        if created is not None:
            self.metrics.runs_started.labels(objects.ROLE_PROVISION, p).inc()
            self._decision("provisioning run created", b, run=run)
        self._event(b, "ProvisioningStarted",
                    f"Started PipelineRun {self.ns}/{run} to provision a {b.platform} host",
                    warning=False)
        if pool_errors or (pool is not None and not pool.namespace_allowed(b.namespace)):
            if "NamespaceNotAllowed" not in b.reported:
                self.metrics.not_allowed.labels(p).inc()
                self._decision("namespace not allowed", b, run=run,
                               **({"poolErrors": pool_errors} if pool_errors else {}))
            why = (f"Namespace {b.namespace} is not in allowedNamespaces of the host "
                   f"pool ({self.ns}/{self.cfg.pool_configmap})" if not pool_errors else
                   f"No namespace may use the host pool while it is invalid: "
                   f"{'; '.join(pool_errors)}")
            self._event(b, "NamespaceNotAllowed",
                        f"{why}; the build gets an error secret instead of a host", warning=True)
        self.wake(b.platform)       # room for more? the next waiting build looks now

    @staticmethod
    def _owner(b: Build) -> str:
        """The PipelineRun the Tasks check a predicted build's life by ("" for others)."""
        return b.owner if b.predicted else ""

    def log_prediction(self, b: Build, never: str | None) -> None:
        """A build predicted from its PipelineRun, or (``never``: why) one it will not create."""
        if never is None:
            self._decision("build predicted", b, pipelineRun=b.owner, pipelineTask=b.pipeline_task)
        else:
            self.metrics.predictions_unused.labels(self.metrics.platform(b.platform)).inc()
            self._decision("predicted build will not come", b, pipelineRun=b.owner, why=never)

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

    def wake(self, platform: str | None) -> None:
        """Queue the oldest build of ``platform`` (every platform if None) that was told to
        wait. Only those are looked at: in a burst with room for all, this costs nothing."""
        oldest: dict[str, tuple] = {}
        with self.store.lock:
            for uid in list(self.parked):
                o = self.store.builds.get(uid)
                if o is None or not self.store.admission.waiting(uid):
                    self.parked.discard(uid)
                elif o.platform and (platform is None or o.platform == platform):
                    key = (o.created, o.uid)
                    if o.platform not in oldest or key < oldest[o.platform]:
                        oldest[o.platform] = key
        for _, uid in oldest.values():
            self.queue.add(uid)

    def _release(self, b: Build) -> None:
        prov = self.store.run(b.provision_run)
        if prov is not None and prov.succeeded is None:
            requested = objects.parse_time(prov.cancel_requested)
            if not prov.cancelled or requested is None:
                requested = time.time()
                self.store.put_run(self.kube.merge_patch(
                    k.pipelineruns(self.ns, prov.name),
                    {"metadata": {"annotations": {objects.ANN_CANCEL_REQUESTED:
                                                  objects.now_rfc3339()}},
                     "spec": {"status": "Cancelled"}}))
                self._decision("provisioning run cancelled", b, run=prov.name)
                self._step("cancel-requested")
            left = requested + self.cfg.cancel_grace - time.time()
            if left > 0:
                # The PipelineRun watch brings us back when it stops; this is the bound.
                self.queue.add_after(b.uid, left + 0.5)
                return
            self._decision("provisioning run did not stop in time; deprovisioning anyway",
                           b, run=prov.name)
        run = c.deprovision_run_name(b.uid)
        if self.store.run(run) is None:
            created = self._create_run(objects.deprovision_run(
                self.ns, self.cfg.tasks_service_account, b.namespace, b.name, b.uid,
                b.platform, bundle=self.cfg.pipeline_bundle))
            self._step("deprovision-created")
            if created is not None:
                self.metrics.runs_started.labels(objects.ROLE_DEPROVISION,
                                                 self.metrics.platform(b.platform)).inc()
                self._decision("deprovisioning run created", b, run=run)
            if not b.deleting:
                why = ("The PipelineRun will not create this build" if b.unborn else
                       "Not a build after all" if b.platform is None else "Build finished")
                self._event(b, "Deprovisioning", f"{why}; started PipelineRun {self.ns}/{run} "
                            "to release its host", warning=False)
        if b.held:
            self.store.release_hold(b.uid)
            self._decision("predicted build released", b, unborn=b.unborn)
        if c.FINALIZER in b.finalizers:
            try:
                tr = self.kube.json_patch(k.taskruns(b.namespace, b.name),
                                          objects.finalizer_remove_patch(b.patch_target()))
            except ApiError as e:
                if not k.object_missing(e):
                    raise
                self.store.mark_gone(b.uid)
            else:
                self.store.put_taskrun(tr, b.platform, time.time())
            self._decision("finalizer removed", b)
            self._step("finalizer-removed")
        self.queue.add(b.uid)       # look again: a released build's successful runs go now

    # --- deleting our runs ----------------------------------------------------------------
    def holds_us(self, build_uid: str) -> bool:
        b = self.store.build(build_uid)
        return b is not None and b.ours and not b.gone

    def delete_run(self, run: Run, why: str) -> None:
        plural = "taskruns" if run.role == objects.ROLE_SWEEP else "pipelineruns"
        if self.kube.delete(k.path("tekton.dev", "v1", plural, self.ns, run.name), uid=run.uid):
            self.metrics.runs_deleted.labels(run.role).inc()
            log.info("run deleted", extra={"fields": {"run": run.name, "role": run.role,
                                                      "why": why}})
        self.store.drop_run(run.name, run.uid)

    def collect_runs(self, uid: str) -> None:
        """The build no longer holds us: delete its successful runs now."""
        for name in (c.provision_run_name(uid), c.provision_failed_run_name(uid),
                     c.deprovision_run_name(uid)):
            run = self.store.run(name)
            if run is not None and run.succeeded is True:
                self.delete_run(run, "succeeded")

    def collect_run(self, name: str) -> None:
        """A run of a build that no longer holds us finished: delete it if it succeeded."""
        run = self.store.run(name)
        if run is not None and run.succeeded is True and not self.holds_us(run.build_uid):
            self.delete_run(run, "succeeded")
