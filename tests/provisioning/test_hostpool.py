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
        hostpool.from_configmap_data("host-config", {"host.arm1.concurrency": "four"})
    text = str(e.value)
    assert "host.arm1.concurrency: 'four' is not an integer" in text
    assert "dynamic" not in text     # a listed platform with no keys yet is not an error here


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


# --- existing Konflux pools migrate as they are (issue 12) ---------------------------

KONFLUX_CM = Path(__file__).with_name("konflux-host-config.yaml")


def _host(name: str, platform: str, **extra) -> dict:
    return {f"host.{name}.{k}": v for k, v in {
        "address": "10.0.0.5", "user": "root", "platform": platform, "secret": "key",
        "concurrency": "2", **extra}.items()}


def test_konflux_production_configmap_parses():
    pool = hostpool.from_configmap_data(
        "host-config", yaml.safe_load(KONFLUX_CM.read_text())["data"])
    assert pool.local_platforms == ("linux/x86_64", "local", "localhost")
    assert pool.allowed_namespaces == ("default", "system-.*", "mintmaker", ".*-tenant")
    assert pool.platforms == ["linux-c6gd2xlarge/arm64", "linux-m2xlarge/arm64",
                              "linux-root/amd64", "linux/amd64", "linux/arm64", "linux/ppc64le",
                              "linux/s390x", "linux/x86_64", "local", "localhost"]
    assert [h.name for h in pool.hosts_for("linux/s390x")] == ["s390x-static-1",
                                                               "s390x-static-2"]
    (m2,) = pool.hosts_for("linux-m2xlarge/arm64")
    assert (m2.address, m2.user, m2.concurrency) == ("10.29.3.21", "ec2-user", 2)
    (root,) = pool.hosts_for("linux-root/amd64")
    assert root.sudo_commands == ("/usr/bin/podman",
                                  "/usr/bin/rm /usr/share/containers/mounts.conf")
    # allowed-namespaces entries are regular expressions over the whole name
    for ns in ("default", "system-a", "system-", "mintmaker", "team-a-tenant", "x-tenant"):
        assert pool.namespace_allowed(ns), ns
    for ns in ("kube-system-x", "my-default", "defaults", "mintmaker2", "tenant",
               "team-tenant-2", "system"):
        assert not pool.namespace_allowed(ns), ns
    # dynamic EC2 platforms are served (issue 15); IBM ones and unused keys are warnings
    assert [d.platform for d in pool.dynamic] == ["linux/arm64", "linux/amd64",
                                                  "linux-c6gd2xlarge/arm64"]
    assert pool.instance_tag == "prod-example"
    assert dict(pool.additional_instance_tags) == {"service-phase": "production",
                                                   "cost-center": "000"}
    arm = pool.dynamic_for("linux/arm64")
    assert (arm.provider, arm.secret, arm.max_instances, arm.ssh_user) == (
        "aws", "aws-ssh-key", 250, "ec2-user")
    assert (arm.aws.region, arm.aws.ami, arm.aws.instance_type, arm.aws.key_name,
            arm.aws.credentials_secret, arm.aws.security_group_id, arm.aws.subnet) == (
        "us-east-1", "ami-0123456789abcdef0", "m6g.large", "example-prod-key", "aws-account",
        "sg-0123456789abcdef0", "subnet-0123456789abcdef0")
    amd = pool.dynamic_for("linux/amd64")
    assert (amd.aws.spot, amd.aws.spot_max_price, amd.aws.disk_gib,
            amd.boot_timeout_seconds) == (True, "0.25", 200, 1200)
    assert amd.aws.user_data.startswith("#!/bin/bash\nmount")
    assert pool.dynamic_for("linux-c6gd2xlarge/arm64").sudo_commands == ("/usr/bin/podman",)
    assert pool.warnings == (
        "$.dynamic.linux-arm64.instance-tag: ignored: mpc tags every VM with the pool's "
        "instance-tag and its platform",
        "$.dynamic.linux-large-ppc64le.type: provider 'ibmp' is not supported yet (supported: "
        "aws); linux-large/ppc64le is not served",
        "$.dynamic.linux-large-s390x.type: provider 'ibmz' is not supported yet (supported: "
        "aws); linux-large/s390x is not served")


