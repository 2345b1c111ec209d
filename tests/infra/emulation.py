"""Foreign architectures by QEMU user emulation, registered only inside a user namespace.

Linux >= 6.7 gives every user namespace that mounts ``binfmt_misc`` an instance of
its own ("sandboxed binfmt_misc"); exec looks a handler up in the nearest user
namespace, walking up, that has one. So a process tree started in a fresh user
namespace with a private binfmt_misc that has ``qemu-aarch64`` registered runs
aarch64 ELF binaries, while the same binary run anywhere else on this machine still
fails with "Exec format error". This machine's own ``/proc/sys/fs/binfmt_misc`` is
never mounted or written.

Limits of qemu-user (7.2, bookworm's), measured on these hosts: an emulated process
cannot make a user namespace (qemu's own helper thread makes it multi-threaded, so
``unshare(CLONE_NEWUSER)`` is EINVAL) nor ``clone()`` with namespace flags, and runc
fails ("nsexec: could not ensure we are a cloned binary"), conmon too. So rootless
podman/buildah, ``podman run`` and RUN steps do not work inside; builds without RUN
through root's podman do.

The user namespace maps every id to itself (``0 0 4294967295``, written by this
process, the parent, which is real root): root inside stays uid 0 for file
ownership, so tarballs, sshd, sudo and useradd behave as on a real machine, but the namespace owns its mounts, its binfmt_misc and (for
SSH hosts) its network namespace.

Recipe measured in ``shared/notes/emulated-platforms.md``; the handler is
registered with flags ``FPC``: ``F`` opens the interpreter at registration (this
machine's ``/usr/bin/qemu-*-static``, so it need not exist in the foreign root),
``P`` keeps argv[0] (buildah recognises its helper modes by it), ``C`` (implies
``O``) computes credentials from the binary, not from qemu: without it setuid
programs (sudo, newuidmap) run unprivileged ("sudo: effective uid is not 0").
"""
from __future__ import annotations

import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

IDENTITY_MAP = "0 0 4294967295\n"
FLAGS = "FPC"
BINFMT_D = Path("/usr/lib/binfmt.d")        # Debian's qemu-user-static ships the magic here


@dataclass(frozen=True)
class Arch:
    name: str          # Debian and OCI architecture: arm64, s390x
    machine: str       # uname -m and the qemu suffix: aarch64, s390x
    e_machine: int     # ELF header e_machine of its binaries

    @property
    def qemu(self) -> Path:
        return Path(f"/usr/bin/qemu-{self.machine}-static")

    @property
    def handler(self) -> str:
        return f"mpc-qemu-{self.machine}"


ARCHES = {
    "arm64": Arch("arm64", "aarch64", 183),    # EM_AARCH64
    "s390x": Arch("s390x", "s390x", 22),       # EM_S390
}


def arch(name: str) -> Arch:
    try:
        return ARCHES[name]
    except KeyError:
        raise ValueError(f"no emulated architecture {name!r}; known: {sorted(ARCHES)}") from None


def binfmt_rule(a: Arch) -> str:
    """The line written to ``register``: magic and mask exactly as the installed
    qemu-user-static package declares them for this architecture, our interpreter
    (the static qemu itself) and ``FLAGS``."""
    conf = BINFMT_D / f"qemu-{a.machine}.conf"
    if not a.qemu.exists() or not conf.exists():
        raise FileNotFoundError(f"{a.qemu} / {conf} missing: install qemu-user-static "
                                "(--no-install-recommends; `make deps`)")
    line = next(ln for ln in conf.read_text().splitlines() if ln.startswith(":"))
    # :name:type:offset:magic:mask:interpreter:flags -- magic and mask are \x-escaped
    _, _name, kind, offset, magic, mask, _interp, _flags = line.split(":")
    if kind != "M":
        raise ValueError(f"unexpected binfmt type in {conf}: {line}")
    return f":{a.handler}:M:{offset}:{magic}:{mask}:{a.qemu}:{FLAGS}"


def register_script(a: Arch, proc: str) -> str:
    """Shell lines, run inside the new user namespace, that mount a private binfmt_misc on
    ``proc``/sys/fs/binfmt_misc (a proc mounted by that namespace) and register ``a``.

    They refuse to run in this machine's own user namespace: there, the mount would be
    the machine's binfmt_misc and the handler global.
    """
    q = shlex.quote
    bf = f"{proc}/sys/fs/binfmt_misc"
    return f"""
if [ "$(readlink /proc/self/ns/user)" = {q(os.readlink('/proc/self/ns/user'))} ]; then
  echo "refusing to register binfmt_misc outside a user namespace of our own" >&2; exit 97
fi
mount -t binfmt_misc binfmt_misc {bf}
printf '%s' {q(binfmt_rule(a))} > {bf}/register
""".strip()


