"""Pool hosts without hostKey: recorded once on first use, pinned from then on (issue 11, item 6).

Real hosts, real Tasks under the Tasks' ServiceAccount. A host "reinstalled"
with a new key (its host key replaced in its overlay, sshd restarted) must be
refused by provisioning, deprovisioning and the sweep, and nothing may be
written with the new key.
"""
from __future__ import annotations

import subprocess
import threading

from kubernetes import client
from kubernetes import config as kconfig

from mpc.runner import contract, hostkeys
from mpc.runner.kube import Kube
from mpc.runner.poolsource import load_pool
from tests.infra.sshhosts import keypair

from .conftest import make_taskrun, read_secret

UNPINNED = {"hostKey": None}
REASON = "HostKeyChanged"     # the Warning Event's reason


def unpinned(h) -> dict:
    return {f"host_{h.name}": UNPINNED}


def key_of(line: str) -> str:
    """'ssh-ed25519 AAAA' of a public key or known_hosts line (no target, no comment)."""
    parts = line.split()
    if parts[0].startswith(("ssh-", "ecdsa-")):
        return " ".join(parts[:2])
    return " ".join(parts[1:3])


def fingerprint(public_key: str) -> str:
    """ssh-keygen's SHA256 fingerprint of a public key line."""
    out = subprocess.run(["ssh-keygen", "-lf", "-"], input=public_key + "\n", check=True,
                         capture_output=True, text=True).stdout
    return out.split()[1]


def rekey(h) -> str:
    """Give the host a new host key, as a reinstall would, and restart it."""
    h.stop()
    priv, pub = keypair()
    d = h.state / "upper" / "etc" / "ssh"
    (d / "ssh_host_ed25519_key").write_bytes(priv)
    (d / "ssh_host_ed25519_key").chmod(0o600)
    (d / "ssh_host_ed25519_key.pub").write_text(pub + "\n")
    h.start()
    h.host_public_key = pub
    h.known_hosts_file.write_text(h.known_hosts_line + "\n")
    return pub


def recorded(controller) -> list:
    return controller.leases(contract.ROLE_HOST_KEY)


def build_users(h) -> set[str]:
    return {u for u in h.users() if contract.USER_RE.match(u)}


def tasks_kube(controller) -> Kube:
    return Kube(kconfig.new_client_from_config(str(controller.kubeconfig), persist_config=False))


def warnings_on(kube, namespace: str, name: str) -> list:
    return [e for e in client.CoreV1Api(kube).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}").items
        if e.reason == REASON and e.type == "Warning"]


def test_first_use_records_the_key_once_and_the_secret_pins_it(controller, kube, namespace,
                                                               make_host):
    h = make_host()
    controller.install_pool([h], **unpinned(h))
    assert recorded(controller) == []
    first = make_taskrun(kube, namespace)
    assert controller.provision(first).results["outcome"] == "served"
    [lease] = recorded(controller)
    ann = lease.metadata.annotations
    assert key_of(ann[contract.ANN_HOST_KEY]) == key_of(h.host_public_key)
    assert ann[contract.ANN_FINGERPRINT] == fingerprint(h.host_public_key)
    assert (ann[contract.ANN_ADDRESS], ann[contract.ANN_PORT]) == (h.address, "22")
    assert lease.metadata.labels[contract.LABEL_HOST] == h.name
    assert lease.metadata.name == contract.host_key_name(h.name, h.address, 22)
    s = read_secret(kube, first)
    assert s["known_hosts"].split()[:3] == h.known_hosts_line.split()[:3]

    # later connections read the record and never write it again
    second = make_taskrun(kube, namespace)
    assert controller.provision(second).results["outcome"] == "served"
    controller.deprovision(first)
    [again] = recorded(controller)
    assert again.metadata.resource_version == lease.metadata.resource_version
    assert read_secret(kube, second)["known_hosts"] == s["known_hosts"]


