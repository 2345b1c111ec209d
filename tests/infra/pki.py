"""A throw-away certificate authority for the test control plane."""
from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


@dataclass
class PKI:
    """CA + serving cert + client certs + service-account signing key, as files."""

    dir: Path

    @property
    def ca_crt(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    def create(self, server_ips: list[str], server_names: list[str]) -> "PKI":
        self.dir.mkdir(parents=True, exist_ok=True)
        key = _key()
        now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
        ca = (x509.CertificateBuilder().subject_name(_name("mpc-test-ca"))
              .issuer_name(_name("mpc-test-ca")).public_key(key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + dt.timedelta(days=3650))
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                             critical=True)
              .sign(key, hashes.SHA256()))
        self.ca_key.write_bytes(_pem_key(key))
        self.ca_crt.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        self.serving("apiserver", "kube-apiserver", server_ips, server_names)
        sa = _key()
        (self.dir / "sa.key").write_bytes(_pem_key(sa))
        (self.dir / "sa.pub").write_bytes(sa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        return self

    def serving(self, name: str, cn: str, ips: list[str], names: list[str]) -> tuple[Path, Path]:
        """Issue a serving certificate for ``ips`` and DNS ``names``; returns (crt, key) paths."""
        sans = [x509.DNSName(n) for n in names] + [
            x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        return self._issue(name, _name(cn), ExtendedKeyUsageOID.SERVER_AUTH, sans)

    def client(self, name: str, cn: str, org: str | None = None) -> tuple[Path, Path]:
        """Issue a client certificate; returns (crt, key) paths."""
        return self._issue(name, _name(cn, org), ExtendedKeyUsageOID.CLIENT_AUTH, [])

    def _issue(self, name, subject, usage, sans) -> tuple[Path, Path]:
        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), None)
        ca = x509.load_pem_x509_certificate(self.ca_crt.read_bytes())
        key = _key()
        now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now).not_valid_after(now + dt.timedelta(days=365))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        crt_p, key_p = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        key_p.write_bytes(_pem_key(key))
        crt_p.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return crt_p, key_p
