"""API errors become one readable line without secrets, with the RBAC hint on 401/403."""

from __future__ import annotations

import json

from kubernetes.client import ApiException

from vllm_router_svcdisc.errors import ApiError, describe_api_error


class _Response:
    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.status, self.reason, self.data = status, "Reason", body
        self.headers = headers  # kubernetes 37 reads .headers, 35/36 call getheaders()

    def getheaders(self) -> dict[str, str]:
        return self.headers


def _api_exception(status: int, body: object, headers: dict[str, str] | None = None):
    raw = json.dumps(body).encode() if not isinstance(body, bytes) else body
    return ApiException(http_resp=_Response(status, raw, headers or {}))


def test_forbidden_names_rbac_and_the_status_message() -> None:
    error = ApiError.from_exception(_api_exception(403, {
        "kind": "Status", "message": 'services is forbidden: User "x" cannot list'}))
    text = describe_api_error(error)
    assert error.status == 403
    assert "forbidden (403)" in text and "cannot list" in text and "RBAC" in text


def test_unauthorized_points_at_the_token() -> None:
    text = describe_api_error(ApiError.from_exception(_api_exception(401, {"message": "no"})))
    assert text.startswith("unauthorized (401)") and "token" in text


def test_retry_after_is_read_from_the_headers() -> None:
    error = ApiError.from_exception(
        _api_exception(429, {"message": "slow down"}, {"Retry-After": "3"}))
    assert error.retry_after == 3.0 and describe_api_error(error) == "HTTP 429: slow down"


def test_a_bad_retry_after_is_ignored() -> None:
    error = ApiError.from_exception(_api_exception(429, {}, {"Retry-After": "soon"}))
    assert error.retry_after is None


def test_a_non_json_body_falls_back_to_the_reason() -> None:
    error = ApiError.from_exception(_api_exception(500, b"<html>oops</html>"))
    assert error.message == "Reason"


def test_unreachable_server_has_status_0_and_says_so() -> None:
    error = ApiError.from_exception(ConnectionRefusedError("[Errno 111] Connection refused"))
    assert error.status == 0
    assert describe_api_error(error).startswith("API server unreachable: ConnectionRefusedError")


def test_other_exceptions_are_described_by_type_and_first_line() -> None:
    assert describe_api_error(ValueError("bad\nsecond line")) == "ValueError: bad"


def test_an_api_error_passes_through_unchanged() -> None:
    error = ApiError(404, "not found")
    assert ApiError.from_exception(error) is error


# --- one exception tree ---------------------------------------------------------------------


def _public_exception_classes() -> list[type[BaseException]]:
    """Every public exception class defined anywhere in the package (``__main__`` aside)."""
    import importlib
    import inspect
    import pkgutil

    import vllm_router_svcdisc

    found: list[type[BaseException]] = []
    for info in pkgutil.walk_packages(vllm_router_svcdisc.__path__, "vllm_router_svcdisc."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__ == info.name and not name.startswith("_")):
                found.append(obj)
    return found


def test_every_public_exception_derives_from_the_package_base() -> None:
    from vllm_router_svcdisc import SvcDiscError

    classes = _public_exception_classes()
    names = {cls.__name__ for cls in classes}
    # the ones documented today, so the walk itself cannot silently find nothing
    assert {"ApiError", "DiscoveryConfigError", "EngineCallError", "ObjectError",
            "MetricsParseError", "HostShapeError", "SelectorError", "SvcDiscError"} <= names
    outside = [f"{cls.__module__}.{cls.__qualname__}" for cls in classes
               if not issubclass(cls, SvcDiscError)]
    assert outside == [], f"public exceptions outside the SvcDiscError tree: {outside}"


def test_documented_names_keep_their_modules_and_built_in_bases() -> None:
    from vllm_router_svcdisc.discovery import DiscoveryConfigError
    from vllm_router_svcdisc.errors import SvcDiscError
    from vllm_router_svcdisc.http import EngineCallError
    from vllm_router_svcdisc.k8s_objects import ObjectError
    from vllm_router_svcdisc.prodstack import HostShapeError
    from vllm_router_svcdisc.sim.selectors import SelectorError
    from vllm_router_svcdisc.vllm_metrics import MetricsParseError

    assert issubclass(DiscoveryConfigError, RuntimeError)
    assert issubclass(HostShapeError, RuntimeError)
    assert issubclass(ObjectError, ValueError)
    assert issubclass(MetricsParseError, ValueError)
    assert issubclass(SelectorError, ValueError)
    assert issubclass(ApiError, SvcDiscError) and issubclass(EngineCallError, SvcDiscError)
    try:
        raise DiscoveryConfigError("no configuration")
    except SvcDiscError as caught:  # one except clause for the whole package
        assert str(caught) == "no configuration"
