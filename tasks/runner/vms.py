"""VM records, build places on VMs and namespace quotas, all as Leases in the controller namespace.

One record per VM: ``contract.vm_record_name(platform, i)`` with ``i <
maxInstances``. Creating it (create-if-absent, as slots.py takes host slots)
is taking one of the platform's instances from its quota, and it is created
*before* the launch call, so the cloud never runs a VM of mpc's that no
record stands for: hundreds of racing provisioners cannot exceed
``maxInstances`` and a provisioner killed after the launch leaves a record
(and the VM's tags name it). The record's uid is the launch's idempotency
token. A record is deleted only after the provider confirmed that its VM is
terminated.

A record's state (label ``vm-state``): ``launching`` (no instance id yet),
``booting`` (launched, SSH not verified), ``ready`` (answers SSH with its
pinned key; takes builds), ``terminating`` (being terminated; takes none).
Transitions are patches conditional on the resourceVersion. While launching
or booting, the provisioner renews the record; one that stopped renewing for
``lease_duration_seconds`` is abandoned and the sweep cleans it up.

A build on a VM holds one of its ``maxBuildsPerVM`` places
(``contract.vm_build_name``), taken create-if-absent; with
``maxInstancesPerNamespace`` it also holds a namespace place.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import random
from dataclasses import dataclass
from typing import Any, Iterable

from kubernetes import client

from . import contract, log
from .hostpool import Dynamic
from .kube import Kube, call, path
from .slots import Holder, platform_key, take_first_free

LAUNCHING, BOOTING, READY, TERMINATING = "launching", "booting", "ready", "terminating"
RENEW_STALE_SECONDS = 300          # a launching/booting record not renewed for this long is abandoned
STATS_SHARDS = 4                   # counter Leases per platform (fewer write conflicts)
BOOT_BUCKETS = (5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 900)     # seconds, then +Inf
COUNTERS = ("launches", "launch_failures", "warm_claims", "quota_blocked", "orphans_terminated")


class Conflict(Exception):
    """The record changed (or vanished) since it was read."""


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _ts(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class VM:
    name: str
    uid: str
    resource_version: str
    platform: str
    state: str
    instance_id: str
    address: str
    host_key: str
    launched_at: dt.datetime | None
    renewed: dt.datetime
    stale_after: int
    builds_served: int
    holder_uid: str              # the build that launched it ('' for a warm VM)

    @property
    def stale(self) -> bool:
        return (now() - self.renewed).total_seconds() > self.stale_after

    def age(self) -> float:
        return (now() - self.launched_at).total_seconds() if self.launched_at else 0.0


def _vm(lease: client.V1Lease) -> VM:
    m = lease.metadata
    ann, lab = m.annotations or {}, m.labels or {}
    launched = ann.get(contract.ANN_LAUNCHED_AT)
    renewed = lease.spec.renew_time or lease.spec.acquire_time or m.creation_timestamp
    return VM(name=m.name, uid=m.uid, resource_version=m.resource_version,
              platform=ann.get(contract.ANN_PLATFORM, ""),
              state=lab.get(contract.LABEL_VM_STATE, ""),
              instance_id=ann.get(contract.ANN_INSTANCE_ID, ""),
              address=ann.get(contract.ANN_ADDRESS, ""),
              host_key=ann.get(contract.ANN_HOST_KEY, ""),
              launched_at=dt.datetime.fromisoformat(launched) if launched else None,
              renewed=renewed, stale_after=lease.spec.lease_duration_seconds or RENEW_STALE_SECONDS,
              builds_served=int(ann.get(contract.ANN_BUILDS_SERVED, "0")),
              holder_uid=lab.get(contract.LABEL_TASKRUN_UID, ""))


class Records:
    def __init__(self, kube: Kube, namespace: str):
        self.kube = kube
        self.namespace = namespace

    def _list(self, selector: str) -> list[client.V1Lease]:
        return self.kube.leases.list_namespaced_lease(self.namespace,
                                                      label_selector=selector).items

    # --- records -------------------------------------------------------------------
    def all(self, platform: str | None = None) -> list[VM]:
        sel = f"{contract.LABEL_MANAGED}={contract.MANAGED_VALUE},{contract.LABEL_ROLE}={contract.ROLE_VM}"
        if platform:
            sel += f",{contract.DOMAIN}/platform-key={platform_key(platform)}"
        return [_vm(x) for x in self._list(sel)]

    def get(self, name: str) -> VM | None:
        try:
            return _vm(self.kube.leases.read_namespaced_lease(name, self.namespace))
        except client.ApiException as e:
            if e.status == 404:
                return None
            raise

    def reserve(self, dyn: Dynamic, host_key: str, holder_uid: str = "") -> VM | None:
        """Take one of the platform's ``maxInstances`` as a new record (state launching),
        or None when all are taken."""
        taken = {v.name for v in self.all(dyn.platform)}
        labels = {contract.LABEL_MANAGED: contract.MANAGED_VALUE,
                  contract.LABEL_ROLE: contract.ROLE_VM, contract.LABEL_VM_STATE: LAUNCHING,
                  f"{contract.DOMAIN}/platform-key": platform_key(dyn.platform)}
        if holder_uid:
            labels[contract.LABEL_TASKRUN_UID] = holder_uid
        lease = take_first_free(
            self.kube, self.namespace,
            (n for n in (contract.vm_record_name(dyn.platform, i)
                         for i in range(dyn.max_instances)) if n not in taken),
            lambda name: client.V1Lease(
                metadata=client.V1ObjectMeta(name=name, labels=labels, annotations={
                    contract.ANN_PLATFORM: dyn.platform, contract.ANN_PROVIDER: dyn.provider,
                    contract.ANN_HOST_KEY: host_key, contract.ANN_BUILDS_SERVED: "0"}),
                spec=client.V1LeaseSpec(holder_identity=holder_uid or "warm", acquire_time=now(),
                                        renew_time=now(),
                                        lease_duration_seconds=RENEW_STALE_SECONDS)),
            owner_uid=holder_uid)
        return None if lease is None else _vm(lease)

    def update(self, vm: VM, state: str | None = None, annotations: dict | None = None,
               renew: bool = False) -> VM:
        """Patch ``vm`` if it is unchanged since read (else ``Conflict``)."""
        meta: dict = {"resourceVersion": vm.resource_version, "uid": vm.uid}
        if state:
            meta["labels"] = {contract.LABEL_VM_STATE: state}
        if annotations:
            meta["annotations"] = annotations
        body: dict = {"metadata": meta}
        if renew or state:
            body["spec"] = {"renewTime": _ts(now())}
        return self._patch(vm, body)

    def renew(self, vm: VM) -> VM:
        """Say the provisioner working on ``vm`` is alive (unconditional but for the uid)."""
        return self._patch(vm, {"metadata": {"uid": vm.uid}, "spec": {"renewTime": _ts(now())}})

    def fence(self, vm: VM) -> VM:
        """Renew ``vm`` only while it is this incarnation and still launching, else
        ``Conflict``: what a provisioner does right before each launch call is sent.

        One JSON patch whose ``test`` operations the API server applies atomically with
        the renewal, so a record the sweep marked terminating (or deleted and someone
        re-created) can never be renewed back to life."""
        label = contract.LABEL_VM_STATE.replace("~", "~0").replace("/", "~1")
        body = [{"op": "test", "path": "/metadata/uid", "value": vm.uid},
                {"op": "test", "path": f"/metadata/labels/{label}", "value": LAUNCHING},
                {"op": "replace", "path": "/spec/renewTime", "value": _ts(now())}]
        return self._patch(vm, body, gone=(404, 409, 422), why="no longer launching this VM")

    def _patch(self, vm: VM, body, gone: tuple[int, ...] = (404, 409), why: str = "") -> VM:
        """Patch ``vm``'s record; an answer in ``gone`` (it changed or went) is ``Conflict``."""
        try:
            return _vm(self.kube.leases.patch_namespaced_lease(vm.name, self.namespace, body))
        except client.ApiException as e:
            if e.status in gone:
                raise Conflict(f"{vm.name}: {why} ({e.status})" if why else vm.name) from None
            raise

    def delete(self, vm: VM) -> None:
        """Delete the record (only that incarnation of it: uid precondition)."""
        try:
            self.kube.leases.delete_namespaced_lease(
                vm.name, self.namespace,
                body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=vm.uid)))
        except client.ApiException as e:
            if e.status not in (404, 409):
                raise

    # --- build places on a VM -------------------------------------------------------
    def take_place(self, vm: VM, dyn: Dynamic, holder: Holder) -> str | None:
        used = {x.metadata.name for x in self.places_on(vm.name)}
        lease = take_first_free(
            self.kube, self.namespace,
            (n for n in (contract.vm_build_name(vm.name, k)
                         for k in range(dyn.max_builds_per_vm)) if n not in used),
            lambda name: client.V1Lease(
                metadata=client.V1ObjectMeta(
                    name=name, labels=holder.labels(contract.ROLE_VM_BUILD) | {
                        contract.LABEL_VM: vm.name},
                    annotations=holder.annotations() | {contract.ANN_ALLOCATED_AT: now().isoformat()}),
                spec=client.V1LeaseSpec(holder_identity=f"{holder.namespace}/{holder.name}"[:253],
                                        acquire_time=now())),
            owner_uid=holder.uid)
        return None if lease is None else lease.metadata.name

    def places_on(self, vm_name: str) -> list[client.V1Lease]:
        return self._list(f"{contract.LABEL_ROLE}={contract.ROLE_VM_BUILD},{contract.LABEL_VM}={vm_name}")

    def places_of(self, uid: str) -> list[client.V1Lease]:
        return self._list(f"{contract.LABEL_ROLE}={contract.ROLE_VM_BUILD},"
                          f"{contract.LABEL_TASKRUN_UID}={uid}")

    def all_places(self) -> list[client.V1Lease]:
        return self._list(f"{contract.LABEL_MANAGED}={contract.MANAGED_VALUE},"
                          f"{contract.LABEL_ROLE}={contract.ROLE_VM_BUILD}")

    def drop(self, lease: "client.V1Lease | str") -> None:
        """Delete a place Lease (``Kube.delete``, retried). Given the Lease as it was read,
        only that one: a namesake created since (the place freed by someone else and
        taken by another build) stays."""
        name, uid = (lease, None) if isinstance(lease, str) else (lease.metadata.name,
                                                                 lease.metadata.uid)
        call(self.kube.delete, path("coordination.k8s.io", "v1", "leases", self.namespace,
                                    name), uid=uid)

    # --- namespace quota --------------------------------------------------------------
    def take_namespace_place(self, dyn: Dynamic, holder: Holder) -> str | None:
        lease = take_first_free(
            self.kube, self.namespace,
            (contract.vm_namespace_name(dyn.platform, holder.namespace, j)
             for j in range(dyn.max_instances_per_namespace or 0)),
            lambda name: client.V1Lease(metadata=client.V1ObjectMeta(
                name=name, labels=holder.labels(contract.ROLE_VM_NAMESPACE),
                annotations=holder.annotations()), spec=client.V1LeaseSpec(acquire_time=now())),
            owner_uid=holder.uid)
        return None if lease is None else lease.metadata.name

    def namespace_places_of(self, uid: str) -> list[client.V1Lease]:
        return self._list(f"{contract.LABEL_ROLE}={contract.ROLE_VM_NAMESPACE},"
                          f"{contract.LABEL_TASKRUN_UID}={uid}")

    def all_namespace_places(self) -> list[client.V1Lease]:
        return self._list(f"{contract.LABEL_MANAGED}={contract.MANAGED_VALUE},"
                          f"{contract.LABEL_ROLE}={contract.ROLE_VM_NAMESPACE}")


