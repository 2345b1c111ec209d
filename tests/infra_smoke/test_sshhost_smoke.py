"""The SSH host fixture is real: pinned host key, users live only on the host, isolation."""
from __future__ import annotations

import subprocess
from pathlib import Path

from tests.infra.sshhosts import keypair


def test_admin_login_with_pinned_host_key(make_host):
    h = make_host()
    out = h.ssh("hostname; id -un; sudo -n id -u")
    assert out.stdout.split() == [h.name, "mpcadmin", "0"]


def test_wrong_host_key_is_refused(make_host, tmp_path):
    a, b = make_host(), make_host()
    kh = tmp_path / "known_hosts"
    kh.write_text(f"{a.address} {b.host_public_key}\n")   # b's key pinned for a's address
    r = subprocess.run([*a.ssh_argv(known_hosts=kh), "true"], capture_output=True, text=True)
    assert r.returncode == 255
    assert "Host key verification failed" in r.stderr


def test_user_created_on_host_only(make_host, tmp_path):
    h = make_host()
    priv, pub = keypair()
    key = tmp_path / "k"
    key.write_bytes(priv)
    key.chmod(0o600)
    h.ssh("sudo useradd -m -s /bin/bash u-smoke && sudo install -d -m700 -o u-smoke -g u-smoke "
          "/home/u-smoke/.ssh && sudo tee /home/u-smoke/.ssh/authorized_keys >/dev/null && "
          "sudo chown u-smoke: /home/u-smoke/.ssh/authorized_keys", input=pub + "\n")
    assert "u-smoke" in h.users()
    assert "u-smoke" not in Path("/etc/passwd").read_text()
    assert h.ssh("id -un", user="u-smoke", key=key).stdout.strip() == "u-smoke"
    # the host's own view, without SSH
    assert h.exec("getent passwd u-smoke").returncode == 0
    h.ssh("sudo userdel -r u-smoke")
    assert "u-smoke" not in h.users()


def test_hosts_are_isolated_from_each_other(make_host):
    a, b = make_host(), make_host()
    a.ssh("echo a > /tmp/marker")
    assert b.ssh("test -e /tmp/marker", check=False).returncode == 1
    # a cannot reach b: each host only has its own /30 and a route back to this machine
    r = a.exec(f"timeout 3 bash -c 'echo > /dev/tcp/{b.address}/22'", check=False)
    assert r.returncode != 0


def test_stopped_host_refuses_and_restarts_with_state(make_host):
    h = make_host()
    h.ssh("sudo useradd -m u-keep")
    h.stop()
    assert h.ssh("true", check=False, timeout=20).returncode == 255
    h.start()
    assert "u-keep" in h.ssh("getent passwd u-keep").stdout
