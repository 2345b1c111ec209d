"""The provider interface of dynamic hosts: launch, find, describe and terminate VMs.

A provider knows nothing of builds or Kubernetes records: it launches one VM
for one record (tagged with the record's name and uid, idempotent by the
record's client token), finds VMs by those tags, and terminates them.
``for_platform`` picks the implementation named by the pool (``aws`` first;
IBM Cloud or others implement the same four calls).

The VM's SSH host key is made here, before the launch: the private half
travels in the user data as cloud-init's ``ssh_keys`` (the way cloud-init
installs pre-made host keys), the public half is recorded with the VM and
pinned by every connection. mpc's cloud-config part comes first; the team's
own user data (a ``#cloud-config`` document or a script) follows it in the
same MIME multipart document.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Callable, Protocol

import yaml

from .hostpool import Dynamic, Pool
from .kube import Kube

GONE_STATES = ("terminated",)


class ProviderError(RuntimeError):
    """The cloud refused or failed a call; ``transient`` if worth trying again later."""

    def __init__(self, message: str, transient: bool = False, code: str = ""):
        self.transient = transient
        self.code = code
        super().__init__(message)


class FenceLost(ProviderError):
    """A launch was not sent: its record is gone or no longer launching (see ``LaunchRequest``)."""


@dataclass(frozen=True)
class Instance:
    id: str
    state: str                     # pending | running | shutting-down | terminated | stopping | stopped
    address: str | None
    launched_at: dt.datetime | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def gone(self) -> bool:
        return self.state in GONE_STATES


@dataclass(frozen=True)
class LaunchRequest:
    record: str                    # namespace/name of the VM record
    record_uid: str
    client_token: str
    platform: str
    host_key_private: bytes        # OpenSSH private key the VM's sshd will use
    host_key_public: str           # 'ssh-ed25519 AAAA...'
    # Called right before every attempt of the launch call is sent (retries included);
    # it raises when the record no longer stands for this launch, and the provider then
    # raises FenceLost without sending. See docs/dynamic-hosts.md, "Quota under stalls".
    fence: Callable[[], None] | None = field(default=None, compare=False, repr=False)


class Provider(Protocol):
    def launch(self, req: LaunchRequest) -> Instance: ...
    def find(self, record_uid: str) -> list[Instance]: ...
    def describe(self, ids: list[str]) -> dict[str, Instance]: ...
    def list_managed(self) -> list[Instance]: ...
    def terminate(self, ids: list[str]) -> None: ...


def user_data(host_key_private: bytes, host_key_public: str, team: str | None) -> str:
    """cloud-init user data: mpc's host key part, then the team's own part (if any)."""
    cfg = {"ssh_deletekeys": True, "ssh_genkeytypes": [],
           "ssh_keys": {"ed25519_private": host_key_private.decode(),
                        "ed25519_public": host_key_public}}
    doc = MIMEMultipart()
    doc.attach(MIMEText("#cloud-config\n" + yaml.safe_dump(cfg), "cloud-config"))
    if team:
        kind = "cloud-config" if team.startswith("#cloud-config") else "x-shellscript"
        doc.attach(MIMEText(team, kind))
    return doc.as_string()


def host_key_from_user_data(text: str) -> tuple[str, str] | None:
    """(private, public) host key that ``user_data`` gives the VM: what cloud-init reads."""
    import email
    msg = email.message_from_string(text)
    for part in msg.walk():
        if part.get_content_type() == "text/cloud-config":
            cfg = yaml.safe_load(part.get_payload(decode=True).decode()) or {}
            keys = cfg.get("ssh_keys") or {}
            if "ed25519_private" in keys:
                return keys["ed25519_private"], keys["ed25519_public"]
    return None


def for_platform(kube: Kube, namespace: str, pool: Pool, dyn: Dynamic) -> Provider:
    if dyn.provider == "aws":
        from .aws import Ec2
        return Ec2.from_pool(kube, namespace, pool, dyn)
    raise ProviderError(f"provider {dyn.provider!r} is not supported")
