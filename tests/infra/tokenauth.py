"""A registry token service for tests: the Bearer protocol of Docker's distribution.

A registry configured with ``auth: token`` (``TokenService.registry_auth()``)
answers an unauthenticated request with 401 and ``WWW-Authenticate: Bearer
realm=...,service=...,scope=...``; the client asks the realm (this service, on
loopback) for a token with HTTP Basic credentials; this service checks them and
returns a JWT (ES256, signed by a key whose self-signed certificate is the
registry's ``rootcertbundle``, named by its ``kid``) granting the requested
actions, which the registry verifies (issuer, audience, expiry, signature,
access). Every token issued is kept in ``issued``, so a test can look for them.
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import http.server
import json
import secrets
import socketserver
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def key_id(key: ec.EllipticCurvePublicKey) -> str:
    """libtrust's key ID, by which distribution finds the signing key (JWT ``kid``)."""
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    s = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(s[i:i + 4] for i in range(0, len(s), 4))


@dataclass
class TokenService:
    workdir: Path
    users: dict[str, str]                  # user -> password
    service: str = "mpc-test-registry"
    issuer: str = "mpc-test-token-issuer"
    host: str = "127.0.0.1"
    port: int = 0
    issued: list[str] = field(default_factory=list, repr=False)
    requests: list[tuple[str, str]] = field(default_factory=list, repr=False)  # (user, scope)
    _server: socketserver.TCPServer | None = field(default=None, repr=False)

    @property
    def realm(self) -> str:
        return f"http://{self.host}:{self.port}/token"

    @property
    def cert_file(self) -> Path:
        return self.workdir / "token-signer.crt"

    def registry_auth(self) -> dict:
        """The ``auth:`` section of the registry's config.yml."""
        return {"token": {"realm": self.realm, "service": self.service, "issuer": self.issuer,
                          "rootcertbundle": str(self.cert_file)}}

    def start(self) -> "TokenService":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.issuer)])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=1))
                .sign(self._key, hashes.SHA256()))
        self.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._kid = key_id(self._key.public_key())
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):
                pass

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                q = urllib.parse.parse_qs(url.query)
                user = service._basic_user(self.headers.get("Authorization", ""))
                if url.path != "/token" or user is None:
                    body = b'{"details":"invalid username/password"}'
                    self.send_response(401)
                else:
                    scopes = q.get("scope", [])
                    service.requests += [(user, s) for s in scopes]
                    token = service._token(user, q.get("service", [""])[0], scopes)
                    body = json.dumps({"token": token, "access_token": token, "expires_in": 300,
                                       "issued_at": dt.datetime.now(dt.timezone.utc)
                                       .strftime("%Y-%m-%dT%H:%M:%SZ")}).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self._server = Server((self.host, self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def _basic_user(self, header: str) -> str | None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, pw = base64.b64decode(value).decode().partition(":")
        except ValueError:
            return None
        want = self.users.get(user)
        return user if want is not None and hmac.compare_digest(pw, want) else None

    def _token(self, user: str, audience: str, scopes: list[str]) -> str:
        access = []
        for scope in scopes:               # repository:<name>:<action,...>: all granted
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "kid": self._kid}
        claims = {"iss": self.issuer, "sub": user, "aud": audience, "exp": now + 300,
                  "nbf": now - 60, "iat": now, "jti": secrets.token_hex(16), "access": access}
        signing = (_b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode()))
        r, s = decode_dss_signature(self._key.sign(signing.encode(), ec.ECDSA(hashes.SHA256())))
        token = signing + "." + _b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
        self.issued.append(token)
        return token

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
