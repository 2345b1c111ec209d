"""Structured logs: one JSON object per line on stderr.

Fields come from ``extra={"fields": {...}}``. Only names, namespaces, uids,
platforms and reasons are ever logged; the watcher never reads secrets, so
there is no secret material to leak.
"""
from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for k, v in fields.items():
                out.setdefault(k, v)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # urllib3 warnings about retries would be unstructured noise.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    # the client's leader election logs every attempt; glue/leader.py logs the changes
    logging.getLogger("leaderelection").setLevel(logging.WARNING)
