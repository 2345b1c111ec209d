"""Builds of a full platform wait in the watcher, FIFO, not as provisioning pods (issue 11).

The watcher admits a build (creates its provisioning run) only while the platform
has a free slot that no earlier build is about to take; it learns the slots from
the Leases the provisioning Tasks take (here taken through the Tasks' own code,
``mpc.runner.slots``) and frees them as the deprovisioning Task does.
"""
from __future__ import annotations

import time

import yaml
from kubernetes import client

from mpc.runner import contract as c
from mpc.runner import hostpool
from mpc.runner.kube import Kube as RunnerKube
from mpc.runner.slots import Holder, Slots
from tests.infra.procs import wait_for

from .support import build_taskrun
from .test_lifecycle import events_for

PLATFORM = "linux/arm64"


def _pool(kube, ctrl_ns: str, hosts: list[dict], **extra) -> hostpool.Pool:
    doc = {"hosts": [{"address": "192.0.2.1", "user": "admin", "secret": "admin-key",
                      "platform": PLATFORM, "concurrency": 1, **h} for h in hosts], **extra}
    client.CoreV1Api(kube).create_namespaced_config_map(ctrl_ns, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name=c.HOST_POOL_CONFIGMAP),
        data={c.POOL_KEY: yaml.safe_dump(doc)}))
    return hostpool.parse_yaml(yaml.safe_dump(doc))


def _builds(tekton, namespace: str, names: list[str]) -> dict[str, str]:
    """name -> uid, each created in a later second than the one before (FIFO is by the
    API server's creationTimestamp, which has whole seconds)."""
    uids = {}
    for n in names:
        tr = tekton.create_tr(namespace, build_taskrun(n, platform=PLATFORM))
        uids[n] = tr["metadata"]["uid"]
        while tekton.get_tr(namespace, n)["metadata"]["creationTimestamp"] == \
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()):
            time.sleep(0.1)
    return uids


def _reasons(kube, namespace: str, name: str) -> set[str]:
    return {reason for _, reason in events_for(kube, namespace, name)}


def _queued(kube, namespace: str, name: str) -> bool:
    return "Queued" in _reasons(kube, namespace, name)


def test_full_platform_waits_in_the_watcher_and_a_freed_slot_serves_the_oldest(
        kube, tekton, watcher, namespace, ctrl_ns):
    pool = _pool(kube, ctrl_ns, [{"name": "h1"}])
    w = watcher().start().wait_ready()
    uids = _builds(tekton, namespace, ["b1", "b2", "b3"])
    prov = {n: c.provision_run_name(u) for n, u in uids.items()}
    wait_for("b1 provisioning", lambda: tekton.get_pr(ctrl_ns, prov["b1"]), timeout=30, log=w.log)
    for n in ("b2", "b3"):
        wait_for(f"{n} queued", lambda n=n: _queued(kube, namespace, n), timeout=30, log=w.log)
    # b1's provisioning Task takes the one slot and succeeds: still no room for anyone
    slots = Slots(RunnerKube(kube), ctrl_ns)
    slot = slots.try_take(pool.host("h1"), 0,
                          Holder(namespace, "b1", uids["b1"], PLATFORM))
    assert slot is not None
    tekton.finish_pr(ctrl_ns, prov["b1"], ok=True)
    wait_for("b1 provisioned", lambda: "Provisioned" in _reasons(kube, namespace, "b1"),
             timeout=30, log=w.log)
    assert tekton.get_pr(ctrl_ns, prov["b2"]) is None
    assert tekton.get_pr(ctrl_ns, prov["b3"]) is None
    # b1 ends; its deprovisioning frees the slot: the oldest waiter (b2) gets it, b3 waits on
    tekton.finish_tr(namespace, "b1", ok=True)
    wait_for("b1 deprovisioning", lambda: tekton.get_pr(ctrl_ns, c.deprovision_run_name(
        uids["b1"])), timeout=30, log=w.log)
    def b3_decisions() -> int:
        return sum('"platform full; build waits"' in line and uids["b3"] in line
                   for line in w.log_text().splitlines())
    before = b3_decisions()
    slots.release(slot)
    wait_for("b2 provisioning", lambda: tekton.get_pr(ctrl_ns, prov["b2"]), timeout=30,
             log=w.log)
    # b2's admission makes the next waiter look at once: b3 sees no room left
    wait_for("b3 looked at again", lambda: b3_decisions() > before, timeout=40, log=w.log)
    assert tekton.get_pr(ctrl_ns, prov["b3"]) is None


def test_a_draining_host_admits_nothing_and_a_waiting_build_times_out(
        kube, tekton, watcher, namespace, ctrl_ns):
    _pool(kube, ctrl_ns, [{"name": "h1", "drain": True}], maxWaitSeconds=3)
    w = watcher().start().wait_ready()
    uid = _builds(tekton, namespace, ["d1"])["d1"]
    wait_for("queued", lambda: _queued(kube, namespace, "d1"), timeout=30, log=w.log)
    failed = c.provision_failed_run_name(uid)
    # past maxWaitSeconds the build gets its answer: the error-secret run, with the cause
    wait_for("queue timeout", lambda: tekton.get_pr(ctrl_ns, failed), timeout=40, log=w.log)
    pr = tekton.get_pr(ctrl_ns, failed)
    params = {p["name"]: p["value"] for p in pr["spec"]["params"]}
    assert params["PROVISION_STATUS"] == c.PROVISION_STATUS_QUEUE_TIMEOUT
    assert params["TASKRUN_UID"] == uid
    assert tekton.get_pr(ctrl_ns, c.provision_run_name(uid)) is None
    wait_for("warning", lambda: "QueueTimeout" in _reasons(kube, namespace, "d1"),
             timeout=30, log=w.log)
    assert w.metric("mpc_glue_queue_timeouts_total", platform=PLATFORM) == 1
    # the build still ends and is released normally
    tekton.finish_tr(namespace, "d1", ok=False)
    wait_for("released", lambda: tekton.get_pr(ctrl_ns, c.deprovision_run_name(uid)),
             timeout=30, log=w.log)

