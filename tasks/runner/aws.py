"""The AWS EC2 provider of dynamic hosts (``cloud.Provider``), through boto3.

Every instance is launched with the tags the sweep trusts (managed-by,
the pool's instance tag, the record and its uid, the platform) in the same
RunInstances call (TagSpecifications), so no instance exists untagged even
for a moment, and with the record's client token, so a repeated launch of
the same record is idempotent on EC2. Throttling (RequestLimitExceeded and
the other throttling codes) and transient errors are retried by botocore's
standard retry mode with backoff. Credentials come from the Secret the pool
names (keys ``access-key-id``, ``secret-access-key``, optional
``session-token``: Konflux's ``aws-secret`` format). An endpoint whose
certificate a private CA signed is verified against the pool's ``caBundle``
alone (written to a private file once per process: botocore wants a path).
"""
from __future__ import annotations

import atexit
import base64
import contextlib
import hashlib
import os
import tempfile
import threading

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, SSLError
from kubernetes import client

from . import contract
from .cloud import FenceLost, Instance, LaunchRequest, ProviderError, user_data
from .hostpool import AwsSettings, Dynamic, Pool
from .kube import Kube

MAX_ATTEMPTS = 10
# spot refused: launch on-demand instead (Konflux does the same)
_SPOT_REFUSED = ("InsufficientInstanceCapacity", "SpotMaxPriceTooLow", "MaxSpotInstanceCountExceeded",
                 "InsufficientCapacity", "UnfulfillableCapacity")
_TRANSIENT = ("RequestLimitExceeded", "Throttling", "ThrottlingException", "InternalError",
              "Unavailable", "ServiceUnavailable", "InsufficientInstanceCapacity")


def credentials(kube: Kube, namespace: str, name: str) -> dict[str, str]:
    try:
        s = kube.core.read_namespaced_secret(name, namespace)
    except client.ApiException as e:
        if e.status in (403, 404):
            raise ProviderError(f"AWS credentials secret {namespace}/{name} is not readable "
                                f"({e.status} {e.reason})") from None
        raise
    data = {k: base64.b64decode(v).decode().strip() for k, v in (s.data or {}).items()}
    missing = [k for k in ("access-key-id", "secret-access-key") if not data.get(k)]
    if missing:
        raise ProviderError(f"AWS credentials secret {namespace}/{name} lacks {', '.join(missing)}")
    return data


_CA_FILES: dict[str, str] = {}


@atexit.register
def _remove_ca_files() -> None:
    for path in _CA_FILES.values():
        with contextlib.suppress(OSError):
            os.unlink(path)


def ca_file(pem: str) -> str:
    """A file holding ``pem`` (botocore's ``verify`` takes a path), one per bundle."""
    key = hashlib.sha256(pem.encode()).hexdigest()
    if key not in _CA_FILES:
        fd, path = tempfile.mkstemp(prefix="mpc-ca-", suffix=".pem")
        with os.fdopen(fd, "w") as f:
            f.write(pem)
        _CA_FILES[key] = path
    return _CA_FILES[key]


