"""mpc end to end on the real node: a remote build from PipelineRun to cleanup.

Everything is what ``make release`` produces, installed the way a cluster admin
would: ``make release`` runs inside the node's network namespace against its
registry (mpc's images built from their Containerfiles and pushed, every bundle
pushed with its steps pinned to the image digest, ``install.yaml``), and the
test applies ``install.yaml`` as it is (namespace ``mpc`` enforcing Pod Security
"restricted", the watcher Deployment with 2 replicas from its released image,
RBAC, admission policy, Tasks and Pipelines); only the example host pool is
replaced by a pool of two real SSH hosts serving ``linux/arm64``, and the
admission policy's registry list names the node's registry. Nothing is loaded
into the node by hand and no Task is rewritten. The build is a PipelineRun
whose ``build`` task is ``buildah-remote`` from its bundle. Evidence comes from
the API (watch streams keep every state, since the watcher deletes successful
runs), from the hosts themselves (``host.exec``) and from the registry.
"""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import tarfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from kubernetes import client, watch

from mpc.runner import contract as c

from . import faults
from . import hosts as e2e_hosts
from . import images
from .install import (NS, PLATFORM, Install, _co, _cond, _ts, get, secret_exists, step_log,
                      wait_done, wait_for)
from .node import REGISTRY

pytestmark = pytest.mark.e2e

BUSYBOX = images.BUSYBOX.ref


# --- evidence recorders -----------------------------------------------------------------

@dataclass
class Recorder:
    """Keeps what the API and the hosts showed while a build ran (threads)."""

    inst: Install
    build_ns: str
    events: list = field(default_factory=list)       # (kind, type, obj)
    host_seen: list = field(default_factory=list)    # (monotonic, host, path)
    secrets: dict = field(default_factory=dict)      # name -> (created, data)
    errors: list = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list = field(default_factory=list)
    _watches: list = field(default_factory=list)

    def start(self) -> "Recorder":
        co = _co(self.inst.node.api_client())
        for kind, ns, plural in (("pr", NS, "pipelineruns"), ("tr", self.build_ns, "taskruns")):
            self._threads.append(threading.Thread(
                target=self._watch, args=(kind, co.list_namespaced_custom_object,
                                          ("tekton.dev", "v1", ns, plural)), daemon=True))
        self._threads.append(threading.Thread(target=self._poll, daemon=True))
        for t in self._threads:
            t.start()
        return self

    def _watch(self, kind, fn, args) -> None:
        rv = None
        while not self._stop.is_set():
            w = watch.Watch()
            self._watches.append(w)
            try:
                for ev in w.stream(fn, *args, timeout_seconds=30,
                                   **({"resource_version": rv} if rv else {})):
                    obj = ev["object"]
                    rv = obj["metadata"]["resourceVersion"]
                    self.events.append((kind, ev["type"], obj))
                    if self._stop.is_set():
                        break
            except Exception:   # noqa: BLE001 - e.g. 410 Gone: list again
                rv = None
                time.sleep(0.2)

    def _poll(self) -> None:
        core = client.CoreV1Api(self.inst.node.api_client())
        while not self._stop.is_set():
            try:
                for s in core.list_namespaced_secret(self.build_ns).items:
                    if s.metadata.name.startswith(c.SECRET_PREFIX) and s.metadata.name not in self.secrets:
                        self.secrets[s.metadata.name] = (s.metadata.creation_timestamp, {
                            k: base64.b64decode(v).decode(errors="replace")
                            for k, v in (s.data or {}).items() if k != c.KEY_PRIVATE_KEY})
                for hname, paths in self.inst.build_dirs().items():
                    for p in paths:
                        self.host_seen.append((time.monotonic(), hname, p))
            except Exception as e:   # noqa: BLE001 - one failed look must not end the recording
                self.errors.append(repr(e))
            time.sleep(0.3)

    def stop(self) -> None:
        self._stop.set()
        for w in self._watches:
            w.stop()

    def runs(self, kind: str, role: str | None = None) -> dict[str, list[dict]]:
        """name -> every state seen, in order."""
        out: dict[str, list[dict]] = {}
        for k, _type, obj in list(self.events):
            if k != kind:
                continue
            if role and (obj["metadata"].get("labels") or {}).get(c.LABEL_ROLE) != role:
                continue
            out.setdefault(obj["metadata"]["name"], []).append(obj)
        return out


