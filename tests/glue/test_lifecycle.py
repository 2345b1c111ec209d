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
