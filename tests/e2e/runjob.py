"""``make run`` / ``make stop``: a real multi-platform build on the embedded cluster.

``python -m tests.e2e.runjob run`` (``make run``):

1. brings up the e2e node (``node.py``) as instance ``$MPC_E2E_NAME`` (default
   ``run``; warm when its state is kept);
2. ``make release`` against the node's registry, exactly as the e2e does
   (``install._release``), and installs ``dist``'s ``install.yaml`` as a cluster
   admin would (``kubectl apply --server-side``), with the example pool replaced;
3. starts two SSH build hosts that really are linux/arm64 and linux/s390x (QEMU
   user emulation in a private binfmt_misc, ``tests/infra/emulatedhosts.py``) in a
   detached keeper process (``runjob hosts``), so they outlive ``make run``, and
   installs a pool for them, with ``lookAhead`` (the matrix's builds are
   provisioned while ``source`` runs);
4. pushes buildah-remote's builder image as an index (amd64 for the pods, arm64
   and s390x for the hosts, the test-host rootfs of each) and a small base image
   per architecture made from the cached foreign rootfs;
5. runs the sample PipelineRun (``demo_pipelinerun``): ``source`` writes a
   Containerfile without RUN (FROM the base, COPY, ENV, LABEL), ``build`` is a
   matrix over PLATFORM of ``buildah-remote`` from its released bundle, ``index``
   assembles one image index from the matrix results and pushes it;
6. reads the index back from the registry: the architecture of each image and
   ``file`` on ``/usr/bin/ls`` from its layers; leaves everything up and prints
   ``export KUBECONFIG=...`` and the commands to look around.

If a build fails because an emulated host cannot start a container (qemu-user,
see ``docs/emulated-hosts.md``), it says so precisely and exits 1; nothing is faked.

``python -m tests.e2e.runjob stop`` (``make stop``): stops the keeper (hosts
destroyed, their farm closed), brings the node down and checks this machine is as
before (``node.leftovers()``, ``node.host_changes()``, the hosts' netns/veth/cgroups,
this machine's binfmt_misc unmounted).

``tests/e2e/test_run.py`` runs steps 4-6 through the same functions on the
session's e2e node.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml
from kubernetes import client

from mpc.runner import contract as c
from tests.infra import emulation, foreignroot, paths

from . import images
from .node import REGISTRY, Node

NAME = os.environ.get("MPC_E2E_NAME", "run")
DEMO_NS = "mpc-demo"
ARCHES = ("arm64", "s390x")
PLATFORMS = tuple(f"linux/{a}" for a in ARCHES)
PROBE = "/usr/bin/ls"          # the binary of the base whose architecture is shown
PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TIMEOUT = float(os.environ.get("MPC_RUN_TIMEOUT", "1800"))
# what a build step's log says when the host's podman could not start the builder container:
# qemu-user cannot emulate the namespace clone of runc's nsexec / crun's memfd re-exec (root's
# podman: conmon gets nothing back from runc) nor a user namespace (rootless podman)
RUNTIME_FAILURES = ("container create failed (no logs from conmon)", "runc create failed",
                    "could not ensure we are a cloned binary", "Failed to re-execute libcrun",
                    "cannot clone: Invalid argument", "read init-p")
# qemu-user cannot start a container at all (no user namespace for rootless podman, no
# namespace clone for runc/crun under root's): the pool says so per host, and buildah-remote
# runs the build script as root on the host itself (provisioning grants sudo unshare for it)
BUILDER = c.BUILDER_HOST
_T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", flush=True)


class BuildBlocked(RuntimeError):
    """A build ran up to the emulated host and failed there for a known, stated reason."""


# --- images: hand-made OCI layouts pushed with skopeo ---------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _oci_layout(out: Path, layer: Path, arch: str, ref: str, entrypoint: list[str]) -> Path:
    """``out``: an OCI layout of one image: ``layer`` (an uncompressed tar) for linux/``arch``."""
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    ld = _sha256(layer)
    os.replace(layer, blobs / ld)

    def blob(obj: dict) -> dict:
        data = json.dumps(obj, sort_keys=True).encode()
        d = hashlib.sha256(data).hexdigest()
        (blobs / d).write_bytes(data)
        return {"digest": f"sha256:{d}", "size": len(data)}
    config = blob({"architecture": arch, "os": "linux", "created": "1970-01-01T00:00:00Z",
                   "config": {"Env": [f"PATH={PATH_ENV}"], "Entrypoint": entrypoint,
                              "WorkingDir": "/"},
                   "rootfs": {"type": "layers", "diff_ids": [f"sha256:{ld}"]}})
    manifest = blob({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                     "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                     "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                 "digest": f"sha256:{ld}", "size": (blobs / ld).stat().st_size}]})
    (out / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (out / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest,
        "annotations": {"org.opencontainers.image.ref.name": ref}}]}))
    return out


def _registry(node: Node, method: str, path: str, body: bytes | None = None,
              ctype: str | None = None, accept: str | None = None) -> tuple[bytes, dict]:
    req = urllib.request.Request(f"http://{node.registry_host}/v2/{path}", data=body, method=method)
    if ctype:
        req.add_header("Content-Type", ctype)
    req.add_header("Accept", accept or ", ".join((
        "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json")))
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read(), dict(r.headers)


def _exists(node: Node, repo: str, tag: str) -> bool:
    try:
        _registry(node, "HEAD", f"{repo}/manifests/{tag}")
        return True
    except Exception:   # noqa: BLE001 - 404 or no such repo
        return False


def _copy(node: Node, src: str, repo: str, tag: str) -> None:
    """skopeo copy ``src`` to the node's registry (this machine's side of it); zstd layers,
    which the emulated hosts decompress far faster than gzip."""
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                    "--dest-compress-format", "zstd", src,
                    f"docker://{node.registry_host}/{repo}:{tag}"],
                   check=True, capture_output=True, timeout=900)


def _push_index(node: Node, repo: str, tag: str, members: dict[str, str]) -> str:
    """An OCI index ``repo:tag`` over the images ``repo:<member tag>`` (arch -> tag);
    returns ``REGISTRY/repo:tag`` as pods name it."""
    manifests = []
    for arch, mtag in members.items():
        raw, headers = _registry(node, "GET", f"{repo}/manifests/{mtag}")
        media = json.loads(raw).get("mediaType") or headers.get("Content-Type")
        manifests.append({"mediaType": media, "size": len(raw),
                          "digest": "sha256:" + hashlib.sha256(raw).hexdigest(),
                          "platform": {"architecture": arch, "os": "linux"}})
    body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                       "manifests": manifests}).encode()
    _registry(node, "PUT", f"{repo}/manifests/{tag}", body,
              "application/vnd.oci.image.index.v1+json")
    return f"{REGISTRY}/{repo}:{tag}"


def _extract(tarball: Path, dest: Path) -> None:
    subprocess.run(f"zstd -dc {tarball} | tar -C {dest} --numeric-owner -xf -", shell=True,
                   check=True)


def _layer_without_devices(tarball: Path, out: Path) -> None:
    """The rootfs tarball as an uncompressed layer, without its device nodes: an image has
    none (the runtime makes /dev), and the hosts' podman could not make them: a host runs
    in a user namespace, where mknod of a device is not permitted ("processing tar file
    (operation not permitted)" when the layer is applied)."""
    p = subprocess.Popen(["zstd", "-dc", str(tarball)], stdout=subprocess.PIPE)
    with tarfile.open(fileobj=p.stdout, mode="r|") as src, \
            tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst:
        for m in src:
            if m.ischr() or m.isblk():
                continue
            dst.addfile(m, src.extractfile(m) if m.isreg() else None)
    if p.wait():
        raise RuntimeError(f"zstd -dc {tarball} failed")


def builder_index(node: Node, log: Callable[[str], None] = say) -> str:
    """buildah-remote's BUILDER_IMAGE as one index: linux/amd64 (the pods: the e2e builder,
    ``images.BUILDER``) and linux/arm64, linux/s390x (the hosts' podman runs it there: the
    emulated test hosts' own rootfs, which has bash, buildah and podman)."""
    repo = "e2e/builder-multi"
    keys = {"amd64": images.BUILDER.key(), "recipe": "2",
            **{a: foreignroot.cache_key(a) for a in ARCHES}}
    tag = hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]
    if _exists(node, repo, tag):
        return f"{REGISTRY}/{repo}:{tag}"
    members = {}
    node.ensure_image(images.BUILDER)       # its cached oci-archive exists from here on
    if not _exists(node, repo, f"amd64-{keys['amd64']}"):
        log("pushing the builder image for linux/amd64 (the pods)")
        _copy(node, f"oci-archive:{images.BUILDER.archive()}:{images.BUILDER.ref}", repo,
              f"amd64-{keys['amd64']}")
    members["amd64"] = f"amd64-{keys['amd64']}"
    for arch in ARCHES:
        mtag = f"{arch}-{keys[arch]}-{keys['recipe']}"
        members[arch] = mtag
        if _exists(node, repo, mtag):
            continue
        log(f"pushing the builder image for linux/{arch} (the {arch} test-host rootfs)")
        with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="mpc-run-builder-") as tmp:
            layer = Path(tmp) / "layer.tar"
            _layer_without_devices(foreignroot.ensure_rootfs(arch), layer)
            lay = _oci_layout(Path(tmp) / "oci", layer, arch, mtag, ["/bin/bash"])
            _copy(node, f"oci:{lay}:{mtag}", repo, mtag)
    return _push_index(node, repo, tag, members)