@pytest.mark.parametrize("value", [
    "linux/arm64,\\\n  linux/s390x,",          # literal backslash continuations
    "linux/arm64,\\\n  linux/s390x,\\\n",
    "\\\n  linux/arm64,\\\n  linux/s390x,\\\n  ",
    "linux/arm64,\\ linux/s390x,\\",            # a plain YAML scalar folds lines into spaces
    "linux/arm64, linux/s390x",
    " linux/arm64,,linux/s390x, ,",
])
def test_konflux_lists_with_continuations_and_trailing_commas(value):
    data = {**_host("a", "linux/ppc64le"), "local-platforms": value}
    assert hostpool.from_configmap_data("cm", data).local_platforms == ("linux/arm64",
                                                                       "linux/s390x")


def test_konflux_scalars_with_continuations():
    data = _host("a", "linux/ppc64le", address="\\\n  10.0.0.9\\\n", concurrency="3\\\n")
    (h,) = hostpool.from_configmap_data("cm", data).hosts
    assert (h.address, h.concurrency) == ("10.0.0.9", 3)


def test_konflux_incomplete_dynamic_platform_names_its_flat_keys():
    with pytest.raises(hostpool.PoolError) as e:
        hostpool.from_configmap_data("cm", {
            "dynamic-platforms": "linux/arm64", "dynamic.linux-arm64.type": "aws",
            "dynamic.linux-arm64.max-instances": "0", "dynamic.linux-arm64.region": "us-east-1"})
    assert set(e.value.errors) == {
        "$.dynamic.linux-arm64.ssh-secret: required but not set",
        "$.dynamic.linux-arm64.max-instances: 0 is less than the minimum of 1",
        "$.dynamic.linux-arm64.ami: required but not set",
        "$.dynamic.linux-arm64.instance-type: required but not set",
        "$.dynamic.linux-arm64.key-name: required but not set",
        "$.dynamic.linux-arm64.aws-secret: required but not set"}, e.value.errors


def test_konflux_real_errors_still_fail_all_at_once():
    data = {**_host("a", "arm64"), **_host("b", "local"),
            "local-platforms": "linux/x86_64, localhost, x86_64, linux/",
            "allowed-namespaces": "default,team-(,[a-,.*-tenant",
            "hosts.typo": "x"}
    with pytest.raises(hostpool.PoolError) as e:
        hostpool.from_configmap_data("cm", data)
    errors = e.value.errors
    by_path = {m.split(": ", 1)[0]: m.split(": ", 1)[1] for m in errors}
    assert set(by_path) == {"$.hosts.typo", "$.hosts[0].platform", "$.hosts[1].platform",
                            "$.localPlatforms[2]", "$.localPlatforms[3]",
                            "$.allowedNamespaces[1]", "$.allowedNamespaces[2]"}, errors
    assert by_path["$.allowedNamespaces[1]"].startswith(
        "'team-(' is not a valid regular expression: missing ), unterminated subpattern")
    assert by_path["$.allowedNamespaces[2]"].startswith(
        "'[a-' is not a valid regular expression: unterminated character set")
    assert by_path["$.localPlatforms[2]"] == (
        "'x86_64' is not a platform: expected <os>/<arch> (linux/arm64), "
        "<os>-<flavour>/<arch> (linux-m2xlarge/arm64), local or localhost")
    assert by_path["$.hosts[0].platform"].startswith("'arm64' is not a build host platform")
    assert "local and localhost can only be local platforms" in by_path["$.hosts[1].platform"]


