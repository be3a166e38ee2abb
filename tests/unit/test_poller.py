"""Poller rules and health records on a fake clock: requeue after the interval or the backoff,
gone keys, handler crashes, close; failure classes, consecutive counts, token progress."""

from __future__ import annotations

import pytest

from tests.unit.driving import drive
from vllm_router_svcdisc.backoff import BackoffPolicy
from vllm_router_svcdisc.clock import FakeClock
from vllm_router_svcdisc.http import EngineCallError
from vllm_router_svcdisc.poller import (
    FAILED,
    GONE,
    OK,
    Failure,
    HealthBook,
    Poller,
    Step,
    classify,
)

POLICY = BackoffPolicy(initial=1.0, factor=2.0, jitter=0.0, cap=8.0, reset_after=1e9)
URL = "http://127.0.0.1:8000"


class Script:
    """A handler that answers from a list of steps (the last repeats) and records each run."""

    def __init__(self, clock: FakeClock, *steps: Step, takes: float = 0.0) -> None:
        self.clock = clock
        self.steps = list(steps)
        self.runs: list[float] = []
        self.takes = takes

    def __call__(self, key: str) -> Step:
        self.runs.append(self.clock.now)
        self.clock.advance(self.takes)
        return self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]


def make(clock: FakeClock, script: Script, interval: float = 5.0) -> Poller[str]:
    return Poller("test", script, interval=interval, workers=1, backoff=POLICY, clock=clock)


def run_until(poller: Poller[str], clock: FakeClock, seconds: float) -> None:
    drive(clock, seconds, poller.run_ready, step=0.25)


def test_ok_runs_again_one_interval_after_the_run_started() -> None:
    clock = FakeClock()
    script = Script(clock, OK, takes=2.0)  # the run itself takes 2 s of the 5 s interval
    poller = make(clock, script)
    start = clock.now
    poller.add(URL)
    run_until(poller, clock, 16.0)
    assert [t - start for t in script.runs] == [0.0, 5.0, 10.0, 15.0]


def test_failed_runs_back_off_and_a_success_forgets_the_streak() -> None:
    clock = FakeClock()
    script = Script(clock, FAILED, FAILED, FAILED, OK)
    poller = make(clock, script, interval=100.0)
    start = clock.now
    poller.add(URL)
    run_until(poller, clock, 10.0)
    # 1, 2, 4 s of backoff, then ok: the next run is an interval away
    assert [t - start for t in script.runs] == [0.0, 1.0, 3.0, 7.0]
    assert poller.queue.failures(URL) == 0


def test_a_handler_may_name_the_delay_and_gone_keys_are_dropped() -> None:
    clock = FakeClock()
    script = Script(clock, Step(True, after=0.5), Step(False, after=2.0), GONE)
    poller = make(clock, script)
    start = clock.now
    poller.add(URL)
    run_until(poller, clock, 30.0)
    assert [t - start for t in script.runs] == [0.0, 0.5, 2.5]
    assert poller.queue.waiting() == 0 and len(poller.queue) == 0


def test_a_crashing_handler_counts_as_a_failure_and_the_key_keeps_running(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    runs: list[float] = []

    def crash(key: str) -> Step:
        runs.append(clock.now)
        raise RuntimeError("boom")

    poller = Poller("test", crash, interval=5.0, workers=1, backoff=POLICY, clock=clock)
    poller.add(URL)
    run_until(poller, clock, 3.5)
    assert len(runs) == 3  # at 0, 1, 3: the backoff of failures
    assert "processing" in caplog.text


def test_close_stops_the_workers_and_drops_queued_keys() -> None:
    clock = FakeClock()
    script = Script(clock, OK)
    poller = make(clock, script).start()
    poller.add_after(URL, 1000.0)
    poller.close(timeout=5.0)
    assert not poller.alive()
    assert poller.queue.waiting() == 0


def test_retrying_stops_at_close() -> None:
    clock = FakeClock()
    poller = make(clock, Script(clock, OK))
    attempts: list[int] = []

    def flaky() -> None:
        attempts.append(1)
        if len(attempts) == 2:
            poller.stopping.set()
        raise EngineCallError("refused", cause="connection", transient=True)

    retrying = poller.retrying(attempts=5, within=None, wait=0.1,
                               retry_if=lambda e: isinstance(e, EngineCallError))
    with pytest.raises(EngineCallError):
        retrying(flaky)
    assert len(attempts) == 2


# -- classes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("error", "failure"), [
    (EngineCallError("connection refused", cause="connection", failure="refused"),
     Failure.REFUSED),
    (EngineCallError("connection reset", cause="connection"), Failure.REFUSED),
    (EngineCallError("connect timed out", cause="timeout", failure="connect_timeout"),
     Failure.CONNECT_TIMEOUT),
    (EngineCallError("timed out", cause="timeout", failure="read_timeout"), Failure.READ_TIMEOUT),
    (EngineCallError("timed out", cause="timeout"), Failure.READ_TIMEOUT),
    (EngineCallError("HTTP 503", cause="http", status=503), Failure.HTTP_5XX),
    (EngineCallError("HTTP 401", cause="http", status=401), Failure.BAD_ANSWER),
    (EngineCallError("invalid JSON", cause="answer"), Failure.BAD_ANSWER),
    (EngineCallError("too big", cause="oversize"), Failure.BAD_ANSWER),
])
def test_engine_call_errors_map_to_failure_classes(error: EngineCallError,
                                                   failure: Failure) -> None:
    assert classify(error) is failure


