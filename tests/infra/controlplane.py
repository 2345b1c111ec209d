"""A real Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager.

Everything listens on loopback ports chosen at start. Authentication is real
(client certificates for the admin and controllers, ServiceAccount tokens
through the TokenRequest API) and authorization is RBAC, so a test can act as
a ServiceAccount and see exactly what the RBAC of a task or the watcher
allows. The Tekton CRDs come from the pinned Tekton module (``make upstream``).

If ``MPC_TEST_KUBECONFIG`` is set, ``ExternalCluster`` uses that cluster
instead (e.g. a kind cluster made by pytest-kind on a machine with Docker).
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from kubernetes import client, config

from . import paths
from .pki import PKI
from .procs import Daemon, free_port, wait_for

TEKTON_CRDS = ("300-task.yaml", "300-taskrun.yaml", "300-pipeline.yaml",
               "300-pipelinerun.yaml", "300-stepaction.yaml", "300-customrun.yaml",
               "300-resolutionrequest.yaml", "300-verificationpolicy.yaml")


def write_kubeconfig(path: Path, server: str, ca: bytes, user: dict) -> Path:
    doc = {
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {
            "server": server, "certificate-authority-data": base64.b64encode(ca).decode()}}],
        "users": [{"name": "test", "user": user}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
    }
    path.write_text(yaml.safe_dump(doc))
    path.chmod(0o600)
    return path


class Cluster:
    """What tests need from any cluster: an admin kubeconfig and SA kubeconfigs."""

    kubeconfig: Path
    workdir: Path

    def api_client(self, kubeconfig: Path | None = None) -> client.ApiClient:
        if kubeconfig is None:
            return config.new_client_from_config_dict(self.admin_config())
        return config.new_client_from_config(str(kubeconfig), persist_config=False)

    def admin_config(self) -> dict:
        """The admin kubeconfig, read once; re-written (and reported) if the file vanished."""
        cached = getattr(self, "_admin_config", None)
        if cached is None:
            cached = self._admin_config = yaml.safe_load(self.kubeconfig.read_text())
        elif not self.kubeconfig.exists() or not self.kubeconfig.read_text().strip():
            print(f"mpc tests: {self.kubeconfig} vanished; re-writing it", file=sys.stderr)
            self.kubeconfig.parent.mkdir(parents=True, exist_ok=True)
            self.kubeconfig.write_text(yaml.safe_dump(cached))
        return cached

    def serviceaccount_kubeconfig(self, namespace: str, name: str,
                                  expiration: int = 3600) -> Path:
        """A kubeconfig that authenticates as a ServiceAccount with a TokenRequest token."""
        api = client.CoreV1Api(self.api_client())
        req = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration))
        tok = api.create_namespaced_service_account_token(name, namespace, req).status.token
        cl = self.admin_config()["clusters"][0]["cluster"]
        ca = base64.b64decode(cl["certificate-authority-data"]) if "certificate-authority-data" in cl \
            else Path(cl["certificate-authority"]).read_bytes()
        out = self.workdir / f"sa-{namespace}-{name}.kubeconfig"
        return write_kubeconfig(out, cl["server"], ca, {"token": tok})

    def install_tekton_crds(self) -> None:
        ext = client.ApiextensionsV1Api(self.api_client())
        names = []
        for f in TEKTON_CRDS:
            crd = yaml.safe_load((paths.tekton_config() / "300-crds" / f).read_text())
            names.append(crd["metadata"]["name"])
            try:
                ext.create_custom_resource_definition(crd)
            except client.ApiException as e:
                if e.status != 409:
                    raise

        def established() -> bool:
            for n in names:
                conds = ext.read_custom_resource_definition(n).status.conditions or []
                if not any(c.type == "Established" and c.status == "True" for c in conds):
                    return False
            return True
        wait_for("Tekton CRDs Established", established, timeout=60)

        # Discovery of the new group can lag behind Established for a moment.
        custom = client.CustomObjectsApi(self.api_client())
        wait_for("tekton.dev served", lambda: custom.list_cluster_custom_object(
            "tekton.dev", "v1", "tasks", limit=1) is not None, timeout=30)

    def stop(self) -> None:  # pragma: no cover - overridden
        pass


@dataclass
class ExternalCluster(Cluster):
    """A cluster someone else runs (MPC_TEST_KUBECONFIG)."""

    kubeconfig: Path
    workdir: Path

    def compact_etcd(self) -> None:
        raise RuntimeError("cannot compact etcd of an external cluster")


@dataclass
class ControlPlane(Cluster):
    """etcd + kube-apiserver + kube-controller-manager on loopback."""

    workdir: Path
    host: str = "127.0.0.1"
    daemons: list[Daemon] = field(default_factory=list)
    etcd_url: str = ""
    server: str = ""
    kubeconfig: Path = Path()

    def start(self) -> "ControlPlane":
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        logs = self.workdir / "logs"
        pki = PKI(self.workdir / "pki").create([self.host], ["localhost", "kubernetes",
                                                            "kubernetes.default.svc"])
        try:
            self._start_etcd(logs)
            self._start_apiserver(pki, logs)
            self._start_controller_manager(pki, logs)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _start_etcd(self, logs: Path) -> None:
        cport, pport = free_port(), free_port()
        self.etcd_url = f"http://{self.host}:{cport}"
        peer = f"http://{self.host}:{pport}"
        d = Daemon("etcd", [
            "etcd", "--name", "test", "--data-dir", str(self.workdir / "etcd"),
            "--logger=zap", "--log-outputs=stderr", "--log-level=warn",
            "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"test={peer}",
            "--heartbeat-interval", "10", "--election-timeout", "100",
            "--quota-backend-bytes", str(4 << 30),
        ], logs / "etcd.log").start()
        self.daemons.append(d)
        wait_for("etcd", lambda: json.load(urllib.request.urlopen(
            self.etcd_url + "/health", timeout=1))["health"] == "true",
            timeout=30, log=d.log)

    def _start_apiserver(self, pki: PKI, logs: Path) -> None:
        port = free_port()
        self.server = f"https://{self.host}:{port}"
        d = pki.dir
        argv = [
            paths.tool("kube-apiserver"),
            f"--etcd-servers={self.etcd_url}",
            f"--bind-address={self.host}", f"--secure-port={port}",
            f"--advertise-address={self.host}", "--endpoint-reconciler-type=none",
            f"--tls-cert-file={d / 'apiserver.crt'}", f"--tls-private-key-file={d / 'apiserver.key'}",
            f"--client-ca-file={pki.ca_crt}",
            f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc",
            "--api-audiences=https://kubernetes.default.svc",
            "--authorization-mode=RBAC",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--allow-privileged=true", "--profiling=false", "--v=0",
            "--enable-priority-and-fairness=false",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
        ]
        daemon = Daemon("kube-apiserver", argv, logs / "kube-apiserver.log").start()
        self.daemons.append(daemon)
        crt, key = pki.client("admin", "mpc-test-admin", "system:masters")
        self.kubeconfig = write_kubeconfig(
            self.workdir / "admin.kubeconfig", self.server, pki.ca_crt.read_bytes(),
            {"client-certificate-data": base64.b64encode(crt.read_bytes()).decode(),
             "client-key-data": base64.b64encode(key.read_bytes()).decode()})
        ctx = ssl.create_default_context(cafile=str(pki.ca_crt))
        ctx.load_cert_chain(str(crt), str(key))
        wait_for("kube-apiserver /readyz", lambda: urllib.request.urlopen(
            self.server + "/readyz", context=ctx, timeout=2).read() == b"ok",
            timeout=120, log=daemon.log)

    def _start_controller_manager(self, pki: PKI, logs: Path) -> None:
        crt, key = pki.client("kcm", "system:kube-controller-manager")
        kc = write_kubeconfig(
            self.workdir / "kcm.kubeconfig", self.server, pki.ca_crt.read_bytes(),
            {"client-certificate-data": base64.b64encode(crt.read_bytes()).decode(),
             "client-key-data": base64.b64encode(key.read_bytes()).decode()})
        port = free_port()
        argv = [
            paths.tool("kube-controller-manager"),
            f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            f"--bind-address={self.host}", f"--secure-port={port}", "--leader-elect=false",
            f"--service-account-private-key-file={pki.dir / 'sa.key'}",
            f"--root-ca-file={pki.ca_crt}", "--use-service-account-credentials=true",
            "--controllers=*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-persistentvolume-binder",
            "--concurrent-gc-syncs=5", "--v=0",
            f"--cert-dir={self.workdir / 'kcm-certs'}",
        ]
        daemon = Daemon("kube-controller-manager", argv, logs / "kcm.log").start()
        self.daemons.append(daemon)
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        wait_for("kube-controller-manager /healthz", lambda: urllib.request.urlopen(
            f"https://{self.host}:{port}/healthz", context=insecure, timeout=2).read() == b"ok",
            timeout=60, log=daemon.log)
        core = client.CoreV1Api(self.api_client())
        wait_for("default ServiceAccount (token controller running)",
                 lambda: core.read_namespaced_service_account("default", "default") is not None,
                 timeout=60, log=daemon.log)

    def compact_etcd(self) -> int:
        """Compact etcd at its current revision so older watch resourceVersions get 410 Gone."""
        status = json.loads(subprocess.run(
            ["etcdctl", f"--endpoints={self.etcd_url}", "endpoint", "status", "-w", "json"],
            check=True, capture_output=True, text=True).stdout)
        rev = status[0]["Status"]["header"]["revision"]
        subprocess.run(["etcdctl", f"--endpoints={self.etcd_url}", "compact", str(rev)],
                       check=True, capture_output=True)
        return rev

    def stop(self) -> None:
        for d in reversed(self.daemons):
            d.stop()
        self.daemons.clear()


def start_cluster(workdir: Path) -> Cluster:
    """The session cluster: MPC_TEST_KUBECONFIG if set, else a fresh local control plane."""
    ext = os.environ.get("MPC_TEST_KUBECONFIG")
    if ext:
        workdir.mkdir(parents=True, exist_ok=True)
        local = workdir / "external.kubeconfig"
        shutil.copy(ext, local)
        return ExternalCluster(kubeconfig=local, workdir=workdir)
    return ControlPlane(workdir=workdir).start()
