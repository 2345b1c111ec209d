"""`make release`: images built from the Containerfiles and pushed, bundles pushed with their
steps pinned to those digests, manifests pinned, and one install manifest that applies."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml
from kubernetes import client

from tests.bundles import oci
from tests.bundles.conftest import REPO

KUBECTL = str(Path(sys.executable).with_name("kubectl"))
MPC_IMAGES = ("task-runner", "glue")


def test_make_release_pins_every_image_and_bundle_in_one_install_manifest(registry, tmp_path,
                                                                          cluster, kube):
    reg = f"{registry.address}/rel"
    out, block, ilock = tmp_path / "release", tmp_path / "bundles.lock", tmp_path / "images.lock"
    r = subprocess.run(["make", "--no-print-directory", "-o", "deps", "-o", "venv", "-o", "upstream",
                        "release", f"REGISTRY={reg}", "VERSION=0.9", "INSECURE=1",
                        f"PIN_OUT={out}", f"BUNDLES_LOCK={block}", f"IMAGES_LOCK={ilock}"],
                       cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    pushed = {n: v["ref"] for n, v in yaml.safe_load(ilock.read_text())["images"].items()}
    assert set(pushed) == set(MPC_IMAGES)
    for name, ref in pushed.items():
        assert re.fullmatch(rf"{re.escape(reg)}/{name}:0\.9@sha256:[0-9a-f]{{64}}", ref), ref
        assert oci.exists(ref)
        m, _ = oci.manifest(ref)
        cfg = json.loads(oci.blob(ref, m["config"]["digest"]))
        assert cfg["architecture"] == "amd64" and cfg["config"]["User"] == "65532:65532"
        assert cfg["config"]["Entrypoint"] == [{"task-runner": "mpc-runner", "glue": "mpc-glue"}[name]]

    text = (out / "install.yaml").read_text()
    assert "localhost/mpc/" not in text          # no unpublished placeholder anywhere
    docs = [d for d in yaml.safe_load_all(text) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for want in (("Namespace", "mpc"), ("Deployment", "mpc-glue"), ("Pipeline", "mpc-provision"),
                 ("Task", "mpc-provision"), ("ServiceAccount", "mpc-tasks")):
        assert want in kinds, (want, sorted(kinds))
    # re-applying a newer install.yaml must not replace the cluster's own pool: the example
    # pool ships beside it
    assert ("ConfigMap", "mpc-host-pool") not in kinds
    example = yaml.safe_load((out / "example-pool.yaml").read_text())
    assert (example["kind"], example["metadata"]["name"]) == ("ConfigMap", "mpc-host-pool")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert {c["image"] for c in dep["spec"]["template"]["spec"]["containers"]} == {pushed["glue"]}
    step_images = {s["image"] for d in docs if d["kind"] == "Task"
                   and d["metadata"]["name"].startswith("mpc-") for s in d["spec"]["steps"]}
    assert step_images == {pushed["task-runner"]}
    # the Pipelines reach their Tasks through the pushed bundles, by digest
    bundles = {b["ref"] for b in yaml.safe_load(block.read_text())["bundles"].values()}
    for d in docs:
        if d["kind"] == "Pipeline":
            for t in d["spec"].get("tasks", []) + d["spec"].get("finally", []):
                ref = {p["name"]: p["value"] for p in t["taskRef"]["params"]}["bundle"]
                assert ref in bundles and "@sha256:" in ref

    # and a cluster admin can apply it as it is (server-side dry run on a real API server)
    try:
        client.CoreV1Api(kube).create_namespace(client.V1Namespace(
            metadata=client.V1ObjectMeta(name="mpc")))
    except client.ApiException as e:
        if e.status != 409:
            raise
    a = subprocess.run([KUBECTL, "--kubeconfig", str(cluster.kubeconfig), "apply",
                        "--server-side", "--dry-run=server", "-f", str(out / "install.yaml")],
                       capture_output=True, text=True, timeout=120)
    assert a.returncode == 0, a.stderr
    assert "deployment.apps/mpc-glue serverside-applied" in a.stdout, a.stdout
