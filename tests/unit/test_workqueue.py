"""WorkQueue rules on a fake clock: coalescing, one worker per key, delays, backoff, shut-down."""

from __future__ import annotations

import random
import threading

import pytest

from vllm_router_svcdisc.backoff import BackoffPolicy
from vllm_router_svcdisc.clock import FakeClock
from vllm_router_svcdisc.workqueue import WorkQueue, worker_threads

POLICY = BackoffPolicy(initial=1.0, factor=2.0, jitter=0.0, cap=8.0, reset_after=1e9)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def queue(clock: FakeClock) -> WorkQueue[str]:
    return WorkQueue(backoff=POLICY, clock=clock)


def drain(queue: WorkQueue[str]) -> list[str]:
    """Every key ready now, each marked done at once."""
    keys = []
    while (key := queue.get(timeout=0)) is not None:
        keys.append(key)
        queue.done(key)
    return keys


def test_keys_come_out_in_order_and_a_queued_key_is_coalesced(queue) -> None:
    for key in ("a", "b", "a", "c", "b"):
        queue.add(key)
    assert len(queue) == 3
    assert drain(queue) == ["a", "b", "c"]


def test_a_key_in_process_is_not_handed_out_again_but_runs_once_more_after(queue) -> None:
    queue.add("a")
    assert queue.get(timeout=0) == "a"
    queue.add("a")  # changed while being processed
    queue.add("a")
    assert queue.get(timeout=0) is None  # not twice at once
    queue.done("a")
    assert queue.get(timeout=0) == "a"  # once more, not twice more
    queue.done("a")
    assert queue.get(timeout=0) is None


def test_lower_lanes_come_out_first_and_a_queued_key_moves_up(queue) -> None:
    for key in ("a", "b", "c"):
        queue.add(key)
    queue.add("n", lane=1)
    queue.add("f", lane=0)
    queue.add("b", lane=1)  # already queued: moves up, not queued twice
    queue.add("n")  # already in a lower lane: stays there
    queue.add("f", lane=1)  # likewise
    assert len(queue) == 5
    assert drain(queue) == ["f", "n", "b", "a", "c"]


def test_a_lane_given_during_processing_holds_for_the_run_after(queue) -> None:
    queue.add("a")
    queue.add("b")
    assert queue.get(timeout=0) == "a"
    queue.add("a", lane=0)
    queue.done("a")
    assert drain(queue) == ["a", "b"]


def test_keys_coming_due_join_the_ordinary_lane_behind_the_others(queue, clock) -> None:
    queue.add_after("late", 1.0)
    clock.advance(1.0)
    queue.add("new", lane=1)
    assert drain(queue) == ["new", "late"]
    with pytest.raises(ValueError):
        queue.add("x", lane=3)


def test_add_after_holds_a_key_back_until_due(queue, clock) -> None:
    queue.add_after("a", 5.0)
    queue.add_after("b", 2.0)
    assert queue.get(timeout=0) is None and queue.waiting() == 2
    clock.advance(2.0)
    assert drain(queue) == ["b"]
    clock.advance(2.9)
    assert drain(queue) == []
    clock.advance(0.1)
    assert drain(queue) == ["a"] and queue.waiting() == 0


def test_the_earliest_of_two_delays_wins_and_fires_once(queue, clock) -> None:
    queue.add_after("a", 10.0)
    queue.add_after("a", 3.0)
    queue.add_after("a", 7.0)
    clock.advance(3.0)
    assert drain(queue) == ["a"]
    clock.advance(10.0)
    assert drain(queue) == []  # the superseded entries do not fire


def test_a_zero_delay_is_an_add(queue) -> None:
    queue.add_after("a", 0)
    assert drain(queue) == ["a"]


def test_rate_limited_keys_back_off_exponentially_per_key_until_forgotten(queue, clock) -> None:
    delays = [queue.add_rate_limited("a") for _ in range(5)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0]  # capped
    assert queue.failures("a") == 5
    assert queue.add_rate_limited("b") == 1.0  # another key has its own streak
    queue.forget("a")
    assert queue.failures("a") == 0
    assert queue.add_rate_limited("a") == 1.0


