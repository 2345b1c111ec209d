"""The runner's ssh works under a uid that has no passwd entry (mpc.runner.identity).

Pod Security "restricted" with a podTemplate uid, and OpenShift's restricted-v2,
run the Task under a uid the image cannot know. Here the real ssh client runs
under a random uid (``setpriv``) against a real SSH test host: without the
wrapper it refuses to start, with the environment ``identity.ssh_env`` gives it
reaches the host. Debian's python3 runs the module by path, as the image does.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from tests.infra.paths import REPO

IDENTITY = REPO / "tasks" / "runner" / "identity.py"
PROBE = """
import importlib.util, subprocess, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("identity", sys.argv[1])
identity = importlib.util.module_from_spec(spec); spec.loader.exec_module(identity)
d = Path(sys.argv[2])
env = identity.ssh_env(d, base={"PATH": "/usr/bin:/bin", "HOME": str(d)}) if sys.argv[3] == "wrapped" \\
    else {"PATH": "/usr/bin:/bin", "HOME": str(d)}
p = subprocess.run(sys.argv[4:], env=env, capture_output=True, text=True)
sys.stdout.write(p.stdout); sys.stderr.write(p.stderr); sys.exit(p.returncode)
"""


def _as_uid(uid: int, host, mode: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="mpc-uid-") as tmp:
        d = Path(tmp)
        key, kh = d / "key", d / "known_hosts"
        key.write_bytes(host.admin_key)
        kh.write_text(host.known_hosts_line + "\n")
        for p in (d, key, kh):
            os.chown(p, uid, 0)
        key.chmod(0o600)
        argv = ["ssh", "-F", "/dev/null", "-i", str(key), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={kh}",
                f"{host.admin_user}@{host.address}", "id -un"]
        return subprocess.run(["setpriv", f"--reuid={uid}", "--regid=0", "--clear-groups",
                               "/usr/bin/python3", "-c", PROBE, str(IDENTITY), str(d), mode,
                               *argv], capture_output=True, text=True, timeout=60)


def test_ssh_runs_under_a_uid_without_a_passwd_entry(make_host):
    host = make_host()
    uid = 200000 + int.from_bytes(os.urandom(2), "big")
    bare = _as_uid(uid, host, "bare")
    assert bare.returncode == 255 and f"No user exists for uid {uid}" in bare.stderr, bare
    wrapped = _as_uid(uid, host, "wrapped")
    assert wrapped.returncode == 0, wrapped.stderr
    assert wrapped.stdout.strip() == host.admin_user
