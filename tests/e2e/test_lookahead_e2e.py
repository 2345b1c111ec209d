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
                   builds: dict[str, list[str] | None] | None = None) -> dict:
    """``prep`` (sleeps, like a clone would take), then each of ``builds`` (task name ->
    the PLATFORM values its matrix fans out over, or None for a plain task; default: one
    plain task ``build``): a Task that asks for a platform and mounts its build secret, as
    buildah-remote does."""
    build_spec = {
        "params": [{"name": c.PLATFORM_PARAM, "type": "string"}],
        "volumes": [{"name": "ssh", "secret": {
            "secretName": c.SECRET_PREFIX + "$(context.taskRun.name)"}}],
        "steps": [{"name": "build", "image": BUSYBOX,
                   "volumeMounts": [{"name": "ssh", "mountPath": "/ssh"}],
                   "script": "#!/bin/sh\nset -e\ntest -f /ssh/id_rsa\ncat /ssh/host\n"}]}
    tasks = [{"name": "prep", "taskSpec": {"steps": [{
        "name": "wait", "image": BUSYBOX, "script": f"#!/bin/sh\nsleep {prep_seconds}\n"}]}}]
    for task, matrix in (builds or {"build": None}).items():
        tasks.append({"name": task, "runAfter": ["prep"], "taskSpec": build_spec,
                      **({"matrix": {"params": [{"name": "PLATFORM", "value": matrix}]}}
                         if matrix else
                         {"params": [{"name": "PLATFORM", "value": "$(params.PLATFORM)"}]})})
    body = {"apiVersion": "tekton.dev/v1", "kind": "PipelineRun",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"params": [{"name": "PLATFORM", "value": PLATFORM}], "pipelineSpec": {
                "params": [{"name": "PLATFORM", "type": "string"}], "tasks": tasks}}}
    return _co(inst.kube).create_namespaced_custom_object("tekton.dev", "v1", ns,
                                                          "pipelineruns", body)


def nothing_held(inst: Install) -> bool:
    return not inst.slots() and inst.build_users() == {h.name: [] for h in inst.hosts}


def provisioned_ahead_then_served(inst: Install, ns: str, name: str,
                                  builds: dict[str, list[str] | None], children: list[str]):
    """Start PipelineRun ``name``: each of ``children`` (the build TaskRuns it will create)
    is provisioned while ``prep`` runs, before its TaskRun exists, once (keyed by the
    prediction: no run for the TaskRun's own uid), served, and released when it is done."""
    with pool_setting(inst, "lookAhead", True):
        wait_for("the hosts free", lambda: nothing_held(inst), interval=0.3)
        pr = start_pipeline(inst, ns, name, prep_seconds=45, builds=builds)
        for child in children:
            wait_for(f"{child}'s secret", lambda child=child: secret_exists(
                inst, ns, c.secret_name(child)), interval=0.3)
        assert [get(inst, ns, "taskruns", child) for child in children] == [None] * len(children)
        assert sum(map(len, inst.build_users().values())) == len(children)
        assert len(inst.slots()) == len(children)
        for child in children:
            key = c.predicted_uid(pr["metadata"]["uid"], child)
            prov = get(inst, NS, "pipelineruns", c.provision_run_name(key))
            assert prov is None or _cond(prov).get("status") != "False", prov

        done = wait_done(inst, ns, "pipelineruns", name)
        assert _cond(done).get("status") == "True", _cond(done)
        for child in children:
            tr = get(inst, ns, "taskruns", child)
            assert _cond(tr).get("status") == "True", (child, _cond(tr))
            assert get(inst, NS, "pipelineruns",
                       c.provision_run_name(tr["metadata"]["uid"])) is None, child
        wait_for("their hosts released", lambda: nothing_held(inst), interval=0.5)
        for child in children:
            wait_for(f"{child}'s secret deleted",
                     lambda child=child: not secret_exists(inst, ns, c.secret_name(child)))


def test_predicted_builds_find_their_secrets_there_when_their_taskruns_start(mpc, e2e_namespace):
    """A plain task, and a matrix of one value (Konflux's one-platform case: Tekton names
    its one TaskRun like a plain task's)."""
    provisioned_ahead_then_served(mpc, e2e_namespace, "ahead",
                                  {"build": None, "one": [PLATFORM]}, ["ahead-build", "ahead-one"])


def test_a_matrix_over_platform_is_predicted_child_by_child(mpc, e2e_namespace):
    """Tekton names the TaskRuns of a matrix ``-<i>``."""
    provisioned_ahead_then_served(mpc, e2e_namespace, "fan", {"build": [PLATFORM] * 2},
                                  ["fan-build-0", "fan-build-1"])


def test_predicted_builds_never_created_release_their_slots_and_users(mpc, e2e_namespace):
    """One PipelineRun is cancelled and another deleted, each before it creates the build
    that was provisioned for it: each build's slot, user and secret go."""
    inst, ns = mpc, e2e_namespace
    ends = {"never-c": "cancelled", "never-d": "deleted"}
    with pool_setting(inst, "lookAhead", True):
        wait_for("the hosts free", lambda: nothing_held(inst), interval=0.3)
        held = {}       # PipelineRun -> (its build's slot holder key, user, secret)
        for name in ends:
            pr = start_pipeline(inst, ns, name, prep_seconds=300)
            child, key = f"{name}-build", c.predicted_uid(pr["metadata"]["uid"], f"{name}-build")
            held[name] = (key, c.build_user(ns, child, key), c.secret_name(child))
        for name, (_, _, secret) in held.items():
            wait_for(f"{name}'s predicted build provisioned",
                     lambda secret=secret: secret_exists(inst, ns, secret), interval=0.3)
        users = [u for us in inst.build_users().values() for u in us]
        assert sorted(users) == sorted(user for _, user, _ in held.values())
        assert len(inst.slots()) == 2
        t0 = time.monotonic()
        co = _co(inst.kube)
        co.patch_namespaced_custom_object("tekton.dev", "v1", ns, "pipelineruns", "never-c",
                                          {"spec": {"status": "Cancelled"}})
        co.delete_namespaced_custom_object("tekton.dev", "v1", ns, "pipelineruns", "never-d")
        released: dict[str, float] = {}

        def all_released() -> bool:
            slots = inst.slot_holders()
            users = {u for us in inst.build_users().values() for u in us}
            for name, (key, user, secret) in held.items():
                if name not in released and key not in slots and user not in users \
                        and not secret_exists(inst, ns, secret):
                    released[name] = time.monotonic() - t0
            return len(released) == len(held)

        wait_for("their slots, users and secrets released", all_released, interval=0.5)
        for name, end in ends.items():
            print(f"\nFIGURES predicted build never created ({end}): host released "
                  f"{released[name]:.1f} s after")
            assert get(inst, ns, "taskruns", f"{name}-build") is None     # it never existed
        assert nothing_held(inst)
