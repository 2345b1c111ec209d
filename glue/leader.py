"""Leader election among the watcher's replicas: the official client's ``leaderelection``
on the Lease the deployment ships (``--leader-lease``).

Only the leader watches and writes; a standby serves its probes and waits. The
client's election takes and renews the Lease with updates guarded by
resourceVersion (two candidates cannot both win), treats it as free once its
record has not changed for ``leaseDurationSeconds`` since this process saw it
change, and calls back when renewing failed for ``renew_deadline``: the watcher
then exits (the Deployment restarts it as a candidate), so it never leads stale.
What this module adds: a clean stop hands the Lease back (holder cleared), so a
standby takes over in one retry period instead of a lease duration.

Every write the watcher makes is idempotent and keyed by the build's uid, so even
an overlap of two leaders could not duplicate a run; election keeps the load and
the Events single.
"""
from __future__ import annotations

import logging
import threading

from kubernetes import client
from kubernetes.client.rest import ApiException
from kubernetes.leaderelection import electionconfig, leaderelection
from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

from mpc.runner.kube import Kube

log = logging.getLogger("mpc.glue")


class _Lock(LeaseLock):
    """The client's Lease lock on our connection, refusing to renew once we hand it back.

    The client's lock turns only ``ApiException`` into a failed attempt; a refused or
    reset connection (an API server restarting) would end the election's thread with
    no callback, leaving a leader that no longer renews yet keeps working while a
    standby takes over. Here every failure is a failed attempt, which the election
    retries, and past the renew deadline stops leading.
    """

    def __init__(self, kube: Kube, name: str, namespace: str, identity: str):
        super().__init__(name, namespace, identity)
        self.api_instance = client.CoordinationV1Api(kube.api)
        self.released = False

    def get(self, name, namespace):
        try:
            return super().get(name, namespace)
        except Exception as e:      # noqa: BLE001 - transport failures, see above
            return False, ApiException(status=0, reason=f"{type(e).__name__}: {e}")

    def create(self, name, namespace, election_record):
        return self._attempt(super().create, name, namespace, election_record)

    def update(self, name, namespace, updated_record):
        return not self.released and self._attempt(super().update, name, namespace,
                                                   updated_record)

    @staticmethod
    def _attempt(fn, *args) -> bool:
        try:
            return fn(*args)
        except Exception as e:      # noqa: BLE001 - transport failures, see above
            log.warning("leader election request failed", extra={"fields": {"error": repr(e)}})
            return False


class Leader:
    def __init__(self, kube: Kube, namespace: str, name: str, identity: str,
                 lease_duration: float, renew_deadline: float, retry_period: float):
        self.lock = _Lock(kube, name, namespace, identity)
        self.leading, self.lost = threading.Event(), threading.Event()
        self.election = leaderelection.LeaderElection(electionconfig.Config(
            self.lock, max(1, round(lease_duration)), renew_deadline, retry_period,
            onstarted_leading=self._started, onstopped_leading=self._stopped))

    def _started(self) -> None:
        log.info("became leader", extra={"fields": {
            "lease": f"{self.lock.namespace}/{self.lock.name}", "identity": self.lock.identity}})
        self.leading.set()

    def _stopped(self) -> None:
        if not self.lock.released:
            log.error("lost leadership; stopping", extra={"fields": {
                "lease": f"{self.lock.namespace}/{self.lock.name}",
                "identity": self.lock.identity}})
        self.leading.clear()
        self.lost.set()

    def _run(self) -> None:
        try:
            self.election.run()
        except Exception:           # a bug of ours or the client's: never lead unrenewed
            log.exception("leader election failed; stopping")
            self._stopped()

    def acquire(self, stop: threading.Event) -> bool:
        """Block until leading (True), or ``stop`` is set or the election failed (False);
        once leading, it renews in the background until ``lost`` is set."""
        log.info("waiting for leadership", extra={"fields": {
            "lease": f"{self.lock.namespace}/{self.lock.name}", "identity": self.lock.identity}})
        threading.Thread(target=self._run, name="leader", daemon=True).start()
        while not self.leading.wait(0.5):
            if stop.is_set() or self.lost.is_set():
                self.lock.released = True
                return False
        return True

    def release(self) -> None:
        """Clear the holder (best effort) so a standby takes over in one retry period."""
        self.lock.released = True
        if not self.leading.is_set():
            return
        api = self.lock.api_instance
        for _ in range(2):      # a renew in flight as we stopped may win once: read again
            try:
                lease = api.read_namespaced_lease(self.lock.name, self.lock.namespace)
                if (lease.spec.holder_identity or "") != self.lock.identity:
                    return
                lease.spec.holder_identity, lease.spec.lease_duration_seconds = None, 1
                api.replace_namespaced_lease(self.lock.name, self.lock.namespace, lease)
                return
            except ApiException as e:
                if e.status != 409:
                    log.warning("could not release the lease", extra={"fields": {
                        "error": str(e)}})
                    return
