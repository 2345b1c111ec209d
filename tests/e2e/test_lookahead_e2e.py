"""Look-ahead on the real node (issue 14 goal 1): with the pool's ``lookAhead``, a build
that a PipelineRun will create is provisioned while the tasks before it run, so its
secret is there before its TaskRun; and a predicted build the PipelineRun never creates
(cancelled before it) gives its slot, its user and its secret back. Real Tekton runs the
PipelineRuns, the released watcher and Tasks do the rest, the hosts are real sshd hosts.
"""
from __future__ import annotations

import time

import pytest

from mpc.runner import contract as c

from . import images
from .install import (NS, PLATFORM, Install, _co, _cond, get, pool_setting,
                      secret_exists, wait_done, wait_for)

pytestmark = pytest.mark.e2e

BUSYBOX = images.BUSYBOX.ref


def start_pipeline(inst: Install, ns: str, name: str, prep_seconds: int,
                   matrix: list[str] | None = None) -> dict:
    """``prep`` (sleeps, like a clone would take) then ``build``: a Task that asks for a
    platform and mounts its build secret, as buildah-remote does (``matrix``: fanned out
    over these PLATFORM values)."""
    build_spec = {
        "params": [{"name": c.PLATFORM_PARAM, "type": "string"}],
        "volumes": [{"name": "ssh", "secret": {
            "secretName": c.SECRET_PREFIX + "$(context.taskRun.name)"}}],
        "steps": [{"name": "build", "image": BUSYBOX,
                   "volumeMounts": [{"name": "ssh", "mountPath": "/ssh"}],
                   "script": "#!/bin/sh\nset -e\ntest -f /ssh/id_rsa\ncat /ssh/host\n"}]}
    body = {"apiVersion": "tekton.dev/v1", "kind": "PipelineRun",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"params": [{"name": "PLATFORM", "value": PLATFORM}], "pipelineSpec": {
                "params": [{"name": "PLATFORM", "type": "string"}],
                "tasks": [
                    {"name": "prep", "taskSpec": {"steps": [{
                        "name": "wait", "image": BUSYBOX,
                        "script": f"#!/bin/sh\nsleep {prep_seconds}\n"}]}},
                    {"name": "build", "runAfter": ["prep"], "taskSpec": build_spec,
                     **({"matrix": {"params": [{"name": "PLATFORM", "value": matrix}]}}
                        if matrix else
                        {"params": [{"name": "PLATFORM", "value": "$(params.PLATFORM)"}]})}]}}}
    return _co(inst.kube).create_namespaced_custom_object("tekton.dev", "v1", ns,
                                                          "pipelineruns", body)


def nothing_held(inst: Install) -> bool:
    return not inst.slots() and inst.build_users() == {h.name: [] for h in inst.hosts}


def test_a_predicted_build_finds_its_secret_there_when_its_taskrun_starts(mpc, e2e_namespace):
    inst, ns = mpc, e2e_namespace
    with pool_setting(inst, "lookAhead", True):
        wait_for("the hosts free", lambda: nothing_held(inst), interval=0.3)
        pr = start_pipeline(inst, ns, "ahead", prep_seconds=45)
        child = "ahead-build"
        key = c.predicted_uid(pr["metadata"]["uid"], child)
        wait_for("the predicted build's secret", lambda: secret_exists(
            inst, ns, c.secret_name(child)), interval=0.3)
        # provisioned while prep still runs: the build TaskRun does not exist yet
        assert get(inst, ns, "taskruns", child) is None
        assert any(inst.build_users().values()) and len(inst.slots()) == 1
        prov = get(inst, NS, "pipelineruns", c.provision_run_name(key))
        assert prov is None or _cond(prov).get("status") != "False", prov

        done = wait_done(inst, ns, "pipelineruns", "ahead")
        assert _cond(done).get("status") == "True", _cond(done)
        tr = get(inst, ns, "taskruns", child)
        assert _cond(tr).get("status") == "True", _cond(tr)
        wait_for("its host released", lambda: nothing_held(inst), interval=0.5)
        wait_for("its secret deleted", lambda: not secret_exists(inst, ns, c.secret_name(child)))
        # one provisioning, keyed by the prediction: none for the TaskRun's own uid
        assert get(inst, NS, "pipelineruns", c.provision_run_name(tr["metadata"]["uid"])) is None


@pytest.mark.parametrize("fan_out", [1, 2])
def test_a_matrix_over_platform_is_predicted_child_by_child(mpc, e2e_namespace, fan_out):
    """Tekton names the TaskRuns of a matrix ``-<i>``, and the one TaskRun of a matrix of
    one like a plain task's: each is provisioned before it exists, under its real name."""
    inst, ns = mpc, e2e_namespace
    name = f"fan{fan_out}"
    children = [f"{name}-build"] if fan_out == 1 else [f"{name}-build-{i}"
                                                      for i in range(fan_out)]
    with pool_setting(inst, "lookAhead", True):
        wait_for("the hosts free", lambda: nothing_held(inst), interval=0.3)
        start_pipeline(inst, ns, name, prep_seconds=45, matrix=[PLATFORM] * fan_out)
        for child in children:
            wait_for(f"{child}'s secret", lambda child=child: secret_exists(
                inst, ns, c.secret_name(child)), interval=0.3)
        assert [get(inst, ns, "taskruns", child) for child in children] == [None] * fan_out
        assert len(inst.slots()) == fan_out

        done = wait_done(inst, ns, "pipelineruns", name)
        assert _cond(done).get("status") == "True", _cond(done)
        for child in children:
            tr = get(inst, ns, "taskruns", child)
            assert _cond(tr).get("status") == "True", (child, _cond(tr))
            assert get(inst, NS, "pipelineruns",
                       c.provision_run_name(tr["metadata"]["uid"])) is None, child
        wait_for("their hosts released", lambda: nothing_held(inst), interval=0.5)


@pytest.mark.parametrize("end", ["cancelled", "deleted"])
def test_a_predicted_build_never_created_releases_its_slot_and_user(mpc, e2e_namespace, end):
    inst, ns = mpc, e2e_namespace
    with pool_setting(inst, "lookAhead", True):
        wait_for("the hosts free", lambda: nothing_held(inst), interval=0.3)
        start_pipeline(inst, ns, "never", prep_seconds=300)
        child = "never-build"
        wait_for("the predicted build provisioned", lambda: secret_exists(
            inst, ns, c.secret_name(child)), interval=0.3)
        assert len(inst.slots()) == 1 and any(inst.build_users().values())
        t0 = time.monotonic()
        co = _co(inst.kube)
        if end == "cancelled":
            co.patch_namespaced_custom_object("tekton.dev", "v1", ns, "pipelineruns", "never",
                                              {"spec": {"status": "Cancelled"}})
        else:
            co.delete_namespaced_custom_object("tekton.dev", "v1", ns, "pipelineruns", "never")
        wait_for("its slot and user released", lambda: nothing_held(inst), interval=0.5)
        wait_for("its secret deleted", lambda: not secret_exists(inst, ns, c.secret_name(child)))
        print(f"\nFIGURES predicted build never created ({end}): host released "
              f"{time.monotonic() - t0:.1f} s after")
        assert get(inst, ns, "taskruns", child) is None     # it never existed
