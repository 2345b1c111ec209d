"""What the glue watcher costs the API server, counted by the API server itself
(``apiserver_request_total`` before and after; issue 14 goal 2, issue 11 item 7).

* Requests per build by verb for happy-path builds, the test playing Tekton as
  tests/glue does (finishing runs through /status), phase by phase.
* 1,000 builds queued behind one busy slot: requests per second while they wait,
  then the freed slot goes to the oldest waiter.

The test's own requests are counted on its side and taken out of the server's
figures; a quiet window with the watcher idle gives the background (the API
server's and controller-manager's own requests), printed alongside. Prints
figures; asserts behaviour only.
"""
from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager

import pytest
from kubernetes import client

from mpc.runner import contract as c
from mpc.runner.kube import Kube as RunnerKube
from mpc.runner.slots import Holder, Slots
from tests.glue.support import Tekton, Watcher, build_taskrun
from tests.infra.procs import wait_for

from .glue_support import (PLATFORM, READS, CountingClient, by_verb, create_many, describe,
                           detail, event_reasons, host_pool, minus, new_namespace, proc_stats,
                           provision_runs_by_build, release, scrape,
                           watchers_share)

BUILDS = 10
QUEUED = 1000
WINDOW = 60.0       # seconds: two of the watcher's 30 s rechecks of a waiting build


class Meter:
    """Requests the API server served, minus the ones this test sent itself."""

    def __init__(self, admin: client.ApiClient, driver: CountingClient):
        self.admin, self.driver = admin, driver
        self.seconds = 0.0

    def take(self) -> tuple[Counter, Counter, float]:
        # the test's own count first: the scrape itself is a non-resource GET (not counted)
        return Counter(self.driver.sent), scrape(self.admin), time.monotonic()

    def since(self, mark) -> tuple[Counter, float]:
        sent0, server0, t0 = mark
        sent1, server1, t1 = self.take()
        return minus(minus(server1, server0), minus(sent1, sent0)), t1 - t0

    @contextmanager
    def into(self, counts: Counter):
        """Add the requests made while the block runs to ``counts``."""
        mark = self.take()
        yield
        d, s = self.since(mark)
        counts.update(d)
        self.seconds += s


def _reasons(kube, ns, uid) -> set[str]:
    return {r for (u, r) in event_reasons(kube, ns) if u == uid}


@pytest.mark.bench
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("tekton_first", [False, True], ids=["as-tests-glue", "tekton-first"])
def test_requests_per_build(cluster, kube, workdir, tekton_first):
    """as-tests-glue: the build is left alone until it has its provisioning run.
    tekton-first: the build is marked Running right after it is created, as Tekton's own
    status write does within milliseconds, racing the watcher's finalizer patch."""
    ns, ctrl = new_namespace(kube), new_namespace(kube)
    host_pool(kube, ctrl, hosts=1, concurrency=10)
    driver = CountingClient(cluster.api_client())
    tekton, meter = Tekton(driver.api), Meter(kube, driver)
    w = Watcher(cluster.kubeconfig, ctrl, [], workdir, "--log-level", "info").start().wait_ready()
    phases = {p: Counter() for p in ("created -> provisioning run and its Event",
                                     "provisioning run succeeded -> Provisioned Event",
                                     "build finished -> released (deprovisioning run, "
                                     "finalizer off, provisioning run deleted)",
                                     "deprovisioning run of the released build succeeded")}
    names = list(phases)
    try:
        time.sleep(3)
        quiet = meter.take()
        time.sleep(20)
        background, quiet_s = meter.since(quiet)
        for i in range(BUILDS):
            name = f"b-{i}"
            with meter.into(phases[names[0]]):
                tr = tekton.create_tr(ns, build_taskrun(name, platform=PLATFORM))
                uid = tr["metadata"]["uid"]
                if tekton_first:
                    tekton.running(ns, name)
                prov, deprov = c.provision_run_name(uid), c.deprovision_run_name(uid)
                wait_for("provisioning run", lambda: tekton.get_pr(ctrl, prov), timeout=30,
                         log=w.log)
                wait_for("ProvisioningStarted", lambda: "ProvisioningStarted" in _reasons(
                    driver.api, ns, uid), timeout=30, log=w.log)
            with meter.into(phases[names[1]]):
                tekton.finish_pr(ctrl, prov, ok=True)
                wait_for("Provisioned", lambda: "Provisioned" in _reasons(driver.api, ns, uid),
                         timeout=30, log=w.log)
            with meter.into(phases[names[2]]):
                if not tekton_first:
                    tekton.running(ns, name)
                tekton.finish_tr(ns, name, ok=True)
                wait_for("released", lambda: not (tekton.get_tr(ns, name)["metadata"].get(
                    "finalizers")) and tekton.get_pr(ctrl, deprov) is not None
                    and tekton.get_pr(ctrl, prov) is None, timeout=30, log=w.log)
            with meter.into(phases[names[3]]):
                tekton.finish_pr(ctrl, deprov, ok=True)
                wait_for("deprovisioning run deleted",
                         lambda: tekton.get_pr(ctrl, deprov) is None, timeout=30, log=w.log)
                time.sleep(1)       # anything the finished run still triggers happens now
        raw = sum(phases.values(), Counter())
        phases = {p: watchers_share(n) for p, n in phases.items()}
        total = sum(phases.values(), Counter())
        print(f"\n[glue bench: API requests per build, from apiserver_request_total; "
              f"{BUILDS} happy-path builds one after another, a pool of one host; "
              f"{'Tekton marks each build Running at once' if tekton_first else 'as tests/glue'}"
              f"]\n"
              f"  background (no builds; API server + controller-manager, the watcher idle): "
              f"{describe(background, quiet_s)} per second\n"
              f"    {detail(background, quiet_s)}\n"
              f"  per build, everything the API server served but the test's own requests "
              f"(~{meter.seconds / BUILDS:.1f}s of background per build): {describe(raw, BUILDS)}\n"
              f"  per build, the watcher's share (background left out, see watchers_share): "
              f"{describe(total, BUILDS)}")
        for p, counts in phases.items():
            print(f"    {p}: {describe(counts, BUILDS)}\n      {detail(counts, BUILDS)}")
        reads = sum(by_verb(phases[names[3]])[v] for v in READS)
        print(f"  finished deprovisioning run of a released build: {reads / BUILDS:.2f} reads")
        # At most one GET per build, none for a released build's finished run. (LISTs are
        # left out: the controller-manager's informers re-list Tekton resources now and
        # then, which watchers_share cannot always tell from a re-list of the watcher's.)
        assert by_verb(total)["GET"] <= BUILDS
        assert by_verb(phases[names[3]])["GET"] == 0
    finally:
        w.stop()
        release(kube, ns, wait=True)


