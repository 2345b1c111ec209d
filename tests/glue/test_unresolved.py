"""A run Tekton could not resolve is made again, bounded, instead of failing the build.

Tekton 1.0 ends a PipelineRun with ``CouldntGetPipeline``/``CouldntGetTask`` when its
bundle registry or the API server does not answer while it resolves the references
(in the soak: "retryable error validating referenced object" during an API server
restart). Such a run started nothing, so the watcher deletes it and makes it again
after a pause, at most ``RESOLVE_ATTEMPTS`` times; before, the build got an error
secret for a blip. A run that started a task, or failed for any other reason, is
never made again. Tekton is simulated here (statuses written by the test); the real
fault (the node's registry stopped) is in ``tests/e2e/test_mpc_e2e.py``.
"""
from __future__ import annotations

from mpc.glue.reconcile import RESOLVE_ATTEMPTS
from mpc.runner import contract as c
from tests.infra.procs import wait_for

from .support import _cond, _now, build_taskrun
from .test_lifecycle import events_for


def unresolved(tekton, ns: str, name: str, reason: str = "CouldntGetTask",
               children: bool = False) -> dict:
    """Finish run ``name`` the way Tekton does when it cannot resolve it."""
    status = {"conditions": [_cond("False", reason)], "startTime": _now(),
              "completionTime": _now()}
    status["conditions"][0]["message"] = (
        'retryable error validating referenced object mpc-provision: Post "https://127.0.0.1'
        ':6443/apis/tekton.dev/v1/namespaces/mpc/tasks?dryRun=All": connection refused')
    if children:
        status["childReferences"] = [{"apiVersion": "tekton.dev/v1", "kind": "TaskRun",
                                      "name": f"{name}-provision",
                                      "pipelineTaskName": "provision"}]
    return tekton._status("pipelineruns", ns, name, status)


def wait_pr(tekton, ns: str, name: str, log, not_uid: str | None = None) -> dict:
    """Wait until run ``name`` exists (as another object than ``not_uid``); return it."""
    def there() -> bool:
        pr = tekton.get_pr(ns, name)
        return bool(pr) and pr["metadata"]["uid"] != not_uid
    wait_for(f"{name}" + (" made again" if not_uid else ""), there, timeout=60, log=log)
    return tekton.get_pr(ns, name)


def test_unresolved_provisioning_is_made_again_then_answered(tekton, watcher, kube,
                                                             namespace, ctrl_ns):
    w = watcher("--unresolved-pause", "200ms").start().wait_ready()
    uid = tekton.create_tr(namespace, build_taskrun("blip"))["metadata"]["uid"]
    run, failed = c.provision_run_name(uid), c.provision_failed_run_name(uid)
    pr = wait_pr(tekton, ctrl_ns, run, w.log)
    assert c.ANN_ATTEMPT not in pr["metadata"].get("annotations", {})
    for attempt in range(2, RESOLVE_ATTEMPTS + 1):
        unresolved(tekton, ctrl_ns, run, "CouldntGetPipeline" if attempt == 2 else "CouldntGetTask")
        pr = wait_pr(tekton, ctrl_ns, run, w.log, pr["metadata"]["uid"])
        assert pr["metadata"]["annotations"][c.ANN_ATTEMPT] == str(attempt)
        # the same run, made again: the same Pipeline, for the same build
        assert pr["spec"]["pipelineRef"] == {"name": c.PROVISION_PIPELINE}
        assert pr["metadata"]["labels"][c.LABEL_TASKRUN_UID] == uid
        assert tekton.get_pr(ctrl_ns, failed) is None      # no answer while it may still work
    assert w.metric("mpc_glue_runs_remade_total", role="provision",
                    platform="linux/arm64") == RESOLVE_ATTEMPTS - 1
    assert ("Warning", "RunUnresolved") in events_for(kube, namespace, "blip")
    # the last attempt unresolved too: the build gets its answer, naming the cause
    unresolved(tekton, ctrl_ns, run)
    fr = wait_pr(tekton, ctrl_ns, failed, w.log)
    assert {p["name"]: p["value"] for p in fr["spec"]["params"]}["PROVISION_STATUS"] == \
        "CouldntGetTask"
    assert tekton.get_pr(ctrl_ns, run)["metadata"]["uid"] == pr["metadata"]["uid"]
    assert c.FINALIZER in tekton.get_tr(namespace, "blip")["metadata"]["finalizers"]
    # the error-secret run itself unresolved: made again as well
    unresolved(tekton, ctrl_ns, failed, "CouldntGetPipeline")
    fr2 = wait_pr(tekton, ctrl_ns, failed, w.log, fr["metadata"]["uid"])
    assert fr2["metadata"]["annotations"][c.ANN_ATTEMPT] == "2"
    assert fr2["spec"]["params"] == fr["spec"]["params"]
    assert w.metric("mpc_glue_runs_remade_total", role="provision-failed",
                    platform="linux/arm64") == 1


def test_a_run_that_started_a_task_or_failed_otherwise_is_never_made_again(
        tekton, watcher, namespace, ctrl_ns):
    w = watcher("--unresolved-pause", "200ms").start().wait_ready()
    uids = {n: tekton.create_tr(namespace, build_taskrun(n))["metadata"]["uid"]
            for n in ("started", "failed")}
    for n, uid in uids.items():
        run = c.provision_run_name(uid)
        pr = wait_pr(tekton, ctrl_ns, run, w.log)
        if n == "started":      # resolution failed after its provision task had started
            unresolved(tekton, ctrl_ns, run, children=True)
        else:
            tekton.finish_pr(ctrl_ns, run, ok=False, reason="Failed")
        fr = wait_pr(tekton, ctrl_ns, c.provision_failed_run_name(uid), w.log)
        assert {p["name"]: p["value"] for p in fr["spec"]["params"]}["PIPELINERUN"] == run
        assert tekton.get_pr(ctrl_ns, run)["metadata"]["uid"] == pr["metadata"]["uid"]
    assert w.metric("mpc_glue_runs_remade_total", role="provision", platform="linux/arm64") == 0
