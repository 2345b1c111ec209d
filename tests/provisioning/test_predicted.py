"""A build provisioned before its TaskRun exists (predicted from the PipelineRun that will
create it, issue 14): served while that PipelineRun runs, the same build once the TaskRun
appears, and released, user and slot and secret, when the PipelineRun ends, goes away or
had the TaskRun deleted without it ever being a build that finished. Tekton does not run
in this tier: the PipelineRun's status and its child TaskRun are written as Tekton would."""
from __future__ import annotations

import time
import uuid

import pytest
from kubernetes import client

from mpc.runner import contract
from mpc.runner.provision import build_state

from .conftest import read_secret
from .test_finished import build_users, finish

G, V = "tekton.dev", "v1"


def make_pipelinerun(kube: client.ApiClient, namespace: str) -> dict:
    body = {"apiVersion": f"{G}/{V}", "kind": "PipelineRun",
            "metadata": {"name": f"pr-{uuid.uuid4().hex[:8]}", "namespace": namespace},
            "spec": {"pipelineSpec": {"tasks": [{"name": "build", "taskSpec": {
                "steps": [{"name": "s", "image": "busybox", "script": "true"}]}}]}}}
    return client.CustomObjectsApi(kube).create_namespaced_custom_object(
        G, V, namespace, "pipelineruns", body)