# --- builds ------------------------------------------------------------------------------

def make_workspace(inst: Install, ns: str) -> str:
    """A PVC bound to a static hostPath PV on the node: the source task writes, the build reads."""
    core = client.CoreV1Api(inst.kube)
    pv = f"{ns}-src"
    core.create_persistent_volume({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
        "spec": {"capacity": {"storage": "64Mi"}, "accessModes": ["ReadWriteOnce"],
                 "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "mpc-e2e-static",
                 "hostPath": {"path": f"/var/lib/mpc-e2e-src/{ns}", "type": "DirectoryOrCreate"},
                 "claimRef": {"namespace": ns, "name": "src"}}})
    core.create_namespaced_persistent_volume_claim(ns, {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "src"},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "mpc-e2e-static",
                 "volumeName": pv, "resources": {"requests": {"storage": "64Mi"}}}})
    return pv


def drop_workspace(inst: Install, ns: str) -> None:
    try:
        client.CoreV1Api(inst.kube).delete_persistent_volume(f"{ns}-src")
    except client.ApiException as e:
        if e.status != 404:
            raise
    inst.node.exec(["rm", "-rf", f"/var/lib/mpc-e2e-src/{ns}"], check=False)


def start_build(inst: Install, ns: str, name: str, platform: str, image: str, content: str,
                workspace: str = "pvc") -> dict:
    bind = ({"name": "src", "persistentVolumeClaim": {"claimName": "src"}} if workspace == "pvc"
            else {"name": "src", "emptyDir": {}})
    body = {"apiVersion": "tekton.dev/v1", "kind": "PipelineRun",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "params": [{"name": "PLATFORM", "value": platform}],
                "workspaces": [bind],
                "pipelineSpec": {
                    "params": [{"name": "PLATFORM", "type": "string"}],
                    "workspaces": [{"name": "src"}],
                    "tasks": [
                        {"name": "source", "workspaces": [{"name": "out", "workspace": "src"}],
                         "taskSpec": {"workspaces": [{"name": "out"}], "steps": [{
                             "name": "write", "image": BUSYBOX,
                             "env": [{"name": "CONTENT", "value": content}],
                             "script": "#!/bin/sh\nset -e\ncd $(workspaces.out.path)\n"
                                       "printf '%s\\n' \"$CONTENT\" > hello.txt\n"
                                       "printf 'FROM scratch\\nCOPY hello.txt /hello.txt\\n'"
                                       " > Containerfile\n"}]}},
                        {"name": "build", "runAfter": ["source"],
                         "taskRef": {"resolver": "bundles", "params": [
                             {"name": "bundle", "value": inst.bundles["task-buildah-remote"]},
                             {"name": "name", "value": "buildah-remote"},
                             {"name": "kind", "value": "task"}]},
                         "workspaces": [{"name": "source", "workspace": "src"}],
                         "params": [{"name": "IMAGE", "value": image},
                                    {"name": "TLSVERIFY", "value": "false"},
                                    {"name": "BUILDER_IMAGE", "value": inst.builder_image},
                                    {"name": "PLATFORM", "value": "$(params.PLATFORM)"}]}]}}}
    return _co(inst.kube).create_namespaced_custom_object("tekton.dev", "v1", ns, "pipelineruns", body)



