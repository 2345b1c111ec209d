"""Host keys of pool hosts without ``hostKey``: trusted on first use, pinned from then on.

Such a host gets its key recorded once, in the cluster, by whichever
connection comes first (provisioning, deprovisioning or the sweep): the key
the host offers (``ssh-keyscan``: nothing is authenticated, nothing runs) is
written to the Lease ``contract.host_key_name(host, address, port)`` in the
controller namespace. Creating it is atomic: when two runners record at once
the API server keeps exactly one and the other reads that one and uses it.
Every connection from then on, the first one included, pins the recorded key
(StrictHostKeyChecking yes), and so does the build's secret.

A host that later offers another key is refused (``HostKeyChanged``): the
message names the host, its address, the recorded and the offered
fingerprints and what the platform team must do; it is logged and posted as
a Warning Event on the record. A record is never overwritten. A pool entry
with ``hostKey`` never reads or writes a record: its key wins.

A Lease because the Tasks' ServiceAccount already creates and reads Leases in
the controller namespace (slots, queue): recording needs no new rights.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import hashlib
import re
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from kubernetes import client

from . import contract, log
from .hostpool import Host
from .kube import Kube
from .poolsource import admin_key
from .remote import HostError, HostKeyMismatch, Session, open_session, scan_host_keys

REASON = "HostKeyChanged"
COMPONENT = "mpc-runner"
# the key types a host may be pinned to, in the order ssh negotiates them by default
PREFERENCE = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
              "ecdsa-sha2-nistp521", "ssh-rsa")
KEY_RE = re.compile(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]+={0,2}$")
# how ssh names key types in its messages
_SSH_KIND = {"ssh-ed25519": "ED25519", "ssh-rsa": "RSA"}


def fingerprint(key: str) -> str:
    """ssh's SHA256 fingerprint of a public key line ('ssh-ed25519 AAAA...')."""
    blob = base64.b64decode(key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def kind(key_type: str) -> str:
    return _SSH_KIND.get(key_type, "ECDSA" if key_type.startswith("ecdsa-") else key_type)


def _valid(key: str) -> bool:
    if not KEY_RE.match(key):
        return False
    try:
        base64.b64decode(key.split()[1], validate=True)
    except binascii.Error:
        return False
    return True


def preferred(keys: list[str], first: str | None = None) -> str | None:
    """The key ssh would use among ``keys`` (type ``first`` if offered)."""
    order = ((first,) if first else ()) + PREFERENCE
    usable = [k for k in keys if _valid(k) and k.split()[0] in order]
    return min(usable, key=lambda k: order.index(k.split()[0]), default=None)


@dataclass(frozen=True)
class Record:
    key: str            # 'ssh-ed25519 AAAA...'
    lease: str
    uid: str
    recorded_at: str

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)


def record_name(host: Host) -> str:
    return contract.host_key_name(host.name, host.address, host.port)


def _record(lease: client.V1Lease, host: Host, namespace: str) -> Record:
    m = lease.metadata
    key = (m.annotations or {}).get(contract.ANN_HOST_KEY, "")
    if not _valid(key):
        raise HostError(host.name, f"the host key recorded for it in Lease {namespace}/{m.name} "
                        f"is not a valid public key ({key[:80]!r}); the platform team must set "
                        f"hostKey for {host.name} in the host pool, or delete that Lease so the "
                        "next connection records the key the host offers")
    return Record(key=key, lease=m.name, uid=m.uid or "",
                  recorded_at=m.creation_timestamp.isoformat() if m.creation_timestamp else "")


def read(kube: Kube, namespace: str, host: Host) -> Record | None:
    try:
        lease = kube.leases.read_namespaced_lease(record_name(host), namespace)
    except client.ApiException as e:
        if e.status == 404:
            return None
        raise
    return _record(lease, host, namespace)


def record(kube: Kube, namespace: str, host: Host, key: str) -> Record:
    """Record ``key`` for ``host`` unless a key is recorded already; returns what is recorded."""
    body = client.V1Lease(metadata=client.V1ObjectMeta(
        name=record_name(host),
        labels={contract.LABEL_MANAGED: contract.MANAGED_VALUE,
                contract.LABEL_ROLE: contract.ROLE_HOST_KEY, contract.LABEL_HOST: host.name},
        annotations={contract.ANN_ADDRESS: host.address, contract.ANN_PORT: str(host.port),
                     contract.ANN_HOST_KEY: key, contract.ANN_FINGERPRINT: fingerprint(key)}))
    for _ in range(3):
        try:
            rec = _record(kube.leases.create_namespaced_lease(namespace, body), host, namespace)
            log.event("host key recorded on first use", host=host.name, address=host.address,
                      port=host.port, fingerprint=rec.fingerprint, lease=rec.lease)
            return rec
        except client.ApiException as e:
            if e.status != 409:
                raise
        rec = read(kube, namespace, host)     # another runner recorded first: its key counts
        if rec is not None:
            log.event("host key was recorded by another runner first; using that one",
                      host=host.name, address=host.address, fingerprint=rec.fingerprint,
                      seen=fingerprint(key), lease=rec.lease)
            return rec
    raise HostError(host.name, "could not record its host key (the record kept changing)",
                    transient=True)


