"""Admission's CPU on a full platform (issue 14 goal 2): one round of decisions for every
waiting build (the watcher re-decides each waiter every 30 s), with the store's admission
index, next to the same decisions made by a full scan of the cache (what ``admission.decide``
did before the index), measured in the same run. In one process, no API server."""
from __future__ import annotations

import time
import uuid

import pytest

from mpc.glue import admission, objects
from mpc.glue.store import Store
from mpc.runner import contract as c
from mpc.runner import hostpool
from tests.glue.test_admission_index import scan_decide

SAMPLE = 100        # the full scan is timed on this many decisions and scaled up


def full_platform(n: int) -> tuple:
    pool = hostpool.from_document({"hosts": [
        {"name": "h0", "address": "192.0.2.1", "platform": "linux/arm64", "user": "u",
         "concurrency": 1, "secret": "s"}]})
    store = Store(objects.ANN_CANCEL_REQUESTED)
    store.put_slot({"metadata": {"name": "slot", "labels": {
        c.LABEL_HOST: "h0", c.LABEL_TASKRUN_UID: "holder"}}})
    uids = []
    for i in range(n):
        uid = str(uuid.uuid4())
        store.put_taskrun({"metadata": {
            "uid": uid, "name": f"b{i}", "namespace": "ns", "resourceVersion": str(i + 1),
            "creationTimestamp": f"2026-12-02T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:"
                                 f"{i % 60:02d}Z", "finalizers": [c.FINALIZER]}},
            "linux/arm64", 0.0)
        uids.append(uid)
    return pool, store, uids


@pytest.mark.bench
@pytest.mark.parametrize("waiting", [1000, 10000])
def test_a_round_of_decisions_on_a_full_platform(waiting):
    pool, store, uids = full_platform(waiting)
    t = time.process_time()
    places = [admission.decide(pool, store, u, 0.0) for u in uids]
    index = time.process_time() - t
    t = time.process_time()
    for u in uids[:SAMPLE]:
        scan_decide(pool, store, u)
    scan = (time.process_time() - t) * waiting / SAMPLE
    print(f"\n[glue bench: admission, {waiting} builds waiting on a full platform] one round "
          f"of decisions: {index:.3f} s CPU with the index; a full scan per decision "
          f"{scan:.2f} s CPU (timed on {SAMPLE}, scaled), {scan / index:.0f}x")
    assert all(d.verdict == admission.WAIT for d in places)
    assert sorted(d.position for d in places) == list(range(waiting))
