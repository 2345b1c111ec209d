"""Running mpc's scripts on a build host over SSH, as the pool's admin user.

One SSH connection per operation: the script travels on stdin to ``bash -s``
and its inputs are shell-quoted assignments prepended to it, so no value is
ever parsed by a shell as code. The host key is always pinned
(StrictHostKeyChecking yes): the pool's ``hostKey``, or for a host without
one the key recorded in the cluster on first use (``hostkeys.py``), which
the build's secret pins too.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .hostpool import Host
from .identity import ssh_env

CONNECT_TIMEOUT = 10
# ssh exits 255 for its own errors (refused, unreachable, auth, host key)
SSH_ERROR = 255


class HostError(RuntimeError):
    """The host did not answer or the remote script failed; ``transient`` if worth a retry."""

    def __init__(self, host: str, message: str, transient: bool = False):
        self.host = host
        self.transient = transient
        super().__init__(f"{host}: {message}")


class HostKeyMismatch(HostError):
    """ssh refused the key the host offered; ``offered`` is ssh's (type, fingerprint) of it,
    when ssh said."""

    def __init__(self, host: str, message: str, offered: tuple[str, str] | None):
        self.offered = offered
        super().__init__(host, message)


# what ssh prints when a known host offers another key
_OFFERED = re.compile(r"The fingerprint for the (\S+) key sent by the remote host is\s+"
                      r"(SHA256:[A-Za-z0-9+/]+)")
_REFUSED = ("Host key verification failed", "REMOTE HOST IDENTIFICATION HAS CHANGED")


def script(name: str, **values: str) -> str:
    body = resources.files(__package__).joinpath("scripts", name).read_text()
    header = "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())
    return "#!/bin/bash\n" + header + body


@dataclass
class Session:
    """Credentials for one host, written to a private temp dir for the ssh client."""

    host: Host
    dir: Path
    env: dict[str, str] | None = None     # for the ssh child (see identity.ssh_env)
    round_trips: int = 0

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    def argv(self) -> list[str]:
        key = self.dir / "admin_key"
        return ["ssh", "-F", "/dev/null", "-i", str(key), "-p", str(self.host.port),
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
                "-o", f"ConnectTimeout={CONNECT_TIMEOUT}", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "ForwardAgent=no",
                "-o", "ForwardX11=no", "-o", "ServerAliveInterval=15",
                "--", f"{self.host.user}@{self.host.address}"]

    def pinned_line(self) -> str:
        """The known_hosts line for the build's secret: the key every connection pins."""
        if not self.host.known_hosts_line:
            raise HostError(self.host.name, "no host key is pinned")
        return self.host.known_hosts_line

    def run(self, text: str, timeout: float = 300, attempts: int = 3) -> str:
        """Run a script with ``bash -s``; retry connection-level failures."""
        last = ""
        for attempt in range(attempts):
            self.round_trips += 1
            try:
                p = subprocess.run([*self.argv(), "bash -s"], input=text, capture_output=True,
                                   text=True, timeout=timeout, env=self.env)
            except subprocess.TimeoutExpired:
                raise HostError(self.host.name, f"timed out after {timeout:.0f}s") from None
            if p.returncode == 0:
                return p.stdout
            last = (p.stderr.strip() or p.stdout.strip())[-2000:]
            if p.returncode == SSH_ERROR and any(r in last for r in _REFUSED):
                m = _OFFERED.search(last)
                raise HostKeyMismatch(self.host.name, f"exit {p.returncode}: {last}",
                                      offered=(m.group(1), m.group(2)) if m else None)
            if p.returncode != SSH_ERROR:
                raise HostError(self.host.name, f"exit {p.returncode}: {last}")
            if attempt + 1 < attempts:
                time.sleep(0.5 * (attempt + 1))
        raise HostError(self.host.name, f"unreachable: {last}", transient=True)


class open_session:  # noqa: N801 - used as a context manager, reads like a function
    def __init__(self, host: Host, admin_key: bytes):
        self.host, self.admin_key = host, admin_key

    def __enter__(self) -> Session:
        self._tmp = tempfile.TemporaryDirectory(prefix="mpc-ssh-")
        d = Path(self._tmp.name)
        os.chmod(d, 0o700)
        key = d / "admin_key"
        key.write_bytes(self.admin_key if self.admin_key.endswith(b"\n") else self.admin_key + b"\n")
        key.chmod(0o600)
        (d / "known_hosts").write_text((self.host.known_hosts_line or "") + "\n")
        return Session(self.host, d, env=ssh_env(d))

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()


def scan_host_keys(host: Host, attempts: int = 3) -> list[str]:
    """The public keys ``host`` offers ('ssh-ed25519 AAAA...'), read with ssh-keyscan.

    Nothing is authenticated and nothing runs on the host.
    """
    for attempt in range(attempts):
        try:
            out = subprocess.run(["ssh-keyscan", "-T", str(CONNECT_TIMEOUT), "-p", str(host.port),
                                  "--", host.address], capture_output=True, text=True,
                                 timeout=CONNECT_TIMEOUT * 3).stdout
        except subprocess.TimeoutExpired:
            out = ""
        keys = [" ".join(ln.split()[1:3]) for ln in out.splitlines()
                if not ln.startswith("#") and len(ln.split()) >= 3]
        if keys:
            return keys
        if attempt + 1 < attempts:
            time.sleep(0.5 * (attempt + 1))
    raise HostError(host.name, f"unreachable: ssh-keyscan of {host.address}:{host.port} "
                    "returned no host key", transient=True)


def parse_output(out: str, key: str) -> list[str]:
    prefix = key + "="
    return [ln[len(prefix):] for ln in out.splitlines() if ln.startswith(prefix)]
