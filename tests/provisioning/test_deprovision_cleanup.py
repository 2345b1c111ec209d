"""Deprovisioning removes everything of a build (issue 11, item 2).

A build user on a real SSH host leaves behind what survives `pkill -u`: a
rootless container running as the image's USER 1000 (a subordinate uid of
the user) and, through its `sudo podman` rule, a buildah-remote build still
running in root's podman (the build was cancelled mid-way). The real
mpc-deprovision Task must leave none of it, and free the user's subordinate
range for the next build user.
"""
from __future__ import annotations

import os
import re
import signal
import threading
from pathlib import Path

import pytest
import yaml

from mpc.generator import buildah_remote as br
from mpc.runner import contract
from tests.generator.conftest import IMPORT_STEP_IMAGE, STEP_IMAGE
from tests.generator.podsim import Pod
from tests.infra.procs import wait_for

from .conftest import make_taskrun, read_secret

# A Task whose build step (image, then script lines) blocks, as a build cancelled while it runs.
HANG_TASK = """\
apiVersion: tekton.dev/v1
kind: Task
metadata:
  name: hang
spec:
  workspaces:
    - name: source
  steps:
    - name: build
      image: %s
      workingDir: $(workspaces.source.path)
      script: |
        #!/bin/bash
        set -euo pipefail
%s"""


def hang_task(image: str, *lines: str) -> str:
    return HANG_TASK % (image, "".join(f"        {ln}\n" for ln in lines))


HANG = hang_task(STEP_IMAGE, "touch started", "sleep 3602")

# A tiny image made on the host (offline): sleep and its libraries, USER 1000. In
# a storage of its own: the default one is the broken one (see below).
SLEEPER = """set -e
podman() { command podman --root "$HOME/sleeper" --runroot "/tmp/sleeper-$(id -u)" \
  --storage-driver vfs "$@"; }
tar -C / -chf - usr/bin/sleep lib/x86_64-linux-gnu/libc.so.6 lib64/ld-linux-x86-64.so.2 2>/dev/null \
  | podman import --change 'USER 1000' - localhost/sleeper:1 >/dev/null
podman run -d localhost/sleeper:1 /usr/bin/sleep 3601 >/dev/null
"""



def test_deprovisioning_leaves_no_process_container_or_subuid_of_the_build(
        controller, kube, namespace, make_host, host_farm, tmp_path):
    h = make_host()
    controller.install_pool([h], concurrency=1,
                            **{f"host_{h.name}": {"sudoCommands": ["/usr/bin/podman"]}})
    tr = make_taskrun(kube, namespace)
    assert controller.provision(tr).results["outcome"] == "served"
    s = read_secret(kube, tr)
    user = s["host"].split("@")[0]
    key = tmp_path / "id_rsa"
    key.write_text(s["id_rsa"])
    key.chmod(0o600)
    uid = int(h.exec(f"id -u {user}").stdout)
    (first, count), = [(int(f), int(c)) for name, f, c in
                       (ln.split(":") for ln in h.path("/etc/subuid").read_text().split())
                       if name == user]
    mine = lambda uids: any(u == uid or first <= u < first + count for u in uids)  # noqa: E731

    # Rootless podman cannot run for this user here (as on a host without user
    # namespaces for builds), so buildah-remote takes the sudo podman path.
    h.exec(f"""set -e
d=/home/{user}/.config/containers
install -d -o {user} -g {user} /home/{user}/.config "$d"
printf '[storage]\\ndriver = "no-such-driver"\\n' > "$d/storage.conf"
chown {user}: "$d/storage.conf"
""")
    h.exec(IMPORT_STEP_IMAGE.replace("| su - {user} -s /bin/bash -c", "| sh -c")
           .format(user=user), timeout=300)
    task = yaml.safe_load(br.generate(HANG).text)
    secret = tmp_path / "secret"
    secret.mkdir()
    for k, v in s.items():
        (secret / k).write_text(v)
    pod = Pod(rootfs=host_farm.base, dir=tmp_path / "pod", task=task,
              params={"PLATFORM": "linux/arm64"}, sources={br.SSH_VOLUME: secret})
    result = {}
    build = threading.Thread(target=lambda: result.update(r=pod.run("build", timeout=300)))
    build.start()
    deprovisioned = False
    try:
        started = h.path(f"/home/{user}/mpc-build/workspaces/source/started")
        wait_for("the build to run in root's podman",
                 lambda: started.exists() or not build.is_alive(), timeout=240, interval=0.2)
        assert build.is_alive(), result["r"].stderr[-3000:]
        # ... and a rootless container of its own, running as a subordinate uid
        sleeper = h.ssh(SLEEPER, user=user, key=key, timeout=120, check=False)
        assert sleeper.returncode == 0, sleeper.stderr

        before = h.processes()
        rootless = [p for p in before if p[2] == "/usr/bin/sleep 3601"]
        rootful = [p for p in before if p[2] == "sleep 3602"]
        assert len(rootless) == 1 and mine(rootless[0][1]) and uid not in rootless[0][1], rootless
        assert len(rootful) == 1 and rootful[0][1] == {0}, rootful
        labelled = h.exec(f"podman ps -q --filter label={contract.LABEL_BUILD_USER}={user}"
                          ).stdout.split()

        deprovisioned = True
        r = controller.deprovision(tr)
        assert r.results["removed-users"] == "1"

        left = [p for p in h.processes() if mine(p[1]) or "sleep 360" in p[2]]
        assert left == [], left
        assert h.exec("podman ps -a -q").stdout.strip() == ""
        assert user not in h.users()
        for f in ("/etc/subuid", "/etc/subgid"):
            assert f"{user}:" not in h.path(f).read_text(), f
        assert h.exec(f"find /tmp /var/tmp /dev/shm -uid {uid}").stdout == ""
        assert len(labelled) == 1, "buildah-remote's container carries the build user's label"
    finally:
        if build.is_alive() and not deprovisioned:
            h.stop()                          # the test failed early: end the build now
        build.join(timeout=300)
    assert result["r"].returncode != 0       # the cancelled build does not pretend success


