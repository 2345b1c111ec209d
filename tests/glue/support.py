"""Test support for the glue watcher: build TaskRuns, playing Tekton, and the watcher process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from kubernetes import client

from mpc.runner import contract as c
from tests.infra.procs import free_port, wait_for

G, V = "tekton.dev", "v1"
GLUE = str(Path(sys.executable).with_name("mpc-glue"))


def task_spec(platform_default: str | None = None, secret_prefix: str = c.SECRET_PREFIX,
              with_platform_param: bool = True) -> dict:
    params = []
    if with_platform_param:
        p = {"name": c.PLATFORM_PARAM, "type": "string"}
        if platform_default is not None:
            p["default"] = platform_default
        params.append(p)
    return {
        "params": params,
        "volumes": [{"name": "ssh", "secret": {
            "secretName": secret_prefix + "$(context.taskRun.name)", "optional": False}}],
        "steps": [{"name": "build", "image": "busybox",
                   "volumeMounts": [{"name": "ssh", "mountPath": "/ssh"}],
                   "script": "#!/bin/sh\ncat /ssh/host\n"}],
    }


def build_taskrun(name: str, platform: str | None = "linux/arm64", inline: bool = True,
                  spec: dict | None = None, labels: dict | None = None) -> dict:
    """A build TaskRun: inline spec.taskSpec, or a taskRef whose spec Tekton will resolve."""
    body: dict = {"apiVersion": f"{G}/{V}", "kind": "TaskRun",
                  "metadata": {"name": name, "labels": labels or {}},
                  "spec": {"params": [{"name": c.PLATFORM_PARAM, "value": platform}]
                           if platform is not None else []}}
    if inline:
        body["spec"]["taskSpec"] = spec or task_spec()
    else:
        body["spec"]["taskRef"] = {"name": "buildah-remote"}
    return body


class Tekton:
    """Does to TaskRuns and PipelineRuns what the Tekton controller would (via /status)."""

    def __init__(self, api: client.ApiClient):
        self.co = client.CustomObjectsApi(api)

    def create_tr(self, ns: str, body: dict) -> dict:
        return self.co.create_namespaced_custom_object(G, V, ns, "taskruns", body)

    def get_tr(self, ns: str, name: str) -> dict | None:
        try:
            return self.co.get_namespaced_custom_object(G, V, ns, "taskruns", name)
        except client.ApiException as e:
            if e.status == 404:
                return None
            raise

    def get_pr(self, ns: str, name: str) -> dict | None:
        try:
            return self.co.get_namespaced_custom_object(G, V, ns, "pipelineruns", name)
        except client.ApiException as e:
            if e.status == 404:
                return None
            raise

    def list_pr(self, ns: str) -> list[dict]:
        return self.co.list_namespaced_custom_object(G, V, ns, "pipelineruns")["items"]

    def _status(self, plural: str, ns: str, name: str, status: dict) -> dict:
        return self.co.patch_namespaced_custom_object_status(
            G, V, ns, plural, name, {"status": status})

    def resolve(self, ns: str, name: str, spec: dict) -> dict:
        """Tekton resolved the taskRef and recorded the spec in status.taskSpec."""
        return self._status("taskruns", ns, name, {
            "taskSpec": spec, "podName": f"{name}-pod",
            "conditions": [_cond("Unknown", "Pending")]})

    def running(self, ns: str, name: str) -> dict:
        return self._status("taskruns", ns, name, {"conditions": [_cond("Unknown", "Running")],
                                                   "podName": f"{name}-pod",
                                                   "startTime": _now()})

    def finish_tr(self, ns: str, name: str, ok: bool = True) -> dict:
        return self._status("taskruns", ns, name, {
            "conditions": [_cond("True" if ok else "False", "Succeeded" if ok else "Failed")],
            "podName": f"{name}-pod", "completionTime": _now()})

    def finish_pr(self, ns: str, name: str, ok: bool = True, reason: str | None = None,
                  completed: str | None = None) -> dict:
        return self._status("pipelineruns", ns, name, {
            "conditions": [_cond("True" if ok else "False",
                                 reason or ("Succeeded" if ok else "Failed"))],
            "startTime": completed or _now(), "completionTime": completed or _now()})

    def delete_tr(self, ns: str, name: str) -> None:
        self.co.delete_namespaced_custom_object(G, V, ns, "taskruns", name)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _cond(status: str, reason: str) -> dict:
    return {"type": "Succeeded", "status": status, "reason": reason,
            "lastTransitionTime": _now(), "message": reason}


class Watcher:
    """``mpc-glue`` as a real process, killable at any moment."""

    def __init__(self, kubeconfig: Path, namespace: str, watch: list[str] | None,
                 logdir: Path, *args: str, env: dict | None = None):
        self.kubeconfig, self.namespace, self.watch = kubeconfig, namespace, watch
        self.args, self.env = list(args), env or {}
        self.logdir = logdir
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.starts = 0

    @property
    def log(self) -> Path:
        return self.logdir / f"glue-{self.namespace}.log"

    def start(self, *extra: str, crash_after: str | None = None) -> "Watcher":
        self.port = free_port()
        argv = [GLUE, "--kubeconfig", str(self.kubeconfig), "--namespace", self.namespace,
                "--metrics-address", "127.0.0.1", "--metrics-port", str(self.port),
                "--gc-interval", "1s", "--sweep-interval", "0", "--log-level", "debug",
                *self.args, *extra]
        for w in self.watch or ():
            argv += ["--watch-namespace", w]
        env = dict(os.environ, **self.env)
        env.pop("KUBECONFIG", None)
        if crash_after:
            env["MPC_GLUE_CRASH_AFTER"] = crash_after
        self.starts += 1
        with open(self.log, "a") as f:
            f.write(f"--- start {self.starts} crash_after={crash_after}\n")
            f.flush()
            self.proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        return self

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wait_ready(self, timeout: float = 60) -> "Watcher":
        wait_for("mpc-glue /readyz", lambda: self.get("/readyz")[0] == 200,
                 timeout=timeout, log=self.log)
        return self

    def metrics(self) -> str:
        return self.get("/metrics")[1]

    def metric(self, name: str, **labels) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            mname, _, lab = head.partition("{")
            if mname != name:
                continue
            if all(f'{k}="{v}"' in lab for k, v in labels.items()):
                total += float(value)
        return total

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode if self.proc else None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
