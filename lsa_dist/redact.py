"""Secrets kept out of what a run shows: MLflow params, tags and artifacts, warnings, errors
and the console.

Redacted (replaced by ***): the user-info part of URLs (`https://user:p@ss@host`: all of it, up
to the last @ before the host; `https://token@host`); the values of query parameters, `NAME=value`
assignments, headers and `name: value` pairs whose names are secret (`is_secret_name`: signed
URLs' `X-Amz-Signature`, `X-Amz-Credential`, `sig`; `token`, `api_key`, `password`,
`Authorization: Bearer ...`, `X-Api-Key: ...`, `{'password': ...}` in a string); curl's
`-u user:password`; bearer tokens; and the whole value of config keys whose names are secret
or that a caller hides (`hidden`: the keys whose values come from environment variables,
tracking.from_env). Names match by whole words: `model.options.author` or `?monkey=` stay as
they are. The run folder keeps the real config, readable by its owner only: a resume needs it.
`redact_output` passes what a process's libraries print (warnings, log records, tracebacks)
through the same filter.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, TextIO

REDACTED = "***"
# names (config keys, query parameters, NAME=value, headers) are secret when one of their words is
# one of these; words are what -, _, . and the like separate, and the last part of a camelCase word
# (apiKey, accessToken); `author`, `monkey` and `tokens` hold none of them
SECRET_WORDS = frozenset(
    {
        "token",
        "password",
        "passwd",
        "passphrase",
        "secret",
        "key",
        "apikey",
        "accesskey",
        "secretkey",
        "privatekey",
        "accesstoken",
        "authtoken",
        "credential",
        "credentials",
        "auth",
        "authorization",
        "cookie",
        "signature",
        "sig",
        "jwt",
    }
)
_WORDS = re.compile(r"[^A-Za-z0-9]+")
_CAMEL = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s'\"?#]*@")  # up to the authority's last @
_QUERY = re.compile(r"(?P<name>[?&;][^=&#\s'\"?;]+=)(?P<value>[^&#\s'\";]*)")
_ASSIGN = re.compile(r"(?<![\w.-])(?P<name>[A-Za-z_][\w.-]*=)(?P<value>'[^']*'|\"[^\"]*\"|[^\s&'\";]+)")
# `Name: value` (a header, YAML) and `'name': value` (a dict or JSON in a string)
_COLON = re.compile(
    r"(?<![\w-])(?P<name>[A-Za-z][\w-]*)(?P<sep>['\"]?[ \t]*:[ \t]*)"
    r"(?P<value>'[^']*'|\"[^\"]*\"|[^\s'\",}][^'\"\r\n,}]*)"
)
# curl's -u/--user (and -U/--proxy-user) user:password
_USER_FLAG = re.compile(
    r"(?P<flag>(?<!\S)(?:-u|-U|--user|--proxy-user)(?:[ \t]+|=))"
    r"(?P<value>'[^']*:[^']*'|\"[^\"]*:[^\"]*\"|[^\s'\"-][^\s'\"]*:[^\s'\"]*)"
)
_BEARER = re.compile(r"\b(?P<scheme>Bearer[ \t]+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)


def is_secret_name(name: str, alone: bool = True) -> bool:
    """Whether a name (a config key's last part, a query parameter, a variable, a header) is one
    whose value is a secret: one of its words is in SECRET_WORDS. Whole words only, so that
    `author` or `?monkey=` stay visible while `api_key`, `X-Amz-Signature` and `sig` do not.
    With `alone` false, `key` on its own is no secret (`key=value` in a usage line, `key: str`
    in a traceback's source line); as a query parameter (`?key=`) or a config key it is."""
    if not alone and name.lower() == "key":
        return False
    for word in _WORDS.split(name):
        parts = _CAMEL.findall(word)
        if word.lower() in SECRET_WORDS or (len(parts) > 1 and parts[-1].lower() in SECRET_WORDS):
            return True
    return False


def _hidden(value: str) -> str:
    """*** in place of a value, in the quotes it had."""
    return f"{value[0]}{REDACTED}{value[0]}" if value[:1] in ("'", '"') else REDACTED


def _named(match: re.Match[str]) -> str:
    """A `name=value` or `name: value` match with its value hidden if the name is secret (a
    query parameter's name even when it is `key` alone)."""
    name = match["name"]
    if not is_secret_name(name.strip("?&;="), alone=name[0] in "?&;"):
        return match[0]
    return match[0][: match.start("value") - match.start()] + _hidden(match["value"])


def redact_text(text: str) -> str:
    """`text` with the secrets it may hold replaced by ***: URL credentials, the values of secret
    query parameters, NAME=value assignments, headers and `name: value` pairs (`Authorization:
    Bearer ...`, `X-Api-Key: ...`, `{'password': ...}`), `curl -u user:pass` and bearer tokens."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    text = _BEARER.sub(lambda m: f"{m['scheme']}{REDACTED}", text)
    text = _QUERY.sub(_named, text)
    text = _ASSIGN.sub(_named, text)
    text = _COLON.sub(_named, text)
    return _USER_FLAG.sub(lambda m: f"{m['flag']}{_hidden(m['value'])}", text)


def first_line(err: BaseException) -> str:
    """The error's first line (at most 300 characters), secrets redacted: what a one-line
    message quotes of a library's error (a connection error names the URL it tried)."""
    text = str(err).strip()
    return redact_text(text.splitlines()[0][:300] if text else type(err).__name__)


def redact_value(key: str, value: Any) -> Any:
    """A config value as it may be shown: *** for a secret-looking key, strings (and lists of
    them) through redact_text, anything else as it is."""
    if is_secret_name(key.rsplit(".", 1)[-1]) and value not in ("", None):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, (list, tuple)):
        return [redact_value(key, v) for v in value]
    return value


def redact_tree(tree: Any, prefix: str = "", hidden: list[str] | tuple[str, ...] = ()) -> Any:
    """A nested config (dicts and lists) with every value through redact_value, and *** for the
    keys in `hidden` (and below them)."""
    key = prefix.rstrip(".")
    if _is_hidden(key, hidden) and tree not in ("", None):
        return REDACTED
    if isinstance(tree, dict):
        return {k: redact_tree(v, f"{prefix}{k}.", hidden) for k, v in tree.items()}
    return redact_value(key, tree)


def redact_params(params: dict[str, Any], hidden: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """Flat params as MLflow takes them: redacted (*** for the keys in `hidden` and below them),
    stringified, within its 6000-character limit."""
    return {
        key: REDACTED if _is_hidden(key, hidden) and value not in ("", None) else str(redact_value(key, value))[:6000]
        for key, value in params.items()
    }


def _is_hidden(key: str, hidden: list[str] | tuple[str, ...]) -> bool:
    """Whether `key` is one of `hidden` or below one of them."""
    return any(key == h or key.startswith(h + ".") for h in hidden)


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
