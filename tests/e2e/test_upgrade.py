"""Upgrading mpc with builds in flight loses none of them (issue 12, item 2).

mpc is installed as released (the session fixture ``mpc``: release A, ``make release
VERSION=e2e``). The test makes release B of the same sources with another VERSION
(``make release VERSION=e2e-next``: the cached image archives are pushed again under the
new tag, the bundles are pushed with the new version in their annotations, so their
digests and every reference to them change, and the watcher Deployment names its image
by the new tag: it rolls). Then, with the installed pool's two ``linux/arm64`` hosts
(concurrency 1 each):

- builds ``run-1`` and ``run-2`` are provisioned and running their build step on the
  hosts (their SSH session waits there for a gate file the test creates later), so the
  platform is full;
- build ``wait`` is created and waits in the watcher (a ``Queued`` Event, no
  provisioning run);
- build ``new`` is created, and at once release B's ``install.yaml`` is applied over A
  the way a cluster admin upgrades (``kubectl apply --server-side``; the example pool
  left out and the admission registries set, as on the first install).

Once the watcher has rolled out (every pod replaced, B's image, a new leader), the gate
opens. Every build must then finish served: its secret names a host and no error, its
build step ran over SSH on that host as the build user, it got exactly one
provisioning run (no second one by the new watcher, no ``mpc-provision-failed``), the
waiting and new builds were provisioned by B's Pipelines, and afterwards each was
deprovisioned: no slot, no build user, no finalizer, no build secret.

Release A is applied again at the end (the session's other tests expect it).
"""
from __future__ import annotations

import time

import pytest
import yaml
from kubernetes import client

from mpc.runner import contract as c

from .install import (BUILD_PREAMBLE, NS, PLATFORM, TIMEOUT, Install, _co, _cond, _release, get,
                      release_docs, rolled_out, step_log, wait_done, wait_for)
from .test_mpc_e2e import Recorder

pytestmark = pytest.mark.e2e

VERSION_B = "e2e-next"
GATE = "/tmp/mpc-upgrade-gate"      # on each host: the running builds finish once it exists
BUILDS = ("run-1", "run-2", "wait", "new")

BUILD_SCRIPT = BUILD_PREAMBLE + r"""printf 'upgrade: building on %s\n' "$host"
remote="set -e
cd $(cat /ssh/user-dir)
echo $BUILD > upgrade-running
i=0
while [ ! -e $GATE ]; do i=\$((i + 1)); [ \$i -lt 3600 ] || exit 3; sleep 0.5; done
echo upgrade-ok $BUILD as \$(id -un)"
exec ssh "${ssh_opts[@]}" -o ServerAliveInterval=5 -o ServerAliveCountMax=12 "$host" "$remote"
"""


def _build(inst: Install, ns: str, name: str) -> dict:
    return _co(inst.kube).create_namespaced_custom_object("tekton.dev", "v1", ns, "taskruns", {
        "apiVersion": "tekton.dev/v1", "kind": "TaskRun", "metadata": {"name": name},
        "spec": {"params": [{"name": c.PLATFORM_PARAM, "value": PLATFORM}],
                 "timeout": "30m",
                 "taskSpec": {
                     "params": [{"name": c.PLATFORM_PARAM, "type": "string"}],
                     "volumes": [{"name": "ssh", "secret": {"secretName": c.secret_name(name)}}],
                     "steps": [{"name": "build", "image": inst.builder_image,
                                "env": [{"name": "BUILD", "value": name},
                                        {"name": "GATE", "value": GATE}],
                                "volumeMounts": [{"name": "ssh", "mountPath": "/ssh"}],
                                "script": BUILD_SCRIPT}]}}})


def _running_on_hosts(inst: Install) -> dict[str, str]:
    """host -> the build whose step is running there (its ``upgrade-running`` file)."""
    out = {}
    for h in inst.hosts:
        r = h.exec("cat /home/u-*/upgrade-running 2>/dev/null || true", check=False)
        for name in r.stdout.split():
            out[h.name] = name
    return out


