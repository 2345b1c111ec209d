"""A build's whole life against the real API server, with the watcher as a real process."""
from __future__ import annotations

from mpc.runner import contract as c
from tests.infra.procs import wait_for

from .support import build_taskrun


def has_finalizer(tr) -> bool:
    return tr is not None and c.FINALIZER in (tr["metadata"].get("finalizers") or [])


def test_completion_provisions_then_deprovisions(tekton, watcher, namespace, ctrl_ns):
    w = watcher().start().wait_ready()
    tr = tekton.create_tr(namespace, build_taskrun("build-1"))
    uid = tr["metadata"]["uid"]
    wait_for("finalizer", lambda: has_finalizer(tekton.get_tr(namespace, "build-1")),
             timeout=30, log=w.log)
    wait_for("provisioning run", lambda: tekton.get_pr(ctrl_ns, c.provision_run_name(uid)),
             timeout=30, log=w.log)
    pr = tekton.get_pr(ctrl_ns, c.provision_run_name(uid))
    assert pr["spec"]["pipelineRef"] == {"name": c.PROVISION_PIPELINE}
    assert pr["spec"]["taskRunTemplate"]["serviceAccountName"] == c.TASKS_SERVICE_ACCOUNT
    assert {p["name"]: p["value"] for p in pr["spec"]["params"]} == {
        "TASKRUN_NAME": "build-1", "TASKRUN_NAMESPACE": namespace, "TASKRUN_UID": uid,
        "PLATFORM": "linux/arm64"}
    labels = pr["metadata"]["labels"]
    assert labels[c.LABEL_TASKRUN_UID] == uid and labels[c.LABEL_ROLE] == "provision"
    assert labels[c.LABEL_TASKRUN_NAMESPACE] == namespace
    assert pr["metadata"]["annotations"][c.ANN_TASKRUN_NAME] == "build-1"

    tekton.finish_pr(ctrl_ns, c.provision_run_name(uid), ok=True)
    tekton.running(namespace, "build-1")
    tekton.finish_tr(namespace, "build-1", ok=True)
    wait_for("finalizer removed", lambda: not has_finalizer(tekton.get_tr(namespace, "build-1")),
             timeout=30, log=w.log)
    dp = tekton.get_pr(ctrl_ns, c.deprovision_run_name(uid))
    assert dp is not None
    assert dp["spec"]["pipelineRef"] == {"name": c.DEPROVISION_PIPELINE}
    assert {p["name"]: p["value"] for p in dp["spec"]["params"]} == {
        "TASKRUN_NAME": "build-1", "TASKRUN_NAMESPACE": namespace, "TASKRUN_UID": uid}
    # the successful provisioning run is garbage-collected once the build let go
    wait_for("provisioning run deleted",
             lambda: tekton.get_pr(ctrl_ns, c.provision_run_name(uid)) is None,
             timeout=30, log=w.log)
    tekton.finish_pr(ctrl_ns, c.deprovision_run_name(uid), ok=True)
    wait_for("deprovisioning run deleted",
             lambda: tekton.get_pr(ctrl_ns, c.deprovision_run_name(uid)) is None,
             timeout=30, log=w.log)


def prs_for(tekton, ctrl_ns, uid):
    return [p for p in tekton.list_pr(ctrl_ns)
            if p["metadata"]["labels"].get(c.LABEL_TASKRUN_UID) == uid]


def events_for(kube, namespace, name):
    from kubernetes import client
    evs = client.CoreV1Api(kube).list_namespaced_event(namespace).items
    return [(e.type, e.reason) for e in evs if e.involved_object.name == name]


