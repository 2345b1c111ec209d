"""buildah-remote with and without the namespace's layer cache (issue 13; prints figures).

The same build, provisioned and deprovisioned by mpc on one SSH host, twice in a
namespace the pool's layerCache does not list and three times in one it lists: the
first build, the second with the context unchanged, and (cached only) a third with
one source file changed. For each: the build step's wall time, whether its RUN step
ran (the image's /stamp), and the bytes that crossed the host's network interface
each way (pod to host: the inputs; host to pod: results and the image). Nothing is
asserted about time.
"""
from __future__ import annotations

import time
import uuid

import pytest
from kubernetes import client

from tests.generator.podsim import Pod
from tests.generator.test_buildah_remote_run import pulled
from tests.provisioning.test_layer_cache import PLATFORM, Builds

pytestmark = pytest.mark.bench
KB, MB = 1 << 10, 1 << 20
# a source tree copied into the image, then a "compile" over it: CPU-bound (gzip -9 of
# the sources and of 96 MB of random bytes), a small layer
CONTAINERFILE = """\
FROM scratch
COPY busybox /bin/busybox
COPY src /src
RUN ["/bin/busybox", "sh", "-c", "cd /src && /bin/busybox find . -type f -exec /bin/busybox cat {} + | /bin/busybox gzip -9 > /src.gz && /bin/busybox dd if=/dev/urandom bs=1M count=96 2>/dev/null | /bin/busybox gzip -9 | /bin/busybox md5sum > /blob.md5 && /bin/busybox date +%s%N > /stamp"]
"""
FILES = 2000


def source_tree(pod: Pod, changed: str = "") -> None:
    """2,000 text files (~20 MB, compressible like source code); ``changed`` alters one."""
    src = pod.ws_dirs["source"] / "src"
    for i in range(FILES):
        f = src / f"m{i // 100:02d}" / f"f{i:04d}.c"
        if f.exists() and not (changed and i == 7):
            continue
        f.parent.mkdir(parents=True, exist_ok=True)
        body = "".join(f"int fn_{i}_{j}(int x) {{ return x * {j} + {i}; }} /* {changed} */\n"
                       for j in range(180))
        f.write_text(body)


def net_bytes(h) -> tuple[int, int]:
    """(received, sent) bytes of the host's interfaces but loopback."""
    out = h.exec("for d in /sys/class/net/*; do [ \"${d##*/}\" = lo ] || "
                 "echo \"$(cat $d/statistics/rx_bytes) $(cat $d/statistics/tx_bytes)\"; done").stdout
    rx = tx = 0
    for line in out.split("\n"):
        if line.strip():
            a, b = line.split()
            rx, tx = rx + int(a), tx + int(b)
    return rx, tx


class Timed(Builds):
    """Builds whose pod keeps its workspace between builds (the same source checkout)."""

    def build_in(self, pod_dir, secret: dict, changed: str = "") -> dict:
        pod, image, name = self.pod(secret, pod_dir, repo="bench", containerfile=CONTAINERFILE)
        source_tree(pod, changed)
        rx0, tx0 = net_bytes(self.h)
        t = time.perf_counter()
        r = pod.run("build")
        took = time.perf_counter() - t
        rx1, tx1 = net_bytes(self.h)
        assert r.returncode == 0, r.stderr[-4000:]
        assert pod.run("push").returncode == 0
        _, files = pulled(self.registry, image, self.tmp / f"pulled-{name}")
        return {"s": took, "to_host": rx1 - rx0, "from_host": tx1 - tx0,
                "stamp": files["stamp"], "cached": (r.stdout + r.stderr).count("Using cache")}


def test_second_build_with_and_without_layer_cache(controller, kube, namespace, make_host,
                                                   host_farm, registry, tmp_path):
    ns_cold = f"t-{uuid.uuid4().hex[:10]}"
    core = client.CoreV1Api(kube)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns_cold)))
    try:
        h = make_host()
        host_farm._extract()
        controller.install_pool([h], platform=PLATFORM, concurrency=2,
                                layerCache={"namespaces": [namespace]})
        b = Timed(controller, kube, h, registry, host_farm.base, tmp_path)
        rows = []
        for ns, label, runs in ((ns_cold, "no cache", ("first", "unchanged")),
                                (namespace, "layer cache", ("first", "unchanged", "one file changed"))):
            pod_dir = tmp_path / f"pod-{ns}"      # the same checkout, build after build
            first = None
            for run in runs:
                tr, secret = b.provision(ns)
                fig = b.build_in(pod_dir, secret, changed="v2" if run == "one file changed" else "")
                controller.deprovision(tr)
                first = first or fig
                fig["rerun"] = "no" if fig["stamp"] == first["stamp"] and fig is not first else "yes"
                rows.append((label, run, fig))
        print()
        for label, run, f in rows:
            print(f"{label:12s} {run:17s}: build step {f['s']:6.1f} s, RUN step ran: {f['rerun']:3s}"
                  f" ('Using cache' x{f['cached']}), pod->host {f['to_host'] / MB:6.2f} MB, "
                  f"host->pod {f['from_host'] / MB:6.2f} MB")
        cold = {run: f for label, run, f in rows if label == "no cache"}
        warm = {run: f for label, run, f in rows if label == "layer cache"}
        print(f"second build, unchanged context: {warm['unchanged']['s']:.1f} s with the cache vs "
              f"{cold['unchanged']['s']:.1f} s without ({cold['unchanged']['s'] / warm['unchanged']['s']:.2f}x); "
              f"pod->host {warm['unchanged']['to_host'] / KB:.0f} kB vs "
              f"{cold['unchanged']['to_host'] / KB:.0f} kB")
    finally:
        core.delete_namespace(ns_cold)