# A host-mode build (as root on the host) that leaves a detached root process
# behind and then blocks; %(mark)s tells the builds apart on the host.
HOST_HANG = hang_task("localhost/not-pulled:1",
                      "setsid sleep %(mark)s1 </dev/null >/dev/null 2>&1 &",
                      "touch started", "sleep %(mark)s2")


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_deprovisioning_a_cancelled_host_mode_build_kills_its_root_processes(
        arch, controller, kube, namespace, make_host, host_farm, tmp_path):
    """``builder: host`` runs the build script as root through the user's sudo rule:
    killing the user's processes leaves that root build running. Two host-mode builds
    of two users on one host, each with a detached root process; the first is
    cancelled (its pod killed) and deprovisioned: nothing it started remains,
    while the other build's root processes and one of the host's own still run. On
    an amd64 host, and on a QEMU user-emulated one (which the option is for)."""
    h = make_host() if arch == "amd64" else make_host(arch=arch)
    controller.install_pool([h], concurrency=2, **{f"host_{h.name}": {"builder": "host"}})
    host_root = "sleep 36009"
    h.exec(f"setsid {host_root} </dev/null >/dev/null 2>&1 &")
    builds = {}
    try:
        for mark in ("3600", "3700"):
            tr = make_taskrun(kube, namespace)
            assert controller.provision(tr).results["outcome"] == "served"
            s = read_secret(kube, tr)
            assert s[contract.KEY_BUILDER] == contract.BUILDER_HOST
            user = s["host"].split("@")[0]
            secret = tmp_path / f"secret-{mark}"
            secret.mkdir()
            for k, v in s.items():
                (secret / k).write_text(v)
            task = yaml.safe_load(br.generate(HOST_HANG % {"mark": mark}).text)
            pod = Pod(rootfs=host_farm.base, dir=tmp_path / f"pod-{mark}", task=task,
                      params={"PLATFORM": "linux/arm64"}, sources={br.SSH_VOLUME: secret})
            result = {}
            thread = threading.Thread(target=lambda p=pod, r=result: r.update(
                r=p.run("build", timeout=300)))
            thread.start()
            builds[mark] = (tr, user, thread, result)
            started = h.path(f"/home/{user}/mpc-build/workspaces/source/started")
            wait_for(f"build {mark} to run as root on the host",
                     lambda: started.exists() or not thread.is_alive(), timeout=240, interval=0.2)
            assert thread.is_alive(), result["r"].stderr[-3000:]

        def running(mark):
            """The marked sleeps on the host (after qemu's own argv on an emulated one)."""
            return sorted(m[0] for p in h.processes()
                          if (m := re.search(r"sleep [0-9]+$", p[2]))
                          and (re.fullmatch(f"sleep {mark}[12]", m[0]) or m[0] == mark))
        for mark in builds:     # (`touch started` comes just before the second sleep)
            wait_for(f"build {mark}'s two root processes", lambda: running(mark) == [
                f"sleep {mark}1", f"sleep {mark}2"], timeout=60, interval=0.2)
        assert all(p[1] == {0} for p in h.processes() if re.search(r"sleep 3[67]00[12]$", p[2]))

        # The first build is cancelled: its pod goes, with its ssh connections.
        tr, user, thread, result = builds["3600"]
        kill_pod_of(user)
        thread.join(timeout=120)
        assert not thread.is_alive() and result["r"].returncode != 0
        assert running("3600") == ["sleep 36001", "sleep 36002"]   # root's build runs on

        r = controller.deprovision(tr)
        assert r.results["removed-users"] == "1"
        assert user not in h.users()
        left = [p for p in h.processes() if re.search(r"sleep 3600[12]$", p[2]) or user in p[2]]
        assert left == [], left
        # the other build's root processes and the host's own are untouched
        assert running("3700") == ["sleep 37001", "sleep 37002"]
        assert running(host_root) == [host_root]
        assert builds["3700"][2].is_alive()

        tr, user, thread, result = builds.pop("3700")
        kill_pod_of(user)
        thread.join(timeout=120)
        assert controller.deprovision(tr).results["removed-users"] == "1"
        assert running("3700") == [] and running(host_root) == [host_root]
    finally:
        for tr, user, thread, result in builds.values():
            if thread.is_alive():
                kill_pod_of(user)
                thread.join(timeout=120)
        h.exec(f"pkill -x -f '{host_root}'", check=False)


def kill_pod_of(user: str) -> None:
    """SIGKILL every process of the simulated pod whose ssh goes to ``user``, as a
    deleted pod's: the pod's own cgroup, found by its ssh clients' (podsim.Pod)."""
    def procs():
        for d in Path("/proc").iterdir():
            try:
                yield int(d.name), (d / "cmdline").read_bytes(), (d / "cgroup").read_text()
            except (OSError, ValueError):
                continue
    pods = {pod for _, cmd, cg in procs() if cmd.startswith(b"ssh\0") and user.encode() in cmd
            for pod in re.findall(r"/(mpc-pod-[0-9a-f]{12})\b", cg)}
    assert pods, f"no ssh of {user} in a pod"
    for pid, _, cg in procs():
        if any(f"/{pod}" in cg for pod in pods):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
