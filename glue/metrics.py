"""Prometheus metrics of the watcher (``/metrics``), and what they are computed from: the
watch cache (builds waiting/running, runs finished) and the dynamic hosts' Leases.

Platform label values come from TaskRun params, which users control: to keep
the number of series bounded, a value becomes a label only if the host pool
knows it (or, while the pool is unreadable, for the first few well-formed
values); everything else is counted as ``other``.
"""
from __future__ import annotations

import re
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                     HistogramMetricFamily)

from mpc.runner import contract as c
from mpc.runner import vms
from mpc.runner.kube import ApiError

from . import detect, objects

if TYPE_CHECKING:
    from .poolreader import PoolReader
    from .store import Run, Store

PREFIX = "mpc_glue"
_WELL_FORMED = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,30}(/[a-z0-9][a-z0-9_.-]{0,30})?$")
_MAX_UNKNOWN = 20


class PlatformLabels:
    def __init__(self) -> None:
        self._known: set[str] = set()
        self._extra: set[str] = set()
        self._lock = threading.Lock()

    def set_known(self, platforms: Iterable[str]) -> None:
        with self._lock:
            self._known = set(platforms)

    def __call__(self, platform: str | None) -> str:
        if not platform:
            return "unknown"
        with self._lock:
            if platform in self._known or platform in self._extra:
                return platform
            if _WELL_FORMED.match(platform) and len(self._extra) < _MAX_UNKNOWN:
                self._extra.add(platform)
                return platform
        return "other"


class _BuildGauges:
    """waiting/running builds per platform, computed at scrape time.

    A platform once seen is always reported, with 0 when it has no builds, so
    a gauge drops to zero instead of keeping its last value.
    """

    def __init__(self, snapshot: Callable[[], dict[str, tuple[int, int]]]):
        self.snapshot = snapshot
        self.seen: set[str] = set()

    def collect(self):
        waiting = GaugeMetricFamily(f"{PREFIX}_builds_waiting",
                                    "Build TaskRuns waiting for a host (provisioning not finished)",
                                    labels=["platform"])
        running = GaugeMetricFamily(f"{PREFIX}_builds_running",
                                    "Build TaskRuns provisioned and still running",
                                    labels=["platform"])
        snap = self.snapshot()
        self.seen |= set(snap)
        for p in sorted(self.seen):
            w, r = snap.get(p, (0, 0))
            waiting.add_metric([p], w)
            running.add_metric([p], r)
        yield waiting
        yield running

    def describe(self):
        return []


class _DynamicHosts:
    """Cloud VMs per dynamic platform, computed at scrape time from the watcher's cache
    (``mpc.runner.vms.summary``): the provisioning Tasks keep their counters in Leases,
    since a Task pod's own counters die with it."""

    COUNTERS = {"launches": "VMs launched", "launch_failures": "launches that failed",
                "warm_claims": "builds served by a warm VM",
                "quota_blocked": "builds that found the platform's VM quota exhausted",
                "orphans_terminated": "VMs the sweep terminated that no record held"}

    def __init__(self, summary: Callable[[], dict[str, dict]]):
        self.summary = summary

    def collect(self):
        p = f"{PREFIX}_dynamic"
        instances = GaugeMetricFamily(f"{p}_instances", "Cloud VMs by state",
                                      labels=["platform", "state"])
        builds = GaugeMetricFamily(f"{p}_builds", "Builds on cloud VMs", labels=["platform"])
        waiting = GaugeMetricFamily(f"{p}_waiting", "Builds waiting for a cloud VM",
                                    labels=["platform"])
        counters = {k: CounterMetricFamily(f"{p}_{k}", v, labels=["platform"])
                    for k, v in self.COUNTERS.items()}
        boot = HistogramMetricFamily(f"{p}_boot_seconds", "VM launch -> SSH answering",
                                     labels=["platform"])
        for platform, row in sorted(self.summary().items()):
            for state, n in row["instances"].items():
                instances.add_metric([platform, state], n)
            builds.add_metric([platform], row["builds"])
            waiting.add_metric([platform], row["waiting"])
            for k, fam in counters.items():
                fam.add_metric([platform], row[k])
            b = row["boot_seconds"]
            boot.add_metric([platform], [("+Inf" if le == float("inf") else str(le), n)
                                         for le, n in b["buckets"]], b["sum"])
        yield from (instances, builds, waiting, *counters.values(), boot)

    def describe(self):
        return []


