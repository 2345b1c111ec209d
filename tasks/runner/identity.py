"""A passwd entry for whatever uid the pod runs as, so ``ssh`` works under it.

OpenSSH's client refuses to start for a uid that has no passwd entry ("No user
exists for uid N"). Pod Security ``restricted`` and OpenShift's restricted-v2
SCC run the Task under a uid chosen at admission, which the image's
/etc/passwd cannot know in advance. When the running uid has no entry, the
ssh client is started with nss_wrapper (Debian's ``libnss-wrapper``, in the
task-runner image): a private passwd/group file naming the running uid and
gid, preloaded for that one process. Nothing in the image is writable or
changed.
"""
from __future__ import annotations

import glob
import os
import pwd
from pathlib import Path

# where Debian puts the library, for any architecture the image is built for
NSS_WRAPPER_GLOBS = ("/usr/lib/*/libnss_wrapper.so", "/usr/lib/libnss_wrapper.so",
                     "/usr/lib64/libnss_wrapper.so")


class IdentityError(RuntimeError):
    pass


def nss_wrapper_library() -> str | None:
    for pattern in NSS_WRAPPER_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def ssh_env(private_dir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for an ``ssh`` child: ``base`` (default: ours) plus, when our uid has
    no passwd entry, nss_wrapper with a passwd/group file written into ``private_dir``."""
    env = dict(os.environ if base is None else base)
    uid, gid = os.getuid(), os.getgid()
    try:
        pwd.getpwuid(uid)
        return env
    except KeyError:
        pass
    lib = nss_wrapper_library()
    if lib is None:
        raise IdentityError(
            f"uid {uid} has no passwd entry and libnss_wrapper is not installed, so ssh cannot "
            "run: install Debian's libnss-wrapper in the task-runner image (the released image "
            "has it) or run the Task as a uid listed in the image's /etc/passwd")
    home = env.get("HOME") or "/tmp"
    passwd, group = private_dir / "passwd", private_dir / "group"
    passwd.write_text(f"mpc:x:{uid}:{gid}:mpc task runner:{home}:/usr/sbin/nologin\n")
    group.write_text(f"mpc:x:{gid}:\n")
    env.update(LD_PRELOAD=lib, NSS_WRAPPER_PASSWD=str(passwd), NSS_WRAPPER_GROUP=str(group))
    return env