def image_file(inst: Install, repo_tag: str, path: str, work: Path) -> str:
    """Copy the image out of the registry (this machine's side of it) and read ``path``."""
    d = work / "img"
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                    f"docker://{inst.node.registry_host}/{repo_tag}", f"dir:{d}"],
                   check=True, capture_output=True, timeout=120)
    manifest = json.loads((d / "manifest.json").read_text())
    for layer in manifest["layers"]:
        blob = d / layer["digest"].split(":", 1)[1]
        with tarfile.open(fileobj=io.BytesIO(blob.read_bytes())) as t:
            for m in t.getmembers():
                if m.name.lstrip("./") == path.lstrip("/"):
                    return t.extractfile(m).read().decode()
    raise AssertionError(f"{path} not in {repo_tag}: layers {manifest['layers']}")


# --- the tests ---------------------------------------------------------------------------

def test_remote_build_from_pipelinerun_to_cleanup(mpc, e2e_namespace, tmp_path):
    t_start = time.monotonic()
    ns, inst = e2e_namespace, mpc
    make_workspace(inst, ns)
    content = f"built by mpc on {PLATFORM} {uuid.uuid4().hex}"
    image = f"{REGISTRY}/e2e/hello:{ns}"
    rec = Recorder(inst, ns).start()
    try:
        pr = start_build(inst, ns, "hello", PLATFORM, image, content)
        t_created = time.monotonic()
        pr = wait_done(inst, ns, "pipelineruns", "hello")
        t_done = time.monotonic()
        tr_name = "hello-build"
        secret = c.secret_name(tr_name)
        tr = get(inst, ns, "taskruns", tr_name)
        assert _cond(tr).get("status") == "True", (_cond(tr), step_log(inst, ns, tr, "build")
                                                   if tr.get("status", {}).get("podName") else "")
        assert _cond(pr).get("status") == "True", _cond(pr)
        uid = tr["metadata"]["uid"]

        # then: deprovisioning ran; user, slot, secret and finalizer are gone
        wait_for("the finalizer removed", lambda: c.FINALIZER not in (
            get(inst, ns, "taskruns", tr_name)["metadata"].get("finalizers") or ()))
        wait_for("the deprovisioning run succeeded", lambda: any(
            _cond(s).get("status") == "True"
            for s in rec.runs("pr", "deprovision").get(c.deprovision_run_name(uid), [])))
        t_clean = time.monotonic()
    finally:
        rec.stop()
        drop_workspace(inst, ns)
    assert not inst.slots()
    assert inst.build_users() == {h.name: [] for h in inst.hosts}
    assert not secret_exists(inst, ns, secret)

    # the watcher finalized the build TaskRun (and only the build: not the source task)
    trs = rec.runs("tr")
    assert any(c.FINALIZER in (o["metadata"].get("finalizers") or ()) for o in trs[tr_name])
    assert not any(c.FINALIZER in (o["metadata"].get("finalizers") or ())
                   for o in trs.get("hello-source", []))
    # a provisioning PipelineRun of the released Pipeline succeeded; its Task came from the
    # released bundle, pinned by digest
    prov = rec.runs("pr", "provision")[c.provision_run_name(uid)]
    assert _cond(prov[-1]).get("status") == "True", _cond(prov[-1])
    assert prov[0]["spec"]["pipelineRef"] == {"name": c.PROVISION_PIPELINE}
    child = _co(inst.kube).get_namespaced_custom_object(
        "tekton.dev", "v1", NS, "pipelines", c.PROVISION_PIPELINE)["spec"]["tasks"][0]["taskRef"]
    assert {p["name"]: p["value"] for p in child["params"]}["bundle"] == \
        inst.bundles["task-mpc-provision"]
    # the build pod started once the secret appeared
    created, data = rec.secrets[secret]
    user, address = data[c.KEY_HOST].split("@")
    steps = {s["name"]: s for s in tr["status"]["steps"]}
    build_started = _ts(steps["build"]["terminated"]["startedAt"])
    assert created <= build_started, (created, build_started)
    # the build ran on the SSH host: its user's build dir existed there during the run
    host = next(h for h in inst.hosts if h.address == address)
    seen = {(hn, p) for _t, hn, p in rec.host_seen}
    assert (host.name, f"{data[c.KEY_USER_DIR]}/mpc-build") in seen, (seen, data, rec.errors)
    assert data[c.KEY_USER_DIR] == f"/home/{user}" and c.USER_RE.match(user)
    build_log = step_log(inst, ns, tr, "build")
    assert f"mpc: building on {user}@{address} in {inst.builder_image}" in build_log, build_log
    assert f"built on {user}@{address}" in build_log, build_log      # the image came back
    # the image is in the registry with the expected content
    results = {r["name"]: r["value"] for r in tr["status"]["results"]}
    assert results["IMAGE_URL"] == image and results["IMAGE_DIGEST"].startswith("sha256:")
    assert image_file(inst, f"e2e/hello:{ns}", "/hello.txt", tmp_path) == content + "\n"

    pr_created = _ts(pr["metadata"]["creationTimestamp"])
    tr_created = _ts(tr["metadata"]["creationTimestamp"])
    prov_took = (_ts(prov[-1]["status"]["completionTime"])
                 - _ts(prov[0]["metadata"]["creationTimestamp"])).total_seconds()
    print(f"\nFIGURES remote build: PipelineRun created -> build step started "
          f"{(build_started - pr_created).total_seconds():.0f} s, of which build TaskRun created -> "
          f"build step started {(build_started - tr_created).total_seconds():.0f} s (allocation + "
          f"provisioning; the provisioning PipelineRun took {prov_took:.0f} s, secret written -> "
          f"build step started {(build_started - created).total_seconds():.0f} s: the kubelet's "
          f"volume-mount retry and the pod start) (API timestamps, "
          f"1 s resolution); "
          f"first build dir seen on the host {min(t for t, *_ in rec.host_seen) - t_created:.1f} s "
          f"after create; PipelineRun done {t_done - t_created:.1f} s; "
          f"cleaned up {t_clean - t_done:.1f} s later; test total {time.monotonic() - t_start:.1f} s")


