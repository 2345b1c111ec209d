"""Read what tkn pushed straight from the registry's HTTP API (no product code)."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import urllib.error
import urllib.request

ACCEPT = ("application/vnd.docker.distribution.manifest.v2+json, "
          "application/vnd.oci.image.manifest.v1+json")


def get(url: str, accept: str | None = None) -> bytes:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def parse(ref: str) -> tuple[str, str, str]:
    """host:port/repo:tag@sha256:x -> (host:port, repo, digest-or-tag)."""
    host, rest = ref.split("/", 1)
    if "@" in rest:
        name, digest = rest.split("@", 1)
        return host, name.rsplit(":", 1)[0], digest
    name, tag = rest.rsplit(":", 1)
    return host, name, tag


def manifest(ref: str) -> tuple[dict, bytes]:
    host, repo, ident = parse(ref)
    raw = get(f"http://{host}/v2/{repo}/manifests/{ident}", ACCEPT)
    if ident.startswith("sha256:"):
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == ident
    return json.loads(raw), raw


def blob(ref: str, digest: str) -> bytes:
    host, repo, _ = parse(ref)
    data = get(f"http://{host}/v2/{repo}/blobs/{digest}")
    assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
    return data


def single_entry(layer: bytes) -> tuple[tarfile.TarInfo, bytes]:
    assert layer[:2] == b"\x1f\x8b", "layer is not gzip"
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer)), mode="r:") as tf:
        members = tf.getmembers()
        assert len(members) == 1, [m.name for m in members]
        m = members[0]
        assert m.isfile()
        return m, tf.extractfile(m).read()


def catalog(address: str) -> set[str]:
    return set(json.loads(get(f"http://{address}/v2/_catalog")).get("repositories") or [])


def exists(ref: str) -> bool:
    try:
        manifest(ref)
        return True
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return False
        raise
