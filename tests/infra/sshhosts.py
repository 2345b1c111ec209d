"""Isolated SSH build hosts for tests, each in its own namespaces.

A host is the cached Debian rootfs (``rootfs.py``) under a per-host overlay
on tmpfs, running ``sshd`` as PID 1 of its own PID namespace, with its own
mount and UTS namespaces and its own network namespace joined to this
machine by a veth pair with a private /30. It has a freshly generated host
key and an admin user (``mpcadmin``, passwordless sudo) whose key the test
can store in a Kubernetes Secret, exactly what a real host pool needs.

Users created on a host live only in its overlay, never in this machine's
``/etc/passwd``. Traffic goes only between this machine and these namespaces.
"""
from __future__ import annotations

import itertools
import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mpc.runner.buildsecret import new_keypair

from . import rootfs
from .cgroups import Subtree
from .procs import alive, wait_for

SSH_OPTS = ["-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5",
            "-o", "StrictHostKeyChecking=yes"]

SSHD_CONFIG = """\
HostKey /etc/ssh/ssh_host_ed25519_key
ListenAddress {address}:22
PermitRootLogin no
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM yes
MaxStartups 200:30:400
MaxSessions 50
"""


def keypair() -> tuple[bytes, str]:
    """A fresh ed25519 key: (OpenSSH private key bytes, public key line), as mpc makes them."""
    return new_keypair()


