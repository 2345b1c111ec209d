"""Builds get hosts: 2 hosts x 2 slots, real SSH logins, limited sudo, FIFO queueing."""
from __future__ import annotations

import pytest

import subprocess
import time
from pathlib import Path

from kubernetes import client

from mpc.runner import contract
from tests.infra.procs import wait_for

from .conftest import make_taskrun, read_secret


def login(secret: dict[str, str], tmp: Path, command: str) -> subprocess.CompletedProcess:
    """Log in exactly as buildah-remote does: the secret's key, its pinned known_hosts."""
    tmp.mkdir(parents=True, exist_ok=True)
    key, kh = tmp / "id_rsa", tmp / "known_hosts"
    key.write_text(secret["id_rsa"])
    key.chmod(0o600)
    kh.write_text(secret["known_hosts"])
    return subprocess.run(["ssh", "-F", "/dev/null", "-i", str(key), "-o", "BatchMode=yes",
                           "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={kh}",
                           "-o", "IdentitiesOnly=yes", secret["host"], command],
                          capture_output=True, text=True, timeout=30)


def test_four_builds_served_fifth_waits_fifo(controller, kube, namespace, make_host, tmp_path):
    hosts = [make_host(), make_host()]
    controller.install_pool(hosts, concurrency=2, **{
        f"host_{h.name}": {"sudoCommands": ["/usr/bin/id"]} for h in hosts})
    trs = [make_taskrun(kube, namespace) for _ in range(4)]
    runs = [controller.start("mpc-provision", tr, PLATFORM="linux/arm64") for tr in trs]
    for r in runs:
        r.wait().check()
        assert r.results["outcome"] == "served", r.stdout + r.stderr
    # least-utilised first: two builds on each host
    assert sorted(r.results["host"] for r in runs) == sorted([hosts[0].name] * 2 + [hosts[1].name] * 2)

    for i, tr in enumerate(trs):
        s = read_secret(kube, tr)
        assert set(s) == {"id_rsa", "host", "user-dir", "known_hosts", "registry-port"}
        user, _, address = s["host"].partition("@")
        assert user == contract.build_user(namespace, tr["metadata"]["name"], tr["metadata"]["uid"])
        host = next(h for h in hosts if h.address == address)
        assert s["known_hosts"].strip() == host.known_hosts_line
        assert s["user-dir"] == f"/home/{user}"
        # the key's one allowed listen (buildah-remote's registry proxy) is the secret's port
        assert s["registry-port"] == str(contract.registry_port(user))
        assert f'permitlisten="127.0.0.1:{s["registry-port"]}"' in host.exec(
            f"cat /home/{user}/.ssh/authorized_keys").stdout
        out = login(s, tmp_path / str(i), "id -un; pwd; sudo -n /usr/bin/id -u")
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [user, s["user-dir"], "0"]
        # sudo is limited to the configured command
        denied = login(s, tmp_path / str(i), "sudo -n /bin/cat /etc/shadow")
        assert denied.returncode != 0
        # the private key never existed on the host
        assert "PRIVATE KEY" not in host.exec(f"cat /home/{user}/.ssh/* 2>/dev/null; true").stdout
    assert len(controller.leases("slot")) == 4

    # Two more builds queue; the older one must be served first when a slot frees.
    fifth, sixth = make_taskrun(kube, namespace), make_taskrun(kube, namespace)
    r5 = controller.start("mpc-provision", fifth, PLATFORM="linux/arm64")
    wait_for("fifth queued", lambda: len(controller.leases("waiter")) == 1, timeout=60)
    # The queue's order is the API server's creationTimestamp, which has whole seconds;
    # waiters of the same second are ordered by name (their uids). So the sixth queues
    # a second later, or it may rightly be first.
    time.sleep(1.1)
    r6 = controller.start("mpc-provision", sixth, PLATFORM="linux/arm64")
    wait_for("sixth queued", lambda: len(controller.leases("waiter")) == 2, timeout=60)
    created = {w.metadata.name: w.metadata.creation_timestamp for w in controller.leases("waiter")}
    assert created[contract.waiter_name(fifth["metadata"]["uid"])] < \
        created[contract.waiter_name(sixth["metadata"]["uid"])]
    time.sleep(2)
    assert r5.proc.poll() is None and r6.proc.poll() is None, "queued builds must wait"
    assert read_secret(kube, fifth) is None

    freed = trs[0]
    controller.deprovision(freed)
    r5.wait(timeout=120).check()
    assert r5.results["outcome"] == "served"
    assert r6.proc.poll() is None, "the younger waiter must still wait"
    controller.deprovision(trs[1])
    r6.wait(timeout=120).check()
    assert r6.results["outcome"] == "served"
    assert controller.leases("waiter") == []


