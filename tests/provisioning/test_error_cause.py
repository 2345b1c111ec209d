"""A build whose provisioning run failed learns why from its error secret (issue 11).

The soak killed provisioning pods: the builds' error secrets said only "ended with
status Failed". The mpc-error-secret Task now names the cause as Tekton recorded it
on the failed child TaskRun (a step killed with exit code 137, a deleted pod).
"""
from __future__ import annotations

from kubernetes import client

from mpc.runner import contract

from .conftest import make_taskrun, read_secret

G, V = "tekton.dev", "v1"
KILLED = ('"step-provision" exited with code 137: the container was killed '
          '(pod mpc-provision-x-pod)')


def _failed_run(kube, ns: str, run: str) -> None:
    """A provisioning PipelineRun whose provision TaskRun failed, as Tekton records it."""
    co = client.CustomObjectsApi(kube)
    child = f"{run}-provision"
    co.create_namespaced_custom_object(G, V, ns, "taskruns", {
        "apiVersion": f"{G}/{V}", "kind": "TaskRun", "metadata": {"name": child},
        "spec": {"taskRef": {"name": contract.PROVISION_PIPELINE}}})
    co.patch_namespaced_custom_object_status(G, V, ns, "taskruns", child, {"status": {
        "podName": f"{child}-pod", "conditions": [{"type": "Succeeded", "status": "False", "reason": "Failed",
                        "message": KILLED}]}})
    co.create_namespaced_custom_object(G, V, ns, "pipelineruns", {
        "apiVersion": f"{G}/{V}", "kind": "PipelineRun", "metadata": {"name": run},
        "spec": {"pipelineRef": {"name": contract.PROVISION_PIPELINE}}})
    co.patch_namespaced_custom_object_status(G, V, ns, "pipelineruns", run, {"status": {
        "conditions": [{"type": "Succeeded", "status": "False", "reason": "Failed",
                        "message": "Tasks Completed: 1 (Failed: 1, Cancelled 0), Skipped: 0"}],
        "childReferences": [{"apiVersion": f"{G}/{V}", "kind": "TaskRun", "name": child,
                             "pipelineTaskName": "provision"}]}})


def test_error_secret_names_the_cause_of_the_failed_run(controller, kube, namespace):
    tr = make_taskrun(kube, namespace)
    run = contract.provision_run_name(tr["metadata"]["uid"])
    _failed_run(kube, controller.namespace, run)
    controller.start("mpc-error-secret", tr, PLATFORM="linux/arm64", PIPELINERUN=run,
                     PROVISION_STATUS="Failed").wait().check()
    error = read_secret(kube, tr)[contract.KEY_ERROR]
    assert f"{controller.namespace}/{run} ended with status Failed" in error
    assert "provision: Failed" in error and "exited with code 137" in error, error
