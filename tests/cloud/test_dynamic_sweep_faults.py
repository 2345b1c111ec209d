"""The sweep under faults: a watcher restarted during a sweep kills that sweep's run midway
and starts another, which may also overlap one still running. Afterwards no instance runs
that no record holds, no record points at nothing, and the warm pool is minIdle, not more."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

from mpc.runner import contract
from mpc.runner.deprovision import sweep
from mpc.runner.provision import provision
from tests.provisioning.conftest import delete_taskrun, make_taskrun

from .conftest import PLATFORM


def _sweep_in_a_process(cloud) -> subprocess.Popen:
    code = ("from mpc.runner.kube import Kube\nfrom mpc.runner.deprovision import sweep\n"
            f"sweep(Kube.connect(), {cloud.ctl.namespace!r})\n")
    env = os.environ | {"KUBECONFIG": str(cloud.ctl.kubeconfig)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    return subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _consistent(cloud) -> None:
    recs = {r.metadata.annotations.get(contract.ANN_INSTANCE_ID) for r in cloud.records()}
    alive = {i["InstanceId"] for i in cloud.hv.alive()}
    assert recs == alive, (recs, alive)


def test_overlapping_sweeps_keep_min_idle(cloud):
    """Two sweeps at once (the old watcher's run still going when the new one starts)
    launch minIdle warm VMs between them, not minIdle each."""
    cloud.pool(maxInstances=4, minIdle=2)
    barrier = threading.Barrier(2)

    def run():
        barrier.wait()
        sweep(cloud.kube, cloud.ctl.namespace)
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(cloud.hv.alive()) == 2 and len(cloud.records()) == 2
    _consistent(cloud)
    assert all(r.metadata.labels[contract.LABEL_VM_STATE] == "ready" for r in cloud.records())


def test_sweep_killed_midway_then_the_next_one_finishes(cloud, namespace):
    """The sweep is killed after EC2 acted on its TerminateInstances but before it heard
    back (the record stays 'terminating'); an orphan appears too. The next sweep deletes
    the record, terminates the orphan and refills the warm pool to exactly minIdle."""
    cloud.pool(maxInstances=3, minIdle=1)
    tr = make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM)
    assert provision(cloud.kube, cloud.request(tr)).result == "served"
    (used,) = [i["InstanceId"] for i in cloud.hv.alive()]
    delete_taskrun(cloud.ctl.kube, tr)          # ends; its deprovisioning never runs
    # the sweep retires the finished build's VM: EC2 terminates it, the answer never
    # comes, and the sweep is killed there
    cloud.proxy.hold.add("TerminateInstances")
    p = _sweep_in_a_process(cloud)
    try:
        assert cloud.proxy.held.wait(120), "the sweep never terminated anything"
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    cloud.proxy.hold.clear()
    cloud.proxy.release.set()
    (rec,) = [r for r in cloud.records()
              if r.metadata.annotations.get(contract.ANN_INSTANCE_ID) == used]
    assert rec.metadata.labels[contract.LABEL_VM_STATE] == "terminating"
    # meanwhile an instance of ours that no record holds
    orphan = cloud.ec2.run_instances(
        ImageId=cloud.ami, InstanceType="t3.micro", MinCount=1, MaxCount=1,
        SubnetId=cloud.subnet, KeyName=cloud.key_name, TagSpecifications=[{
            "ResourceType": "instance", "Tags": [
                {"Key": contract.TAG_MANAGED, "Value": "mpc"},
                {"Key": contract.TAG_INSTANCE, "Value": "mpc-test"},
                {"Key": contract.TAG_RECORD_UID,
                 "Value": "00000000-0000-4000-8000-00000000dead"}]}])["Instances"][0]["InstanceId"]
    # the restarted watcher's sweep
    rep = sweep(cloud.kube, cloud.ctl.namespace)
    assert rep.errors == [], rep
    alive = {i["InstanceId"] for i in cloud.hv.alive()}
    assert used not in alive and orphan not in alive, alive
    assert len(alive) == 1                       # minIdle, warm
    _consistent(cloud)
    (rec,) = cloud.records()
    assert rec.metadata.labels[contract.LABEL_VM_STATE] == "ready"
    assert sweep(cloud.kube, cloud.ctl.namespace).errors == []
    assert {i["InstanceId"] for i in cloud.hv.alive()} == alive
