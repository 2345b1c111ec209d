"""Build users on one host cannot see each other (issue 11, item 5).

Users come from the real provisioning (the mpc-provision Task, or its host
script over SSH as the admin); builds run through the generated wrapper in a
simulated pod with the secret provisioning wrote, on a real SSH host. Another
build user looks over SSH with its own key; root samples every process's
command line in the host's own /proc.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from mpc.generator import buildah_remote as br
from mpc.runner.remote import script
from tests.generator.conftest import IMPORT_STEP_IMAGE, STEP_IMAGE
from tests.generator.podsim import Pod
from tests.infra.procs import wait_for
from tests.infra.sshhosts import keypair

from .conftest import make_taskrun, read_secret

# A build that leaves something of each kind behind on the host: its sources
# (the workspace), a result, its env (in the env file), an image in its
# storage and, after it is released, the image archive. It waits for `go` so
# the others can look while it runs.
PROBE = """\
apiVersion: tekton.dev/v1
kind: Task
metadata:
  name: probe
spec:
  params:
    - name: TOKEN
    - name: MULTI
  results:
    - name: SEEN
  workspaces:
    - name: source
  stepTemplate:
    env:
      - name: IMAGE
        value: localhost/mpc-probe:1
      - name: STORAGE_DRIVER
        value: vfs
  steps:
    - name: build
      image: %s
      workingDir: $(workspaces.source.path)
      env:
        - name: TOKEN
          value: $(params.TOKEN)
        - name: MULTI
          value: $(params.MULTI)
      securityContext:
        runAsUser: 0
        capabilities:
          add: [SETFCAP, SYS_ADMIN]
      script: |
        #!/bin/bash
        set -euo pipefail
        printf '%%s|%%s' "$TOKEN" "$MULTI" > "$(results.SEEN.path)"
        ctr="$(buildah --storage-driver=vfs from scratch)"
        buildah --storage-driver=vfs copy "$ctr" secret.txt /secret.txt >/dev/null
        buildah --storage-driver=vfs commit -q "$ctr" "$IMAGE" >/dev/null
        touch ready
        while [ ! -e go ]; do sleep 0.2; done
""" % STEP_IMAGE


def provisioned(controller, kube, namespace, tmp: Path) -> tuple[str, Path, dict]:
    """A build provisioned by the real Task: (user, its key file, its secret)."""
    tr = make_taskrun(kube, namespace)
    assert controller.provision(tr).results["outcome"] == "served"
    s = read_secret(kube, tr)
    tmp.mkdir(parents=True, exist_ok=True)
    key = tmp / "id_rsa"
    key.write_text(s["id_rsa"])
    key.chmod(0o600)
    return s["host"].split("@")[0], key, s


def secret_dir(s: dict, d: Path) -> Path:
    """The secret as the build's pod mounts it."""
    d.mkdir(parents=True)
    for k, v in s.items():
        (d / k).write_text(v)
    return d


def host_file(h, path: str) -> Path:
    """A file inside the host, read and written from here (no process on the host sees it)."""
    return h.path(path)


class ProbeBuild:
    """The probe build of ``user``, running in a thread until released."""

    def __init__(self, h, user: str, s: dict, pod_rootfs: Path, tmp: Path, token: str,
                 multi: str, source_marker: str):
        task = yaml.safe_load(br.generate(PROBE).text)
        self.h, self.user = h, user
        self.pod = Pod(rootfs=pod_rootfs, dir=tmp / "pod", task=task,
                       params={"TOKEN": token, "MULTI": multi, "PLATFORM": "linux/amd64"},
                       sources={br.SSH_VOLUME: secret_dir(s, tmp / "secret")})
        (self.pod.ws_dirs["source"] / "secret.txt").write_text(source_marker)
        self.result: subprocess.CompletedProcess | None = None
        self.thread = threading.Thread(target=self._run)
        self.src = f"/home/{user}/mpc-build/workspaces/source"

    def _run(self) -> None:
        self.result = self.pod.run("build", timeout=500)

    def start(self) -> "ProbeBuild":
        self.thread.start()
        wait_for("the probe build to be running on the host",
                 lambda: host_file(self.h, f"{self.src}/ready").exists() or not self.thread.is_alive(),
                 timeout=300, interval=0.2)
        assert self.thread.is_alive(), self.result and self.result.stderr[-3000:]
        return self

    def release(self) -> subprocess.CompletedProcess:
        host_file(self.h, f"{self.src}/go").write_text("")
        self.thread.join(timeout=500)
        assert self.result is not None
        return self.result


