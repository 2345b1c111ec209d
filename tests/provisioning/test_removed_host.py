"""A host removed from (or renamed in) the pool keeps its running builds' slots; when
they end, deprovisioning and the sweep still remove their users, reaching the host as
the slot recorded it. An unreachable removed host's slots are released after the grace."""
from __future__ import annotations

import uuid

import yaml

from mpc.runner import contract
from tests.infra.steprunner import load_task, start_task, task_path

from .conftest import make_taskrun, read_secret
from .test_finished import build_users, finish, user_of


def sweep(controller, **env):
    return start_task(load_task(task_path("mpc-sweep")), {}, kubeconfig=controller.kubeconfig,
                      namespace=controller.namespace, taskrun_name=f"sweep-{uuid.uuid4().hex[:6]}",
                      extra_env=env).wait()


def test_removed_host_builds_are_cleaned_up_when_they_end(controller, kube, namespace,
                                                          make_host):
    h = make_host()
    controller.install_pool([h], concurrency=2)
    a, b = make_taskrun(kube, namespace), make_taskrun(kube, namespace)
    for tr in (a, b):
        assert controller.provision(tr).results == {"outcome": "served", "host": h.name}
    assert sorted(build_users(h)) == sorted([user_of(kube, a), user_of(kube, b)])

    controller.set_pool_text(yaml.safe_dump({"hosts": []}))      # the host leaves the pool
    # builds still running keep their slots: a sweep takes nothing from them
    assert sweep(controller).returncode == 0
    assert len(controller.leases("slot")) == 2 and len(build_users(h)) == 2

    controller.deprovision(a)                                    # one ends: deprovisioning
    assert build_users(h) == [user_of(kube, b)]
    finish(kube, b, "True")                                      # the other: the sweep
    r = sweep(controller)
    assert r.returncode == 0, r.stdout + r.stderr
    assert build_users(h) == []
    assert controller.leases("slot") == []


def test_renamed_host_keeps_running_users_and_cleans_up_after(controller, kube, namespace,
                                                              make_host):
    h = make_host()
    doc = controller.install_pool([h], concurrency=2)
    tr = make_taskrun(kube, namespace)
    controller.provision(tr)
    user = user_of(kube, tr)
    doc["hosts"][0]["name"] = "renamed"                          # same machine, new name
    controller.set_pool_text(yaml.safe_dump(doc))
    assert sweep(controller).returncode == 0
    assert build_users(h) == [user], "the sweep took a running build's user for a stray"
    assert read_secret(kube, tr) is not None
    controller.deprovision(tr)
    assert build_users(h) == []
    assert controller.leases("slot") == []


def test_unreachable_removed_host_is_released_after_the_grace(controller, kube, namespace,
                                                              make_host):
    h = make_host()
    controller.install_pool([h], concurrency=1)
    tr = make_taskrun(kube, namespace)
    controller.provision(tr)
    controller.set_pool_text(yaml.safe_dump({"hosts": []}))
    h.stop()
    finish(kube, tr, "False")
    # first failure: the slot is kept and the time is recorded on it
    first = sweep(controller, REMOVED_HOST_GRACE_SECONDS="0")
    assert first.returncode != 0
    assert "removed host unreachable" in first.stdout
    [slot] = controller.leases("slot")
    assert slot.metadata.annotations[contract.ANN_UNREACHABLE_SINCE]
    # still unreachable once the grace has passed: released, with a warning
    second = sweep(controller, REMOVED_HOST_GRACE_SECONDS="0")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "users NOT removed" in second.stdout
    assert controller.leases("slot") == []