def _untrusted_is_final(caught_exception=None, **_) -> bool | None:
    """An endpoint whose certificate is not trusted stays so: no retry (botocore's standard
    mode retried it 10 times with backoff, about 27 s a call, before the build heard why)."""
    if isinstance(caught_exception, SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(
            caught_exception):
        return False
    return None


def _error(e: Exception, what: str) -> ProviderError:
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        return ProviderError(f"EC2 {what}: {code}: {e.response.get('Error', {}).get('Message', '')}",
                             transient=code in _TRANSIENT, code=code)
    return ProviderError(f"EC2 {what}: {e}", transient=True)


def _instance(raw: dict) -> Instance:
    return Instance(id=raw["InstanceId"], state=raw.get("State", {}).get("Name", ""),
                    address=raw.get("PrivateIpAddress"), launched_at=raw.get("LaunchTime"),
                    tags={t["Key"]: t["Value"] for t in raw.get("Tags", [])})


class Ec2:
    def __init__(self, settings: AwsSettings, creds: dict[str, str], instance_tag: str,
                 extra_tags: dict[str, str], platform: str):
        self.settings = settings
        self.instance_tag = instance_tag
        self.extra_tags = extra_tags
        self.platform = platform
        self.ec2 = boto3.client(
            "ec2", region_name=settings.region, endpoint_url=settings.endpoint,
            aws_access_key_id=creds["access-key-id"],
            aws_secret_access_key=creds["secret-access-key"],
            aws_session_token=creds.get("session-token") or None,
            verify=ca_file(settings.ca_bundle) if settings.ca_bundle else None,
            config=Config(retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
                          connect_timeout=10, read_timeout=60))
        self._root_device: str | None = None
        # the fence of the launch this thread is making (the sweep launches from threads)
        self._fence = threading.local()
        self.ec2.meta.events.register("before-send.ec2.RunInstances", self._before_send)
        self.ec2.meta.events.register_first("needs-retry.ec2", _untrusted_is_final)

    def _before_send(self, request=None, **_) -> None:
        """Every attempt of RunInstances, botocore's retries included, passes the fence of
        its launch first: a launch whose record was swept meanwhile is never sent."""
        fence = getattr(self._fence, "check", None)
        if fence is None:
            return None
        try:
            fence()
        except Exception as e:      # noqa: BLE001 - whatever the check says, do not send
            raise FenceLost(f"launch not sent: {e}") from None
        return None

    @classmethod
    def from_pool(cls, kube: Kube, namespace: str, pool: Pool, dyn: Dynamic) -> "Ec2":
        return cls(dyn.aws, credentials(kube, namespace, dyn.aws.credentials_secret),
                   pool.instance_tag or "", dict(pool.additional_instance_tags), dyn.platform)

    def _managed_filters(self) -> list[dict]:
        return [{"Name": f"tag:{contract.TAG_MANAGED}", "Values": [contract.MANAGED_VALUE]},
                {"Name": f"tag:{contract.TAG_INSTANCE}", "Values": [self.instance_tag]}]

    def _describe(self, **kw) -> list[Instance]:
        out: list[Instance] = []
        try:
            for page in self.ec2.get_paginator("describe_instances").paginate(**kw):
                for r in page.get("Reservations", []):
                    out += [_instance(i) for i in r.get("Instances", [])]
        except (ClientError, BotoCoreError) as e:
            raise _error(e, "DescribeInstances") from None
        return out

    def find(self, record_uid: str) -> list[Instance]:
        return self._describe(Filters=self._managed_filters() + [
            {"Name": f"tag:{contract.TAG_RECORD_UID}", "Values": [record_uid]}])

    def list_managed(self) -> list[Instance]:
        return self._describe(Filters=self._managed_filters())

    def describe(self, ids: list[str]) -> dict[str, Instance]:
        """The instances among ``ids`` EC2 still knows (terminated ones included for a while)."""
        if not ids:
            return {}
        found = self._describe(Filters=[{"Name": "instance-id", "Values": list(ids)}])
        return {i.id: i for i in found}

    def terminate(self, ids: list[str]) -> None:
        if not ids:
            return
        try:
            self.ec2.terminate_instances(InstanceIds=list(ids))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") == "InvalidInstanceID.NotFound":
                for i in ids:       # one unknown id fails the call: the others one by one
                    if len(ids) > 1:
                        self.terminate([i])
                return
            raise _error(e, "TerminateInstances") from None
        except BotoCoreError as e:
            raise _error(e, "TerminateInstances") from None

    def _root(self) -> str:
        if self._root_device is None:
            try:
                imgs = self.ec2.describe_images(ImageIds=[self.settings.ami]).get("Images", [])
            except (ClientError, BotoCoreError) as e:
                raise _error(e, "DescribeImages") from None
            if not imgs:
                raise ProviderError(f"AMI {self.settings.ami} not found in {self.settings.region}")
            self._root_device = imgs[0].get("RootDeviceName") or "/dev/sda1"
        return self._root_device

    def launch(self, req: LaunchRequest) -> Instance:
        s = self.settings
        tags = self.extra_tags | {
            contract.TAG_MANAGED: contract.MANAGED_VALUE, contract.TAG_INSTANCE: self.instance_tag,
            contract.TAG_RECORD: req.record, contract.TAG_RECORD_UID: req.record_uid,
            contract.TAG_PLATFORM: req.platform, "Name": f"mpc-{req.record.split('/')[-1]}"}
        tag_list = [{"Key": k, "Value": v} for k, v in sorted(tags.items())]
        ebs = {"VolumeSize": s.disk_gib, "VolumeType": "gp3", "DeleteOnTermination": True}
        if s.iops:
            ebs["Iops"] = s.iops
        if s.throughput:
            ebs["Throughput"] = s.throughput
        params = {
            "ImageId": s.ami, "InstanceType": s.instance_type, "KeyName": s.key_name,
            "MinCount": 1, "MaxCount": 1, "ClientToken": req.client_token,
            "UserData": user_data(req.host_key_private, req.host_key_public, s.user_data),
            "InstanceInitiatedShutdownBehavior": "terminate",
            "BlockDeviceMappings": [{"DeviceName": self._root(), "Ebs": ebs}],
            "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1},
            "TagSpecifications": [{"ResourceType": "instance", "Tags": tag_list},
                                  {"ResourceType": "volume", "Tags": tag_list}]}
        if s.subnet:
            params["SubnetId"] = s.subnet
        if s.security_group_id:
            params["SecurityGroupIds"] = [s.security_group_id]
        elif s.security_group:
            params["SecurityGroups"] = [s.security_group]
        if s.instance_profile:
            key = "Arn" if s.instance_profile.startswith("arn:") else "Name"
            params["IamInstanceProfile"] = {key: s.instance_profile}
        self._fence.check = req.fence
        try:
            return self._launch(params, req)
        finally:
            self._fence.check = None

    def _launch(self, params: dict, req: LaunchRequest) -> Instance:
        s = self.settings
        if s.spot:
            spot = {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}
            if s.spot_max_price:
                spot["MaxPrice"] = s.spot_max_price
            try:
                return self._run(params | {"InstanceMarketOptions": {
                    "MarketType": "spot", "SpotOptions": spot}})
            except ProviderError as e:
                if e.code not in _SPOT_REFUSED:
                    raise
            # another request: another token (the same one with other parameters is refused)
            params["ClientToken"] = req.client_token + "-od"
        return self._run(params)

    def _run(self, params: dict) -> Instance:
        try:
            r = self.ec2.run_instances(**params)
        except (ClientError, BotoCoreError) as e:
            raise _error(e, "RunInstances") from None
        (raw,) = r["Instances"]
        return _instance(raw)
