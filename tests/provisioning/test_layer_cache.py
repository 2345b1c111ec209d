"""The namespace's layer cache on a build host (issue 13, docs/layer-cache.md).

Real parts throughout: the mpc-provision/mpc-deprovision/mpc-sweep Tasks against a
real SSH host, the checked-in buildah-remote Task's build and push steps in a pod
(podsim), rootless podman and buildah on the host, a real registry. The build's
RUN step writes a timestamp into the image: the same timestamp in a later build
means the step was not run again (its layer came from the cache).
"""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import yaml
from kubernetes import client

from mpc.generator import buildah_remote as br
from mpc.runner import contract, hostpool
from tests.generator.conftest import IMPORT_STEP_IMAGE, STEP_IMAGE
from tests.generator.podsim import Pod
from tests.generator.test_buildah_remote_run import REMOTE_TASK, pulled

from .conftest import make_taskrun, read_secret

PLATFORM = "linux/amd64"
ROOT = contract.CACHE_ROOT
# FROM scratch with a static busybox: a RUN step without pulling a base image
CONTAINERFILE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox date +%s%N > /stamp"]
COPY hello.txt /hello.txt
"""


def test_pool_layer_cache_is_validated_with_paths():
    base = {"hosts": []}
    pool = hostpool.from_document(base | {"layerCache": {"namespaces": ["team-a", "ci-.*"]}})
    assert pool.layer_cache_for("team-a") and pool.layer_cache_for("ci-x")
    assert not pool.layer_cache_for("team-ab") and not pool.layer_cache_for("x-ci-x")
    assert not hostpool.from_document(base).layer_cache_for("team-a")     # opt-in
    errors = hostpool.validate(base | {"layerCache": {"namespaces": ["ok", "team-(", 3],
                                                      "maxSize": 1}})
    by_path = {e.split(": ", 1)[0]: e.split(": ", 1)[1] for e in errors}
    assert set(by_path) == {"$.layerCache", "$.layerCache.namespaces[1]",
                            "$.layerCache.namespaces[2]"}, errors
    assert "'maxSize' was unexpected" in by_path["$.layerCache"]
    assert by_path["$.layerCache.namespaces[1]"].startswith(
        "'team-(' is not a valid regular expression")
    assert hostpool.validate(base | {"layerCache": {}}) == [
        "$.layerCache: 'namespaces' is a required property"]


class Builds:
    """Builds of buildah-remote on one host, provisioned and deprovisioned by mpc."""

    def __init__(self, controller, kube, host, registry, pod_root: Path, tmp: Path):
        self.controller, self.kube, self.h, self.registry = controller, kube, host, registry
        self.pod_root, self.tmp = pod_root, tmp
        self.task = yaml.safe_load(REMOTE_TASK.read_text())

    def provision(self, ns: str) -> tuple[dict, dict]:
        tr = make_taskrun(self.kube, ns, platform=PLATFORM)
        assert self.controller.provision(tr, platform=PLATFORM).results["outcome"] == "served"
        return tr, read_secret(self.kube, tr)

    def key(self, secret: dict) -> Path:
        key = self.tmp / f"key-{uuid.uuid4().hex[:6]}"
        key.write_text(secret["id_rsa"])
        key.chmod(0o600)
        return key

    def as_user(self, secret: dict, cmd: str):
        user = secret["host"].split("@")[0]
        return self.h.ssh(cmd, user=user, key=self.key(secret), check=False)

    def pod(self, secret: dict, pod_dir=None, repo: str = "cache",
            containerfile: str = CONTAINERFILE) -> tuple[Pod, str, str]:
        """A simulated build pod holding ``secret`` (its workspace in ``pod_dir``, fresh if
        None) with ``containerfile`` in its source; returns (pod, image to push, name)."""
        user = secret["host"].split("@")[0]
        self.h.exec(IMPORT_STEP_IMAGE.format(user=user), timeout=300)
        name = uuid.uuid4().hex[:8]
        sdir = self.tmp / f"secret-{name}"
        sdir.mkdir()
        for k, v in secret.items():
            (sdir / k).write_text(v)
        image = f"{self.registry.address}/{repo}/{name}:1"
        pod = Pod(rootfs=self.pod_root, dir=pod_dir or self.tmp / f"pod-{name}", task=self.task,
                  params={"IMAGE": image, "TLSVERIFY": "false", "BUILDER_IMAGE": STEP_IMAGE,
                          "PLATFORM": PLATFORM},
                  sources={br.SSH_VOLUME: sdir})
        src = pod.ws_dirs["source"]
        (src / "Containerfile").write_text(containerfile)
        if not (src / "busybox").exists():
            shutil.copy("/usr/bin/busybox", src / "busybox")
        return pod, image, name

    def build(self, secret: dict, marker: str) -> tuple[str, str]:
        """Build and push; returns (the build's output, the image's /stamp)."""
        pod, image, name = self.pod(secret)
        (pod.ws_dirs["source"] / "hello.txt").write_text(marker)
        r = pod.run("build")
        assert r.returncode == 0, r.stderr[-4000:]
        assert pod.run("push").returncode == 0
        _, files = pulled(self.registry, image, self.tmp / f"pulled-{name}")
        assert files["hello.txt"] == marker.encode()
        return r.stdout + r.stderr, files["stamp"].decode()

    def left_of(self, secret: dict) -> str:
        """Files anywhere on the host (but the caches) owned by the build user's ids,
        checked after the user is gone: its uid and subordinate uids were recorded."""
        uid, first, count = self._ids[secret["host"]]
        return self.h.exec(
            f"find / -xdev \\( -path {ROOT} -o -path /proc \\) -prune -o \\( -uid {uid} -o "
            f"\\( -uid +{first - 1} -uid -{first + count} \\) \\) -print", check=False).stdout

    def record_ids(self, secret: dict) -> None:
        user = secret["host"].split("@")[0]
        uid = int(self.h.exec(f"id -u {user}").stdout)
        first, count = next((int(f), int(c)) for n, f, c in (
            ln.split(":") for ln in self.h.path("/etc/subuid").read_text().split()) if n == user)
        self._ids = getattr(self, "_ids", {}) | {secret["host"]: (uid, first, count)}


def test_layer_cache_per_namespace(controller, kube, namespace, make_host, host_farm, registry,
                                   tmp_path):
    ns_a = namespace
    ns_b = f"t-{uuid.uuid4().hex[:10]}"
    core = client.CoreV1Api(kube)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns_b)))
    try:
        h = make_host()
        host_farm._extract()
        controller.install_pool([h], platform=PLATFORM, concurrency=3,
                                layerCache={"namespaces": [ns_a, ns_b]})
        b = Builds(controller, kube, h, registry, host_farm.base, tmp_path)
        key_a, key_b = contract.cache_key(ns_a), contract.cache_key(ns_b)
        at_rest_a = f"{ROOT}/ns/{key_a}/cache"

        # 1. the first build of A fills A's cache; deprovisioning keeps only the cache
        tr1, s1 = b.provision(ns_a)
        assert s1[contract.KEY_CACHE_DIR] == f"{ROOT}/held/{s1['host'].split('@')[0]}/data"
        b.record_ids(s1)
        out1, stamp1 = b.build(s1, "one")
        assert "using the namespace's layer cache" in out1
        controller.deprovision(tr1)
        assert s1["host"].split("@")[0] not in h.users()
        assert h.exec(f"ls -A {ROOT}/held").stdout == ""
        assert h.exec(f"test -d {at_rest_a}/data/storage && test -d {at_rest_a}/data/inputs",
                      check=False).returncode == 0
        assert b.left_of(s1) == ""

        # 2. a build of B cannot read or poison A's cache, at rest or while a build holds it
        tr_b, s_b = b.provision(ns_b)
        assert s_b[contract.KEY_CACHE_DIR].startswith(f"{ROOT}/held/u-")
        tr2, s2 = b.provision(ns_a)
        held_a = s2[contract.KEY_CACHE_DIR]
        attacks = {
            "list the caches": f"ls {ROOT}/ns {ROOT}/held",
            "read A's cache at rest": f"ls {at_rest_a}/data || cat {at_rest_a}/owner",
            "poison A's cache at rest": f"mkdir -p {ROOT}/ns/{key_a}/cache/data/storage/x",
            "make a cache for A": f"mkdir {ROOT}/ns/{key_a}-x || mkdir {ROOT}/ns/x",
            "read A's held cache": f"ls {held_a}/storage",
            "poison A's held cache": f"touch {held_a}/storage/poison {held_a}/inputs/poison",
            "swap A's held cache": f"mv {held_a} {held_a}.x || ln -s /tmp {held_a}/../evil",
            "rewrite A's cache key": f"echo {key_b} > {held_a}/../key",
        }
        for what, cmd in attacks.items():
            r = b.as_user(s_b, cmd)
            assert r.returncode != 0 and "denied" in r.stderr, (what, r.stdout, r.stderr)

        # 3. a concurrent build of A gets an empty cache of its own, not A's
        tr3, s3 = b.provision(ns_a)
        assert s3[contract.KEY_CACHE_DIR] != held_a
        assert b.as_user(s3, f"ls -A {s3[contract.KEY_CACHE_DIR]}").stdout == ""

        # 4. A's next build is unaffected: its RUN step comes from the cache (same stamp)
        out2, stamp2 = b.build(s2, "two")
        assert "Using cache" in out2, out2[-3000:]
        assert stamp2 == stamp1
        for tr in (tr2, tr3, tr_b):      # A2 returns first: its cache is the one kept
            controller.deprovision(tr)
        assert h.exec(f"ls -A {ROOT}/held").stdout == ""
        assert h.exec(f"test -d {at_rest_a}/data/storage/storage/vfs", check=False).returncode == 0
        assert h.exec(f"test -d {ROOT}/ns/{key_b}/cache").returncode == 0

        # 5. A leaves the layerCache list: its builds get no cache, the sweep removes it
        controller.install_pool([h], platform=PLATFORM, concurrency=3,
                                layerCache={"namespaces": [ns_b]})
        tr4, s4 = b.provision(ns_a)
        assert contract.KEY_CACHE_DIR not in s4
        controller.deprovision(tr4)
        controller.start("mpc-sweep").wait().check()
        assert h.exec(f"test -e {ROOT}/ns/{key_a}", check=False).returncode == 1
        assert h.exec(f"test -d {ROOT}/ns/{key_b}/cache").returncode == 0
    finally:
        core.delete_namespace(ns_b)
