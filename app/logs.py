"""Logging set-up: stdlib logging, plain text (`key=value` extras appended) or one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

# Attributes every LogRecord has; anything else on a record came from `extra={...}`. uvicorn adds an ANSI-coloured
# copy of its messages as `color_message`: noise in a log file.
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "color_message"}


def record_extras(record: logging.LogRecord) -> dict[str, object]:
    """The `extra={...}` fields of a record, in the order they were given."""
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS}


class JsonFormatter(logging.Formatter):
    """One JSON object per record; `extra={...}` fields are included as they are."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(record_extras(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value ...`: the extras (request id, tenant, tokens…) stay greppable
    in plain text; values with spaces or quotes are JSON-quoted, None values are left out."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        pairs = [f"{k}={_text_value(v)}" for k, v in record_extras(record).items() if v is not None]
        if not pairs:
            return line
        head, sep, tail = line.partition("\n")  # keep a traceback below the fields
        return f"{head} {' '.join(pairs)}{sep}{tail}"


def _text_value(v: object) -> str:
    s = str(v)
    return json.dumps(s, ensure_ascii=False) if not s or any(c in s for c in ' "=\n\t') else s


def configure_logging(level: str = "INFO", *, json_format: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Alembic 1.16+ announces each of its autogenerate plugins at INFO whenever migrations are looked at (every
    # start-up reads the head revision): seven lines of noise before the start-up lines an operator reads.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