def _needed(root: Path, binary: Path) -> set[Path]:
    """``binary`` (inside ``root``) and what it loads: its interpreter and DT_NEEDED,
    found in the foreign root's library directories, recursively (readelf reads any ELF)."""
    out: set[Path] = set()
    todo = [binary]
    libdirs = sorted({p.parent for p in root.glob("usr/lib/*-linux-gnu*/libc.so.6")})
    while todo:
        f = todo.pop()
        real = root / os.path.relpath(os.path.realpath(root / f.relative_to("/")), root)
        if f in out:
            continue
        out.add(f)
        text = subprocess.run(["readelf", "-d", "-l", str(real)], capture_output=True,
                              text=True).stdout
        for line in text.splitlines():
            if "Requesting program interpreter:" in line:
                todo.append(Path(line.split(":", 1)[1].strip(" ]")))
            elif "(NEEDED)" in line:
                lib = line.split("[", 1)[1].rstrip("]")
                for d in libdirs:
                    if (d / lib).exists():
                        todo.append(Path("/") / (d / lib).relative_to(root))
                        break
    return out


def base_index(node: Node, log: Callable[[str], None] = say) -> str:
    """The sample build's base: per architecture ``/usr/bin/ls`` with its loader and
    libraries, taken from the cached foreign rootfs (so its binaries are of that
    architecture), as one index."""
    repo = "e2e/demo-base"
    # recipe 2: each path once in the layer (buildah refuses duplicates when it applies it)
    keys = {**{a: foreignroot.cache_key(a) for a in ARCHES}, "recipe": "2"}
    tag = hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]
    if _exists(node, repo, tag):
        return f"{REGISTRY}/{repo}:{tag}"
    members = {}
    for arch in ARCHES:
        mtag = f"{arch}-{keys[arch]}-{keys['recipe']}"
        members[arch] = mtag
        if _exists(node, repo, mtag):
            continue
        log(f"pushing the base image for linux/{arch} ({PROBE} and its libraries from the "
            f"{arch} rootfs)")
        with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="mpc-run-base-") as tmp:
            root = Path(tmp) / "root"
            root.mkdir()
            _extract(foreignroot.ensure_rootfs(arch), root)
            layer = Path(tmp) / "layer.tar"
            with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as t:
                added: set[str] = set()

                def add(name: str, path: Path | None) -> None:
                    if name in added:       # two needed names for one file (a symlink's target)
                        return
                    added.add(name)
                    ti = t.gettarinfo(str(path), name) if path else tarfile.TarInfo(name)
                    if path is None:
                        ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                    ti.uid = ti.gid = 0
                    ti.uname = ti.gname = ""
                    ti.mtime = 0
                    if ti.isreg():
                        with open(path, "rb") as f:
                            t.addfile(ti, f)
                    else:
                        t.addfile(ti)
                for name in ("bin", "lib", "sbin"):           # merged /usr, as in the rootfs
                    add(name, root / name)
                done = set()
                for f in sorted(_needed(root, Path(PROBE))):
                    real = Path(os.path.realpath(root / f.relative_to("/")))
                    for d in list(reversed(real.relative_to(root).parents))[1:]:
                        if d not in done:
                            add(str(d), None)
                            done.add(d)
                    add(str(real.relative_to(root)), real)
                    if f != Path("/") / real.relative_to(root) and f.parent.is_relative_to("/usr"):
                        add(str(f.relative_to("/")), root / f.relative_to("/"))   # the symlink
            lay = _oci_layout(Path(tmp) / "oci", layer, arch, mtag, [PROBE])
            _copy(node, f"oci:{lay}:{mtag}", repo, mtag)
    return _push_index(node, repo, tag, members)