def test_retry_after_is_honoured_by_the_rate_limit(queue) -> None:
    assert queue.add_rate_limited("a", retry_after=5.0) == 5.0


def test_shut_down_wakes_a_blocked_get_and_drops_pending_work(queue) -> None:
    queue.add_after("a", 100.0)
    result: list[object] = []
    getter = threading.Thread(target=lambda: result.append(queue.get()))
    getter.start()
    queue.shut_down()
    getter.join(5.0)
    assert not getter.is_alive() and result == [None]
    queue.add("b")
    assert queue.get(timeout=0) is None and len(queue) == 0


def test_a_blocked_get_is_woken_by_an_add(queue) -> None:
    result: list[object] = []
    getter = threading.Thread(target=lambda: result.append(queue.get(timeout=30)))
    getter.start()
    queue.add("a")
    getter.join(5.0)
    assert result == ["a"]


def test_random_operations_never_hand_a_key_to_two_workers_or_lose_one(queue, clock) -> None:
    """A model check: every added key is processed afterwards, never two at once."""
    rng = random.Random(7)
    in_process: set[str] = set()
    owed: set[str] = set()  # added since its last processing started: must be processed again
    for _ in range(3000):
        op = rng.random()
        key = rng.choice("abcde")
        if op < 0.4:
            queue.add(key, lane=rng.choice([0, 1, 2, 2, 2]))
            owed.add(key)
        elif op < 0.5:
            queue.add_after(key, rng.choice([0.5, 1.0, 2.0]))
        elif op < 0.8:
            got = queue.get(timeout=0)
            if got is not None:
                assert got not in in_process
                in_process.add(got)
                owed.discard(got)
        elif in_process:
            done = rng.choice(sorted(in_process))
            in_process.discard(done)
            queue.done(done)
        else:
            clock.advance(0.5)
    for key in sorted(in_process):
        queue.done(key)
    clock.advance(10.0)
    assert owed <= set(drain(queue))


def test_worker_threads_survive_a_failing_handler_and_mark_every_key_done() -> None:
    queue: WorkQueue[str] = WorkQueue(backoff=POLICY)
    calls: list[str] = []
    handled = threading.Condition()

    def handle(key: str) -> None:
        with handled:
            calls.append(key)
            handled.notify_all()
        if key == "boom":
            raise RuntimeError("handler failed")

    workers = worker_threads(queue, handle, count=2, name="test-worker")
    for worker in workers:
        worker.start()
    queue.add("boom")
    queue.add("a")
    with handled:
        assert handled.wait_for(lambda: sorted(calls) == ["a", "boom"], timeout=5.0)
    queue.add("boom")  # done() ran although the handler raised: the key is processed again
    with handled:
        assert handled.wait_for(lambda: calls.count("boom") == 2, timeout=5.0)
    queue.shut_down()
    for worker in workers:
        worker.join(5.0)
    assert not any(w.is_alive() for w in workers)
    assert [w.name for w in workers] == ["test-worker-0", "test-worker-1"]


def test_a_key_coming_due_wakes_one_idle_worker_not_all_of_them() -> None:
    """Idle workers: one waits for the earliest held-back key, the others to be handed one,
    so the wakeups per key stay a small constant however many workers idle."""
    queue: WorkQueue[str] = WorkQueue(backoff=POLICY)
    done = threading.Semaphore(0)

    def handle(key: str) -> None:
        done.release()

    workers = worker_threads(queue, handle, count=16, name="test-idle")
    for worker in workers:
        worker.start()
    keys = 200
    for i in range(keys):
        queue.add_after(f"k{i}", 0.002 * (i + 1))
    for _ in range(keys):
        assert done.acquire(timeout=10.0)
    queue.shut_down()
    for worker in workers:
        worker.join(5.0)
    # every idle worker waking for every key would be 16 per key
    assert queue.wakeups < 4 * keys, queue.wakeups
