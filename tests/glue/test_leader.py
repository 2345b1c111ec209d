"""Two watcher replicas with leader election (glue/leader.py), as the Deployment ships them:
one works, the other takes over when the leader dies, nothing is lost or duplicated."""
from __future__ import annotations

import time
import uuid

import pytest
import yaml
from kubernetes import client

from mpc.runner import contract as c
from tests.infra.faultproxy import FaultProxy
from tests.infra.procs import wait_for

from .support import build_taskrun
from .test_deploy import DEPLOY, _install_rbac, has_finalizer, kubectl, render

LEASE = "mpc-glue-leader"


def _holder(kube, ns: str) -> str:
    lease = client.CoordinationV1Api(kube).read_namespaced_lease(LEASE, ns)
    return (lease.spec.holder_identity or "") if lease.spec else ""


def _runs(tekton, ctrl_ns: str, uid: str, role: str) -> list[str]:
    return [p["metadata"]["name"] for p in tekton.list_pr(ctrl_ns)
            if p["metadata"]["labels"].get(c.LABEL_TASKRUN_UID) == uid
            and p["metadata"]["labels"].get(c.LABEL_ROLE) == role]


def test_a_standby_takes_over_when_the_leader_is_killed(cluster, kube, tekton, watcher,
                                                        namespace, ctrl_ns):
    _install_rbac(cluster, kube, ctrl_ns, "-" + uuid.uuid4().hex[:6])
    lease = next(d for d in render(cluster, DEPLOY) if d["kind"] == "Lease")
    lease["metadata"]["namespace"] = ctrl_ns
    kubectl(cluster, "apply", "-f", "-", input=yaml.safe_dump(lease))
    kc = cluster.serviceaccount_kubeconfig(ctrl_ns, c.WATCHER_SERVICE_ACCOUNT)
    args = ("--leader-elect", "--log-level", "debug")
    ws = {f"replica-{i}": watcher(*args, "--instance", f"replica-{i}", kubeconfig=kc)
          for i in range(2)}
    for w in ws.values():
        w.start().wait_ready()           # a standby is ready too: it serves probes
    wait_for("a leader", lambda: _holder(kube, ctrl_ns) in ws, timeout=30)
    leader = _holder(kube, ctrl_ns)
    (standby,) = set(ws) - {leader}

    uid1 = tekton.create_tr(namespace, build_taskrun("before"))["metadata"]["uid"]
    wait_for("provisioning run 1", lambda: _runs(tekton, ctrl_ns, uid1, "provision"), timeout=30)

    ws[leader].kill()                    # SIGKILL: no release, the lease must expire
    t0 = time.monotonic()
    wait_for("the standby leads", lambda: _holder(kube, ctrl_ns) == standby, timeout=60,
             log=ws[standby].log)
    print(f"\nleader handover after SIGKILL: {time.monotonic() - t0:.1f} s")

    # the new leader carries on with the build it inherited and takes new ones
    uid2 = tekton.create_tr(namespace, build_taskrun("after"))["metadata"]["uid"]
    wait_for("provisioning run 2", lambda: _runs(tekton, ctrl_ns, uid2, "provision"), timeout=30)
    tekton.finish_pr(ctrl_ns, c.provision_run_name(uid1), ok=True)
    tekton.finish_tr(namespace, "before", ok=True)
    wait_for("build 1 released by the new leader",
             lambda: not has_finalizer(tekton.get_tr(namespace, "before")), timeout=30,
             log=ws[standby].log)
    assert _runs(tekton, ctrl_ns, uid1, "deprovision") == [c.deprovision_run_name(uid1)]
    assert _runs(tekton, ctrl_ns, uid2, "provision") == [c.provision_run_name(uid2)]
    assert has_finalizer(tekton.get_tr(namespace, "after"))

    # a clean stop hands the lease back at once
    assert ws[standby].stop() == 0
    assert _holder(kube, ctrl_ns) == ""


@pytest.mark.parametrize("fault", ["503", "reset"])
def test_a_leader_that_cannot_renew_stops_and_a_standby_takes_over(
        cluster, kube, watcher, ctrl_ns, fault):
    """The fault: the leader's renewals fail (503s, or connections reset as by an API
    server restarting, through a proxy in front of it). It must stop leading once
    --renew-deadline passed and exit (to restart as a candidate), never keep working on a
    Lease it may have lost; the standby takes over."""
    _install_rbac(cluster, kube, ctrl_ns, "-" + uuid.uuid4().hex[:6])
    lease = next(d for d in render(cluster, DEPLOY) if d["kind"] == "Lease")
    lease["metadata"]["namespace"] = ctrl_ns
    kubectl(cluster, "apply", "-f", "-", input=yaml.safe_dump(lease))
    kc = cluster.serviceaccount_kubeconfig(ctrl_ns, c.WATCHER_SERVICE_ACCOUNT)
    timing = ("--lease-duration", "10s", "--renew-deadline", "6s", "--retry-period", "1s")
    with FaultProxy(kc) as proxy:
        first = watcher("--leader-elect", *timing, "--instance", "cut-off",
                        kubeconfig=proxy.kubeconfig).start()
        wait_for("the first replica leads", lambda: _holder(kube, ctrl_ns) == "cut-off",
                 timeout=30, log=first.log)
        second = watcher("--leader-elect", *timing, "--instance", "standby",
                         kubeconfig=kc).start()
        second.wait_ready()
        lease = lambda method, path, body: f"/leases/{LEASE}" in path  # noqa: E731
        # a blip shorter than --renew-deadline costs nothing: the next renewal succeeds
        # (a reset connection is retried 3 times by urllib3 itself: 6 fail one attempt)
        proxy.inject(fault, times={"503": 2, "reset": 6}[fault], when=lease)
        wait_for("the blip", lambda: proxy.pending() == 0, timeout=30)
        time.sleep(3)
        assert first.proc.poll() is None and _holder(kube, ctrl_ns) == "cut-off"
        proxy.inject(fault, times=10_000, when=lease)
        assert first.wait_exit(timeout=30) == 1      # lost leadership: restart, never stale
        wait_for("the standby leads", lambda: _holder(kube, ctrl_ns) == "standby",
                 timeout=30, log=second.log)
        assert "lost leadership" in first.log_text()
        second.stop()