# --- the sample PipelineRun -------------------------------------------------------------------

CONTAINERFILE = """\
FROM {base}
COPY hello.txt /hello.txt
ENV MPC_DEMO=1
LABEL org.opencontainers.image.title="mpc multi-platform demo"
"""

INDEX_SCRIPT = """\
#!/bin/bash
# one image index over the images the matrix built (IMAGE_URL[i]@IMAGE_DIGEST[i])
set -euo pipefail
urls=() digests=()
n=$#
half=$((n / 2))
b=(buildah --storage-driver vfs)
"${b[@]}" manifest create mpc-index >/dev/null
i=1
for arg in "$@"; do
  if [ "$i" -le "$half" ]; then urls+=("$arg"); else digests+=("$arg"); fi
  i=$((i + 1))
done
for j in "${!urls[@]}"; do
  case "${urls[j]##*/}" in *:*) ref="${urls[j]%:*}" ;; *) ref="${urls[j]}" ;; esac
  echo "adding ${urls[j]} (${digests[j]})"
  "${b[@]}" manifest add --tls-verify=false mpc-index "docker://$ref@${digests[j]}" >/dev/null
done
"${b[@]}" manifest push --all --tls-verify=false --digestfile /tmp/digest mpc-index "docker://$INDEX"
printf '%s' "$(cat /tmp/digest)" > "$RESULT_INDEX_DIGEST"
echo "pushed the index $INDEX@$(cat /tmp/digest)"
"""


