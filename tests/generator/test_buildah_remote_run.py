"""The generated wrapper, run for real: pod side here, build on an SSH test host.

The checked-in buildah-remote Task's build step runs in a pod (podsim) with
the secret's keys; the original buildah script builds on the host in the build
user's rootless podman (or, where that cannot run, root's through a sudo rule);
the image comes
back as an OCI layout, the unchanged push step pushes it to the registry from
the pod, and the test pulls it and looks inside.
"""
from __future__ import annotations

import json
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest
import yaml

from mpc.generator import buildah_remote as br

from .conftest import STEP_IMAGE
from .podsim import Pod

ROOT = Path(__file__).resolve().parents[2]
REMOTE_TASK = ROOT / "tasks/buildah-remote/0.1/buildah-remote.yaml"
CONTAINERFILE = "FROM scratch\nARG GREETING\nLABEL greeting=$GREETING\nCOPY hello.txt /hello.txt\n"


def pulled(registry, ref: str, dest: Path, creds: str | None = None
           ) -> tuple[dict, dict[str, bytes]]:
    """Pull ``ref`` from the registry with skopeo (``creds``: user:password): (image
    config, files of all layers)."""
    subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false",
                    *([f"--src-creds={creds}"] if creds else []), f"docker://{ref}",
                    f"oci:{dest}:x"], check=True, capture_output=True, text=True)
    blob = lambda d: dest / "blobs" / d.replace(":", "/")  # noqa: E731
    index = json.loads((dest / "index.json").read_text())
    manifest = json.loads(blob(index["manifests"][0]["digest"]).read_text())
    config = json.loads(blob(manifest["config"]["digest"]).read_text())
    files = {}
    for layer in manifest["layers"]:
        with tarfile.open(blob(layer["digest"])) as t:
            for m in t.getmembers():
                if m.isfile():
                    files[m.name.lstrip("./")] = t.extractfile(m).read()
    return config, files


def new_pod(tmp_path, pod_rootfs, task, secret_dir, **params) -> Pod:
    return Pod(rootfs=pod_rootfs, dir=tmp_path / "pod", task=task, params=params,
               sources={br.SSH_VOLUME: secret_dir})


def host_events(bh) -> str:
    """Images of containers the build user's (rootless) podman started on the host."""
    return bh.host.exec(f"su - {bh.user} -s /bin/bash -c \"podman events --stream=false "
                        "--filter event=start --format '{{.Image}}'\"", check=False).stdout


def test_remote_build_on_ssh_host_then_push_from_pod(build_host, pod_rootfs, registry, tmp_path):
    task = yaml.safe_load(REMOTE_TASK.read_text())
    secret = build_host.secret(tmp_path / "secret")
    marker = uuid.uuid4().hex
    image = f"{registry.address}/mpc-test/remote:v1"
    pod = new_pod(tmp_path, pod_rootfs, task, secret, IMAGE=image, TLSVERIFY="false",
                  BUILDER_IMAGE=STEP_IMAGE, PLATFORM="linux/amd64", IMAGE_APPEND_PLATFORM="true",
                  BUILD_ARGS=["GREETING=hello 'remote' world"])
    (pod.ws_dirs["source"] / "Containerfile").write_text(CONTAINERFILE)
    (pod.ws_dirs["source"] / "hello.txt").write_text(marker)

    build = pod.run("build")
    assert build.returncode == 0, build.stderr[-4000:]
    assert f"built on {build_host.user}@{build_host.host.address}" in build.stderr
    # the build ran in podman on the host, in the step image
    assert STEP_IMAGE in host_events(build_host)
    # the host's copy is cleaned up
    assert build_host.host.exec(f"test -e /home/{build_host.user}/mpc-build",
                                check=False).returncode == 1

    push = pod.run("push")
    assert push.returncode == 0, push.stderr[-4000:]
    tagged = f"{image}-linux-amd64"          # IMAGE_APPEND_PLATFORM=true
    assert pod.result("IMAGE_URL") == tagged
    assert pod.result("IMAGE_DIGEST").startswith("sha256:")

    config, files = pulled(registry, tagged, tmp_path / "pulled")
    assert files["hello.txt"] == marker.encode()
    assert config["config"]["Labels"]["greeting"] == "hello 'remote' world"


