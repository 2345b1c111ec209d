"""mpc as released, installed on the e2e node: shared by the mpc e2e and the soak.

``installed()`` (the session fixture ``mpc`` in conftest.py) runs ``make release``
inside the node's netns against its registry (mpc's images built from their
Containerfiles and pushed, every bundle pushed with its steps pinned to the
image digest, ``install.yaml``), applies ``install.yaml`` as it is (namespace
``mpc`` enforcing Pod Security "restricted", the watcher Deployment with 2
replicas from its released image, RBAC, admission policy, Tasks and
Pipelines); only the example host pool is replaced by a pool of two real SSH
hosts serving ``linux/arm64``, and the admission policy's registry list names
the node's registry. Built and installed once per session; teardown deletes
namespace ``mpc``, the cluster-scoped objects of the release and the hosts.
"""
from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

import yaml
from kubernetes import client

from mpc.runner import contract as c
from tests.infra.paths import REPO

from . import hosts as e2e_hosts
from . import images
from .node import REGISTRY

NS = "mpc"                       # the generated mpc-tasks RBAC names it
PLATFORM = "linux/arm64"         # what the installed pool's two hosts serve
TIMEOUT = float(os.environ.get("MPC_E2E_MPC_TIMEOUT", "600"))   # shared machine: generous, never asserted
BIN = Path(sys.executable).parent
KUBECTL = str(BIN / "kubectl")


def _co(kube) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(kube)


