"""Dynamic hosts (issue 15), on the cloud tier's real parts (moto's EC2 on loopback, an SSH
host booted per instance, the real API server): time from a build TaskRun created to its
secret written for a warm VM claimed, a cold launch (simulated boot delay 0 s and 30 s) and
a static host; launches per second with 100 racing builds; orphans the sweep finds after a
chaos run. The provisioner runs in-process (no Tekton here: the PipelineRun's scheduling is
not in these figures). Figures are printed; only behaviour is asserted."""
from __future__ import annotations

import datetime as dt
import os
import signal
import threading
import time

import pytest
from kubernetes import client

from mpc.runner import contract, dynamic
from mpc.runner.deprovision import deprovision, sweep
from mpc.runner.poolsource import load_pool
from mpc.runner.provision import build_state, provision
from tests.cloud.conftest import PLATFORM, cloud, cloud_farm, moto  # noqa: F401 - fixtures
from tests.cloud.test_dynamic_faults import _provision_in_a_process
from tests.provisioning.conftest import delete_taskrun, make_taskrun, read_secret

pytestmark = pytest.mark.bench


def _release(cloud, tr):
    m = tr["metadata"]
    return deprovision(cloud.kube, cloud.ctl.namespace, m["namespace"], m["name"], m["uid"],
                       provisioning_grace=0)


def _created_to_secret(cloud, namespace, platform=PLATFORM) -> tuple[float, dict]:
    t0 = time.monotonic()
    tr = make_taskrun(cloud.ctl.kube, namespace, platform=platform)
    req = cloud.request(tr)
    req.platform = platform
    out = provision(cloud.kube, req, poll=0.2)
    took = time.monotonic() - t0
    assert out.result == "served", out
    assert read_secret(cloud.ctl.kube, tr)
    return took, tr


def test_build_created_to_secret_written(cloud, namespace, make_host):
    figures = {}
    # warm VM claimed
    cloud.pool(maxInstances=2, minIdle=1)
    assert sweep(cloud.kube, cloud.ctl.namespace).errors == []
    launches = len(cloud.hv.seen)
    figures["warm VM claimed"], tr = _created_to_secret(cloud, namespace)
    assert len(cloud.hv.seen) == launches                       # no launch
    _release(cloud, tr)
    # cold launches
    cloud.pool(maxInstances=2, minIdle=0)
    for delay in (0, 30):
        cloud.hv.boot_delay = delay
        figures[f"cold launch, boot delay {delay} s"], tr = _created_to_secret(cloud, namespace)
        _release(cloud, tr)
    cloud.hv.boot_delay = 0
    # a static host
    host = make_host()
    cloud.ctl.install_pool([host], platform="linux/ppc64le")
    figures["static host"], tr = _created_to_secret(cloud, namespace, platform="linux/ppc64le")
    _release(cloud, tr)
    print("\nbuild TaskRun created -> secret written (provisioner in-process):")
    for k, v in figures.items():
        print(f"  {k:32s} {v:7.2f} s")


def test_launches_per_second_with_100_racing_builds(cloud, namespace):
    """100 builds race for a platform with maxInstances 10, each released once served."""
    cloud.pool(maxInstances=10, bootTimeoutSeconds=60)
    builds = [make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM) for _ in range(100)]
    results: list[str] = []
    served_at: list[float] = []

    def build(tr):
        out = provision(cloud.kube, cloud.request(tr), poll=0.3)
        results.append(out.result)
        served_at.append(time.monotonic())
        if out.result == "served":
            _release(cloud, tr)
    t0 = time.monotonic()
    threads = [threading.Thread(target=build, args=(tr,)) for tr in builds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=1800)
    took = time.monotonic() - t0
    assert sorted(results) == ["served"] * 100
    assert cloud.hv.max_alive <= 10
    assert cloud.hv.alive() == [] and cloud.records() == []
    runs = cloud.proxy.calls.count("RunInstances")
    print(f"\n100 racing builds, maxInstances 10, single-use VMs: {len(cloud.hv.seen)} VMs "
          f"launched in {took:.1f} s: {len(cloud.hv.seen) / took:.2f} launches/s "
          f"(RunInstances calls {runs}; builds served {100 / (max(served_at) - t0):.2f}/s; "
          f"most VMs at once {cloud.hv.max_alive})")


