"""Provisioning figures: latency per build, SSH round trips, slot allocation rate under a race.

Prints figures; asserts only correctness (no over-allocation), never time.
"""
from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections import Counter

import pytest
from kubernetes import config as kconfig

from mpc.runner import contract
from mpc.runner.deprovision import deprovision
from mpc.runner.hostpool import Host
from mpc.runner.kube import Kube
from mpc.runner.provision import Request, provision
from mpc.runner.slots import Holder, Slots
from tests.provisioning.conftest import make_taskrun

pytestmark = pytest.mark.bench


def pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def test_provisioning_latency_and_round_trips(controller, kube, namespace, make_host):
    h = make_host()
    controller.install_pool([h], concurrency=4)
    tk = Kube(kconfig.new_client_from_config(str(controller.kubeconfig), persist_config=False))
    step, inproc, trips = [], [], []
    for i in range(12):
        tr = make_taskrun(kube, namespace)
        t0 = time.monotonic()
        if i % 2 == 0:      # as Tekton runs it: a fresh process from the Task's script
            r = controller.provision(tr)
            assert r.results["outcome"] == "served"
            step.append(time.monotonic() - t0)
        else:               # the same code in-process: the cost without interpreter start-up
            out = provision(tk, Request(tr["metadata"]["name"], namespace, tr["metadata"]["uid"],
                                        "linux/arm64", controller.namespace))
            assert out.result == "served"
            inproc.append(time.monotonic() - t0)
            trips.append(out.round_trips)
        deprovision(tk, controller.namespace, namespace, tr["metadata"]["name"],
                    tr["metadata"]["uid"], provisioning_grace=0)
    print(f"\nprovision latency, step process: median {statistics.median(step):.3f}s "
          f"p95 {pct(step, .95):.3f}s (n={len(step)})")
    print(f"provision latency, in-process:   median {statistics.median(inproc):.3f}s "
          f"p95 {pct(inproc, .95):.3f}s (n={len(inproc)})")
    print(f"SSH connections per provision: {statistics.mean(trips):.1f} (one remote script)")


def test_slot_allocation_rate_with_200_racers(controller):
    tk = Kube(kconfig.new_client_from_config(str(controller.kubeconfig), persist_config=False))
    hosts = [Host(name=f"h{i}", address=f"10.0.0.{i}", user="admin", secret="k",
                  platform="linux/arm64", concurrency=5) for i in range(20)]
    capacity = sum(h.concurrency for h in hosts)
    slots = Slots(tk, controller.namespace)
    got: list = []
    lock = threading.Lock()
    start = threading.Event()

    def racer() -> None:
        holder = Holder("ns", f"b-{uuid.uuid4().hex[:8]}", str(uuid.uuid4()), "linux/arm64")
        start.wait()
        s = slots.allocate(hosts, holder)
        with lock:
            got.append(s)

    threads = [threading.Thread(target=racer) for _ in range(200)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    start.set()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    taken = [s for s in got if s]
    per_host = Counter(l.metadata.labels[contract.LABEL_HOST] for l in controller.leases("slot"))
    over = sum(max(0, n - 5) for n in per_host.values())
    print(f"\n200 racers for {capacity} slots: {len(taken)} allocated in {elapsed:.2f}s "
          f"= {len(taken) / elapsed:.1f} allocations/s; over-allocations: {over}")
    assert over == 0
    assert len(taken) == capacity == sum(per_host.values())
