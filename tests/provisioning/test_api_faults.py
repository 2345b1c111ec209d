"""A flaky API server (429 with Retry-After, 503, connections reset, answers lost
after the request took effect) delays provisioning; the build is still served and
never gets an error secret."""
from __future__ import annotations

import json
import uuid

import pytest

from mpc.runner import contract
from tests.infra.faultproxy import FaultProxy
from tests.infra.procs import wait_for
from tests.infra.steprunner import load_task, start_task, task_path

from .conftest import make_taskrun, read_secret


@pytest.fixture
def proxy(controller):
    with FaultProxy(controller.kubeconfig) as p:
        yield p


def creates(kind: str, role: str | None = None):
    """Match the POST that creates a ``kind`` (and, for Leases, one of ``role``)."""
    def when(method: str, path: str, body: bytes) -> bool:
        if method != "POST" or not path.split("?")[0].endswith("/" + kind):
            return False
        if role is None:
            return True
        labels = (json.loads(body or b"{}").get("metadata") or {}).get("labels") or {}
        return labels.get(contract.LABEL_ROLE) == role
    return when


def provision_via(proxy, controller, tr):
    m = tr["metadata"]
    return start_task(load_task(task_path("mpc-provision")),
                      {"TASKRUN_NAME": m["name"], "TASKRUN_NAMESPACE": m["namespace"],
                       "TASKRUN_UID": m["uid"], "PLATFORM": "linux/arm64"},
                      kubeconfig=proxy.kubeconfig, namespace=controller.namespace,
                      taskrun_name=f"mpc-provision-{uuid.uuid4().hex[:6]}").wait()


def test_transient_api_faults_never_become_an_error_secret(controller, kube, namespace,
                                                           make_host, proxy):
    h = make_host()
    controller.install_pool([h], concurrency=1)
    tr = make_taskrun(kube, namespace)
    proxy.inject("429", 3)                      # the first requests: throttled
    proxy.inject("503", 2)
    proxy.inject("reset", 2)
    # the slot and the secret are created, but their answers are lost: the retried
    # create meets the object the first attempt made (409)
    proxy.inject("lost", 1, when=creates("leases", role="slot"))
    proxy.inject("lost", 1, when=creates("secrets"))
    r = provision_via(proxy, controller, tr)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.results == {"outcome": "served", "host": h.name}, r.stdout
    assert proxy.pending() == 0, "not every fault was hit"
    assert {k for k, _, _ in proxy.hits} == {"429", "503", "reset", "lost"}
    secret = read_secret(kube, tr)
    assert "error" not in secret
    user = secret["host"].split("@")[0]
    assert secret["host"] == f"{user}@{h.address}"
    assert user in h.users()
    [slot] = controller.leases("slot")          # the one the lost create made, kept as ours
    assert slot.metadata.labels[contract.LABEL_TASKRUN_UID] == tr["metadata"]["uid"]
    assert controller.leases("waiter") == []


def test_lost_create_of_the_waiter_keeps_the_build_queued_once(controller, kube, namespace,
                                                               make_host, proxy):
    """The platform is full; the waiter's create answer is lost. The build waits as one
    waiter and is served when the slot frees."""
    h = make_host()
    controller.install_pool([h], concurrency=1, maxWaitSeconds=120)
    busy, queued = make_taskrun(kube, namespace), make_taskrun(kube, namespace)
    assert controller.provision(busy).results["outcome"] == "served"
    proxy.inject("lost", 1, when=creates("leases", role="waiter"))
    proxy.inject("503", 3, when=lambda m, p, b: m == "GET" and "/leases" in p)
    run = start_task(load_task(task_path("mpc-provision")),
                     {"TASKRUN_NAME": queued["metadata"]["name"],
                      "TASKRUN_NAMESPACE": namespace, "TASKRUN_UID": queued["metadata"]["uid"],
                      "PLATFORM": "linux/arm64"},
                     kubeconfig=proxy.kubeconfig, namespace=controller.namespace,
                     taskrun_name=f"mpc-provision-{uuid.uuid4().hex[:6]}")
    wait_for("queued", lambda: controller.leases("waiter"), timeout=60)
    assert len(controller.leases("waiter")) == 1
    controller.deprovision(busy)
    run.wait(timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.results == {"outcome": "served", "host": h.name}
    assert proxy.pending() == 0
    assert "error" not in read_secret(kube, queued)
    assert controller.leases("waiter") == []


def test_a_404_naming_no_object_is_not_a_deleted_build(controller, kube, namespace,
                                                       make_host, proxy):
    """The fault: an API server that has just restarted answers "404 page not found" for
    TaskRuns until it has loaded their type. That says nothing about the build: the sweep
    retries and keeps the live build's slot and user, where reading it as "deleted"
    released a build still running."""
    h = make_host()
    controller.install_pool([h], concurrency=1)
    tr = make_taskrun(kube, namespace)
    assert controller.provision(tr).results["outcome"] == "served"
    user = read_secret(kube, tr)["host"].split("@")[0]
    proxy.inject("404", 3, when=lambda method, path, body:
                 method == "GET" and "/taskruns/" in path)
    r = start_task(load_task(task_path("mpc-sweep")), {}, kubeconfig=proxy.kubeconfig,
                   namespace=controller.namespace,
                   taskrun_name=f"mpc-sweep-{uuid.uuid4().hex[:6]}").wait()
    assert r.returncode == 0, r.stdout + r.stderr
    [slot] = controller.leases("slot")
    assert slot.metadata.labels[contract.LABEL_TASKRUN_UID] == tr["metadata"]["uid"]
    assert user in h.users()
    assert proxy.pending() == 0, "the sweep never read the build"
