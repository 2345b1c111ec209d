"""Metrics and Events of dynamic platforms. The runner's pods are short-lived, so what they
count lives in the cluster: VM records, places and queue entries are gauges, the stats Leases
counters and a boot-time histogram; ``vms.summary`` computes them from the controller
namespace's Leases alone (what the watcher caches). The build TaskRun gets Events."""
from __future__ import annotations

import json
import math
import threading

from kubernetes import client

from mpc.runner import contract, vms
from mpc.runner.deprovision import deprovision, sweep
from mpc.runner.provision import provision
from tests.infra.procs import wait_for
from tests.provisioning.conftest import make_taskrun

from .conftest import PLATFORM


def _summary(cloud) -> dict:
    """As the watcher would see it: the Leases as the API's JSON."""
    r = client.CoordinationV1Api(cloud.ctl.kube).list_namespaced_lease(
        cloud.ctl.namespace, _preload_content=False)
    return vms.summary(json.loads(r.data)["items"], [PLATFORM])[PLATFORM]


def _events(cloud, tr) -> dict[str, str]:
    m = tr["metadata"]
    evs = client.CoreV1Api(cloud.ctl.kube).list_namespaced_event(
        m["namespace"], field_selector=f"involvedObject.uid={m['uid']}").items
    return {e.reason: (e.type, e.message) for e in evs}


def test_counters_gauges_histogram_and_events(cloud, namespace):
    cloud.pool(maxInstances=2, minIdle=1)
    assert sweep(cloud.kube, cloud.ctl.namespace).errors == []
    s = _summary(cloud)
    assert s["instances"] == {"launching": 0, "booting": 0, "idle": 1, "busy": 0,
                              "terminating": 0}
    assert s["launches"] == 1 and s["boot_seconds"]["count"] == 1
    a, b, c = (make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM) for _ in range(3))
    m = cloud.request(a)
    assert provision(cloud.kube, m).result == "served"              # the warm VM
    assert _events(cloud, a)["VMClaimed"][0] == "Normal"
    assert provision(cloud.kube, cloud.request(b)).result == "served"   # a launch
    typ, msg = _events(cloud, b)["VMLaunched"]
    assert typ == "Normal" and "launched for this build" in msg
    # a third build waits at the quota: a gauge while it waits, a counter, an Event
    req = cloud.request(c)
    req.max_wait_seconds = 4
    got = {}
    t = threading.Thread(target=lambda: got.update(out=provision(cloud.kube, req, poll=0.2)))
    t.start()
    wait_for("c counted as waiting", lambda: _summary(cloud)["waiting"] == 1, timeout=30)
    t.join(timeout=60)
    assert got["out"].result == "error"
    assert _events(cloud, c)["WaitingForVM"][0] == "Normal"
    # an instance of ours that no record holds: terminated and counted
    cloud.ec2.run_instances(
        ImageId=cloud.ami, InstanceType="t3.micro", MinCount=1, MaxCount=1,
        SubnetId=cloud.subnet, KeyName=cloud.key_name, TagSpecifications=[{
            "ResourceType": "instance", "Tags": [
                {"Key": contract.TAG_MANAGED, "Value": "mpc"},
                {"Key": contract.TAG_INSTANCE, "Value": "mpc-test"},
                {"Key": contract.TAG_PLATFORM, "Value": PLATFORM},
                {"Key": contract.TAG_RECORD_UID, "Value": "00000000-0000-4000-8000-000000000000"}]}])
    assert len(sweep(cloud.kube, cloud.ctl.namespace).errors) == 0
    s = _summary(cloud)
    assert s["instances"] == {"launching": 0, "booting": 0, "idle": 0, "busy": 2,
                              "terminating": 0}
    assert (s["builds"], s["waiting"]) == (2, 0)
    assert {k: s[k] for k in vms.COUNTERS} == {
        "launches": 2, "launch_failures": 0, "warm_claims": 1, "quota_blocked": 1,
        "orphans_terminated": 1}
    h = s["boot_seconds"]
    assert h["count"] == 2 and h["sum"] > 0
    assert h["buckets"][-1] == (math.inf, 2)
    assert [n for _, n in h["buckets"]] == sorted(n for _, n in h["buckets"])   # cumulative
    # released: the gauges drop, the counters stay
    for tr in (a, b):
        mt = tr["metadata"]
        deprovision(cloud.kube, cloud.ctl.namespace, mt["namespace"], mt["name"], mt["uid"],
                    provisioning_grace=0)
    s = _summary(cloud)
    assert sum(s["instances"].values()) == 0 and s["builds"] == 0
    assert s["launches"] == 2 and s["orphans_terminated"] == 1