def demo_pipelinerun(name: str, bundle: str, builder: str, base: str, image: str,
                     claim: str, timeout: float = TIMEOUT) -> dict:
    return {
        "apiVersion": "tekton.dev/v1", "kind": "PipelineRun",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "mpc-demo"}},
        "spec": {
            "workspaces": [{"name": "src", "persistentVolumeClaim": {"claimName": claim}}],
            # Tekton ends it (and its pods) when whoever follows it gives up
            "timeouts": {"pipeline": f"{int(timeout)}s"},
            "pipelineSpec": {
                "workspaces": [{"name": "src"}],
                "results": [{"name": "INDEX", "value": "$(tasks.index.results.INDEX_DIGEST)"}],
                "tasks": [
                    {"name": "source", "workspaces": [{"name": "out", "workspace": "src"}],
                     "taskSpec": {"workspaces": [{"name": "out"}], "steps": [{
                         "name": "write", "image": images.BUSYBOX.ref,
                         "env": [{"name": "CONTAINERFILE",
                                  "value": CONTAINERFILE.format(base=base)}],
                         "script": "#!/bin/sh\nset -e\ncd $(workspaces.out.path)\n"
                                   "printf 'hello from mpc\\n' > hello.txt\n"
                                   "printf '%s' \"$CONTAINERFILE\" > Containerfile\n"
                                   "cat Containerfile\n"}]}},
                    {"name": "build", "runAfter": ["source"],
                     "matrix": {"params": [{"name": "PLATFORM",
                                            "value": list(PLATFORMS)}]},
                     "taskRef": {"resolver": "bundles", "params": [
                         {"name": "bundle", "value": bundle},
                         {"name": "name", "value": "buildah-remote"},
                         {"name": "kind", "value": "task"}]},
                     "workspaces": [{"name": "source", "workspace": "src"}],
                     "params": [{"name": "IMAGE", "value": image},
                                {"name": "IMAGE_APPEND_PLATFORM", "value": "true"},
                                {"name": "TLSVERIFY", "value": "false"},
                                {"name": "BUILDER_IMAGE", "value": builder}]},
                    {"name": "index", "runAfter": ["build"],
                     "params": [{"name": "URLS", "value": "$(tasks.build.results.IMAGE_URL[*])"},
                                {"name": "DIGESTS",
                                 "value": "$(tasks.build.results.IMAGE_DIGEST[*])"}],
                     "taskSpec": {
                         "params": [{"name": "URLS", "type": "array"},
                                    {"name": "DIGESTS", "type": "array"}],
                         "results": [{"name": "INDEX_DIGEST"}],
                         "steps": [{"name": "index", "image": builder,
                                    "securityContext": {"runAsUser": 0},
                                    "env": [{"name": "INDEX", "value": image},
                                            {"name": "RESULT_INDEX_DIGEST",
                                             "value": "$(results.INDEX_DIGEST.path)"}],
                                    "args": ["$(params.URLS[*])", "$(params.DIGESTS[*])"],
                                    "script": INDEX_SCRIPT}]}}]}}}


def ensure_namespace(kube, ns: str) -> None:
    """Namespace ``ns`` exists (made if missing) and its ``default`` ServiceAccount too."""
    core = client.CoreV1Api(kube)
    try:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    except client.ApiException as e:
        if e.status != 409:
            raise
    deadline = time.monotonic() + 60
    while True:
        try:
            core.read_namespaced_service_account("default", ns)
            return
        except client.ApiException as e:
            if e.status != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def make_claim(node: Node, kube, ns: str, name: str) -> str:
    """A PVC bound to a static hostPath PV on the node (there is no provisioner)."""
    core = client.CoreV1Api(kube)
    pv = f"{ns}-{name}"
    for fn in (lambda: core.delete_namespaced_persistent_volume_claim(name, ns),
               lambda: core.delete_persistent_volume(pv)):
        try:
            fn()
        except client.ApiException as e:
            if e.status != 404:
                raise
    deadline = time.monotonic() + 60
    while True:
        try:
            core.read_persistent_volume(pv)
        except client.ApiException as e:
            if e.status == 404:
                break
        if time.monotonic() > deadline:
            raise TimeoutError(f"PV {pv} not deleted")
        # a PVC protected by a finished pod's reference goes once the pod is gone
        time.sleep(0.5)
    node.exec(["rm", "-rf", f"/var/lib/mpc-e2e-src/{pv}"], check=False)
    core.create_persistent_volume({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
        "spec": {"capacity": {"storage": "64Mi"}, "accessModes": ["ReadWriteOnce"],
                 "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "mpc-e2e-static",
                 "hostPath": {"path": f"/var/lib/mpc-e2e-src/{pv}", "type": "DirectoryOrCreate"},
                 "claimRef": {"namespace": ns, "name": name}}})
    core.create_namespaced_persistent_volume_claim(ns, {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "mpc-e2e-static",
                 "volumeName": pv, "resources": {"requests": {"storage": "64Mi"}}}})
    return name


