"""A build script that ends with a mounted working container (Konflux's 2022-2023
shape; issue 13, item 1): run remotely, the pod ends up with a working container of
the same name, mounted, and /shared/container_path names the pod's mount, so the
later step reads the image's files there, exactly as in a local run of the Task."""
from __future__ import annotations

import uuid

from mpc.generator import buildah_remote as br

from .podsim import Pod
from .test_buildah_remote_shapes import KONFLUX
from .test_buildah_remote_shapes_run import converted

CONTAINERFILE = "FROM scratch\nCOPY hello.txt /hello.txt\nCOPY sub /sub\n"


def run(tmp_path, pod_rootfs, secret, name: str, marker: str) -> tuple[Pod, dict]:
    task = converted(KONFLUX["buildah-mounted-container-shape"])
    pod = Pod(rootfs=pod_rootfs, dir=tmp_path / name, task=task,
              params={"IMAGE": "localhost/mpc-test/mounted:v1", "TLSVERIFY": "false",
                      "PLATFORM": "linux/amd64"}, sources={br.SSH_VOLUME: secret})
    src = pod.ws_dirs["source"]
    (src / "Containerfile").write_text(CONTAINERFILE)
    (src / "hello.txt").write_text(marker)
    (src / "sub").mkdir()
    (src / "sub/more.txt").write_text(marker[::-1])
    build = pod.run("build")
    assert build.returncode == 0, build.stderr[-4000:]
    scan = pod.run("scan")
    assert scan.returncode == 0, (scan.stdout + scan.stderr)[-4000:]
    shared = pod.dir / "vol/shared"
    return pod, {"scan": (src / "scan.txt").read_text(),
                 "name": (shared / "container_name").read_text(),
                 "path": (shared / "container_path").read_text(), "stderr": build.stderr}


def test_mounted_working_container_is_recreated_in_the_pod(build_host, pod_rootfs, tmp_path):
    marker = uuid.uuid4().hex
    local_secret = tmp_path / "local-secret"
    local_secret.mkdir()
    (local_secret / "host").write_text("localhost")
    _, local = run(tmp_path, pod_rootfs, local_secret, "local", marker)
    _, remote = run(tmp_path, pod_rootfs, build_host.secret(tmp_path / "secret"), "remote", marker)

    assert "./hello.txt" in local["scan"] and "./sub/more.txt" in local["scan"]
    # the later step saw the same files, through a mount in the pod
    assert remote["scan"] == local["scan"]
    assert remote["name"] == local["name"]
    assert "mpc: working container " + remote["name"].strip() in remote["stderr"]
    # the path names the pod's storage (the step's emptyDir), not the host's
    assert remote["path"].startswith("/var/lib/containers/"), remote["path"]
    assert f"/home/{build_host.user}" not in remote["path"]
