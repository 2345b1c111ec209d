"""``mpc-glue``: run the watcher until SIGTERM/SIGINT."""
from __future__ import annotations

import logging
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mpc.runner.kube import Kube

from . import config, logs
from .controller import Controller
from .leader import Leader

log = logging.getLogger("mpc.glue")


def serve(ctrl: Controller, address: str, port: int) -> ThreadingHTTPServer:
    """/metrics, /healthz (threads alive, watches moving), /readyz (first LIST done)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, ctype, code = generate_latest(ctrl.metrics.registry), CONTENT_TYPE_LATEST, 200
            elif path == "/healthz":
                ok = ctrl.healthy()
                body, ctype, code = (b"ok" if ok else b"unhealthy"), "text/plain", 200 if ok else 500
            elif path == "/readyz":
                ok = ctrl.ready()
                body, ctype, code = (b"ok" if ok else b"not ready"), "text/plain", 200 if ok else 503
            else:
                body, ctype, code = b"not found", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # probes every few seconds are not news
            pass

    srv = ThreadingHTTPServer((address, port), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, name="http", daemon=True).start()
    return srv


def main(argv: list[str] | None = None) -> int:
    cfg = config.parse(argv)
    logs.setup(cfg.log_level)
    kube = Kube.connect(cfg.kubeconfig)
    ctrl = Controller(kube, cfg)
    srv = serve(ctrl, cfg.metrics_address, cfg.metrics_port)
    log.info("starting", extra={"fields": {
        "namespace": cfg.namespace, "workers": cfg.workers, "retention": cfg.retention,
        "watchNamespaces": cfg.watch_namespaces or "all",
        "metrics": f"{cfg.metrics_address}:{srv.server_address[1]}"}})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    elector = None
    if cfg.leader_elect:
        elector = Leader(kube, cfg.namespace, cfg.leader_lease, cfg.instance,
                         cfg.lease_duration, cfg.renew_deadline, cfg.retry_period)
        if not elector.acquire(stop):          # a standby is healthy and ready meanwhile
            srv.shutdown()
            return 1 if elector.lost.is_set() else 0
        threading.Thread(target=lambda: elector.lost.wait() and stop.set(), name="lost",
                         daemon=True).start()
    ctrl.start()
    stop.wait()
    log.info("stopping")
    ctrl.stop()
    srv.shutdown()
    if elector is not None:
        if elector.lost.is_set():
            return 1                           # restart as a candidate; never lead stale
        elector.release()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
