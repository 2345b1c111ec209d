"""Structured JSON logs, one line per decision; never secret material."""
from __future__ import annotations

import datetime as dt
import json
import sys


def event(msg: str, level: str = "info", **fields) -> None:
    line = {"ts": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": level, "msg": msg} | fields
    sys.stdout.write(json.dumps(line, default=str) + "\n")
    sys.stdout.flush()
