"""A real OCI registry for tests: Debian's docker-registry (distribution) on loopback."""
from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .procs import Daemon, free_port, wait_for


@dataclass
class Registry:
    workdir: Path
    host: str = "127.0.0.1"
    port: int = 0
    daemon: Daemon | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self) -> "Registry":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port(self.host)
        cfg = self.workdir / "config.yml"
        cfg.write_text(yaml.safe_dump({
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.workdir / "data")},
                        "delete": {"enabled": True}},
            "http": {"addr": self.address},
        }))
        self.daemon = Daemon("registry", ["docker-registry", "serve", str(cfg)],
                             self.workdir / "registry.log").start()
        wait_for("registry /v2/", lambda: urllib.request.urlopen(
            self.url + "/v2/", timeout=1).status == 200, timeout=20, log=self.daemon.log)
        return self

    def stop(self) -> None:
        if self.daemon:
            self.daemon.stop(grace=3)
            self.daemon = None
