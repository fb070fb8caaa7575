"""Structured logs: every line casf-proxy writes to stderr is one JSON object.

``{"ts": ..., "level": ..., "logger": ..., "msg": ..., ...}``; a record whose
message is a mapping (the per-request access line, see ``proxy.core``)
has its fields merged in, and ``extra={"fields": {...}}`` adds fields to any
other line. Exceptions become an ``exc`` string field, never extra lines.
``CASF_LOG_LEVEL`` (debug, info, warning, error; default info) sets the level
of every logger; the access lines are at info.

Nothing here adds request bodies or credentials: callers never log them (the
access line names the key id, never the key).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

import orjson

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "warn": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}
_RESERVED = ("ts", "level", "logger", "msg")


def redact_url(url: str) -> str:
    """``url`` with any userinfo (``user:password@``) before its host replaced by ``***``.

    For every URL that can reach a log line or an error message: a password
    (or a token used as the user name) never does.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i != -1), default=len(rest))
    _, at, host = rest[:end].rpartition("@")
    if not at:
        return url
    return f"{scheme}://***@{host}{rest[end:]}"


def level_from(name: str) -> int:
    """A ``CASF_LOG_LEVEL`` value as a logging level (unknown names: info)."""
    return _LEVELS.get(name.strip().lower(), logging.INFO)


class JsonFormatter(logging.Formatter):
    """One JSON object per record; ``static`` fields (e.g. the worker index) on every line."""

    def __init__(self, static: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        msg = record.msg
        if isinstance(msg, Mapping):
            out["msg"] = "request" if record.name == "casf.access" else record.name
            fields: Mapping[str, Any] = msg
        else:
            try:
                out["msg"] = record.getMessage()
            except Exception:  # a bad format string must not lose the line
                out["msg"] = str(msg)
            fields = getattr(record, "fields", None) or {}
        for k, v in fields.items():
            if k not in _RESERVED:
                out[k] = v
        out.update(self.static)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(out, default=str).decode()


def setup_logging(level_name: str, static: Mapping[str, Any] | None = None) -> None:
    """JSON lines on stderr for every logger (ours, aiohttp's, asyncio's, warnings)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(static))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_from(level_name))
    logging.captureWarnings(True)