def test_sudo_podman_fallback_when_rootless_cannot_run(sudo_build_host, pod_rootfs, registry,
                                                       tmp_path):
    bh = sudo_build_host
    task = yaml.safe_load(REMOTE_TASK.read_text())
    marker = uuid.uuid4().hex
    image = f"{registry.address}/mpc-test/sudo:v1"
    pod = new_pod(tmp_path, pod_rootfs, task, bh.secret(tmp_path / "secret"), IMAGE=image,
                  TLSVERIFY="false", BUILDER_IMAGE=STEP_IMAGE, PLATFORM="linux/amd64")
    (pod.ws_dirs["source"] / "Containerfile").write_text(CONTAINERFILE)
    (pod.ws_dirs["source"] / "hello.txt").write_text(marker)
    # rootless really is impossible for this user here
    assert bh.host.ssh("podman unshare true", user=bh.user, key=bh.key, check=False).returncode != 0

    build = pod.run("build")
    assert build.returncode == 0, build.stderr[-4000:]
    # root's podman (through the sudo rule) ran the step image, not the user's
    root_events = bh.host.exec("podman events --stream=false --filter event=start "
                               "--format '{{.Image}}'", check=False).stdout
    assert STEP_IMAGE in root_events
    assert STEP_IMAGE not in host_events(bh)
    assert pod.run("push").returncode == 0
    _, files = pulled(registry, image, tmp_path / "pulled")
    assert files["hello.txt"] == marker.encode()


def test_error_secret_fails_fast_with_its_message(pod_rootfs, tmp_path):
    task = yaml.safe_load(REMOTE_TASK.read_text())
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "error").write_text("no host of platform linux/s390x has a free slot (pool: 0/3)")
    pod = new_pod(tmp_path, pod_rootfs, task, secret, IMAGE="127.0.0.1:1/x:y",
                  PLATFORM="linux/s390x")
    r = pod.run("build", timeout=60)
    assert r.returncode == 1
    assert "no host of platform linux/s390x has a free slot (pool: 0/3)" in r.stderr
    assert "platform linux/s390x" in r.stderr.splitlines()[0]
    # it stopped before reading anything else of the secret
    assert "/ssh/host" not in r.stderr


def test_localhost_builds_in_the_pod(pod_rootfs, registry, tmp_path):
    task = yaml.safe_load(REMOTE_TASK.read_text())
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "host").write_text("localhost")
    marker = uuid.uuid4().hex
    image = f"{registry.address}/mpc-test/local:v1"
    pod = new_pod(tmp_path, pod_rootfs, task, secret, IMAGE=image, TLSVERIFY="false",
                  PLATFORM="linux/amd64", BUILD_ARGS=["GREETING=local"])
    (pod.ws_dirs["source"] / "Containerfile").write_text(CONTAINERFILE)
    (pod.ws_dirs["source"] / "hello.txt").write_text(marker)
    build = pod.run("build")
    assert build.returncode == 0, build.stderr[-4000:]
    assert "building in this pod" in build.stderr
    push = pod.run("push")
    assert push.returncode == 0, push.stderr[-4000:]
    assert pod.result("IMAGE_URL") == image     # IMAGE_APPEND_PLATFORM defaults to false
    config, files = pulled(registry, image, tmp_path / "pulled")
    assert files["hello.txt"] == marker.encode()
    assert config["config"]["Labels"]["greeting"] == "local"


HOSTILE = "it's \"quoted\" $(touch /tmp/mpc-pwned) `touch /tmp/mpc-pwned2` ${HOME} \\ ;|&\nline 2\t*\n"

PROBE_TASK = """\
apiVersion: tekton.dev/v1beta1
kind: Task
metadata:
  name: probe
spec:
  params:
    - name: VALUE
    - name: ARGS
      type: array
  workspaces:
    - name: out
  stepTemplate:
    env:
      - name: HOSTILE
        value: $(params.VALUE)
    volumeMounts:
      - name: shared
        mountPath: /shared
  steps:
    - name: build
      image: %s
      args: ["$(params.ARGS[*])"]
      env:
        - name: OUT
          value: $(workspaces.out.path)
      volumeMounts:
        - name: ca
          mountPath: /etc/mpc-ca
          readOnly: true
      script: |
        #!/bin/bash
        set -euo pipefail
        printf '%%s' "$HOSTILE" > "$OUT/hostile"
        printf '%%s\\n' "$@" > "$OUT/args"
        cp /etc/mpc-ca/ca.crt "$OUT/ca.crt"
        if [ -f /run/.containerenv ]; then echo podman > /shared/where; fi
    - name: after
      image: %s
      script: |
        #!/bin/bash
        cp /shared/where "$(workspaces.out.path)/where-after"
  volumes:
    - name: shared
      emptyDir: {}
    - name: ca
      configMap:
        name: trusted-ca
        optional: true
""" % (STEP_IMAGE, STEP_IMAGE)


