"""Atomic host slots and the FIFO queue, both as coordination.k8s.io Leases.

Slots. Taking slot *i* of a host (i < its concurrency) is creating the Lease
``mpc-slot-<host>-<i>``: the API server's create-if-absent makes it atomic
(409 = taken, try the next). A host's load is the number of its slot Leases,
whatever their indices: after its concurrency is lowered it may still hold
slots at or above the new limit, and it gets no new build while it holds as
many slots as its limit. Since such leftover slots are not bounded by the
indices, a taker re-lists the host's slots after creating one (a consistent
read) and gives its slot back when the host then holds more than its limit:
of racing takers the last one to create always sees the others and gives
back, so the limit holds; racers that all gave back retry. A draining host
(``drain: true``) gets no new slot. Utilisation is the count of a host's slot
Leases.

The slot records who holds it and how to reach its host (address, port, admin
user, admin-key Secret, the pool's pinned key if any), so a host removed from
the pool can still be cleaned up (``target``; see deprovision). It is the
source of truth for cleanup.

``free_slots``, ``free_per_platform`` and ``assign`` are pure (hosts + slot
list, + waiters) so a caller with its own cache (the watcher) computes the
same numbers.

Queue. A build that finds no slot for it queues as a waiter Lease
``mpc-wait-<uid>`` and renews it. Order is the API server's
creationTimestamp, then the Lease name: never a pod's clock. Liveness is
judged the way client-go's leader election judges a leader: an observer
remembers, on its own monotonic clock, when it last saw a waiter's
resourceVersion change and calls the waiter stale only after its
leaseDurationSeconds passed without a change it saw itself; clock skew between
pods can neither sweep a live waiter nor keep a dead one. An observer deletes
a waiter it found stale (precondition: the resourceVersion it saw, so a
renewal in between wins). A waiter records the hosts it cannot use
(``ANN_EXCLUDED_HOSTS``: they failed for it). Whose turn it is comes from
``assign``: free slots go to the waiters oldest first, each only to a host it
can use, so a free host serves the oldest waiter that can use it and an
older waiter never blocks a younger one on a host it cannot use itself.
"""
from __future__ import annotations

import datetime as dt
import functools
import hashlib
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

from kubernetes import client

from . import contract, log
from .hostpool import Host, PoolError, from_document
from .kube import Kube, call
from .kube import path as kube_path

WAITER_LEASE_SECONDS = 30
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
    owner: str = ""         # a predicted build: the PipelineRun that will create its TaskRun

    @property
    def user(self) -> str:
        return contract.build_user(self.namespace, self.name, self.uid)

    def labels(self, role: str) -> dict[str, str]:
        return {**contract.build_labels(role, self.uid, self.namespace),
                f"{contract.DOMAIN}/platform-key": platform_key(self.platform)}

    def annotations(self) -> dict[str, str]:
        return {contract.ANN_TASKRUN_NAME: self.name, contract.ANN_PLATFORM: self.platform,
                contract.ANN_USER: self.user,
                **({contract.ANN_PIPELINERUN: self.owner} if self.owner else {})}

    @property
    def build(self) -> tuple[str, str, str, str]:
        """What ``provision.build_state`` takes after the client: namespace, name, uid,
        owner."""
        return self.namespace, self.name, self.uid, self.owner


def holder_of(meta: client.V1ObjectMeta) -> Holder:
    """The build a slot, queue entry or place (``Holder.labels``/``annotations``) is for."""
    ann, lab = meta.annotations or {}, meta.labels or {}
    return Holder(namespace=lab.get(contract.LABEL_TASKRUN_NAMESPACE, ""),
                  name=ann.get(contract.ANN_TASKRUN_NAME, ""),
                  uid=lab.get(contract.LABEL_TASKRUN_UID, ""),
                  platform=ann.get(contract.ANN_PLATFORM, ""),
                  owner=ann.get(contract.ANN_PIPELINERUN, ""))


@dataclass(frozen=True)
class Slot:
    host: str
    index: int
    holder: Holder
    lease_name: str
    target: Host | None = None      # the host as recorded when the slot was taken
    unreachable_since: str = ""     # set when its removed host could not be reached
    lease_uid: str = ""             # this holder's Lease, not a namesake taken since


