"""The store's admission index (waiting / in-flight builds per platform) always says what
a full scan of the cache says, whatever order builds, runs and slots come and go in; and
``admission.decide`` on it gives the verdict and place in line a full scan gives.

Pure: no API server. The oracle is the definition written out as a scan of every cached
build (what decide did before the index)."""
from __future__ import annotations

import random
import uuid

import pytest

from mpc.glue import admission, objects
from mpc.glue.store import Store
from mpc.runner import contract as c
from mpc.runner import hostpool

PLATFORMS = ("linux/arm64", "linux/s390x")


def scan(store: Store, platform: str) -> tuple[set, set]:
    """The definition: every cached build looked at."""
    holders = {s.holder_uid for s in store.slots.values()}
    waiting, in_flight = set(), set()
    for b in store.builds.values():
        if b.platform != platform or not b.ours or b.finished:
            continue
        run = store.runs.get(b.provision_run)
        if run is None:
            if b.failed_run not in store.runs:
                waiting.add(b.uid)
        elif run.succeeded is None and b.uid not in holders:
            in_flight.add(b.uid)
    return waiting, in_flight


def scan_decide(pool, store: Store, uid: str) -> tuple[str, int]:
    b = store.build(uid)
    free = admission.free_slots(pool, b.platform, store)
    waiting, in_flight = scan(store, b.platform)
    position = sum(1 for o in waiting if (store.builds[o].created, o) < (b.created, uid))
    return (admission.ADMIT if position < free - len(in_flight) else "not now"), position


def taskrun(uid, i, platform, ours=True, done=False, deleting=False, rv=1):
    md = {"uid": uid, "name": f"b{i}", "namespace": "ns", "resourceVersion": str(rv),
          "creationTimestamp": f"2026-12-02T10:{i // 60 % 60:02d}:{i % 60:02d}Z",
          "finalizers": [c.FINALIZER] if ours else []}
    if deleting:
        md["deletionTimestamp"] = "2026-12-02T11:00:00Z"
    tr = {"metadata": md, "spec": {"params": [{"name": "PLATFORM", "value": platform}]}}
    if done:
        tr["status"] = {"conditions": [{"type": "Succeeded", "status": "True"}]}
    return tr


def run(name, build_uid, role, succeeded=None, rv=1):
    r = {"metadata": {"name": name, "uid": f"u-{name}-{rv}", "resourceVersion": str(rv),
                      "labels": c.build_labels(role, build_uid, "ns")}}
    if succeeded is not None:
        r["status"] = {"conditions": [{"type": "Succeeded",
                                       "status": "True" if succeeded else "False"}]}
    return r


def lease(name, holder):
    return {"metadata": {"name": name, "labels": {c.LABEL_HOST: "h0",
                                                  c.LABEL_TASKRUN_UID: holder}}}


@pytest.mark.parametrize("seed", range(20))
def test_index_matches_a_full_scan_under_random_changes(seed):
    rnd = random.Random(seed)
    store = Store(objects.ANN_CANCEL_REQUESTED)
    pool = hostpool.from_document({"hosts": [
        {"name": f"h{i}", "address": "10.0.0.1", "platform": p, "user": "u",
         "concurrency": 3, "secret": "s"} for i, p in enumerate(PLATFORMS)]})
    uids = [str(uuid.UUID(int=rnd.getrandbits(128))) for _ in range(40)]
    rv = 1
    for step in range(600):
        rv += 1
        i = rnd.randrange(len(uids))
        uid = uids[i]
        op = rnd.random()
        if op < 0.30:
            store.put_taskrun(taskrun(uid, i, PLATFORMS[i % 2], ours=rnd.random() < 0.8,
                                      done=rnd.random() < 0.15, deleting=rnd.random() < 0.05,
                                      rv=rv), PLATFORMS[i % 2], 0.0)
        elif op < 0.50:
            role, name = rnd.choice([(objects.ROLE_PROVISION, c.provision_run_name(uid)),
                                     (objects.ROLE_PROVISION_FAILED,
                                      c.provision_failed_run_name(uid))])
            store.put_run(run(name, uid, role, rnd.choice([None, None, True, False]), rv))
        elif op < 0.60:
            store.drop_run(rnd.choice([c.provision_run_name(uid),
                                       c.provision_failed_run_name(uid)]))
        elif op < 0.72:
            store.put_slot(lease(f"slot-{rnd.randrange(8)}", uid))
        elif op < 0.80:
            store.drop_slot(f"slot-{rnd.randrange(8)}")
        elif op < 0.85:
            store.mark_gone(uid)
        elif op < 0.92:
            store.forget(uid)
        with store.lock:
            for p in PLATFORMS:
                waiting, in_flight = store.admission.sets(p)
                assert (set(waiting), set(in_flight)) == scan(store, p), f"step {step}"
        for u in uids:
            b = store.build(u)
            if b is not None and u in scan(store, b.platform or "")[0]:
                d = admission.decide(pool, store, u, 0.0)
                verdict, position = scan_decide(pool, store, u)
                assert (d.verdict == admission.ADMIT) == (verdict == admission.ADMIT), f"step {step}"
                if d.verdict != admission.ADMIT:
                    assert d.position == position


def test_a_burst_admits_without_scanning_and_keeps_fifo_when_full():
    store = Store(objects.ANN_CANCEL_REQUESTED)
    pool = hostpool.from_document({"hosts": [
        {"name": "h0", "address": "10.0.0.1", "platform": PLATFORMS[0], "user": "u",
         "concurrency": 2, "secret": "s"}]})
    uids = [f"00000000-0000-0000-0000-{i:012d}" for i in range(5)]
    for i, u in enumerate(uids):
        store.put_taskrun(taskrun(u, i, PLATFORMS[0]), PLATFORMS[0], 0.0)
    with store.lock:
        assert store.admission.sets(PLATFORMS[0])[0] == set(uids)
    # two slots, five waiting: the two oldest may go, the others learn their place
    verdicts = [admission.decide(pool, store, u, 0.0) for u in uids]
    assert [d.verdict for d in verdicts[:2]] == [admission.ADMIT] * 2
    assert [(d.verdict, d.position) for d in verdicts[2:]] == [
        (admission.WAIT, 2), (admission.WAIT, 3), (admission.WAIT, 4)]
    # the oldest two got their runs (in flight, no slot yet): nobody else fits
    for u in uids[:2]:
        store.put_run(run(c.provision_run_name(u), u, objects.ROLE_PROVISION))
    with store.lock:
        assert store.admission.sets(PLATFORMS[0]) == (set(uids[2:]), set(uids[:2]))
    assert admission.decide(pool, store, uids[2], 0.0).verdict == admission.WAIT
    # one finished and gave its slot back (its run succeeded): the next oldest goes
    store.put_run(run(c.provision_run_name(uids[0]), uids[0], objects.ROLE_PROVISION, True, 2))
    store.put_taskrun(taskrun(uids[0], 0, PLATFORMS[0], done=True, rv=2), PLATFORMS[0], 0.0)
    assert admission.decide(pool, store, uids[2], 0.0).verdict == admission.ADMIT
    assert admission.decide(pool, store, uids[3], 0.0).verdict == admission.WAIT
