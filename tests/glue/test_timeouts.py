"""A provisioning run's Tekton timeouts agree with the pool's queue bound (issue 12).

Before, every run got a fixed 2 h pipeline timeout while the pool may let a
build queue for up to 86,400 s: Tekton then cancelled a run that was still
legitimately waiting, its error-secret ``finally`` never ran, and the build
hung until its own timeout.
"""
from __future__ import annotations

import pytest
import yaml
from kubernetes import client

from mpc.glue import objects
from mpc.runner import contract as c
from tests.infra.procs import wait_for

from .support import build_taskrun


def _seconds(duration: str) -> int:
    assert duration.endswith("s"), duration
    return int(duration[:-1])


@pytest.mark.parametrize("max_wait", [None, 86400])
def test_provisioning_timeouts_follow_the_pools_max_wait(tekton, watcher, kube, namespace,
                                                        ctrl_ns, max_wait):
    pool = {"hosts": [{"name": "a1", "address": "10.0.0.1", "user": "root", "secret": "k",
                       "platform": "linux/arm64", "concurrency": 1}]}
    if max_wait is not None:
        pool["maxWaitSeconds"] = max_wait
    client.CoreV1Api(kube).create_namespaced_config_map(ctrl_ns, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name=c.HOST_POOL_CONFIGMAP),
        data={c.POOL_KEY: yaml.safe_dump(pool)}))
    w = watcher().start().wait_ready()
    uid = tekton.create_tr(namespace, build_taskrun("waits-long"))["metadata"]["uid"]
    wait_for("provisioning run", lambda: tekton.get_pr(ctrl_ns, c.provision_run_name(uid)),
             timeout=30, log=w.log)
    pr = tekton.get_pr(ctrl_ns, c.provision_run_name(uid))
    t = pr["spec"]["timeouts"]
    tasks, fin, pipeline = _seconds(t["tasks"]), _seconds(t["finally"]), _seconds(t["pipeline"])
    bound = max_wait if max_wait is not None else 3600     # the pool's documented default
    # the provision task may queue for the whole bound and still have time to work ...
    assert tasks >= bound + objects.PROVISION_WORK_SECONDS
    # ... and when Tekton stops it, the error-secret finally still gets its time
    assert fin > 0 and pipeline >= tasks + fin


def test_a_cancelled_provisioning_run_still_answers_the_build(tekton, watcher, kube, namespace,
                                                              ctrl_ns):
    """Tekton skips the error-secret finally of a run cancelled with status Cancelled (and a
    finally can fail to run): the watcher then starts mpc-provision-failed, whose Task writes
    the error secret naming how the run ended, unless an answer exists already."""
    w = watcher().start().wait_ready()
    uid = tekton.create_tr(namespace, build_taskrun("cancelled"))["metadata"]["uid"]
    run = c.provision_run_name(uid)
    wait_for("provisioning run", lambda: tekton.get_pr(ctrl_ns, run), timeout=30, log=w.log)
    tekton.finish_pr(ctrl_ns, run, ok=False, reason="Cancelled")
    failed = c.provision_failed_run_name(uid)
    wait_for("the provision-failed run", lambda: tekton.get_pr(ctrl_ns, failed), timeout=30,
             log=w.log)
    pr = tekton.get_pr(ctrl_ns, failed)
    assert pr["spec"]["pipelineRef"] == {"name": c.PROVISION_FAILED_PIPELINE}
    assert pr["spec"]["taskRunTemplate"]["serviceAccountName"] == c.TASKS_SERVICE_ACCOUNT
    assert {p["name"]: p["value"] for p in pr["spec"]["params"]} == {
        "TASKRUN_NAME": "cancelled", "TASKRUN_NAMESPACE": namespace, "TASKRUN_UID": uid,
        "PLATFORM": "linux/arm64", "PIPELINERUN": run, "PROVISION_STATUS": "Cancelled"}
    # the build still waits for an answer: it keeps our finalizer until it ends
    tr = tekton.get_tr(namespace, "cancelled")
    assert c.FINALIZER in tr["metadata"]["finalizers"]
    # a succeeded provisioning run never starts one
    uid2 = tekton.create_tr(namespace, build_taskrun("served"))["metadata"]["uid"]
    wait_for("provisioning run 2", lambda: tekton.get_pr(ctrl_ns, c.provision_run_name(uid2)),
             timeout=30, log=w.log)
    tekton.finish_pr(ctrl_ns, c.provision_run_name(uid2), ok=True)
    core = client.CoreV1Api(kube)
    wait_for("Provisioned event", lambda: any(
        e.reason == "Provisioned" and e.involved_object.name == "served"
        for e in core.list_namespaced_event(namespace).items), timeout=30, log=w.log)
    assert tekton.get_pr(ctrl_ns, c.provision_failed_run_name(uid2)) is None