def target_annotations(host: Host) -> dict[str, str]:
    """What a slot records to reach its host after the host left the pool."""
    ann = {contract.ANN_ADDRESS: host.address, contract.ANN_PORT: str(host.port),
           contract.ANN_ADMIN_USER: host.user, contract.ANN_ADMIN_SECRET: host.secret}
    if host.host_key:
        ann[contract.ANN_HOST_KEY] = host.host_key
    return ann


def _target(name: str, ann: dict[str, str]) -> Host | None:
    """The host a slot recorded, validated like a pool entry (None if incomplete/invalid)."""
    keys = (contract.ANN_ADDRESS, contract.ANN_ADMIN_USER, contract.ANN_ADMIN_SECRET,
            contract.ANN_PORT, contract.ANN_PLATFORM, contract.ANN_HOST_KEY)
    return _validated_target(name, *(ann.get(k, "") for k in keys))


@functools.lru_cache(maxsize=4096)
def _validated_target(name: str, address: str, user: str, secret: str, port: str,
                      platform: str, host_key: str) -> Host | None:
    try:
        entry = {"name": name, "address": address, "user": user, "secret": secret,
                 "port": int(port or "22"), "platform": platform, "concurrency": 1}
        if host_key:
            entry["hostKey"] = host_key
        return from_document({"hosts": [entry]}).hosts[0]
    except (ValueError, PoolError):
        return None


def _slot_from_lease(lease: client.V1Lease) -> Slot:
    m = lease.metadata
    ann, lab = m.annotations or {}, m.labels or {}
    host = lab.get(contract.LABEL_HOST, "")
    return Slot(host=host, index=int(m.name.rsplit("-", 1)[1]), holder=holder_of(m),
                lease_name=m.name, target=_target(host, ann),
                unreachable_since=ann.get(contract.ANN_UNREACHABLE_SINCE, ""),
                lease_uid=m.uid or "")


# --- pure capacity arithmetic (the watcher calls these on its cache) ----------------
def _load(host: Host, held: Counter) -> tuple:
    """Preference order: least utilised first, then fewest slots held, then name."""
    return (held[host.name] / host.concurrency, held[host.name], host.name)


def free_slots(hosts: Iterable[Host], slots: Iterable) -> dict[str, int]:
    """Free slots per host name: its current limit minus the slots it holds, whatever
    their indices (never negative); 0 for a draining host. ``slots``: anything with a
    ``host`` attribute (the host's name)."""
    held = Counter(s.host for s in slots)
    return {h.name: 0 if h.drain else max(0, h.concurrency - held[h.name]) for h in hosts}


def free_per_platform(hosts: Iterable[Host], slots: Iterable) -> dict[str, int]:
    """Free slots per platform (see ``free_slots``)."""
    hosts = list(hosts)
    free = free_slots(hosts, slots)
    out: dict[str, int] = {}
    for h in hosts:
        out[h.platform] = out.get(h.platform, 0) + free[h.name]
    return out


@dataclass(frozen=True)
class Waiter:
    name: str
    holder: Holder
    created: dt.datetime            # creationTimestamp: the API server's clock
    excluded: frozenset[str] = frozenset()
    version: str = ""               # resourceVersion: changes with every renewal
    duration: float = WAITER_LEASE_SECONDS


def _waiter(lease: client.V1Lease) -> Waiter:
    m = lease.metadata
    excluded = (m.annotations or {}).get(contract.ANN_EXCLUDED_HOSTS, "")
    return Waiter(name=m.name, holder=holder_of(m),
                  created=m.creation_timestamp or dt.datetime.max.replace(tzinfo=dt.timezone.utc),
                  excluded=frozenset(x for x in excluded.split(",") if x),
                  version=m.resource_version or "",
                  duration=float(lease.spec.lease_duration_seconds or WAITER_LEASE_SECONDS))


def fifo(waiters: Iterable[Waiter]) -> list[Waiter]:
    """Oldest first by the API server's creationTimestamp, ties by Lease name."""
    return sorted(waiters, key=lambda w: (w.created, w.name))