def test_platform_without_a_host_fails_fast_with_the_reason_in_the_log(mpc, e2e_namespace):
    ns, inst = e2e_namespace, mpc
    t0 = time.monotonic()
    start_build(inst, ns, "nohost", "linux/s390x", f"{REGISTRY}/e2e/never:{ns}", "x",
                workspace="emptyDir")
    pr = wait_done(inst, ns, "pipelineruns", "nohost")
    took = time.monotonic() - t0
    tr = get(inst, ns, "taskruns", "nohost-build")
    assert _cond(pr).get("status") == "False" and _cond(tr).get("status") == "False"
    log = step_log(inst, ns, tr, "build")
    assert "mpc: no build host was provisioned for platform linux/s390x" in log, log
    assert "linux/s390x" in log.split("provisioned for platform", 1)[1].split("\n", 1)[1], log
    steps = {s["name"]: s["terminated"] for s in tr["status"]["steps"]}
    assert steps["build"]["exitCode"] == 1 and steps["push"]["reason"] != "Completed"
    wait_for("the finalizer removed", lambda: c.FINALIZER not in (
        get(inst, ns, "taskruns", "nohost-build")["metadata"].get("finalizers") or ()))
    # the watcher drops its finalizer once deprovisioning is started; that run deletes the secret
    wait_for("the error secret deleted", lambda: not secret_exists(inst, ns, c.secret_name("nohost-build")))
    print(f"\nFIGURES no-host build failed {took:.1f} s after create; log:\n{log}")