def test_deprovision_removes_user_slot_secret_and_is_idempotent(controller, kube, namespace,
                                                                 make_host, tmp_path):
    h = make_host()
    controller.install_pool([h], concurrency=1)
    tr = make_taskrun(kube, namespace)
    controller.provision(tr)
    s = read_secret(kube, tr)
    user = s["host"].split("@")[0]
    # a build process still running as the user must not stop the cleanup
    bg = login(s, tmp_path, "nohup sleep 600 >/dev/null 2>&1 & echo started")
    assert bg.returncode == 0
    assert user in h.users()
    first = controller.deprovision(tr)
    assert first.results["removed-users"] == "1"
    assert user not in h.users()
    assert h.exec(f"pgrep -u {user} || true").stdout.strip() == ""
    assert h.exec(f"test -e /home/{user}", check=False).returncode == 1
    assert controller.leases("slot") == []
    assert read_secret(kube, tr) is None
    second = controller.deprovision(tr)
    assert second.returncode == 0


@pytest.mark.parametrize("platform", ["linux/amd64", "local", "localhost"])
def test_local_platform_gets_localhost(controller, kube, namespace, make_host, platform):
    """Konflux pools list bare `local` and `localhost` too, and builds really pass them."""
    h = make_host()
    controller.install_pool([h], localPlatforms=["linux/amd64", "local", "localhost"])
    tr = make_taskrun(kube, namespace, platform=platform)
    r = controller.provision(tr, platform=platform)
    assert r.results["outcome"] == "local"
    assert read_secret(kube, tr) == {"host": "localhost"}
    assert controller.leases("slot") == []


def test_secret_is_owned_by_the_build_and_garbage_collected(controller, kube, namespace, make_host):
    h = make_host()
    controller.install_pool([h])
    tr = make_taskrun(kube, namespace)
    controller.provision(tr)
    sec = client.CoreV1Api(kube).read_namespaced_secret(
        contract.secret_name(tr["metadata"]["name"]), namespace)
    assert sec.metadata.labels[contract.LABEL_MANAGED] == contract.MANAGED_VALUE
    (ref,) = sec.metadata.owner_references
    assert (ref.kind, ref.name, ref.uid) == ("TaskRun", tr["metadata"]["name"], tr["metadata"]["uid"])


def test_configured_limits_apply_to_the_build_user(controller, kube, namespace, make_host,
                                                  tmp_path):
    h = make_host()
    controller.install_pool([h], **{f"host_{h.name}": {"limits": {"nproc": 777, "nofile": 555}}})
    tr = make_taskrun(kube, namespace)
    controller.provision(tr)
    s = read_secret(kube, tr)
    user = s["host"].split("@")[0]
    out = login(s, tmp_path, "ulimit -Hu; ulimit -Hn")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["777", "555"]     # pam_limits applied at login
    controller.deprovision(tr)
    assert h.exec(f"test -e /etc/security/limits.d/mpc-{user}.conf", check=False).returncode == 1


def test_build_key_allows_no_forwarding(controller, kube, namespace, make_host, tmp_path):
    h = make_host()
    controller.install_pool([h])
    tr = make_taskrun(kube, namespace)
    controller.provision(tr)
    s = read_secret(kube, tr)
    ok = login(s, tmp_path, "echo in")
    assert ok.returncode == 0 and ok.stdout.strip() == "in"
    key = tmp_path / "id_rsa"
    fwd = subprocess.run(
        ["ssh", "-F", "/dev/null", "-i", str(key), "-o", "BatchMode=yes",
         "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={tmp_path / 'known_hosts'}",
         "-o", "ExitOnForwardFailure=yes", "-L", "127.0.0.1:0:127.0.0.1:22", s["host"], "true"],
        capture_output=True, text=True, timeout=30)
    assert fwd.returncode != 0
    assert "forwarding" in fwd.stderr.lower() or "prohibited" in fwd.stderr.lower(), fwd.stderr
