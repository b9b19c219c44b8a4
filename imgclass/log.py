"""One log line per event: `timestamp server-name script action key=value ...`, with the request id."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import random
import re
import sys
import time

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

REQUEST_ID_HEADER = "X-Request-ID"


# Ids only need to be unique, not secret: a userspace generator seeded once from the OS avoids a
# getrandom() system call per request.
_ids = random.Random(os.urandom(16))


def _reseed() -> None:
    _ids.seed(os.urandom(16))


os.register_at_fork(after_in_child=_reseed)  # a forked child must not repeat its parent's ids


def new_request_id() -> str:
    return f"{_ids.getrandbits(64):016x}"


_PLAIN = re.compile(r"[A-Za-z0-9._:/@+,()\[\]-]+")


def _value(value: object) -> str:
    """A value as one field: plain tokens as they are, anything else quoted with JSON's escapes, so
    no input (a request id, a URL, a message) can end the field, start another, or break the line."""
    text = str(value)
    if _PLAIN.fullmatch(text):
        return text
    return json.dumps(text, ensure_ascii=False)


class EventLogger:
    """Writes `timestamp server script action key=value ...` lines through stdlib logging."""

    def __init__(self, server: str, script: str, logger: logging.Logger) -> None:
        self.server = server
        self.script = script
        self._logger = logger

    def _emit(self, level: int, action: str, fields: dict[str, object]) -> None:
        if not self._logger.isEnabledFor(level):
            return
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        parts = [stamp, _value(self.server), self.script, action, f"request_id={_value(request_id.get())}"]
        parts += [f"{k}={_value(v)}" for k, v in fields.items()]
        self._logger.log(level, " ".join(parts))

    def notice(self, action: str, **fields: object) -> None:
        """A lifecycle line (listening, stopping) that every log level shows: supervisors read it."""
        self._emit(max(logging.INFO, self._logger.getEffectiveLevel()), action, fields)

    def enabled(self, level: int) -> bool:
        return self._logger.isEnabledFor(level)

    def info(self, action: str, **fields: object) -> None:
        self._emit(logging.INFO, action, fields)

    def debug(self, action: str, **fields: object) -> None:
        self._emit(logging.DEBUG, action, fields)

    def warning(self, action: str, **fields: object) -> None:
        self._emit(logging.WARNING, action, fields)

    def error(self, action: str, **fields: object) -> None:
        self._emit(logging.ERROR, action, fields)


def get_logger(server: str, script: str, level: str = "INFO") -> EventLogger:
    logger = logging.getLogger(f"imgclass.{script}")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
    return EventLogger(server, script, logger)