def assign(hosts: Iterable[Host], slots: Iterable, waiters: Iterable[Waiter]) -> dict[str, str]:
    """Which waiter gets which host now: waiter name -> host name.

    Free slots go to ``waiters`` in FIFO order, each waiter only to a host it does
    not exclude; an older waiter keeps its claim, but may be moved to another host
    it can use when that lets a younger one in (augmenting paths), so a free host
    serves the oldest waiter that can use it.
    """
    hosts = list(hosts)
    slots = list(slots)
    free = free_slots(hosts, slots)
    held = Counter(s.host for s in slots)
    order = [h.name for h in sorted(hosts, key=lambda h: _load(h, held))]
    placed: dict[str, list[str]] = {h: [] for h in order}
    got: dict[str, str] = {}
    options: dict[str, list[str]] = {}

    def place(w: str, seen: set[str]) -> bool:
        for h in options[w]:
            if h in seen or not free[h]:
                continue
            seen.add(h)
            if len(placed[h]) < free[h]:
                placed[h].append(w)
                got[w] = h
                return True
            for other in list(placed[h]):
                if place(other, seen):
                    placed[h].remove(other)
                    placed[h].append(w)
                    got[w] = h
                    return True
        return False

    for w in fifo(waiters):
        options[w.name] = [h for h in order if h not in w.excluded]
        place(w.name, set())
    return got


def take_first_free(kube: Kube, namespace: str, names: Iterable[str], make,
                    owner_uid: str = "") -> client.V1Lease | None:
    """Create the first Lease of ``names`` nobody holds, as ``make(name)`` describes it.

    The one "indexed places" primitive (host slots, VM records, VM build places,
    namespace quota places): a create is atomic, so a 409 means the place is taken
    and the next name is tried. A 409 is not always someone else: the access layer
    retries a create whose answer was lost, and the retry meets the Lease the first
    attempt made. A place whose Lease carries ``owner_uid`` as its build uid is ours.
    None when every name is taken.
    """
    for name in names:
        try:
            return kube.leases.create_namespaced_lease(namespace, make(name))
        except client.ApiException as e:
            if e.status != 409:
                raise
        if not owner_uid:
            continue
        try:
            existing = kube.leases.read_namespaced_lease(name, namespace)
        except client.ApiException as e:
            if e.status == 404:
                continue
            raise
        if (existing.metadata.labels or {}).get(contract.LABEL_TASKRUN_UID) == owner_uid:
            return existing
    return None


