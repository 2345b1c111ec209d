"""Prometheus metrics of the watcher (``/metrics``).

Platform label values come from TaskRun params, which users control: to keep
the number of series bounded, a value becomes a label only if the host pool
knows it (or, while the pool is unreadable, for the first few well-formed
values); everything else is counted as ``other``.
"""
from __future__ import annotations

import re
import threading
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                     HistogramMetricFamily)

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
    def __init__(self, snapshot: Callable[[], dict[str, tuple[int, int]]],
                 queue_depth: Callable[[], int],
                 dynamic: Callable[[], dict[str, dict]] = dict):
        self.registry = r = CollectorRegistry()
        self.platform = PlatformLabels()
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
        r.register(_BuildGauges(snapshot))
        r.register(_DynamicHosts(dynamic))