class Metrics:
    def __init__(self, store: "Store", pool: "PoolReader", queue_depth: Callable[[], int]):
        self.store, self.pool = store, pool
        self.registry = r = CollectorRegistry()
        self.platform = PlatformLabels()
        self.counted: set[str] = set()  # finished runs already counted
        self.started_wall = time.time()
        self.runs_started = Counter(f"{PREFIX}_runs_started", "PipelineRuns started",
                                    ["role", "platform"], registry=r)
        self.runs_succeeded = Counter(f"{PREFIX}_runs_succeeded", "PipelineRuns that succeeded",
                                      ["role", "platform"], registry=r)
        self.runs_failed = Counter(f"{PREFIX}_runs_failed", "PipelineRuns that failed",
                                   ["role", "platform"], registry=r)
        self.provision_seconds = Histogram(
            f"{PREFIX}_provision_seconds",
            "Build TaskRun first seen -> provisioning run succeeded (its secret written)",
            ["platform"], registry=r,
            buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, float("inf")))
        self.errors = Counter(f"{PREFIX}_errors", "Errors by kind", ["kind"], registry=r)
        self.not_allowed = Counter(f"{PREFIX}_namespace_not_allowed",
                                   "Builds in namespaces the host pool does not allow",
                                   ["platform"], registry=r)
        self.queue_timeouts = Counter(f"{PREFIX}_queue_timeouts",
                                      "Builds that waited past the pool's maxWaitSeconds for "
                                      "a free host (they get an error secret)",
                                      ["platform"], registry=r)
        self.reconciles = Counter(f"{PREFIX}_reconciles", "Reconciles by outcome", ["outcome"],
                                  registry=r)
        self.predictions = Counter(f"{PREFIX}_builds_predicted", "Builds provisioned before "
                                   "their TaskRun existed, predicted from the PipelineRun "
                                   "(the pool's lookAhead)", ["platform"], registry=r)
        self.predictions_unused = Counter(f"{PREFIX}_builds_predicted_unused", "Predicted "
                                          "builds the PipelineRun did not create as builds "
                                          "(their host given back)", ["platform"], registry=r)
        self.runs_remade = Counter(f"{PREFIX}_runs_remade", "Runs Tekton could not resolve "
                                   "(bundle registry or API server unreachable), made again",
                                   ["role", "platform"], registry=r)
        self.runs_deleted = Counter(f"{PREFIX}_runs_garbage_collected",
                                    "Finished runs deleted by GC", ["role"], registry=r)
        self.sweeps = Counter(f"{PREFIX}_sweeps_started", "Sweep TaskRuns started", registry=r)
        self.watch_events = Counter(f"{PREFIX}_watch_events", "Watch events handled",
                                    ["resource"], registry=r)
        Gauge(f"{PREFIX}_queue_depth", "Keys waiting in the work queue",
              registry=r).set_function(queue_depth)
        r.register(_BuildGauges(self.snapshot))
        r.register(_DynamicHosts(self.dynamic))

    def run_finished(self, run: "Run", obj: dict) -> None:
        """Count a finished run once, and only if it finished while this process ran (a
        restart re-lists old runs; counters restart from 0 anyway)."""
        with self.store.lock:
            fresh = run.name not in self.counted
            self.counted.add(run.name)
            b = self.store.builds.get(run.build_uid)
            seen = b.first_seen if b else objects.parse_time(detect.meta(obj, "creationTimestamp"))
        if not fresh or (run.finished_at is not None and run.finished_at < self.started_wall - 1):
            return
        p = self.platform(run.platform)
        (self.runs_succeeded if run.succeeded else self.runs_failed).labels(run.role, p).inc()
        if run.succeeded and run.role == objects.ROLE_PROVISION and seen:
            self.provision_seconds.labels(p).observe(
                max(0.0, (run.finished_at or time.time()) - seen))

    def forget_run(self, name: str) -> None:
        with self.store.lock:
            self.counted.discard(name)

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """(waiting, running) builds per platform label, for the gauges."""
        out: dict[str, tuple[int, int]] = {}
        with self.store.lock:
            items = [(b.platform, self.store.runs.get(c.provision_run_name(b.uid)))
                     for b in self.store.builds.values() if b.ours and not b.finished]
        for platform, run in items:
            p = self.platform(platform)
            w, r = out.get(p, (0, 0))
            if run is not None and run.succeeded is True:
                r += 1
            elif run is None or run.succeeded is None:  # a failed provisioning is neither
                w += 1
            out[p] = (w, r)
        return out

    def dynamic(self) -> dict[str, dict]:
        """The dynamic platforms now (``vms.summary`` of the cached Leases)."""
        try:
            pool, _ = self.pool.get()
        except ApiError:
            pool = None             # every platform with a Lease is still reported
        with self.store.lock:
            leases = list(self.store.vm_leases.values())
        return vms.summary(leases, [d.platform for d in pool.dynamic] if pool else ())
