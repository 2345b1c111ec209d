"""An HTTP proxy on loopback in front of the real API server that injects faults.

``FaultProxy(kubeconfig)`` reads the server, CA and bearer token of a
kubeconfig (a ServiceAccount's, as ``cluster.serviceaccount_kubeconfig``
writes), listens on 127.0.0.1 (plain HTTP, loopback only) and forwards every
request to that server over TLS; ``proxy.kubeconfig`` is the same credentials
pointed at the proxy. ``inject(kind, times, when=None)`` queues faults for the
next requests ``when(method, path, body)`` accepts (all by default), served
in the order injected:

- ``"429"``: answers 429 Too Many Requests with ``Retry-After`` (not forwarded)
- ``"503"``: answers 503 Service Unavailable (not forwarded)
- ``"404"``: answers ``404 page not found`` in plain text, as a restarted API server
  does for a custom resource type it has not loaded yet (not forwarded)
- ``"reset"``: resets the connection without an answer (not forwarded)
- ``"lost"``: forwards the request, then resets the connection without the
  answer: the request took effect and the client cannot know it did

``hits`` lists ``(kind, method, path)`` of every fault served.
"""
from __future__ import annotations

import base64
import shutil
import socket
import struct
import tempfile
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import urllib3
import yaml

KINDS = ("429", "503", "404", "reset", "lost")
HOP = {"host", "connection", "keep-alive", "proxy-connection", "transfer-encoding",
       "content-length", "te", "upgrade", "content-encoding"}


@dataclass
class Fault:
    kind: str
    left: int
    when: Callable[[str, str, bytes], bool] | None
    retry_after: int


class FaultProxy:
    def __init__(self, kubeconfig: Path | str):
        cfg = yaml.safe_load(Path(kubeconfig).read_text())
        cluster = cfg["clusters"][0]["cluster"]
        self.upstream = cluster["server"].rstrip("/")
        self.token = cfg["users"][0]["user"]["token"]
        ca = (base64.b64decode(cluster["certificate-authority-data"])
              if "certificate-authority-data" in cluster
              else Path(cluster["certificate-authority"]).read_bytes())
        self._dir = Path(tempfile.mkdtemp(prefix="mpc-faultproxy-"))
        (self._dir / "ca.crt").write_bytes(ca)
        self._pool = urllib3.PoolManager(ca_certs=str(self._dir / "ca.crt"), maxsize=8)
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self.hits: list[tuple[str, str, str]] = []
        self.requests = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # --- use ----------------------------------------------------------------------
    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._pool.clear()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def kubeconfig(self) -> Path:
        path = self._dir / "kubeconfig"
        if not path.exists():
            path.write_text(yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "proxy",
                "clusters": [{"name": "proxy", "cluster": {"server": self.url}}],
                "users": [{"name": "proxy", "user": {"token": self.token}}],
                "contexts": [{"name": "proxy", "context": {"cluster": "proxy", "user": "proxy"}}],
            }))
        return path

    def inject(self, kind: str, times: int = 1,
               when: Callable[[str, str, bytes], bool] | None = None,
               retry_after: int = 1) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {KINDS}")
        with self._lock:
            self._faults.append(Fault(kind, times, when, retry_after))

    def pending(self) -> int:
        with self._lock:
            return sum(f.left for f in self._faults)

    # --- serving ------------------------------------------------------------------
    def _take(self, method: str, path: str, body: bytes) -> Fault | None:
        with self._lock:
            self.requests += 1
            for f in self._faults:
                if f.left and (f.when is None or f.when(method, path, body)):
                    f.left -= 1
                    self.hits.append((f.kind, method, path))
                    return f
        return None

    def _forward(self, method: str, path: str, headers, body: bytes) -> urllib3.BaseHTTPResponse:
        fwd = {k: v for k, v in headers.items() if k.lower() not in HOP}
        return self._pool.request(method, self.upstream + path, body=body or None, headers=fwd,
                                  redirect=False, retries=False, preload_content=True,
                                  decode_content=True, timeout=urllib3.Timeout(30))

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _reset(self) -> None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _answer(self, status: int, headers: dict[str, str], data: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() not in HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                fault = proxy._take(self.command, self.path, body)
                kind = fault.kind if fault else None
                if kind == "reset":
                    return self._reset()
                if kind == "404":
                    return self._answer(404, {"Content-Type": "text/plain; charset=utf-8",
                                              "X-Content-Type-Options": "nosniff"},
                                        b"404 page not found\n")
                if kind in ("429", "503"):
                    status = int(kind)
                    msg = (b'{"kind":"Status","apiVersion":"v1","status":"Failure",'
                           b'"message":"injected fault","code":' + kind.encode() + b'}')
                    hdrs = {"Content-Type": "application/json"}
                    if status == 429:
                        hdrs["Retry-After"] = str(fault.retry_after)
                    return self._answer(status, hdrs, msg)
                r = proxy._forward(self.command, self.path, self.headers, body)
                if kind == "lost":
                    return self._reset()
                self._answer(r.status, dict(r.headers), r.data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

        return Handler