def test_deleting_the_pipelinerun_mid_build_leaves_nothing_on_the_hosts(mpc, e2e_namespace):
    ns, inst = e2e_namespace, mpc
    make_workspace(inst, ns)
    try:
        start_build(inst, ns, "doomed", PLATFORM, f"{REGISTRY}/e2e/doomed:{ns}", "doomed")
        found = wait_for("the build running on a host",
                         lambda: [p for ps in inst.build_dirs().values() for p in ps], interval=0.3)
        assert _cond(get(inst, ns, "taskruns", "doomed-build")).get("status") == "Unknown"
        assert inst.slots() and any(inst.build_users().values())
        _co(inst.kube).delete_namespaced_custom_object("tekton.dev", "v1", ns, "pipelineruns",
                                                       "doomed")

        def all_gone():
            return (get(inst, ns, "pipelineruns", "doomed") is None
                    and get(inst, ns, "taskruns", "doomed-build") is None
                    and not inst.slots()
                    and inst.build_users() == {h.name: [] for h in inst.hosts})
        wait_for("the build, its users and slots gone", all_gone)
        assert inst.build_dirs() == {h.name: [] for h in inst.hosts}, found
        wait_for("the build's secret deleted",
                 lambda: not secret_exists(inst, ns, c.secret_name("doomed-build")))
    finally:
        drop_workspace(inst, ns)


def _run_task_as(inst: Install, task: str, params: dict[str, str], run_as: int) -> dict:
    """A TaskRun of one of mpc's Tasks from its bundle, in namespace mpc, as ``run_as``
    (what OpenShift's restricted-v2 does: a uid no image knows, gid 0)."""
    name = f"{task}-uid{run_as}-{uuid.uuid4().hex[:5]}"
    body = {"apiVersion": "tekton.dev/v1", "kind": "TaskRun",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"serviceAccountName": c.TASKS_SERVICE_ACCOUNT,
                     "taskRef": {"resolver": "bundles", "params": [
                         {"name": "bundle", "value": inst.bundles[f"task-{task}"]},
                         {"name": "name", "value": task}, {"name": "kind", "value": "task"}]},
                     "params": [{"name": k, "value": v} for k, v in params.items()],
                     "podTemplate": {"securityContext": {"runAsUser": run_as, "runAsGroup": 0}}}}
    _co(inst.kube).create_namespaced_custom_object("tekton.dev", "v1", NS, "taskruns", body)
    return wait_done(inst, NS, "taskruns", name)


def test_provisioning_runs_under_an_arbitrary_uid_in_a_restricted_namespace(mpc, e2e_namespace):
    """Namespace mpc enforces Pod Security "restricted" (as shipped); the provisioning and
    deprovisioning Tasks run under a random uid that has no passwd entry in the image, and
    their ssh still reaches the host (nss_wrapper), so a build gets a working secret."""
    inst, ns = mpc, e2e_namespace
    labels = client.CoreV1Api(inst.kube).read_namespace(NS).metadata.labels
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    # a build-shaped TaskRun the watcher ignores (no PLATFORM param): its pod waits for the secret
    build = f"uid-build-{uuid.uuid4().hex[:6]}"
    tr = _co(inst.kube).create_namespaced_custom_object("tekton.dev", "v1", ns, "taskruns", {
        "apiVersion": "tekton.dev/v1", "kind": "TaskRun", "metadata": {"name": build},
        "spec": {"taskSpec": {
            "volumes": [{"name": "ssh", "secret": {"secretName": c.secret_name(build)}}],
            "steps": [{"name": "show", "image": BUSYBOX,
                       "volumeMounts": [{"name": "ssh", "mountPath": "/ssh"}],
                       "script": "#!/bin/sh\ncat /ssh/host\n"}]}}})
    ids = {"TASKRUN_NAME": build, "TASKRUN_NAMESPACE": ns, "TASKRUN_UID": tr["metadata"]["uid"]}
    run_as = 100000 + int.from_bytes(os.urandom(3), "big")
    prov = _run_task_as(inst, "mpc-provision", {**ids, "PLATFORM": PLATFORM}, run_as)
    assert _cond(prov).get("status") == "True", (_cond(prov), step_log(inst, NS, prov, "provision"))
    outcome = {r["name"]: r["value"] for r in prov["status"].get("results", [])}
    assert outcome["outcome"] == "served", outcome
    host = next(h for h in inst.hosts if h.name == outcome["host"])
    user = c.build_user(ns, build, tr["metadata"]["uid"])
    assert user in host.users()
    pod = client.CoreV1Api(inst.kube).read_namespaced_pod(prov["status"]["podName"], NS)
    assert pod.spec.security_context.run_as_user == run_as
    # the step ran the released runner image, by digest (no image loaded by hand)
    assert [ctr.image for ctr in pod.spec.containers] == [inst.images["task-runner"]]
    done = wait_done(inst, ns, "taskruns", build)
    assert _cond(done).get("status") == "True", _cond(done)
    assert f"{user}@{host.address}" in step_log(inst, ns, done, "show")

    dep = _run_task_as(inst, "mpc-deprovision", ids, run_as + 1)
    assert _cond(dep).get("status") == "True", (_cond(dep), step_log(inst, NS, dep, "deprovision"))
    assert user not in host.users()
    assert not secret_exists(inst, ns, c.secret_name(build))
    assert not [s for s in inst.slots() if s.startswith(f"mpc-slot-{host.name}-")]


