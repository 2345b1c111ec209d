"""Do the JSON verbs of mpc.runner.kube earn their place? Client-side CPU of reading the same
1,000 TaskRuns as LIST pages and as a watch, through those verbs and through the official client's
CustomObjectsApi (and its watch.Watch). Prints figures (best of 3); asserts only that
both saw every object."""
from __future__ import annotations

import time

import pytest
from kubernetes import client, watch

from mpc.runner import kube as k

from .glue_support import create_many, new_namespace, release, unrelated_taskrun

N = 1000
PAGE = 100     # the watcher's --page-size


def _cpu(fn) -> tuple[float, int]:
    best, n = 1e9, 0
    for _ in range(3):
        t = time.process_time()
        n = fn()
        best = min(best, time.process_time() - t)
    return best, n


@pytest.mark.bench
@pytest.mark.timeout(1800)
def test_decode_cost_glue_kube_vs_official_client(cluster, kube):
    ns = new_namespace(kube)
    glue, co = k.Kube(cluster.api_client()), client.CustomObjectsApi(cluster.api_client())
    rv0 = co.list_namespaced_custom_object("tekton.dev", "v1", ns, "taskruns")[
        "metadata"]["resourceVersion"]
    create_many(kube, ns, [unrelated_taskrun(f"u-{i:04d}") for i in range(N)])
    try:
        def glue_list() -> int:
            return sum(len(items) for items, _ in glue.list_pages(k.taskruns(ns), page_size=PAGE))

        def official_list() -> int:
            n, token = 0, None
            while True:
                page = co.list_namespaced_custom_object("tekton.dev", "v1", ns, "taskruns",
                                                        limit=PAGE, _continue=token)
                n += len(page["items"])
                token = page["metadata"].get("continue")
                if not token:
                    return n

        def glue_watch() -> int:
            n = 0
            for ev in glue.watch(k.taskruns(ns), {"resourceVersion": rv0}, 30):
                n += ev.get("type") == "ADDED"
                if n == N:
                    return n
            return n

        def official_watch() -> int:
            n, w = 0, watch.Watch()
            for ev in w.stream(co.list_namespaced_custom_object, "tekton.dev", "v1", ns,
                               "taskruns", resource_version=rv0, timeout_seconds=30):
                n += ev["type"] == "ADDED"
                if n == N:
                    w.stop()
                    return n
            return n

        figures = {name: _cpu(fn) for name, fn in [
            ("LIST, JSON verbs", glue_list), ("LIST, CustomObjectsApi", official_list),
            ("WATCH, JSON verbs", glue_watch),
            ("WATCH, CustomObjectsApi + watch.Watch", official_watch)]}
        print(f"\n[glue bench: client CPU to read {N} TaskRuns (~{len(str(unrelated_taskrun('x')))}"
              f" B each), best of 3]")
        for name, (cpu, n) in figures.items():
            print(f"  {name}: {cpu * 1000:.0f} ms CPU ({cpu / n * 1e6:.0f} us per object)")
            assert n == N
        for verb in ("LIST", "WATCH"):
            mine = figures[f"{verb}, JSON verbs"][0]
            theirs = next(v[0] for name, v in figures.items()
                          if name.startswith(verb) and "JSON verbs" not in name)
            print(f"  {verb}: the official client costs {theirs / mine:.2f}x the JSON verbs")
    finally:
        release(kube, ns)
