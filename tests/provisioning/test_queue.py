"""The FIFO queue never trusts a pod's clock, and a waiter that cannot use a free host
does not hold it from younger waiters that can."""
from __future__ import annotations

import datetime as dt
import threading
import time

from kubernetes import client
from kubernetes import config as kconfig

from mpc.runner import contract
from mpc.runner.hostpool import Host
from mpc.runner.kube import Kube
from mpc.runner.slots import Holder, Slots

PLATFORM = "linux/arm64"


def tasks_kube(controller) -> Kube:
    return Kube(kconfig.new_client_from_config(str(controller.kubeconfig), persist_config=False))


def host(name: str) -> Host:
    return Host(name=name, address="192.0.2.1", user="mpcadmin", secret=f"admin-{name}",
                platform=PLATFORM, concurrency=1)


def holder(uid_prefix: str, n: int) -> Holder:
    # uids chosen so that Lease names sort in creation order (ties within a second)
    return Holder("builds", f"build-{uid_prefix}{n}",
                  f"{uid_prefix * 8}-0000-4000-8000-{n:012d}", PLATFORM)


def skewed_waiter(controller, h: Holder, skew: dt.timedelta, duration: int) -> client.V1Lease:
    """A waiter Lease as a pod whose clock is off by ``skew`` writes it."""
    t = dt.datetime.now(dt.timezone.utc) + skew
    lease = client.CoordinationV1Api(controller.kube).create_namespaced_lease(
        controller.namespace, client.V1Lease(
            metadata=client.V1ObjectMeta(name=contract.waiter_name(h.uid),
                                         labels=h.labels("waiter"), annotations=h.annotations()),
            spec=client.V1LeaseSpec(holder_identity=h.name, acquire_time=t, renew_time=t,
                                    lease_duration_seconds=duration)))
    time.sleep(1.1)     # so the next waiter's creationTimestamp (1 s resolution) is later
    return lease


def test_live_waiter_with_a_slow_clock_keeps_its_place(controller):
    """Its renewTime is an hour old by our clock, yet it renews: a younger build waits."""
    older, younger = holder("a", 1), holder("b", 2)
    skewed_waiter(controller, older, -dt.timedelta(hours=1), duration=30)
    leases = client.CoordinationV1Api(controller.kube)
    stop = threading.Event()

    def renew() -> None:                 # the older build's pod, its clock an hour behind
        while not stop.wait(0.5):
            t = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
            leases.patch_namespaced_lease(contract.waiter_name(older.uid), controller.namespace,
                                          {"spec": {"renewTime": t.strftime(
                                              "%Y-%m-%dT%H:%M:%S.%fZ")}})
    t = threading.Thread(target=renew)
    t.start()
    try:
        slots = Slots(tasks_kube(controller), controller.namespace)
        got = slots.acquire([host("h1")], younger, time.monotonic() + 5, poll=0.2)
    finally:
        stop.set()
        t.join()
    assert got is None, "a younger build jumped a live waiter because of its clock"
    assert contract.waiter_name(older.uid) in [l.metadata.name
                                              for l in controller.leases("waiter")]


def test_dead_waiter_with_a_fast_clock_is_passed_over(controller):
    """Its renewTime lies an hour ahead by our clock, but it never changes again."""
    dead, build = holder("a", 1), holder("b", 2)
    skewed_waiter(controller, dead, dt.timedelta(hours=1), duration=1)
    slots = Slots(tasks_kube(controller), controller.namespace)
    got = slots.acquire([host("h1")], build, time.monotonic() + 20, poll=0.2)
    assert got is not None and got.host == "h1"
    assert contract.waiter_name(dead.uid) not in [l.metadata.name
                                                 for l in controller.leases("waiter")]


def test_free_host_serves_the_oldest_waiter_that_can_use_it(controller):
    """The oldest waiter cannot use h1 (it failed for it) and waits for busy h2; a
    younger build takes free h1 instead of queueing behind it."""
    h1, h2 = host("h1"), host("h2")
    slots = Slots(tasks_kube(controller), controller.namespace)
    busy = slots.try_take(h2, 0, holder("c", 9))
    assert busy is not None
    older, younger = holder("a", 1), holder("b", 2)
    older_got: list = []
    started = threading.Event()

    def wait_older() -> None:
        mine = Slots(tasks_kube(controller), controller.namespace)
        older_got.append(mine.acquire([h1, h2], older, time.monotonic() + 30, poll=0.2,
                                      on_wait=lambda pos: started.set(), excluded={"h1"}))
    t = threading.Thread(target=wait_older)
    t.start()
    try:
        assert started.wait(30), "the older build never queued"
        got = slots.acquire([h1, h2], younger, time.monotonic() + 20, poll=0.2)
        assert got is not None and got.host == "h1"
        slots.release(busy)                     # h2 frees: the older build gets it
        t.join(60)
    finally:
        t.join(60)
    assert older_got and older_got[0] is not None and older_got[0].host == "h2"