def pin(kube: Kube, namespace: str, host: Host) -> tuple[Host, Record | None]:
    """``host`` with the key every connection must pin, and the record it comes from
    (None when the pool's ``hostKey`` is used). Records the key on first use."""
    if host.host_key:
        return host, None
    rec = read(kube, namespace, host)
    if rec is None:
        key = preferred(scan_host_keys(host))
        if key is None:
            raise HostError(host.name, f"{host.address}:{host.port} offers no host key of a "
                            f"supported type ({', '.join(PREFERENCE)})")
        rec = record(kube, namespace, host, key)
    return dataclasses.replace(host, host_key=rec.key), rec


class HostKeyChanged(HostError):
    """A host without ``hostKey`` offered another key than the one recorded on first use."""

    def __init__(self, host: Host, namespace: str, rec: Record, offered: tuple[str, str] | None):
        self.address = f"{host.address}:{host.port}"
        self.recorded = rec.fingerprint
        self.offered = offered[1] if offered else None
        self.lease = f"{namespace}/{rec.lease}"
        offer = (f"the {offered[0]} key {offered[1]}" if offered
                 else "a key that does not match (its fingerprint could not be read)")
        super().__init__(host.name, (
            f"host key changed: host {host.name} at {self.address} offered {offer}, but mpc "
            f"recorded the {kind(rec.key.split()[0])} key {rec.fingerprint} for it on first use "
            f"(Lease {self.lease}, {rec.recorded_at}). mpc refuses to connect: the host may have "
            "been reinstalled or re-keyed, or someone may be intercepting the connection. The "
            "platform team must verify the host's real key (on the host: ssh-keygen -lf "
            f"/etc/ssh/ssh_host_ed25519_key.pub), then either set hostKey for {host.name} in the "
            f"host pool, or delete the recorded entry (kubectl -n {namespace} delete lease "
            f"{rec.lease}) so that the next connection records the key the host offers then"))

    @property
    def message(self) -> str:
        return str(self).split(": ", 1)[-1]


def _offered(host: Host, rec: Record) -> tuple[str, str] | None:
    """What the host offers now, when ssh did not say: the key of the recorded type, or the
    one ssh would negotiate."""
    try:
        key = preferred(scan_host_keys(host, attempts=1), first=rec.key.split()[0])
    except HostError:
        return None
    return (kind(key.split()[0]), fingerprint(key)) if key else None


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def post_warning(kube: Kube, namespace: str, involved: dict, name: str, message: str) -> bool:
    """Post a Warning Event (best effort: a failure is logged, never raised)."""
    ts = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    body = {"apiVersion": "v1", "kind": "Event",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {contract.LABEL_MANAGED: contract.MANAGED_VALUE}},
            "involvedObject": involved | {"namespace": namespace},
            "reason": REASON, "message": message[:1000], "type": "Warning",
            "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
            "reportingInstance": socket.gethostname()[:128],
            "firstTimestamp": ts, "lastTimestamp": ts, "count": 1}
    try:
        kube.core.create_namespaced_event(namespace, body)
        return True
    except client.ApiException as e:
        if e.status != 409:             # 409: the same refusal was posted already
            log.event("could not post event", level="warning", namespace=namespace,
                      reason=REASON, status=e.status)
        return False


def warn_build(kube: Kube, taskrun: dict, err: HostKeyChanged) -> bool:
    """Tell the build why its host was refused: a Warning Event on its TaskRun."""
    m = taskrun["metadata"]
    return post_warning(
        kube, m["namespace"], contract.involved_object(taskrun),
        f"{m['name'][:200].rstrip('-.')}.{_digest(m['uid'], REASON, err.host)}", err.message)


def _refuse(kube: Kube, namespace: str, host: Host, rec: Record,
            offered: tuple[str, str] | None) -> HostKeyChanged:
    err = HostKeyChanged(host, namespace, rec, offered or _offered(host, rec))
    log.event("host key changed; connection refused", level="error", host=host.name,
              address=err.address, recorded=err.recorded, offered=err.offered, lease=err.lease)
    post_warning(kube, namespace,
                 {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "name": rec.lease,
                  "uid": rec.uid},
                 f"{rec.lease}.{_digest(rec.key, err.offered or '')}", err.message)
    return err


@contextmanager
def session(kube: Kube, namespace: str, host: Host) -> Iterator[Session]:
    """An SSH session to ``host`` as its admin that pins the pool's or the recorded key."""
    key = admin_key(kube, namespace, host)
    pinned, rec = pin(kube, namespace, host)
    with open_session(pinned, key) as s:
        try:
            yield s
        except HostKeyMismatch as e:
            if rec is None:
                raise
            raise _refuse(kube, namespace, host, rec, e.offered) from None