def drop_claim(node: Node, kube, ns: str, name: str) -> None:
    core = client.CoreV1Api(kube)
    for fn in (lambda: core.delete_namespaced_persistent_volume_claim(name, ns),
               lambda: core.delete_persistent_volume(f"{ns}-{name}")):
        try:
            fn()
        except client.ApiException as e:
            if e.status != 404:
                raise
    node.exec(["rm", "-rf", f"/var/lib/mpc-e2e-src/{ns}-{name}"], check=False)


def _cond(obj: dict) -> dict:
    return c.succeeded_condition(obj) or {}


def _state(obj: dict) -> str:
    cond = _cond(obj)
    return cond.get("reason") or "Pending"


@dataclass
class Outcome:
    pipelinerun: dict
    taskruns: dict[str, dict]          # name -> last state
    logs: dict[str, str]               # build TaskRun name -> build step log (failed ones)
    index: str = ""                    # REF@digest when pushed


def run_demo(node: Node, kube, ns: str, name: str, bundle: str, builder: str, base: str,
             image: str, log: Callable[[str], None] = say, timeout: float = TIMEOUT) -> Outcome:
    """Create the sample PipelineRun in ``ns`` and follow it to its end, logging each
    change of state (its TaskRuns, the provisioning runs in ``mpc``, the build pods)."""
    co = client.CustomObjectsApi(kube)
    core = client.CoreV1Api(kube)
    try:
        co.delete_namespaced_custom_object("tekton.dev", "v1", ns, "pipelineruns", name)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            co.get_namespaced_custom_object("tekton.dev", "v1", ns, "pipelineruns", name)
            time.sleep(0.5)
    except client.ApiException as e:
        if e.status != 404:
            raise
    claim = make_claim(node, kube, ns, f"{name}-src")
    co.create_namespaced_custom_object("tekton.dev", "v1", ns, "pipelineruns",
                                       demo_pipelinerun(name, bundle, builder, base, image, claim,
                                                        timeout))
    log(f"PipelineRun {ns}/{name} created: source -> build (matrix over "
        f"{', '.join(PLATFORMS)}, buildah-remote from {bundle.split('@')[0]}) -> index")
    seen: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    pr: dict = {}
    trs: dict[str, dict] = {}
    while True:
        pr = co.get_namespaced_custom_object("tekton.dev", "v1", ns, "pipelineruns", name)
        trs = {t["metadata"]["name"]: t for t in co.list_namespaced_custom_object(
            "tekton.dev", "v1", ns, "taskruns",
            label_selector=f"tekton.dev/pipelineRun={name}")["items"]}
        notes = {}
        for tn, t in trs.items():
            plat = next((p["value"] for p in t["spec"].get("params", [])
                         if p["name"] == "PLATFORM"), "")
            st = _state(t)
            if st in ("Pending", "Running"):
                for s in (t.get("status") or {}).get("steps") or ():
                    if "running" in s:      # the first running one; later ones wait for it
                        st = f"Running step {s['name']}"
                        break
            notes[f"taskrun {tn}" + (f" ({plat})" if plat else "")] = st
        for r in co.list_namespaced_custom_object("tekton.dev", "v1", "mpc",
                                                  "pipelineruns")["items"]:
            role = (r["metadata"].get("labels") or {}).get(c.LABEL_ROLE)
            if role in ("provision", "deprovision"):
                notes[f"{role} run {r['metadata']['name']}"] = _state(r)
        for k, v in notes.items():
            if seen.get(k) != v:
                seen[k] = v
                log(f"  {k}: {v}")
        if _cond(pr).get("status") in ("True", "False"):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"PipelineRun {ns}/{name} not done after {timeout:.0f}s")
        time.sleep(2)
    out = Outcome(pr, trs, {})
    for tn, t in trs.items():
        if _cond(t).get("status") == "False" and (t.get("status") or {}).get("podName"):
            step = "build" if any(s.get("name") == "build" for s in t["status"].get("steps", [])) \
                else t["status"]["steps"][0]["name"]
            try:
                out.logs[tn] = core.read_namespaced_pod_log(t["status"]["podName"], ns,
                                                            container=f"step-{step}")
            except client.ApiException as e:
                out.logs[tn] = f"(no log: {e.reason})"
    results = {r["name"]: r["value"] for r in (pr.get("status") or {}).get("results") or ()}
    if results.get("INDEX"):
        out.index = f"{image}@{results['INDEX']}"
    return out


