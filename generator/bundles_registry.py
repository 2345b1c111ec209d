"""An embedded registry for ``make run`` and a reader for what tkn pushed.

The registry is Debian's ``docker-registry`` (the CNCF distribution
registry) serving on loopback from a temporary directory; it lives exactly as
long as the ``with`` block. The reader speaks the distribution HTTP API
(plain http: only loopback registries are read back here).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

MANIFEST_TYPES = ", ".join((
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
))


class LocalRegistry:
    """``with LocalRegistry() as reg: reg.address`` -> ``127.0.0.1:<port>``."""

    def __init__(self, binary: str = "docker-registry"):
        self.binary = binary
        self.address = ""
        self._dir: Path | None = None
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "LocalRegistry":
        exe = shutil.which(self.binary)
        if not exe:
            raise RuntimeError(
                f"`{self.binary}` not found: install Debian's docker-registry package "
                "(`make deps`), or pass REGISTRY=<host/path> to push to an existing registry")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        self._dir = Path(tempfile.mkdtemp(prefix="mpc-registry-"))
        cfg = self._dir / "config.yml"
        cfg.write_text(json.dumps({     # JSON is YAML
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self._dir / "data")}},
            "http": {"addr": self.address},
        }))
        log = open(self._dir / "registry.log", "ab")
        self._proc = subprocess.Popen([exe, "serve", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=1) as r:
                    if r.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                tail = (self._dir / "registry.log").read_text(errors="replace")[-2000:]
                self.__exit__(None, None, None)
                raise RuntimeError(f"local registry did not start on {self.address}:\n{tail}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self._proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self._proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


@dataclass
class Layer:
    digest: str
    media_type: str
    annotations: dict
    entry_name: str
    entry_mode: int
    content: bytes


def _get(url: str, accept: str | None = None) -> tuple[bytes, dict]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read(), dict(r.headers)


def split_ref(ref: str) -> tuple[str, str, str]:
    """``host:port/repo[:tag][@digest]`` -> (host:port, repo, tag-or-digest)."""
    host, rest = ref.split("/", 1)
    if "@" in rest:
        repo, ident = rest.split("@", 1)
        repo = repo.rsplit(":", 1)[0] if ":" in repo.rsplit("/", 1)[-1] else repo
    elif ":" in rest.rsplit("/", 1)[-1]:
        repo, ident = rest.rsplit(":", 1)
    else:
        repo, ident = rest, "latest"
    return host, repo, ident


def read_manifest(ref: str) -> tuple[dict, str]:
    host, repo, ident = split_ref(ref)
    body, headers = _get(f"http://{host}/v2/{repo}/manifests/{ident}", MANIFEST_TYPES)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    return json.loads(body), digest


def read_layers(ref: str) -> tuple[dict, list[Layer]]:
    """The manifest and each layer's single tar entry, digests checked."""
    host, repo, _ = split_ref(ref)
    manifest, _ = read_manifest(ref)
    layers = []
    for d in manifest["layers"]:
        blob, _ = _get(f"http://{host}/v2/{repo}/blobs/{d['digest']}")
        if "sha256:" + hashlib.sha256(blob).hexdigest() != d["digest"]:
            raise ValueError(f"{ref}: layer {d['digest']} does not match its digest")
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tf:
            members = tf.getmembers()
            if len(members) != 1 or not members[0].isfile():
                raise ValueError(f"{ref}: layer {d['digest']} holds {len(members)} entries, expected 1 file")
            m = members[0]
            layers.append(Layer(d["digest"], d["mediaType"], d.get("annotations", {}),
                                m.name, m.mode, tf.extractfile(m).read()))
    return manifest, layers


def repositories(address: str) -> list[str]:
    body, _ = _get(f"http://{address}/v2/_catalog")
    return json.loads(body).get("repositories") or []