# --- metrics --------------------------------------------------------------------------
def _boot_bucket(seconds: float) -> str:
    return next((str(b) for b in BOOT_BUCKETS if seconds <= b), "+Inf")


def count(kube: Kube, namespace: str, platform: str, boot_seconds: float | None = None,
          **increments: int) -> None:
    """Add to ``platform``'s counters (``COUNTERS``) and observe a boot time, in one of its
    stats Leases (read, add, write back conditional on the resourceVersion). Best effort:
    a failure is logged, never raised; a build never waits long for its metrics."""
    name = contract.vm_stats_name(platform, random.randrange(STATS_SHARDS))
    leases = kube.leases
    for _ in range(6):
        try:
            try:
                cur = leases.read_namespaced_lease(name, namespace)
            except client.ApiException as e:
                if e.status != 404:
                    raise
                cur = None
            ann = (cur.metadata.annotations or {}) if cur else {}
            stats = json.loads(ann.get(contract.ANN_VM_STATS) or "{}")
            for k, v in increments.items():
                stats[k] = stats.get(k, 0) + v
            if boot_seconds is not None:
                b = stats.setdefault("boot_seconds", {"buckets": {}, "sum": 0.0, "count": 0})
                key = _boot_bucket(boot_seconds)
                b["buckets"][key] = b["buckets"].get(key, 0) + 1
                b["sum"] = round(b["sum"] + boot_seconds, 3)
                b["count"] += 1
            text = json.dumps(stats, sort_keys=True)
            if cur is None:
                leases.create_namespaced_lease(namespace, client.V1Lease(
                    metadata=client.V1ObjectMeta(
                        name=name, labels={
                            contract.LABEL_MANAGED: contract.MANAGED_VALUE,
                            contract.LABEL_ROLE: contract.ROLE_VM_STATS,
                            f"{contract.DOMAIN}/platform-key": platform_key(platform)},
                        annotations={contract.ANN_PLATFORM: platform,
                                     contract.ANN_VM_STATS: text}),
                    spec=client.V1LeaseSpec()))
            else:
                leases.patch_namespaced_lease(name, namespace, {"metadata": {
                    "resourceVersion": cur.metadata.resource_version,
                    "annotations": {contract.ANN_VM_STATS: text}}})
            return
        except client.ApiException as e:
            if e.status != 409:
                log.event("could not count", level="warning", platform=platform,
                          counters=increments, status=e.status)
                return
    log.event("could not count: too many conflicts", level="warning", platform=platform,
              counters=increments)