@pytest.mark.bench
@pytest.mark.timeout(1800)
def test_1000_queued_builds_cost_o1_requests(cluster, kube, workdir):
    """One host of concurrency 1 whose slot is taken: 1,000 builds wait in the watcher.
    While they wait, the API server sees a constant handful of requests per second, not
    one per waiter; a freed slot goes to the oldest waiter."""
    ns, ctrl = new_namespace(kube), new_namespace(kube)
    pool = host_pool(kube, ctrl, hosts=1, concurrency=1)
    slots = Slots(RunnerKube(kube), ctrl)
    slot = slots.try_take(pool.host("h0"), 0, Holder(ns, "someone-else", "0000-held", PLATFORM))
    assert slot is not None
    driver = CountingClient(cluster.api_client())
    meter = Meter(kube, driver)
    w = Watcher(cluster.kubeconfig, ctrl, [], workdir, "--log-level", "warning").start()
    w.wait_ready()
    try:
        time.sleep(3)
        quiet = meter.take()
        time.sleep(WINDOW / 2)
        background, quiet_s = meter.since(quiet)
        create_many(driver.api, ns, [build_taskrun(f"q-{i:04d}", platform=PLATFORM)
                                     for i in range(QUEUED)])
        wait_for("every build queued", lambda: sum(
            1 for (_, r) in event_reasons(driver.api, ns) if r == "Queued") >= QUEUED,
            timeout=600, interval=5, log=w.log)
        time.sleep(5)
        m = meter.take()
        _, cpu0 = proc_stats(w.proc.pid)
        time.sleep(WINDOW)
        served, window_s = meter.since(m)
        queued = watchers_share(served)
        rss, cpu1 = proc_stats(w.proc.pid)
        waiting = w.metric("mpc_glue_builds_waiting", platform=PLATFORM)
        print(f"\n[glue bench: {QUEUED} builds queued behind one busy slot (issue 11 item 7)]\n"
              f"  background, before any build: {describe(background, quiet_s)} per second\n"
              f"    {detail(background, quiet_s)}\n"
              f"  while {waiting:.0f} builds wait ({window_s:.0f}s window), the API server "
              f"served {sum(served.values()) / window_s:.2f} requests/s: "
              f"{describe(served, window_s)} per second\n"
              f"    {detail(served, window_s)}\n"
              f"    of which the watcher's share: {sum(queued.values()) / window_s:.2f} requests/s"
              f" ({detail(queued, window_s)})\n"
              f"  watcher CPU while they wait: {(cpu1 - cpu0) / window_s:.3f} s/s; "
              f"peak RSS {rss:.1f} MiB")
        assert waiting == QUEUED
        assert not provision_runs_by_build(kube, ctrl)
        # the slot is freed: the oldest waiter (creationTimestamp, then uid) gets it, only it
        trs = client.CustomObjectsApi(kube).list_namespaced_custom_object(
            "tekton.dev", "v1", ns, "taskruns")["items"]
        oldest = min((t["metadata"]["creationTimestamp"], t["metadata"]["uid"]) for t in trs)[1]
        t0 = time.monotonic()
        slots.release(slot)
        wait_for("a waiter admitted", lambda: provision_runs_by_build(kube, ctrl), timeout=60,
                 interval=0.2, log=w.log)
        admitted_in = time.monotonic() - t0
        time.sleep(5)
        runs = provision_runs_by_build(kube, ctrl)
        print(f"  slot freed: {len(runs)} build admitted (~{admitted_in:.1f}s), the oldest "
              f"waiter: {list(runs) == [oldest]}")
        assert list(runs) == [oldest]
    finally:
        w.stop()
        release(kube, ns, wait=True)
