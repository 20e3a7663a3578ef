"""The proxy's log output: `text` for people, `json` (one object per line) for log pipelines.

Request lines (logger `proxy.access`, proxy/observability/observe.py) carry their fields in
`record.fields`; in JSON they become top-level keys next to `time`, `level`, `logger` and
`message` (`"request"`), so no one has to parse the text form.
"""

from __future__ import annotations

import argparse
import json
import logging
from datetime import UTC, datetime
from typing import Any

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record; `record.fields` (a dict) is merged in at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": "request" if isinstance(fields, dict) else record.getMessage(),
        }
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


def make_formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"unknown log format {log_format!r}; expected one of {LOG_FORMATS}")


def configure_logging(level: str, log_format: str = "text") -> None:
    """Root logging to stderr in `log_format` at `level` (replaces earlier root handlers)."""
    handler = logging.StreamHandler()
    handler.setFormatter(make_formatter(log_format))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def log_format(text: str) -> str:
    """argparse type of --log-format, so a bad PROXY_LOG_FORMAT fails like a bad flag."""
    value = text.strip().lower()
    if value not in LOG_FORMATS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LOG_FORMATS)}, got {text!r}")
    return value
