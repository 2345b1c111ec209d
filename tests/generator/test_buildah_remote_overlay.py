"""A Konflux-style kustomize variant of the buildah Task (buildah-10gb and the like; issue 13).

Konflux shipped variants as kustomize overlays of the base Task: the checked-in
result is kustomize's own output (comments gone, keys sorted, long strings
re-wrapped), with the Task renamed, the build step's computeResources patched,
params added and env patched. shapes/buildah-10gb-overlay-shape.yaml is exactly what
kustomize makes of shapes/buildah-10gb-overlay/ (our patch of buildah-0.4-shape);
converted, it keeps every patched value and builds on an SSH test host as it does
in the pod, also with the image format the variant made a param set to docker: the
pushed image is Docker-format with its Docker-only config (HEALTHCHECK) either way.
"""
from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import yaml

from mpc.generator import buildah_remote as br

from .podsim import Pod
from .test_buildah_remote_run import CONTAINERFILE, pulled
from .test_buildah_remote_shapes import KONFLUX, SHAPES_DIR
from .test_buildah_remote_shapes_run import converted

SHAPE = "buildah-10gb-overlay-shape"
KUBECTL = str(Path(sys.executable).with_name("kubectl"))
# Docker format keeps HEALTHCHECK (OCI has no such field)
DOCKER_CONTAINERFILE = CONTAINERFILE + 'HEALTHCHECK --interval=42s CMD ["/hello.txt"]\n'


def test_the_shape_is_what_kustomize_makes_of_the_overlay():
    out = subprocess.run([KUBECTL, "kustomize", "--load-restrictor", "LoadRestrictionsNone",
                          str(SHAPES_DIR / "buildah-10gb-overlay")],
                         check=True, capture_output=True, text=True).stdout
    header, _, body = KONFLUX[SHAPE].partition("\n")
    assert header.startswith("# ") and body == out


def test_the_variant_keeps_its_patches_when_converted():
    task = converted(KONFLUX[SHAPE])
    spec = task["spec"]
    assert task["metadata"]["name"] == "buildah-remote-10gb"
    assert task["metadata"]["annotations"]["build.appstudio.redhat.com/expires-on"] \
        == "2025-06-30T00:00:00Z"
    build = next(s for s in spec["steps"] if s["name"] == "build")
    assert build["computeResources"] == {"limits": {"memory": "10Gi"},
                                         "requests": {"cpu": "1", "memory": "8Gi"}}
    assert spec["stepTemplate"]["computeResources"]["limits"]["memory"] == "4Gi"
    params = {p["name"]: p for p in spec["params"]}
    assert params["STORAGE_DRIVER"]["default"] == "vfs"
    assert params["BUILDAH_FORMAT"]["default"] == "oci"
    assert {"PLATFORM", "IMAGE_APPEND_PLATFORM"} <= set(params)
    env = {e["name"]: e["value"] for e in spec["stepTemplate"]["env"]}
    assert env["STORAGE_DRIVER"] == "$(params.STORAGE_DRIVER)"
    assert env["BUILDAH_FORMAT"] == "$(params.BUILDAH_FORMAT)"
    # the patched env reaches the remote build like any other
    assert 'env_add STORAGE_DRIVER "$STORAGE_DRIVER"' in build["script"]


def inspect(registry, image: str, *what: str) -> dict:
    """The pushed manifest (--raw) or config (--config --raw), as the registry has it."""
    return json.loads(subprocess.run(["skopeo", "inspect", *what, "--tls-verify=false",
                                      f"docker://{image}"], check=True, capture_output=True,
                                     text=True).stdout)


def run(tmp_path, pod_rootfs, registry, secret: Path, name: str, marker: str,
        fmt: str = "oci") -> dict:
    task = converted(KONFLUX[SHAPE])
    image = f"{registry.address}/mpc-test/overlay-{name}:v1"
    pod = Pod(rootfs=pod_rootfs, dir=tmp_path / name, task=task,
              params={"IMAGE": image, "TLSVERIFY": "false", "PLATFORM": "linux/amd64",
                      "STORAGE_DRIVER": "vfs", "BUILDAH_FORMAT": fmt,
                      "BUILD_ARGS": ["GREETING=from the 10gb variant"]},
              sources={br.SSH_VOLUME: secret})
    (pod.ws_dirs["source"] / "Containerfile").write_text(
        DOCKER_CONTAINERFILE if fmt == "docker" else CONTAINERFILE)
    (pod.ws_dirs["source"] / "hello.txt").write_text(marker)
    out = {}
    for step in ("build", "push", "sbom-layout"):
        r = pod.run(step)
        assert r.returncode == 0, (name, step, r.stderr[-4000:])
        out[step] = r.stderr
    config, files = pulled(registry, image, tmp_path / f"pulled-{name}")
    out.update(files=files, labels=config["config"].get("Labels"),
               url=pod.result("IMAGE_URL"), image=image,
               media_type=inspect(registry, image, "--raw").get("mediaType"),
               healthcheck=inspect(registry, image, "--config", "--raw")["config"]
               .get("Healthcheck"),
               index=yaml.safe_load((pod.ws_dirs["source"] / "layout-index.json").read_text()))
    return out


def test_the_variant_builds_on_the_host_as_in_the_pod(build_host, pod_rootfs, registry, tmp_path):
    marker = uuid.uuid4().hex
    local_secret = tmp_path / "local-secret"
    local_secret.mkdir()
    (local_secret / "host").write_text("localhost")
    local = run(tmp_path, pod_rootfs, registry, local_secret, "local", marker)
    remote = run(tmp_path, pod_rootfs, registry, build_host.secret(tmp_path / "secret"),
                 "remote", marker)
    assert "building in this pod" in local["build"]
    assert f"built on {build_host.user}@{build_host.host.address}" in remote["build"]
    assert remote["files"] == local["files"] and local["files"]["hello.txt"] == marker.encode()
    assert remote["labels"] == local["labels"]
    assert local["labels"]["greeting"] == "from the 10gb variant"
    assert (local["url"], remote["url"]) == (local["image"], remote["image"])
    # the later in-pod step found the OCI layout the build step left in /shared
    for r in (local, remote):
        refs = [m["annotations"]["org.opencontainers.image.ref.name"]
                for m in r["index"]["manifests"]]
        assert refs == [r["image"]]
    assert local["media_type"] == remote["media_type"] == "application/vnd.oci.image.manifest.v1+json"


def test_a_docker_format_build_comes_back_docker_format(build_host, pod_rootfs, registry,
                                                        tmp_path):
    """BUILDAH_FORMAT=docker: a local run pushes a Docker v2s2 manifest with the image's
    HEALTHCHECK; the remote build's image comes back to the pod as it was built (a docker
    archive, not through the build's own OCI layout), so the push step pushes the same."""
    marker = uuid.uuid4().hex
    local_secret = tmp_path / "local-secret"
    local_secret.mkdir()
    (local_secret / "host").write_text("localhost")
    local = run(tmp_path, pod_rootfs, registry, local_secret, "local", marker, "docker")
    remote = run(tmp_path, pod_rootfs, registry, build_host.secret(tmp_path / "secret"),
                 "remote", marker, "docker")
    assert local["media_type"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert local["healthcheck"]["Test"] == ["CMD", "/hello.txt"], local["healthcheck"]
    assert (remote["media_type"], remote["healthcheck"]) == (local["media_type"],
                                                             local["healthcheck"])
    assert "Docker format" in remote["build"]
    assert remote["files"] == local["files"] and remote["labels"] == local["labels"]