def test_dynamic_pool_consistency_errors_have_paths():
    aws = {"region": "eu-west-1", "ami": "ami-0123456789abcdef0", "instanceType": "m6g.large",
           "keyName": "k", "credentialsSecret": "aws"}
    base = {"platform": "linux/arm64", "provider": "aws", "secret": "ssh", "maxInstances": 2,
            "aws": aws}
    doc = {"hosts": [{"name": "a", "address": "10.0.0.1", "user": "root", "secret": "s",
                      "platform": "linux/s390x", "concurrency": 1}],
           "localPlatforms": ["linux/amd64"],
           "dynamic": [base | {"minIdle": 3}, base, base | {"platform": "linux/s390x"},
                       base | {"platform": "linux/amd64"},
                       base | {"platform": "linux/ppc64le", "provider": "gcp", "aws": None}]}
    errors = hostpool.validate(doc)
    assert errors == ["$.dynamic[4].aws: None is not of type 'object'",
                      "$.dynamic[4].provider: 'gcp' is not one of ['aws']"], errors
    doc["dynamic"].pop()
    assert hostpool.validate(doc) == [
        "$.instanceTag: required when the pool has dynamic platforms (a value unique to this "
        "installation in the cloud account: the sweep terminates every VM carrying it that no "
        "record accounts for)",
        "$.dynamic[0].minIdle: 3 is more than maxInstances (2)",
        "$.dynamic[1].platform: duplicate dynamic platform 'linux/arm64' (also $.dynamic[0])",
        "$.dynamic[2].platform: 'linux/s390x' also has static hosts",
        "$.dynamic[3].platform: 'linux/amd64' is also a local platform"]
    doc["instanceTag"] = "prod"
    doc["dynamic"] = [base | {"aws": aws | {"endpoint": "http://10.0.0.1:5000"}}]
    assert hostpool.validate(doc)[0].startswith("$.dynamic[0].aws.endpoint: ")
    doc["dynamic"] = [base | {"maxBuildsPerVM": 4, "maxAgeSeconds": 3600}]
    (d,) = hostpool.from_document(doc).dynamic
    assert (d.max_builds_per_vm, d.max_age_seconds, d.min_idle, d.aws.disk_gib) == (4, 3600, 0, 40)


def test_ca_bundle_needs_an_endpoint_and_pem():
    aws = {"region": "eu-west-1", "ami": "ami-0123456789abcdef0", "instanceType": "m6g.large",
           "keyName": "k", "credentialsSecret": "aws"}
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    doc = {"hosts": [], "instanceTag": "prod", "dynamic": [
        {"platform": "linux/arm64", "provider": "aws", "secret": "ssh", "maxInstances": 2,
         "aws": aws | {"caBundle": pem}}]}
    assert hostpool.validate(doc) == [
        "$.dynamic[0].aws: 'endpoint' is a dependency of 'caBundle'"], hostpool.validate(doc)
    doc["dynamic"][0]["aws"] |= {"endpoint": "https://ec2.internal:8443", "caBundle": "MIIB"}
    assert hostpool.validate(doc) == [
        "$.dynamic[0].aws.caBundle: 'MIIB' is not PEM certificates (-----BEGIN CERTIFICATE----- "
        "...)"], hostpool.validate(doc)
    doc["dynamic"][0]["aws"]["caBundle"] = pem
    (d,) = hostpool.from_document(doc).dynamic
    assert (d.aws.endpoint, d.aws.ca_bundle) == ("https://ec2.internal:8443", pem)


