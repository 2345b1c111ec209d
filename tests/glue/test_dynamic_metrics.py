"""The watcher exports the cloud VMs of dynamic platforms from the Leases the provisioning
Tasks keep (issue 15): a Task pod's own counters would die with it."""
from __future__ import annotations

import json

from kubernetes import client

from mpc.runner import contract as c
from mpc.runner import vms
from tests.infra.procs import wait_for

PLATFORM = "linux/arm64"


def _lease(kube, ns: str, name: str, role: str, labels: dict | None = None,
           annotations: dict | None = None) -> None:
    client.CoordinationV1Api(kube).create_namespaced_lease(ns, client.V1Lease(
        metadata=client.V1ObjectMeta(
            name=name, labels={c.LABEL_MANAGED: c.MANAGED_VALUE, c.LABEL_ROLE: role,
                               **(labels or {})},
            annotations={c.ANN_PLATFORM: PLATFORM, **(annotations or {})}),
        spec=client.V1LeaseSpec(holder_identity="test")))


def test_watcher_exports_dynamic_hosts_from_their_leases(kube, watcher, ctrl_ns):
    w = watcher().start().wait_ready()
    # two VMs: one ready with a build on it (busy), one booting; counters of the platform
    _lease(kube, ctrl_ns, "vm-a", c.ROLE_VM, {c.LABEL_VM_STATE: vms.READY})
    _lease(kube, ctrl_ns, "vm-b", c.ROLE_VM, {c.LABEL_VM_STATE: vms.BOOTING})
    _lease(kube, ctrl_ns, "vm-a-build-0", c.ROLE_VM_BUILD, {c.LABEL_VM: "vm-a"})
    _lease(kube, ctrl_ns, "stats-0", c.ROLE_VM_STATS, annotations={c.ANN_VM_STATS: json.dumps({
        "launches": 3, "launch_failures": 1, "warm_claims": 2, "quota_blocked": 4,
        "orphans_terminated": 1,
        "boot_seconds": {"buckets": {"10": 2, "30": 1}, "sum": 41.5, "count": 3}})})
    p = {"platform": PLATFORM}
    wait_for("VM gauges", lambda: w.metric("mpc_glue_dynamic_instances", state="busy", **p)
             == 1, timeout=30, log=w.log)
    assert w.metric("mpc_glue_dynamic_instances", state="booting", **p) == 1
    assert w.metric("mpc_glue_dynamic_instances", state="idle", **p) == 0
    assert w.metric("mpc_glue_dynamic_builds", **p) == 1
    assert w.metric("mpc_glue_dynamic_launches_total", **p) == 3
    assert w.metric("mpc_glue_dynamic_quota_blocked_total", **p) == 4
    assert w.metric("mpc_glue_dynamic_boot_seconds_count", **p) == 3
    assert w.metric("mpc_glue_dynamic_boot_seconds_bucket", le="30.0", **p) == 3
    # a VM record that goes away leaves the gauges
    client.CoordinationV1Api(kube).delete_namespaced_lease("vm-b", ctrl_ns)
    wait_for("VM gone", lambda: w.metric("mpc_glue_dynamic_instances", state="booting", **p)
             == 0, timeout=30, log=w.log)
