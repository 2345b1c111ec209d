"""Deleting mpc's finished runs, and starting the periodic sweep.

Runs come from the watch cache: successful ones go at once, failed ones after
--retention (so their logs can be read), and never a run whose build still
holds our finalizer (its existence is the record that provisioning started).
"""
from __future__ import annotations

import logging
import time

from mpc.runner import kube as k
from mpc.runner.kube import Kube

from . import objects
from .config import Config
from .metrics import Metrics
from .reconcile import Reconciler
from .store import Store

log = logging.getLogger("mpc.glue")


def collect_garbage(store: Store, rec: Reconciler, retention: float) -> None:
    now = time.time()
    with store.lock:
        runs = list(store.runs.values())
    for run in runs:
        if run.succeeded is None:
            continue
        if not run.succeeded and (run.finished_at is not None
                                  and now - run.finished_at < retention):
            continue
        if rec.holds_us(run.build_uid):
            continue
        rec.delete_run(run, "succeeded" if run.succeeded else "retention expired")


def start_sweep(kube: Kube, cfg: Config, metrics: Metrics, store: Store) -> None:
    """One sweep TaskRun per interval bucket: restarts and standbys never double it. None
    while one still runs: with an interval shorter than a sweep takes (a loaded node, a short
    --sweep-interval) they piled up, each pod adding to the load that slowed them."""
    with store.lock:
        running = [r.name for r in store.runs.values()
                   if r.role == objects.ROLE_SWEEP and r.succeeded is None]
    if running:
        log.info("sweep still running; none started", extra={"fields": {"running": running}})
        return
    bucket = int(time.time() // cfg.sweep_interval)
    created = kube.create(k.taskruns(cfg.namespace), objects.sweep_run(
        cfg.namespace, cfg.tasks_service_account, bucket, bundle=cfg.sweep_bundle))
    if created is not None:
        store.put_run(created)           # running now, whenever the watch says so
        metrics.sweeps.inc()
        log.info("sweep started", extra={"fields": {"run": objects.sweep_run_name(bucket)}})
