"""The registry fixture is real: a blob pushed over the distribution API comes back."""
from __future__ import annotations

import hashlib
import json
import urllib.request


def test_push_and_pull_blob(registry):
    data = b"hello from mpc\n"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    start = urllib.request.urlopen(urllib.request.Request(
        f"{registry.url}/v2/smoke/blobs/uploads/", method="POST"))
    assert start.status == 202
    loc = start.headers["Location"]
    if loc.startswith("/"):
        loc = registry.url + loc
    sep = "&" if "?" in loc else "?"
    put = urllib.request.urlopen(urllib.request.Request(
        f"{loc}{sep}digest={digest}", data=data, method="PUT",
        headers={"Content-Type": "application/octet-stream"}))
    assert put.status == 201
    assert urllib.request.urlopen(f"{registry.url}/v2/smoke/blobs/{digest}").read() == data
    cat = json.load(urllib.request.urlopen(f"{registry.url}/v2/_catalog"))
    assert "smoke" in cat["repositories"]
