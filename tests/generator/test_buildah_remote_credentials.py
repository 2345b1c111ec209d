"""Registry credentials stay in the pod (issue 13, item 8).

A real build host provisioned by mpc's own provision-user.sh (its authorized_keys
allow the build key one remote listen), a real registry that requires
authentication holding a private base image, the pod (podsim) with the
registry's credentials in $HOME/.docker/config.json: the remote build pulls the
private base through the wrapper's in-pod proxy and succeeds, and while it runs
no password, auth string or auth file exists anywhere on the host, in any
process's environment or command line, or in the build's own environment.
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import secrets
import subprocess
import tarfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from mpc.generator import buildah_remote as br
from mpc.runner import contract
from mpc.runner.remote import script
from tests.infra.registry import Registry
from tests.infra.sshhosts import keypair
from tests.infra.tokenauth import TokenService

from .conftest import IMPORT_STEP_IMAGE, STEP_IMAGE
from .podsim import Pod
from .test_buildah_remote_run import pulled

REG_USER = "tenant-robot"
REG_PASSWORD = "pw-" + secrets.token_hex(16)
AUTH = base64.b64encode(f"{REG_USER}:{REG_PASSWORD}".encode()).decode()
NEEDLES = (REG_PASSWORD, AUTH)

TASK = """\
apiVersion: tekton.dev/v1
kind: Task
metadata:
  name: buildah
spec:
  params:
    - name: IMAGE
  workspaces:
    - name: source
  stepTemplate:
    env:
      - name: IMAGE
        value: $(params.IMAGE)
      - name: SRC
        value: $(workspaces.source.path)
      - name: TLSVERIFY
        value: "false"
      - name: STORAGE_DRIVER
        value: vfs
    volumeMounts:
      - name: varlibcontainers
        mountPath: /var/lib/containers
  steps:
    - name: build
      image: %(image)s
      workingDir: $(workspaces.source.path)
      script: |
        #!/bin/bash
        set -euo pipefail
        buildah --storage-driver="$STORAGE_DRIVER" build --isolation=chroot --tls-verify="$TLSVERIFY" \\
          --file=Containerfile --tag="$IMAGE" .
        env > "$SRC/build-env"
        # hold the build here until the test has looked at the host
        touch "$SRC/built"
        n=0
        while [ ! -e "$SRC/go-on" ] && [ "$n" -lt 2400 ]; do sleep 0.25; n=$((n + 1)); done
    - name: push
      image: %(image)s
      script: |
        #!/bin/bash
        set -euo pipefail
        buildah --storage-driver="$STORAGE_DRIVER" push --tls-verify="$TLSVERIFY" "$IMAGE" "docker://$IMAGE"
  volumes:
    - name: varlibcontainers
      emptyDir: {}
""" % {"image": STEP_IMAGE}


def _blob(layout: Path, data: bytes) -> dict:
    d = hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256" / d).write_bytes(data)
    return {"digest": f"sha256:{d}", "size": len(data)}


def oci_layout(layout: Path, layer: bytes, ref: str) -> Path:
    """An OCI layout of a one-layer linux/amd64 image (``layer``: an uncompressed tar)."""
    (layout / "blobs/sha256").mkdir(parents=True)
    gz = gzip.compress(layer, mtime=0)
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [
                             "sha256:" + hashlib.sha256(layer).hexdigest()]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **_blob(layout, config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    **_blob(layout, gz)}]}).encode()
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", **_blob(layout, manifest),
        "annotations": {"org.opencontainers.image.ref.name": ref}}]}))
    return layout


def private_base(registry: Registry, ref: str, tmp: Path, marker: str) -> None:
    """A one-layer image with /base-marker.txt, pushed with the registry's credentials."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as t:
        info = tarfile.TarInfo("base-marker.txt")
        info.size = len(marker)
        t.addfile(info, io.BytesIO(marker.encode()))
    layout = oci_layout(tmp / "base-layout", raw.getvalue(), "base")
    subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false",
                    f"--dest-creds={REG_USER}:{REG_PASSWORD}", f"oci:{layout}:base",
                    f"docker://{ref}"], check=True, capture_output=True, text=True)


def pulled_files(registry: Registry, ref: str, dest: Path) -> dict[str, bytes]:
    return pulled(registry, ref, dest, creds=f"{REG_USER}:{REG_PASSWORD}")[1]


@pytest.fixture(params=["basic", "bearer"])
def auth_registry(request, tmp_path):
    """A registry that needs the credentials: HTTP Basic itself, or Bearer tokens issued
    by a token service (the realm its 401 names) that takes them."""
    token = None
    if request.param == "bearer":
        token = TokenService(tmp_path / "token-service", {REG_USER: REG_PASSWORD}).start()
    r = Registry(tmp_path / "authreg", auth=None if token else (REG_USER, REG_PASSWORD),
                 token=token).start()
    yield r
    r.stop()
    if token:
        token.stop()


def provisioned_user(h, tmp_path: Path) -> tuple[str, Path]:
    """A build user made by mpc's own provisioning script, as the runner runs it."""
    user = "u-" + secrets.token_hex(12)
    priv, pub = keypair()
    key = tmp_path / "build.key"
    key.write_bytes(priv)
    key.chmod(0o600)
    r = h.ssh("bash -s", check=False, input=script(
        "provision-user.sh", BUILD_USER=user, PUBLIC_KEY=pub, SUDO_RULE="", LIMIT_LINES="",
        REGISTRY_PORT=str(contract.registry_port(user))))
    assert r.returncode == 0, r.stderr
    h.exec(IMPORT_STEP_IMAGE.format(user=user), timeout=300)
    return user, key


