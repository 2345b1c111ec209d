"""Run a Task's steps the way Tekton runs them, as separate processes.

Each step runs on its own: its ``command`` (looked up on PATH, as Tekton's
entrypoint does), or its ``script`` written to a file and executed; its env
values get ``$(params.*)``, ``$(context.taskRun.*)`` and ``$(results.*.path)``
substituted from the Task's params (defaults included) exactly as Tekton
would; results are read back from the results directory. The process
authenticates to the API server with the kubeconfig given (a real
ServiceAccount token), so missing or excessive RBAC shows up.
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .paths import REPO

REF = re.compile(r"\$\((params\.[A-Za-z0-9_-]+|context\.taskRun\.(name|namespace|uid)|"
                 r"results\.[A-Za-z0-9_-]+\.path)\)")


def load_task(path: Path | str) -> dict:
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    return docs[0]


def task_path(name: str, version: str = "0.1") -> Path:
    return REPO / "tasks" / name / version / f"{name}.yaml"


@dataclass
class StepRun:
    step: str
    proc: subprocess.Popen
    results_dir: Path
    workdir: Path
    stdout: str = ""
    stderr: str = ""
    returncode: int | None = None
    results: dict[str, str] = field(default_factory=dict)

    def wait(self, timeout: float = 600) -> "StepRun":
        out, err = self.proc.communicate(timeout=timeout)
        self.stdout, self.stderr, self.returncode = out, err, self.proc.returncode
        for f in self.results_dir.iterdir():
            self.results[f.name] = f.read_text()
        return self

    def check(self) -> "StepRun":
        if self.returncode != 0:
            raise AssertionError(f"step {self.step} exited {self.returncode}\n"
                                 f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}")
        return self


def substitute(value: str, params: dict[str, str], context: dict[str, str],
               results_dir: Path) -> str:
    def one(m: re.Match) -> str:
        ref = m.group(1)
        if ref.startswith("params."):
            return params[ref[len("params."):]]
        if ref.startswith("context.taskRun."):
            return context[ref[len("context.taskRun."):]]
        return str(results_dir / ref[len("results."):-len(".path")])
    return REF.sub(one, value)


def start_task(task: dict, params: dict[str, str], *, kubeconfig: Path, namespace: str,
               taskrun_name: str = "provision-run", extra_env: dict[str, str] | None = None,
               step_index: int = 0) -> StepRun:
    """Start one step of ``task`` as its own process; ``namespace`` is where the TaskRun runs."""
    spec = task["spec"]
    declared = {p["name"]: p for p in spec.get("params", [])}
    unknown = set(params) - set(declared)
    if unknown:
        raise ValueError(f"params not declared by {task['metadata']['name']}: {sorted(unknown)}")
    values = {}
    for name, p in declared.items():
        if name in params:
            values[name] = params[name]
        elif "default" in p:
            values[name] = p["default"]
        else:
            raise ValueError(f"missing required param {name}")
    step = spec["steps"][step_index]
    work = Path(tempfile.mkdtemp(prefix=f"step-{step['name']}-"))
    results = work / "results"
    results.mkdir()
    context = {"name": taskrun_name, "namespace": namespace, "uid": "00000000-test"}
    argv = list(step.get("command") or ())
    if step.get("script") is not None:
        script = work / "script"
        script.write_text(step["script"])
        script.chmod(0o755)
        argv = [str(script)]
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
           "HOME": str(work), "KUBECONFIG": str(kubeconfig), "LANG": "C.UTF-8"}
    for e in step.get("env", []):
        env[e["name"]] = substitute(e.get("value", ""), values, context, results)
    env.update(extra_env or {})
    proc = subprocess.Popen([*argv, *step.get("args", [])], env=env, cwd=work,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return StepRun(step=step["name"], proc=proc, results_dir=results, workdir=work)


def run_task(task: dict, params: dict[str, str], **kw) -> StepRun:
    timeout = kw.pop("timeout", 600)
    return start_task(task, params, **kw).wait(timeout)
