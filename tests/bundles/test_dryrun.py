"""Every Task and Pipeline (as checked in, and as pinned for a release) passes the
apiserver's server-side dry-run against the Tekton CRDs' structural schema."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.bundles.conftest import Catalog, mpc, task
from tests.bundles.test_repo import catalog

KUBECTL = str(Path(sys.executable).parent / "kubectl")


def dry_run(cluster, namespace: str, f: Path) -> subprocess.CompletedProcess:
    return subprocess.run([KUBECTL, "--kubeconfig", str(cluster.kubeconfig), "apply",
                           "--dry-run=server", "-n", namespace, "-o", "name", "-f", str(f)],
                          capture_output=True, text=True, timeout=120)


def test_every_task_and_pipeline_passes_server_dry_run(cluster, namespace):
    files = sorted(set(catalog().values()))
    assert files
    for f in files:
        r = dry_run(cluster, namespace, f)
        assert r.returncode == 0, f"{f}: {r.stderr}"
        for doc in yaml.safe_load_all(f.read_text()):
            if isinstance(doc, dict) and doc.get("apiVersion", "").startswith("tekton.dev/"):
                assert f"{doc['kind'].lower()}.tekton.dev/{doc['metadata']['name']}" in r.stdout


def test_pinned_release_pipelines_pass_server_dry_run(cluster, namespace, registry, tmp_path):
    c = Catalog(tmp_path, tmp_path / "bundles.yaml")
    c.write("hello/0.1/hello.yaml", task("hello"))
    c.write("p/0.1/p.yaml", {"apiVersion": "tekton.dev/v1", "kind": "Pipeline",
                             "metadata": {"name": "p"},
                             "spec": {"tasks": [{"name": "a", "taskRef": {"name": "hello"}}]}})
    c.declare([{"name": "task-hello", "objects": ["Task/hello"]},
               {"name": "pipeline-p", "objects": ["Pipeline/p"]}])
    lock = tmp_path / "lock.yaml"
    r = mpc("bundles", "push", *c.args(), "--registry", f"{registry.address}/dry", "--version", "0.1",
            "--ctime", "2024-01-01T00:00:00Z", "--lock", str(lock), cwd=tmp_path)
    assert r.rc == 0, r.err
    r = mpc("bundles", "pin", "--lock", str(lock), "--base", str(tmp_path), "--out",
            str(tmp_path / "out"), str(c.tasks), cwd=tmp_path)
    assert r.rc == 0, r.err
    pinned = tmp_path / "out" / "tasks" / "p" / "0.1" / "p.yaml"
    assert "resolver: bundles" in pinned.read_text()
    r = dry_run(cluster, namespace, pinned)
    assert r.returncode == 0, r.stderr


def test_dry_run_really_validates(cluster, namespace, tmp_path):
    bad = task("bad")
    bad["spec"]["steps"] = "not-a-list"
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(bad))
    r = dry_run(cluster, namespace, f)
    assert r.returncode != 0 and "steps" in r.stderr
