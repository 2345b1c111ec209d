"""The floor for the watcher's burst: a bare client making exactly the watcher's writes.

For every TaskRun created in ``--namespace`` (seen on a cluster-wide TaskRun watch, as
the watcher sees them) it makes, with ``--workers`` threads, the writes the watcher
makes for a build its pool admits: the finalizer JSON patch guarded by
resourceVersion, the provisioning PipelineRun, the ProvisioningStarted Event. No
cache, no queue, no decisions: the time this takes is what the API server and an
HTTP client cost. Bodies and the HTTP layer are the watcher's own (mpc.glue.objects,
mpc.runner.kube), so only the machinery between them differs.

Run as a process, like the watcher: ``python -m tests.bench.glue_floor --kubeconfig K
--namespace NS --controller-namespace CTRL --workers 8``; it prints "ready" once
watching and runs until SIGTERM.
"""
from __future__ import annotations

import argparse
import queue
import signal
import sys
import threading

from mpc.glue import objects
from mpc.runner import contract as c
from mpc.runner import kube as k
from mpc.runner.kube import ApiError, Kube


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--namespace", required=True)
    ap.add_argument("--controller-namespace", required=True)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--platform", default="linux/arm64")
    a = ap.parse_args()
    kube = Kube.connect(a.kubeconfig)
    work: queue.Queue = queue.Queue()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def worker() -> None:
        while True:
            tr = work.get()
            md = tr["metadata"]
            ns, name, uid = md["namespace"], md["name"], md["uid"]
            try:
                kube.json_patch(k.taskruns(ns, name), objects.finalizer_add_patch(tr))
                kube.create(k.pipelineruns(a.controller_namespace), objects.provision_run(
                    a.controller_namespace, c.TASKS_SERVICE_ACCOUNT, ns, name, uid, a.platform))
                kube.create(k.events(ns), objects.event(
                    ns, name, uid, "ProvisioningStarted",
                    f"Started PipelineRun {a.controller_namespace}/{c.provision_run_name(uid)} "
                    f"to provision a {a.platform} host", False, "floor"))
            except ApiError as e:
                print(f"error {name}: {e}", file=sys.stderr, flush=True)

    for _ in range(a.workers):
        threading.Thread(target=worker, daemon=True).start()

    def watch() -> None:
        rv = kube.request("GET", k.taskruns(), {"limit": 1})["metadata"]["resourceVersion"]
        print("ready", flush=True)
        while not stop.is_set():
            for ev in kube.watch(k.taskruns(), {"resourceVersion": rv}, 300):
                md = (ev.get("object") or {}).get("metadata") or {}
                rv = md.get("resourceVersion", rv)
                if ev.get("type") == "ADDED" and md.get("namespace") == a.namespace:
                    work.put(ev["object"])
    threading.Thread(target=watch, daemon=True).start()
    stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