def test_a_cancelled_provisioning_run_still_gives_the_build_an_error_secret(mpc, e2e_namespace,
                                                                           host_farm):
    """A provisioning run cancelled with status Cancelled skips its error-secret finally
    (Tekton); the watcher's mpc-provision-failed run answers the build all the same, with
    the cause in the message, so the build fails fast instead of hanging."""
    inst, ns = mpc, e2e_namespace
    core = client.CoreV1Api(inst.kube)
    # a linux/s390x host that accepts TCP but never speaks SSH (its sshd is stopped with
    # SIGSTOP): the provisioning step keeps retrying it, so it is surely running when cancelled
    h = e2e_hosts.move_into_node(host_farm.add(), inst.node)
    pool_cm = core.read_namespaced_config_map(c.HOST_POOL_CONFIGMAP, NS)
    before = pool_cm.data[c.POOL_KEY]
    pool = yaml.safe_load(before)
    core.create_namespaced_secret(NS, client.V1Secret(
        metadata=client.V1ObjectMeta(name=f"admin-{h.name}"),
        data={"id_rsa": base64.b64encode(h.admin_key).decode()}))
    pool["hosts"].append({"name": h.name, "address": h.address, "user": h.admin_user,
                          "secret": f"admin-{h.name}", "platform": "linux/s390x",
                          "concurrency": 1, "hostKey": h.host_public_key})
    core.patch_namespaced_config_map(c.HOST_POOL_CONFIGMAP, NS,
                                     {"data": {c.POOL_KEY: yaml.safe_dump(pool)}})
    os.kill(h.sshd_pid(), signal.SIGSTOP)
    name = "cancel-me"
    try:
        tr = _co(inst.kube).create_namespaced_custom_object("tekton.dev", "v1", ns, "taskruns", {
            "apiVersion": "tekton.dev/v1", "kind": "TaskRun", "metadata": {"name": name},
            "spec": {"params": [{"name": c.PLATFORM_PARAM, "value": "linux/s390x"}],
                     "taskSpec": {
                         "params": [{"name": c.PLATFORM_PARAM, "type": "string"}],
                         "volumes": [{"name": "ssh", "secret": {"secretName": c.secret_name(name)}}],
                         "steps": [{"name": "build", "image": BUSYBOX,
                                    "volumeMounts": [{"name": "ssh", "mountPath": "/ssh"}],
                                    "script": "#!/bin/sh\ncat /ssh/error; exit 1\n"}]}}})
        uid = tr["metadata"]["uid"]
        run = c.provision_run_name(uid)
        # cancel once its provision step is really running (stuck on the silent host)
        wait_for("the provision step running", lambda: any(
            (t.get("status") or {}).get("steps", [{}])[0].get("running")
            for t in _co(inst.kube).list_namespaced_custom_object(
                "tekton.dev", "v1", NS, "taskruns",
                label_selector=f"tekton.dev/pipelineRun={run}")["items"]))
        _co(inst.kube).patch_namespaced_custom_object(
            "tekton.dev", "v1", NS, "pipelineruns", run, {"spec": {"status": "Cancelled"}})
        pr = wait_done(inst, NS, "pipelineruns", run)
        assert _cond(pr).get("reason") == "Cancelled", _cond(pr)
        done = wait_done(inst, ns, "taskruns", name)
        assert _cond(done).get("status") == "False"
        msg = base64.b64decode(core.read_namespaced_secret(
            c.secret_name(name), ns).data[c.KEY_ERROR]).decode() \
            if secret_exists(inst, ns, c.secret_name(name)) else step_log(inst, ns, done, "build")
        assert run in msg and "Cancelled" in msg, msg
    finally:
        os.kill(h.sshd_pid(), signal.SIGCONT)
        core.patch_namespaced_config_map(c.HOST_POOL_CONFIGMAP, NS, {"data": {c.POOL_KEY: before}})
        core.delete_namespaced_secret(f"admin-{h.name}", NS)
        h.destroy()