def check_machine_binfmt_untouched() -> None:
    """This machine's binfmt_misc stays unmounted (the tests assert the same)."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        if line.split()[2] == "binfmt_misc":
            raise RuntimeError("binfmt_misc is mounted in this machine's namespace: "
                               "something registered emulators globally")


def spawn_in_userns(argv: Sequence[str], namespaces: Sequence[str], *,
                    join: Sequence[str] = (), setup: Callable[[int], None] | None = None,
                    timeout: float = 20, **popen) -> subprocess.Popen:
    """Start ``argv`` as PID 1 of fresh namespaces owned by a new identity-mapped user namespace.

    ``namespaces``: further ``unshare`` flags (``--mount``, ``--pid``, ``--net``, ...; a pid
    namespace is always made, so ``--fork``). ``join``: cgroup.procs files the process
    enters first (its cgroup namespace, if any, is rooted there). The new namespace's
    id maps are written from here before ``argv`` runs, then ``setup(pid)`` runs (pid:
    the ``unshare`` process, whose namespaces are the new ones), then ``argv`` starts.
    Returns the Popen of that ``unshare`` process (leader of a new session); ``argv``
    gets /dev/null as stdin (its stdin until then is the gate this function opens).
    """
    gate = 'read -r _ || exit 96; exec </dev/null; exec "$@"'
    inner = ["unshare", "--user", *namespaces, "--pid", "--fork", "--kill-child",
             "sh", "-c", gate, "gate", *argv]
    popen.pop("stdin", None)
    proc = subprocess.Popen(
        ["sh", "-c", 'for f in "$@"; do [ "$f" = -- ] && break; echo $$ > "$f"; shift; done; '
         'shift; exec "$@"', "join", *join, "--", *inner],
        stdin=subprocess.PIPE, start_new_session=True, **popen)
    try:
        mine = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + timeout
        while True:
            try:
                if os.readlink(f"/proc/{proc.pid}/ns/user") != mine:
                    break
            except FileNotFoundError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"unshare exited with {proc.returncode} before its user "
                                   "namespace existed")
            if time.monotonic() > deadline:
                raise TimeoutError("no user namespace after %.0fs" % timeout)
            time.sleep(0.005)
        for f in ("uid_map", "gid_map"):
            Path(f"/proc/{proc.pid}/{f}").write_text(IDENTITY_MAP)
        if setup is not None:
            setup(proc.pid)
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
    except BaseException:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait()
        raise
    finally:
        try:
            proc.stdin.close()
        except OSError:
            pass
    return proc


def run_emulated(script: str, a: Arch, root: Path, *, log: Path | None = None,
                 env: dict[str, str] | None = None, timeout: float = 3600) -> None:
    """Run ``script`` (sh, as root) with ``a`` emulated, in new user/mount/pid/net/uts/ipc
    namespaces, with ``proc`` mounted at ``root``/proc and the handler registered there.

    The network namespace is empty (not even lo up): nothing in it reaches any network.
    The script sees ``$R`` = ``root``; it chroots into it itself.
    """
    q = shlex.quote
    full = f"""set -eu
R={q(str(root))}
mount --make-rprivate /
mount -t proc proc "$R/proc"
{register_script(a, '"$R/proc"')}
{script}
"""
    out = open(log, "ab") if log else subprocess.DEVNULL
    try:
        p = spawn_in_userns(["sh", "-c", full],
                            ["--mount", "--net", "--uts", "--ipc"],
                            stdout=out, stderr=subprocess.STDOUT,
                            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **(env or {})})
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
            raise
    finally:
        if log:
            out.close()
    if rc != 0:
        tail = ""
        if log and log.exists():
            tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"emulated {a.name} script failed with {rc}{tail}")


def elf_machine(data: bytes) -> int:
    """e_machine of an ELF file's header (either byte order)."""
    if data[:4] != b"\x7fELF":
        raise ValueError("not an ELF file")
    order = "little" if data[5] == 1 else "big"
    return int.from_bytes(data[18:20], order)
