"""Failover, hosts down, builds deleted mid-provision, hostile input, the sweep."""
from __future__ import annotations

import os
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import config as kconfig

from mpc.runner import contract
from mpc.runner.kube import Kube
from mpc.runner.deprovision import deprovision
from mpc.runner.provision import Request, provision
from tests.infra.procs import wait_for

from .conftest import delete_taskrun, make_taskrun, read_secret


def test_host_down_fails_over(controller, kube, namespace, make_host):
    down, up = make_host(), make_host()
    controller.install_pool([down, up], concurrency=2)
    down.stop()
    tr = make_taskrun(kube, namespace)
    r = controller.provision(tr)
    assert r.results == {"outcome": "served", "host": up.name}
    assert read_secret(kube, tr)["host"].endswith("@" + up.address)
    # the slot on the dead host was released or kept for the sweep, never both
    held = {l.metadata.labels[contract.LABEL_HOST] for l in controller.leases("slot")}
    assert up.name in held


def test_all_hosts_down_gives_error_naming_them(controller, kube, namespace, make_host):
    a, b = make_host(), make_host()
    controller.install_pool([a, b])
    a.stop()
    b.stop()
    tr = make_taskrun(kube, namespace)
    r = controller.provision(tr)
    assert r.results["outcome"] == "error"
    msg = read_secret(kube, tr)["error"]
    assert "provisioning failed on every host of platform linux/arm64" in msg
    assert a.name in msg and b.name in msg


def test_wrong_pinned_host_key_is_a_host_failure(controller, kube, namespace, make_host):
    a, b = make_host(), make_host()
    controller.install_pool([a, b], **{f"host_{a.name}": {"hostKey": b.host_public_key}})
    tr = make_taskrun(kube, namespace)
    r = controller.provision(tr)
    assert r.results == {"outcome": "served", "host": b.name}
    assert not any(u.startswith("u-") for u in a.users())


def test_taskrun_deleted_mid_provision_leaves_nothing(controller, kube, namespace, make_host):
    h = make_host()
    controller.install_pool([h], concurrency=1)
    tr = make_taskrun(kube, namespace)
    run = controller.start("mpc-provision", tr, PLATFORM="linux/arm64")
    wait_for("slot taken", lambda: controller.leases("slot"), timeout=60, interval=0.01)
    delete_taskrun(kube, tr)
    run.wait().check()
    controller.deprovision(tr)
    assert read_secret(kube, tr) is None
    assert not any(u.startswith("u-") for u in h.users())
    assert controller.leases("slot") == [] and controller.leases("waiter") == []


def test_taskrun_deleted_while_queued_leaves_the_queue(controller, kube, namespace, make_host):
    h = make_host()
    controller.install_pool([h], concurrency=1)
    busy, queued = make_taskrun(kube, namespace), make_taskrun(kube, namespace)
    controller.provision(busy)
    run = controller.start("mpc-provision", queued, PLATFORM="linux/arm64")
    wait_for("queued", lambda: controller.leases("waiter"), timeout=60)
    delete_taskrun(kube, queued)
    run.wait(timeout=120).check()
    assert run.results["outcome"] == "gone"
    assert controller.leases("waiter") == []
    assert read_secret(kube, queued) is None


def test_sweep_removes_orphan_slot_and_stray_user(controller, kube, namespace, make_host):
    h = make_host()
    controller.install_pool([h], concurrency=2)
    kept, orphan = make_taskrun(kube, namespace), make_taskrun(kube, namespace)
    controller.provision(kept)
    controller.provision(orphan)
    orphan_user = read_secret(kube, orphan)["host"].split("@")[0]
    kept_user = read_secret(kube, kept)["host"].split("@")[0]
    # the build vanished without deprovisioning (e.g. finalizer removed by hand)
    delete_taskrun(kube, orphan)
    stray = "u-" + "0" * 24
    h.exec(f"useradd -m {stray}")
    r = controller.start("mpc-sweep").wait().check()
    assert r.results["removed-users"] == "2"
    users = h.users()
    assert kept_user in users and orphan_user not in users and stray not in users
    held = [l.metadata.annotations[contract.ANN_USER] for l in controller.leases("slot")]
    assert held == [kept_user]
    assert read_secret(kube, kept) is not None
    # sweeping again finds nothing
    assert controller.start("mpc-sweep").wait().check().results["removed-users"] == "0"


HOSTILE = st.text(alphabet=string.printable + "$`'\"\\;|&()<>{}*?!#~\n\t é", min_size=1, max_size=40)


@pytest.fixture
def hostile_env(controller, kube, namespace, make_host):
    h = make_host()
    controller.install_pool([h], concurrency=1, maxWaitSeconds=0)
    canary = "/tmp/mpc-canary"
    return controller, h, canary


def test_hostile_params_never_run_on_a_host(hostile_env, kube, namespace):
    controller, h, canary = hostile_env
    kc = Kube(kconfig.new_client_from_config(str(controller.kubeconfig), persist_config=False))
    payload = f"x; touch {canary}; $(touch {canary}) `touch {canary}`"
    tr = make_taskrun(kube, namespace)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(name=HOSTILE, ns=HOSTILE, platform=HOSTILE, uid=HOSTILE)
    def one(name, ns, platform, uid):
        for req in (
            Request(name + payload, ns, uid, platform, controller.namespace),
            Request(tr["metadata"]["name"], namespace, tr["metadata"]["uid"], platform + payload,
                    controller.namespace, max_wait_seconds=0),
        ):
            out = provision(kc, req, poll=0.05)
            assert out.result in ("gone", "error", "served")
            if out.result == "served":
                deprovision(kc, controller.namespace, namespace, tr["metadata"]["name"],
                            tr["metadata"]["uid"], provisioning_grace=0)
    one()
    # the same through the real step process, with the payload in every param
    r = controller.start("mpc-provision", None, TASKRUN_NAME=payload, TASKRUN_NAMESPACE=payload,
                         TASKRUN_UID=payload, PLATFORM=payload).wait().check()
    assert r.results["outcome"] == "gone"
    assert h.exec(f"test -e {canary}", check=False).returncode == 1
    assert not os.path.exists(canary)