def test_exactly_once_with_a_concurrent_writer(tekton, watcher, namespace, ctrl_ns, kube):
    """Tekton writes the TaskRun constantly; the finalizer and the run still happen once,
    and the other writer's changes survive."""
    import threading

    from kubernetes import client
    co = client.CustomObjectsApi(kube)
    tr = tekton.create_tr(namespace, build_taskrun("busy"))
    uid = tr["metadata"]["uid"]
    stop = threading.Event()
    writes = []

    def bump():
        i = 0
        while not stop.is_set():
            i += 1
            try:  # a metadata write and a status write, like Tekton's reconciler
                co.patch_namespaced_custom_object("tekton.dev", "v1", namespace, "taskruns", "busy",
                                                  {"metadata": {"labels": {"bump": str(i)}}})
                tekton.running(namespace, "busy")
                writes.append(i)
            except client.ApiException:
                pass
    t = threading.Thread(target=bump)
    t.start()
    try:
        w = watcher().start().wait_ready()
        wait_for("finalizer", lambda: has_finalizer(tekton.get_tr(namespace, "busy")),
                 timeout=60, log=w.log)
        wait_for("provisioning run", lambda: prs_for(tekton, ctrl_ns, uid), timeout=60,
                 log=w.log)
        n = len(writes)
        wait_for("writer kept writing", lambda: len(writes) > n + 20, timeout=60)
    finally:
        stop.set()
        t.join()
    cur = tekton.get_tr(namespace, "busy")
    assert cur["metadata"]["finalizers"].count(c.FINALIZER) == 1
    assert cur["metadata"]["labels"]["bump"] == str(writes[-1])
    assert len(prs_for(tekton, ctrl_ns, uid)) == 1
    assert w.metric("mpc_glue_runs_started_total", role="provision") == 1
    assert events_for(kube, namespace, "busy").count(("Normal", "ProvisioningStarted")) == 1


def test_deletion_mid_provision(tekton, watcher, namespace, ctrl_ns, kube):
    w = watcher().start().wait_ready()
    uid = tekton.create_tr(namespace, build_taskrun("doomed"))["metadata"]["uid"]
    prov = c.provision_run_name(uid)
    wait_for("provisioning run", lambda: tekton.get_pr(ctrl_ns, prov), timeout=30, log=w.log)
    tekton.delete_tr(namespace, "doomed")
    wait_for("provisioning cancelled",
             lambda: tekton.get_pr(ctrl_ns, prov)["spec"].get("status") == "Cancelled",
             timeout=30, log=w.log)
    # the finalizer holds the TaskRun while the cancellation is in flight
    tr = tekton.get_tr(namespace, "doomed")
    assert tr is not None and tr["metadata"].get("deletionTimestamp") and has_finalizer(tr)
    assert tekton.get_pr(ctrl_ns, c.deprovision_run_name(uid)) is None
    # Tekton stops the run
    tekton.finish_pr(ctrl_ns, prov, ok=False, reason="Cancelled")
    wait_for("TaskRun really deleted", lambda: tekton.get_tr(namespace, "doomed") is None,
             timeout=30, log=w.log)
    dp = tekton.get_pr(ctrl_ns, c.deprovision_run_name(uid))
    assert dp is not None and dp["metadata"]["labels"][c.LABEL_ROLE] == "deprovision"
    assert len(prs_for(tekton, ctrl_ns, uid)) == 2


def test_cancellation_that_never_ends_does_not_hold_the_build(tekton, watcher, namespace,
                                                              ctrl_ns):
    """If Tekton never stops the provisioning run, deprovisioning starts after the grace."""
    w = watcher("--cancel-grace", "1s").start().wait_ready()
    uid = tekton.create_tr(namespace, build_taskrun("stuck"))["metadata"]["uid"]
    wait_for("provisioning run", lambda: tekton.get_pr(ctrl_ns, c.provision_run_name(uid)),
             timeout=30, log=w.log)
    tekton.finish_tr(namespace, "stuck", ok=False)
    wait_for("finalizer removed", lambda: not has_finalizer(tekton.get_tr(namespace, "stuck")),
             timeout=30, log=w.log)
    assert tekton.get_pr(ctrl_ns, c.provision_run_name(uid))["spec"]["status"] == "Cancelled"
    assert tekton.get_pr(ctrl_ns, c.deprovision_run_name(uid)) is not None


