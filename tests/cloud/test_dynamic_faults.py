"""Faults of dynamic hosts, each injected for real: racing builds against maxInstances,
a provisioner killed between launch and record, VMs no record holds, launches that never
become reachable (or offer another host key), and an EC2 API that throttles."""
from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time

from kubernetes import client

from mpc.runner import contract
from mpc.runner.deprovision import deprovision, sweep
from mpc.runner.provision import provision
from tests.provisioning.conftest import delete_taskrun, make_taskrun, read_secret

from .conftest import PLATFORM


def _release(cloud, namespace, tr):
    return deprovision(cloud.kube, cloud.ctl.namespace, namespace, tr["metadata"]["name"],
                       tr["metadata"]["uid"], provisioning_grace=0)


def test_racing_builds_never_exceed_max_instances(cloud, namespace):
    """30 provisioners race for a platform with maxInstances 10; each build holds its VM
    briefly and is released. Sampled from the EC2 API itself: never more than 10."""
    cloud.pool(maxInstances=10)
    builds = [make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM) for _ in range(30)]
    samples: list[int] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(len(cloud.hv.alive()))
            time.sleep(0.05)
    results: dict[str, str] = {}

    def build(tr):
        kube = cloud.kube
        out = provision(kube, cloud.request(tr), poll=0.3)
        results[tr["metadata"]["name"]] = out.result
        if out.result == "served":
            time.sleep(0.5)
            _release(cloud, namespace, tr)
    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=build, args=(tr,)) for tr in builds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    stop.set()
    sampler.join()
    assert sorted(results.values()) == ["served"] * 30, results
    assert max(samples) <= 10 and cloud.hv.max_alive <= 10, (max(samples), cloud.hv.max_alive)
    assert max(samples) >= 2            # they really ran side by side
    assert len(cloud.hv.seen) == 30     # single-use: a VM per build
    assert cloud.hv.alive() == [] and cloud.records() == []
    assert cloud.hv.errors == []


def _provision_in_a_process(cloud, tr) -> subprocess.Popen:
    m = tr["metadata"]
    code = ("import sys\nfrom mpc.runner.kube import Kube\n"
            "from mpc.runner.provision import Request, provision\n"
            f"provision(Kube.connect(), Request({m['name']!r}, {m['namespace']!r}, {m['uid']!r}, "
            f"{PLATFORM!r}, {cloud.ctl.namespace!r}))\n")
    env = os.environ | {"KUBECONFIG": str(cloud.ctl.kubeconfig)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    return subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _age_record(cloud, lease, seconds: int) -> None:
    """The record was last renewed ``seconds`` ago (as if that much time had passed)."""
    then = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=seconds))
    client.CoordinationV1Api(cloud.ctl.kube).patch_namespaced_lease(
        lease.metadata.name, cloud.ctl.namespace,
        {"spec": {"renewTime": then.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}})


def test_provisioner_killed_between_launch_and_record_leaves_no_orphan(cloud, namespace):
    """The launch reaches EC2 but its answer never reaches the provisioner, which is then
    killed: the instance runs, and only its record (made before the launch) accounts for
    it. It keeps counting against maxInstances, and the sweep terminates it and deletes
    the record once the record is abandoned."""
    cloud.pool(maxInstances=1)
    cloud.proxy.hold.add("RunInstances")
    tr = make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM)
    proc = _provision_in_a_process(cloud, tr)
    try:
        assert cloud.proxy.held.wait(120), "the launch never reached EC2"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    cloud.proxy.hold.clear()
    cloud.proxy.release.set()
    (inst,) = cloud.hv.alive()
    (rec,) = cloud.records()
    assert rec.metadata.labels[contract.LABEL_VM_STATE] == "launching"
    assert contract.ANN_INSTANCE_ID not in rec.metadata.annotations     # never recorded
    assert {t["Key"]: t["Value"] for t in inst["Tags"]}[contract.TAG_RECORD_UID] == rec.metadata.uid
    # the quota still counts it: another build cannot launch a second VM meanwhile
    other = make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM)
    req = cloud.request(other)
    req.max_wait_seconds = 2
    assert provision(cloud.kube, req).result == "error"
    assert len(cloud.hv.alive()) == 1
    # a sweep while the record is fresh leaves it (its provisioner might still be working)
    sweep(cloud.kube, cloud.ctl.namespace)
    assert len(cloud.hv.alive()) == 1 and len(cloud.records()) == 1
    _age_record(cloud, rec, 3600)
    rep = sweep(cloud.kube, cloud.ctl.namespace)
    assert cloud.hv.alive() == [], rep
    assert cloud.records() == []
    # and the platform serves again
    delete_taskrun(cloud.ctl.kube, other)
    third = make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM)
    assert provision(cloud.kube, cloud.request(third)).result == "served"
    _release(cloud, namespace, third)
    assert cloud.hv.alive() == []


