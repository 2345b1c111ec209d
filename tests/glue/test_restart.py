"""Kill the watcher right after each of its writes (and while the world moves on without
it): a restarted watcher reaches the same end state and never duplicates anything."""
from __future__ import annotations

import pytest

from mpc.runner import contract as c
from tests.infra.procs import wait_for

from .support import build_taskrun
from .test_lifecycle import events_for, has_finalizer, prs_for

CRASHED = 70


def crash(w, step):
    w.start(crash_after=step)
    assert w.wait_exit(60) == CRASHED, w.log_text()[-2000:]


@pytest.mark.parametrize("step", ["finalizer-added", "provision-created",
                                  "deprovision-created", "finalizer-removed"])
def test_restart_after_each_step_of_a_completed_build(tekton, watcher, namespace, ctrl_ns,
                                                      kube, step):
    w = watcher()
    uid = tekton.create_tr(namespace, build_taskrun("b"))["metadata"]["uid"]
    prov, deprov = c.provision_run_name(uid), c.deprovision_run_name(uid)
    if step in ("finalizer-added", "provision-created"):
        crash(w, step)
        assert has_finalizer(tekton.get_tr(namespace, "b"))
        assert (tekton.get_pr(ctrl_ns, prov) is not None) == (step == "provision-created")
    w.start().wait_ready()
    wait_for("provisioning run", lambda: tekton.get_pr(ctrl_ns, prov), timeout=30, log=w.log)
    prov_uid = tekton.get_pr(ctrl_ns, prov)["metadata"]["uid"]
    w.kill()                      # the build runs and ends while the watcher is down
    tekton.finish_pr(ctrl_ns, prov, ok=True)
    tekton.finish_tr(namespace, "b", ok=True)
    if step in ("deprovision-created", "finalizer-removed"):
        crash(w, step)
        assert tekton.get_pr(ctrl_ns, deprov) is not None
        assert has_finalizer(tekton.get_tr(namespace, "b")) == (step == "deprovision-created")
        # the provisioning run is still the same one: never re-created
        assert tekton.get_pr(ctrl_ns, prov)["metadata"]["uid"] == prov_uid
    w.start().wait_ready()
    wait_for("finalizer removed", lambda: not has_finalizer(tekton.get_tr(namespace, "b")),
             timeout=30, log=w.log)
    wait_for("deprovisioning run", lambda: tekton.get_pr(ctrl_ns, deprov), timeout=30)
    deprov_uid = tekton.get_pr(ctrl_ns, deprov)["metadata"]["uid"]
    tr = tekton.get_tr(namespace, "b")
    assert (tr["metadata"].get("finalizers") or []).count(c.FINALIZER) == 0
    runs = prs_for(tekton, ctrl_ns, uid)
    assert sorted(r["metadata"]["name"] for r in runs) in ([deprov], sorted([prov, deprov]))
    # one more restart changes nothing
    w.kill()
    w.start().wait_ready()
    tekton.finish_pr(ctrl_ns, deprov, ok=True)
    wait_for("runs collected", lambda: prs_for(tekton, ctrl_ns, uid) == [], timeout=30,
             log=w.log)
    assert w.metric("mpc_glue_runs_started_total") == 0  # this process started nothing
    evs = events_for(kube, namespace, "b")
    assert len(evs) == len(set(evs)), evs
    assert deprov_uid


def test_restart_after_cancelling_a_deleted_build(tekton, watcher, namespace, ctrl_ns):
    w = watcher()
    uid = tekton.create_tr(namespace, build_taskrun("d"))["metadata"]["uid"]
    prov, deprov = c.provision_run_name(uid), c.deprovision_run_name(uid)
    w.start().wait_ready()
    wait_for("provisioning run", lambda: tekton.get_pr(ctrl_ns, prov), timeout=30, log=w.log)
    w.kill()
    tekton.delete_tr(namespace, "d")
    crash(w, "cancel-requested")
    assert tekton.get_pr(ctrl_ns, prov)["spec"]["status"] == "Cancelled"
    assert tekton.get_tr(namespace, "d") is not None  # held by the finalizer
    w.start().wait_ready()
    tekton.finish_pr(ctrl_ns, prov, ok=False, reason="Cancelled")
    wait_for("TaskRun deleted", lambda: tekton.get_tr(namespace, "d") is None, timeout=30,
             log=w.log)
    assert {r["metadata"]["name"] for r in prs_for(tekton, ctrl_ns, uid)} <= {prov, deprov}
    assert tekton.get_pr(ctrl_ns, deprov) is not None