@dataclass
class SSHHost:
    """One running host; ``address`` is reachable from this machine's network namespace."""

    name: str
    index: int
    base: Path            # extracted rootfs (overlay lower dir), shared by all hosts
    state: Path           # per-host upper/work dirs and logs, on tmpfs
    netns: str
    veth: str
    host_ip: str
    address: str
    admin_user: str = rootfs.ADMIN_USER
    arch: str = "amd64"   # what `uname -m` says inside, as an OCI/Debian architecture
    port: int = 22
    admin_key: bytes = b""
    host_public_key: str = ""
    # a cloud VM's identity, given rather than made: (private, public) host key and the
    # admin's public key (the EC2 key pair); and a /32 address routed point to point
    given_host_key: tuple[bytes, str] | None = None
    given_admin_public_key: str | None = None
    point_to_point: bool = False
    proc: subprocess.Popen | None = field(default=None, repr=False)
    _init_pid: int = field(default=0, repr=False)
    _cgroup: Subtree | None = field(default=None, repr=False)

    @property
    def cgroup(self) -> Subtree:
        """The host's own cgroup subtree (named like its netns); its processes all live in it."""
        if self._cgroup is None:
            self._cgroup = Subtree(self.netns)
        return self._cgroup

    @property
    def admin_key_file(self) -> Path:
        return self.state / "admin_key"

    @property
    def known_hosts_line(self) -> str:
        return f"{self.address} {self.host_public_key}"

    @property
    def known_hosts_file(self) -> Path:
        return self.state / "known_hosts"

    # --- lifecycle -----------------------------------------------------------------
    def create(self) -> "SSHHost":
        upper, work, merged = self.state / "upper", self.state / "work", self.state / "root"
        for d in (upper, work, merged):
            d.mkdir(parents=True, exist_ok=True)
        # Files placed in the upper dir shadow the shared base: identity of this host.
        (upper / "etc/ssh/sshd_config.d").mkdir(parents=True, exist_ok=True)
        (upper / "etc/hostname").write_text(self.name + "\n")
        (upper / "etc/hosts").write_text(f"127.0.0.1 localhost\n{self.address} {self.name}\n")
        hk_priv, hk_pub = self.given_host_key or keypair()
        hk = upper / "etc/ssh/ssh_host_ed25519_key"
        hk.write_bytes(hk_priv)
        hk.chmod(0o600)
        (upper / "etc/ssh/ssh_host_ed25519_key.pub").write_text(hk_pub + "\n")
        self.host_public_key = hk_pub
        (upper / "etc/ssh/sshd_config.d/10-mpc-test.conf").write_text(
            SSHD_CONFIG.format(address=self.address))
        self.admin_key, admin_pub = ((b"", self.given_admin_public_key)
                                     if self.given_admin_public_key else keypair())
        self.admin_key_file.write_bytes(self.admin_key)
        self.admin_key_file.chmod(0o600)
        self.known_hosts_file.write_text(self.known_hosts_line + "\n")
        sshdir = upper / "home" / self.admin_user / ".ssh"
        sshdir.mkdir(parents=True)
        (sshdir / "authorized_keys").write_text(admin_pub + "\n")
        for p, mode in ((sshdir.parent, 0o755), (sshdir, 0o700), (sshdir / "authorized_keys", 0o600)):
            os.chown(p, rootfs.ADMIN_UID, rootfs.ADMIN_UID)
            p.chmod(mode)
        self._network_up()
        return self.start()

    @property
    def platform(self) -> str:
        return f"linux/{self.arch}"

    def _network_up(self) -> None:
        subprocess.run(["ip", "netns", "add", self.netns], check=True, capture_output=True)
        self._veth_up()

    def _veth_up(self) -> None:
        """The veth pair into the (existing) netns, with its /30 and a default route back."""
        run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
        run("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0",
            "netns", self.netns)
        if self.point_to_point:     # any address: a /32 each side, a host route each way
            run("ip", "addr", "add", f"{self.host_ip}/32", "dev", self.veth)
            run("ip", "link", "set", self.veth, "up")
            run("ip", "route", "add", f"{self.address}/32", "dev", self.veth, "src", self.host_ip)
            run("ip", "-n", self.netns, "link", "set", "lo", "up")
            run("ip", "-n", self.netns, "addr", "add", f"{self.address}/32", "dev", "eth0")
            run("ip", "-n", self.netns, "link", "set", "eth0", "up")
            run("ip", "-n", self.netns, "route", "add", f"{self.host_ip}/32", "dev", "eth0")
            run("ip", "-n", self.netns, "route", "add", "default", "via", self.host_ip)
            return
        run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.veth)
        run("ip", "link", "set", self.veth, "up")
        run("ip", "-n", self.netns, "link", "set", "lo", "up")
        run("ip", "-n", self.netns, "addr", "add", f"{self.address}/30", "dev", "eth0")
        run("ip", "-n", self.netns, "link", "set", "eth0", "up")
        run("ip", "-n", self.netns, "route", "add", "default", "via", self.host_ip)

    def start(self) -> "SSHHost":
        """Boot sshd in fresh mount/PID/UTS/cgroup namespaces inside the host's netns.

        The host's cgroup namespace is rooted at its own subtree (``self.cgroup``), so the
        cgroups its podman or runc create (``libpod_parent``, containers) stay inside it and
        go with ``destroy()``, as on a real machine with a cgroup root of its own.
        """
        self.cgroup.create()
        log = self.state / "sshd.log"
        self.proc = self._launch(self._boot_script(), log)
        wait_for(f"sshd on {self.name}", lambda: b"Server listening on" in log.read_bytes()
                 and self.proc.poll() is None, timeout=20, log=log)
        # the log is appended to on restart: consume what is there now
        log.write_bytes(b"")
        self._init_pid = 0
        self.sshd_pid()
        return self

    # namespaces `exec()` enters (nsenter flags)
    _enter_flags = ("-m", "-u", "-p", "-n", "-C")

    def _after_proc(self, root: str) -> str:
        """Shell lines run right after the host's /proc is mounted at ``root``/proc."""
        return ""

    def _boot_script(self) -> str:
        """What boots the host in its new namespaces: mounts, pivot_root, then sshd as PID 1."""
        s = self.state
        r = s / "root"
        q = shlex.quote
        return f"""
set -eu
mount -t overlay overlay -o lowerdir={q(str(self.base))},upperdir={q(str(s / 'upper'))},workdir={q(str(s / 'work'))} {q(str(r))}
hostname {q(self.name)}
mount -t proc proc {q(str(r))}/proc
{self._after_proc(q(str(r)))}
mount -t sysfs sysfs {q(str(r))}/sys
{self.cgroup.mount_script(q(str(r)))}
mount -t tmpfs -o mode=755 tmpfs {q(str(r))}/dev
for d in null zero full random urandom tty fuse; do
  [ -e /dev/$d ] || continue
  touch {q(str(r))}/dev/$d; mount --bind /dev/$d {q(str(r))}/dev/$d
done
mkdir -p {q(str(r))}/dev/pts {q(str(r))}/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts {q(str(r))}/dev/pts
ln -sf pts/ptmx {q(str(r))}/dev/ptmx
ln -sf /proc/self/fd {q(str(r))}/dev/fd
ln -sf /proc/self/fd/0 {q(str(r))}/dev/stdin
ln -sf /proc/self/fd/1 {q(str(r))}/dev/stdout
ln -sf /proc/self/fd/2 {q(str(r))}/dev/stderr
mount -t tmpfs tmpfs {q(str(r))}/dev/shm
mount -t tmpfs -o mode=755 tmpfs {q(str(r))}/run
mkdir -p {q(str(r))}/run/sshd {q(str(r))}/run/lock
chmod 1777 {q(str(r))}/tmp
# pivot_root, not chroot: like a real machine, the host's root is its mount
# namespace's root, so user namespaces (rootless podman) work inside it.
cd {q(str(r))}
mkdir -p .mpc-oldroot
pivot_root . .mpc-oldroot
cd /
umount -l /.mpc-oldroot
rmdir /.mpc-oldroot
exec /usr/sbin/sshd -D -e
"""

    def _launch(self, inner: str, log: Path) -> subprocess.Popen:
        # join the subtree first, then unshare the cgroup namespace rooted there
        argv = ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount", "--uts",
                "--pid", "--cgroup", "--fork", "--kill-child", "--propagation", "private",
                "bash", "-c", inner]
        return subprocess.Popen(
            ["sh", "-c", 'for f in "$@"; do echo $$ > "$f"; done; exec ' + shlex.join(argv),
             "join-cgroup", *self.cgroup.procs_files()],
            stdout=open(log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)

    def stop(self) -> None:
        """Kill everything in the host (its PID namespace dies with sshd); keep its disk."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, 9)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self.proc = None
        if self._init_pid:
            wait_for(f"{self.name} processes gone", lambda: not alive(self._init_pid), timeout=10)
        self._init_pid = 0
        self.cgroup.kill()      # anything that joined the host's cgroups from outside

    def destroy(self) -> None:
        self.stop()
        self.cgroup.remove()
        # delete the veth pair ourselves (from the host's end: the uplink end may have moved
        # into the e2e node's netns): a netns goes away asynchronously, and its veth pair with
        # it, so the next host given this index could find the name still taken
        subprocess.run(["ip", "-n", self.netns, "link", "del", "eth0"], capture_output=True)
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        wait_for(f"{self.veth} gone", lambda: subprocess.run(
            ["ip", "link", "show", self.veth], capture_output=True).returncode != 0, timeout=10)
        shutil.rmtree(self.state, ignore_errors=True)

    # --- access --------------------------------------------------------------------
    def sshd_pid(self) -> int:
        """PID (in this machine's namespace) of the host's sshd, PID 1 inside the host.

        ``unshare --fork`` (started through ``nsenter``, which execs it) has exactly
        one child: the shell that became sshd.
        """
        if not self._init_pid and self.proc is not None:
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            if kids:
                self._init_pid = int(kids[0])
        if not self._init_pid or not alive(self._init_pid):
            raise RuntimeError(f"{self.name} is not running")
        return self._init_pid

    def exec(self, script: str, check: bool = True, input: str | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a shell script as root *inside* the host, without SSH (test evidence)."""
        pid = self.sshd_pid()
        enter = ["nsenter", "-t", str(pid), *self._enter_flags, "-r", "-w",
                 "/bin/sh", "-c", script]
        # join the host's cgroups too, so whatever the script starts is the host's
        return subprocess.run(
            ["sh", "-c", 'for f in "$@"; do echo $$ > "$f"; done; exec ' + shlex.join(enter),
             "join-cgroup", *self.cgroup.procs_files()],
            check=check, capture_output=True, text=True, input=input, timeout=timeout)

    def ssh_argv(self, user: str | None = None, key: Path | None = None,
                 known_hosts: Path | None = None) -> list[str]:
        return ["ssh", *SSH_OPTS, "-o", f"UserKnownHostsFile={known_hosts or self.known_hosts_file}",
                "-i", str(key or self.admin_key_file), "-p", str(self.port),
                f"{user or self.admin_user}@{self.address}"]

    def ssh(self, command: str, user: str | None = None, key: Path | None = None,
            check: bool = True, input: str | None = None, timeout: float = 60
            ) -> subprocess.CompletedProcess:
        return subprocess.run([*self.ssh_argv(user, key), command], check=check,
                              capture_output=True, text=True, input=input, timeout=timeout)

    def path(self, inside: str) -> Path:
        """A path inside the running host (its root is only mounted in its own namespace)."""
        return Path(f"/proc/{self.sshd_pid()}/root") / inside.lstrip("/")

    def users(self) -> list[str]:
        """Login names in the host's own /etc/passwd."""
        text = self.path("/etc/passwd").read_text()
        return [line.split(":", 1)[0] for line in text.splitlines() if line]

    def processes(self) -> list[tuple[int, set[int], str]]:
        """(pid, uids, command line) of every live process in the host's PID namespace."""
        out = []
        for d in self.path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                status = (d / "status").read_text()
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace").strip()
            except OSError:
                continue
            fields = dict(ln.split(":", 1) for ln in status.splitlines() if ":" in ln)
            if fields.get("State", "Z").split()[0] in ("Z", "X"):
                continue
            out.append((int(d.name), {int(u) for u in fields["Uid"].split()}, cmd))
        return out


LOCKS = Path("/run/mpc-test-subnets")


def _claim_subnet() -> tuple[str, Path]:
    """Claim a free 192.168.N.0/24 (N in 200..249) for this process; stale claims are reused."""
    LOCKS.mkdir(parents=True, exist_ok=True)
    for n in range(200, 250):
        lock = LOCKS / str(n)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = int(lock.read_text() or 0)
            except (OSError, ValueError):
                continue
            if owner and alive(owner):
                continue
            lock.unlink(missing_ok=True)
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return f"192.168.{n}", lock
    raise RuntimeError("no free test subnet in 192.168.200-249")


_FARMS = itertools.count()


class HostFarm:
    """Creates and destroys SSH hosts for one test session.

    Each farm owns one 192.168.N.0/24, split into /30s: host i is .4i+2 and
    this machine's end of its veth is .4i+1. Concurrent test sessions get
    different N, so their routes never overlap.
    """

    def __init__(self, session: str | None = None, base: Path | None = None):
        # one name space per farm: a process may run several at once (the session's
        # farm keeps the e2e install's hosts while a teardown test makes its own)
        self.session = session or f"{os.getpid() % 100000:05d}{next(_FARMS)}"
        self.SUBNET, self._lock = _claim_subnet()
        self.hosts: list[SSHHost] = []
        self.dir = Path(tempfile.mkdtemp(prefix=f"mpc-hosts-{self.session}-", dir="/dev/shm"))
        self.base = base or self.dir / "base"       # another farm's extracted rootfs, shared
        self._extracted = base is not None
        self._foreign: dict[str, Path] = {}

    def _extract(self) -> None:
        if self._extracted:
            return
        tar = rootfs.ensure_rootfs()
        self.base.mkdir()
        subprocess.run(f"zstd -dc {shlex.quote(str(tar))} | tar -C {shlex.quote(str(self.base))} "
                       "--numeric-owner -xf -", shell=True, check=True)
        self._extracted = True

    def foreign_base(self, arch: str) -> Path:
        """The extracted rootfs of an emulated architecture (``foreignroot.py``), shared."""
        if arch not in self._foreign:
            from . import foreignroot
            tar = foreignroot.ensure_rootfs(arch)
            base = self.dir / f"base-{arch}"
            base.mkdir()
            subprocess.run(f"zstd -dc {shlex.quote(str(tar))} | tar -C {shlex.quote(str(base))} "
                           "--numeric-owner -xf -", shell=True, check=True)
            self._foreign[arch] = base
        return self._foreign[arch]

    def add(self, name: str | None = None, arch: str | None = None, address: str | None = None,
            **identity) -> SSHHost:
        """A new host; ``arch`` (``arm64``, ``s390x``) makes it really run that architecture
        under QEMU user emulation (``emulatedhosts.py``); default: this machine's (amd64)."""
        cls, base = SSHHost, self.base
        if arch not in (None, "amd64"):
            from .emulatedhosts import EmulatedHost
            cls, base = EmulatedHost, self.foreign_base(arch)
        else:
            self._extract()
        # a destroyed host (its state dir is gone) frees its /30, netns and cgroup names
        self.hosts = [h for h in self.hosts if h.state.exists()]
        used = {h.index for h in self.hosts}
        i = next((n for n in range(63) if n not in used), None)
        if i is None:
            raise RuntimeError("at most 63 test hosts alive at once per session")
        name = name or f"host{i}"
        # ``address`` given (a cloud VM's private address in .0/25 of this farm's /24): routed
        # point to point from this machine's .128+i; ``identity``: given_host_key and
        # given_admin_public_key (see SSHHost)
        net = ({"host_ip": f"{self.SUBNET}.{128 + i}", "address": address, "point_to_point": True}
               if address else
               {"host_ip": f"{self.SUBNET}.{4 * i + 1}", "address": f"{self.SUBNET}.{4 * i + 2}"})
        h = cls(name=name, index=i, base=base, state=self.dir / f"h{i}",
                netns=f"mpc{self.session}h{i}", veth=f"mv{self.session}h{i}"[:15],
                arch=arch or "amd64", **net, **identity)
        self.hosts.append(h)
        return h.create()

    def close(self) -> None:
        for h in self.hosts:
            h.destroy()
        self.hosts.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
        self._lock.unlink(missing_ok=True)
        # `ip netns add` leaves /run/netns mounted; drop it once no netns remains
        if Path("/run/netns").exists() and not any(Path("/run/netns").iterdir()):
            subprocess.run(["umount", "/run/netns"], capture_output=True)


def add_user(h: SSHHost, user: str, key_dir: Path, sudo: str = "") -> Path:
    """An ordinary login user with a fresh key, as mpc's provisioner makes one (``restrict``
    in authorized_keys), plus a sudo rule for ``sudo`` if given; returns the key file."""
    priv, pub = keypair()
    key = key_dir / f"{user}.key"
    key.write_bytes(priv)
    key.chmod(0o600)
    h.ssh(f"""set -e
sudo useradd -m -s /bin/bash {user}
sudo install -d -m 700 -o {user} -g {user} /home/{user}/.ssh
sudo install -m 600 -o {user} -g {user} /dev/stdin /home/{user}/.ssh/authorized_keys
""", input=f"restrict {pub}\n")
    if sudo:
        h.ssh(f"echo '{user} ALL=(root) NOPASSWD: {sudo}' | sudo tee /etc/sudoers.d/mpc-{user} "
              f">/dev/null && sudo chmod 440 /etc/sudoers.d/mpc-{user}")
    return key
