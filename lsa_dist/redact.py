"""Secrets kept out of what a run shows: MLflow params, tags and artifacts, warnings, errors
and the console.

Redacted (replaced by ***): the user-info part of URLs (`https://user:password@host`,
`https://token@host`), query parameters and `NAME=value` assignments whose names look secret
(signed URLs' `X-Amz-Signature`, `X-Amz-Credential`, `X-Amz-Security-Token`, `sig`, `token`,
`key`, ...), and the whole value of config keys whose names look secret. The run folder keeps
the real config, readable by its owner only: a resume needs it. `redact_output` passes what a
process's libraries print (warnings, log records, tracebacks) through the same filter.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, TextIO

REDACTED = "***"
# config keys (and environment-style names) whose values are secrets
SECRET_NAME = re.compile(r"(token|password|passwd|secret|api[_-]?key|access[_-]?key|credential|auth)", re.IGNORECASE)
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<info>[^/@\s'\"?#]+)@")
_QUERY = re.compile(
    r"(?P<name>[?&;][^=&#\s'\"]*(?:token|signature|sig|credential|secret|password|passwd|key|auth)[^=&#\s'\"]*=)"
    r"[^&#\s'\"]*",
    re.IGNORECASE,
)
_ASSIGN = re.compile(
    r"(?P<name>\b\w*(?:token|secret|password|passwd|api_?key|access_?key|credential)\w*=)[^\s&'\";]+",
    re.IGNORECASE,
)


def redact_text(text: str) -> str:
    """`text` with credentials in URLs, secret query parameters and secret NAME=value
    assignments replaced by ***."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    text = _QUERY.sub(lambda m: f"{m['name']}{REDACTED}", text)
    return _ASSIGN.sub(lambda m: f"{m['name']}{REDACTED}", text)


def first_line(err: BaseException) -> str:
    """The error's first line (at most 300 characters), secrets redacted: what a one-line
    message quotes of a library's error (a connection error names the URL it tried)."""
    text = str(err).strip()
    return redact_text(text.splitlines()[0][:300] if text else type(err).__name__)


def redact_value(key: str, value: Any) -> Any:
    """A config value as it may be shown: *** for a secret-looking key, strings (and lists of
    them) through redact_text, anything else as it is."""
    if SECRET_NAME.search(key.rsplit(".", 1)[-1]) and value not in ("", None):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, (list, tuple)):
        return [redact_value(key, v) for v in value]
    return value


def redact_tree(tree: Any, prefix: str = "") -> Any:
    """A nested config (dicts and lists) with every value through redact_value."""
    if isinstance(tree, dict):
        return {
            k: redact_tree(v, f"{prefix}{k}.") if isinstance(v, dict) else redact_value(f"{prefix}{k}", v)
            for k, v in tree.items()
        }
    return redact_value(prefix.rstrip("."), tree)


def redact_params(params: dict[str, Any]) -> dict[str, str]:
    """Flat params as MLflow takes them: redacted, stringified, within its 6000-character limit."""
    return {key: str(redact_value(key, value))[:6000] for key, value in params.items()}


class RedactingStream:
    """A text stream whose writes are redacted before they reach `stream`. Each write is
    redacted whole: warnings, log records and traceback lines are written in one piece."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(redact_text(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def redact_output() -> None:
    """Route this process's Python output through `redact_text`: sys.stdout, sys.stderr and
    the logging handlers that already hold them (libraries configure theirs at import). The
    library's own handlers (lsa_dist.log) look sys.stdout and sys.stderr up at each record, so
    they write through the wrappers whether they were set up before or after this call.
    Output that other programs or C code write to the file descriptors is not covered."""
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values())]
    handlers = [h for lg in loggers if isinstance(lg, logging.Logger) for h in lg.handlers]
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, RedactingStream):
            continue
        wrapped = RedactingStream(stream)
        setattr(sys, name, wrapped)
        for handler in handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is stream:
                handler.setStream(wrapped)