def test_orphans_found_by_the_sweep_after_a_chaos_run(cloud, namespace):
    """Builds with every fault at once: throttling, launches that never boot, provisioners
    killed mid-launch, VMs that die under their builds or are reclaimed by EC2, builds
    whose deprovisioning never runs. Then the sweep: nothing may be left."""
    cloud.pool(maxInstances=6, minIdle=1, bootTimeoutSeconds=10, launchAttempts=2)
    cloud.proxy.throttle.update({"RunInstances": 4, "DescribeInstances": 4,
                                 "TerminateInstances": 2})
    cloud.hv.never_boot = 2
    killed = []
    for _ in range(3):                      # provisioners killed between launch and record
        tr = make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM)
        cloud.proxy.hold.add("RunInstances")
        cloud.proxy.held.clear()
        p = _provision_in_a_process(cloud, tr)
        assert cloud.proxy.held.wait(120)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        cloud.proxy.hold.clear()
        killed.append(tr)
    cloud.proxy.release.set()
    builds = [make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM) for _ in range(8)]
    outs: dict[str, str] = {}

    def build(tr):
        req = cloud.request(tr)
        req.max_wait_seconds = 120
        outs[tr["metadata"]["name"]] = provision(cloud.kube, req, poll=0.3).result
    threads = [threading.Thread(target=build, args=(tr,)) for tr in builds]
    for t in threads:
        t.start()
    sweeper = threading.Thread(target=lambda: sweep(cloud.kube, cloud.ctl.namespace))
    sweeper.start()                          # a sweep racing the provisioners
    for t in threads + [sweeper]:
        t.join(timeout=900)
    served = [tr for tr in builds if outs[tr["metadata"]["name"]] == "served"]
    assert served
    hosts = {h.address: (iid, h) for iid, h in cloud.hv.hosts.items()}
    for k, tr in enumerate(served):
        iid, h = hosts[read_secret(cloud.ctl.kube, tr)["host"].split("@")[1]]
        if k % 3 == 0:
            h.stop()                          # dies mid-build
        elif k % 3 == 1:
            cloud.ec2.terminate_instances(InstanceIds=[iid])      # reclaimed by EC2
    for k, tr in enumerate(builds + killed):
        if k % 2 == 0:
            _release(cloud, tr)               # the others' deprovisioning never runs
        delete_taskrun(cloud.ctl.kube, tr)
    cloud.pool(maxInstances=6, minIdle=0)     # the warm pool goes too
    # every provisioner is gone: time passes beyond the records' lease (as if)
    then = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")
    for r in cloud.records():
        client.CoordinationV1Api(cloud.ctl.kube).patch_namespaced_lease(
            r.metadata.name, cloud.ctl.namespace, {"spec": {"renewTime": then}})
    pool = load_pool(cloud.kube, cloud.ctl.namespace, contract.HOST_POOL_CONFIGMAP)
    first = dynamic.sweep(cloud.kube, cloud.ctl.namespace, pool, build_state)
    second = dynamic.sweep(cloud.kube, cloud.ctl.namespace, pool, build_state)
    assert second.terminated_orphans == [] and second.retired == []
    assert cloud.hv.alive() == [] and cloud.records() == []
    assert cloud.ctl.leases("vm-build") == [] and cloud.ctl.leases("vm-namespace") == []
    print(f"\nchaos run: {len(builds) + len(killed)} builds ({len(served)} served), "
          f"{len(cloud.hv.seen)} VMs launched; the sweep then found "
          f"{len(first.terminated_orphans)} orphaned instances and retired "
          f"{len(first.retired)} records; a second sweep found {len(second.terminated_orphans)}; "
          f"instances left 0, records left 0")