def explain(out: Outcome) -> str:
    """Why the run failed, from the failed TaskRuns and their build logs; raises
    ``BuildBlocked`` when it is the known emulation limit."""
    lines = [f"PipelineRun {out.pipelinerun['metadata']['name']}: "
             f"{_cond(out.pipelinerun).get('reason')}: {_cond(out.pipelinerun).get('message')}"]
    blocked = []
    for tn, text in out.logs.items():
        tail = "\n".join(text.splitlines()[-25:])
        lines.append(f"--- {tn}: {_cond(out.taskruns[tn]).get('message')}\n{tail}")
        if any(s in text for s in RUNTIME_FAILURES):
            blocked.append(tn)
    msg = "\n".join(lines)
    if blocked and len(blocked) == len(out.logs):
        raise BuildBlocked(msg)
    return msg


def inspect_index(node: Node, ref: str, work: Path) -> list[dict]:
    """Each image of the index ``ref`` (REGISTRY/repo:tag@digest): its platform, digest,
    config architecture and ``file`` on ``PROBE`` taken from its layers."""
    repo = ref.split("/", 1)[1].split("@")[0].rsplit(":", 1)[0]
    digest = ref.split("@")[1]
    raw, _ = _registry(node, "GET", f"{repo}/manifests/{digest}")
    index = json.loads(raw)
    work.mkdir(parents=True, exist_ok=True)     # skopeo's dir: makes the last part only
    out = []
    for i, m in enumerate(index.get("manifests", [])):
        d = work / f"img{i}"
        shutil.rmtree(d, ignore_errors=True)
        subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                        f"docker://{node.registry_host}/{repo}@{m['digest']}", f"dir:{d}"],
                       check=True, capture_output=True, timeout=300)
        manifest = json.loads((d / "manifest.json").read_text())
        config = json.loads((d / manifest["config"]["digest"].split(":", 1)[1]).read_bytes())
        root = d / "root"
        root.mkdir()
        for layer in manifest["layers"]:
            subprocess.run(["tar", "-C", str(root), "--no-same-owner", "-xf",
                            str(d / layer["digest"].split(":", 1)[1])],
                           check=True, capture_output=True)
        probe = root / PROBE.lstrip("/")
        out.append({"platform": f"{m['platform']['os']}/{m['platform']['architecture']}",
                    "digest": m["digest"], "architecture": config.get("architecture"),
                    "file": subprocess.run(["file", "-b", str(probe)], capture_output=True,
                                           text=True).stdout.strip() if probe.exists()
                    else f"{PROBE} missing",
                    "hello": (root / "hello.txt").read_text() if (root / "hello.txt").exists()
                    else None,
                    "elf_machine": emulation.elf_machine(probe.read_bytes()[:64])
                    if probe.exists() else None})
    return out


# --- pool of emulated hosts ---------------------------------------------------------------------

def pool_entries(hosts: list[dict]) -> list[dict]:
    return [{"name": h["name"], "address": h["address"], "user": h["admin_user"],
             "secret": f"admin-{h['name']}", "platform": f"linux/{h['arch']}", "concurrency": 1,
             "hostKey": h["host_public_key"], "builder": BUILDER} for h in hosts]


def install_pool(kube, hosts: list[dict], ns: str = "mpc") -> None:
    """Admin key Secrets and the pool ConfigMap for ``hosts`` (replacing both if there)."""
    core = client.CoreV1Api(kube)
    for h in hosts:
        sec = client.V1Secret(metadata=client.V1ObjectMeta(name=f"admin-{h['name']}"),
                              data={"id_rsa": h["admin_key"]})
        try:
            core.create_namespaced_secret(ns, sec)
        except client.ApiException as e:
            if e.status != 409:
                raise
            core.replace_namespaced_secret(f"admin-{h['name']}", ns, sec)
    # lookAhead: the matrix's builds are provisioned while ``source`` runs (docs/look-ahead.md)
    data = {c.POOL_KEY: yaml.safe_dump({"hosts": pool_entries(hosts), "lookAhead": True})}
    try:
        core.create_namespaced_config_map(ns, client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=c.HOST_POOL_CONFIGMAP), data=data))
    except client.ApiException as e:
        if e.status != 409:
            raise
        core.patch_namespaced_config_map(c.HOST_POOL_CONFIGMAP, ns, {"data": data})


def host_record(h, arch: str) -> dict:
    return {"name": h.name, "arch": arch, "address": h.address, "admin_user": h.admin_user,
            "admin_key": base64.b64encode(h.admin_key).decode(),
            "host_public_key": h.host_public_key, "netns": h.netns, "veth": h.veth,
            "cgroup": h.netns, "sshd_pid": h.sshd_pid()}


# --- the keeper of the hosts (outlives make run) ----------------------------------------------

def hosts_file(node: Node) -> Path:
    return node.dir / "run-hosts.json"


