"""buildah-remote: workspace copy throughput and remote build overhead (prints figures).

Copy: 200 MB (random bytes: compression cannot help) as 10,000 files of 20 kB and
as one file, rsync'd to a test host exactly as the generated wrapper does it (its
rsync and ssh options, before and since issue 13's compression), against `ssh host
'cat > file'` of the same bytes right before, and once more unchanged (the delta
transfer into the copy the layer cache keeps). Build: the reference
Task's build step run by the wrapper on an SSH host versus the same build
with host "localhost" (in the pod). Figures are printed, never asserted.
"""
from __future__ import annotations

import os
import subprocess
import time
import uuid

import pytest
import yaml

from mpc.generator import buildah_remote as br
from tests.generator.conftest import STEP_IMAGE
from tests.generator.podsim import Pod
from tests.generator.test_buildah_remote_run import CONTAINERFILE, REMOTE_TASK

pytestmark = pytest.mark.bench
MB = 1 << 20
TOTAL = 200 * MB
SMALL = 20_000


def ssh_opts(bh) -> list[str]:
    # the wrapper's options (minus the control socket: one transfer per connection here)
    return ["-F", "/dev/null", "-i", str(bh.key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "LogLevel=ERROR", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={bh.host.known_hosts_file}"]


def timed(argv, **kw) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, **kw)
    return time.perf_counter() - t


def test_workspace_copy_throughput(build_host, tmp_path):
    bh = build_host
    target = f"{bh.user}@{bh.host.address}"
    many, one = tmp_path / "many", tmp_path / "one"
    many.mkdir()
    one.mkdir()
    n = TOTAL // SMALL
    for i in range(n):
        sub = many / f"d{i // 500:03d}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i:05d}.txt").write_bytes(os.urandom(SMALL))
    (one / "big.bin").write_bytes(os.urandom(TOTAL))
    concat = tmp_path / "concat.bin"
    with open(concat, "wb") as f:
        for p in sorted(many.rglob("*.txt")):
            f.write(p.read_bytes())
    rsh = " ".join(["ssh", *ssh_opts(bh)])
    print()
    mbps = lambda t: TOTAL / MB / t  # noqa: E731
    for label, src, stream in (("10,000 x 20 kB", many, concat), ("1 x 200 MB", one, one / "big.bin")):
        # before: whole files, no compression; now: the wrapper's options, into an empty
        # directory (no cache), each right after an ssh cat of the same bytes (the machine's
        # load changes by the second), twice; then unchanged into the last copy (the layer
        # cache's basis)
        for name, opts in (("before (--whole-file)", OLD_RSYNC_OPTS), ("now", br.RSYNC_OPTS)) * 2:
            with open(stream, "rb") as f:
                t_cat = timed(["ssh", *ssh_opts(bh), target, "cat > cat.bin"], stdin=f)
            bh.host.ssh("rm -rf ws", user=bh.user, key=bh.key)
            t_rsync, sent = rsync_stats(opts, rsh, src, target)
            size = int(bh.host.ssh("du -sb ws | cut -f1", user=bh.user, key=bh.key).stdout)
            assert size >= TOTAL                       # everything arrived
            print(f"workspace copy {label}, rsync {name}: {mbps(t_rsync):.0f} MB/s "
                  f"({sent / MB:.1f} MB sent), ssh cat {mbps(t_cat):.0f} MB/s, "
                  f"ratio rsync/cat throughput {t_cat / t_rsync:.2f}")
        t_again, sent = rsync_stats(br.RSYNC_OPTS, rsh, src, target)
        print(f"workspace copy {label}, rsync now, unchanged into the last copy: {t_again:.2f} s, "
              f"{sent / 1024:.0f} kB sent")
        bh.host.ssh("rm -f cat.bin", user=bh.user, key=bh.key)


# the wrapper's rsync options before the layer cache (issue 13)
OLD_RSYNC_OPTS = ("-rlpt", "--whole-file", "--timeout=300")


def rsync_stats(opts, rsh, src, target) -> tuple[float, int]:
    """(seconds, bytes rsync sent) of one copy of ``src`` to ``target``:ws/, as to_host does."""
    t = time.perf_counter()
    out = subprocess.run(["rsync", *opts, "--delete", "--stats", "-s", "-e", rsh, f"{src}/",
                          f"{target}:ws/"], check=True, capture_output=True, text=True).stdout
    took = time.perf_counter() - t
    sent = next(int(ln.split(":")[1].split()[0].replace(",", ""))
                for ln in out.splitlines() if ln.startswith("Total bytes sent"))
    return took, sent


def test_remote_build_overhead_vs_local(build_host, pod_rootfs, registry, tmp_path):
    task = yaml.safe_load(REMOTE_TASK.read_text())
    times = {}
    for mode in ("local", "remote"):
        secret = tmp_path / f"secret-{mode}"
        if mode == "remote":
            build_host.secret(secret)
        else:
            secret.mkdir()
            (secret / "host").write_text("localhost")
        pod = Pod(rootfs=pod_rootfs, dir=tmp_path / f"pod-{mode}", task=task,
                  sources={br.SSH_VOLUME: secret},
                  params={"IMAGE": f"{registry.address}/bench/{mode}:1", "TLSVERIFY": "false",
                          "BUILDER_IMAGE": STEP_IMAGE, "PLATFORM": "linux/amd64",
                          "BUILD_ARGS": ["GREETING=bench"]})
        (pod.ws_dirs["source"] / "Containerfile").write_text(CONTAINERFILE)
        (pod.ws_dirs["source"] / "hello.txt").write_text(uuid.uuid4().hex * 1000)
        # a 20 MB context file the build does not copy: it travels but is not built
        (pod.ws_dirs["source"] / "vendor.bin").write_bytes(os.urandom(20 * MB))
        t = time.perf_counter()
        r = pod.run("build")
        times[mode] = time.perf_counter() - t
        assert r.returncode == 0, r.stderr[-3000:]
    print(f"\nbuild step, same build: local (host localhost) {times['local']:.2f} s, "
          f"remote over SSH {times['remote']:.2f} s, overhead {times['remote'] - times['local']:.2f} s"
          f" ({times['remote'] / times['local']:.1f}x)")