def test_changed_key_is_refused_everywhere_and_nothing_records_it(controller, kube, namespace,
                                                                  make_host):
    h = make_host()
    controller.install_pool([h], **unpinned(h))
    served = make_taskrun(kube, namespace)
    assert controller.provision(served).results["outcome"] == "served"
    old = h.host_public_key
    [lease] = recorded(controller)
    users = build_users(h)
    assert len(users) == 1

    new = rekey(h)
    old_fp, new_fp = fingerprint(old), fingerprint(new)

    # provisioning: refused, the build gets the error secret, the slot is given back
    tr = make_taskrun(kube, namespace)
    r = controller.provision(tr)
    assert r.results["outcome"] == "error", r.stdout
    msg = read_secret(kube, tr)["error"]
    assert "host key changed" in msg
    for part in (h.name, f"{h.address}:22", old_fp, new_fp, "hostKey",
                 f"kubectl -n {controller.namespace} delete lease {lease.metadata.name}"):
        assert part in msg, (part, msg)
    assert build_users(h) == users
    assert [s.metadata.labels[contract.LABEL_TASKRUN_UID] for s in controller.leases("slot")] \
        == [served["metadata"]["uid"]]
    [ev] = warnings_on(kube, namespace, tr["metadata"]["name"])
    assert "host key changed" in ev.message and new_fp in ev.message
    assert warnings_on(kube, controller.namespace, lease.metadata.name)

    # deprovisioning and the sweep: refused, exit non-zero, user and slot kept for a retry
    d = controller.start("mpc-deprovision", served).wait()
    assert d.returncode != 0
    assert "host key changed" in d.stdout and new_fp in d.stdout
    assert build_users(h) == users and len(controller.leases("slot")) == 1
    sw = controller.start("mpc-sweep").wait()
    assert sw.returncode != 0 and "host key changed" in sw.stdout
    assert build_users(h) == users and len(controller.leases("slot")) == 1

    # nothing anywhere holds the new key
    [still] = recorded(controller)
    assert still.metadata.resource_version == lease.metadata.resource_version
    assert key_of(still.metadata.annotations[contract.ANN_HOST_KEY]) == key_of(old)
    every = client.CoordinationV1Api(kube).list_namespaced_lease(controller.namespace).items
    assert not any(key_of(new).split()[1] in str(x.metadata.annotations) for x in every)
    assert key_of(new).split()[1] not in str(read_secret(kube, tr))

    # the platform team verified the new key and pins it in the pool: that key wins
    controller.install_pool([h], **{f"host_{h.name}": {"hostKey": new}})
    controller.deprovision(served)
    assert build_users(h) == set() and controller.leases("slot") == []
    assert controller.provision(tr).results["outcome"] == "served"
    assert read_secret(kube, tr)["known_hosts"].split()[:3] == h.known_hosts_line.split()[:3]
    [untouched] = recorded(controller)
    assert untouched.metadata.resource_version == lease.metadata.resource_version
    controller.deprovision(tr)

    # or, back without hostKey, deletes the record: the next connection records the new key
    controller.install_pool([h], **unpinned(h))
    client.CoordinationV1Api(kube).delete_namespaced_lease(lease.metadata.name,
                                                           controller.namespace)
    later = make_taskrun(kube, namespace)
    assert controller.provision(later).results["outcome"] == "served"
    [fresh] = recorded(controller)
    assert key_of(fresh.metadata.annotations[contract.ANN_HOST_KEY]) == key_of(new)


def test_concurrent_first_provisionings_record_exactly_one_key(controller, kube, namespace,
                                                               make_host):
    h = make_host()
    controller.install_pool([h], concurrency=4, **unpinned(h))
    trs = [make_taskrun(kube, namespace) for _ in range(4)]
    runs = [controller.start("mpc-provision", tr, PLATFORM="linux/arm64") for tr in trs]
    for r in runs:
        r.wait().check()
        assert r.results["outcome"] == "served", r.stdout
    [lease] = recorded(controller)
    assert key_of(lease.metadata.annotations[contract.ANN_HOST_KEY]) == key_of(h.host_public_key)
    lines = {read_secret(kube, tr)["known_hosts"] for tr in trs}
    assert len(lines) == 1
    assert lines.pop().split()[:3] == h.known_hosts_line.split()[:3]


def test_racing_recorders_keep_one_record_and_the_loser_uses_it(controller, make_host):
    """Two runners record different keys at the same instant: the API server keeps one,
    both get that one back (the loser re-reads), under the Tasks' own RBAC."""
    h = make_host()
    controller.install_pool([h], **unpinned(h))
    tk = tasks_kube(controller)
    host = load_pool(tk, controller.namespace).host(h.name)
    keys = [key_of(h.host_public_key), key_of(keypair()[1])]
    start, got, errors = threading.Barrier(2), [None, None], []

    def race(i: int) -> None:
        try:
            start.wait()
            got[i] = hostkeys.record(tk, controller.namespace, host, keys[i])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=race, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert got[0] == got[1] and got[0].key in keys
    [lease] = recorded(controller)
    assert lease.metadata.annotations[contract.ANN_HOST_KEY] == got[0].key
