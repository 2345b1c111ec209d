"""A finished build is done even while its TaskRun object is kept (clusters keep them
for days): the sweep frees its slot and removes its user, and a provisioner gives it
nothing. Release never rests on "the object still exists"."""
from __future__ import annotations

import time

import pytest
from kubernetes import client

from mpc.runner import contract
from tests.infra.procs import wait_for

from .conftest import make_taskrun, read_secret


def finish(kube: client.ApiClient, tr: dict, status: str) -> dict:
    """What Tekton writes when a build ends, through the status subresource."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    reason = {"True": "Succeeded", "False": "Failed"}[status]
    m = tr["metadata"]
    return client.CustomObjectsApi(kube).patch_namespaced_custom_object_status(
        "tekton.dev", "v1", m["namespace"], "taskruns", m["name"], {"status": {
            "conditions": [{"type": "Succeeded", "status": status, "reason": reason,
                            "message": reason, "lastTransitionTime": now}],
            "podName": f"{m['name']}-pod", "startTime": now, "completionTime": now}})


def build_users(host) -> list[str]:
    return [u for u in host.users() if contract.USER_RE.match(u)]


def user_of(kube: client.ApiClient, tr: dict) -> str:
    return read_secret(kube, tr)["host"].split("@")[0]


@pytest.mark.parametrize("status", ["True", "False"])
def test_sweep_frees_a_finished_build_once_its_host_is_back(controller, kube, namespace,
                                                           make_host, status):
    h = make_host()
    controller.install_pool([h], concurrency=2, maxWaitSeconds=0)
    running, finished = make_taskrun(kube, namespace), make_taskrun(kube, namespace)
    for tr in (running, finished):
        assert controller.provision(tr).results["outcome"] == "served"
    running_user, finished_user = user_of(kube, running), user_of(kube, finished)
    assert sorted(build_users(h)) == sorted([running_user, finished_user])

    # The build ends while its host is down, so the deprovisioning run fails; the
    # watcher has dropped its finalizer by then and never runs it again.
    ended = finish(kube, finished, status)
    assert ended["status"]["conditions"][0]["status"] == status
    h.stop()
    assert controller.start("mpc-deprovision", finished).wait().returncode != 0
    # A sweep while the host is still down can remove nothing: the slot stays.
    assert controller.start("mpc-sweep").wait().returncode != 0
    assert len(controller.leases("slot")) == 2

    h.start()
    assert finished_user in h.users()
    # The finished TaskRun is still there, the same object: that must not keep its slot.
    kept = client.CustomObjectsApi(kube).get_namespaced_custom_object(
        "tekton.dev", "v1", namespace, "taskruns", finished["metadata"]["name"])
    assert kept["metadata"]["uid"] == finished["metadata"]["uid"]
    r = controller.start("mpc-sweep").wait().check()
    assert r.results["removed-users"] == "1"
    assert build_users(h) == [running_user]
    assert [l.metadata.annotations[contract.ANN_USER] for l in controller.leases("slot")] \
        == [running_user]
    assert read_secret(kube, running) is not None

    # The capacity is back: a new build gets the freed slot without waiting.
    nxt = make_taskrun(kube, namespace)
    assert controller.provision(nxt).results == {"outcome": "served", "host": h.name}


@pytest.mark.parametrize("status", ["True", "False"])
def test_provisioner_started_for_a_finished_build_takes_nothing(controller, kube, namespace,
                                                               make_host, status):
    h = make_host()
    controller.install_pool([h], concurrency=1)
    tr = make_taskrun(kube, namespace)
    finish(kube, tr, status)
    r = controller.provision(tr)
    assert r.results["outcome"] == "gone"
    assert controller.leases("slot") == [] and controller.leases("waiter") == []
    assert read_secret(kube, tr) is None
    assert build_users(h) == []


def test_provisioner_gives_back_what_a_finished_build_holds(controller, kube, namespace,
                                                           make_host):
    """A provisioning retry after the build finished frees the slot and user it holds."""
    h = make_host()
    controller.install_pool([h], concurrency=1)
    tr = make_taskrun(kube, namespace)
    assert controller.provision(tr).results["outcome"] == "served"
    user = user_of(kube, tr)
    client.CoreV1Api(kube).delete_namespaced_secret(
        contract.secret_name(tr["metadata"]["name"]), namespace)   # to see nothing is written
    finish(kube, tr, "True")
    r = controller.provision(tr)
    assert r.results["outcome"] == "gone"
    assert user not in h.users()
    assert controller.leases("slot") == []
    assert read_secret(kube, tr) is None


def test_queued_provisioner_of_a_build_that_finished_takes_nothing(controller, kube, namespace,
                                                                  make_host):
    """A provisioner that outlives its build (still queued when it ended) never serves it."""
    h = make_host()
    controller.install_pool([h], concurrency=1, maxWaitSeconds=600)
    busy, queued = make_taskrun(kube, namespace), make_taskrun(kube, namespace)
    assert controller.provision(busy).results["outcome"] == "served"
    busy_user = user_of(kube, busy)
    run = controller.start("mpc-provision", queued, PLATFORM="linux/arm64")
    wait_for("queued", lambda: controller.leases("waiter"), timeout=60)
    finish(kube, queued, "False")       # e.g. it timed out waiting for its secret
    controller.deprovision(busy)        # a slot frees: it must not go to the finished build
    run.wait(timeout=120).check()
    assert run.results["outcome"] == "gone", run.stdout
    assert controller.leases("waiter") == [] and controller.leases("slot") == []
    assert read_secret(kube, queued) is None
    assert busy_user not in h.users() and build_users(h) == []


def test_done_means_finished_or_gone_never_merely_existing():
    uid = "0f0e0d0c-0000-4000-8000-000000000001"

    def tr(conditions=None, **meta) -> dict:
        return {"metadata": {"uid": uid} | meta,
                "status": {"conditions": conditions} if conditions is not None else {}}

    def cond(status: str) -> list[dict]:
        return [{"type": "Succeeded", "status": status}]

    assert contract.build_done(None, uid) == "deleted"
    assert contract.build_done(tr(), "another-uid") == "replaced"
    assert contract.build_done(tr(deletionTimestamp="2025-01-01T00:00:00Z"), uid) == "deleting"
    assert contract.build_done(tr(cond("True")), uid) == "succeeded"
    assert contract.build_done(tr(cond("False")), uid) == "failed"
    # existing and not finished: may still use its host
    assert contract.build_done(tr(), uid) is None
    assert contract.build_done(tr(cond("Unknown")), uid) is None
    assert contract.build_done(tr([{"type": "Ready", "status": "True"}]), uid) is None