def test_finished_build_without_our_finalizer_is_left_alone(tekton, watcher, namespace,
                                                            ctrl_ns):
    tr = tekton.create_tr(namespace, build_taskrun("old"))
    tekton.finish_tr(namespace, "old", ok=True)
    w = watcher().start().wait_ready()
    marker = tekton.create_tr(namespace, build_taskrun("new"))
    wait_for("marker handled", lambda: tekton.get_pr(
        ctrl_ns, c.provision_run_name(marker["metadata"]["uid"])), timeout=30, log=w.log)
    old = tekton.get_tr(namespace, "old")
    assert not has_finalizer(old)
    assert old["metadata"]["resourceVersion"] != tr["metadata"]["resourceVersion"]  # status write
    assert prs_for(tekton, ctrl_ns, tr["metadata"]["uid"]) == []


def test_events_metrics_and_probes(tekton, watcher, namespace, ctrl_ns, kube):
    w = watcher().start().wait_ready()
    assert w.get("/healthz") == (200, "ok")
    uid = tekton.create_tr(namespace, build_taskrun("m"))["metadata"]["uid"]
    wait_for("provisioning run", lambda: tekton.get_pr(ctrl_ns, c.provision_run_name(uid)),
             timeout=30, log=w.log)
    wait_for("waiting gauge", lambda: w.metric("mpc_glue_builds_waiting",
                                               platform="linux/arm64") == 1, timeout=30)
    tekton.finish_pr(ctrl_ns, c.provision_run_name(uid), ok=True)
    wait_for("running gauge", lambda: w.metric("mpc_glue_builds_running",
                                               platform="linux/arm64") == 1, timeout=30)
    assert w.metric("mpc_glue_builds_waiting", platform="linux/arm64") == 0
    # the gauges follow the cache, the counters the handler a moment later
    wait_for("provision counted", lambda: w.metric(
        "mpc_glue_provision_seconds_count", platform="linux/arm64") == 1, timeout=30)
    assert w.metric("mpc_glue_runs_succeeded_total", role="provision") == 1
    # the build's reconcile posts "Provisioned"; a build that ends first is released
    # without it (nothing to announce any more)
    wait_for("provisioned event", lambda: ("Normal", "Provisioned") in
             events_for(kube, namespace, "m"), timeout=30, log=w.log)
    tekton.finish_tr(namespace, "m", ok=True)
    wait_for("gauges back to 0", lambda: w.metric("mpc_glue_builds_running",
                                                  platform="linux/arm64") == 0, timeout=30)
    assert 'mpc_glue_builds_running{platform="linux/arm64"} 0.0' in w.metrics()
    wait_for("deprovisioning started", lambda: w.metric("mpc_glue_runs_started_total",
                                                        role="deprovision") == 1, timeout=30)
    # the Event is written just after the run (and the counter): wait for it, not the counter
    wait_for("deprovisioning event", lambda: ("Normal", "Deprovisioning") in
             events_for(kube, namespace, "m"), timeout=30, log=w.log)
    evs = events_for(kube, namespace, "m")
    assert ("Normal", "ProvisioningStarted") in evs and ("Normal", "Provisioned") in evs
    assert len(evs) == len(set(evs))
    # one JSON object per line, decisions carry namespace/name/uid
    import json
    lines = [json.loads(ln) for ln in w.log_text().splitlines() if ln.startswith("{")]
    decisions = [ln for ln in lines if ln["msg"] == "provisioning run created"]
    assert decisions and decisions[0]["uid"] == uid and decisions[0]["namespace"] == namespace


def test_failed_provisioning_is_a_warning(tekton, watcher, namespace, ctrl_ns, kube):
    w = watcher().start().wait_ready()
    uid = tekton.create_tr(namespace, build_taskrun("f"))["metadata"]["uid"]
    wait_for("provisioning run", lambda: tekton.get_pr(ctrl_ns, c.provision_run_name(uid)),
             timeout=30, log=w.log)
    tekton.finish_pr(ctrl_ns, c.provision_run_name(uid), ok=False)
    wait_for("warning event", lambda: ("Warning", "ProvisioningFailed") in
             events_for(kube, namespace, "f"), timeout=30, log=w.log)
    assert w.metric("mpc_glue_runs_failed_total", role="provision") == 1
    assert has_finalizer(tekton.get_tr(namespace, "f"))  # released only when the build ends