def test_sweep_terminates_instances_no_record_holds_and_only_ours(cloud, namespace):
    cloud.pool(maxInstances=2)
    tr = make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM)
    assert provision(cloud.kube, cloud.request(tr)).result == "served"
    (held,) = cloud.hv.alive()

    def run(tags: dict) -> str:
        r = cloud.ec2.run_instances(
            ImageId=cloud.ami, InstanceType="t3.micro", MinCount=1, MaxCount=1,
            SubnetId=cloud.subnet, KeyName=cloud.key_name, TagSpecifications=[{
                "ResourceType": "instance",
                "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}])
        return r["Instances"][0]["InstanceId"]
    ours = {contract.TAG_MANAGED: "mpc", contract.TAG_INSTANCE: "mpc-test"}
    orphan = run(ours | {contract.TAG_RECORD_UID: "0f0f0f0f-dead-4bad-8bad-000000000000"})
    untagged_record = run(ours)
    foreign = run({contract.TAG_MANAGED: "mpc", contract.TAG_INSTANCE: "another-cluster"})
    not_mpc = run({"team": "x"})
    rep = sweep(cloud.kube, cloud.ctl.namespace)
    alive = {i["InstanceId"] for i in cloud.hv.alive()}
    assert alive == {held["InstanceId"], foreign, not_mpc}, rep
    assert orphan not in alive and untagged_record not in alive
    # the build's own VM and record are untouched and still serve it
    assert len(cloud.records()) == 1 and read_secret(cloud.ctl.kube, tr)[contract.KEY_HOST]
    _release(cloud, namespace, tr)
    assert {i["InstanceId"] for i in cloud.hv.alive()} == {foreign, not_mpc}


def test_unreachable_launch_fails_over_then_errors(cloud, namespace):
    cloud.pool(maxInstances=2, bootTimeoutSeconds=10, launchAttempts=2)
    cloud.hv.never_boot = 1
    tr = make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM)
    out = provision(cloud.kube, cloud.request(tr))
    assert out.result == "served", out
    (dead,) = cloud.hv.dead
    states = {i["InstanceId"]: i["State"]["Name"] for i in cloud.hv.instances()}
    assert states[dead] == "terminated" and len(states) == 2
    assert len(cloud.records()) == 1
    _release(cloud, namespace, tr)
    # every launch unreachable or offering another host key: bounded, then an error
    cloud.hv.never_boot, cloud.hv.wrong_key = 1, 1
    tr2 = make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM)
    out = provision(cloud.kube, cloud.request(tr2))
    assert out.result == "error", out
    msg = read_secret(cloud.ctl.kube, tr2)[contract.KEY_ERROR]
    assert "2 launches failed" in msg, msg
    assert cloud.hv.alive() == [] and cloud.records() == []
    assert len(cloud.hv.seen) == 4


def test_throttled_api_is_retried(cloud, namespace):
    cloud.pool(maxInstances=2)
    cloud.proxy.throttle.update({"RunInstances": 3, "DescribeInstances": 2,
                                 "TerminateInstances": 2})
    tr = make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM)
    assert provision(cloud.kube, cloud.request(tr)).result == "served"
    assert cloud.proxy.injected.get("RunInstances") == 3
    assert cloud.proxy.injected.get("DescribeInstances") == 2
    assert len(cloud.hv.seen) == 1                       # retried, never launched twice
    assert _release(cloud, namespace, tr).errors == []
    assert cloud.proxy.injected.get("TerminateInstances") == 2
    assert cloud.hv.alive() == [] and cloud.records() == []
