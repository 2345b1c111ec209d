"""Leader election on a coordination.k8s.io/v1 Lease, so the watcher can run as 2+ replicas.

Only the leader watches and writes; the others wait. The rules follow
client-go's leaderelection, in miniature:

- A Lease is free when it names no holder, or when its record (holder and
  renewTime) has not changed for ``leaseDurationSeconds`` *as observed by
  this process's own monotonic clock* since it last saw it change. Clocks of
  different machines are never compared.
- Taking and renewing are updates guarded by resourceVersion: two candidates
  racing for a free Lease cannot both win (the loser gets 409 and waits).
- The leader renews every ``retry_period``; if it cannot renew for
  ``renew_deadline`` (< lease duration) it stops leading at once (the caller
  exits, and the Deployment restarts it as a candidate), so two leaders
  never act at the same time for longer than the clocks' rate difference.
- On a clean stop the leader clears the holder, so a standby takes over in
  one retry period instead of a lease duration.

Every write the watcher makes is idempotent and keyed by the build's uid, so
even an overlap could not duplicate a run; election keeps the load and the
Events single.
"""
from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone

from mpc.runner.kube import ApiError, Kube

log = logging.getLogger("mpc.glue")


def _now_micro() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_path(namespace: str, name: str | None = None) -> str:
    p = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
    return f"{p}/{name}" if name else p


class LeaderElector:
    def __init__(self, kube: Kube, namespace: str, name: str, identity: str,
                 lease_duration: float = 10.0, renew_deadline: float = 7.0,
                 retry_period: float = 2.0):
        if not retry_period < renew_deadline < lease_duration:
            raise ValueError("need retry_period < renew_deadline < lease_duration")
        self.kube, self.ns, self.name, self.identity = kube, namespace, name, identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.leading = threading.Event()
        self.lost = threading.Event()
        self._observed: tuple | None = None   # (holder, renewTime) last seen
        self._observed_at = 0.0               # monotonic time it was seen to change

    # --- one attempt -------------------------------------------------------------------
    def _spec(self, transitions: int, acquired: str | None) -> dict:
        now = _now_micro()
        return {"holderIdentity": self.identity,
                "leaseDurationSeconds": max(1, int(round(self.lease_duration))),
                "acquireTime": acquired or now, "renewTime": now,
                "leaseTransitions": transitions}

    def try_acquire_or_renew(self) -> bool:
        """One step: True if we hold the Lease afterwards."""
        path = lease_path(self.ns, self.name)
        lease = self.kube.get(path)
        if lease is None:
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.ns},
                    "spec": self._spec(0, None)}
            return self.kube.create(lease_path(self.ns), body) is not None
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"))
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        ours = holder == self.identity
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
        if holder and not ours and time.monotonic() - self._observed_at < duration:
            return False                                   # someone else holds it
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if ours else 1)
        lease["spec"] = self._spec(transitions, spec.get("acquireTime") if ours else None)
        try:
            updated = self.kube.request("PUT", path, body=lease)   # guarded by resourceVersion
        except ApiError as e:
            if e.status == 409:
                return False
            raise
        spec = updated.get("spec") or {}
        self._observed, self._observed_at = (spec.get("holderIdentity"), spec.get("renewTime")), \
            time.monotonic()
        if not ours:
            log.info("became leader", extra={"fields": {
                "lease": f"{self.ns}/{self.name}", "identity": self.identity,
                "previous": holder or None, "transitions": transitions}})
        return True

    # --- loops ---------------------------------------------------------------------------
    def acquire(self, stop: threading.Event) -> bool:
        """Block until leading (True) or ``stop`` is set (False)."""
        log.info("waiting for leadership", extra={"fields": {
            "lease": f"{self.ns}/{self.name}", "identity": self.identity}})
        while not stop.is_set():
            try:
                if self.try_acquire_or_renew():
                    self.leading.set()
                    return True
            except ApiError as e:
                log.warning("leader election attempt failed", extra={"fields": {"error": str(e)}})
            stop.wait(self.retry_period)
        return False

    def renew_until_lost(self, stop: threading.Event) -> None:
        """Renew every retry period; on a renew deadline missed, set ``lost`` and return."""
        last_ok = time.monotonic()
        while not stop.wait(self.retry_period):
            try:
                if self.try_acquire_or_renew():
                    last_ok = time.monotonic()
                    continue
                why = "another holder took the lease"
            except ApiError as e:
                why = str(e)
                if time.monotonic() - last_ok < self.renew_deadline:
                    continue
            log.error("lost leadership; stopping", extra={"fields": {
                "lease": f"{self.ns}/{self.name}", "identity": self.identity, "why": why}})
            self.leading.clear()
            self.lost.set()
            return

    def release(self) -> None:
        """Clear the holder (best effort) so a standby takes over in one retry period."""
        if not self.leading.is_set():
            return
        path = lease_path(self.ns, self.name)
        try:
            lease = self.kube.get(path)
            if lease and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = ""
                lease["spec"]["leaseDurationSeconds"] = 1
                self.kube.request("PUT", path, body=lease)
        except ApiError as e:
            log.warning("could not release the lease", extra={"fields": {"error": str(e)}})
        self.leading.clear()
