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
from dataclasses import dataclass

from kubernetes import client

from . import contract
from .hostpool import Dynamic
from .kube import Kube
from .slots import Holder, platform_key

LAUNCHING, BOOTING, READY, TERMINATING = "launching", "booting", "ready", "terminating"
RENEW_STALE_SECONDS = 300          # a launching/booting record not renewed for this long is abandoned


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


def _ignore_404(fn, *a, **kw) -> bool:
    try:
        fn(*a, **kw)
        return True
    except client.ApiException as e:
        if e.status != 404:
            raise
        return False


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
        for i in range(dyn.max_instances):
            name = contract.vm_record_name(dyn.platform, i)
            if name in taken:
                continue
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=name, labels=labels, annotations={
                    contract.ANN_PLATFORM: dyn.platform, contract.ANN_PROVIDER: dyn.provider,
                    contract.ANN_HOST_KEY: host_key, contract.ANN_BUILDS_SERVED: "0"}),
                spec=client.V1LeaseSpec(holder_identity=holder_uid or "warm", acquire_time=now(),
                                        renew_time=now(),
                                        lease_duration_seconds=RENEW_STALE_SECONDS))
            try:
                return _vm(self.kube.leases.create_namespaced_lease(self.namespace, body))
            except client.ApiException as e:
                if e.status != 409:
                    raise
        return None

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
        try:
            return _vm(self.kube.leases.patch_namespaced_lease(vm.name, self.namespace, body))
        except client.ApiException as e:
            if e.status in (404, 409):
                raise Conflict(vm.name) from None
            raise

    def renew(self, vm: VM) -> VM:
        """Say the provisioner working on ``vm`` is alive (unconditional but for the uid)."""
        body = {"metadata": {"uid": vm.uid}, "spec": {"renewTime": _ts(now())}}
        try:
            return _vm(self.kube.leases.patch_namespaced_lease(vm.name, self.namespace, body))
        except client.ApiException as e:
            if e.status in (404, 409):
                raise Conflict(vm.name) from None
            raise

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
        try:
            return _vm(self.kube.leases.patch_namespaced_lease(vm.name, self.namespace, body))
        except client.ApiException as e:
            if e.status in (404, 409, 422):
                raise Conflict(f"{vm.name}: no longer launching this VM ({e.status})") from None
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
        for k in range(dyn.max_builds_per_vm):
            name = contract.vm_build_name(vm.name, k)
            if name in used:
                continue
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(
                    name=name, labels=holder.labels(contract.ROLE_VM_BUILD) | {
                        contract.LABEL_VM: vm.name},
                    annotations=holder.annotations() | {contract.ANN_ALLOCATED_AT: now().isoformat()}),
                spec=client.V1LeaseSpec(holder_identity=f"{holder.namespace}/{holder.name}"[:253],
                                        acquire_time=now()))
            try:
                self.kube.leases.create_namespaced_lease(self.namespace, body)
                return name
            except client.ApiException as e:
                if e.status != 409:
                    raise
        return None

    def places_on(self, vm_name: str) -> list[client.V1Lease]:
        return self._list(f"{contract.LABEL_ROLE}={contract.ROLE_VM_BUILD},{contract.LABEL_VM}={vm_name}")

    def places_of(self, uid: str) -> list[client.V1Lease]:
        return self._list(f"{contract.LABEL_ROLE}={contract.ROLE_VM_BUILD},"
                          f"{contract.LABEL_TASKRUN_UID}={uid}")

    def all_places(self) -> list[client.V1Lease]:
        return self._list(f"{contract.LABEL_MANAGED}={contract.MANAGED_VALUE},"
                          f"{contract.LABEL_ROLE}={contract.ROLE_VM_BUILD}")

    def drop(self, name: str) -> None:
        _ignore_404(self.kube.leases.delete_namespaced_lease, name, self.namespace)

    # --- namespace quota --------------------------------------------------------------
    def take_namespace_place(self, dyn: Dynamic, holder: Holder) -> str | None:
        limit = dyn.max_instances_per_namespace
        for j in range(limit or 0):
            name = contract.vm_namespace_name(dyn.platform, holder.namespace, j)
            body = client.V1Lease(metadata=client.V1ObjectMeta(
                name=name, labels=holder.labels(contract.ROLE_VM_NAMESPACE),
                annotations=holder.annotations()),
                spec=client.V1LeaseSpec(acquire_time=now()))
            try:
                self.kube.leases.create_namespaced_lease(self.namespace, body)
                return name
            except client.ApiException as e:
                if e.status != 409:
                    raise
        return None

    def namespace_places_of(self, uid: str) -> list[client.V1Lease]:
        return self._list(f"{contract.LABEL_ROLE}={contract.ROLE_VM_NAMESPACE},"
                          f"{contract.LABEL_TASKRUN_UID}={uid}")

    def all_namespace_places(self) -> list[client.V1Lease]:
        return self._list(f"{contract.LABEL_MANAGED}={contract.MANAGED_VALUE},"
                          f"{contract.LABEL_ROLE}={contract.ROLE_VM_NAMESPACE}")