def test_hostile_env_and_args_arrive_literally_on_the_host(build_host, pod_rootfs, tmp_path):
    res = br.generate(PROBE_TASK)
    assert any("no env IMAGE" in w for w in res.warnings)
    task = yaml.safe_load(res.text)
    assert task["metadata"]["name"] == "probe-remote"
    secret = build_host.secret(tmp_path / "secret")
    ca = tmp_path / "ca"
    ca.mkdir()
    (ca / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nMPC\n")
    args = ["a b", "it's", '"$(id)"', "--x=`y`", ""]
    pod = Pod(rootfs=pod_rootfs, dir=tmp_path / "pod", task=task,
              params={"VALUE": HOSTILE, "ARGS": args, "PLATFORM": "linux/amd64"},
              sources={br.SSH_VOLUME: secret, "ca": ca})
    r = pod.run("build")
    assert r.returncode == 0, r.stderr[-4000:]
    out = pod.ws_dirs["out"]
    assert (out / "hostile").read_text() == HOSTILE
    assert (out / "args").read_text() == "".join(a + "\n" for a in args)
    assert (out / "ca.crt").read_text() == "-----BEGIN CERTIFICATE-----\nMPC\n"
    # nothing in the value was run by a shell on the host
    assert build_host.host.exec("ls /tmp/mpc-pwned /tmp/mpc-pwned2 "
                                f"/home/{build_host.user}/mpc-pwned", check=False).returncode != 0
    # the shared emptyDir came back: the later in-pod step sees what the remote build wrote
    after = pod.run("after")
    assert after.returncode == 0, after.stderr
    assert (out / "where-after").read_text() == "podman\n"


@pytest.mark.parametrize("arch", ["arm64", "s390x"])
def test_builder_host_on_an_emulated_host(arch, make_host, pod_rootfs, registry, tmp_path):
    """A pool host with ``builder: host`` (one that cannot run containers: QEMU user
    emulation): the secret says so, and the build script runs as root on the host
    itself in a private mount namespace (the build user's sudo rule: only unshare, as
    provisioning writes it), with the pod's paths bind-mounted; the image is of the
    host's architecture and comes back to the pod as usual."""
    from mpc.runner import contract
    from tests.infra.sshhosts import add_user

    from .conftest import BUILD_USER, BuildHost
    h = make_host(arch=arch)
    bh = BuildHost(h, BUILD_USER, add_user(h, BUILD_USER, tmp_path, contract.HOST_BUILDER_COMMAND))
    secret = bh.secret(tmp_path / "secret")
    (secret / contract.KEY_BUILDER).write_text(contract.BUILDER_HOST)
    task = yaml.safe_load(REMOTE_TASK.read_text())
    marker = uuid.uuid4().hex
    image = f"{registry.address}/mpc-test/emulated-{arch}:v1"
    # the builder image is not used: no container starts on this host
    pod = new_pod(tmp_path, pod_rootfs, task, secret, IMAGE=image, TLSVERIFY="false",
                  BUILDER_IMAGE="localhost/not-pulled:1", PLATFORM=f"linux/{arch}",
                  IMAGE_APPEND_PLATFORM="true", BUILD_ARGS=[f"GREETING=hello from {arch}"])
    (pod.ws_dirs["source"] / "Containerfile").write_text(CONTAINERFILE)
    (pod.ws_dirs["source"] / "hello.txt").write_text(marker)

    build = pod.run("build", timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    assert "as root on the host (builder: host)" in build.stderr
    # nothing of the build stays on the host, and root's mounts stayed in their namespace
    assert h.exec(f"test -e /home/{BUILD_USER}/mpc-build", check=False).returncode == 1
    assert "/workspace" not in h.exec("cat /proc/self/mountinfo").stdout
    push = pod.run("push")
    assert push.returncode == 0, push.stderr[-4000:]
    config, files = pulled(registry, f"{image}-linux-{arch}", tmp_path / "pulled")
    assert config["architecture"] == arch, config
    assert files["hello.txt"] == marker.encode()
    assert config["config"]["Labels"]["greeting"] == f"hello from {arch}"
