"""What recoup writes out: secrets redacted, JSON strict.

Secrets: a value read from a secret environment variable (the judge's API key) is registered with
:func:`register_secret`; :func:`redact` replaces every registered value (and anything after
``Bearer``/``Authorization:``) with ``[REDACTED]``. :class:`RedactFilter` applies it to every log
record; :func:`dumps` to every JSON recoup writes (results, store rows, manifests, run files), and the
CLI to every error line, so a key an endpoint echoes back is never written anywhere.

JSON: :func:`dumps` writes non-finite floats (NaN, +-Infinity) as ``null``; Python's ``json`` would write
the bare tokens ``NaN``/``Infinity`` that strict parsers (RFC 8259, JavaScript, jq) reject. A ``null``
metric means "not a number" (e.g. a standard error from one example); its ``n`` says why.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Any

REDACTED = "[REDACTED]"
SECRET_ENV = ("OPENAI_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")  # registered by the CLI at start
_SECRETS: set[str] = set()
# an echoed header: "Authorization: Bearer TOKEN" / "Bearer TOKEN" (token-like, 8+ characters)
_HEADER = re.compile(r"((?i:authorization)[\"']?\s*[:=]\s*[\"']?(?:Bearer\s+)?|Bearer\s+)[A-Za-z0-9._~+/=-]{8,}")


def register_secret(value: str | None) -> None:
    """Remember ``value`` so that :func:`redact` hides it (values under 4 characters are not secrets)."""
    if value and len(value) >= 4:
        _SECRETS.add(value)


def secret_env(name: str) -> str | None:
    """The value of the secret environment variable ``name`` (registered for redaction), or None."""
    value = os.environ.get(name)
    register_secret(value)
    return value


def redact(text: str) -> str:
    """``text`` with every registered secret and every bearer token replaced by ``[REDACTED]``."""
    if not isinstance(text, str):
        return text
    for secret in sorted(_SECRETS, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _HEADER.sub(lambda m: m.group(1) + REDACTED, text)


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {(redact(k) if isinstance(k, str) else k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that never writes bare NaN/Infinity (they become ``null``) nor a registered secret.

    Objects json cannot encode are written with ``str`` (as ``default=str`` would), then cleaned."""
    plain = json.loads(json.dumps(obj, default=kwargs.pop("default", str)))
    return json.dumps(_clean(plain), allow_nan=False, **kwargs)


class RedactFilter(logging.Filter):
    """A logging filter that redacts registered secrets from a record's message and arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler  # noqa: BLE001
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


def install_log_redaction() -> None:
    """Redact secrets from every record every root handler emits (idempotent)."""
    root = logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, RedactFilter) for f in handler.filters):
            handler.addFilter(RedactFilter())
