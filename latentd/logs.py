"""Structured logging: one event name and key=value fields per line."""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys
from typing import Any


def configure(level: str = "info") -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        force=True,
    )
    # Per-request access lines and RQ's chatter are noise at info level.
    for noisy in ("uvicorn.access", "rq.worker", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    # `kill -USR1 PID` writes every thread's stack to stderr, for a process that seems stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def _format_value(value: Any) -> str:
    text = str(value)
    if not text or any(c.isspace() for c in text) or '"' in text:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log `name key=value ...`; callers must never pass API keys or image bytes."""
    if logger.isEnabledFor(level):
        parts = [name, *(f"{k}={_format_value(v)}" for k, v in fields.items() if v is not None)]
        logger.log(level, " ".join(parts))