# -- the record ------------------------------------------------------------------------------


def book_with(url: str = URL) -> tuple[HealthBook, FakeClock, list[str]]:
    clock = FakeClock()
    changes: list[str] = []
    book = HealthBook(clock, on_change=changes.append)
    book.ensure(url)
    return book, clock, changes


def test_failures_count_by_class_until_a_success_clears_them() -> None:
    book, clock, changes = book_with()
    book.failure(URL, Failure.READ_TIMEOUT, "timed out")
    clock.advance(1)
    book.failure(URL, Failure.READ_TIMEOUT, "timed out")
    book.failure(URL, Failure.HTTP_5XX, "HTTP 500")
    record = book.get(URL)
    assert record is not None
    assert record.failures == {Failure.READ_TIMEOUT: 2, Failure.HTTP_5XX: 1}
    assert record.failing_since == 1000.0 and record.last_failure is Failure.HTTP_5XX
    clock.advance(1)
    book.success(URL)
    record = book.get(URL)
    assert record is not None and not record.failures and record.failing_since is None
    assert record.last_success == record.last_result == 1002.0
    assert changes == [URL] * 4  # each failure, and the success that cleared them


def test_results_for_unknown_pods_are_ignored() -> None:
    book, _clock, changes = book_with()
    book.failure("http://127.0.0.9:8000", Failure.REFUSED, "refused")
    assert "http://127.0.0.9:8000" not in book and changes == []


def test_progress_stuck_only_while_requests_run_and_counters_stand_still() -> None:
    book, clock, _changes = book_with()
    book.success(URL, tokens=100.0, running=0.0)  # idle
    clock.advance(10)
    book.success(URL, tokens=100.0, running=2.0)  # requests start: stuck since now at most
    record = book.get(URL)
    assert record is not None and record.stuck_since == 1010.0
    clock.advance(10)
    book.success(URL, tokens=100.0, running=2.0)
    assert (book.get(URL) or record).stuck_since == 1010.0  # still the same streak
    clock.advance(10)
    book.success(URL, tokens=150.0, running=2.0)  # a chunked prefill moves the prompt counter
    assert (book.get(URL) or record).stuck_since is None
    clock.advance(10)
    book.success(URL, tokens=150.0, running=2.0)  # frozen again: since the previous reading
    assert (book.get(URL) or record).stuck_since == 1030.0
    book.success(URL, tokens=None, running=2.0)  # no counters on the page: cannot tell
    assert (book.get(URL) or record).stuck_since is None


def test_a_departed_record_is_kept_for_the_blip_window_then_pruned() -> None:
    book, clock, _changes = book_with()
    book.failure(URL, Failure.REFUSED, "refused")
    book.depart(URL)
    clock.advance(10)
    assert book.prune(30.0) == []
    book.ensure(URL)  # back within the window: same record
    record = book.get(URL)
    assert record is not None and record.departed_at is None and record.failures
    book.depart(URL)
    clock.advance(30)
    assert book.prune(30.0) == [URL] and URL not in book


def test_only_an_answer_or_an_accepted_connection_proves_a_pod_reachable() -> None:
    book, clock, _changes = book_with()
    book.failure(URL, Failure.CONNECT_TIMEOUT, "connect timed out")
    record = book.get(URL)
    assert record is not None and record.reachable_at is None
    assert (record.last_connect_failure, record.connect_failure) == (1000.0,
                                                                     Failure.CONNECT_TIMEOUT)
    clock.advance(1)
    book.failure(URL, Failure.READ_TIMEOUT, "timed out")  # e.g. on a connection opened before
    assert (book.get(URL) or record).reachable_at is None
    clock.advance(1)
    book.failure(URL, Failure.READ_TIMEOUT, "timed out", reachable=True)  # a connect accepted
    assert (book.get(URL) or record).reachable_at == 1002.0
    clock.advance(1)
    book.failure(URL, Failure.HTTP_5XX, "HTTP 503")  # an answer
    assert (book.get(URL) or record).reachable_at == 1003.0
