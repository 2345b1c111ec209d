"""What the watcher's watches cost it (issue 14, goals 2 and 3), proven on the real API
server:

* a TaskRun that cannot be a build is not decoded: the TaskRun watch hands it over as a
  stub carrying only its type and resourceVersion, which is exactly the object's own,
  also when a label or annotation is named ``resourceVersion`` (hostile input: a wrong
  version there would make every resume fail and re-list);
* the echo of the watcher's own writes (the patched TaskRun, the created PipelineRun)
  does not bring the build back for another reconcile.
"""
from __future__ import annotations

import time

from kubernetes import client

from mpc.glue import detect
from mpc.runner import contract as c
from mpc.runner import kube as k
from tests.infra.procs import wait_for

from .support import build_taskrun


def unrelated(name: str, **meta) -> dict:
    return {"apiVersion": "tekton.dev/v1", "kind": "TaskRun",
            "metadata": {"name": name, **meta},
            "spec": {"params": [{"name": "PLATFORM", "value": "linux/arm64"}],
                     "taskSpec": {"params": [{"name": "PLATFORM"}],
                                  "steps": [{"name": "s", "image": "busybox",
                                             "script": "echo resourceVersion"}]}}}


def test_taskruns_that_cannot_be_builds_are_passed_over_undecoded(kube, namespace):
    co = client.CustomObjectsApi(kube)
    rv0 = co.list_namespaced_custom_object("tekton.dev", "v1", namespace, "taskruns")[
        "metadata"]["resourceVersion"]
    hostile = {"labels": {"resourceVersion": "1"},
               "annotations": {"resourceVersion": "1", "x": '"resourceVersion":"2"'}}
    bodies = [unrelated("plain-1"), unrelated("plain-2"), unrelated("hostile", **hostile),
              build_taskrun("build-1"), unrelated("ours", finalizers=[c.FINALIZER])]
    made = {}
    for b in bodies:
        obj = co.create_namespaced_custom_object("tekton.dev", "v1", namespace, "taskruns", b)
        made[obj["metadata"]["name"]] = obj["metadata"]["resourceVersion"]
    events: list[dict] = []
    for ev in k.Kube(kube).watch(k.taskruns(namespace), {"resourceVersion": rv0}, 10,
                                 detect.may_be_build):
        events.append(ev)
        if len(events) == len(bodies):
            break
    # in creation order; each with its object's own resourceVersion (a watch resumes
    # from it), decoded only when it can be a build or holds our finalizer
    assert [e["type"] for e in events] == ["ADDED"] * len(bodies)
    assert [e["object"]["metadata"]["resourceVersion"] for e in events] == list(made.values())
    names = [e["object"]["metadata"].get("name") for e in events]
    assert names == [None, None, "hostile", "build-1", "ours"]
    assert events[0]["object"] == {"metadata": {"resourceVersion": made["plain-1"]}}
    assert detect.build_platform(events[3]["object"]) == "linux/arm64"
    co.delete_namespaced_custom_object("tekton.dev", "v1", namespace, "taskruns", "ours")


def test_writes_that_change_nothing_a_decision_reads_bring_no_reconcile(
        tekton, watcher, namespace, ctrl_ns, kube):
    """Tekton writes a build's status many times while it runs (pod name, steps, start
    time), and our own writes come back as watch events: none of that changes what the
    watcher decides on, so none of it brings the build back for a reconcile. A change
    that matters (the build finishes) still does."""
    w = watcher().start().wait_ready()
    tr = tekton.create_tr(namespace, build_taskrun("build-1"))
    uid = tr["metadata"]["uid"]
    run = c.provision_run_name(uid)
    wait_for("provisioning run", lambda: tekton.get_pr(ctrl_ns, run), timeout=30, log=w.log)
    tekton.finish_pr(ctrl_ns, run, ok=True)
    wait_for("Provisioned", lambda: w.metric("mpc_glue_runs_succeeded_total",
                                             role="provision", platform="linux/arm64") == 1,
             timeout=30, log=w.log)
    wait_for("the queue drained", lambda: w.metric("mpc_glue_queue_depth") == 0,
             timeout=30, log=w.log)
    time.sleep(1)
    co = client.CustomObjectsApi(kube)
    events0 = w.metric("mpc_glue_watch_events_total", resource="taskrun")
    before = w.metric("mpc_glue_reconciles_total", outcome="ok")
    for i in range(3):           # what Tekton and others write while the build runs
        co.patch_namespaced_custom_object_status(
            "tekton.dev", "v1", namespace, "taskruns", "build-1",
            {"status": {"podName": f"build-1-pod-{i}", "startTime": "2026-12-02T10:00:00Z",
                        "steps": [{"name": "build", "running": {}}]}})
        co.patch_namespaced_custom_object("tekton.dev", "v1", namespace, "taskruns", "build-1",
                                          {"metadata": {"labels": {"touched": str(i)}}})
        co.patch_namespaced_custom_object("tekton.dev", "v1", ctrl_ns, "pipelineruns", run,
                                          {"metadata": {"labels": {"touched": str(i)}}})
    wait_for("the watcher saw them", lambda: w.metric(
        "mpc_glue_watch_events_total", resource="taskrun") - events0 >= 6, timeout=30, log=w.log)
    time.sleep(2)
    assert w.metric("mpc_glue_reconciles_total", outcome="ok") == before
    # what matters still counts: the build finishes, and is released
    tekton.finish_tr(namespace, "build-1", ok=True)
    wait_for("deprovisioning run", lambda: tekton.get_pr(ctrl_ns, c.deprovision_run_name(uid)),
             timeout=30, log=w.log)
    wait_for("its reconcile counted", lambda: w.metric(
        "mpc_glue_reconciles_total", outcome="ok") > before, timeout=30, log=w.log)