def _events(inst: Install, ns: str, name: str) -> set[str]:
    return {e.reason for e in client.CoreV1Api(inst.kube).list_namespaced_event(
        ns, field_selector=f"involvedObject.name={name}").items}


def _watcher_pods(inst: Install) -> dict[str, object]:
    return {p.metadata.uid: p for p in client.CoreV1Api(inst.kube).list_namespaced_pod(
        NS, label_selector="app.kubernetes.io/name=mpc-glue").items}


def _apply(inst: Install, install_yaml) -> None:
    inst.kubectl("apply", "--server-side", "-f", "-",
                 input=yaml.safe_dump_all(release_docs(install_yaml)))


def _task_bundle(run: dict) -> str:
    """The bundle the provisioning run's Task was resolved from (its resolved spec)."""
    for t in ((run.get("status") or {}).get("pipelineSpec") or {}).get("tasks") or []:
        for p in (t.get("taskRef") or {}).get("params") or []:
            if p.get("name") == "bundle":
                return p["value"]
    return ""


@pytest.mark.timeout(int(3 * TIMEOUT))
def test_upgrading_with_builds_in_flight_loses_none(mpc, e2e_namespace, tmp_path_factory):
    inst, ns = mpc, e2e_namespace
    apps, coord = client.AppsV1Api(inst.kube), client.CoordinationV1Api(inst.kube)
    t0 = time.monotonic()
    # release B: the same sources under another VERSION (cached images, new bundle digests)
    bundles_b, images_b, install_b = _release(inst.node, tmp_path_factory.mktemp("release-b"),
                                              VERSION_B)
    t_release = time.monotonic() - t0
    image_a = apps.read_namespaced_deployment("mpc-glue", NS).spec.template.spec.containers[0].image
    assert image_a == inst.images["glue"] and images_b["glue"] != image_a, (image_a, images_b)
    assert bundles_b["pipeline-mpc-provisioning"] != inst.bundles["pipeline-mpc-provisioning"]
    assert not inst.slots() and inst.build_users() == {h.name: [] for h in inst.hosts}

    applied = False
    try:
        rec = Recorder(inst, ns).start()
        uids: dict[str, str] = {}
        try:
            # two builds running their build step on the two hosts: the platform is full
            for name in ("run-1", "run-2"):
                uids[name] = _build(inst, ns, name)["metadata"]["uid"]
            on_hosts = wait_for("both builds running on the hosts",
                                lambda: len(r := _running_on_hosts(inst)) == 2 and r, interval=1)
            assert sorted(on_hosts.values()) == ["run-1", "run-2"], on_hosts
            # one waits in the watcher's queue
            uids["wait"] = _build(inst, ns, "wait")["metadata"]["uid"]
            wait_for("the third build queued", lambda: "Queued" in _events(inst, ns, "wait"),
                     interval=1)
            assert get(inst, NS, "pipelineruns", c.provision_run_name(uids["wait"])) is None
            old_pods = _watcher_pods(inst)
            # one just created; release B applied over A at once
            uids["new"] = _build(inst, ns, "new")["metadata"]["uid"]
            t_apply = time.monotonic()
            applied = True
            _apply(inst, install_b)
            try:
                def upgraded() -> bool:
                    d = apps.read_namespaced_deployment("mpc-glue", NS)
                    pods = _watcher_pods(inst)
                    holder = coord.read_namespaced_lease("mpc-glue-leader", NS).spec.holder_identity
                    return (d.spec.template.spec.containers[0].image == images_b["glue"]
                            and rolled_out(apps, coord) and not set(pods) & set(old_pods)
                            and all(p.spec.containers[0].image == images_b["glue"]
                                    for p in pods.values())
                            and holder in {p.metadata.name for p in pods.values()})
                wait_for("the watcher rolled out with release B", upgraded, interval=1)
                t_rolled = time.monotonic()
                # the builds in flight are still where they were: nothing finished meanwhile
                assert sorted(_running_on_hosts(inst).values()) == ["run-1", "run-2"]
                for h in inst.hosts:
                    h.exec(f"touch {GATE}")
                done = {n: wait_done(inst, ns, "taskruns", n) for n in BUILDS}
                t_done = time.monotonic()
                for n in BUILDS:
                    wait_for(f"{n}: the finalizer removed", lambda n=n: c.FINALIZER not in (
                        get(inst, ns, "taskruns", n)["metadata"].get("finalizers") or ()))
                    wait_for(f"{n}: the deprovisioning run succeeded", lambda n=n: any(
                        _cond(s).get("status") == "True" for s in
                        rec.runs("pr", "deprovision").get(c.deprovision_run_name(uids[n]), [])))
                wait_for("no slot, no build user, no build secret", lambda: (
                    not inst.slots() and inst.build_users() == {h.name: [] for h in inst.hosts}
                    and not [s for s in client.CoreV1Api(inst.kube).list_namespaced_secret(ns).items
                             if s.metadata.name.startswith(c.SECRET_PREFIX)]))
                t_clean = time.monotonic()
            finally:
                for h in inst.hosts:
                    h.exec(f"rm -f {GATE}", check=False)
        finally:
            rec.stop()

        # every build finished served: a host in its secret, its step ran there over SSH
        runs_prov = rec.runs("pr", "provision")
        for n in BUILDS:
            tr = done[n]
            log = step_log(inst, ns, tr, "build")
            assert _cond(tr).get("status") == "True", (n, _cond(tr), log)
            created, data = rec.secrets[c.secret_name(n)]
            assert c.KEY_ERROR not in data and c.KEY_HOST in data, (n, data)
            user, address = data[c.KEY_HOST].split("@")
            assert address in {h.address for h in inst.hosts}, (n, data)
            assert f"upgrade: building on {user}@{address}" in log and \
                f"upgrade-ok {n} as {user}" in log, (n, log)
            # exactly one provisioning run (one object: never deleted and made again), no
            # error-secret run
            states = runs_prov.get(c.provision_run_name(uids[n]), [])
            assert len({s["metadata"]["uid"] for s in states}) == 1, (n, states)
            assert _cond(states[-1]).get("status") == "True", (n, _cond(states[-1]))
            assert not rec.runs("pr", "provision-failed").get(c.provision_failed_run_name(uids[n]))
        # no provisioning run for any other build of this namespace (namespace mpc keeps the
        # earlier tests' finished runs for the watcher's retention: those are not ours)
        ours = {name for name, states in runs_prov.items() if states[-1]["metadata"].get(
            "labels", {}).get(c.LABEL_TASKRUN_NAMESPACE) == ns}
        assert ours == {c.provision_run_name(u) for u in uids.values()}, ours
        # the running builds were provisioned by release A, the waiting and the new one by B
        for n in BUILDS:
            want = inst.bundles if n.startswith("run-") else bundles_b
            got = _task_bundle(runs_prov[c.provision_run_name(uids[n])][-1])
            assert got == want["task-mpc-provision"], (n, got)
        assert not inst.slots() and inst.build_users() == {h.name: [] for h in inst.hosts}
    finally:
        if applied:     # release A back for the session's other tests (a downgrade: no builds)
            t_back = time.monotonic()
            _apply(inst, inst.install_yaml)
            wait_for("the watcher rolled back to release A", lambda: rolled_out(apps, coord)
                     and all(p.spec.containers[0].image == inst.images["glue"]
                             for p in _watcher_pods(inst).values()), interval=1)
            t_back = time.monotonic() - t_back
    print(f"\nFIGURES upgrade: make release B {t_release:.1f} s; applied B -> watcher rolled "
          f"out {t_rolled - t_apply:.1f} s; gate opened -> 4 builds done "
          f"{t_done - t_rolled:.1f} s, cleaned up {t_clean - t_done:.1f} s later; "
          f"back to A {t_back:.1f} s; test {time.monotonic() - t0:.1f} s")
