"""A real OCI registry for tests: Debian's docker-registry (distribution) on loopback."""
from __future__ import annotations

import urllib.error
from typing import TYPE_CHECKING
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .procs import Daemon, free_port, wait_for

if TYPE_CHECKING:
    from .tokenauth import TokenService


@dataclass
class Registry:
    workdir: Path
    host: str = "127.0.0.1"
    port: int = 0
    daemon: Daemon | None = field(default=None, repr=False)
    # (user, password): every request must authenticate (Basic, htpasswd with bcrypt)
    auth: tuple[str, str] | None = field(default=None, repr=False)
    # or Bearer tokens of a token service (tokenauth.TokenService, started)
    token: "TokenService | None" = field(default=None, repr=False)

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
        extra = {}
        if self.auth:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                import crypt            # glibc's crypt: bcrypt ($2b$), as htpasswd -B writes
                hashed = crypt.crypt(self.auth[1], crypt.mksalt(crypt.METHOD_BLOWFISH))
            (self.workdir / "htpasswd").write_text(f"{self.auth[0]}:{hashed}\n")
            extra["auth"] = {"htpasswd": {"realm": "mpc-test",
                                          "path": str(self.workdir / "htpasswd")}}
        elif self.token:
            extra["auth"] = self.token.registry_auth()
        cfg.write_text(yaml.safe_dump({
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.workdir / "data")},
                        "delete": {"enabled": True}},
            "http": {"addr": self.address},
            **extra,
        }))
        self.daemon = Daemon("registry", ["docker-registry", "serve", str(cfg)],
                             self.workdir / "registry.log").start()
        wait_for("registry /v2/", self._answers, timeout=20, log=self.daemon.log)
        return self

    def _answers(self) -> bool:
        try:
            return urllib.request.urlopen(self.url + "/v2/", timeout=1).status == 200
        except urllib.error.HTTPError as e:
            return bool(self.auth or self.token) and e.code == 401

    def stop(self) -> None:
        if self.daemon:
            self.daemon.stop(grace=3)
            self.daemon = None