def _ts(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def _cond(obj: dict) -> dict:
    return c.succeeded_condition(obj) or {}


def wait_for(what: str, check, timeout: float = TIMEOUT, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        v = check()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


# --- the installation ------------------------------------------------------------------

@dataclass
class Install:
    node: object
    kube: client.ApiClient
    hosts: list
    bundles: dict[str, str]          # bundle name -> pinned ref
    builder_image: str               # BUILDER_IMAGE: in the node's registry
    images: dict[str, str]           # mpc's images as released: name -> ref@digest
    install_yaml: Path | None = None  # the release's install.yaml (re-applied after an upgrade)

    def watcher_log(self, tail: int = 40) -> str:
        r = subprocess.run([KUBECTL, "--kubeconfig", str(self.node.kubeconfig), "logs", "-n", NS,
                            "-l", "app.kubernetes.io/name=mpc-glue", "--prefix",
                            f"--tail={tail}"], capture_output=True, text=True, timeout=60)
        return r.stdout + r.stderr

    def kubectl(self, *args: str, input: str | None = None) -> str:
        r = subprocess.run([KUBECTL, "--kubeconfig", str(self.node.kubeconfig), *args],
                           input=input, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, f"kubectl {' '.join(args)}: {r.stderr}"
        return r.stdout

    def _slot_leases(self) -> list:
        return client.CoordinationV1Api(self.kube).list_namespaced_lease(
            NS, label_selector=f"{c.LABEL_ROLE}=slot").items

    def slots(self) -> list[str]:
        return [lease.metadata.name for lease in self._slot_leases()]

    def slot_holders(self) -> set[str]:
        """The builds (their uid, or a predicted build's key) holding a slot now."""
        return {lease.metadata.labels.get(c.LABEL_TASKRUN_UID) for lease in self._slot_leases()}

    def build_users(self) -> dict[str, list[str]]:
        return {h.name: [u for u in h.users() if c.USER_RE.match(u)] for h in self.hosts}

    def build_dirs(self) -> dict[str, list[str]]:
        out = {}
        for h in self.hosts:
            r = h.exec("ls -d /home/u-*/mpc-build 2>/dev/null || true", check=False)
            out[h.name] = r.stdout.split()
        return out


def _push_builder(node, spec: images.ImageSpec) -> str:
    """The builder image in the node's containerd and in its registry, under one name."""
    node.ensure_image(spec)
    ref = f"{REGISTRY}/e2e/builder:{spec.key()}"
    node.ctr("images", "tag", "--force", spec.ref, ref)
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                    f"oci-archive:{spec.archive()}:{spec.ref}",
                    f"docker://{node.registry_host}/e2e/builder:{spec.key()}"],
                   check=True, capture_output=True, timeout=300)
    return ref


def _release(node, work: Path, version: str = "e2e") -> tuple[dict[str, str], dict[str, str], Path]:
    """``make release VERSION=version`` from inside the node's netns into its registry (refs
    name 10.200.0.1:5000): (bundle refs, image refs, install.yaml). Another ``version`` of
    the same sources reuses the cached image archives (keyed by their inputs)."""
    out, block, ilock = work / "release", work / "bundles.lock.yaml", work / "images.lock.yaml"
    # what needs the network (Debian base, wheelhouse) is fetched here, as on a release
    # machine; the node's netns has none, so the release itself then runs offline. The
    # wheelhouse is keyed by mpc's sources: when they change in between (someone editing the
    # working tree meanwhile), the offline release cannot make it; prepare again and retry.
    for attempt in range(3):
        prep = subprocess.run([str(BIN / "mpc"), "images", "prepare"], capture_output=True,
                              text=True, timeout=1200, cwd=REPO)
        if prep.returncode != 0 and attempt < 2:
            continue
        assert prep.returncode == 0, prep.stdout + prep.stderr
        r = subprocess.run(["nsenter", f"--net=/run/netns/{node.netns}", "make",
                            "--no-print-directory", "-o", "deps", "-o", "venv", "-o", "upstream",
                            "release", f"REGISTRY={REGISTRY}/mpc", f"VERSION={version}", "INSECURE=1",
                            f"PIN_OUT={out}", f"BUNDLES_LOCK={block}", f"IMAGES_LOCK={ilock}"],
                           capture_output=True, text=True, timeout=1800, cwd=REPO)
        if r.returncode == 0 or "building the wheelhouse" not in r.stdout + r.stderr:
            break
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    bundles = {n: b["ref"] for n, b in yaml.safe_load(block.read_text())["bundles"].items()}
    imgs = {n: i["ref"] for n, i in yaml.safe_load(ilock.read_text())["images"].items()}
    return bundles, imgs, out / "install.yaml"


def _delete_namespace(kube, name: str) -> None:
    core = client.CoreV1Api(kube)
    try:
        core.delete_namespace(name)
    except client.ApiException as e:
        if e.status != 404:
            raise

    def gone() -> bool:
        try:
            core.read_namespace(name)
        except client.ApiException as e:
            return e.status == 404
        return False
    wait_for(f"namespace {name} gone", gone, timeout=180)


def release_docs(install: Path) -> list[dict]:
    """``install.yaml`` as the e2e applies it (first install, upgrades and ``make run``
    alike): all of it (it carries no pool: the example ships beside it), with the admission
    policy's registry list naming the registry the bundles were pushed to."""
    docs = [d for d in yaml.safe_load_all(install.read_text()) if d]
    for d in docs:    # the admission policy trusts the bundles of the registry they were pushed to
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "mpc-admission":
            d["data"]["bundleRegistries"] = f"{REGISTRY}/mpc\n"
    return docs


# How every e2e build step's script starts: an error secret fails the step with its
# message; else the key is installed, ``host`` read from the secret and ``ssh_opts`` set
# to pin the host key the secret carries. Each test's script goes on from there.
BUILD_PREAMBLE = r"""#!/bin/bash
set -euo pipefail
if [ -f /ssh/error ]; then
  printf 'mpc-error: %s\n' "$(cat /ssh/error)"
  exit 1
fi
install -m 0600 /ssh/id_rsa /tmp/key
host="$(cat /ssh/host)"
ssh_opts=(-i /tmp/key -o UserKnownHostsFile=/ssh/known_hosts -o StrictHostKeyChecking=yes
          -o BatchMode=yes -o ConnectTimeout=15)
"""

PREPARE_HOST = f"""\
set -e
# the node's registry speaks plain HTTP (RFC 1918 address): the build user's podman pulls from it
mkdir -p /etc/containers/registries.conf.d
cat > /etc/containers/registries.conf.d/50-mpc-e2e.conf <<'EOF'
[[registry]]
location = "{REGISTRY}"
insecure = true
EOF
"""


@contextmanager
def installed(e2e_node, e2e_kube, host_farm, tmp_path_factory) -> Iterator[Install]:
    """Build the release, install it on the node with two arm64 SSH hosts; undo it all after."""
    t0 = time.monotonic()
    work = tmp_path_factory.mktemp("mpc-e2e")
    builder = _push_builder(e2e_node, images.BUILDER)
    bundles, released, install = _release(e2e_node, work)
    t_release = time.monotonic() - t0

    _delete_namespace(e2e_kube, NS)                  # a warm node may keep an older run's
    inst = Install(e2e_node, e2e_kube, [], bundles, builder, released, install)
    docs = release_docs(install)
    cluster_scoped = {(d["kind"], d["metadata"]["name"]) for d in docs
                      if "namespace" not in d["metadata"] and d["kind"] != "Namespace"}

    hosts = []
    try:
        inst.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(docs))
        for _ in range(2):
            h = e2e_hosts.move_into_node(host_farm.add(), e2e_node)
            hosts.append(h)
            h.exec(PREPARE_HOST)
        inst.hosts = hosts
        core = client.CoreV1Api(e2e_kube)
        entries = []
        for h in hosts:
            core.create_namespaced_secret(NS, client.V1Secret(
                metadata=client.V1ObjectMeta(name=f"admin-{h.name}"),
                data={"id_rsa": base64.b64encode(h.admin_key).decode()}))
            entries.append({"name": h.name, "address": h.address, "user": h.admin_user,
                            "secret": f"admin-{h.name}", "platform": PLATFORM, "concurrency": 1,
                            "hostKey": h.host_public_key})
        core.create_namespaced_config_map(NS, client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=c.HOST_POOL_CONFIGMAP),
            data={c.POOL_KEY: yaml.safe_dump({"hosts": entries})}))
        # the watcher runs as shipped: the released image, 2 replicas, one leader
        apps = client.AppsV1Api(e2e_kube)
        wait_for("the watcher Deployment available", lambda: (
            apps.read_namespaced_deployment("mpc-glue", NS).status.available_replicas or 0) >= 1)
        wait_for("a watcher leader", lambda: (client.CoordinationV1Api(e2e_kube)
                 .read_namespaced_lease("mpc-glue-leader", NS).spec.holder_identity or ""))
        print(f"\nmpc e2e install: make release {t_release:.1f} s, "
              f"total {time.monotonic() - t0:.1f} s; images {released}")
        yield inst
    finally:
        print("--- mpc-glue log (tail)\n" + inst.watcher_log())
        for h in hosts:
            h.destroy()
        _delete_namespace(e2e_kube, NS)
        for kind, name in cluster_scoped:
            inst.kubectl("delete", kind.lower(), name, "--ignore-not-found")


