"""The bundles this repository ships: complete, well-formed, pushed, pinned, accepted."""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml

from mpc.runner import contract
from tests.bundles import oci
from tests.bundles.conftest import REPO, mpc, tkn_list

SPEC = REPO / "bundles" / "bundles.yaml"
TASKS = REPO / "tasks"


def catalog() -> dict[str, Path]:
    """Kind/name -> file of every tekton.dev document under tasks/."""
    found: dict[str, Path] = {}
    for f in sorted(list(TASKS.rglob("*.yaml")) + list(TASKS.rglob("*.yml"))):
        for doc in yaml.safe_load_all(f.read_text()):
            if isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith("tekton.dev/"):
                key = f"{doc['kind']}/{doc['metadata']['name']}"
                assert key not in found, f"{key} in {found[key]} and {f}"
                found[key] = f
    return found


def declared() -> dict[str, list[str]]:
    return {b["name"]: b["objects"] for b in yaml.safe_load(SPEC.read_text())["bundles"]}


def test_catalog_has_tasks_and_pipelines():
    kinds = Counter(k.split("/")[0] for k in catalog())
    assert kinds["Task"] >= 1 and kinds["Pipeline"] >= 1, kinds


def test_every_task_and_pipeline_is_in_exactly_one_bundle():
    listed = Counter(o for objs in declared().values() for o in objs)
    for key, f in catalog().items():
        assert listed[key] == 1, f"{key} ({f.relative_to(REPO)}) is in {listed[key]} bundles " \
                                 f"of bundles/bundles.yaml; it must be in exactly one"


def test_every_declared_object_exists_in_tasks():
    have = catalog()
    missing = [f"{b}: {o}" for b, objs in declared().items() for o in objs if o not in have]
    assert not missing, "declared in bundles/bundles.yaml but not in tasks/: " + ", ".join(missing)


def test_bundle_layout():
    bundles = declared()
    for name, objs in bundles.items():
        if name.startswith("task-"):
            assert objs == [f"Task/{name.removeprefix('task-')}"], name
    tasks = [o for objs in bundles.values() for o in objs if o.startswith("Task/")]
    assert len(tasks) == sum(n.startswith("task-") for n in bundles)
    holders = [n for n, objs in bundles.items()
               if f"Pipeline/{contract.PROVISION_PIPELINE}" in objs]
    assert len(holders) == 1
    assert f"Pipeline/{contract.DEPROVISION_PIPELINE}" in bundles[holders[0]]


def test_mpc_bundles_check_accepts_the_repo():
    r = mpc("bundles", "check")
    assert r.rc == 0, r.err


@pytest.fixture(scope="module")
def pushed(registry, tmp_path_factory):
    """Every bundle of the repo, pushed once with the real tkn (stamped from git)."""
    lock = tmp_path_factory.mktemp("lock") / "bundles.lock.yaml"
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    r = mpc("bundles", "push", "--registry", f"{registry.address}/repo", "--version", "0.1",
            "--lock", str(lock), env=env)
    assert r.rc == 0, r.out + r.err
    return yaml.safe_load(lock.read_text()), lock, r.out


def test_repo_bundles_pushed_and_listed(pushed):
    lock, _, out = pushed
    assert set(lock["bundles"]) == set(declared())
    for name, b in lock["bundles"].items():
        assert b["ref"] in out
        want = sorted(f"{o.split('/')[0].lower()}.tekton.dev/{o.split('/')[1]}" for o in declared()[name])
        assert tkn_list(b["ref"]) == want, name