def test_a_registry_outage_as_a_build_starts_delays_it_instead_of_failing_it(mpc, e2e_namespace):
    """The registry that serves mpc's bundles is down when a build is created: Tekton
    cannot fetch the provisioning Pipeline and ends that run (``CouldntGetPipeline``), which
    started nothing. The watcher makes the run again after a pause (``RunUnresolved``
    Event), so once the registry is back the build gets its host. Before, the build got
    an error secret for a short blip (the soak: ``CouldntGetTask`` during an API server
    restart) or, as here, no answer at all (its error-secret run was unresolved too)."""
    inst, ns = mpc, e2e_namespace
    core = client.CoreV1Api(inst.kube)
    name = "outage"
    secret = c.secret_name(name)

    def unresolved_event() -> str:
        return next((e.message for e in core.list_namespaced_event(ns).items
                     if e.reason == "RunUnresolved" and e.involved_object.name == name), "")
    with faults.registry_down(inst.node):
        _co(inst.kube).create_namespaced_custom_object("tekton.dev", "v1", ns, "taskruns", {
            "apiVersion": "tekton.dev/v1", "kind": "TaskRun", "metadata": {"name": name},
            "spec": {"params": [{"name": c.PLATFORM_PARAM, "value": PLATFORM}],
                     "taskSpec": {
                         "params": [{"name": c.PLATFORM_PARAM, "type": "string"}],
                         "volumes": [{"name": "ssh", "secret": {"secretName": secret}}],
                         "steps": [{"name": "build", "image": BUSYBOX,
                                    "volumeMounts": [{"name": "ssh", "mountPath": "/ssh"}],
                                    "script": "#!/bin/sh\nif [ -s /ssh/host ]; then "
                                              "cat /ssh/host; else cat /ssh/error; exit 1; fi\n"}]}}})
        # (without the fix no answer ever came: the provision-failed run that was to write
        # the error secret could not be resolved either, and the build hung)
        wait_for("the unresolved provisioning run made again, or an error secret",
                 lambda: unresolved_event() or secret_exists(inst, ns, secret) and c.KEY_ERROR
                 in (core.read_namespaced_secret(secret, ns).data or {}))
    done = wait_done(inst, ns, "taskruns", name)
    log = step_log(inst, ns, done, "build")
    assert _cond(done).get("status") == "True", (log, inst.watcher_log())
    msg = unresolved_event()
    assert "CouldntGetPipeline" in msg or "CouldntGetTask" in msg, msg
    assert log.strip().split("@")[-1] in {h.address for h in inst.hosts}, log
    wait_for("the finalizer removed and the secret deleted", lambda: not secret_exists(
        inst, ns, secret) and c.FINALIZER not in (
        get(inst, ns, "taskruns", name)["metadata"].get("finalizers") or ()))
    print(f"\nFIGURES registry outage: {msg}")
