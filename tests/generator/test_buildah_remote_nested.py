"""Konflux's PRIVILEGED_NESTED (buildah 0.2 on; issue 13, item 4), run for real.

The converted buildah-0.2-privileged-nested shape builds on an SSH test host (rootless
podman) and, for comparison, in the pod itself (secret host "localhost", as a local
buildah Task runs). With PRIVILEGED_NESTED=true the build script asks buildah for
--device=/dev/fuse --cap-add=all --security-opt=label=disable, and a RUN instruction
of a busybox base records what it got: the remote build must succeed and give the same
image as the local one (the builder container runs --privileged, /var/tmp bind-mounted
from the host). With "false" the builder stays the unprivileged container it always was.
"""
from __future__ import annotations

import io
import subprocess
import tarfile
import uuid
from pathlib import Path

from mpc.generator import buildah_remote as br

from .podsim import Pod
from .test_buildah_remote_credentials import oci_layout
from .test_buildah_remote_run import pulled
from .test_buildah_remote_shapes import KONFLUX
from .test_buildah_remote_shapes_run import converted

SHAPE = "buildah-0.2-privileged-nested-shape"
# what the build step and a RUN instruction of the build see, written where it comes back
PROBE = ('{ if [ -c /dev/fuse ]; then echo fuse=yes; else echo fuse=no; fi; '
         'grep CapEff /proc/self/status; '
         'if grep -q " /var/tmp " /proc/self/mountinfo; then echo var-tmp=mount; fi; }')
CONTAINERFILE = f"""\
FROM oci-archive:/workspace/source/base.tar
COPY hello.txt /hello.txt
RUN {PROBE} > /run-probe.txt
"""


def probed(text: str) -> str:
    """The shape with a probe of the build step's own view after its build."""
    end = '      echo "[$(date --utc -Ins)] End build"\n'
    assert text.count(end) == 1
    return text.replace(end, f"      {PROBE} > /shared/step-probe.txt\n" + end)


def busybox_base(dest: Path, tmp: Path) -> None:
    """An oci-archive of an image holding Debian's busybox-static as /bin/sh."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as t:
        t.add("/bin/busybox", "bin/busybox")
        for name, target in (("bin/sh", "busybox"), ("bin/grep", "busybox")):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.SYMTYPE, target
            t.addfile(link)
        for d in ("proc", "dev", "tmp", "var/tmp"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if "tmp" in d else 0o755
            t.addfile(info)
    layout = oci_layout(tmp / "busybox-layout", raw.getvalue(), "base")
    subprocess.run(["tar", "-C", str(layout), "-cf", str(dest), "."], check=True)


def view(probe: bytes | str) -> dict[str, str]:
    """The probe's lines as a dict (CapEff: the hex mask)."""
    text = probe.decode() if isinstance(probe, bytes) else probe
    return {k.strip(): v.strip() for k, _, v in
            (ln.replace("CapEff:", "caps=").partition("=") for ln in text.splitlines())}


def caps(v: dict[str, str]) -> int:
    return int(v["caps"], 16)


def build(tmp_path, pod_rootfs, registry, secret: Path, name: str, nested: str,
          marker: str) -> tuple[Pod, dict]:
    task = converted(probed(KONFLUX[SHAPE]))
    image = f"{registry.address}/mpc-test/nested-{name}:v1"
    pod = Pod(rootfs=pod_rootfs, dir=tmp_path / name, task=task,
              params={"IMAGE": image, "TLSVERIFY": "false", "PLATFORM": "linux/amd64",
                      "PRIVILEGED_NESTED": nested}, sources={br.SSH_VOLUME: secret})
    src = pod.ws_dirs["source"]
    busybox_base(src / "base.tar", pod.dir)
    (src / "Containerfile").write_text(CONTAINERFILE)
    (src / "hello.txt").write_text(marker)
    r = pod.run("build")
    out = {"rc": r.returncode, "stderr": r.stderr}
    if r.returncode == 0:
        push = pod.run("push")
        assert push.returncode == 0, push.stderr[-4000:]
        _, files = pulled(registry, image, pod.dir / "pulled")
        out["files"] = {k: v for k, v in files.items() if k in ("hello.txt", "run-probe.txt")}
        out["step"] = (pod.dir / "vol/shared/step-probe.txt").read_text()
    return pod, out


