"""Secrets never leave the head: a URI's password (`scheme://user:***@host`) and secret-looking query values are
replaced wherever reteq prints, logs to MLflow or writes a file (docs/security.md).

The one sanctioned place for a password is the process environment or an env file readable by one user
(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD; S3 keys: the machine's credential chain): a URI carrying
one still works (a storage_path with one is refused at validate), and what reteq
says about it is redacted. This module imports only the standard library, so every layer can use it.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s]*):[^@/\s]*@")
_QUERY = re.compile(r"(?i)(?P<head>[?&;](?:password|passwd|pwd|token|secret|secret_key|secret_access_key|"
                    r"access_key|session_token|sig|signature|x-amz-signature|x-amz-credential)=)[^&;#\s\"']*")


def redact(text: str) -> str:
    """`text` with every URI password and secret query value masked: `postgresql://mlflow:***@db:5432/x`."""
    text = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m['head']}{MASK}", text)


def redact_tree(obj: Any) -> Any:
    """A copy of a JSON-like value (a config dump) with every string redacted."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_tree(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact_tree(v) for v in obj]
    return obj


def has_secret(text: str) -> bool:
    return redact(text) != text


TRACKING_USERNAME = "MLFLOW_TRACKING_USERNAME"
TRACKING_PASSWORD = "MLFLOW_TRACKING_PASSWORD"


def _without_userinfo(parts) -> str:
    netloc = parts.hostname or ""
    netloc = f"[{netloc}]" if ":" in netloc else netloc
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def tracking_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """An http(s) MLflow URI without its `user:password@` -> (the clean URI, the MLflow variables that carry
    them). MLflow prints an http store's URI itself ("View run ... at"); a clean URI cannot leak what it no
    longer holds, and MLflow's client sends MLFLOW_TRACKING_USERNAME / _PASSWORD as basic auth. Other URIs
    (a database's, whose driver needs the password in it) are returned as they are, and redacted when shown."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or parts.password is None:
        return uri, {}
    return _without_userinfo(parts), {TRACKING_USERNAME: unquote(parts.username or ""), TRACKING_PASSWORD: unquote(parts.password)}