def import_step_image(h, user: str) -> None:
    h.exec(IMPORT_STEP_IMAGE.format(user=user), timeout=300)


def test_second_build_user_cannot_read_the_first_ones_build(controller, kube, namespace,
                                                          make_host, host_farm, tmp_path):
    h = make_host()
    controller.install_pool([h], concurrency=2)
    first, _, s1 = provisioned(controller, kube, namespace, tmp_path / "first")
    second, key2, _ = provisioned(controller, kube, namespace, tmp_path / "second")
    import_step_image(h, first)

    token, source, multi = (f"mpc-{kind}-{secrets.token_hex(8)}" for kind in ("token", "src", "multi"))
    # what the second user hunts for, handed over without any command line
    needles = host_file(h, f"/home/{second}/needles")
    needles.write_text(f"{token}\n{source}\n{multi}\n")
    uid2 = int(h.exec(f"id -u {second}").stdout)
    os.chown(needles, uid2, uid2)
    home1 = f"/home/{first}"
    spy = subprocess.Popen(
        [*h.ssh_argv(second, key2), f"""
while [ ! -e "$HOME/stop" ]; do
  find {home1} -readable -print 2>/dev/null | sed 's/^/READABLE /'
  grep -r -l -a -F -f "$HOME/needles" /tmp /var/tmp /dev/shm 2>/dev/null | sed 's/^/FOUND /'
  grep -l -a -F -f "$HOME/needles" /proc/[0-9]*/cmdline /proc/[0-9]*/environ 2>/dev/null \
    | sed 's/^/PROC /'
  echo ROUND
  sleep 0.1
done"""], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        build = ProbeBuild(h, first, s1, host_farm.base, tmp_path / "build", token,
                           f"line 1\n{multi}\n", source).start()
        # It is all there, for its owner.
        b = f"{home1}/mpc-build"
        assert host_file(h, f"{b}/workspaces/source/secret.txt").read_text() == source
        assert token in host_file(h, f"{b}/env/build.env").read_text()
        assert host_file(h, f"{b}/results/SEEN").exists()
        # The second user, looking straight at it, is turned away everywhere.
        for path in (home1, b, f"{b}/workspaces/source/secret.txt", f"{b}/env/build.env",
                     f"{b}/results/SEEN", f"{home1}/.local/share/containers/storage"):
            look = h.ssh(f"ls -la {path}; cat {path}", user=second, key=key2, check=False)
            assert look.returncode != 0 and "Permission denied" in look.stderr, (path, look)
            assert source not in look.stdout and token not in look.stdout
        done = build.release()
        assert done.returncode == 0, done.stderr[-4000:]
        assert build.pod.result("SEEN") == f"{token}|line 1\n{multi}\n"
        assert "loaded localhost/mpc-probe:1" in done.stderr      # the archive came back
    finally:
        host_file(h, f"/home/{second}/stop").write_text("")
        out, err = spy.communicate(timeout=60)
    seen = sorted({ln for ln in out.splitlines() if ln != "ROUND"})
    assert out.count("ROUND") > 5, err
    assert seen == [], seen
    assert h.exec(f"stat -c '%a %U' /home/{first} /home/{second}").stdout.split() == \
        ["700", first, "700", second]


def test_env_values_never_appear_on_a_command_line(controller, kube, namespace, make_host,
                                                   host_farm, tmp_path):
    h = make_host()
    controller.install_pool([h], concurrency=1)
    user, _, s = provisioned(controller, kube, namespace, tmp_path / "user")
    import_step_image(h, user)
    token, multi = f"mpc-token-{secrets.token_hex(8)}", f"mpc-multi-{secrets.token_hex(8)}"
    needles = (token.encode(), multi.encode())
    hits: list[str] = []
    seen_podman = 0
    samples = 0
    stop = threading.Event()
    proc = host_file(h, "/proc")          # the host's own PID namespace, read from here

    def sample() -> None:
        nonlocal samples, seen_podman
        while not stop.is_set():
            for d in proc.iterdir():
                if not d.name.isdigit():
                    continue
                try:
                    cmd = (d / "cmdline").read_bytes()
                except OSError:
                    continue
                if any(n in cmd for n in needles):
                    hits.append(cmd.replace(b"\0", b" ").decode(errors="replace"))
                if cmd.startswith(b"podman\0run") or b"\0run\0--rm\0" in cmd:
                    seen_podman += 1
            samples += 1
            time.sleep(0.02)

    t = threading.Thread(target=sample)
    t.start()
    try:
        build = ProbeBuild(h, user, s, host_farm.base, tmp_path / "build", token,
                           f"{multi}\nsecond line\r\n", f"src-{uuid.uuid4().hex}").start()
        time.sleep(1)
        done = build.release()
    finally:
        stop.set()
        t.join()
    assert seen_podman > 0 and samples > 20, "the sampler never saw the build's podman"
    assert hits == [], hits
    assert done.returncode == 0, done.stderr[-4000:]
    # the build got both values, exactly
    seen = (build.pod.dir / "results" / "SEEN").read_bytes().decode()
    assert seen == f"{token}|{multi}\nsecond line\r\n"


PLANTS = {
    "ssh-dir-to-etc": "rm -rf ~/.ssh && ln -s /etc ~/.ssh",
    "keys-to-shadow": "rm -f ~/.ssh/authorized_keys && ln -s /etc/shadow ~/.ssh/authorized_keys",
}
EVIDENCE = ("stat -c '%n %U:%G %a' /etc /etc/shadow /etc/sudoers.d /etc/security/limits.d; "
            "sha256sum /etc/shadow; ls /etc/authorized_keys /etc/sudoers.d /etc/security/limits.d "
            "2>&1; true")


def provision_script(h, user: str, public_key: str) -> subprocess.CompletedProcess:
    """The real provisioning script, run as the pool's admin as the runner runs it."""
    return h.ssh("bash -s", check=False, input=script(
        "provision-user.sh", BUILD_USER=user, PUBLIC_KEY=public_key, SUDO_RULE="/usr/bin/id",
        LIMIT_LINES=f"{user} hard nofile 4096"))


@pytest.mark.parametrize("plant", PLANTS, ids=list(PLANTS))
def test_provisioning_refuses_an_existing_user_and_writes_through_no_planted_symlink(
        make_host, tmp_path, plant):
    h = make_host()
    user = "u-" + secrets.token_hex(12)
    priv, pub = keypair()
    key = tmp_path / "key"
    key.write_bytes(priv)
    key.chmod(0o600)
    first = provision_script(h, user, pub)
    assert first.returncode == 0, first.stderr
    assert h.ssh("id -un", user=user, key=key).stdout.strip() == user
    # the build user plants a symlink where provisioning writes as root
    h.ssh(PLANTS[plant], user=user, key=key)
    before = h.exec(EVIDENCE).stdout
    _, pub2 = keypair()
    again = provision_script(h, user, pub2)
    assert again.returncode != 0
    assert f"user {user} already exists on {h.name}" in again.stderr, again.stderr
    assert h.exec(EVIDENCE).stdout == before
    assert "/etc/authorized_keys" not in h.exec("ls /etc").stdout.split()
    assert pub2.split()[1] not in h.exec("cat /etc/shadow /etc/passwd").stdout


def test_provisioning_a_build_again_starts_from_a_fresh_user(controller, kube, namespace,
                                                           make_host, tmp_path):
    """A retry of the same build (it holds its slot) gets a new user, not the old home."""
    h = make_host()
    controller.install_pool([h], concurrency=1)
    tr = make_taskrun(kube, namespace)
    assert controller.provision(tr).results["outcome"] == "served"
    s = read_secret(kube, tr)
    user = s["host"].split("@")[0]
    key = tmp_path / "key"
    key.write_text(s["id_rsa"])
    key.chmod(0o600)
    h.ssh(PLANTS["ssh-dir-to-etc"] + "; nohup sleep 600 >/dev/null 2>&1 </dev/null &", user=user, key=key)
    before = h.exec(EVIDENCE).stdout
    assert controller.provision(tr).results["outcome"] == "served"
    assert h.exec(EVIDENCE).stdout == before
    s2 = read_secret(kube, tr)
    key.write_text(s2["id_rsa"])
    out = h.ssh("stat -c '%U %a %F' ~ ~/.ssh ~/.ssh/authorized_keys", user=user, key=key).stdout
    assert out.splitlines() == [f"{user} 700 directory", f"{user} 700 directory",
                                f"{user} 600 regular file"]
    assert h.exec(f"pgrep -u {user} -x sleep", check=False).stdout == ""
