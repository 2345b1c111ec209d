"""A real single-node Kubernetes (v1.32.4) with real Tekton (v1.0.0), in its own namespaces.

Layout of one instance ``NAME`` (``$MPC_CACHE/e2e/NAME``, kept between runs so
a second ``up`` is warm: PKI, etcd data with Tekton installed, containerd's
imported images):

- a holder process (``sleep``) owns network namespace ``mpce2e-NAME`` (also
  named via ``ip netns``) and a private mount namespace with tmpfs over /run,
  /var/lib and /var/log; every daemon is started inside both with
  ``nsenter -t HOLDER -m -n``. Nothing touches this machine's own network:
  the node IP 10.200.0.1 sits on a veth pair whose two ends are both inside;
  the CNI bridge (10.244.0.0/24, no masquerade) and kube-proxy's rules live
  only there.
- etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd
  (runc, ``restrict_oom_score_adj``), kubelet (cgroupfs, ``failCgroupV1:
  false``, ``cgroupRoot: /mpc-e2e-NAME`` so all pod cgroups sit under one
  root of our own), kube-proxy, a registry (0.0.0.0:5000 in the netns), and
  Tekton's controller, webhook and resolvers as host processes with their
  release ServiceAccounts' tokens. The webhook is reached through a
  selector-less Service + Endpoints on the node IP (apiserver
  ``--enable-aggregator-routing``), so admission really runs.
- ``fwd.py`` relays 127.0.0.1:<port> on this machine to the apiserver and
  the registry inside, so tests use a plain kubeconfig.
- the kubelet sets global sysctls; the values before the first live
  instance are saved in /run/mpc-e2e and restored when the last one stops.

``python -m tests.e2e.node up|down [--wipe]|status|env`` is what
``make e2e-up`` / ``make e2e-down`` run (instance ``dev`` unless
``MPC_E2E_NAME`` is set).
"""
from __future__ import annotations

import argparse
import base64
import fcntl
import hashlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import yaml

from tests.infra import paths
from tests.infra.controlplane import write_kubeconfig
from tests.infra.pki import PKI
from tests.infra.procs import alive, free_port, wait_for

from . import hostcheck, images
from .fwd import setns_net

NODE_IP = "10.200.0.1"
NODE_NAME = "e2e-node"
POD_CIDR = "10.244.0.0/24"
SERVICE_CIDR = "10.96.0.0/16"
REGISTRY_PORT = 5000
REGISTRY = f"{NODE_IP}:{REGISTRY_PORT}"    # how pods and Tekton's resolvers name the registry
TEKTON_NS = "tekton-pipelines"
RESOLVERS_NS = "tekton-pipelines-resolvers"
# Tekton's feature flags as a cluster admin installing mpc sets them: Tekton's own init
# containers get a restricted securityContext, so namespace mpc can enforce "restricted"
FEATURE_FLAGS = {"set-security-context": "true"}
GLOBAL = Path("/run/mpc-e2e")               # cross-instance bookkeeping (sysctls)
CGROUP_FS = Path("/sys/fs/cgroup")
INSTALL_MARKER = "mpc-e2e-installed"

# (name, stop grace seconds); stopped in this order
STOP_ORDER = [("fwd", 2), ("tekton-resolvers", 5), ("tekton-controller", 5),
              ("tekton-webhook", 5), ("kube-proxy", 5), ("kubelet", 10)]
STOP_AFTER_CONTAINERS = [("containerd", 10), ("registry", 3), ("kube-scheduler", 5),
                         ("kube-controller-manager", 5), ("kube-apiserver", 10), ("etcd", 5)]


def state_root() -> Path:
    return paths.cache_dir() / "e2e"