def _plain(obj: Any) -> dict:
    if isinstance(obj, dict):
        return obj
    return client.ApiClient().sanitize_for_serialization(obj)


def summary(leases: Iterable[Any], platforms: Iterable[str] = ()) -> dict[str, dict]:
    """What the dynamic platforms look like now, from the Leases of the controller
    namespace alone (the watcher's cache: JSON dicts as the API returns them, or
    ``V1Lease`` objects). Pure: no API call, no clock.

    Per platform (every one in ``platforms``, plus any with a Lease)::

        {"instances": {"launching": n, "booting": n, "idle": n, "busy": n,
                       "terminating": n},            # gauge: VMs by state (ready: idle|busy)
         "builds": n,                                # gauge: builds holding a place on a VM
         "waiting": n,                               # gauge: builds queued for a VM
         "launches": n, "launch_failures": n,        # counters (since the stats Leases
         "warm_claims": n, "quota_blocked": n,       #  were created)
         "orphans_terminated": n,
         "boot_seconds": {"buckets": [(5.0, n), ..., (inf, n)],   # cumulative, as
                          "sum": s, "count": n}}                  #  Prometheus wants

    ``waiting`` counts queue entries of platforms that have VM records, stats or are in
    ``platforms``: pass the pool's dynamic platforms so a static platform's queue is not
    reported as one of VMs.
    """
    def blank() -> dict:
        return {"instances": {LAUNCHING: 0, BOOTING: 0, "idle": 0, "busy": 0, TERMINATING: 0},
                "builds": 0, "waiting": 0, **{c: 0 for c in COUNTERS},
                "boot_seconds": {"buckets": {}, "sum": 0.0, "count": 0}}
    out: dict[str, dict] = {p: blank() for p in platforms}
    docs = [_plain(x) for x in leases]
    vm_platform: dict[str, str] = {}
    busy: set[str] = set()
    waiters: list[str] = []
    places: list[str] = []
    for d in docs:
        m = d.get("metadata") or {}
        lab, ann = m.get("labels") or {}, m.get("annotations") or {}
        role = lab.get(contract.LABEL_ROLE)
        if role == contract.ROLE_VM:
            vm_platform[m.get("name", "")] = ann.get(contract.ANN_PLATFORM, "")
        elif role == contract.ROLE_VM_BUILD:
            busy.add(lab.get(contract.LABEL_VM, ""))
            places.append(lab.get(contract.LABEL_VM, ""))
        elif role == "waiter":
            waiters.append(ann.get(contract.ANN_PLATFORM, ""))
    for d in docs:
        m = d.get("metadata") or {}
        lab, ann = m.get("labels") or {}, m.get("annotations") or {}
        role = lab.get(contract.LABEL_ROLE)
        plat = ann.get(contract.ANN_PLATFORM, "")
        if role == contract.ROLE_VM:
            state = lab.get(contract.LABEL_VM_STATE, "")
            if state == READY:
                state = "busy" if m.get("name") in busy else "idle"
            row = out.setdefault(plat, blank())
            if state in row["instances"]:
                row["instances"][state] += 1
        elif role == contract.ROLE_VM_STATS:
            try:
                stats = json.loads(ann.get(contract.ANN_VM_STATS) or "{}")
            except ValueError:
                continue
            row = out.setdefault(plat, blank())
            for c in COUNTERS:
                row[c] += int(stats.get(c, 0))
            b = stats.get("boot_seconds") or {}
            for k, v in (b.get("buckets") or {}).items():
                row["boot_seconds"]["buckets"][k] = row["boot_seconds"]["buckets"].get(k, 0) + v
            row["boot_seconds"]["sum"] += float(b.get("sum", 0))
            row["boot_seconds"]["count"] += int(b.get("count", 0))
    for vm in places:
        if vm in vm_platform and vm_platform[vm] in out:
            out[vm_platform[vm]]["builds"] += 1
    for plat in waiters:
        if plat in out:
            out[plat]["waiting"] += 1
    for row in out.values():
        per = row["boot_seconds"]["buckets"]
        cum, total = [], 0
        for le in [*BOOT_BUCKETS, math.inf]:
            total += per.get("+Inf" if le == math.inf else str(le), 0)
            cum.append((float(le), total))
        row["boot_seconds"]["buckets"] = cum
    return out