def test_repo_layers_match_tasks_dir(pushed):
    lock, _, _ = pushed
    cat = catalog()
    pins = {o: b["ref"] for b in lock["bundles"].values() for o in b["objects"]}
    for name, b in lock["bundles"].items():
        m, _ = oci.manifest(b["ref"])
        assert len(m["layers"]) == len(declared()[name]) <= 20
        config = json.loads(oci.blob(b["ref"], m["config"]["digest"]))
        created = dt.datetime.fromisoformat(config["created"].replace("Z", "+00:00")).timestamp()
        # stamped with the last commit of the bundle's own files
        files = sorted({str(cat[o]) for o in declared()[name]})
        sha, epoch = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%H %ct", "--", *files],
                                    capture_output=True, text=True).stdout.split()
        assert int(created) == int(epoch), name
        assert m["annotations"]["org.opencontainers.image.revision"].removesuffix("-dirty") == sha
        for k in ("source", "revision", "version", "description"):
            assert m["annotations"][f"org.opencontainers.image.{k}"], k
        for layer in m["layers"]:
            a = layer["annotations"]
            key = f"{a['dev.tekton.image.kind'].capitalize()}/{a['dev.tekton.image.name']}"
            assert a["dev.tekton.image.apiVersion"] == "v1"
            entry, content = oci.single_entry(oci.blob(b["ref"], layer["digest"]))
            assert entry.name == a["dev.tekton.image.name"]
            got = json.loads(content)
            want = yaml.safe_load(cat[key].read_text())
            # Pipelines ship with references to our Task bundles pinned: undo that to compare
            for section in ("tasks", "finally"):
                for t in got.get("spec", {}).get(section, []) or []:
                    ref = t.get("taskRef", {})
                    if ref.get("resolver") == "bundles":
                        p = {x["name"]: x["value"] for x in ref["params"]}
                        assert p["bundle"] == pins[f"Task/{p['name']}"]
                        assert oci.exists(p["bundle"])
                        t["taskRef"] = {"kind": "Task", "name": p["name"]}
            for section in ("tasks", "finally"):
                for t in want.get("spec", {}).get(section, []) or []:
                    if "taskRef" in t and t["taskRef"].get("name"):
                        t["taskRef"].setdefault("kind", "Task")
            assert got == want, f"{name}: {key} differs from {cat[key]}"


def test_repo_push_is_reproducible(registry, tmp_path):
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    env = dict(os.environ, SOURCE_DATE_EPOCH="1717000000", TMPDIR=str(tmp))
    digests = []
    for i in range(2):
        lock = tmp_path / f"lock{i}.yaml"
        r = mpc("bundles", "push", "--registry", f"{registry.address}/repro", "--version", "0.1",
                "--revision", "fixed", "--lock", str(lock), env=env)
        assert r.rc == 0, r.err
        digests.append({k: v["digest"] for k, v in yaml.safe_load(lock.read_text())["bundles"].items()})
    assert digests[0] == digests[1]
    # tkn leaves a temp file per layer; a push leaves nothing in TMPDIR
    assert list(tmp.iterdir()) == []


def test_pin_target_pins_every_reference(pushed, tmp_path, registry):
    lock, lock_path, _ = pushed
    out = tmp_path / "release"
    r = subprocess.run(["make", "--no-print-directory", "-o", "venv", "pin-bundles",
                        f"BUNDLES_LOCK={lock_path}", f"PIN_OUT={out}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    files = sorted(out.rglob("*.yaml"))
    assert files, "nothing was pinned"
    pins = {b["ref"] for b in lock["bundles"].values()}
    refs = []
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            for section in ("tasks", "finally"):
                for t in (doc.get("spec") or {}).get(section, []) or []:
                    ref = t["taskRef"]
                    assert ref["resolver"] == "bundles", f"{f}: {t['name']} not a bundle ref"
                    refs.append({p["name"]: p["value"] for p in ref["params"]}["bundle"])
    assert refs
    for ref in refs:
        assert ref in pins
        host_repo, digest = ref.split("@")
        assert digest.startswith("sha256:") and len(digest) == 71 and host_repo.endswith(":0.1")
        assert oci.exists(ref)
    # the admission policy trusts the registry the bundles were pinned to
    cm = yaml.safe_load((out / "glue" / "deploy" / "base" / "admission.yaml").read_text())
    assert cm["data"]["bundleRegistries"].split() == [f"{registry.address}/repo"]
    # the checked-in files are not pinned, and the check says so
    bad = mpc("bundles", "check-pinned", "--lock", str(lock_path), "tasks")
    assert bad.rc == 1 and "still names Task/" in bad.err


def test_make_bundles_target(registry, tmp_path):
    lock = tmp_path / "bundles.lock.yaml"
    r = subprocess.run(["make", "--no-print-directory", "-o", "venv", "-o", "upstream", "bundles",
                        f"REGISTRY={registry.address}/make", "VERSION=0.2", f"BUNDLES_LOCK={lock}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    data = yaml.safe_load(lock.read_text())
    assert data["version"] == "0.2" and set(data["bundles"]) == set(declared())
    for name, b in data["bundles"].items():
        assert b["ref"] == f"{registry.address}/make/{name}:0.2@{b['digest']}"
        assert b["ref"] in r.stdout and oci.exists(b["ref"])
    usage = subprocess.run(["make", "--no-print-directory", "-o", "venv", "-o", "upstream", "bundles"],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert usage.returncode != 0 and "usage: make bundles REGISTRY=" in usage.stderr