class Slots:
    def __init__(self, kube: Kube, namespace: str):
        self.kube = kube
        self.namespace = namespace
        # waiter name -> (resourceVersion, monotonic time this observer first saw it)
        self._seen: dict[str, tuple[str, float]] = {}

    def _list(self, selector: str) -> list[client.V1Lease]:
        return self.kube.leases.list_namespaced_lease(self.namespace, label_selector=selector).items

    def all(self) -> list[Slot]:
        sel = f"{contract.LABEL_MANAGED}={contract.MANAGED_VALUE},{contract.LABEL_ROLE}=slot"
        return [_slot_from_lease(lease) for lease in self._list(sel)]

    def on_host(self, host: str) -> list[Slot]:
        sel = f"{contract.LABEL_ROLE}=slot,{contract.LABEL_HOST}={host}"
        return [_slot_from_lease(lease) for lease in self._list(sel)]

    def held_by(self, uid: str) -> list[Slot]:
        sel = f"{contract.LABEL_ROLE}=slot,{contract.LABEL_TASKRUN_UID}={uid}"
        return [_slot_from_lease(lease) for lease in self._list(sel)]

    def try_take(self, host: Host, index: int, holder: Holder) -> Slot | None:
        """Create slot ``index`` of ``host`` for ``holder``; None if someone else holds it."""
        labels = holder.labels("slot") | {contract.LABEL_HOST: host.name}
        ann = (holder.annotations() | target_annotations(host)
               | {contract.ANN_ALLOCATED_AT: now().isoformat()})
        lease = take_first_free(self.kube, self.namespace, [contract.slot_name(host.name, index)],
                                lambda name: client.V1Lease(
                                    metadata=client.V1ObjectMeta(name=name, labels=labels,
                                                                 annotations=ann),
                                    spec=client.V1LeaseSpec(
                                        holder_identity=f"{holder.namespace}/{holder.name}"[:253],
                                        acquire_time=now())),
                                owner_uid=holder.uid)
        return None if lease is None else _slot_from_lease(lease)

    def _within_limit(self, host: Host, slot: Slot) -> bool:
        """After taking ``slot``: keep it only if ``host`` holds no more than its limit."""
        n = len(self.on_host(host.name))
        if n <= host.concurrency:
            return True
        log.event("host holds more slots than its limit; slot given back", host=host.name,
                  limit=host.concurrency, held=n, slot=slot.index)
        self.release(slot)
        return False

    def allocate(self, hosts: Iterable[Host], holder: Holder) -> Slot | None:
        """Take a slot on the least-utilised host with room, or None if all are full."""
        current = self.all()
        held = Counter(s.host for s in current)
        for h in sorted((h for h in hosts if not h.drain), key=lambda h: _load(h, held)):
            if held[h.name] >= h.concurrency:
                continue
            taken = {s.index for s in current if s.host == h.name}
            for i in range(h.concurrency):
                if i in taken:
                    continue
                slot = self.try_take(h, i, holder)
                if slot is None:
                    continue
                if self._within_limit(h, slot):
                    return slot
                break
        return None

    def free_count(self, hosts: Iterable[Host]) -> int:
        return sum(free_slots(hosts, self.all()).values())

    def release(self, slot: Slot) -> None:
        """Delete the slot's Lease, only if it is still the one this view was read from.

        A slot's name is reused: between reading a done build's slot and releasing it
        (the sweep removes the build's user over SSH first), that Lease may be freed and
        the name taken by another build. A plain delete by name then freed the new
        holder's slot: a second build got the host (over its limit) and the next sweep
        removed the first one's user under its running build. ``Kube.delete`` with the
        Lease's uid leaves a namesake taken since alone."""
        lease = kube_path("coordination.k8s.io", "v1", "leases", self.namespace, slot.lease_name)
        if not call(self.kube.delete, lease, uid=slot.lease_uid or None) and slot.lease_uid:
            log.event("slot released already (or taken again since); left as it is",
                      slot=slot.lease_name, uid=slot.lease_uid)

    def mark_unreachable(self, slot: Slot, since: str) -> None:
        """Record when the removed host of ``slot`` was first found unreachable."""
        body = {"metadata": {"annotations": {contract.ANN_UNREACHABLE_SINCE: since}}}
        try:
            self.kube.leases.patch_namespaced_lease(slot.lease_name, self.namespace, body)
        except client.ApiException as e:
            if e.status != 404:
                raise

    # --- the FIFO queue ---------------------------------------------------------
    def _waiters(self, platform: str | None = None) -> list[Waiter]:
        sel = f"{contract.LABEL_MANAGED}={contract.MANAGED_VALUE},{contract.LABEL_ROLE}=waiter"
        if platform is not None:
            sel += f",{contract.DOMAIN}/platform-key={platform_key(platform)}"
        return [_waiter(w) for w in self._list(sel)]

    def waiters(self) -> list[Waiter]:
        """Every waiter of every platform."""
        return self._waiters()

    def enqueue(self, holder: Holder, excluded: Iterable[str] = ()) -> None:
        name = contract.waiter_name(holder.uid)
        ann = holder.annotations() | {contract.ANN_EXCLUDED_HOSTS: ",".join(sorted(excluded))}
        lease = client.V1Lease(
            metadata=client.V1ObjectMeta(name=name, labels=holder.labels("waiter"),
                                         annotations=ann),
            spec=client.V1LeaseSpec(holder_identity=f"{holder.namespace}/{holder.name}"[:253],
                                    acquire_time=now(), renew_time=now(),
                                    lease_duration_seconds=WAITER_LEASE_SECONDS))
        try:
            self.kube.leases.create_namespaced_lease(self.namespace, lease)
        except client.ApiException as e:
            if e.status != 409:
                raise
            # queued already (an earlier attempt, or our own create retried): keep the
            # place, bring the exclusions up to date
            self.kube.leases.patch_namespaced_lease(name, self.namespace,
                                                    {"metadata": {"annotations": ann}})

    def renew(self, holder: Holder, excluded: Iterable[str] = ()) -> None:
        # renewTime is only a change marker: nobody compares it with a clock
        body = {"spec": {"renewTime": now().strftime("%Y-%m-%dT%H:%M:%S.%fZ")}}
        try:
            self.kube.leases.patch_namespaced_lease(contract.waiter_name(holder.uid),
                                                    self.namespace, body)
        except client.ApiException as e:
            if e.status == 404:
                self.enqueue(holder, excluded)   # swept while we were alive: at the back
            else:
                raise

    def dequeue(self, uid: str) -> None:
        self.delete_waiter(contract.waiter_name(uid))

    def delete_waiter(self, name: str, version: str | None = None) -> None:
        opts = client.V1DeleteOptions(preconditions=client.V1Preconditions(
            resource_version=version)) if version else None
        try:
            self.kube.leases.delete_namespaced_lease(name, self.namespace, body=opts)
        except client.ApiException as e:
            if e.status not in (404, 409):      # 409: renewed since we looked: alive
                raise

    def live(self, waiters: Iterable[Waiter], me: str = "") -> list[Waiter]:
        """The waiters this observer has seen change within their lease duration (and
        ``me``); the others are stale and deleted. Uses only this process's clock."""
        t = time.monotonic()
        out, names = [], set()
        for w in waiters:
            names.add(w.name)
            seen = self._seen.get(w.name)
            if seen is None or seen[0] != w.version:
                self._seen[w.name] = (w.version, t)
                out.append(w)
            elif w.name == me or t - seen[1] <= w.duration:
                out.append(w)
            else:
                log.event("waiter stale: no renewal seen; removed", waiter=w.name,
                          uid=w.holder.uid, unchanged_for=round(t - seen[1], 1))
                self.delete_waiter(w.name, w.version)
        for gone in set(self._seen) - names:
            del self._seen[gone]
        return fifo(out)

    def position(self, holder: Holder) -> int:
        """0-based place of ``holder`` among live waiters of its platform, oldest first."""
        me = contract.waiter_name(holder.uid)
        names = [w.name for w in self.live(self._waiters(holder.platform), me)]
        return names.index(me) if me in names else len(names)

    def acquire(self, hosts: list[Host], holder: Holder, deadline: float,
                poll: float = 0.5, on_wait=None, alive=None,
                excluded: Iterable[str] = ()) -> Slot | None:
        """Queue for and take a slot; None when ``deadline`` (monotonic) passes.

        ``hosts``: the platform's hosts; ``excluded``: names of those this build
        must not use (recorded on its waiter, so others' turns account for it).
        ``alive()`` is asked every few seconds while waiting; False raises Gone.
        """
        excluded = frozenset(excluded)
        me = contract.waiter_name(holder.uid)
        self.enqueue(holder, excluded)
        last_renew = last_alive = time.monotonic()
        waited = False
        try:
            while True:
                queue = self.live(self._waiters(holder.platform), me)
                names = [w.name for w in queue]
                if me not in names:           # removed by an observer that found us stale
                    self.enqueue(holder, excluded)
                    last_renew = time.monotonic()
                else:
                    turn = assign(hosts, self.all(), queue).get(me)
                    target = [h for h in hosts if h.name == turn and h.name not in excluded]
                    if target:
                        slot = self.allocate(target, holder)
                        if slot:
                            return slot
                if time.monotonic() >= deadline:
                    return None
                if not waited and on_wait:
                    on_wait(names.index(me) if me in names else len(names))
                waited = True
                time.sleep(poll)
                if alive and time.monotonic() - last_alive > ALIVE_CHECK_SECONDS:
                    last_alive = time.monotonic()
                    if not alive():
                        raise Gone(holder.uid)
                if time.monotonic() - last_renew > WAITER_LEASE_SECONDS / 3:
                    self.renew(holder, excluded)
                    last_renew = time.monotonic()
        finally:
            self.dequeue(holder.uid)