def pr_status(kube: client.ApiClient, pr: dict, status: str = "Unknown",
              children: tuple[str, ...] = ()) -> dict:
    """What Tekton writes on the PipelineRun (running, or ended), through the subresource."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    reason = {"Unknown": "Running", "True": "Succeeded", "False": "Cancelled"}[status]
    m = pr["metadata"]
    return client.CustomObjectsApi(kube).patch_namespaced_custom_object_status(
        G, V, m["namespace"], "pipelineruns", m["name"], {"status": {
            "conditions": [{"type": "Succeeded", "status": status, "reason": reason,
                            "message": reason, "lastTransitionTime": now}],
            "startTime": now,
            "childReferences": [{"apiVersion": f"{G}/{V}", "kind": "TaskRun", "name": c,
                                 "pipelineTaskName": "build"} for c in children]}})


def child_taskrun(kube: client.ApiClient, pr: dict, name: str) -> dict:
    """The build TaskRun as Tekton creates it for the PipelineRun: owned by it."""
    m = pr["metadata"]
    body = {"apiVersion": f"{G}/{V}", "kind": "TaskRun",
            "metadata": {"name": name, "namespace": m["namespace"], "ownerReferences": [{
                "apiVersion": f"{G}/{V}", "kind": "PipelineRun", "name": m["name"],
                "uid": m["uid"], "controller": True, "blockOwnerDeletion": True}]},
            "spec": {"params": [{"name": "PLATFORM", "value": "linux/arm64"}],
                     "taskSpec": {"steps": [{"name": "build", "image": "busybox",
                                             "script": "true"}]}}}
    return client.CustomObjectsApi(kube).create_namespaced_custom_object(
        G, V, m["namespace"], "taskruns", body)


def predicted(pr: dict, name: str) -> dict:
    """The build reference the watcher hands the Tasks for a TaskRun not created yet."""
    m = pr["metadata"]
    return {"metadata": {"name": name, "namespace": m["namespace"],
                         "uid": contract.predicted_uid(m["uid"], name)}}


def owner_param(pr: dict) -> dict:
    return {contract.OWNER_PARAM: pr["metadata"]["name"]}


def secret_object(kube: client.ApiClient, build: dict) -> client.V1Secret:
    m = build["metadata"]
    return client.CoreV1Api(kube).read_namespaced_secret(contract.secret_name(m["name"]),
                                                         m["namespace"])


def _to_come(controller, kube, namespace, make_host):
    """A host, and a running PipelineRun whose build is still to come: (host, PipelineRun,
    the build's TaskRun name, its reference)."""
    h = make_host()
    controller.install_pool([h], concurrency=1)
    pr = make_pipelinerun(kube, namespace)
    pr_status(kube, pr)
    name = f"{pr['metadata']['name']}-build"
    return h, pr, name, predicted(pr, name)


def test_predicted_build_is_served_before_its_taskrun_and_kept_once_it_exists(
        controller, kube, namespace, make_host):
    h, pr, name, build = _to_come(controller, kube, namespace, make_host)
    r = controller.provision(build, **owner_param(pr))
    assert r.results == {"outcome": "served", "host": h.name}, r.stdout
    user = read_secret(kube, build)["host"].split("@")[0]
    assert user == contract.build_user(namespace, name, build["metadata"]["uid"])
    assert build_users(h) == [user]
    s = secret_object(kube, build)
    # the TaskRun does not exist yet: the secret dies with the PipelineRun
    assert [(o.kind, o.name, o.uid) for o in s.metadata.owner_references] == \
        [("PipelineRun", pr["metadata"]["name"], pr["metadata"]["uid"])]
    assert s.metadata.labels[contract.LABEL_TASKRUN_UID] == build["metadata"]["uid"]
    (slot,) = controller.leases("slot")
    assert slot.metadata.annotations[contract.ANN_PIPELINERUN] == pr["metadata"]["name"]

    # Not created yet, PipelineRun running: the sweep keeps everything.
    controller.start("mpc-sweep").wait().check()
    assert build_users(h) == [user] and len(controller.leases("slot")) == 1

    # Tekton creates the TaskRun: the same build (its uid differs from the key).
    tr = child_taskrun(kube, pr, name)
    pr_status(kube, pr, children=(name,))
    assert tr["metadata"]["uid"] != build["metadata"]["uid"]
    controller.start("mpc-sweep").wait().check()
    assert build_users(h) == [user] and read_secret(kube, build) is not None

    # It finishes (the PipelineRun still runs other tasks): done, released by the sweep.
    finish(kube, tr, "True")
    r = controller.start("mpc-sweep").wait().check()
    assert r.results["removed-users"] == "1", r.stdout
    assert build_users(h) == [] and controller.leases("slot") == []
    assert read_secret(kube, build) is None


@pytest.mark.parametrize("end", ["cancelled", "succeeded", "deleted", "child deleted",
                                 "namesake"])
def test_predicted_build_never_created_releases_its_slot_user_and_secret(
        controller, kube, namespace, make_host, end):
    """The PipelineRun never makes the build (cancelled before it, skipped it and
    ended, deleted), or made it and it was deleted, or a TaskRun of that name is not its
    child: the sweep frees the host. A finished-looking object is never needed."""
    h, pr, name, build = _to_come(controller, kube, namespace, make_host)
    assert controller.provision(build, **owner_param(pr)).results["outcome"] == "served"
    assert len(build_users(h)) == 1
    co = client.CustomObjectsApi(kube)
    if end == "cancelled":
        pr_status(kube, pr, "False")
    elif end == "succeeded":
        pr_status(kube, pr, "True")
    elif end == "deleted":
        co.delete_namespaced_custom_object(G, V, namespace, "pipelineruns", pr["metadata"]["name"],
                                           body={"propagationPolicy": "Orphan"})
    elif end == "child deleted":
        tr = child_taskrun(kube, pr, name)
        pr_status(kube, pr, children=(name,))
        co.delete_namespaced_custom_object(G, V, namespace, "taskruns", tr["metadata"]["name"])
    else:       # someone else's TaskRun under that name, not owned by the PipelineRun
        other = make_pipelinerun(kube, namespace)
        child_taskrun(kube, other, name)
    r = controller.start("mpc-sweep").wait().check()
    assert r.results["removed-users"] == "1", r.stdout
    assert build_users(h) == [] and controller.leases("slot") == []
    if end != "deleted":        # (else the garbage collector may have taken it first)
        assert read_secret(kube, build) is None


def test_provisioner_of_a_predicted_build_whose_pipelinerun_ended_takes_nothing(
        controller, kube, namespace, make_host):
    h = make_host()
    controller.install_pool([h], concurrency=1)
    pr = make_pipelinerun(kube, namespace)
    pr_status(kube, pr, "False")
    build = predicted(pr, f"{pr['metadata']['name']}-build")
    r = controller.provision(build, **owner_param(pr))
    assert r.results["outcome"] == "gone", r.stdout
    assert controller.leases("slot") == [] and build_users(h) == []
    assert read_secret(kube, build) is None


class _Reads:
    """Answers the runner's two reads from a script: the TaskRun appears between them."""

    def __init__(self, taskruns: list, pipelinerun: dict):
        self.taskruns, self.pr = list(taskruns), pipelinerun

    def taskrun(self, namespace, name):
        return self.taskruns.pop(0)

    def pipelinerun(self, namespace, name):
        return self.pr


def test_a_taskrun_created_between_the_reads_is_not_taken_for_a_deleted_one():
    pr = {"metadata": {"name": "pr", "namespace": "ns", "uid": str(uuid.uuid4())},
          "status": {"childReferences": [{"kind": "TaskRun", "name": "pr-build"}]}}
    key = contract.predicted_uid(pr["metadata"]["uid"], "pr-build")
    tr = {"metadata": {"name": "pr-build", "namespace": "ns", "uid": str(uuid.uuid4()),
                       "ownerReferences": [{"kind": "PipelineRun", "name": "pr",
                                            "uid": pr["metadata"]["uid"]}]}}
    build, why = build_state(_Reads([None, tr], pr), "ns", "pr-build", key, "pr")
    assert why is None and build["metadata"]["uid"] == key
    assert build["involvedObject"]["uid"] == tr["metadata"]["uid"]
    assert build["ownerReference"]["uid"] == pr["metadata"]["uid"]
    # read once more and still 404: deleted
    assert build_state(_Reads([None, None], pr), "ns", "pr-build", key, "pr") == \
        (None, "deleted")


def test_predicted_liveness_rules():
    pr_uid = str(uuid.uuid4())
    key = contract.predicted_uid(pr_uid, "b")

    def pr(status=None, children=(), uid=pr_uid, **meta):
        return {"metadata": {"name": "pr", "uid": uid} | meta, "status": {
            "conditions": [{"type": "Succeeded", "status": status}] if status else [],
            "childReferences": [{"name": c} for c in children]}}

    def tr(owner_uid=pr_uid, owner="pr", status=None):
        return {"metadata": {"name": "b", "uid": str(uuid.uuid4()), "ownerReferences": [
            {"kind": "PipelineRun", "name": owner, "uid": owner_uid}]},
            "status": {"conditions": [{"type": "Succeeded", "status": status}]
                       if status else []}}

    done = contract.predicted_build_done
    assert done(None, pr(), "b", key, "pr") is None                       # not created yet
    assert done(None, pr("Unknown"), "b", key, "pr") is None
    assert done(None, None, "b", key, "pr") == "pipelinerun deleted"
    assert done(None, pr(uid=str(uuid.uuid4())), "b", key, "pr") == "pipelinerun replaced"
    assert done(None, pr(deletionTimestamp="x"), "b", key, "pr").startswith("never created")
    assert done(None, pr("False"), "b", key, "pr").startswith("never created")
    assert done(None, pr("True"), "b", key, "pr").startswith("never created")
    assert done(None, pr(children=("b",)), "b", key, "pr") == "deleted"
    assert done(None, pr(children=("other",)), "b", key, "pr") is None
    assert done(tr(), pr(), "b", key, "pr") is None                       # created, running
    assert done(tr(status="True"), pr(), "b", key, "pr") == "succeeded"
    assert done(tr(owner_uid=str(uuid.uuid4())), pr(), "b", key, "pr") == "replaced"
    assert done(tr(owner="other"), pr(), "b", key, "pr") == "replaced"
    # the key is a uid-shaped value that names this PipelineRun and TaskRun only
    assert contract.taskrun_ref_problem("ns", "b", key, "pr") is None
    assert contract.predicted_uid(pr_uid, "c") != key
    assert contract.taskrun_ref_problem("ns", "b", key, "PR/../x") is not None
