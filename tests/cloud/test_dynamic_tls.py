"""An EC2 endpoint behind TLS whose certificate a private CA signed (``aws.caBundle``).

moto's EC2 API on loopback serves https with a certificate of a throw-away CA: the
provider trusts it only through the pool's ``caBundle`` (not the public CAs), and
without the bundle every call is refused for the certificate at its first attempt (no
retries: an untrusted certificate stays untrusted), never sent in clear.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from mpc.runner import contract
from mpc.runner.aws import Ec2
from mpc.runner.cloud import ProviderError
from mpc.runner.hostpool import AwsSettings
from tests.infra.ec2 import CREDS, REGION, MotoServer
from tests.infra.ec2 import client as ec2_client
from tests.infra.pki import PKI

from .conftest import PLATFORM


@pytest.fixture
def tls_moto(workdir):
    pki = PKI(workdir / "moto-pki").create(["127.0.0.1"], ["localhost"])
    crt, key = pki.serving("moto", "moto", ["127.0.0.1"], [])
    m = MotoServer(workdir / "moto-tls.log", tls=(crt, key, pki.ca_crt)).start()
    yield m
    m.stop()


def _ec2(moto: MotoServer, ca_bundle: str | None) -> Ec2:
    settings = AwsSettings(region=REGION, ami="ami-12c6146b", instance_type="t3.micro",
                           key_name="k", credentials_secret="aws-creds", endpoint=moto.url,
                           ca_bundle=ca_bundle)
    return Ec2(settings, CREDS, "mpc-tls", {}, PLATFORM)


def test_the_ca_bundle_is_what_makes_a_private_endpoint_trusted(tls_moto):
    ours = ec2_client(tls_moto.url, tls_moto.ca).run_instances(
        ImageId="ami-12c6146b", MinCount=1, MaxCount=1, TagSpecifications=[{
            "ResourceType": "instance", "Tags": [
                {"Key": contract.TAG_MANAGED, "Value": contract.MANAGED_VALUE},
                {"Key": contract.TAG_INSTANCE, "Value": "mpc-tls"}]}])["Instances"][0]
    pem = Path(tls_moto.ca).read_text()
    found = _ec2(tls_moto, pem).list_managed()
    assert [i.id for i in found] == [ours["InstanceId"]]
    untrusted = _ec2(tls_moto, None)
    attempts = []
    untrusted.ec2.meta.events.register("before-send.ec2", lambda **_: attempts.append(1))
    with pytest.raises(ProviderError, match="CERTIFICATE_VERIFY_FAILED"):
        untrusted.list_managed()
    assert len(attempts) == 1          # refused for good, not retried with backoff
