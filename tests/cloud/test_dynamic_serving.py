"""A build of a dynamic platform gets a real VM: launched through the EC2 API, reached over
SSH with the host key mpc gave it, its user created and its secret written; release
terminates it and deletes its record only afterwards. A warm VM is claimed without a
launch, and the sweep refills the warm pool."""
from __future__ import annotations

from pathlib import Path

from mpc.runner import contract
from mpc.runner.deprovision import deprovision, sweep
from mpc.runner.provision import provision
from tests.provisioning.conftest import make_taskrun, read_secret

from .conftest import PLATFORM


def _tags(inst: dict) -> dict:
    return {t["Key"]: t["Value"] for t in inst.get("Tags", [])}


def _use(cloud, tr: dict, tmp_path: Path) -> str:
    """Log in with the build's secret (pinned known_hosts) and say who we are."""
    s = read_secret(cloud.ctl.kube, tr)
    user, address = s[contract.KEY_HOST].split("@")
    key = tmp_path / "id"
    key.write_text(s[contract.KEY_PRIVATE_KEY])
    key.chmod(0o600)
    kh = tmp_path / "known_hosts"
    kh.write_text(s[contract.KEY_KNOWN_HOSTS])
    (host,) = [h for h in cloud.hv.hosts.values() if h.address == address]
    return host.ssh_argv(user=user, key=key, known_hosts=kh), host


def test_launch_ssh_user_secret_release_terminated(cloud, namespace, tmp_path):
    cloud.pool(maxInstances=2)
    tr = make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM)
    out = provision(cloud.kube, cloud.request(tr))
    assert out.result == "served", out
    (inst,) = cloud.hv.alive()
    tags = _tags(inst)
    (rec,) = cloud.records()
    # the instance is tagged with its record, which was made before it and holds its id
    assert tags[contract.TAG_RECORD] == f"{cloud.ctl.namespace}/{rec.metadata.name}"
    assert tags[contract.TAG_RECORD_UID] == rec.metadata.uid
    assert tags[contract.TAG_INSTANCE] == "mpc-test" and tags[contract.TAG_MANAGED] == "mpc"
    assert rec.metadata.annotations[contract.ANN_INSTANCE_ID] == inst["InstanceId"]
    assert rec.metadata.labels[contract.LABEL_VM_STATE] == "ready"
    # the build logs in to that VM with the pinned key mpc gave it
    argv, host = _use(cloud, tr, tmp_path)
    import subprocess
    r = subprocess.run([*argv, "id -un; hostname"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    user = read_secret(cloud.ctl.kube, tr)[contract.KEY_HOST].split("@")[0]
    assert r.stdout.split()[0] == user and user in host.users()
    assert read_secret(cloud.ctl.kube, tr)[contract.KEY_KNOWN_HOSTS].split()[1:3] == \
        host.host_public_key.split()[:2]
    # release: terminated on EC2, the host is gone, then the record is deleted
    rep = deprovision(cloud.kube, cloud.ctl.namespace, namespace, tr["metadata"]["name"],
                      tr["metadata"]["uid"], provisioning_grace=0)
    assert rep.errors == []
    assert cloud.hv.alive() == []
    states = {i["InstanceId"]: i["State"]["Name"] for i in cloud.hv.instances()}
    assert states == {inst["InstanceId"]: "terminated"}
    assert cloud.records() == []
    assert read_secret(cloud.ctl.kube, tr) is None


def test_warm_vm_is_claimed_and_the_pool_refilled(cloud, namespace, tmp_path):
    cloud.pool(maxInstances=2, minIdle=1)
    rep = sweep(cloud.kube, cloud.ctl.namespace)
    assert rep.errors == []
    (warm,) = cloud.hv.alive()
    launches = cloud.proxy.calls.count("RunInstances")
    tr = make_taskrun(cloud.ctl.kube, namespace, platform=PLATFORM)
    assert provision(cloud.kube, cloud.request(tr)).result == "served"
    assert cloud.proxy.calls.count("RunInstances") == launches      # no launch: claimed
    argv, host = _use(cloud, tr, tmp_path)
    assert host is cloud.hv.hosts[warm["InstanceId"]]
    # the sweep refills the warm pool while the build runs (within maxInstances)
    sweep(cloud.kube, cloud.ctl.namespace)
    assert len(cloud.hv.alive()) == 2
    deprovision(cloud.kube, cloud.ctl.namespace, namespace, tr["metadata"]["name"],
                tr["metadata"]["uid"], provisioning_grace=0)
    (left,) = cloud.hv.alive()          # the used VM is gone (single use), the warm one stays
    assert left["InstanceId"] != warm["InstanceId"]
    assert len(cloud.records()) == 1