@contextmanager
def _global_lock() -> Iterator[None]:
    GLOBAL.mkdir(parents=True, exist_ok=True)
    with open(GLOBAL / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _live_instances() -> dict[str, int]:
    out = {}
    d = GLOBAL / "instances"
    if d.is_dir():
        for f in d.iterdir():
            try:
                pid = int(f.read_text())
            except (OSError, ValueError):
                pid = 0
            if pid and alive(pid):
                out[f.name] = pid
            else:
                f.unlink(missing_ok=True)
    return out


def other_instances_live(me: str) -> bool:
    with _global_lock():
        return any(n != me for n in _live_instances())


@dataclass
class Node:
    name: str = "dev"
    dir: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.dir = Path(self.dir or state_root() / self.name)
        self.netns = f"mpce2e-{self.name}"[:60]
        self.cgroup_root = f"mpc-e2e-{self.name}"
        self.logs = self.dir / "logs"
        self.pids = self.dir / "pids"
        self.pki = PKI(self.dir / "pki")
        self.kubeconfig = self.dir / "admin.kubeconfig"   # on this machine, through fwd
        for bad in ("/run", "/var/lib", "/var/log"):   # tmpfs-shadowed inside the holder
            if str(self.dir).startswith(bad + "/"):
                raise ValueError(f"e2e state dir {self.dir} must not be under {bad}")

    # --- state -----------------------------------------------------------------------
    @property
    def _state_file(self) -> Path:
        return self.dir / "state.json"

    def state(self) -> dict:
        try:
            return json.loads(self._state_file.read_text())
        except (OSError, ValueError):
            return {}

    def _save_state(self, **kw) -> None:
        s = self.state()
        s.update(kw)
        self._state_file.write_text(json.dumps(s, indent=1))

    def _pid(self, name: str) -> int:
        try:
            return int((self.pids / name).read_text())
        except (OSError, ValueError):
            return 0

    @property
    def holder_pid(self) -> int:
        """PID of the process owning the node's network + mount namespaces (0 when down)."""
        p = self._pid("holder")
        return p if p and alive(p) else 0

    def running(self) -> bool:
        return bool(self.holder_pid)

    @property
    def api_port(self) -> int:
        return self.state()["api_port"]

    @property
    def registry_host(self) -> str:
        """The node's registry as reachable from this machine (loopback, forwarded)."""
        return f"127.0.0.1:{self.state()['registry_port']}"

    registry_cluster = REGISTRY   # as named by pods, the kubelet and Tekton's resolvers

    def nsx(self) -> list[str]:
        """argv prefix: run a command inside the node's network + mount namespaces.

        The working directory is the holder's (the state dir, as seen inside): a
        ``--wd=PATH`` would be opened in this machine's mount namespace and be
        unreachable inside (getcwd fails with ENOENT).
        """
        return ["nsenter", "-t", str(self.holder_pid), "-m", "-n", "--wd"]

    def exec(self, argv: Sequence[str], check: bool = True, timeout: float = 120,
             **kw) -> subprocess.CompletedProcess:
        return subprocess.run([*self.nsx(), *argv], check=check, capture_output=True, text=True,
                              timeout=timeout, **kw)

    def inside(self, fn: Callable[[], object]) -> object:
        """Call ``fn`` in a thread that joined the node's network namespace."""
        box: dict = {}

        def target() -> None:
            try:
                setns_net(self.holder_pid)
                box["v"] = fn()
            except BaseException as e:  # noqa: BLE001
                box["e"] = e
        t = threading.Thread(target=target, daemon=True)
        t.start()
        t.join()
        if "e" in box:
            raise box["e"]
        return box.get("v")

    def http_inside(self, url: str, timeout: float = 2) -> str:
        def get() -> str:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return urllib.request.urlopen(url, timeout=timeout, context=ctx).read().decode()
        return self.inside(get)  # type: ignore[return-value]

    def api_client(self):
        from kubernetes import config
        return config.new_client_from_config(str(self.kubeconfig))

    # --- daemons ---------------------------------------------------------------------
    def _start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None,
               inside: bool = True) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as out:
            full = [*self.nsx(), *argv] if inside else list(argv)
            p = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env={**os.environ, **(env or {})}, start_new_session=True,
                                 cwd=self.dir)
        (self.pids / name).write_text(str(p.pid))
        self._procs[name] = p
        return p

    def _check_alive(self, *names: str) -> None:
        for n in names:
            if not alive(self._pid(n)):
                tail = (self.logs / f"{n}.log").read_text(errors="replace").splitlines()[-25:]
                raise RuntimeError(f"{n} died:\n" + "\n".join(tail))

    def _wait(self, what: str, check: Callable[[], bool], timeout: float, daemon: str) -> None:
        """Poll ``check`` until true; fail at once with the log tail if ``daemon`` died."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(daemon)
            try:
                if check():
                    return
            except Exception:  # noqa: BLE001 - not ready yet
                pass
            if time.monotonic() >= deadline:
                tail = (self.logs / f"{daemon}.log").read_text(errors="replace").splitlines()[-25:]
                raise TimeoutError(f"{what} not ready after {timeout:.0f}s\n" + "\n".join(tail))
            time.sleep(0.1)

    def _stop(self, names: Sequence[tuple[str, float]]) -> None:
        """TERM all, TERM again at half the grace (the apiserver may ignore the first), then KILL."""
        pending = {}
        for n, grace in names:
            pid = self._pid(n)
            if pid and alive(pid):
                try:
                    os.killpg(pid, signal.SIGTERM)
                except ProcessLookupError:
                    os.kill(pid, signal.SIGTERM)
                pending[pid] = (n, time.monotonic() + grace)
            (self.pids / n).unlink(missing_ok=True)
        second = set()
        while pending:
            self._reap()
            now = time.monotonic()
            for pid, (n, end) in list(pending.items()):
                if not alive(pid):
                    del pending[pid]
                elif now >= end:
                    _killpg(pid, signal.SIGKILL)
                    del pending[pid]
                elif now >= end - (dict(names)[n] / 2) and pid not in second:
                    second.add(pid)
                    _killpg(pid, signal.SIGTERM)
            time.sleep(0.05)
        self._reap()

    def _reap(self) -> None:
        for n, p in list(self._procs.items()):
            if p.poll() is not None:
                del self._procs[n]

    # --- up --------------------------------------------------------------------------
    def up(self) -> dict[str, float]:
        if self.running():
            raise RuntimeError(f"e2e node {self.name} is already up (holder {self.holder_pid})")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pids.mkdir(exist_ok=True)
        self.timings = {}
        t0 = time.monotonic()

        def phase(name: str) -> None:
            self.timings[name] = round(time.monotonic() - t0, 2)

        try:
            self._save_state(host_before=hostcheck.HostState.capture(
                kubelet_sysctls=not other_instances_live(self.name), own=self.name).sections,
                warm=(self.dir / "etcd").exists())
            if not self.pki.ca_crt.exists():
                self._make_pki()
            phase("pki")
            self._netns_up()
            phase("netns")
            self._forwarder_up()
            self._control_plane_up()
            phase("control-plane")
            self._containerd_up()
            phase("containerd")
            self._images_up()
            phase("images")
            self._registry_up()
            phase("registry")
            self._kubelet_up()
            phase("node-ready")
            self._kube_proxy_up()
            phase("kube-proxy")
            self._tekton_install()
            phase("tekton-config")
            self._tekton_up()
            phase("tekton-ready")
        except BaseException:
            self.down()
            raise
        self.timings["total"] = round(time.monotonic() - t0, 2)
        self._save_state(timings=self.timings)
        return self.timings

    def _make_pki(self) -> None:
        self.pki.create(["127.0.0.1", NODE_IP, "10.96.0.1"],
                        ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                         "kubernetes.default.svc.cluster.local"])
        for n, cn, org in (("admin", "mpc-e2e-admin", "system:masters"),
                           ("kcm", "system:kube-controller-manager", None),
                           ("sched", "system:kube-scheduler", None),
                           ("kubelet", f"system:node:{NODE_NAME}", "system:nodes"),
                           ("kube-proxy", "system:kube-proxy", None),
                           ("apiserver-kubelet-client", "kube-apiserver-kubelet-client",
                            "system:masters")):
            crt, key = self.pki.client(n, cn, org)
            if n != "apiserver-kubelet-client":
                self._cert_kubeconfig(self.pki.dir / f"{n}.kubeconfig", crt, key, 6443)

    def _cert_kubeconfig(self, path: Path, crt: Path, key: Path, port: int) -> Path:
        return write_kubeconfig(path, f"https://127.0.0.1:{port}", self.pki.ca_crt.read_bytes(), {
            "client-certificate-data": base64.b64encode(crt.read_bytes()).decode(),
            "client-key-data": base64.b64encode(key.read_bytes()).decode()})

    def _netns_up(self) -> None:
        def ip(*a: str) -> None:
            subprocess.run(["ip", *a], check=True, capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)  # stale
        ip("netns", "add", self.netns)
        n = ("-n", self.netns)
        ip(*n, "link", "set", "lo", "up")
        # no CONFIG_DUMMY here: both ends of a veth stay inside, the node IP on one of them
        ip(*n, "link", "add", "knode0", "type", "veth", "peer", "name", "knode1")
        ip(*n, "link", "set", "knode1", "up")
        ip(*n, "addr", "add", f"{NODE_IP}/24", "dev", "knode0")
        ip(*n, "link", "set", "knode0", "up")
        ip(*n, "route", "add", "default", "dev", "knode0")  # kubelet wants a default route
        with _global_lock():
            live = _live_instances()
            if not live and not (GLOBAL / "sysctls.json").exists():
                (GLOBAL / "sysctls.json").write_text(json.dumps(
                    {k: hostcheck.sysctl(k) for k in hostcheck.KUBELET_SYSCTLS}))
            inner = ("for d in /run /var/lib /var/log; do mount -t tmpfs -o mode=755 tmpfs $d; done;"
                     " mount --make-rshared /; exec sleep infinity")
            p = self._start("holder", ["nsenter", f"--net=/run/netns/{self.netns}", "unshare",
                                       "--mount", "--propagation", "private", "sh", "-c", inner],
                            inside=False)
            wait_for("holder", lambda: os.readlink(f"/proc/{p.pid}/exe").endswith("/sleep"),
                     timeout=10, interval=0.02)
            (GLOBAL / "instances").mkdir(exist_ok=True)
            (GLOBAL / "instances" / self.name).write_text(str(p.pid))
        self._save_state(holder=p.pid, netns=self.netns)
        # one cgroup root of our own in every hierarchy (kubelet cgroupRoot)
        for h in CGROUP_FS.iterdir():
            if h.is_dir() and not h.is_symlink() and (h / "cgroup.procs").exists():
                d = h / self.cgroup_root
                d.mkdir(exist_ok=True)
                if (h / "cpuset.cpus").exists():
                    for f in ("cpuset.cpus", "cpuset.mems"):
                        if not (d / f).read_text().strip():
                            (d / f).write_text((h / f).read_text())

    def _forwarder_up(self) -> None:
        api, reg = free_port(), free_port()
        self._start("fwd", [sys.executable, "-m", "tests.e2e.fwd", str(self.holder_pid),
                            f"{api}:127.0.0.1:6443", f"{reg}:127.0.0.1:{REGISTRY_PORT}"],
                    env={"PYTHONPATH": str(paths.REPO)}, inside=False)
        self._save_state(api_port=api, registry_port=reg)
        crt, key = self.pki.dir / "admin.crt", self.pki.dir / "admin.key"
        self._cert_kubeconfig(self.kubeconfig, crt, key, api)
        self._wait("forwarder", lambda: b"forwarding" in (self.logs / "fwd.log").read_bytes(),
                   10, "fwd")

    def _control_plane_up(self) -> None:
        d = self.pki.dir
        self._start("etcd", [
            "etcd", "--name", "e2e", "--data-dir", str(self.dir / "etcd"), "--logger=zap",
            "--log-outputs=stderr", "--log-level=warn",
            "--listen-client-urls", "http://127.0.0.1:2379",
            "--advertise-client-urls", "http://127.0.0.1:2379",
            "--listen-peer-urls", "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
            "--initial-cluster", "e2e=http://127.0.0.1:2380",
            "--heartbeat-interval", "10", "--election-timeout", "100"])
        self._wait("etcd", lambda: '"health":"true"' in self.http_inside(
            "http://127.0.0.1:2379/health"), 60, "etcd")
        self._start("kube-apiserver", [
            paths.tool("kube-apiserver"), "--etcd-servers=http://127.0.0.1:2379",
            "--bind-address=0.0.0.0", "--secure-port=6443", f"--advertise-address={NODE_IP}",
            f"--tls-cert-file={d / 'apiserver.crt'}", f"--tls-private-key-file={d / 'apiserver.key'}",
            f"--client-ca-file={d / 'ca.crt'}",
            f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--authorization-mode=Node,RBAC", f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            f"--kubelet-client-certificate={d / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={d / 'apiserver-kubelet-client.key'}",
            "--kubelet-preferred-address-types=InternalIP",
            "--enable-aggregator-routing=true",    # dial webhook Endpoints IPs directly
            f"--cert-dir={self.dir / 'apiserver-certs'}", "--profiling=false", "--v=1"])
        self._wait("kube-apiserver /readyz", lambda: self.http_inside(
            "https://127.0.0.1:6443/readyz") == "ok", 180, "kube-apiserver")
        common = ["--bind-address=127.0.0.1", "--leader-elect=false", "--v=1"]
        kcm = str(d / "kcm.kubeconfig")
        self._start("kube-controller-manager", [
            paths.tool("kube-controller-manager"), f"--kubeconfig={kcm}",
            f"--authentication-kubeconfig={kcm}", f"--authorization-kubeconfig={kcm}",
            "--secure-port=10257", f"--service-account-private-key-file={d / 'sa.key'}",
            f"--root-ca-file={d / 'ca.crt'}", "--use-service-account-credentials=true",
            f"--cluster-signing-cert-file={d / 'ca.crt'}", f"--cluster-signing-key-file={d / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--controllers=*,-nodeipam",
            f"--cert-dir={self.dir / 'kcm-certs'}", *common])
        sched = str(d / "sched.kubeconfig")
        self._start("kube-scheduler", [
            paths.tool("kube-scheduler"), f"--kubeconfig={sched}",
            f"--authentication-kubeconfig={sched}", f"--authorization-kubeconfig={sched}",
            "--secure-port=10259", f"--cert-dir={self.dir / 'sched-certs'}", *common])
        self._wait("kcm healthz", lambda: self.http_inside("https://127.0.0.1:10257/healthz") == "ok",
                   120, "kube-controller-manager")
        self._wait("scheduler healthz", lambda: self.http_inside(
            "https://127.0.0.1:10259/healthz") == "ok", 120, "kube-scheduler")
        from kubernetes import client
        core = client.CoreV1Api(self.api_client())
        self._wait("default ServiceAccount", lambda: core.read_namespaced_service_account(
            "default", "default") is not None, 120, "kube-controller-manager")

    def _containerd_up(self) -> None:
        c = self.dir / "containerd"
        for stale in (c / "state", self.dir / "cni" / "ipam", self.dir / "runc"):
            shutil.rmtree(stale, ignore_errors=True)   # nothing of it survived the last down
        (self.dir / "cni" / "net.d").mkdir(parents=True, exist_ok=True)
        (self.dir / "cni" / "net.d" / "10-e2e-bridge.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "e2e", "plugins": [{
                "type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
                "hairpinMode": True, "ipam": {
                    "type": "host-local", "dataDir": str(self.dir / "cni" / "ipam"),
                    "ranges": [[{"subnet": POD_CIDR}]], "routes": [{"dst": "0.0.0.0/0"}]}}]},
            indent=1))
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        (c).mkdir(exist_ok=True)
        (c / "config.toml").write_text(f"""\
