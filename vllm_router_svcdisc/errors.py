"""Errors from the API server, reduced to what health checks and logs need.

Messages are built from the status code and the ``Status`` body's message only: never from
request headers, so a bearer token cannot leak into a log line or a health reason.
"""

from __future__ import annotations

import json
from typing import Any


class ApiError(Exception):
    """A failed API call: ``status`` 0 means the server could not be reached."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {message}" if status else message)
        self.status = status
        self.message = message
        self.retry_after = retry_after

    @classmethod
    def from_exception(cls, exc: BaseException) -> ApiError:
        """Translate a client exception (``ApiException``, urllib3 errors, ...)."""
        if isinstance(exc, ApiError):
            return exc
        status = getattr(exc, "status", None)
        if isinstance(status, int) and status > 0:
            return cls(status, _status_message(exc), _retry_after(getattr(exc, "headers", None)))
        return cls(0, f"API server unreachable: {exc.__class__.__name__}: {_first_line(exc)}")


def describe_api_error(error: BaseException) -> str:
    """A one-line, readable reason, with the RBAC hint operators need on 401/403."""
    if not isinstance(error, ApiError):
        return f"{error.__class__.__name__}: {_first_line(error)}"
    if error.status == 403:
        return (f"forbidden (403): {error.message} - RBAC must grant list and watch "
                "(see deploy/rbac.yaml)")
    if error.status == 401:
        return f"unauthorized (401): {error.message} - check the service account token"
    if error.status == 0:
        return error.message
    return f"HTTP {error.status}: {error.message}"


def _status_message(exc: BaseException) -> str:
    body: Any = getattr(exc, "body", None)
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str) and body:
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and parsed.get("message"):
            return str(parsed["message"])[:500]
    reason = getattr(exc, "reason", None)
    return str(reason or exc.__class__.__name__)[:500]


def _retry_after(headers: Any) -> float | None:
    if not headers:
        return None
    try:
        value = headers.get("Retry-After")
    except AttributeError:
        return None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
