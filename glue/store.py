"""The watcher's cache: what its watches said, trimmed to what a decision needs.

Reconcile reads state from here, never from the API (controller-runtime's
discipline): a build costs the writes it must make, not a read per event.
Three kinds of objects are kept, each as a small view of the object:

* ``Build``: a build TaskRun (one that asks for a platform, or holds our
  finalizer), keyed by uid; or one a running PipelineRun will create
  (``predict.py``), keyed by ``contract.predicted_uid`` before and after its
  TaskRun exists. TaskRuns that are not builds are not kept.
* ``Run``: one of mpc's PipelineRuns in the controller namespace, by name.
* ``SlotLease``: a host slot Lease the provisioning Tasks took, by name (the
  watcher admits builds only while their platform has free slots).
* the dynamic hosts' Leases (VM records, places, stats, waiters) as they are:
  the metrics of cloud VMs are computed from them (``mpc.runner.vms.summary``).

Write responses are stored like watch events, and a view never goes back to an
older resourceVersion, so a decision made right after our own write sees it.

Every change to a build, a run or a slot re-classifies the one build it concerns
in the queue admission's index (``admission.Index``: waiting, in flight).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace

from mpc.runner import contract as c

from . import admission, detect, objects


def _rv(obj: dict) -> int:
    try:
        return int(detect.meta(obj, "resourceVersion") or 0)
    except ValueError:      # opaque versions: trust arrival order
        return 0


def _attempt(value: str | None) -> int:
    try:
        return max(1, int(value or 1))
    except ValueError:
        return 1


@dataclass
class Build:
    """What the watcher keeps of one build TaskRun (a few hundred bytes)."""

    namespace: str
    name: str
    uid: str
    platform: str | None = None
    created: str = ""                    # creationTimestamp: the API server's clock, for FIFO
    resource_version: str = ""
    finalizers: tuple = ()
    deleting: bool = False
    done: bool = False
    gone: bool = False                   # deleted (or replaced by a namesake)
    first_seen: float = 0.0
    reported: set = field(default_factory=set)   # Event reasons already posted
    queue_position: int | None = None    # last position logged while it waited
    provision_run: str = ""              # names of its runs, computed once
    failed_run: str = ""
    remake: dict = field(default_factory=dict)   # run name -> (attempt, not before): an
                                                 # unresolved run deleted, to be made again
    # look-ahead (predict.py): a build provisioned before its TaskRun existed is keyed by
    # contract.predicted_uid(owner_uid, name), not by the TaskRun's own uid
    owner: str = ""                      # the PipelineRun that makes (made) the TaskRun
    owner_uid: str = ""
    pipeline_task: str = ""
    unborn: bool = False                 # predicted, its TaskRun not seen yet
    taskrun_uid: str = ""                # a predicted build's TaskRun, once seen
    held: bool = False                   # predicted and not released yet: ours even
                                         # without a finalizer (it may never get one)

    def __post_init__(self) -> None:
        self.provision_run = c.provision_run_name(self.uid)
        self.failed_run = c.provision_failed_run_name(self.uid)

    def view(self) -> tuple:
        """What a decision reads of the TaskRun (its resourceVersion aside)."""
        return (self.platform, self.created, self.finalizers, self.deleting, self.done,
                self.gone, self.unborn)

    @property
    def ours(self) -> bool:
        return c.FINALIZER in self.finalizers or self.held

    @property
    def predicted(self) -> bool:
        return bool(self.owner_uid) and self.uid == c.predicted_uid(self.owner_uid, self.name)

    @property
    def finished(self) -> bool:
        return self.gone or self.done or self.deleting

    def patch_target(self) -> dict:
        """The metadata the guarded finalizer patches are computed from."""
        return {"metadata": {"resourceVersion": self.resource_version,
                             "finalizers": list(self.finalizers)}}


@dataclass(frozen=True)
class Run:
    """One of mpc's PipelineRuns (or sweep TaskRuns) as the watch last showed it."""

    name: str
    uid: str
    role: str
    build_uid: str
    platform: str | None
    succeeded: bool | None
    reason: str
    cancelled: bool
    cancel_requested: str | None
    finished_at: float | None
    resource_version: int
    unresolved: bool = False             # c.unresolved: failed before it started anything
    attempt: int = 1

    def same_state(self, other: "Run | None") -> bool:
        """Nothing a decision reads has changed (only the resourceVersion may differ)."""
        return other is not None and replace(other, resource_version=self.resource_version) == self


