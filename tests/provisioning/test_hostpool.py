"""The host pool schema, the Konflux conversion and `mpc hostpool validate`."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mpc.runner import hostpool

GOOD = {"hosts": [{"name": "arm1", "address": "arm1.example.com", "user": "ec2-user",
                   "secret": "arm-key", "platform": "linux/arm64", "concurrency": 4,
                   "hostKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHkey", "port": 2222,
                   "sudoCommands": ["/usr/bin/podman"], "limits": {"nproc": 4096}}],
        "localPlatforms": ["linux/amd64"], "allowedNamespaces": ["team-a"]}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpc.generator.cli", *args],
                          capture_output=True, text=True)


def test_good_pool_parses():
    pool = hostpool.from_document(GOOD)
    (h,) = pool.hosts
    assert h.known_hosts_line == "[arm1.example.com]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHkey"
    assert pool.platforms == ["linux/amd64", "linux/arm64"]
    assert pool.namespace_allowed("team-a") and not pool.namespace_allowed("team-b")
    assert pool.max_wait_seconds == 3600


def test_every_error_is_reported_with_its_path():
    bad = {"hosts": [
        {"name": "ok", "address": "10.0.0.1", "user": "root", "secret": "s",
         "platform": "linux/arm64", "concurrency": 1},
        {"name": "ok", "address": "bad address!", "user": "root", "secret": "s",
         "platform": "arm64", "concurrency": 0, "sudoCommands": ["rm -rf /; x"], "extra": 1}],
        "localPlatforms": ["linux/arm64"]}
    errors = hostpool.validate(bad)
    joined = "\n".join(errors)
    for path in ("$.hosts[1].address", "$.hosts[1].platform", "$.hosts[1].concurrency",
                 "$.hosts[1].sudoCommands[0]", "$.hosts[1]: Additional properties"):
        assert path in joined, joined
    # consistency checks run once the schema passes
    bad["hosts"][1] = dict(bad["hosts"][0])
    joined = "\n".join(hostpool.validate(bad))
    assert "duplicate host name 'ok'" in joined and "also a local platform" in joined


def test_konflux_flat_keys_convert():
    data = {"host.arm1.address": "10.0.0.5", "host.arm1.user": "ec2-user",
            "host.arm1.platform": "linux/arm64", "host.arm1.secret": "awskeys",
            "host.arm1.concurrency": "4", "local-platforms": "linux/x86_64,linux/amd64",
            "allowed-namespaces": "a,b"}
    pool = hostpool.from_configmap_data("host-config", data)
    assert pool.hosts[0].name == "arm1" and pool.hosts[0].concurrency == 4
    assert pool.local_platforms == ("linux/x86_64", "linux/amd64")
    assert pool.allowed_namespaces == ("a", "b")
    with pytest.raises(hostpool.PoolError) as e:
        hostpool.from_configmap_data("host-config", {"host.arm1.concurrency": "four",
                                                     "dynamic-platforms": "linux/arm64"})
    text = str(e.value)
    assert "host.arm1.concurrency: 'four' is not an integer" in text
    assert "dynamic" in text


def test_validate_cli(tmp_path: Path):
    good = tmp_path / "pool.yaml"
    good.write_text(yaml.safe_dump(GOOD))
    r = cli("hostpool", "validate", str(good))
    assert r.returncode == 0 and "valid: 1 hosts, 4 slots" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"hosts": [{"name": "x", "concurrency": -1}]}))
    r = cli("hostpool", "validate", str(bad))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) >= 5          # every missing field and the bad value, one line each
    assert all(str(bad) in ln and "$.hosts[0]" in ln for ln in lines)
    cm = tmp_path / "cm.yaml"
    cm.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap",
                                  "metadata": {"name": "host-config"},
                                  "data": {"host.a.address": "1.2.3.4"}}))
    r = cli("hostpool", "validate", str(cm))
    assert r.returncode == 1 and "$.hosts[0]: 'user' is a required property" in r.stderr
    assert cli("hostpool", "validate", "--help").returncode == 0
