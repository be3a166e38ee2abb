"""The informer's timing rules on a fake clock, against a scripted list function (no sleeping).

Each test scripts how the "server" answers LIST and WATCH, runs the informer's loop on the test
thread until the script has been used up, and checks the waits the loop asked the clock for.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import urllib3
from kubernetes.client import ApiException

from vllm_router_svcdisc.backoff import BackoffPolicy
from vllm_router_svcdisc.clock import FakeClock
from vllm_router_svcdisc.informer import (
    MIN_HEALTHY_WATCH_SECONDS,
    Informer,
    InformerConfig,
    InformerStatus,
)

CONFIG = InformerConfig()  # client-go's defaults: the rules under test are the shipped ones


class Response:
    """A urllib3-like response: yields its lines, may take (fake) time, may end with an error."""

    def __init__(self, lines: list[dict[str, Any]] | None = None, *, clock: FakeClock,
                 lasts: float = 0.0, ends_with: BaseException | None = None,
                 during: Callable[[], None] | None = None) -> None:
        self.lines = [json.dumps(line).encode() + b"\n" for line in lines or []]
        self.clock, self.lasts, self.ends_with, self.during = clock, lasts, ends_with, during

    def stream(self, _amt: Any, decode_content: bool = True) -> Iterator[bytes]:
        yield from self.lines
        self.clock.advance(self.lasts)
        if self.during is not None:
            self.during()
        if self.ends_with is not None:
            raise self.ends_with

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


def listing(rv: str = "10", items: list[dict[str, Any]] | None = None,
            token: str = "") -> dict[str, Any]:
    metadata: dict[str, Any] = {"resourceVersion": rv}
    if token:
        metadata["continue"] = token
    return {"kind": "ServiceList", "metadata": metadata, "items": items or []}


def svc(name: str, rv: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "default", "resourceVersion": rv}}


def api_error(status: int, retry_after: str | None = None, body: str = "") -> ApiException:
    exc = ApiException(status=status, reason="injected")
    exc.body = body
    exc.headers = {"Retry-After": retry_after} if retry_after else {}
    return exc


Answer = Callable[[dict[str, Any]], Any]


class Script:
    """Answers each call with the next scripted answer; stops the informer when used up."""

    def __init__(self, clock: FakeClock, lists: list[Any], watches: Answer) -> None:
        self.clock = clock
        self.lists = lists
        self.watches = watches
        self.calls: list[tuple[float, dict[str, Any]]] = []
        self.informer: Informer | None = None
        self.max_calls = 60

    def __call__(self, **kwargs: Any) -> Any:
        assert self.informer is not None
        self.calls.append((self.clock.monotonic(), kwargs))
        if len(self.calls) >= self.max_calls:
            self.informer.signal_stop()
        if kwargs.get("watch"):
            answer = self.watches(kwargs)
        else:
            answer = self.lists.pop(0) if len(self.lists) > 1 else self.lists[0]
        if isinstance(answer, BaseException):
            raise answer
        if isinstance(answer, dict):
            return _Body(answer, self.clock)
        return answer

    def watch_calls(self) -> list[tuple[float, dict[str, Any]]]:
        return [c for c in self.calls if c[1].get("watch")]


class _Body(Response):
    def __init__(self, body: dict[str, Any], clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.body = json.dumps(body).encode()

    def stream(self, _amt: Any, decode_content: bool = True) -> Iterator[bytes]:
        yield self.body


def run(clock: FakeClock, watches: Answer, *, lists: list[Any] | None = None,
        max_calls: int = 60, config: InformerConfig = CONFIG) -> tuple[Informer, Script]:
    script = Script(clock, lists or [listing()], watches)
    script.max_calls = max_calls
    informer = Informer("services", script, lambda changes: None, config=config, clock=clock)
    script.informer = informer
    informer.run()
    return informer, script


def rate(script: Script) -> float:
    """API requests per (fake) second over the run."""
    first, last = script.calls[0][0], script.calls[-1][0]
    return (len(script.calls) - 1) / max(last - first, 1e-9)


# --- watches that end at once ----------------------------------------------------------------


def test_a_proxy_ending_every_watch_at_once_gets_about_one_request_a_second() -> None:
    clock = FakeClock()
    informer, script = run(clock, lambda _kw: Response(clock=clock))
    waits = clock.waits
    assert len(waits) >= 50
    assert all(0.5 <= w <= 1.0 for w in waits), waits  # never a hot loop, never a long stall
    assert rate(script) <= 2.0
    status = informer.status()
    assert status.short_watches == len(waits)
    assert status.error_since is not None and "ended at once" in (status.last_error or "")


@pytest.mark.parametrize("ending", [
    urllib3.exceptions.ProtocolError("Response ended prematurely"),
    None,
])
def test_short_watches_fail_however_they_end(ending: BaseException | None) -> None:
    clock = FakeClock()
    informer, _ = run(clock, lambda _kw: Response(clock=clock, lasts=0.3, ends_with=ending),
                      max_calls=10)
    assert informer.status().short_watches >= 8


def test_in_stream_errors_are_short_watches_and_headers_never_reset_the_error_clock() -> None:
    clock = FakeClock()
    error = {"type": "ERROR", "object": {"kind": "Status", "code": 500, "message": "boom"}}
    informer, _ = run(clock, lambda _kw: Response([error], clock=clock))
    status = informer.status()
    first_failure = status.error_since
    assert first_failure is not None
    assert clock.monotonic() - first_failure >= 30  # the clock ran through every 200 answer
    assert "failed in-stream" in (status.last_error or "") and "500" in (status.last_error or "")
    assert all(w <= 1.0 for w in clock.waits)


# --- server errors and the two failure classes ----------------------------------------------


def test_server_errors_back_off_exponentially_up_to_the_cap() -> None:
    clock = FakeClock()
    informer, _ = run(clock, lambda _kw: api_error(500), max_calls=12)
    waits = clock.waits
    assert waits[0] <= 1.6 and waits[-1] >= 15.0 and max(waits) <= 30.0, waits
    assert informer.status().relists_by_cause.get("error") == len(waits)


def test_retry_after_is_honoured() -> None:
    clock = FakeClock()
    run(clock, lambda _kw: api_error(429, retry_after="7"), max_calls=4)
    assert all(w >= 7.0 for w in clock.waits), clock.waits


def test_progress_resets_the_exponent_so_recovery_is_prompt() -> None:
    clock = FakeClock()
    answers: list[Any] = [api_error(503)] * 8
    bookmark = {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "11"}}}
    answers.append(Response([bookmark], clock=clock))  # the server answers again
    answers.append(api_error(503))

    def watches(_kw: dict[str, Any]) -> Any:
        return answers.pop(0) if answers else Response(clock=clock, lasts=5)

    run(clock, watches, max_calls=12)
    grown, after = clock.waits[7], clock.waits[9]
    assert grown >= 15.0 and after <= 1.6, clock.waits


def test_a_short_watch_after_a_long_error_streak_waits_a_second_not_the_exponent() -> None:
    clock = FakeClock()
    answers: list[Any] = [api_error(500)] * 7 + [Response(clock=clock)]

    def watches(_kw: dict[str, Any]) -> Any:
        return answers.pop(0) if answers else Response(clock=clock, lasts=5)

    run(clock, watches, max_calls=10)
    assert clock.waits[6] >= 15.0 and clock.waits[7] <= 1.0, clock.waits


# --- healthy ends, liveness, relists --------------------------------------------------------


def test_a_watch_that_lasted_and_ended_is_reopened_at_once_and_counts_as_current() -> None:
    clock = FakeClock()
    seen: list[InformerStatus] = []
    answers: list[Any] = [api_error(500)]
    script = Script(clock, [listing()], lambda _kw: answers.pop(0) if answers else Response(
        clock=clock, lasts=MIN_HEALTHY_WATCH_SECONDS + 1,
        during=lambda: seen.append(informer.status())))
    script.max_calls = 6
    informer = Informer("services", script, lambda changes: None, config=CONFIG, clock=clock)
    script.informer = informer
    informer.run()
    # While the watch was open for over a second, the failure streak no longer showed ...
    assert seen and seen[0].error_since is None and seen[0].last_error is None
    # ... and once it ended cleanly the informer re-watched at once.
    assert clock.waits[1:] == [0.0] * (len(clock.waits) - 1)
    assert informer.status().error_since is None


def test_a_silent_watch_is_noticed_by_the_read_timeout_and_reopened_at_once() -> None:
    clock = FakeClock()
    timeout = urllib3.exceptions.ReadTimeoutError(None, "/", "Read timed out.")
    informer, script = run(clock, lambda _kw: Response(clock=clock, lasts=120.0,
                                                       ends_with=timeout), max_calls=4)
    read_timeouts = {kw["_request_timeout"][1] for _, kw in script.watch_calls()}
    assert read_timeouts == {120.0}  # the liveness window, not timeoutSeconds + slack
    assert clock.waits == [0.0] * len(clock.waits)
    status = informer.status()
    assert status.silent_watches == len(clock.waits)
    # The streak is dated from the last progress (the LIST), not from when it was noticed.
    assert status.error_since is not None and status.error_since <= script.calls[0][0]
    assert [kw["resource_version"] for _, kw in script.watch_calls()] == ["10"] * 3


def test_the_liveness_window_is_configurable() -> None:
    clock = FakeClock()
    config = InformerConfig(watch_liveness_timeout=3.0)
    _, script = run(clock, lambda _kw: Response(clock=clock, lasts=5), max_calls=3,
                    config=config)
    assert {kw["_request_timeout"][1] for _, kw in script.watch_calls()} == {3.0}


def test_expiry_relists_soon_but_at_most_once_a_second() -> None:
    clock = FakeClock()
    expired = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                           "message": "too old resource version"}}
    informer, script = run(clock, lambda _kw: Response([expired], clock=clock), max_calls=20)
    assert all(w <= 1.1 for w in clock.waits), clock.waits
    assert rate(script) <= 4.0  # a LIST and a WATCH per relist interval
    status = informer.status()
    assert status.error_since is None and status.relists_by_cause["expired"] >= 5


def test_resource_version_too_large_relists_from_scratch() -> None:
    clock = FakeClock()
    body = json.dumps({"kind": "Status", "code": 504, "message": "Too large resource version",
                       "details": {"causes": [{"reason": "ResourceVersionTooLarge"}]}})
    answers: list[Any] = [api_error(504, body=body)]

    def watches(_kw: dict[str, Any]) -> Any:
        return answers.pop(0) if answers else Response(clock=clock, lasts=5)

    informer, script = run(clock, watches, max_calls=5)
    list_rvs = [kw["resource_version"] for _, kw in script.calls if not kw.get("watch")]
    assert list_rvs == ["0", ""]
    assert informer.status().relists_by_cause == {"rv_too_large": 1}


def test_paged_list_is_applied_once_whole() -> None:
    clock = FakeClock()
    batches: list[list[str]] = []
    pages = [listing("10", [svc("a", "1")], token="t1"), listing("10", [svc("b", "2")])]
    script = Script(clock, pages, lambda _kw: Response(clock=clock, lasts=5))
    script.max_calls = 4
    informer = Informer("services", script, lambda changes: batches.append(
        [c.key for c in changes]), clock=clock)
    script.informer = informer
    informer.run()
    assert batches[0] == ["default/a", "default/b"]
    first, second = (kw for _, kw in script.calls[:2])
    assert first["limit"] == 500 and first["resource_version"] == "0"
    assert second["_continue"] == "t1" and "resource_version" not in second


def test_a_large_list_is_handed_over_in_parts_deletions_with_the_last() -> None:
    clock = FakeClock()
    batches: list[list[tuple[str, str]]] = []
    first = listing("10", [svc(f"s{i:04d}", "1") for i in range(2500)])
    relist = listing("20", [svc(f"s{i:04d}", "2") for i in range(1, 2500)])  # s0000 gone
    expired = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}
    answers: list[Any] = [Response([expired], clock=clock)]
    script = Script(clock, [first, relist], lambda _kw: answers.pop(0) if answers else Response(
        clock=clock, lasts=5))
    script.max_calls = 4
    informer = Informer("services", script, lambda changes: batches.append(
        [(c.type, c.key) for c in changes]), clock=clock)
    script.informer = informer
    informer.run()
    assert [len(b) for b in batches[:3]] == [1000, 1000, 500]
    assert [len(b) for b in batches[3:6]] == [1000, 1000, 500]  # 499 changed + 1 deleted
    assert batches[5][-1] == ("DELETED", "default/s0000")
    assert {t for b in batches[3:6] for t, _ in b} == {"MODIFIED", "DELETED"}


def test_a_server_that_pages_at_rv_0_gets_paged_relists_too() -> None:
    clock = FakeClock()
    pages = [listing("10", [svc("a", "1")], token="t1"), listing("10", [svc("b", "2")]),
             listing("12", [svc("a", "1"), svc("b", "2")])]
    expired = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}
    answers: list[Any] = [Response([expired], clock=clock)]
    _, script = run(clock, lambda _kw: answers.pop(0) if answers else Response(
        clock=clock, lasts=5), lists=pages, max_calls=6)
    lists = [kw for _, kw in script.calls if not kw.get("watch")]
    # No watch cache (the LIST at "0" came back paged): the re-LIST at the last RV pages too.
    assert lists[2]["resource_version"] == "10" and lists[2]["limit"] == 500


def test_after_a_silent_watch_an_open_watch_is_no_proof_until_something_arrives() -> None:
    clock = FakeClock()
    seen: list[InformerStatus] = []
    timeout = urllib3.exceptions.ReadTimeoutError(None, "/", "Read timed out.")
    bookmark = {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "11"}}}
    answers: list[Any] = [
        Response(clock=clock, lasts=120.0, ends_with=timeout),
        Response(clock=clock, lasts=60.0, ends_with=timeout,
                 during=lambda: seen.append(informer.status())),
        Response([bookmark], clock=clock, lasts=5.0),
    ]
    script = Script(clock, [listing()], lambda _kw: answers.pop(0) if answers else Response(
        clock=clock, lasts=5))
    script.max_calls = 5
    informer = Informer("services", script, lambda changes: None, config=CONFIG, clock=clock)
    script.informer = informer
    informer.run()
    assert seen[0].error_since is not None  # open 60 s after a silence: still failing
    assert informer.status().error_since is None  # the bookmark was real progress


def test_wait_until_synced_and_stop_read_the_informers_clock() -> None:
    clock = FakeClock(start=100.0)
    informer = Informer("services", lambda **_: None, lambda changes: None, config=CONFIG,
                        clock=clock)  # never started: it never syncs
    assert informer.wait_until_synced(5.0) is False
    assert clock.now == pytest.approx(105.0)  # the timeout ran out in fake time, not real time
    assert sum(clock.waits) == pytest.approx(5.0)
    assert informer.stop(timeout=2.0)
    assert informer.wait_until_synced(5.0) is False  # stopped: no wait at all
    assert clock.now == pytest.approx(105.0)


def test_the_error_backoff_is_a_backoff_policy_value() -> None:
    assert CONFIG.backoff is None and CONFIG.backoff_policy == BackoffPolicy()  # client-go's
    older = InformerConfig(backoff_initial=0.05, backoff_cap=0.5, backoff_reset_after=9.0)
    assert older.backoff_policy == BackoffPolicy(initial=0.05, cap=0.5, reset_after=9.0)
    policy = BackoffPolicy(initial=2.0, factor=3.0, jitter=0.0, cap=18.0, reset_after=60.0)
    config = InformerConfig(backoff_initial=0.05, backoff=policy)  # the value wins
    assert config.backoff_policy is policy
    informer = Informer("services", lambda **_: None, lambda changes: None, config=config,
                        clock=FakeClock())
    assert informer._error_backoff.policy is policy
    assert informer._short_watch_backoff.policy.reset_after == 60.0
