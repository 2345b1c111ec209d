"""Atomic host slots and the FIFO queue, both as coordination.k8s.io Leases.

Taking slot *i* of a host is creating the Lease ``mpc-slot-<host>-<i>``: the
API server's create-if-absent makes it atomic (409 = taken, try the next), so
no host ever runs more builds than its concurrency, whatever races. The slot
records who holds it; it is the source of truth for cleanup. Utilisation is
the count of a host's slot Leases.

A build that finds its platform full queues as a waiter Lease
``mpc-wait-<uid>``; waiters are served oldest first: the waiter at position
*k* may take a slot only while more than *k* slots are free. Waiters renew
their Lease; a waiter that stopped renewing is skipped (and swept).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import time
from dataclasses import dataclass
from typing import Iterable

from kubernetes import client

from . import contract
from .hostpool import Host
from .kube import Kube

WAITER_STALE_SECONDS = 30
ALIVE_CHECK_SECONDS = 3


class Gone(Exception):
    """The build stopped wanting a slot (its TaskRun was deleted) while it waited."""


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def platform_key(platform: str) -> str:
    """A label-safe key for a platform (platforms contain '/')."""
    return hashlib.sha256(platform.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Holder:
    """Who a slot or waiter belongs to: one build TaskRun."""

    namespace: str
    name: str
    uid: str
    platform: str

    @property
    def user(self) -> str:
        return contract.build_user(self.namespace, self.name, self.uid)

    def labels(self, role: str) -> dict[str, str]:
        return {contract.LABEL_MANAGED: contract.MANAGED_VALUE, contract.LABEL_ROLE: role,
                contract.LABEL_TASKRUN_UID: self.uid,
                contract.LABEL_TASKRUN_NAMESPACE: self.namespace,
                f"{contract.DOMAIN}/platform-key": platform_key(self.platform)}

    def annotations(self) -> dict[str, str]:
        return {contract.ANN_TASKRUN_NAME: self.name, contract.ANN_PLATFORM: self.platform,
                contract.ANN_USER: self.user}


@dataclass(frozen=True)
class Slot:
    host: str
    index: int
    holder: Holder
    lease_name: str


def _slot_from_lease(lease: client.V1Lease) -> Slot:
    m = lease.metadata
    ann, lab = m.annotations or {}, m.labels or {}
    holder = Holder(namespace=lab.get(contract.LABEL_TASKRUN_NAMESPACE, ""),
                    name=ann.get(contract.ANN_TASKRUN_NAME, ""),
                    uid=lab.get(contract.LABEL_TASKRUN_UID, ""),
                    platform=ann.get(contract.ANN_PLATFORM, ""))
    return Slot(host=lab.get(contract.LABEL_HOST, ""),
                index=int(m.name.rsplit("-", 1)[1]), holder=holder, lease_name=m.name)


class Slots:
    def __init__(self, kube: Kube, namespace: str):
        self.kube = kube
        self.namespace = namespace

    def _list(self, selector: str) -> list[client.V1Lease]:
        return self.kube.leases.list_namespaced_lease(self.namespace, label_selector=selector).items

    def all(self) -> list[Slot]:
        sel = f"{contract.LABEL_MANAGED}={contract.MANAGED_VALUE},{contract.LABEL_ROLE}=slot"
        return [_slot_from_lease(lease) for lease in self._list(sel)]

    def held_by(self, uid: str) -> list[Slot]:
        sel = f"{contract.LABEL_ROLE}=slot,{contract.LABEL_TASKRUN_UID}={uid}"
        return [_slot_from_lease(lease) for lease in self._list(sel)]

    def usage(self) -> dict[str, set[int]]:
        used: dict[str, set[int]] = {}
        for s in self.all():
            used.setdefault(s.host, set()).add(s.index)
        return used

    def try_take(self, host: Host, index: int, holder: Holder) -> Slot | None:
        name = contract.slot_name(host.name, index)
        labels = holder.labels("slot") | {contract.LABEL_HOST: host.name}
        ann = holder.annotations() | {contract.ANN_ADDRESS: host.address,
                                      contract.ANN_ALLOCATED_AT: now().isoformat()}
        lease = client.V1Lease(
            metadata=client.V1ObjectMeta(name=name, labels=labels, annotations=ann),
            spec=client.V1LeaseSpec(holder_identity=f"{holder.namespace}/{holder.name}"[:253],
                                    acquire_time=now()))
        try:
            self.kube.leases.create_namespaced_lease(self.namespace, lease)
        except client.ApiException as e:
            if e.status == 409:
                return None
            raise
        return Slot(host=host.name, index=index, holder=holder, lease_name=name)

    def allocate(self, hosts: Iterable[Host], holder: Holder) -> Slot | None:
        """Take a slot on the least-utilised host with room, or None if all are full."""
        hosts = list(hosts)
        used = self.usage()
        order = sorted(hosts, key=lambda h: (len(used.get(h.name, ())) / h.concurrency,
                                             len(used.get(h.name, ())), h.name))
        for h in order:
            taken = used.get(h.name, set())
            for i in range(h.concurrency):
                if i in taken:
                    continue
                slot = self.try_take(h, i, holder)
                if slot:
                    return slot
        return None

    def free_count(self, hosts: Iterable[Host]) -> int:
        used = self.usage()
        return sum(max(0, h.concurrency - len([i for i in used.get(h.name, ()) if i < h.concurrency]))
                   for h in hosts)

    def release(self, slot: Slot) -> None:
        try:
            self.kube.leases.delete_namespaced_lease(slot.lease_name, self.namespace)
        except client.ApiException as e:
            if e.status != 404:
                raise

    # --- the FIFO queue ---------------------------------------------------------
    def _waiters(self, platform: str) -> list[client.V1Lease]:
        sel = (f"{contract.LABEL_ROLE}=waiter,"
               f"{contract.DOMAIN}/platform-key={platform_key(platform)}")
        return self._list(sel)

    def enqueue(self, holder: Holder) -> None:
        name = contract.waiter_name(holder.uid)
        lease = client.V1Lease(
            metadata=client.V1ObjectMeta(name=name, labels=holder.labels("waiter"),
                                         annotations=holder.annotations()),
            spec=client.V1LeaseSpec(holder_identity=f"{holder.namespace}/{holder.name}"[:253],
                                    acquire_time=now(), renew_time=now(),
                                    lease_duration_seconds=WAITER_STALE_SECONDS))
        try:
            self.kube.leases.create_namespaced_lease(self.namespace, lease)
        except client.ApiException as e:
            if e.status != 409:
                raise

    def renew(self, holder: Holder) -> None:
        body = {"spec": {"renewTime": now().strftime("%Y-%m-%dT%H:%M:%S.%fZ")}}
        try:
            self.kube.leases.patch_namespaced_lease(contract.waiter_name(holder.uid),
                                                    self.namespace, body)
        except client.ApiException as e:
            if e.status == 404:
                self.enqueue(holder)   # swept while we were alive: queue again (at the back)
            else:
                raise

    def dequeue(self, uid: str) -> None:
        try:
            self.kube.leases.delete_namespaced_lease(contract.waiter_name(uid), self.namespace)
        except client.ApiException as e:
            if e.status != 404:
                raise

    def position(self, holder: Holder) -> int:
        """0-based place of ``holder`` among live waiters of its platform, oldest first."""
        live = [w for w in self._waiters(holder.platform) if not stale(w)
                or w.metadata.name == contract.waiter_name(holder.uid)]
        live.sort(key=lambda w: (w.metadata.creation_timestamp, w.spec.acquire_time,
                                 w.metadata.name))
        names = [w.metadata.name for w in live]
        me = contract.waiter_name(holder.uid)
        return names.index(me) if me in names else len(names)

    def stale_waiters(self) -> list[client.V1Lease]:
        sel = f"{contract.LABEL_MANAGED}={contract.MANAGED_VALUE},{contract.LABEL_ROLE}=waiter"
        return [w for w in self._list(sel) if stale(w)]

    def acquire(self, hosts: list[Host], holder: Holder, deadline: float,
                poll: float = 0.5, on_wait=None, alive=None) -> Slot | None:
        """Queue for and take a slot; None when ``deadline`` (monotonic) passes.

        ``alive()`` is asked every few seconds while waiting; False raises Gone.
        """
        self.enqueue(holder)
        last_renew = last_alive = time.monotonic()
        waited = False
        try:
            while True:
                pos = self.position(holder)
                if pos < self.free_count(hosts):
                    slot = self.allocate(hosts, holder)
                    if slot:
                        return slot
                if time.monotonic() >= deadline:
                    return None
                if not waited and on_wait:
                    on_wait(pos)
                waited = True
                time.sleep(poll)
                if alive and time.monotonic() - last_alive > ALIVE_CHECK_SECONDS:
                    last_alive = time.monotonic()
                    if not alive():
                        raise Gone(holder.uid)
                if time.monotonic() - last_renew > WAITER_STALE_SECONDS / 3:
                    self.renew(holder)
                    last_renew = time.monotonic()
        finally:
            self.dequeue(holder.uid)


def stale(w: client.V1Lease) -> bool:
    renewed = w.spec.renew_time or w.spec.acquire_time or w.metadata.creation_timestamp
    return (now() - renewed).total_seconds() > (w.spec.lease_duration_seconds or WAITER_STALE_SECONDS)