def test_native_pool_has_the_same_semantics():
    doc = {"hosts": [{"name": "m2", "address": "10.0.0.1", "user": "root", "secret": "s",
                      "platform": "linux-m2xlarge/arm64", "concurrency": 2},
                     {"name": "root", "address": "10.0.0.2", "user": "root", "secret": "s",
                      "platform": "linux-root/amd64", "concurrency": 1}],
           "localPlatforms": ["linux/x86_64", "local", "localhost"],
           "allowedNamespaces": ["team-a", "system-.*", ".*-tenant"]}
    pool = hostpool.parse_yaml(yaml.safe_dump(doc))
    assert pool.local_platforms == ("linux/x86_64", "local", "localhost")
    assert pool.warnings == ()
    assert pool.namespace_allowed("team-a") and not pool.namespace_allowed("team-ab")
    assert pool.namespace_allowed("system-x") and not pool.namespace_allowed("kube-system-x")
    assert pool.namespace_allowed("a-tenant") and not pool.namespace_allowed("a-tenant-b")
    assert hostpool.from_configmap_data("cm", {"pool.yaml": yaml.safe_dump(doc)}) == pool
    # the schema documents it
    assert "whole namespace name" in hostpool.schema()["properties"]["allowedNamespaces"][
        "description"]

    bad = dict(doc, allowedNamespaces=["ok", "(unclosed", "x" * 300],
               localPlatforms=["local", "linux"],
               hosts=[dict(doc["hosts"][0], platform="localhost")])
    errors = hostpool.validate(bad)
    joined = "\n".join(errors)
    assert "$.allowedNamespaces[1]: '(unclosed' is not a valid regular expression: " \
           "missing ), unterminated subpattern at position 0" in errors, joined
    assert "$.allowedNamespaces[2]: " in joined and "is too long" in joined
    assert "$.localPlatforms[1]: 'linux' is not a platform" in joined
    assert "$.hosts[0].platform: 'localhost' is not a build host platform" in joined
    assert len(errors) == 4, joined
    with pytest.raises(hostpool.PoolError):
        hostpool.from_document(bad)


def test_validate_cli_on_a_konflux_production_configmap():
    r = cli("hostpool", "validate", str(KONFLUX_CM))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (
        f"{KONFLUX_CM}: valid: 5 hosts, 19 slots, 3 dynamic platforms (up to 390 VMs), "
        "platforms: linux-c6gd2xlarge/arm64, linux-m2xlarge/arm64, linux-root/amd64, "
        "linux/amd64, linux/arm64, linux/ppc64le, linux/s390x, linux/x86_64, local, localhost")
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 3, r.stderr
    assert all(ln.startswith(f"{KONFLUX_CM}: warning: $.dynamic.") for ln in lines), r.stderr


def test_validate_cli_reports_konflux_errors_with_paths(tmp_path: Path):
    cm = yaml.safe_load(KONFLUX_CM.read_text())
    cm["data"]["allowed-namespaces"] = "default,*-tenant,"
    cm["data"]["local-platforms"] = "linux/x86_64,\\\n  locals,"
    f = tmp_path / "host-config.yaml"
    f.write_text(yaml.safe_dump(cm))
    r = cli("hostpool", "validate", str(f))
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert lines == [
        f"{f}: $.localPlatforms[1]: 'locals' is not a platform: expected <os>/<arch> "
        "(linux/arm64), <os>-<flavour>/<arch> (linux-m2xlarge/arm64), local or localhost",
        f"{f}: $.allowedNamespaces[1]: '*-tenant' is not a valid regular expression: "
        "nothing to repeat at position 0"], r.stderr


def test_builder_host_is_opt_in_and_grants_unshare():
    """``builder: host`` (hosts that cannot run containers): the build user's sudo rule
    gets the command buildah-remote's host script runs the build with; the default
    (container) changes nothing."""
    from mpc.runner import contract, provision
    (h,) = hostpool.from_document(GOOD).hosts
    assert h.builder == contract.BUILDER_CONTAINER
    assert provision.sudo_rule(h) == "/usr/bin/podman"
    doc = {**GOOD, "hosts": [{**GOOD["hosts"][0], "builder": "host"}]}
    (h,) = hostpool.from_document(doc).hosts
    assert h.builder == contract.BUILDER_HOST
    assert provision.sudo_rule(h) == f"/usr/bin/podman, {contract.HOST_BUILDER_COMMAND}"
    bad = {**GOOD, "hosts": [{**GOOD["hosts"][0], "builder": "vm"}]}
    assert any("builder" in e for e in hostpool.validate(bad))
