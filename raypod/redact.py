"""Keep secrets out of everything raypod prints, logs, writes or sends to MLflow.

* :func:`redact` replaces a config value whose key or value looks secret (tokens,
  passwords, API keys, URLs with credentials) by :data:`REDACTED`; applied to a whole
  config dump it is what ``raypod check``, MLflow params and ``config.yaml`` show.
* :func:`redact_uri` keeps a URI readable but drops its secrets:
  ``http://user:secret@host/?token=abc`` becomes ``http://user:***@host/?token=***``.
* :func:`redact_text` does the same for every URI and token-looking word in free text
  (log messages, error sentences, tracebacks).
* :func:`install_log_redaction` makes every log record of the process (raypod's,
  MLflow's and Ray's loggers, whatever their handlers) and every Python warning pass
  through :func:`redact_text`; the ``raypod`` command installs it first thing.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

REDACTED = "***REDACTED***"
MASK = "***"

_SECRET_KEY_RE = re.compile(
    r"token(?!izer|s)|passw(or)?d|secret|credential|api[_-]?key|access[_-]?key|private[_-]?key",
    re.IGNORECASE,
)
_TOKENS = (r"sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}"
           r"|xox[abposr]-[A-Za-z0-9-]{10,}|(?:AKIA|ASIA)[A-Z0-9]{16}|glpat-[A-Za-z0-9_-]{20,}"
           r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")
_SECRET_VALUE_RE = re.compile(
    rf"^({_TOKENS})$"
    r"|://[^/\s:@]+:[^/\s@]+@"  # credentials inside a URL
    r"|^\s*bearer\s+\S{8,}",
    re.IGNORECASE,
)
_USERINFO_RE = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/\s:@?#]*)"
                          r"(?::(?P<password>[^/\s@?#]*))?@")
_SECRET_PARAM = (r"[^=&#\s?;]*(?:token|sig|signature|secret|passw(?:or)?d|pwd|credential|api[_-]?key"
                 r"|access[_-]?key|private[_-]?key|auth|session)[^=&#\s;]*")
_QUERY_RE = re.compile(rf"(?P<head>[?&;]{_SECRET_PARAM}=)(?P<value>[^&#\s'\"]+)", re.IGNORECASE)
_TOKEN_WORD_RE = re.compile(rf"\b(?:{_TOKENS})|(?<=[Bb]earer )\S{{8,}}")


def redact(key: str, value: Any) -> Any:
    """Return ``value``, or :data:`REDACTED` when the key or the value looks secret.

    Args:
        key: A (dotted) config key; keys naming tokens, passwords, secrets,
            credentials, API or access keys are redacted whatever their value.
        value: The value; strings that look like tokens, keys or URLs with
            credentials are redacted whatever their key. Dicts and lists are
            redacted element by element.

    Returns:
        The value with secrets replaced.
    """
    if _SECRET_KEY_RE.search(key) and value not in (None, "", {}, []):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(f"{key}.{k}", v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(key, v) for v in value]
    if isinstance(value, str) and _SECRET_VALUE_RE.search(value):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)  # a secret query parameter inside an otherwise plain value
    return value


def redact_config(cfg: Any) -> dict[str, Any]:
    """A :class:`raypod.config.JobConfig` as a plain dict, every secret replaced by :data:`REDACTED`."""
    return redact("", cfg.model_dump(mode="json"))


def redact_json(value: Any) -> Any:
    """A JSON-like value (dicts, lists, strings, numbers) with :func:`redact_text` applied to
    every string in it: what raypod writes to ``summary.json`` and similar records."""
    if isinstance(value, dict):
        return {k: redact_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_json(v) for v in value]
    return redact_text(value) if isinstance(value, str) else value


def _userinfo(m: re.Match[str]) -> str:
    user, password = m.group("user"), m.group("password")
    if password is not None:
        return f"{m.group('scheme')}{user}:{MASK}@"
    return f"{m.group('scheme')}{MASK}@" if user else m.group(0)  # a lone user name may be a token


def redact_uri(uri: Any) -> Any:
    """``uri`` without its secrets: ``user:pass@`` becomes ``user:***@`` (a lone ``token@``
    becomes ``***@``) and secret-looking query parameters (``?token=``, ``&sig=``,
    ``X-Amz-Signature=`` ...) get ``***`` as their value. Anything else is returned as it is."""
    if not isinstance(uri, str):
        return uri
    return _QUERY_RE.sub(lambda m: m.group("head") + MASK, _USERINFO_RE.sub(_userinfo, uri))


def redact_text(text: str) -> str:
    """Free text with the secrets of every URI in it, and every token-looking word, masked."""
    if not text:
        return text
    out = redact_uri(text)
    return _TOKEN_WORD_RE.sub(MASK, out)


class RedactingFilter(logging.Filter):
    """Rewrites a record's message (and traceback text) through :func:`redact_text`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is left to logging's own error
            return True
        clean = redact_text(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


_installed = False


def install_log_redaction() -> None:
    """Redact every log record this process creates and every warning it shows (idempotent).

    A handler filter would miss loggers with handlers of their own that do not
    propagate (MLflow's and Ray's), so records are redacted where they are made: the
    record factory. Warnings go through ``warnings.formatwarning``.
    """
    global _installed
    if _installed:
        return
    _installed = True
    make = logging.getLogRecordFactory()
    flt = RedactingFilter()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        flt.filter(record)
        return record

    logging.setLogRecordFactory(factory)
    fmt = warnings.formatwarning

    def formatwarning(*args: Any, **kwargs: Any) -> str:
        return redact_text(fmt(*args, **kwargs))

    warnings.formatwarning = formatwarning
