"""Emulated SSH hosts really are linux/arm64 and linux/s390x, and change nothing on this machine.

QEMU user emulation is registered in a binfmt_misc that belongs to each host's
own user namespace (``tests/infra/emulatedhosts.py``); this machine's binfmt_misc
stays unmounted, so the same foreign binary fails outside the host.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.infra import emulation
from tests.infra.procs import alive
from tests.infra.sshhosts import HostFarm, add_user

pytestmark = pytest.mark.timeout(1800)


def machine_binfmt() -> tuple[list[str], list[str]]:
    """This machine's binfmt_misc as this (the machine's) mount namespace sees it."""
    mounts = [ln for ln in Path("/proc/self/mounts").read_text().splitlines()
              if ln.split()[2] == "binfmt_misc" or "binfmt_misc" in ln.split()[1]]
    return mounts, sorted(p.name for p in Path("/proc/sys/fs/binfmt_misc").iterdir())


@pytest.mark.parametrize("arch", sorted(emulation.ARCHES))
def test_uname_over_ssh_is_the_emulated_machine(make_host, arch, tmp_path):
    before = machine_binfmt()
    assert before == ([], []), "this machine's binfmt_misc must stay unmounted and empty"
    a = emulation.arch(arch)
    h = make_host(arch=arch)
    assert h.platform == f"linux/{arch}"
    out = h.ssh("uname -m; hostname; id -un; sudo -n id -u").stdout.split()
    assert out == [a.machine, h.name, "mpcadmin", "0"]
    # the host's binaries (sshd included) are the foreign architecture's...
    uname = h.path("/usr/bin/uname")
    assert emulation.elf_machine(uname.read_bytes()[:64]) == a.e_machine
    assert emulation.elf_machine(h.path("/usr/sbin/sshd").read_bytes()[:64]) == a.e_machine
    # sshd (PID 1 inside) runs through this machine's qemu, opened at registration (F)
    assert os.readlink(f"/proc/{h.sshd_pid()}/exe").endswith(f"qemu-{a.machine}-static")
    # ...and the very same binary, run here, outside the host, is not runnable
    copy = tmp_path / "uname"
    copy.write_bytes(uname.read_bytes())
    copy.chmod(0o755)
    with pytest.raises(OSError) as e:
        subprocess.run([str(copy), "-m"], capture_output=True)
    assert e.value.errno == errno.ENOEXEC        # "Exec format error"
    # the handler lives in the host's own binfmt_misc instance only
    inside = h.exec("cat /proc/sys/fs/binfmt_misc/mpc-qemu-*").stdout
    assert "enabled" in inside and f"/usr/bin/qemu-{a.machine}-static" in inside
    assert "flags: POCF" in inside           # FPC, C implying O
    assert machine_binfmt() == before


def test_unprivileged_user_runs_emulated_programs(make_host, tmp_path):
    h = make_host(arch="arm64")
    key = add_user(h, "u-emu", tmp_path)
    out = h.ssh("id -un; uname -m; echo $((6 * 7)) | sed 's/^/n=/'", user="u-emu", key=key)
    assert out.stdout.split() == ["u-emu", "aarch64", "n=42"]


@pytest.mark.xfail(strict=True, reason=(
    "qemu-user (7.2, bookworm's) cannot give an emulated process a new user namespace: "
    "its own helper thread makes every emulated process multi-threaded, so "
    "unshare(CLONE_NEWUSER) fails with EINVAL, and rootless podman's clone() fails "
    "('cannot clone: Invalid argument'); runc fails too ('nsexec: could not ensure we are "
    "a cloned binary'). So rootless podman/buildah, podman run and RUN steps do not work "
    "on an emulated host; builds without RUN do, through root's podman."))
def test_rootless_user_namespace_on_emulated_host(make_host, tmp_path):
    h = make_host(arch="arm64")
    key = add_user(h, "u-rootless", tmp_path)
    r = h.ssh("unshare --user --map-root-user id -u", user="u-rootless", key=key, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "0", r.stderr


BUILD_USER = "u-arm64build"
CONTAINERFILE = """\
FROM scratch
COPY uname /uname
COPY hello.txt /hello.txt
"""


def test_podman_build_by_unprivileged_user_gives_an_arm64_image(make_host, tmp_path):
    """An ordinary user builds through the sudo rule the provisioner grants when rootless
    podman cannot run (as here, see above): FROM scratch + COPY of one of the host's
    own binaries. The image is arm64 in its config and in its content."""
    before = machine_binfmt()
    h = make_host(arch="arm64")
    key = add_user(h, BUILD_USER, tmp_path, sudo="/usr/bin/podman")
    r = h.ssh("""set -e
mkdir -p ctx && cd ctx
printf 'hello from arm64\\n' > hello.txt
cp /usr/bin/uname uname
cat > Containerfile
sudo -n podman build -q --network none --pull=never -t localhost/arm64-test:1 . >/dev/null
sudo -n podman inspect --format '{{.Architecture}} {{.Os}}' localhost/arm64-test:1
sudo -n podman save --format oci-archive -o /tmp/img.tar localhost/arm64-test:1
""", user=BUILD_USER, key=key, input=CONTAINERFILE, check=False, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.split() == ["arm64", "linux"]
    # read the saved image here: its config and its layers
    files = {}
    with tarfile.open(h.path("/tmp/img.tar")) as t:
        blob = lambda d: t.extractfile("blobs/" + d.replace(":", "/")).read()  # noqa: E731
        index = json.loads(t.extractfile("index.json").read())
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        config = json.loads(blob(manifest["config"]["digest"]))
        for i, lay in enumerate(manifest["layers"]):
            tmp = tmp_path / f"layer{i}"
            tmp.write_bytes(blob(lay["digest"]))
            with tarfile.open(tmp) as lt:
                for m in lt.getmembers():
                    if m.isfile():
                        files[m.name.lstrip("./")] = lt.extractfile(m).read()
    assert config["architecture"] == "arm64" and config["os"] == "linux"
    assert emulation.elf_machine(files["uname"]) == emulation.ARCHES["arm64"].e_machine
    assert files["hello.txt"] == b"hello from arm64\n"
    assert machine_binfmt() == before


def test_emulated_host_restarts_and_farm_close_leaves_nothing():
    before = machine_binfmt()
    farm = HostFarm()
    h = farm.add(arch="arm64")
    h.ssh("sudo useradd -m u-keep")
    h.stop()
    assert h.ssh("true", check=False, timeout=20).returncode == 255
    h.start()
    assert h.ssh("getent passwd u-keep >/dev/null && uname -m").stdout.strip() == "aarch64"
    pids = [h.sshd_pid(), h.proc.pid]
    subnet = farm.SUBNET
    farm.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert h.netns not in listed
    assert subprocess.run(["ip", "link", "show", h.veth], capture_output=True).returncode != 0
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    assert subnet + "." not in routes
    assert not any(alive(p) for p in pids)
    assert h.cgroup.leftovers() == []
    assert machine_binfmt() == before
