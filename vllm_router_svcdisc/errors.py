"""Internal: the package's exception tree, and errors from the API server reduced to what health
checks and logs need.

:class:`SvcDiscError` is the base of every public exception the package raises: ``except
SvcDiscError`` catches them all.  Each one also keeps the built-in base it always had
(``ValueError``, ``RuntimeError``), so existing ``except`` clauses keep working.  Import them from
the package root (all but the last two, which belong to documented entry points); each also stays
importable from the module that defines it:

- ``ApiError`` (here): a failed Kubernetes API call;
- ``vllm_router_svcdisc.discovery.DiscoveryConfigError`` (also a ``RuntimeError``): no usable
  Kubernetes configuration;
- ``vllm_router_svcdisc.http.EngineCallError``: an engine call (probe, scrape) failed;
- ``vllm_router_svcdisc.k8s_objects.ObjectError`` (also a ``ValueError``): an object too broken
  to use;
- ``vllm_router_svcdisc.vllm_metrics.MetricsParseError`` (also a ``ValueError``): not a usable
  metrics page;
- ``vllm_router_svcdisc.prodstack.HostShapeError`` (also a ``RuntimeError``): production-stack
  missing or shaped differently;
- ``vllm_router_svcdisc.sim.selectors.SelectorError`` (also a ``ValueError``): a selector the
  (simulated) API server rejects.

API error messages are built from the status code and the ``Status`` body's message only: never
from request headers, so a bearer token cannot leak into a log line or a health reason.
"""

from __future__ import annotations

import json
from typing import Any


class SvcDiscError(Exception):
    """Base class of every public exception of vllm_router_svcdisc."""


class ApiError(SvcDiscError):
    """A failed API call: ``status`` 0 means the server could not be reached.

    ``cause`` is the first ``details.causes[].reason`` of the Status body, e.g.
    ``ResourceVersionTooLarge`` on a 504 from a server whose cache is behind.
    """

    def __init__(self, status: int, message: str, retry_after: float | None = None,
                 cause: str | None = None) -> None:
        super().__init__(f"{status} {message}" if status else message)
        self.status = status
        self.message = message
        self.retry_after = retry_after
        self.cause = cause

    @classmethod
    def from_status(cls, status: dict[str, Any]) -> ApiError:
        """From a metav1.Status object, as carried by a watch ``ERROR`` event."""
        code = status.get("code")
        message = str(status.get("message") or status.get("reason") or "watch error")[:500]
        details = status.get("details")
        retry_after = details.get("retryAfterSeconds") if isinstance(details, dict) else None
        return cls(code if isinstance(code, int) else 500, message,
                   float(retry_after) if isinstance(retry_after, int | float) else None,
                   _first_cause(status))

    @classmethod
    def from_exception(cls, exc: BaseException) -> ApiError:
        """Translate a client exception (``ApiException``, urllib3 errors, ...)."""
        if isinstance(exc, ApiError):
            return exc
        status = getattr(exc, "status", None)
        if isinstance(status, int) and status > 0:
            body = _status_body(exc)
            return cls(status, _status_message(exc, body),
                       _retry_after(getattr(exc, "headers", None)), _first_cause(body))
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


def _status_body(exc: BaseException) -> dict[str, Any]:
    """The Status object of an ``ApiException``'s body, or {} when there is none."""
    body: Any = getattr(exc, "body", None)
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str) and body:
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            return parsed
    return {}


def _first_cause(status: dict[str, Any]) -> str | None:
    details = status.get("details")
    causes = details.get("causes") if isinstance(details, dict) else None
    if isinstance(causes, list) and causes and isinstance(causes[0], dict):
        reason = causes[0].get("reason")
        return str(reason) if reason else None
    return None


def _status_message(exc: BaseException, body: dict[str, Any]) -> str:
    if body.get("message"):
        return str(body["message"])[:500]
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
