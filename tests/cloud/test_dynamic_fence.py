"""Quota under stalls: a provisioner whose launch call is held up until the sweep has
taken its record back (abandoned) never launches afterwards, so the platform is never over
maxInstances, not even until the next sweep (docs/dynamic-hosts.md, "Quota under stalls")."""
from __future__ import annotations

import datetime as dt
import threading

from kubernetes import client

from mpc.runner import contract
from mpc.runner.deprovision import deprovision, sweep
from mpc.runner.provision import provision
from tests.infra.procs import wait_for
from tests.provisioning.conftest import make_taskrun

from .conftest import PLATFORM


def test_launch_retried_after_its_record_was_swept_is_never_sent(cloud, namespace):
    cloud.pool(maxInstances=1)
    # the first launch is lost in transit: it waits in the proxy, never reaching EC2
    cloud.proxy.stall["RunInstances"] = 1
    stalled = make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM)
    req = cloud.request(stalled)
    got = {}
    t = threading.Thread(target=lambda: got.update(out=provision(cloud.kube, req, poll=0.2)))
    t.start()
    assert cloud.proxy.stalled.wait(120), "the launch never left the provisioner"
    (rec,) = cloud.records()
    assert rec.metadata.labels[contract.LABEL_VM_STATE] == "launching"
    # 300 s pass without a renewal (as if): the sweep takes the abandoned record back
    then = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=3600)
    client.CoordinationV1Api(cloud.ctl.kube).patch_namespaced_lease(
        rec.metadata.name, cloud.ctl.namespace,
        {"spec": {"renewTime": then.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}})
    sweep(cloud.kube, cloud.ctl.namespace)
    assert cloud.records() == [] and cloud.hv.alive() == []
    # the lost request fails and botocore retries it: the retry must not launch a VM for
    # a record that no longer exists (its quota slot is free again); the provisioner
    # fails over to a new record and launch, as for a boot failure
    cloud.proxy.unstall.set()
    t.join(timeout=300)
    assert not t.is_alive()
    assert got["out"].result == "served", got
    wait_for("the hypervisor saw every instance",
             lambda: len(cloud.hv.seen) == len(cloud.hv.instances()), timeout=30)
    assert len(cloud.hv.seen) == 1 and cloud.hv.max_alive <= 1, (cloud.hv.seen, cloud.hv.max_alive)
    (rec,) = cloud.records()
    (inst,) = cloud.hv.alive()
    assert rec.metadata.annotations[contract.ANN_INSTANCE_ID] == inst["InstanceId"]
    assert {t["Key"]: t["Value"] for t in inst["Tags"]}[contract.TAG_RECORD_UID] == rec.metadata.uid
    m = stalled["metadata"]
    assert deprovision(cloud.kube, cloud.ctl.namespace, m["namespace"], m["name"], m["uid"],
                       provisioning_grace=0).errors == []
    assert cloud.hv.alive() == [] and cloud.records() == []
