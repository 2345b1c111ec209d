#!/usr/bin/env python3
"""mpc buildah-remote: the pull-only registry proxy the wrapper runs in the pod.

The build host pulls base images through it, over the SSH connection (a
remote-forwarded port), so the pod's registry credentials never leave the
pod: this process reads them, answers the registries' challenges (Basic, or
a Bearer token it fetches itself) and passes only image data back. It serves
GET/HEAD of manifests and blobs under /v2/<key>/<registry id>/..., nothing
else: no push, no catalog, no token ever leaves it. <key> is a random value
known only to this pod and the build user's registries.conf drop-in, so
other users of the host who reach the forwarded port on the host's loopback
cannot pull through it.

Usage: registry-proxy.py OUT_DIR REMOTE_PORT
Writes OUT_DIR/registries.conf (the drop-in for the builder container) and
then OUT_DIR/port (its own port on 127.0.0.1); or OUT_DIR/none when the pod
has no registry credentials (nothing to proxy). Standard library only.
"""
from __future__ import annotations

import base64
import hmac
import http.client
import http.server
import json
import os
import re
import secrets
import socketserver
import ssl
import sys
import threading
import urllib.parse

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
PATH = re.compile(r"^/v2/([0-9a-f]{32})/(r[0-9]+)/((?:[a-z0-9._-]+/)*[a-z0-9._-]+)"
                  r"/(manifests|blobs)/([A-Za-z0-9_.:+-]+)$")
PASS_HEADERS = ("content-type", "content-length", "docker-content-digest", "content-range",
                "accept-ranges", "etag", "docker-distribution-api-version")
CHUNK = 1 << 16


def log(msg: str) -> None:
    print(f"mpc registry proxy: {msg}", file=sys.stderr, flush=True)


def auth_files() -> list[str]:
    """Where buildah/podman/skopeo look for credentials, in their order."""
    env, home = os.environ, os.environ.get("HOME", "")
    out = []
    if env.get("REGISTRY_AUTH_FILE"):
        out.append(env["REGISTRY_AUTH_FILE"])
    if env.get("XDG_RUNTIME_DIR"):
        out.append(os.path.join(env["XDG_RUNTIME_DIR"], "containers/auth.json"))
    out.append(f"/run/containers/{os.getuid()}/auth.json")
    if home:
        out.append(os.path.join(home, ".config/containers/auth.json"))
    docker = env.get("DOCKER_CONFIG") or (os.path.join(home, ".docker") if home else "")
    if docker:
        out.append(os.path.join(docker, "config.json"))
    return out


def normalize(key: str) -> str:
    """An auths key as registries.conf names it: host[:port][/namespace]."""
    key = re.sub(r"^[a-z]+://", "", key.strip()).rstrip("/")
    if key.endswith("/v1") or key.endswith("/v2"):
        key = key[:-3]
    host, _, rest = key.partition("/")
    if host in ("index.docker.io", DOCKER_HUB_API):
        host = DOCKER_HUB
    return host + ("/" + rest if rest else "")


def credentials() -> dict[str, tuple[str, str]]:
    """location prefix -> (user, password); the first file naming a prefix wins."""
    creds: dict[str, tuple[str, str]] = {}
    for f in auth_files():
        try:
            with open(f, encoding="utf-8") as fh:
                auths = json.load(fh).get("auths") or {}
        except (OSError, ValueError, AttributeError):
            continue
        for key, entry in auths.items():
            if not isinstance(entry, dict):
                continue
            user, pw = entry.get("username"), entry.get("password")
            if entry.get("auth"):
                try:
                    user, _, pw = base64.b64decode(entry["auth"]).decode().partition(":")
                except ValueError:
                    continue
            if user and pw is not None:
                creds.setdefault(normalize(key), (user, pw))
    return creds