def host_leaks(h, needles: tuple[str, ...] = NEEDLES) -> str:
    """Where on the host (files written since boot, tmpfs, processes) a credential shows."""
    found = []
    upper = h.state / "upper"           # every file written on the host's root since it booted
    for needle in needles:
        r = subprocess.run(["grep", "-rlaF", "--", needle, str(upper)], capture_output=True,
                           text=True)
        found += r.stdout.splitlines()
    r = subprocess.run(["grep", "-rlaF", "--include=*.json", "--", '"auths"', str(upper)],
                       capture_output=True, text=True)
    found += [f"auth file: {f}" for f in r.stdout.splitlines()]
    # the needles come on stdin: this scan's own command lines must not hold them
    # (one a line: grep takes each line of the -e value as a pattern)
    inside = h.exec("""
n="$(cat)"
for d in /tmp /var/tmp /run /dev/shm; do
  grep -rlaF -e "$n" "$d" 2>/dev/null
  grep -rlaF --include='*.json' '"auths"' "$d" 2>/dev/null
done
for p in /proc/[0-9]*; do
  if cat "$p/environ" "$p/cmdline" 2>/dev/null | grep -qaF -e "$n"; then
    echo "process $(tr '\\0' ' ' < "$p/cmdline" 2>/dev/null)"
  fi
done
true""", input="\n".join(needles) + "\n").stdout
    return "\n".join(found + inside.splitlines())


def test_private_base_pulled_through_the_pod_and_no_credential_on_the_host(
        make_host, pod_rootfs, pod_python, auth_registry, tmp_path):
    h = make_host()
    user, key = provisioned_user(h, tmp_path)
    base_marker = uuid.uuid4().hex
    base = f"{auth_registry.address}/private/base:1"
    private_base(auth_registry, base, tmp_path, base_marker)
    # the registry really refuses an anonymous pull
    anon = subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{base}"],
                          capture_output=True, text=True)
    assert anon.returncode != 0 and ("authentication required" in anon.stderr.lower()
                                     or "unauthorized" in anon.stderr.lower()), anon.stderr

    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "id_rsa").write_bytes(key.read_bytes())
    (secret / "host").write_text(f"{user}@{h.address}")
    (secret / "user-dir").write_text(f"/home/{user}")
    (secret / "known_hosts").write_text(h.known_hosts_line + "\n")
    (secret / "registry-port").write_text(str(contract.registry_port(user)))

    task = yaml.safe_load(br.generate(TASK).text)
    image = f"{auth_registry.address}/private/app:1"
    pod = Pod(rootfs=pod_rootfs, layers=pod_python, dir=tmp_path / "pod", task=task,
              params={"IMAGE": image, "PLATFORM": "linux/amd64"},
              sources={br.SSH_VOLUME: secret})
    docker = pod.dir / "upper/root/.docker"
    docker.mkdir(parents=True)
    (docker / "config.json").write_text(json.dumps({"auths": {auth_registry.address: {"auth": AUTH}}}))
    marker = uuid.uuid4().hex
    (pod.ws_dirs["source"] / "Containerfile").write_text(f"FROM {base}\nCOPY hello.txt /hello.txt\n")
    (pod.ws_dirs["source"] / "hello.txt").write_text(marker)

    asked = len(auth_registry.token.requests) if auth_registry.token else 0
    result: list[subprocess.CompletedProcess] = []
    runner = threading.Thread(target=lambda: result.append(pod.run("build")))
    runner.start()
    remote_src = f"/home/{user}/mpc-build/workspaces/source"
    while runner.is_alive() and h.exec(f"test -e {remote_src}/built", check=False).returncode:
        time.sleep(0.5)
    held = runner.is_alive()
    # and no token the token service issued (to the pod's proxy: all of them, by now)
    token = auth_registry.token
    needles = NEEDLES + tuple(token.issued if token else ())
    leaks = host_leaks(h, needles) if held else "(not looked: the build did not get that far)"
    h.exec(f"touch {remote_src}/go-on", check=False)
    runner.join(timeout=900)
    build = result[0]
    assert build.returncode == 0 and held, build.stderr[-4000:]
    assert leaks == "", leaks
    # nor in the build's own environment
    build_env = (pod.ws_dirs["source"] / "build-env").read_text()
    assert not any(n in build_env for n in needles), build_env
    if token:   # the pod's proxy answered the registry's Bearer challenge for the base
        assert (REG_USER, "repository:private/base:pull") in token.requests[asked:], \
            token.requests

    # the key may listen on that one TCP port of the loopback only, and open nothing
    # (OpenSSH has no per-key option for Unix-socket listens: see the Task's README)
    ssh = ["ssh", "-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o",
           "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
           "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR", f"{user}@{h.address}"]
    other = contract.registry_port(user) + 1
    port = contract.registry_port(user)
    for extra in (["-R", f"127.0.0.1:{other}:127.0.0.1:1"], ["-R", f"0.0.0.0:{port}:127.0.0.1:1"],
                  ["-W", "127.0.0.1:22"], ["-W", f"{h.address}:22"]):
        r = subprocess.run(ssh[:-1] + extra + ssh[-1:] + (["true"] if extra[0] == "-R" else []),
                           capture_output=True, text=True, timeout=60, input="")
        assert r.returncode == 255 and "failed" in r.stderr, (extra, r.stderr)

    push = pod.run("push")
    assert push.returncode == 0, push.stderr[-4000:]
    files = pulled_files(auth_registry, image, tmp_path / "pulled")
    assert files["base-marker.txt"] == base_marker.encode()
    assert files["hello.txt"] == marker.encode()