@dataclass(frozen=True)
class SlotLease:
    host: str
    holder_uid: str
    uid: str = ""


class Store:
    def __init__(self, cancel_annotation: str):
        self.lock = threading.RLock()
        self.builds: dict[str, Build] = {}
        self.runs: dict[str, Run] = {}
        self.slots: dict[str, SlotLease] = {}
        self.vm_leases: dict[str, dict] = {}    # dynamic hosts' Leases, as the API gave them
        self._cancel_ann = cancel_annotation
        self._holders: dict[str, int] = {}      # build uid -> slot Leases it holds
        self.admission = admission.Index()
        self._alias: dict[str, str] = {}        # TaskRun uid -> its predicted build's key
        self._named: dict[tuple, str] = {}      # (namespace, TaskRun name) -> build key
        self._predicted: dict[str, set] = {}    # PipelineRun uid -> keys predicted from it
        self._unborn: dict[str, int] = {}       # PipelineRun name -> builds not seen yet

    def _classify(self, uid: str) -> None:
        """Put build ``uid`` in the admission class its cached state says (or in none)."""
        b = self.builds.get(uid)
        self.admission.put(uid, admission.state(b, self.runs, self._holders.get(uid, 0)),
                           b.created if b is not None else "")

    # --- builds -------------------------------------------------------------------
    def has_runs(self, uid: str) -> bool:
        return any(n in self.runs for n in (c.provision_run_name(uid),
                                            c.provision_failed_run_name(uid),
                                            c.deprovision_run_name(uid)))

    def key_for(self, tr: dict, platform: str | None = None) -> str:
        """The key of TaskRun ``tr``'s build: its uid, or the look-ahead key of the build
        predicted for it (``predicted_uid`` of the PipelineRun that made it and its name)
        when that prediction is cached or has runs (after a restart: the controller lists
        its runs before any TaskRun) and asked for the same platform."""
        md = tr.get("metadata") or {}
        uid = md.get("uid", "")
        with self.lock:
            if uid in self._alias:
                return self._alias[uid]
            for ref in md.get("ownerReferences") or ():
                if ref.get("kind") != "PipelineRun":
                    continue
                key = c.predicted_uid(str(ref.get("uid", "")), md.get("name", ""))
                p = self.builds.get(key)
                if (p is not None and (platform is None or p.platform in (None, platform))) \
                        or (p is None and self.has_runs(key)):
                    return key
        return uid

    def put_prediction(self, pr: dict, child, now: float) -> Build | None:
        """Cache build ``child`` (``predict.Child``) that PipelineRun ``pr`` will create;
        the new Build, or None if it is known (predicted before, or its TaskRun is)."""
        md = pr.get("metadata") or {}
        ns, owner_uid = md.get("namespace", ""), md.get("uid", "")
        key = c.predicted_uid(owner_uid, child.name)
        with self.lock:
            if key in self.builds or (ns, child.name) in self._named:
                return None
            b = self.builds[key] = Build(
                ns, child.name, key, platform=child.platform,
                created=md.get("creationTimestamp") or "", first_seen=now,
                owner=md.get("name", ""), owner_uid=owner_uid,
                pipeline_task=child.pipeline_task, unborn=True, held=True)
            self._named[(ns, child.name)] = key
            self._predicted.setdefault(owner_uid, set()).add(key)
            self._count_unborn(b.owner, 1)
            self._classify(key)
            return b

    def _count_unborn(self, owner: str, delta: int) -> None:
        n = self._unborn.get(owner, 0) + delta
        if n > 0:
            self._unborn[owner] = n
        else:
            self._unborn.pop(owner, None)

    def predicted_by(self, owner_uid: str) -> list[Build]:
        """The cached builds PipelineRun ``owner_uid`` was predicted to create."""
        with self.lock:
            return [self.builds[k] for k in self._predicted.get(owner_uid, ()) if k in self.builds]

    def prediction_for(self, tr: dict) -> Build | None:
        """The build still unseen that was predicted for TaskRun ``tr``'s name by the
        PipelineRun that made it (whatever platform it asks for)."""
        md = tr.get("metadata") or {}
        with self.lock:
            for ref in md.get("ownerReferences") or ():
                b = self.builds.get(c.predicted_uid(str(ref.get("uid", "")), md.get("name", "")))
                if b is not None and b.unborn:
                    return b
        return None

    def never(self, uid: str) -> Build | None:
        """A predicted build whose TaskRun will not come (or came and is not a build): done."""
        with self.lock:
            b = self.builds.get(uid)
            if b is not None and b.unborn and not b.done:
                b.done = True
                self._classify(uid)
                return b
            return None

    def release_hold(self, uid: str) -> None:
        """A predicted build is released: ours only while it holds our finalizer; one whose
        TaskRun never came is gone."""
        with self.lock:
            b = self.builds.get(uid)
            if b is not None:
                b.held = False
                b.gone = b.gone or b.unborn
                self._classify(uid)

    def has_unborn(self, owner: str) -> bool:
        """Whether PipelineRun ``owner`` (a name) has builds predicted and not seen yet."""
        return owner in self._unborn

    def put_taskrun(self, tr: dict, platform: str | None, now: float) -> Build:
        md = tr.get("metadata") or {}
        key = self.key_for(tr, platform)
        with self.lock:
            b = self.builds.get(key)
            if b is None:
                b = self.builds[key] = Build(md.get("namespace", ""), md.get("name", ""),
                                             key, first_seen=now)
                if key != md["uid"]:        # a prediction known by its runs (a restart)
                    ref = next(r for r in md.get("ownerReferences") or ()
                               if c.predicted_uid(str(r.get("uid", "")), b.name) == key)
                    b.owner, b.owner_uid = ref.get("name", ""), ref.get("uid", "")
                    b.held = c.deprovision_run_name(key) not in self.runs
            elif _rv(tr) and b.resource_version.isdigit() and _rv(tr) < int(b.resource_version):
                return b        # an older version than one we already stored
            if key != md["uid"]:
                self._alias[md["uid"]] = key
                b.taskrun_uid = md["uid"]
                self._predicted.setdefault(b.owner_uid, set()).add(key)
                if b.unborn:
                    b.unborn = False
                    self._count_unborn(b.owner, -1)
            elif not b.owner_uid:
                ref = next((r for r in md.get("ownerReferences") or ()
                            if r.get("kind") == "PipelineRun" and r.get("controller")), {})
                b.owner, b.owner_uid = ref.get("name", ""), ref.get("uid", "")
            self._named[(b.namespace, b.name)] = key
            b.platform = platform or b.platform
            b.created = md.get("creationTimestamp") or b.created
            b.resource_version = md.get("resourceVersion", "")
            b.finalizers = tuple(md.get("finalizers") or ())
            b.deleting = detect.deleting(tr)
            b.done = detect.is_done(tr)
            b.gone = False
            self._classify(b.uid)
            return b

    def build(self, uid: str) -> Build | None:
        with self.lock:
            return self.builds.get(self._alias.get(uid, uid))

    def mark_gone(self, uid: str) -> Build | None:
        """The TaskRun ``uid`` (or the build keyed so) is gone."""
        with self.lock:
            uid = self._alias.get(uid, uid)
            b = self.builds.get(uid)
            if b is not None:
                b.gone = True
                self._classify(uid)
            return b

    def forget(self, uid: str) -> None:
        with self.lock:
            b = self.builds.pop(uid, None)
            if b is not None:
                if self._named.get((b.namespace, b.name)) == uid:
                    del self._named[(b.namespace, b.name)]
                self._alias.pop(b.taskrun_uid, None)
                keys = self._predicted.get(b.owner_uid)
                if keys is not None:
                    keys.discard(uid)
                    if not keys:
                        del self._predicted[b.owner_uid]
                if b.unborn:
                    self._count_unborn(b.owner, -1)
            self._classify(uid)

    # --- runs -------------------------------------------------------------------
    def put_run(self, obj: dict) -> Run | None:
        md = obj.get("metadata") or {}
        labels, ann = md.get("labels") or {}, md.get("annotations") or {}
        status = obj.get("status") or {}
        done_at = None
        if c.succeeded(obj) is not None:
            done_at = objects.parse_time(status.get("completionTime") or
                                        (c.succeeded_condition(obj) or {}).get("lastTransitionTime"))
        run = Run(md.get("name", ""), md.get("uid", ""), labels.get(c.LABEL_ROLE, "?"),
                  labels.get(c.LABEL_TASKRUN_UID, ""), ann.get(c.ANN_PLATFORM),
                  c.succeeded(obj), c.condition_reason(obj),
                  (obj.get("spec") or {}).get("status") == "Cancelled",
                  ann.get(self._cancel_ann), done_at, _rv(obj), c.unresolved(obj),
                  _attempt(ann.get(c.ANN_ATTEMPT)))
        with self.lock:
            old = self.runs.get(run.name)
            if old is not None and old.uid == run.uid and run.resource_version < old.resource_version:
                return old
            self.runs[run.name] = run
            self._classify(run.build_uid)
            if old is not None and old.build_uid != run.build_uid:
                self._classify(old.build_uid)
        return run

    def run(self, name: str) -> Run | None:
        with self.lock:
            return self.runs.get(name)

    def drop_run(self, name: str, uid: str | None = None) -> None:
        """Forget run ``name`` (only if it is still the one with ``uid``, when given: the
        deletion of a run made again by that name must not drop its successor)."""
        with self.lock:
            run = self.runs.get(name)
            if run is not None and (uid is None or run.uid == uid):
                del self.runs[name]
                self._classify(run.build_uid)

    # --- slots -------------------------------------------------------------------
    def put_slot(self, lease: dict) -> SlotLease:
        md = lease.get("metadata") or {}
        labels = md.get("labels") or {}
        s = SlotLease(labels.get(c.LABEL_HOST, ""), labels.get(c.LABEL_TASKRUN_UID, ""),
                      md.get("uid", ""))
        with self.lock:
            self._unhold(self.slots.get(md.get("name", "")))
            self.slots[md.get("name", "")] = s
            self._holders[s.holder_uid] = self._holders.get(s.holder_uid, 0) + 1
            self._classify(s.holder_uid)
        return s

    def drop_slot(self, name: str, uid: str | None = None) -> SlotLease | None:
        """Forget slot ``name`` (only if it is still the Lease with ``uid``, when given: a
        slot taken again by that name since is another one)."""
        with self.lock:
            s = self.slots.get(name)
            if s is None or (uid and s.uid and s.uid != uid):
                return None
            del self.slots[name]
            self._unhold(s)
            return s

    def _unhold(self, s: SlotLease | None) -> None:
        if s is None:
            return
        n = self._holders.get(s.holder_uid, 0) - 1
        if n > 0:
            self._holders[s.holder_uid] = n
        else:
            self._holders.pop(s.holder_uid, None)
        self._classify(s.holder_uid)

    # --- dynamic hosts' Leases (records, places, stats, waiters): for the metrics ------
    def put_vm_lease(self, lease: dict) -> None:
        with self.lock:
            self.vm_leases[lease["metadata"]["name"]] = lease

    def drop_vm_lease(self, name: str, uid: str | None = None) -> None:
        with self.lock:
            lease = self.vm_leases.get(name)
            if lease is not None and (not uid or lease["metadata"].get("uid") in (None, uid)):
                del self.vm_leases[name]
