"""Benchmark of the glue watcher: a burst of 1,000 build TaskRuns, with and without
10,000 unrelated TaskRuns in the cluster. Prints figures; asserts no times."""
from __future__ import annotations

import json
import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from kubernetes import client

from mpc.runner import contract as c
from tests.glue.support import Watcher, build_taskrun
from tests.infra.procs import wait_for

BUILDS = 1000
UNRELATED = 10000
SCRIPT = "#!/bin/sh\nset -eu\n" + "echo 'some build step that does real work here'\n" * 25


def unrelated_taskrun(name: str) -> dict:
    return {"apiVersion": "tekton.dev/v1", "kind": "TaskRun",
            "metadata": {"name": name, "labels": {"app": "unrelated", "tekton.dev/task": "lint"}},
            "spec": {"params": [{"name": "PLATFORM", "value": "linux/amd64"}],
                     "taskSpec": {"params": [{"name": "PLATFORM", "type": "string"}],
                                  "steps": [{"name": f"s{i}", "image": "busybox", "script": SCRIPT}
                                            for i in range(3)]}}}


def proc_stats(pid: int) -> tuple[float, float]:
    """(peak RSS MiB, CPU seconds) of a live process."""
    hwm = next(int(ln.split()[1]) for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
               if ln.startswith("VmHWM:"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    import os
    tick = os.sysconf("SC_CLK_TCK")
    return hwm / 1024, (int(fields[11]) + int(fields[12])) / tick


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def create_many(kube, ns, bodies, workers=16) -> dict[str, float]:
    co = client.CustomObjectsApi(kube)
    done: dict[str, float] = {}

    def one(body):
        tr = co.create_namespaced_custom_object("tekton.dev", "v1", ns, "taskruns", body)
        done[tr["metadata"]["uid"]] = time.monotonic()
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(one, bodies))
    return done


def watch_provision_runs(cluster, ctrl_ns, seen: dict, stop: threading.Event) -> threading.Thread:
    """Record when each provisioning PipelineRun appears (a watch of our own)."""
    api = cluster.api_client()

    def stream():
        co = client.CustomObjectsApi(api)
        rv = co.list_namespaced_custom_object("tekton.dev", "v1", ctrl_ns, "pipelineruns")[
            "metadata"]["resourceVersion"]
        while not stop.is_set():
            resp = co.list_namespaced_custom_object(
                "tekton.dev", "v1", ctrl_ns, "pipelineruns", watch=True, resource_version=rv,
                timeout_seconds=5, allow_watch_bookmarks=True, _preload_content=False)
            buf = b""
            for chunk in resp.stream(65536):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    ev = json.loads(line)
                    md = ev["object"].get("metadata", {})
                    rv = md.get("resourceVersion", rv)
                    uid = (md.get("labels") or {}).get(c.LABEL_TASKRUN_UID)
                    if ev["type"] == "ADDED" and uid and uid not in seen:
                        seen[uid] = time.monotonic()
    t = threading.Thread(target=stream, daemon=True)
    t.start()
    return t


def burst(cluster, kube, ns, ctrl_ns, w: Watcher, label: str) -> None:
    seen: dict[str, float] = {}
    stop = threading.Event()
    watch_provision_runs(cluster, ctrl_ns, seen, stop)
    time.sleep(1)
    rss0, cpu0 = proc_stats(w.proc.pid)
    t0 = time.monotonic()
    created = create_many(kube, ns, [build_taskrun(f"b-{i:04d}") for i in range(BUILDS)])
    t_created = time.monotonic()
    wait_for("every build provisioned", lambda: len(seen) >= BUILDS, timeout=1200,
             interval=0.5, log=w.log)
    t1 = time.monotonic()
    stop.set()
    rss, cpu = proc_stats(w.proc.pid)
    lat = [seen[u] - created[u] for u in created if u in seen]
    runs = client.CustomObjectsApi(kube).list_namespaced_custom_object(
        "tekton.dev", "v1", ctrl_ns, "pipelineruns")["items"]
    mine = [r for r in runs if r["metadata"]["labels"].get(c.LABEL_TASKRUN_UID) in created]
    dups = len(mine) - len({r["metadata"]["labels"][c.LABEL_TASKRUN_UID] for r in mine})
    print(f"\n[glue bench: {label}]\n"
          f"  builds: {BUILDS}, created in {t_created - t0:.1f}s "
          f"({BUILDS / (t_created - t0):.0f}/s by the test client)\n"
          f"  reaction latency TaskRun created -> provisioning PipelineRun created: "
          f"p50 {statistics.median(lat) * 1000:.0f} ms, p99 {pct(lat, 99) * 1000:.0f} ms, "
          f"max {max(lat) * 1000:.0f} ms\n"
          f"  throughput: {BUILDS / (t1 - t0):.0f} builds/s end to end "
          f"(burst start -> last provisioning run)\n"
          f"  watcher peak RSS: {rss:.1f} MiB (before burst {rss0:.1f} MiB); "
          f"CPU: {cpu - cpu0:.1f} s for the burst, {cpu:.1f} s total\n"
          f"  extra provisioning runs beyond one per build: {dups}")
    assert dups == 0 and len(lat) == BUILDS


def release(kube, ns) -> None:
    """Drop the builds (and our finalizer) so a later watcher does not inherit them."""
    co = client.CustomObjectsApi(kube)
    for tr in co.list_namespaced_custom_object("tekton.dev", "v1", ns, "taskruns")["items"]:
        if tr["metadata"].get("finalizers"):
            co.patch_namespaced_custom_object("tekton.dev", "v1", ns, "taskruns",
                                              tr["metadata"]["name"],
                                              {"metadata": {"finalizers": None}})
    client.CoreV1Api(kube).delete_namespace(ns)


def _ns(kube) -> str:
    name = f"bench-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(kube).create_namespace(client.V1Namespace(
        metadata=client.V1ObjectMeta(name=name)))
    return name


@pytest.mark.bench
@pytest.mark.timeout(3600)
def test_burst_of_builds(cluster, kube, workdir):
    ns, ctrl = _ns(kube), _ns(kube)
    w = Watcher(cluster.kubeconfig, ctrl, [], workdir, "--log-level", "warning",
                "--workers", "8", "--gc-interval", "60s").start().wait_ready()
    try:
        burst(cluster, kube, ns, ctrl, w, "1,000 builds, empty cluster")
    finally:
        w.stop()
        release(kube, ns)


@pytest.mark.bench
@pytest.mark.timeout(3600)
def test_burst_of_builds_among_10000_unrelated(cluster, kube, workdir):
    ns, ctrl, other = _ns(kube), _ns(kube), _ns(kube)
    t0 = time.monotonic()
    create_many(kube, other, [unrelated_taskrun(f"u-{i:05d}") for i in range(UNRELATED)])
    print(f"\n  created {UNRELATED} unrelated TaskRuns in {time.monotonic() - t0:.0f}s")
    w = Watcher(cluster.kubeconfig, ctrl, [], workdir, "--log-level", "warning",
                "--workers", "8", "--gc-interval", "60s").start()
    t1 = time.monotonic()
    w.wait_ready(timeout=600)
    rss, cpu = proc_stats(w.proc.pid)
    print(f"  watcher start-up LIST of {UNRELATED}+ TaskRuns: ready in "
          f"{time.monotonic() - t1:.1f}s, peak RSS {rss:.1f} MiB, CPU {cpu:.1f} s")
    try:
        burst(cluster, kube, ns, ctrl, w, "1,000 builds among 10,000 unrelated TaskRuns")
    finally:
        w.stop()
        release(kube, ns)
