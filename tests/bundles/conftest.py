"""Helpers for the bundle tests: the real `mpc` CLI, tkn, and small catalogs."""
from __future__ import annotations

import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.infra import paths

REPO = paths.REPO
CTIME = "2024-05-01T12:00:00Z"


@dataclass
class Run:
    rc: int
    out: str
    err: str


def mpc(*args: str, cwd: Path = REPO, env: dict | None = None) -> Run:
    """The real command line, as `make` runs it."""
    r = subprocess.run([sys.executable, "-m", "mpc.generator.cli", *args], cwd=cwd,
                       capture_output=True, text=True, timeout=600, env=env)
    return Run(r.returncode, r.stdout, r.stderr)


def tkn_list(ref: str) -> list[str]:
    r = subprocess.run([paths.tool("tkn"), "bundle", "list", ref], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return sorted(line.strip() for line in r.stdout.splitlines() if line.strip())


def task(name: str, script: str = "#!/bin/sh\necho hi\n") -> dict:
    return {"apiVersion": "tekton.dev/v1", "kind": "Task",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/version": "0.1"}},
            "spec": {"description": f"The {name} task.\nSecond line.",
                     "params": [{"name": "X", "type": "string", "default": "on"}],
                     "steps": [{"name": "s", "image": "registry.invalid/busybox",
                                "env": [{"name": "X", "value": "$(params.X)"}],
                                "script": script}]}}


def pipeline(name: str, first: str, final: str) -> dict:
    return {"apiVersion": "tekton.dev/v1", "kind": "Pipeline", "metadata": {"name": name},
            "spec": {"tasks": [{"name": "a", "taskRef": {"kind": "Task", "name": first}}],
                     "finally": [{"name": "b", "taskRef": {"name": final}}]}}


@dataclass
class Catalog:
    root: Path
    spec: Path

    @property
    def tasks(self) -> Path:
        return self.root / "tasks"

    def write(self, rel: str, *docs: dict) -> Path:
        p = self.tasks / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        return p

    def declare(self, bundles: list[dict], source: str = "https://example.invalid/mpc") -> None:
        self.spec.write_text(yaml.safe_dump({"source": source, "bundles": bundles}, sort_keys=False))

    def args(self) -> list[str]:
        return ["--spec", str(self.spec), "--tasks", str(self.tasks)]


@pytest.fixture
def small_catalog(tmp_path) -> Catalog:
    """Two Tasks and a Pipeline that names them on the cluster, like tasks/ does."""
    c = Catalog(tmp_path, tmp_path / "bundles.yaml")
    c.write("hello/0.1/hello.yaml", task("hello"))
    c.write("world/0.1/world.yaml", task("world", "#!/bin/bash\nset -euo pipefail\necho 'a, \"b\"'\n"))
    c.write("pipelines/demo/0.1/demo.yaml", pipeline("demo", "hello", "world"))
    c.declare([
        {"name": "task-hello", "description": "Says hello, to everyone.", "objects": ["Task/hello"]},
        {"name": "task-world", "objects": ["Task/world"]},
        {"name": "pipeline-demo", "description": "The demo Pipeline.", "objects": ["Pipeline/demo"]},
    ])
    return c


@pytest.fixture
def prefix(registry) -> str:
    """A fresh repository prefix on the test registry for one test."""
    return f"{registry.address}/t{uuid.uuid4().hex[:8]}"