version = 2
root = "{c / 'root'}"
state = "{c / 'state'}"
oom_score = 0
[grpc]
  address = "{self.containerd_sock}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{c / 'opt'}"
[{cri}]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  sandbox_image = "{images.PAUSE.ref}"
  # no CAP_SYS_RESOURCE here: clamp the kubelet's negative oom_score_adj to our own (0)
  restrict_oom_score_adj = true
  enable_selinux = false
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "/usr/sbin/runc"
        Root = "{self.dir / 'runc'}"
  [{cri}.cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{self.dir / 'cni' / 'net.d'}"
    max_conf_num = 1
  [{cri}.registry.mirrors."{REGISTRY}"]
    endpoint = ["http://{REGISTRY}"]
""")
        self._start("containerd", ["containerd", "--config", str(c / "config.toml")])
        self._wait("containerd", lambda: self.exec(
            ["ctr", "--address", str(self.containerd_sock), "version"], check=False).returncode == 0,
            60, "containerd")

    @property
    def containerd_sock(self) -> Path:
        return self.dir / "containerd" / "containerd.sock"

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.exec(["ctr", "--address", str(self.containerd_sock), "-n", "k8s.io", *args],
                         check=check)

    def import_image(self, archive: Path) -> None:
        """Import an oci-archive (ref name from its annotation) into the node's containerd."""
        self.ctr("images", "import", str(archive))

    def ensure_image(self, spec: images.ImageSpec) -> str:
        """Build (cached) and import ``spec`` unless containerd has this very build; its ref."""
        key = spec.key()
        if spec.ref in set(self.ctr("images", "ls", "-q").stdout.split()) \
                and self.state().get("images", {}).get(spec.ref) == key:
            return spec.ref
        try:
            self.import_image(images.build(spec, self.nsx(), self.dir))
        finally:
            shutil.rmtree(self.dir / "buildah", ignore_errors=True)
        s = self.state().get("images", {})
        s[spec.ref] = key
        self._save_state(images=s)
        return spec.ref

    def _images_up(self) -> None:
        for spec in images.NODE_IMAGES:
            self.ensure_image(spec)

    def _registry_up(self) -> None:
        r = self.dir / "registry"
        r.mkdir(exist_ok=True)
        (r / "config.yml").write_text(yaml.safe_dump({
            "version": 0.1, "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(r / "data")}, "delete": {"enabled": True}},
            "http": {"addr": f"0.0.0.0:{REGISTRY_PORT}"}}))
        self._start("registry", ["docker-registry", "serve", str(r / "config.yml")])
        self._wait("registry", lambda: self.http_inside(f"http://{REGISTRY}/v2/") is not None,
                   30, "registry")

    def _kubelet_up(self) -> None:
        k = self.dir / "kubelet"
        k.mkdir(exist_ok=True)
        cfg = k / "config.yaml"
        cfg.write_text(yaml.safe_dump({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{self.cgroup_root}",
            "failSwapOn": False, "failCgroupV1": False,   # this VM is hybrid cgroup v1
            "oomScoreAdj": 0,                             # -999 needs CAP_SYS_RESOURCE
            "containerRuntimeEndpoint": f"unix://{self.containerd_sock}",
            "podLogsDir": str(self.dir / "pod-logs"),
            "address": NODE_IP, "port": 10250, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": 10248,
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.pki.ca_crt)}},
            "authorization": {"mode": "Webhook"},
            "clusterDomain": "cluster.local", "resolvConf": "/etc/resolv.conf",
            "protectKernelDefaults": False, "serializeImagePulls": False,
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "cgroupsPerQOS": True, "enforceNodeAllocatable": ["pods"], "staticPodPath": "",
            "syncFrequency": "10s", "nodeStatusUpdateFrequency": "5s",
        }))
        since = time.time() - 1
        self._start("kubelet", [
            paths.tool("kubelet"), f"--config={cfg}",
            f"--kubeconfig={self.pki.dir / 'kubelet.kubeconfig'}", f"--root-dir={k / 'root'}",
            f"--cert-dir={k / 'pki'}", f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}",
            "--v=1"])
        from kubernetes import client
        core = client.CoreV1Api(self.api_client())

        def ready() -> bool:   # a warm start finds the old Node still Ready: want a fresh heartbeat
            for c in core.read_node(NODE_NAME).status.conditions or []:
                if c.type == "Ready":
                    return c.status == "True" and c.last_heartbeat_time.timestamp() >= since
            return False
        self._wait("node Ready", ready, 240, "kubelet")

    def _kube_proxy_up(self) -> None:
        cfg = self.dir / "kube-proxy.yaml"
        cfg.write_text(yaml.safe_dump({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.pki.dir / "kube-proxy.kubeconfig")},
            "mode": "iptables", "clusterCIDR": POD_CIDR, "hostnameOverride": NODE_NAME,
            "bindAddress": "0.0.0.0", "healthzBindAddress": "127.0.0.1:10256",
            "metricsBindAddress": "127.0.0.1:10249", "oomScoreAdj": 0,
            # 0 = leave the kernel's conntrack sysctls alone (nf_conntrack_max is global)
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                          "tcpCloseWaitTimeout": "0s"},
            "iptables": {"localhostNodePorts": False}, "nodePortAddresses": ["primary"]}))
        self._start("kube-proxy", [paths.tool("kube-proxy"), f"--config={cfg}", "--v=1"])
        self._wait("kube-proxy rules for kubernetes.default", lambda: "10.96.0.1" in self.exec(
            ["iptables", "-t", "nat", "-S", "KUBE-SERVICES"], check=False).stdout, 120, "kube-proxy")

    # --- Tekton ----------------------------------------------------------------------
    def _tekton_install(self) -> None:
        from kubernetes import client, dynamic
        api = self.api_client()
        core = client.CoreV1Api(api)
        cfg = paths.tekton_config()
        skip = {"controller.yaml", "webhook.yaml", "webhook-hpa.yaml", "events.yaml",
                "resolvers-deployment.yaml"}   # Deployments: these run as host processes
        files = sorted(p for p in cfg.rglob("*.yaml") if p.name not in skip)
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in files)
                                + repr(FEATURE_FLAGS).encode()).hexdigest()[:16]
        try:
            marker = core.read_namespaced_config_map(INSTALL_MARKER, TEKTON_NS)
            if (marker.data or {}).get("config") == digest:
                return                               # warm: this release config is in etcd
            core.delete_namespaced_config_map(INSTALL_MARKER, TEKTON_NS)
        except client.ApiException as e:
            if e.status != 404:
                raise
        # Re-install over an older install: the admission webhooks the last webhook process
        # filled in would now be called with no webhook running (failurePolicy: Fail) and
        # reject our ConfigMaps; drop them, 500-webhooks.yaml brings them back empty.
        adm = client.AdmissionregistrationV1Api(api)
        for delete in (adm.delete_validating_webhook_configuration,
                       adm.delete_mutating_webhook_configuration):
            for n in ("validation.webhook.pipeline.tekton.dev", "webhook.pipeline.tekton.dev",
                      "config.webhook.pipeline.tekton.dev"):
                try:
                    delete(n)
                except client.ApiException as e:
                    if e.status != 404:
                        raise
        dyn = dynamic.DynamicClient(api)
        docs = [d for f in files for d in yaml.safe_load_all(f.read_text()) if d]
        docs.sort(key=lambda d: (d["kind"] != "Namespace", d["kind"] != "CustomResourceDefinition"))
        webhook_svc = [{
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "tekton-pipelines-webhook", "namespace": TEKTON_NS,
                         "labels": {"app.kubernetes.io/name": "webhook",
                                    "app.kubernetes.io/component": "webhook",
                                    "app.kubernetes.io/part-of": "tekton-pipelines"}},
            "spec": {"ports": [{"name": "https-webhook", "port": 443, "targetPort": 8443}]}}, {
            # Endpoints may not be loopback: the webhook listens on the node IP
            "apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": "tekton-pipelines-webhook", "namespace": TEKTON_NS},
            "subsets": [{"addresses": [{"ip": NODE_IP}],
                         "ports": [{"name": "https-webhook", "port": 8443}]}]}]
        for d in docs + webhook_svc:
            res = dyn.resources.get(api_version=d["apiVersion"], kind=d["kind"])
            ns = d["metadata"].get("namespace") if res.namespaced else None
            for attempt in range(40):   # a CRD's resources appear in discovery a moment later
                try:
                    res.server_side_apply(body=d, name=d["metadata"]["name"], namespace=ns,
                                          field_manager="mpc-e2e", force_conflicts=True)
                    break
                except client.ApiException as e:
                    if e.status not in (404, 409, 500, 503) or attempt == 39:
                        raise
                    time.sleep(0.25)
        # the bundles resolver (and its feature flag) must be on for `resolver: bundles`
        core.patch_namespaced_config_map("resolvers-feature-flags", RESOLVERS_NS,
                                         {"data": {"enable-bundles-resolver": "true"}})
        core.patch_namespaced_config_map("feature-flags", TEKTON_NS, {"data": FEATURE_FLAGS})
        ext = client.ApiextensionsV1Api(api)

        def established() -> bool:
            return all(any(c.type == "Established" and c.status == "True"
                           for c in (crd.status.conditions or []))
                       for crd in ext.list_custom_resource_definition().items)
        wait_for("Tekton CRDs Established", established, timeout=60)
        core.create_namespaced_config_map(TEKTON_NS, client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=INSTALL_MARKER), data={"config": digest}))

    def _sa_kubeconfig(self, ns: str, sa: str) -> Path:
        from kubernetes import client
        core = client.CoreV1Api(self.api_client())
        tok = core.create_namespaced_service_account_token(sa, ns, client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=48 * 3600))).status.token
        return write_kubeconfig(self.pki.dir / f"{sa}.kubeconfig", "https://127.0.0.1:6443",
                                self.pki.ca_crt.read_bytes(), {"token": tok})

    def serviceaccount_kubeconfig(self, namespace: str, name: str,
                                  expiration: int = 3600) -> Path:
        """A kubeconfig for this machine (through fwd) authenticating as a ServiceAccount,
        like ``tests.infra.controlplane.Cluster.serviceaccount_kubeconfig``."""
        from kubernetes import client
        core = client.CoreV1Api(self.api_client())
        tok = core.create_namespaced_service_account_token(name, namespace, client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration))).status.token
        return write_kubeconfig(self.dir / f"sa-{namespace}-{name}.kubeconfig",
                                f"https://127.0.0.1:{self.api_port}", self.pki.ca_crt.read_bytes(),
                                {"token": tok})

    def _tekton_up(self) -> None:
        from kubernetes import client, dynamic
        api = self.api_client()
        coord = client.CoordinationV1Api(api)
        for ns in (TEKTON_NS, RESOLVERS_NS):   # a dead instance's leases would block for ~60 s
            coord.delete_collection_namespaced_lease(ns)
        t = paths.tekton_bin()
        common = {"KUBERNETES_MIN_VERSION": "v1.28.0", "CONFIG_LOGGING_NAME": "config-logging",
                  "CONFIG_OBSERVABILITY_NAME": "config-observability",
                  "CONFIG_FEATURE_FLAGS_NAME": "feature-flags"}
        self._start("tekton-webhook", [str(t / "webhook"), "-disable-ha"], env={
            **common, "SYSTEM_NAMESPACE": TEKTON_NS, "METRICS_DOMAIN": "tekton.dev/pipeline",
            "KUBECONFIG": str(self._sa_kubeconfig(TEKTON_NS, "tekton-pipelines-webhook")),
            "CONFIG_LEADERELECTION_NAME": "config-leader-election-webhook",
            "WEBHOOK_ADMISSION_CONTROLLER_NAME": "webhook.pipeline.tekton.dev",
            "WEBHOOK_SERVICE_NAME": "tekton-pipelines-webhook", "WEBHOOK_SECRET_NAME": "webhook-certs",
            "WEBHOOK_PORT": "8443", "PROBES_PORT": "8081", "METRICS_PROMETHEUS_PORT": "9091",
            "PROFILING_PORT": "8009"})
        img = images.TEKTON
        self._start("tekton-controller", [
            str(t / "controller"), "-disable-ha",
            "-entrypoint-image", img["entrypoint"].ref, "-nop-image", img["nop"].ref,
            "-sidecarlogresults-image", img["sidecarlogresults"].ref,
            "-workingdirinit-image", img["workingdirinit"].ref,
            "-shell-image", images.SHELL.ref, "-shell-image-win", images.SHELL.ref], env={
            **common, "SYSTEM_NAMESPACE": TEKTON_NS, "METRICS_DOMAIN": "tekton.dev/pipeline",
            "KUBECONFIG": str(self._sa_kubeconfig(TEKTON_NS, "tekton-pipelines-controller")),
            "CONFIG_DEFAULTS_NAME": "config-defaults",
            "CONFIG_LEADERELECTION_NAME": "config-leader-election-controller",
            "CONFIG_SPIRE": "config-spire", "PROBES_PORT": "8083", "METRICS_PROMETHEUS_PORT": "9090",
            "PROFILING_PORT": "8008"})
        self._start("tekton-resolvers", [str(t / "resolvers")], env={
            **common, "SYSTEM_NAMESPACE": RESOLVERS_NS, "METRICS_DOMAIN": "tekton.dev/resolution",
            "KUBECONFIG": str(self._sa_kubeconfig(RESOLVERS_NS, "tekton-pipelines-resolvers")),
            "CONFIG_LEADERELECTION_NAME": "config-leader-election-resolvers",
            # knative's sharedmain hardcodes the resolvers' probe port to 8080
            "METRICS_PROMETHEUS_PORT": "9092", "PROFILING_PORT": "8010",
            "ARTIFACT_HUB_API": "https://artifacthub.io/",
            "TEKTON_HUB_API": "https://api.hub.tekton.dev/"})
        # knative's sharedmain also serves probes on a hardcoded :8080 in each of the three
        # processes; one wins, the others log a bind error at exit and run on. So: the
        # webhook's and controller's own probe ports, and the resolvers' bundles lease.
        for name, port in (("tekton-webhook", 8081), ("tekton-controller", 8083)):
            self._wait(f"{name} readiness", lambda p=port: self.http_inside(
                f"http://127.0.0.1:{p}/readiness") is not None, 120, name)
        self._wait("bundles resolver leading", lambda: bool(coord.read_namespaced_lease(
            "controller.tektonresolverframework.bundleresolver.00-of-01", RESOLVERS_NS
        ).spec.holder_identity), 120, "tekton-resolvers")
        # ready = the apiserver really calls the webhook: a dry-run Task passes admission
        dyn = dynamic.DynamicClient(api)
        tasks = dyn.resources.get(api_version="tekton.dev/v1", kind="Task")
        probe = {"apiVersion": "tekton.dev/v1", "kind": "Task",
                 "metadata": {"name": "mpc-e2e-probe", "namespace": "default"},
                 "spec": {"steps": [{"name": "s", "image": images.BUSYBOX.ref, "script": "true"}]}}
        self._wait("Tekton admission webhook", lambda: tasks.create(
            body=probe, namespace="default", query_params=[("dryRun", "All")]) is not None,
            120, "tekton-webhook")

    # --- down ------------------------------------------------------------------------
    def down(self, wipe: bool = False) -> float:
        """Stop everything (idempotent); ``wipe`` also deletes the state dir. Returns seconds."""
        t0 = time.monotonic()
        self.pids.mkdir(parents=True, exist_ok=True)
        self._stop(STOP_ORDER)
        holder = self.holder_pid
        if holder and alive(self._pid("containerd")):
            ctr = ["ctr", "--address", str(self.containerd_sock), "-n", "k8s.io"]
            ls = lambda *a: self.exec([*ctr, *a, "ls", "-q"], check=False).stdout.split()  # noqa: E731
            tasks = ls("tasks")
            for tid in tasks:
                self.exec([*ctr, "tasks", "kill", "-s", "SIGKILL", tid], check=False)
            for tid in tasks:
                self.exec([*ctr, "tasks", "delete", "-f", tid], check=False)
            for cid in ls("containers"):
                self.exec([*ctr, "containers", "delete", cid], check=False)
        self._stop(STOP_AFTER_CONTAINERS)
        # whatever is left in our cgroups (containers) or our mount namespace (shims) is ours
        for _ in range(50):
            left = set(self._cgroup_pids())
            if holder:
                try:
                    mns = os.readlink(f"/proc/{holder}/ns/mnt")
                    left |= {p for p in _all_pids() if p != holder and _mntns(p) == mns}
                except OSError:
                    pass
            left = {p for p in left if alive(p)}
            if not left:
                break
            for p in left:
                _kill(p, signal.SIGKILL)
            time.sleep(0.1)
        self._stop([("holder", 2)])
        with _global_lock():
            (GLOBAL / "instances" / self.name).unlink(missing_ok=True)
            if not _live_instances() and (GLOBAL / "sysctls.json").exists():
                for k, v in json.loads((GLOBAL / "sysctls.json").read_text()).items():
                    if hostcheck.sysctl(k) != v:
                        Path("/proc/sys", *k.split(".")).write_text(v)
                (GLOBAL / "sysctls.json").unlink()
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        netns_dir = Path("/run/netns")
        if netns_dir.exists() and not any(netns_dir.iterdir()):
            subprocess.run(["umount", str(netns_dir)], capture_output=True)
        for h in CGROUP_FS.iterdir():
            root = h / self.cgroup_root
            if root.is_dir():
                for d in sorted((p for p in root.rglob("*") if p.is_dir()),
                                key=lambda p: -len(p.parts)):
                    _rmdir(d)
                _rmdir(root)
        self._reap()
        if wipe:
            shutil.rmtree(self.dir, ignore_errors=True)
        return round(time.monotonic() - t0, 2)

    def _cgroup_pids(self) -> list[int]:
        out = []
        for h in ("pids", "memory", "freezer", "cpu"):
            root = CGROUP_FS / h / self.cgroup_root
            if root.is_dir():
                for f in root.rglob("cgroup.procs"):
                    try:
                        out += [int(x) for x in f.read_text().split()]
                    except OSError:
                        pass
        return out

    def leftovers(self) -> list[str]:
        """What of this node still exists on the machine (empty after a clean down)."""
        out = []
        for n in [n for n, _ in STOP_ORDER + STOP_AFTER_CONTAINERS] + ["holder"]:
            if alive(self._pid(n)):
                out.append(f"process {n} pid {self._pid(n)}")
        d = str(self.dir) + "/"
        for p in _all_pids():
            try:
                cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if (d in cmd or self.netns in cmd) and alive(p):
                out.append(f"process {p}: {cmd[:120]}")
        if self._cgroup_pids():
            out.append(f"processes in cgroups: {self._cgroup_pids()}")
        out += [f"cgroup {h / self.cgroup_root}" for h in CGROUP_FS.iterdir()
                if (h / self.cgroup_root).exists()]
        if Path(f"/run/netns/{self.netns}").exists():
            out.append(f"netns {self.netns}")
        for line in Path("/proc/self/mounts").read_text().splitlines():
            if f" {self.dir}" in line or self.netns in line:
                out.append(f"mount {line}")
        return out

    def host_changes(self) -> str:
        """Diff of this machine's state now vs. before the last ``up`` (empty = unchanged)."""
        before = self.state().get("host_before")
        if not before:
            return ""
        return hostcheck.HostState(before).diff(hostcheck.HostState.capture(
            kubelet_sysctls=not other_instances_live(self.name), own=self.name))


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        _kill(pid, sig)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _rmdir(d: Path) -> None:
    for _ in range(20):
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    d.rmdir()