def keeper(name: str) -> int:
    """``runjob hosts``: start the emulated hosts in the node's netns, write their records,
    hold them until SIGTERM, then destroy them (HostFarm.close)."""
    from tests.infra.sshhosts import HostFarm

    from .hosts import move_into_node
    from .install import PREPARE_HOST
    node = Node(name)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    farm = HostFarm()
    try:
        records = []
        for arch in ARCHES:
            t = time.monotonic()
            h = move_into_node(farm.add(name=f"emu-{arch}", arch=arch), node)
            h.exec(PREPARE_HOST)
            rec = host_record(h, arch)
            records.append(rec)
            print(f"host {h.name} linux/{arch} at {h.address} up in "
                  f"{time.monotonic() - t:.1f}s: uname -m = {h.exec('uname -m').stdout.strip()}",
                  flush=True)
        hosts_file(node).write_text(json.dumps({"pid": os.getpid(), "farm_dir": str(farm.dir),
                                                "subnet": farm.SUBNET, "hosts": records},
                                               indent=1))
        while not stop["now"] and node.running():
            time.sleep(1)
    finally:
        farm.close()
        hosts_file(node).unlink(missing_ok=True)
        print("hosts destroyed", flush=True)
    return 0


def start_keeper(node: Node) -> dict:
    f = hosts_file(node)
    if f.exists():
        rec = json.loads(f.read_text())
        if _alive(rec["pid"]):
            return rec
        f.unlink()
    log = node.logs / "run-hosts.log"
    with open(log, "ab") as out:
        p = subprocess.Popen([sys.executable, "-m", "tests.e2e.runjob", "hosts", "--name",
                              node.name], stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True,
                             cwd=paths.REPO)
    (node.dir / "run-hosts.pid").write_text(str(p.pid))
    deadline = time.monotonic() + 1800       # cold: the foreign rootfs is built first (minutes)
    while not f.exists():
        if p.poll() is not None:
            raise RuntimeError("the hosts' keeper exited:\n" + log.read_text()[-3000:])
        if time.monotonic() > deadline:
            raise TimeoutError("emulated hosts not up")
        time.sleep(0.5)
    return json.loads(f.read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def stop_keeper(node: Node) -> list[str]:
    """Stop the keeper (it destroys the hosts); returns what of them is still there."""
    left = []
    pidf = node.dir / "run-hosts.pid"
    rec = json.loads(hosts_file(node).read_text()) if hosts_file(node).exists() else None
    pid = int(pidf.read_text()) if pidf.exists() else (rec or {}).get("pid", 0)
    if pid and _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            left.append(f"keeper pid {pid} still alive")
    pidf.unlink(missing_ok=True)
    if rec:
        for h in rec["hosts"]:
            if Path(f"/run/netns/{h['netns']}").exists():
                left.append(f"netns {h['netns']}")
            if subprocess.run(["ip", "link", "show", h["veth"]], capture_output=True).returncode == 0:
                left.append(f"veth {h['veth']}")
            if _alive(h["sshd_pid"]):
                left.append(f"host {h['name']} sshd pid {h['sshd_pid']}")
            # the host's cgroup subtree sits under the keeper's cgroup, in every hierarchy
            for d in Path("/sys/fs/cgroup").glob(f"*/**/{h['cgroup']}"):
                left.append(f"cgroup {d}")
        if Path(rec["farm_dir"]).exists():
            left.append(f"farm dir {rec['farm_dir']}")
    return left


# --- make run / make stop ---------------------------------------------------------------------

def kubectl(node: Node, *args: str, input: str | None = None) -> str:
    r = subprocess.run([str(Path(sys.executable).parent / "kubectl"), "--kubeconfig",
                        str(node.kubeconfig), *args], input=input, capture_output=True, text=True,
                       timeout=300)
    if r.returncode:
        raise RuntimeError(f"kubectl {' '.join(args)}: {r.stderr}")
    return r.stdout


def install(node: Node, kube, release: Path) -> None:
    """install.yaml as released, applied as the e2e applies it (``install.release_docs``)."""
    from .install import _delete_namespace, release_docs
    _delete_namespace(kube, "mpc")                 # a kept node may hold an older run's
    kubectl(node, "apply", "--server-side", "--force-conflicts", "-f", "-",
            input=yaml.safe_dump_all(release_docs(release)))


def wait_watcher(kube, timeout: float = 600) -> None:
    apps = client.AppsV1Api(kube)
    deadline = time.monotonic() + timeout
    while True:
        try:
            ok = (apps.read_namespaced_deployment("mpc-glue", "mpc").status.available_replicas
                  or 0) >= 1 and (client.CoordinationV1Api(kube).read_namespaced_lease(
                      "mpc-glue-leader", "mpc").spec.holder_identity or "")
        except client.ApiException:
            ok = False
        if ok:
            return
        if time.monotonic() > deadline:
            raise TimeoutError("the watcher is not available")
        time.sleep(1)


def run(name: str) -> int:
    from .install import _release   # the e2e's own release path
    node = Node(name)
    emulation.check_machine_binfmt_untouched()
    if node.running():
        say(f"e2e node {name} already up (holder {node.holder_pid}): reusing it")
    else:
        say(f"starting the e2e node {name} ({'warm' if (node.dir / 'etcd').exists() else 'cold'}"
            f", state in {node.dir}): Kubernetes v1.32.4 + Tekton v1.0.0 in netns {node.netns}")
        t = node.up()
        say(f"node up in {t['total']:.1f}s")
    kube = node.api_client()
    work = node.dir / "run"
    work.mkdir(exist_ok=True)
    say("make release REGISTRY=10.200.0.1:5000/mpc VERSION=e2e INSECURE=1 (inside the node's "
        "netns): mpc's images, bundles pinned by digest, install.yaml")
    t = time.monotonic()
    bundles, released, install_yaml = _release(node, work)
    say(f"released in {time.monotonic() - t:.1f}s: images "
        + ", ".join(f"{k}={v}" for k, v in released.items()))
    say(f"installing {install_yaml} (kubectl apply --server-side, as a cluster admin)")
    install(node, kube, install_yaml)
    say("starting the SSH build hosts linux/arm64 and linux/s390x (QEMU user emulation, "
        "private binfmt_misc)")
    hosts = start_keeper(node)
    for h in hosts["hosts"]:
        say(f"  host {h['name']}: linux/{h['arch']} at {h['address']}")
    install_pool(kube, hosts["hosts"])
    say("pool mpc-host-pool installed; waiting for the watcher")
    wait_watcher(kube)
    say("watcher ready; pushing the builder image index and the base images")
    builder = builder_index(node)
    base = base_index(node)
    say(f"builder {builder}; base {base}")
    ensure_namespace(kube, DEMO_NS)
    image = f"{REGISTRY}/demo/hello:{name}"
    t = time.monotonic()
    out = run_demo(node, kube, DEMO_NS, "multiarch", bundles["task-buildah-remote"], builder,
                   base, image)
    took = time.monotonic() - t
    rc = 0
    if out.index:
        say(f"PipelineRun done in {took:.1f}s")
        print(f"\nimage index: {out.index}\n  (from this machine: "
              f"{node.registry_host}/{out.index.split('/', 1)[1]})")
        for m in inspect_index(node, out.index, work / "inspect"):
            print(f"  {m['platform']:<14} {m['digest']}\n"
                  f"    config architecture: {m['architecture']}\n"
                  f"    file {PROBE}: {m['file']}")
    else:
        rc = 1
        try:
            msg = explain(out)
            print("\nFAILED (not a known limit):\n" + msg)
        except BuildBlocked as e:
            print("\nBLOCKED: a build on an emulated arm64/s390x host tried to start a "
                  "container, which qemu-user cannot (runc's nsexec clone into new namespaces "
                  "is not emulated; rootless podman gets no user namespace), although the "
                  "pool gives these hosts builder: host. No index pushed. See "
                  "docs/emulated-hosts.md.\n" + str(e))
    kc = node.kubeconfig
    print(f"""
The cluster stays up. To look around:
  export KUBECONFIG={kc}
  export PATH={Path(sys.executable).parent}:{Path(paths.tool('tkn')).parent}:$PATH
  tkn pipelinerun describe multiarch -n {DEMO_NS}
  tkn pipelinerun logs multiarch -n {DEMO_NS}
  kubectl get taskruns,pods -n {DEMO_NS}
  kubectl get pipelineruns,leases -n mpc
  kubectl logs -n mpc -l app.kubernetes.io/name=mpc-glue --prefix
  skopeo inspect --tls-verify=false docker://{node.registry_host}/demo/hello:{name}
make stop   # tears it all down and checks this machine is as before""")
    return rc


def stop(name: str) -> int:
    node = Node(name)
    t = time.monotonic()
    left = stop_keeper(node)
    secs = node.down()
    left += node.leftovers()
    changes = node.host_changes()
    try:
        emulation.check_machine_binfmt_untouched()
    except RuntimeError as e:
        left.append(str(e))
    print(f"stopped in {time.monotonic() - t:.1f}s (node down {secs:.1f}s; its state stays in "
          f"{node.dir}: the next make run starts warm)")
    if left:
        print("LEFT BEHIND:\n  " + "\n  ".join(left))
    print("machine state: " + ("unchanged" if not changes else "CHANGED\n" + changes))
    return 1 if left or changes else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.e2e.runjob")
    ap.add_argument("command", choices=["run", "stop", "hosts"])
    ap.add_argument("--name", default=NAME)
    a = ap.parse_args(argv)
    return {"run": run, "stop": stop, "hosts": keeper}[a.command](a.name)


if __name__ == "__main__":
    sys.exit(main())