class Upstream:
    """One registry location (host[/namespace]) and the credentials for it."""

    def __init__(self, location: str, cred: tuple[str, str], tls_verify: bool):
        self.location = location
        self.host, _, self.namespace = location.partition("/")
        self.api_host = DOCKER_HUB_API if self.host == DOCKER_HUB else self.host
        self.cred = cred
        self.tls_verify = tls_verify
        self.auth_header: str | None = None
        self.lock = threading.Lock()
        self.scheme = "https"

    def _connect(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        if scheme == "http":
            return http.client.HTTPConnection(netloc, timeout=300)
        ctx = ssl.create_default_context()
        if not self.tls_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return http.client.HTTPSConnection(netloc, timeout=300, context=ctx)

    def _send(self, method: str, url: str, headers: dict, auth: str | None):
        """One request, redirects followed (credentials only to the registry itself)."""
        for _ in range(6):
            u = urllib.parse.urlsplit(url)
            conn = self._connect(u.scheme, u.netloc)
            h = dict(headers)
            if auth and u.netloc == self.api_host:
                h["Authorization"] = auth
            conn.request(method, (u.path or "/") + ("?" + u.query if u.query else ""), headers=h)
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                url = urllib.parse.urljoin(url, resp.getheader("Location"))
                resp.read()
                conn.close()
                if resp.status == 303:
                    method = "GET" if method != "HEAD" else method
                continue
            return conn, resp
        raise OSError(f"too many redirects for {url}")

    def _token(self, challenge: str) -> str | None:
        """The Authorization value answering a WWW-Authenticate challenge."""
        scheme, _, params = challenge.partition(" ")
        user, pw = self.cred
        if scheme.lower() == "basic":
            return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
        if scheme.lower() != "bearer":
            return None
        p = dict(re.findall(r'([A-Za-z]+)="([^"]*)"', params))
        if "realm" not in p:
            return None
        query = urllib.parse.urlencode([(k, p[k]) for k in ("service", "scope") if k in p])
        realm = urllib.parse.urlsplit(p["realm"])
        conn = self._connect(realm.scheme, realm.netloc)
        basic = base64.b64encode(f"{user}:{pw}".encode()).decode()
        path = realm.path + "?" + "&".join(x for x in (realm.query, query) if x)
        conn.request("GET", path, headers={"Authorization": "Basic " + basic})
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        if resp.status != 200:
            log(f"token request to {realm.netloc} failed: HTTP {resp.status}")
            return None
        doc = json.loads(body)
        token = doc.get("token") or doc.get("access_token")
        return "Bearer " + token if token else None

    def fetch(self, method: str, path: str, headers: dict):
        """(connection, response) for ``path`` (/v2/...) on the registry, authenticated."""
        url = f"{self.scheme}://{self.api_host}{path}"
        try:
            conn, resp = self._send(method, url, headers, self.auth_header)
        except (ssl.SSLError, ConnectionRefusedError):
            if self.tls_verify or self.scheme == "http":
                raise
            self.scheme = "http"          # TLSVERIFY=false: plain HTTP, as buildah allows then
            url = f"http://{self.api_host}{path}"
            conn, resp = self._send(method, url, headers, self.auth_header)
        if resp.status == 401 and resp.getheader("WWW-Authenticate"):
            challenge = resp.getheader("WWW-Authenticate")
            resp.read()
            conn.close()
            with self.lock:
                self.auth_header = self._token(challenge)
            conn, resp = self._send(method, url, headers, self.auth_header)
        return conn, resp


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mpc-registry-proxy"
    key = ""
    upstreams: dict[str, Upstream] = {}

    def log_message(self, fmt, *args):   # quiet: the build log shows buildah's own lines
        pass

    def _plain(self, status: int, body: bytes = b"{}") -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Docker-Distribution-API-Version", "registry/2.0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        if self.path in ("/v2", "/v2/"):
            return self._plain(200)
        m = PATH.match(self.path.split("?", 1)[0])
        if not m or not hmac.compare_digest(m.group(1), self.key) or m.group(2) not in self.upstreams:
            return self._plain(404, b'{"errors":[{"code":"NAME_UNKNOWN","message":"not proxied"}]}')
        up = self.upstreams[m.group(2)]
        name = f"{up.namespace}/{m.group(3)}" if up.namespace else m.group(3)
        headers = {k: v for k, v in (("Accept", ", ".join(self.headers.get_all("Accept") or [])),
                                     ("Range", self.headers.get("Range"))) if v}
        try:
            conn, resp = up.fetch(self.command, f"/v2/{name}/{m.group(4)}/{m.group(5)}", headers)
        except OSError as e:
            log(f"{up.location}: {e}")
            return self._plain(502, b'{"errors":[{"code":"UNKNOWN","message":"upstream failed"}]}')
        try:
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() in PASS_HEADERS:
                    self.send_header(k, v)
            length = resp.getheader("Content-Length")
            if length is None and self.command != "HEAD":
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                while chunk := resp.read(CHUNK):
                    self.wfile.write(chunk)
        finally:
            conn.close()

    do_HEAD = do_GET

    def _refuse(self):
        self._plain(405, b'{"errors":[{"code":"UNSUPPORTED","message":"pull only"}]}')

    do_POST = do_PUT = do_PATCH = do_DELETE = _refuse


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def toml_str(s: str) -> str:
    return json.dumps(s)      # a JSON string is a TOML basic string for these characters


def main() -> int:
    out, remote_port = sys.argv[1], int(sys.argv[2])
    creds = credentials()
    if not creds:
        open(os.path.join(out, "none"), "w").close()
        return 0
    tls_verify = os.environ.get("TLSVERIFY", "true").lower() != "false"
    Handler.key = secrets.token_hex(16)
    Handler.upstreams = {f"r{i}": Upstream(loc, creds[loc], tls_verify)
                         for i, loc in enumerate(sorted(creds))}
    lines = ["# mpc buildah-remote: pulls from these registries go through the pod, which",
             "# holds the credentials (a pull-only proxy on a port forwarded over SSH)."]
    for rid, up in Handler.upstreams.items():
        lines += ["", "[[registry]]", f"prefix = {toml_str(up.location)}",
                  f"location = {toml_str(up.location)}", "[[registry.mirror]]",
                  f"location = {toml_str(f'127.0.0.1:{remote_port}/{Handler.key}/{rid}')}",
                  "insecure = true"]
    with open(os.path.join(out, "registries.conf"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    server = Server(("127.0.0.1", 0), Handler)
    with open(os.path.join(out, "port.tmp"), "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(os.path.join(out, "port.tmp"), os.path.join(out, "port"))
    log("serving " + ", ".join(up.location for up in Handler.upstreams.values()))
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
