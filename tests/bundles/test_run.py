"""`make bundles-check` (`mpc bundles run`): the whole product assembled in one command, with no cluster."""
from __future__ import annotations

import re
import socket
import subprocess

import yaml

from tests.bundles.conftest import REPO, mpc


def _port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) == 0


def check_run_output(out: str, names: list[str]) -> None:
    m = re.search(r"embedded registry on (127\.0\.0\.1:\d+)", out)
    assert m, out
    assert not _port_open(m.group(1)), "the embedded registry is still running"
    for n in names:
        assert re.search(rf"^{re.escape(n)}\s+\S+.*{re.escape(m.group(1))}/mpc/{re.escape(n)}:\S+@sha256:[0-9a-f]{{64}}$",
                         out, re.M), f"{n} missing from the table:\n{out}"


def test_run_on_a_small_catalog(small_catalog):
    r = mpc("bundles", "run", *small_catalog.args(), "--no-generate", "--no-images", "--ctime",
            "2024-01-01T00:00:00Z", cwd=small_catalog.root)
    assert r.rc == 0, r.out + r.err
    check_run_output(r.out, ["task-hello", "task-world", "pipeline-demo"])
    assert "pipeline.tekton.dev/demo" in r.out     # the OBJECTS column comes from tkn bundle list


def test_make_bundles_check(tmp_path):

    names = [b["name"] for b in yaml.safe_load((REPO / "bundles/bundles.yaml").read_text())["bundles"]]
    # deps/venv/upstream are the install steps `make test` already ran
    r = subprocess.run(["make", "--no-print-directory", "-o", "deps", "-o", "venv", "-o", "upstream", "bundles-check"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    # every generator ran in --check mode, then the whole catalog was pushed
    assert re.search(r"^== mpc generate .*--check$", r.stdout, re.M), r.stdout
    assert re.search(r"^== mpc buildah-remote .*--check$", r.stdout, re.M), r.stdout
    check_run_output(r.stdout, names)
    # mpc's images were built from their Containerfiles and pushed with the bundles, and
    # every Task step that runs the task runner names it by that digest
    pushed = dict(re.findall(r"pushed (127\.0\.0\.1:\d+/mpc/(?:task-runner|glue):\S+)@(sha256:[0-9a-f]{64})",
                             r.stdout))
    assert len(pushed) == 2, r.stdout
    runner = next(f"{k}@{v}" for k, v in pushed.items() if "/task-runner:" in k)
    steps = [line.split("image:", 1)[1].strip() for line in r.stdout.splitlines()
             if "pinned step image" in line]
    assert steps and set(steps) == {runner}, r.stdout


def test_run_refuses_a_task_that_breaks_the_task_rules(small_catalog):
    from tests.bundles.conftest import task
    small_catalog.write("hello/0.1/hello.yaml", task("hello", "echo no shebang $(params.X)\n"))
    r = mpc("bundles", "run", *small_catalog.args(), "--no-generate", cwd=small_catalog.root)
    assert r.rc == 1
    assert "hello/0.1/hello.yaml" in r.err
    assert "embedded registry" not in r.out and "pushed" not in r.out