def test_privileged_nested_build_runs_on_the_host_as_it_does_in_the_pod(
        build_host, pod_rootfs, registry, tmp_path):
    marker = uuid.uuid4().hex
    local_secret = tmp_path / "local-secret"
    local_secret.mkdir()
    (local_secret / "host").write_text("localhost")
    secret = build_host.secret(tmp_path / "secret")

    _, local = build(tmp_path, pod_rootfs, registry, local_secret, "local", "true", marker)
    assert local["rc"] == 0, local["stderr"][-4000:]
    assert local["files"]["hello.txt"] == marker.encode()
    assert b"fuse=yes" in local["files"]["run-probe.txt"]

    _, remote = build(tmp_path, pod_rootfs, registry, secret, "remote", "true", marker)
    assert remote["rc"] == 0, remote["stderr"][-4000:]
    assert "PRIVILEGED_NESTED=true: the build runs privileged" in remote["stderr"]
    # the same image: RUN had /dev/fuse and every capability the pod's build had
    assert remote["files"]["hello.txt"] == marker.encode()
    run, local_run = view(remote["files"]["run-probe.txt"]), view(local["files"]["run-probe.txt"])
    assert run["fuse"] == local_run["fuse"] == "yes"
    assert caps(run) & caps(local_run) == caps(local_run), (run, local_run)
    # the build step itself: privileged, with /var/tmp a mount of the host's disk
    step, local_step = view(remote["step"]), view(local["step"])
    assert step["fuse"] == "yes" and caps(step) & caps(local_step) == caps(local_step)
    assert step.get("var-tmp") == "mount" and "var-tmp" not in local_step

    # "false": the builder is the unprivileged container it always was (podsim's pod is
    # privileged itself, so only the image is compared with the local run there)
    _, local_plain = build(tmp_path, pod_rootfs, registry, local_secret, "local-plain", "false",
                           marker)
    _, plain = build(tmp_path, pod_rootfs, registry, secret, "plain", "false", marker)
    assert plain["rc"] == 0, plain["stderr"][-4000:]
    assert plain["files"]["hello.txt"] == local_plain["files"]["hello.txt"] == marker.encode()
    assert "PRIVILEGED_NESTED" not in plain["stderr"]
    run, step = view(plain["files"]["run-probe.txt"]), view(plain["step"])
    assert run["fuse"] == step["fuse"] == "no" and "var-tmp" not in step, (run, step)
    assert caps(step) | caps(local_step) == caps(local_step) != caps(step), step


def test_privileged_nested_with_builder_host_binds_var_tmp(make_host, pod_rootfs, registry,
                                                           tmp_path):
    """A pool host with ``builder: host`` runs the build as root on the host anyway; with
    PRIVILEGED_NESTED=true it gets the same /var/tmp of its own."""
    from mpc.runner import contract
    from tests.infra.sshhosts import add_user

    from .conftest import BUILD_USER, BuildHost
    h = make_host()
    bh = BuildHost(h, BUILD_USER, add_user(h, BUILD_USER, tmp_path, contract.HOST_BUILDER_COMMAND))
    secret = bh.secret(tmp_path / "secret")
    (secret / contract.KEY_BUILDER).write_text(contract.BUILDER_HOST)
    marker = uuid.uuid4().hex
    _, out = build(tmp_path, pod_rootfs, registry, secret, "host", "true", marker)
    assert out["rc"] == 0, out["stderr"][-4000:]
    assert out["files"]["hello.txt"] == marker.encode()
    step = view(out["step"])
    assert step["fuse"] == "yes" and step.get("var-tmp") == "mount", step
    # root's mounts stayed in the build's namespace
    assert "/var/tmp" not in h.exec("cat /proc/self/mountinfo").stdout


def test_the_param_reaches_only_the_wrapper_and_only_when_the_task_has_it():
    task = converted(KONFLUX[SHAPE])
    b = next(s for s in task["spec"]["steps"] if s["name"] == "build")
    assert {"name": br.NESTED_ENV, "value": "$(params.PRIVILEGED_NESTED)"} in b["env"]
    assert f'"${{{br.NESTED_ENV}:-}}" = true' in b["script"]
    assert f"env_add {br.NESTED_ENV}" not in b["script"]     # not the build's own env
    # a Task without the param: nothing of it in the wrapper
    plain = converted(KONFLUX["buildah-0.4-shape"])
    b = next(s for s in plain["spec"]["steps"] if s["name"] == "build")
    assert br.NESTED_ENV not in str(b) and "--privileged" not in b["script"]
