"""One bounded HTTP GET for engine endpoints: timeouts, a size cap, no redirects.

Shared by the model prober and the metrics scraper so both treat engines the same way: an
engine's answer is never trusted to be small, fast or to point elsewhere.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import requests
import urllib3

from .deadline import DeadlineAdapter, deadline_scope


class HttpFetchError(Exception):
    """The request failed; ``transient`` says whether an immediate retry may help.

    ``cause`` is a short, fixed word for metrics: dns, connection, timeout, redirect, oversize,
    http (an unwanted status) or other.
    """

    def __init__(self, reason: str, *, transient: bool, cause: str = "other") -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        self.cause = cause


def fetch(
    session: requests.Session,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float | tuple[float, float],
    max_bytes: int,
) -> tuple[int, bytes]:
    """GET ``url``; returns (status, body).  Bodies over ``max_bytes`` are refused unread.

    ``timeout`` also bounds the whole exchange — status line, headers and body — on sessions
    from :func:`pooled_session`, so an engine trickling bytes (slow loris) cannot hold a
    worker longer than a silent one.
    """
    budget = timeout if isinstance(timeout, int | float) else sum(timeout)
    deadline = time.monotonic() + budget
    with deadline_scope(deadline):
        return _fetch(session, url, headers, timeout, max_bytes, deadline)


def _fetch(session: requests.Session, url: str, headers: Mapping[str, str] | None,
           timeout: float | tuple[float, float], max_bytes: int,
           deadline: float) -> tuple[int, bytes]:
    try:
        # identity: the byte cap then bounds what we hold, and no gzip bomb can expand
        response = session.get(url, headers={"Accept-Encoding": "identity", **(headers or {})},
                               timeout=timeout, allow_redirects=False, stream=True)
    except requests.exceptions.ConnectionError as exc:
        reason = _connection_reason(exc)
        cause = "dns" if reason.startswith("DNS") else "connection"
        raise HttpFetchError(reason, transient=cause == "connection", cause=cause) from None
    except requests.exceptions.Timeout:
        raise HttpFetchError("timed out", transient=False, cause="timeout") from None
    except requests.exceptions.RequestException as exc:
        raise HttpFetchError(f"request failed: {exc.__class__.__name__}",
                             transient=False) from None
    with response:
        if 300 <= response.status_code < 400:
            raise HttpFetchError(f"HTTP {response.status_code} redirect refused "
                                 "(redirects are never followed)", transient=False,
                                 cause="redirect")
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise HttpFetchError(f"body of {declared} bytes exceeds the {max_bytes} byte cap",
                                 transient=False, cause="oversize")
        chunks: list[bytes] = []
        size = 0
        # read1 returns whatever one socket read brings, so the deadline is checked between
        # trickled bytes too (iter_content would wait for a full chunk).
        read = getattr(response.raw, "read1", None) or response.raw.read
        try:
            # identity was asked for: a body compressed anyway is not inflated (no bombs)
            while chunk := read(65536, decode_content=False):
                size += len(chunk)
                if size > max_bytes:
                    raise HttpFetchError(f"body exceeds the {max_bytes} byte cap",
                                         transient=False, cause="oversize")
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise HttpFetchError("timed out reading the body", transient=False,
                                         cause="timeout")
        except HttpFetchError:
            raise
        except (TimeoutError, urllib3.exceptions.TimeoutError):
            raise HttpFetchError("timed out reading the body", transient=False,
                                 cause="timeout") from None
        except Exception as exc:  # urllib3 and socket errors of a broken body
            raise HttpFetchError(f"reading the body failed: {exc.__class__.__name__}",
                                 transient=False, cause="connection") from None
        return response.status_code, b"".join(chunks)


def _connection_reason(exc: requests.exceptions.ConnectionError) -> str:
    text = str(exc)
    if "NameResolution" in text or "Name or service not known" in text \
            or "nodename nor servname" in text or "Failed to resolve" in text:
        return "DNS name does not resolve"
    if "Connection refused" in text:
        return "connection refused"
    if "timed out" in text or "Timeout" in text:
        return "connect timed out"
    return "connection failed"


def pooled_session(pool_size: int, hosts: int | None = None) -> requests.Session:
    """A Session whose pools fit the workers using it: ``pool_size`` connections per host,
    kept for up to ``hosts`` hosts (default ``pool_size``) so keep-alive survives a cycle.

    ``trust_env`` is off: a proxy configured for the router's outbound traffic must not sit
    between it and in-cluster engines.
    """
    session = requests.Session()
    adapter = DeadlineAdapter(pool_connections=hosts or pool_size, pool_maxsize=pool_size,
                              max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.trust_env = False
    return session
