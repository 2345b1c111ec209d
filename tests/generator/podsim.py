"""Runs a Task's steps the way Tekton's pod would, on this machine, for real.

A "pod" is a private mount + PID namespace in this machine's network
namespace (so it reaches the SSH test hosts and the loopback registry, as a
pod reaches its hosts), whose root is an overlay of the SSH-host rootfs
(Debian with bash, ssh, rsync and buildah: it stands in for the step image).
Into it go what Tekton mounts: each workspace at /workspace/<name>,
/tekton/results, the Task's volumes (emptyDir dirs shared between steps, a
directory standing in for each secret/configMap) at their mountPaths, and
the step's script as a file it executes with the step's args and env.

Variables are substituted as Tekton does: $(params.X), $(params.X[*]) as
whole args, $(workspaces.W.path), $(results.R.path), $(context.taskRun.name).
"""
from __future__ import annotations

import re
import shlex
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.infra.cgroups import Subtree

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ARRAY_ARG = re.compile(r"^\$\(params\.([A-Za-z0-9_.-]+)\[\*\]\)$")
VAR = re.compile(r"\$\((params|workspaces|results|context)\.([A-Za-z0-9_-]+)(?:\.([A-Za-z0-9_.-]+))?\)")


@dataclass
class Pod:
    rootfs: Path                 # the extracted SSH-host rootfs (read-only lower dir)
    dir: Path                    # this pod's state
    task: dict
    params: dict
    taskrun: str = "tr-test"
    sources: dict[str, Path] = field(default_factory=dict)  # volume name -> dir standing in for it
    layers: list[Path] = field(default_factory=list)  # more of the step image, over the rootfs

    def __post_init__(self):
        for d in ("upper", "work", "root", "results", "vol"):
            (self.dir / d).mkdir(parents=True, exist_ok=True)
        spec = self.task["spec"]
        self.values = {p["name"]: p.get("default") for p in spec.get("params") or []}
        self.values.update(self.params)
        missing = [k for k, v in self.values.items() if v is None]
        assert not missing, f"params without value: {missing}"
        self.workspaces = {w["name"]: w.get("mountPath") or f"/workspace/{w['name']}"
                           for w in spec.get("workspaces") or []}
        self.ws_dirs = {}
        for w in self.workspaces:
            self.ws_dirs[w] = self.dir / "ws" / w
            self.ws_dirs[w].mkdir(parents=True, exist_ok=True)

    # --- Tekton's variable substitution -------------------------------------------------
    def sub(self, text: str) -> str:
        def one(m: re.Match) -> str:
            kind, name, rest = m.groups()
            if kind == "params":
                v = self.values[name]
                assert isinstance(v, str), f"array param {name} used as a string"
                return v
            if kind == "workspaces":
                assert rest == "path", rest
                return self.workspaces[name]
            if kind == "results":
                assert rest == "path", rest
                return f"/tekton/results/{name}"
            assert (name, rest) == ("taskRun", "name"), m.group(0)
            return self.taskrun
        return VAR.sub(one, text)

    def step(self, name: str) -> dict:
        return next(s for s in self.task["spec"]["steps"] if s["name"] == name)

    def run(self, name: str, extra_env: dict | None = None, timeout: float = 600
            ) -> subprocess.CompletedProcess:
        spec = self.task["spec"]
        tmpl = spec.get("stepTemplate") or {}
        s = self.step(name)
        env = {}
        for e in list(tmpl.get("env") or []) + list(s.get("env") or []):
            env[e["name"]] = self.sub(str(e["value"]))
        env.setdefault("HOME", "/root")
        env.setdefault("PATH", PATH)
        env.update(extra_env or {})
        args: list[str] = []
        for a in s.get("args") or []:
            m = ARRAY_ARG.match(str(a))
            args += list(self.values[m.group(1)]) if m else [self.sub(str(a))]
        script = self.sub(str(s["script"]))
        if not script.startswith("#!"):
            script = "#!/bin/sh\nset -e\n" + script
        workdir = self.sub(str(s.get("workingDir") or "/workspace"))

        upper = self.dir / "upper"
        (upper / "tekton/scripts").mkdir(parents=True, exist_ok=True)
        sf = upper / "tekton/scripts" / name
        sf.write_text(script)
        sf.chmod(0o755)
        binds: list[tuple[Path, str, bool]] = [(self.dir / "results", "/tekton/results", False)]
        for w, path in self.workspaces.items():
            binds.append((self.ws_dirs[w], path, False))
        vols = {v["name"]: v for v in spec.get("volumes") or []}
        for m in list(tmpl.get("volumeMounts") or []) + list(s.get("volumeMounts") or []):
            vname = m["name"]
            if vname in self.sources:
                src = self.sources[vname]
            else:
                v = vols.get(vname, {})
                if "emptyDir" not in v:   # optional secret/configMap that does not exist
                    assert (v.get("secret") or v.get("configMap") or {}).get("optional"), vname
                    continue
                src = self.dir / "vol" / vname
                src.mkdir(exist_ok=True)
            binds.append((src, m["mountPath"], bool(m.get("readOnly"))))
        root = self.dir / "root"
        cgroup = Subtree(f"mpc-pod-{uuid.uuid4().hex[:12]}").create()
        q = lambda p: shlex.quote(str(p))  # noqa: E731
        lines = [
            "set -eu",
            f"mount -t overlay overlay -o lowerdir={':'.join(q(p) for p in [*self.layers, self.rootfs])},"
            f"upperdir={q(upper)},"
            f"workdir={q(self.dir / 'work')} {q(root)}",
            f"mount -t proc proc {q(root)}/proc",
            f"mount --rbind /dev {q(root)}/dev",
            f"mount --rbind /sys {q(root)}/sys",
            # a pod's own cgroup root, as a real pod has (nothing it starts lands at the top)
            f"umount -l {q(root)}/sys/fs/cgroup",
            cgroup.mount_script(q(root)),
            f"mount -t tmpfs tmpfs {q(root)}/run",
        ]
        for src, target, ro in binds:
            t = f"{q(root)}{q(target)}"
            lines.append(f"mkdir -p {t} && mount --bind {q(src)} {t}")
            if ro:
                lines.append(f"mount -o remount,bind,ro {t}")
        lines.append(f"mkdir -p {q(root)}{q(workdir)}")
        envargs = " ".join(q(f"{k}={v}") for k, v in env.items())
        lines.append(f"exec chroot {q(root)} /usr/bin/env -i -C {q(workdir)} {envargs} "
                     f"/tekton/scripts/{q(name)} \"$@\"")
        argv = ["unshare", "--mount", "--pid", "--cgroup", "--fork", "--propagation", "private",
                "bash", "-c", "\n".join(lines), "pod", *args]
        try:
            return subprocess.run(
                ["sh", "-c", 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1"; shift; '
                 'n=$((n-1)); done; exec "$@"', "join-cgroup",
                 str(len(cgroup.procs_files())), *cgroup.procs_files(), *argv],
                capture_output=True, text=True, timeout=timeout)
        finally:
            cgroup.remove()

    def result(self, name: str) -> str:
        return (self.dir / "results" / name).read_text()