# --- the watcher's flags --------------------------------------------------------------

def _watcher_args(apps, args: list[str]) -> None:
    apps.patch_namespaced_deployment("mpc-glue", NS, {"spec": {"template": {"spec": {
        "containers": [{"name": "glue", "args": args}]}}}})


def rolled_out(apps, coord) -> bool:
    d = apps.read_namespaced_deployment("mpc-glue", NS)
    s = d.status
    return (s.observed_generation == d.metadata.generation and s.updated_replicas == d.spec.replicas
            and (s.available_replicas or 0) == d.spec.replicas and not s.unavailable_replicas
            and bool(coord.read_namespaced_lease("mpc-glue-leader", NS).spec.holder_identity))


@contextmanager
def watcher_flag(inst: Install, flag: str, value: str) -> Iterator[None]:
    """The watcher Deployment as shipped but with ``flag=value`` (``--sweep-interval``, ``60s``),
    rolled out with a leader; put back and rolled out again after (each within TIMEOUT: two
    pods starting on a loaded node took over 300 s)."""
    apps, coord = client.AppsV1Api(inst.kube), client.CoordinationV1Api(inst.kube)
    args = apps.read_namespaced_deployment("mpc-glue", NS).spec.template.spec.containers[0].args
    _watcher_args(apps, [a for a in args if a.split("=", 1)[0] != flag] + [f"{flag}={value}"])
    try:
        wait_for(f"the watcher rolled out with {flag}={value}", lambda: rolled_out(apps, coord))
        yield
    finally:
        _watcher_args(apps, args)
        wait_for("the watcher rolled back", lambda: rolled_out(apps, coord))


POOL_CACHE_SECONDS = 16         # the watcher reads the pool again after 15 s (PoolReader)


@contextmanager
def pool_setting(inst: Install, key: str, value) -> Iterator[None]:
    """The installed host pool with top-level ``key: value`` (``lookAhead``, True), seen by
    the watcher; put back as it was after."""
    core = client.CoreV1Api(inst.kube)
    before = core.read_namespaced_config_map(c.HOST_POOL_CONFIGMAP, NS).data[c.POOL_KEY]

    def write(text: str) -> None:
        core.patch_namespaced_config_map(c.HOST_POOL_CONFIGMAP, NS, {"data": {c.POOL_KEY: text}})
        time.sleep(POOL_CACHE_SECONDS)
    write(yaml.safe_dump(yaml.safe_load(before) | {key: value}))
    try:
        yield
    finally:
        write(before)


# --- reading runs and secrets -----------------------------------------------------------

def get(inst: Install, ns: str, plural: str, name: str) -> dict | None:
    try:
        return _co(inst.kube).get_namespaced_custom_object("tekton.dev", "v1", ns, plural, name)
    except client.ApiException as e:
        if e.status == 404:
            return None
        raise


def wait_done(inst: Install, ns: str, plural: str, name: str) -> dict:
    return wait_for(f"{plural} {ns}/{name} done", lambda: (
        (o := get(inst, ns, plural, name)) and _cond(o).get("status") in ("True", "False") and o))


def secret_exists(inst: Install, ns: str, name: str) -> bool:
    try:
        client.CoreV1Api(inst.kube).read_namespaced_secret(name, ns)
        return True
    except client.ApiException as e:
        if e.status == 404:
            return False
        raise


def step_log(inst: Install, ns: str, tr: dict, step: str) -> str:
    return client.CoreV1Api(inst.kube).read_namespaced_pod_log(
        tr["status"]["podName"], ns, container=f"step-{step}")