def _all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _mntns(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.e2e.node")
    ap.add_argument("command", choices=["up", "down", "status", "env"])
    ap.add_argument("--wipe", action="store_true", help="down: also delete the state dir")
    ap.add_argument("--name", default=os.environ.get("MPC_E2E_NAME", "dev"))
    a = ap.parse_args(argv)
    node = Node(a.name)
    if a.command == "up":
        print(f"e2e node {node.name}: {'warm' if (node.dir / 'etcd').exists() else 'cold'} start "
              f"in {node.dir}", flush=True)
        t = node.up()
        for k, v in t.items():
            print(f"  {k:<14} {v:7.2f} s since start")
        print(f"up. export KUBECONFIG={node.kubeconfig}  # registry: {node.registry_host} "
              f"(pods: {REGISTRY}); netns {node.netns}, holder pid {node.holder_pid}")
    elif a.command == "down":
        secs = node.down(wipe=a.wipe)
        left = node.leftovers()
        changes = node.host_changes()
        print(f"down in {secs:.2f} s" + (" (state wiped)" if a.wipe else ""))
        if left:
            print("LEFT BEHIND:\n  " + "\n  ".join(left))
        print("machine state: " + ("unchanged" if not changes else "CHANGED\n" + changes))
        return 1 if left or changes else 0
    elif a.command == "status":
        print(json.dumps({"running": node.running(), "holder": node.holder_pid,
                          "netns": node.netns, "dir": str(node.dir), **{
                              k: v for k, v in node.state().items() if k != "host_before"}}, indent=1))
    else:
        print(f"export KUBECONFIG={node.kubeconfig}\nexport MPC_E2E_REGISTRY={node.registry_host}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
