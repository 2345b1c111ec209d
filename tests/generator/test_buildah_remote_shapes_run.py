"""Converted Konflux-shaped and catalog-style Tasks, run for real: the pod side in podsim,
the build on an SSH test host (issue 13: $(params.IMAGE), proxies, /workspace, one image copy)."""
from __future__ import annotations

import json
import os
import subprocess
import uuid

import yaml

from mpc.generator import buildah_remote as br

from .conftest import STEP_IMAGE
from .podsim import Pod
from .test_buildah_remote_run import CONTAINERFILE, pulled
from .test_buildah_remote_shapes import CATALOG_STYLE, KONFLUX

PLACEHOLDER_IMAGES = ("registry.example.com/konflux/buildah-task:1.0@sha256:"
                      "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                      "registry.example.com/konflux/sbom-tool:1.0")


def converted(text: str) -> dict:
    for placeholder in PLACEHOLDER_IMAGES:
        text = text.replace(placeholder, STEP_IMAGE)
    return yaml.safe_load(br.generate(text).text)


def pod_for(tmp_path, pod_rootfs, task, secret, name="pod", **params) -> Pod:
    return Pod(rootfs=pod_rootfs, dir=tmp_path / name, task=task, params=params,
               sources={br.SSH_VOLUME: secret})


def test_catalog_style_params_image_builds_remotely_and_pushes_per_platform(
        build_host, pod_rootfs, registry, tmp_path):
    task = yaml.safe_load(br.generate(CATALOG_STYLE).text)
    image = f"{registry.address}/mpc-test/catalog:v1"
    marker = uuid.uuid4().hex
    pod = pod_for(tmp_path, pod_rootfs, task, build_host.secret(tmp_path / "secret"),
                  IMAGE=image, TLSVERIFY="false", BUILDER_IMAGE=STEP_IMAGE,
                  PLATFORM="linux/amd64", IMAGE_APPEND_PLATFORM="true", BUILD_ARGS=["GREETING=hi"])
    (pod.ws_dirs["source"] / "Containerfile").write_text(CONTAINERFILE)
    (pod.ws_dirs["source"] / "hello.txt").write_text(marker)
    build = pod.run("build")
    assert build.returncode == 0, build.stderr[-4000:]
    tagged = f"{image}-linux-amd64"
    assert f"loaded {tagged}" in build.stderr
    push = pod.run("push")
    assert push.returncode == 0, push.stderr[-4000:]
    assert pod.result("IMAGE_URL") == tagged
    _, files = pulled(registry, tagged, tmp_path / "pulled")
    assert files["hello.txt"] == marker.encode()


PROXY_TASK = """\
apiVersion: tekton.dev/v1
kind: Task
metadata:
  name: proxy-probe
spec:
  params:
    - name: BUILDAH_HTTP_PROXY
    - name: HTTP_PROXY
    - name: HTTPS_PROXY
    - name: http_proxy
  workspaces:
    - name: out
  steps:
    - name: build
      image: %s
      env:
        - name: BUILDAH_HTTP_PROXY
          value: $(params.BUILDAH_HTTP_PROXY)
        - name: BUILDAH_NO_PROXY
          value: registry.internal,.corp.test
        - name: HTTP_PROXY
          value: $(params.HTTP_PROXY)
        - name: HTTPS_PROXY
          value: $(params.HTTPS_PROXY)
        - name: http_proxy
          value: $(params.http_proxy)
        - name: NO_PROXY
          value: localhost,.svc
        - name: OUT
          value: $(workspaces.out.path)
      script: |
        #!/bin/bash
        set -euo pipefail
        env | grep -i proxy | sort > "$OUT/proxy-env"
""" % STEP_IMAGE


def proxy_env(pod: Pod) -> dict[str, str]:
    lines = (pod.ws_dirs["out"] / "proxy-env").read_text().splitlines()
    return dict(ln.split("=", 1) for ln in lines)


def test_proxies_only_the_cluster_resolves_stay_in_the_pod(build_host, pod_rootfs, tmp_path):
    bh = build_host
    # a proxy name the build host's own resolver knows
    bh.host.exec("echo '10.99.0.1 proxy.corp.test' >> /etc/hosts")
    task = yaml.safe_load(br.generate(PROXY_TASK).text)
    secret = bh.secret(tmp_path / "secret")

    pod = pod_for(tmp_path, pod_rootfs, task, secret, "pod1", PLATFORM="linux/amd64",
                  BUILDAH_HTTP_PROXY="http://proxy.infra.svc.cluster.local:3128",
                  HTTP_PROXY="http://10.20.30.40:3128",
                  HTTPS_PROXY="http://user:pw@proxy.corp.test:8080/",
                  http_proxy="http://squid:3128")
    r = pod.run("build")
    assert r.returncode == 0, r.stderr[-4000:]
    env = proxy_env(pod)
    # forwarded: an IP address, a name the host resolves, and the NO_PROXY of those
    assert env["HTTP_PROXY"] == "http://10.20.30.40:3128"
    assert env["HTTPS_PROXY"] == "http://user:pw@proxy.corp.test:8080/"
    assert env["NO_PROXY"] == "localhost,.svc"
    # dropped: a Service name (with its NO_PROXY) and a bare name the host cannot resolve
    assert "BUILDAH_HTTP_PROXY" not in env and "BUILDAH_NO_PROXY" not in env
    assert "http_proxy" not in env
    assert ("mpc: not passing BUILDAH_HTTP_PROXY to the build host: "
            "proxy.infra.svc.cluster.local is a name inside the cluster") in r.stderr
    assert "mpc: not passing BUILDAH_NO_PROXY to the build host" in r.stderr
    assert ("mpc: not passing http_proxy to the build host: "
            "the build host cannot resolve squid") in r.stderr

    # every standard proxy dropped: their NO_PROXY stays in the pod too
    pod = pod_for(tmp_path, pod_rootfs, task, secret, "pod2", PLATFORM="linux/amd64",
                  BUILDAH_HTTP_PROXY="", HTTP_PROXY="http://user:pw@proxy.ns.svc:3128/",
                  HTTPS_PROXY="http://proxy.nowhere.invalid:3128", http_proxy="")
    r = pod.run("build")
    assert r.returncode == 0, r.stderr[-4000:]
    env = proxy_env(pod)
    assert not {"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"} & set(env), env
    assert env["BUILDAH_NO_PROXY"] == "registry.internal,.corp.test"   # no proxy of its own dropped
    assert "the build host cannot resolve proxy.nowhere.invalid" in r.stderr
    assert "mpc: not passing NO_PROXY to the build host" in r.stderr


def test_tekton_default_workspace_dir_comes_back(build_host, pod_rootfs, registry, tmp_path):
    task = converted(KONFLUX["buildah-0.1-shape"])
    image = f"{registry.address}/mpc-test/konflux01:v1"
    marker = uuid.uuid4().hex
    pod = pod_for(tmp_path, pod_rootfs, task, build_host.secret(tmp_path / "secret"),
                  IMAGE=image, TLSVERIFY="false", PLATFORM="linux/amd64")
    (pod.ws_dirs["source"] / "Containerfile").write_text(CONTAINERFILE)
    (pod.ws_dirs["source"] / "hello.txt").write_text(marker)
    build = pod.run("build")
    assert build.returncode == 0, build.stderr[-4000:]
    # what the build step wrote to /workspace (Tekton's, not a declared workspace) is in the pod
    written = pod.dir / "upper/workspace"
    container = (written / "container_name").read_text().strip()
    assert container and (written / "image_id").read_text().strip()
    # the declared workspace mounted inside /workspace was copied once, on its own
    assert sorted(p.name for p in pod.ws_dirs["source"].iterdir()) == ["Containerfile", "hello.txt"]
    push = pod.run("push")
    assert push.returncode == 0, push.stderr[-4000:]
    assert f"the build made container {container}" in push.stdout
    assert pod.result("IMAGE_DIGEST").startswith("sha256:")
    _, files = pulled(registry, image, tmp_path / "pulled")
    assert files["hello.txt"] == marker.encode()


def tx_bytes(host) -> int:
    out = subprocess.run(["ip", "-n", host.netns, "-s", "-j", "link", "show", "eth0"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)[0]["stats64"]["tx"]["bytes"]


def test_image_saved_as_oci_layout_by_the_build_crosses_the_network_once(
        build_host, pod_rootfs, registry, tmp_path):
    task = converted(KONFLUX["buildah-0.4-shape"])
    image = f"{registry.address}/mpc-test/konflux04:v1"
    size = 16 << 20
    pod = pod_for(tmp_path, pod_rootfs, task, build_host.secret(tmp_path / "secret"),
                  IMAGE=image, TLSVERIFY="false", PLATFORM="linux/amd64")
    (pod.ws_dirs["source"] / "Containerfile").write_text("FROM scratch\nCOPY big.bin /big.bin\n")
    big = os.urandom(size)                      # incompressible: the layer is about this size
    (pod.ws_dirs["source"] / "big.bin").write_bytes(big)

    before = tx_bytes(build_host.host)
    build = pod.run("build")
    sent = tx_bytes(build_host.host) - before
    assert build.returncode == 0, build.stderr[-4000:]
    # the host sent the image once (the layout in /shared), not a second time as an archive
    assert size < sent < 1.5 * size, sent
    assert f"loaded {image}" in build.stderr and "from the OCI layout /shared/final-image" in build.stderr
    push = pod.run("push")
    assert push.returncode == 0, push.stderr[-4000:]
    sbom = pod.run("sbom-layout")
    assert sbom.returncode == 0, sbom.stderr[-4000:]
    _, files = pulled(registry, image, tmp_path / "pulled")
    assert files["big.bin"] == big
