"""The Informer against the fake API server, through the real ``kubernetes`` client functions."""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from kubernetes.client import ApiClient, Configuration, CoreV1Api

from tests.conftest import FAST_INFORMER, wait_for
from vllm_router_svcdisc.informer import ADDED, DELETED, MODIFIED, Change, Informer, InformerConfig
from vllm_router_svcdisc.sim.cluster import SimCluster

# --- helpers -----------------------------------------------------------------------------------


class Recorder:
    """A change handler that mirrors what the informer delivered into a dict, thread-safely."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state: dict[str, dict[str, Any]] = {}
        self.changes: list[Change] = []
        self.batches = 0

    def __call__(self, changes: Sequence[Change]) -> None:
        with self._lock:
            self.batches += 1
            for change in changes:
                self.changes.append(change)
                if change.type == DELETED:
                    self.state.pop(change.key, None)
                else:
                    self.state[change.key] = change.obj

    def keys(self) -> set[str]:
        with self._lock:
            return set(self.state)

    def types_for(self, key: str) -> list[str]:
        with self._lock:
            return [c.type for c in self.changes if c.key == key]


def service(name: str, namespace: str = "default", **labels: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {"app": "vllm"}},
        "spec": {"ports": [{"name": "http", "port": 80}]},
    }


def truth(cluster: SimCluster, namespace: str = "default") -> set[str]:
    """The keys of the Services the API server holds (what the informer must converge to)."""
    return {f"{namespace}/{s['metadata']['name']}"
            for s in cluster.api.list("services", namespace)}


def counts(cluster: SimCluster, verb: str, resource: str = "services") -> int:
    return cluster.api.request_counts().get((verb, resource), 0)


def converged(recorder: Recorder, cluster: SimCluster) -> Callable[[], bool]:
    return lambda: recorder.keys() == truth(cluster)


def mismatch(recorder: Recorder, cluster: SimCluster) -> Callable[[], str]:
    return lambda: f"informer has {sorted(recorder.keys())}, server has {sorted(truth(cluster))}"


@pytest.fixture
def start_informer(cluster: SimCluster) -> Iterator[Callable[..., tuple[Informer, Recorder]]]:
    """Start an Informer on the default namespace's Services; stopped at teardown."""
    started: list[Informer] = []

    def start(
        handler: Callable[[Sequence[Change]], None] | None = None,
        *,
        config: InformerConfig = FAST_INFORMER,
        label_selector: str | None = None,
        wait_sync: bool = True,
        api_client: Any = None,
    ) -> tuple[Informer, Recorder]:
        recorder = Recorder()
        list_func = functools.partial(
            CoreV1Api(api_client or cluster.api_client()).list_namespaced_service, "default")
        informer = Informer("services", list_func, handler or recorder,
                            label_selector=label_selector, config=config)
        started.append(informer)
        informer.start()
        if wait_sync:
            assert informer.wait_until_synced(5), informer.status()
            assert cluster.api.wait_for_watches(1, "services", timeout=5)
        return informer, recorder

    yield start
    for informer in started:
        assert informer.stop(2.0), f"informer {informer.resource} did not stop"


# --- LIST then WATCH ---------------------------------------------------------------------------


def test_list_then_watch_delivers_add_modify_delete(cluster, start_informer):
    cluster.api.put("services", service("a"))
    informer, recorder = start_informer()
    assert recorder.keys() == {"default/a"}
    assert recorder.types_for("default/a") == [ADDED]

    cluster.api.put("services", service("b"))
    wait_for(lambda: recorder.keys() == {"default/a", "default/b"}, 5,
             mismatch(recorder, cluster))
    cluster.api.put("services", service("a", app="vllm", tier="gold"))
    wait_for(lambda: recorder.types_for("default/a") == [ADDED, MODIFIED], 5,
             lambda: f"changes of a: {recorder.types_for('default/a')}")
    assert recorder.state["default/a"]["metadata"]["labels"]["tier"] == "gold"
    cluster.api.delete("services", "default", "b")
    wait_for(lambda: recorder.keys() == {"default/a"}, 5, mismatch(recorder, cluster))

    assert recorder.types_for("default/b") == [ADDED, DELETED]
    assert recorder.keys() == truth(cluster)
    status = informer.status()
    assert status.synced and status.alive
    assert status.lists == 1
    assert status.events_by_type.get(ADDED) == 1
    assert status.events_by_type.get(MODIFIED) == 1
    assert status.events_by_type.get(DELETED) == 1


def test_label_selector_is_sent_to_the_server(cluster, start_informer):
    cluster.api.put("services", service("mine"))
    cluster.api.put("services", service("theirs", app="other"))
    _informer, recorder = start_informer(label_selector="app=vllm")
    assert recorder.keys() == {"default/mine"}

    cluster.api.put("services", service("theirs", app="vllm"))  # starts matching: ADDED
    wait_for(lambda: recorder.keys() == {"default/mine", "default/theirs"}, 5,
             lambda: f"got {sorted(recorder.keys())}")
    cluster.api.put("services", service("mine", app="other"))  # stops matching: DELETED
    wait_for(lambda: recorder.keys() == {"default/theirs"}, 5,
             lambda: f"got {sorted(recorder.keys())}")


def test_watch_ending_normally_is_reopened_without_relist(cluster, start_informer):
    config = dataclasses.replace(FAST_INFORMER, watch_timeout_range=(1, 2))  # server ends it
    cluster.api.put("services", service("a"))
    informer, recorder = start_informer(config=config)

    wait_for(lambda: counts(cluster, "watch") >= 3, 8,
             lambda: f"watch requests: {cluster.api.request_counts()}")
    cluster.api.put("services", service("b"))
    wait_for(converged(recorder, cluster), 5, mismatch(recorder, cluster))

    assert counts(cluster, "list") == 1
    status = informer.status()
    assert status.lists == 1
    assert status.relists_by_cause == {}
    assert status.last_error is None
    assert recorder.types_for("default/a") == [ADDED]  # the reopen replayed nothing


def test_a_watch_that_breaks_after_working_is_reopened_at_once_not_as_a_failure(
        cluster, start_informer):
    # A huge backoff: if the cut counted as a failure, the next change would not arrive
    # within the test's deadline.
    slow_backoff = dataclasses.replace(FAST_INFORMER, backoff_initial=60, backoff_cap=60)
    informer, recorder = start_informer(config=slow_backoff)
    cluster.api.put("services", service("before"))
    wait_for(lambda: recorder.keys() == {"default/before"}, 5, mismatch(recorder, cluster))
    # The stream delivered an event, so a cut now is an end, not an error.
    cluster.api.cut_watches()
    cluster.api.put("services", service("after"))
    wait_for(converged(recorder, cluster), 10, mismatch(recorder, cluster))
    status = informer.status()
    assert status.last_error is None and status.relists_by_cause == {}
    assert status.lists == 1 and status.watches >= 2


def test_repeated_expiry_relists_promptly_without_growing_backoff(cluster, start_informer):
    # A huge failure backoff: a 410 treated as a failure would stall far past the deadline.
    slow_backoff = dataclasses.replace(FAST_INFORMER, backoff_initial=60, backoff_cap=60)
    informer, recorder = start_informer(config=slow_backoff)
    for round_ in range(3):
        cluster.api.put("services", service(f"gone-{round_}"))
        wait_for(converged(recorder, cluster), 5, mismatch(recorder, cluster))
        cluster.api.delete("services", "default", f"gone-{round_}")
        cluster.api.compact()
        cluster.api.cut_watches()  # reconnect from an expired RV: 410, then re-LIST
        cluster.api.put("services", service(f"new-{round_}"))
        wait_for(converged(recorder, cluster), 10, mismatch(recorder, cluster))
    status = informer.status()
    assert status.lists >= 2 and status.relists_by_cause.get("expired", 0) >= 1
    assert status.last_error is None


def test_http_410_on_the_relist_is_routine_and_relists_from_scratch(cluster, start_informer):
    slow_backoff = dataclasses.replace(FAST_INFORMER, backoff_initial=60, backoff_cap=60)
    informer, recorder = start_informer(config=slow_backoff)
    cluster.api.put("services", service("a"))
    wait_for(converged(recorder, cluster), 5, mismatch(recorder, cluster))
    cluster.api.fail_next(1, 410, verb="watch")  # the re-watch is expired (ERROR event) ...
    cluster.api.fail_next(1, 410, verb="list")   # ... and so is the re-LIST at the last RV
    cluster.api.cut_watches()
    cluster.api.put("services", service("b"))
    wait_for(converged(recorder, cluster), 10, mismatch(recorder, cluster))
    status = informer.status()
    assert status.last_error is None and status.relists_by_cause.get("expired", 0) >= 2
    assert counts(cluster, "list") >= 3  # first LIST, the expired one, the one from ""


def test_bookmarks_advance_the_resource_version_without_events(cluster, start_informer):
    cluster.api.put("services", service("a"))
    informer, recorder = start_informer()
    batches_after_list = recorder.batches

    # Changes to another resource move the server's RV; only bookmarks tell the informer.
    for i in range(3):
        cluster.api.put("pods", {"metadata": {"name": f"p{i}", "namespace": "default"}})
    target_rv = cluster.api.resource_version
    bookmarks = informer.status().events_by_type.get("BOOKMARK", 0)
    wait_for(lambda: informer.status().events_by_type.get("BOOKMARK", 0) >= bookmarks + 2, 5,
             "no bookmarks arrived")
    # A bookmark read late may have been written before the changes above: wait until one
    # carrying the server's RV was applied (the reopen below depends on it).
    wait_for(lambda: informer._last_rv == str(target_rv), 5,
             lambda: f"informer RV {informer._last_rv}, server RV {target_rv}")

    assert recorder.batches == batches_after_list  # a bookmark is not a change
    # If the informer's RV advanced to the bookmark's, a watch reopened after compaction
    # is accepted; with the stale list RV it would get 410 and have to re-LIST.
    assert cluster.api.resource_version == target_rv
    cluster.api.compact()
    watches = counts(cluster, "watch")
    cluster.api.cut_watches()
    wait_for(lambda: counts(cluster, "watch") > watches
             and cluster.api.open_watch_count("services") == 1, 5, "watch not reopened")
    cluster.api.put("services", service("b"))
    wait_for(converged(recorder, cluster), 5, mismatch(recorder, cluster))

    status = informer.status()
    assert status.lists == 1, status
    assert "expired" not in status.relists_by_cause
    assert counts(cluster, "list") == 1


def test_expired_resource_version_relists_and_delivers_missed_delete(cluster, start_informer):
    for name in ("a", "b", "c"):
        cluster.api.put("services", service(name))
    informer, recorder = start_informer()
    assert recorder.keys() == {"default/a", "default/b", "default/c"}

    # Disconnect the watch and keep it disconnected while b is deleted and history compacted.
    cluster.api.fail_for(60, 503, verb="watch", resource="services")
    cluster.api.cut_watches()
    wait_for(lambda: cluster.api.open_watch_count("services") == 0, 5, "watch still open")
    cluster.api.delete("services", "default", "b")
    cluster.api.put("services", service("d"))
    cluster.api.compact()
    cluster.api.clear_faults()

    wait_for(converged(recorder, cluster), 10, mismatch(recorder, cluster))
    assert recorder.keys() == {"default/a", "default/c", "default/d"}
    assert recorder.types_for("default/b") == [ADDED, DELETED]
    wait_for(lambda: informer.status().lists == 2, 5, "no re-LIST")
    status = informer.status()
    assert status.relists_by_cause.get("expired", 0) >= 1, status
    assert counts(cluster, "list") == 2
    # Unchanged objects are not re-delivered by the re-LIST (their RV did not move).
    assert recorder.types_for("default/a") == [ADDED]


def test_forbidden_sets_auth_error_until_the_fault_ends(cluster, start_informer):
    cluster.api.put("services", service("a"))
    cluster.api.fail_for(60, 403, resource="services")
    informer, recorder = start_informer(wait_sync=False)

    wait_for(lambda: informer.status().auth_error, 5, "auth_error never set")
    status = informer.status()
    assert "403" in status.auth_error and "forbidden" in status.auth_error.lower()
    assert status.alive and not status.synced
    assert recorder.keys() == set()

    cluster.api.clear_faults()
    wait_for(informer.has_synced, 5, lambda: f"never synced: {informer.status()}")
    wait_for(lambda: informer.status().auth_error is None, 5, "auth_error not cleared")
    assert informer.status().last_error is None
    assert recorder.keys() == {"default/a"}


def no_retry_client(cluster: SimCluster) -> ApiClient:
    """An ApiClient whose urllib3 pool does not retry by itself (it honours Retry-After too)."""
    configuration = Configuration()
    configuration.host = cluster.api.url
    configuration.retries = 0
    return ApiClient(configuration)


def assert_list_retried_after_retry_after(cluster: SimCluster, informer: Informer,
                                          recorder: Recorder, failed_lists: int) -> None:
    wait_for(lambda: counts(cluster, "list") >= failed_lists, 5, "no LIST request")
    last_refused = time.monotonic()
    wait_for(lambda: counts(cluster, "list") > failed_lists, 8, "LIST never retried")
    retried_after = time.monotonic() - last_refused
    # Without Retry-After the fast backoff would retry within ~0.1 s.
    assert retried_after >= 0.9, f"retried after {retried_after:.2f}s, Retry-After was 1s"
    wait_for(informer.has_synced, 5, "never synced")
    assert recorder.keys() == {"default/a"}
    assert counts(cluster, "list") == failed_lists + 1


def test_too_many_requests_honours_retry_after(cluster, start_informer):
    """The informer's own backoff waits Retry-After (urllib3 retries disabled)."""
    cluster.api.put("services", service("a"))
    cluster.api.fail_next(1, 429, retry_after=1, verb="list", resource="services")
    informer, recorder = start_informer(wait_sync=False, api_client=no_retry_client(cluster))
    assert_list_retried_after_retry_after(cluster, informer, recorder, failed_lists=1)
    assert informer.status().relists_by_cause.get("error") == 1


def test_too_many_requests_with_the_default_client_also_waits(cluster, start_informer):
    """With a stock ApiClient urllib3 may retry first; either way nothing comes early."""
    cluster.api.put("services", service("a"))
    cluster.api.fail_next(1, 429, retry_after=1, verb="list", resource="services")
    informer, recorder = start_informer(wait_sync=False)
    assert_list_retried_after_retry_after(cluster, informer, recorder, failed_lists=1)


def test_malformed_watch_lines_are_skipped_and_counted(cluster, start_informer):
    cluster.api.put("services", service("a"))
    # raw lines reach only the watch open at injection: no server timeout may end it first
    config = dataclasses.replace(FAST_INFORMER, watch_timeout_range=(300, 301))
    informer, recorder = start_informer(config=config)

    cluster.api.inject_raw_line(b"{this is not json", resource="services")
    cluster.api.inject_raw_line(b'{"type": "ADDED", "object": "not an object"}',
                                resource="services")
    cluster.api.inject_raw_line(b'{"type": "ADDED", "object": {"metadata": {}}}',
                                resource="services")
    cluster.api.put("services", service("b"))
    wait_for(converged(recorder, cluster), 5, mismatch(recorder, cluster))

    status = informer.status()
    assert status.malformed_events == 3
    assert status.alive
    assert status.lists == 1  # skipping a line does not break the stream
    assert recorder.keys() == {"default/a", "default/b"}


def test_stop_returns_quickly_while_blocked_in_a_watch_read(cluster, start_informer):
    config = dataclasses.replace(FAST_INFORMER, watch_timeout_range=(300, 301),
                                 read_timeout_slack=30)
    informer, _recorder = start_informer(config=config)
    assert cluster.api.open_watch_count("services") == 1

    started = time.monotonic()
    stopped = informer.stop(2.0)
    elapsed = time.monotonic() - started

    assert stopped, "thread still alive after stop()"
    assert elapsed < 2.0, f"stop() took {elapsed:.2f}s"
    assert not informer.status().alive
    wait_for(lambda: cluster.api.open_watch_count("services") == 0, 5,
             "the watch connection was left open")


def test_a_raising_handler_does_not_kill_the_thread(cluster, start_informer):
    delivered = Recorder()

    def handler(changes: Sequence[Change]) -> None:
        if any(c.key == "default/boom" for c in changes):
            raise RuntimeError("handler bug")
        delivered(changes)

    cluster.api.put("services", service("a"))
    informer, _ = start_informer(handler)
    assert delivered.keys() == {"default/a"}

    cluster.api.put("services", service("boom"))
    cluster.api.put("services", service("after"))
    wait_for(lambda: delivered.keys() == {"default/a", "default/after"}, 5,
             lambda: f"delivered {sorted(delivered.keys())}")

    status = informer.status()
    assert status.alive
    assert status.last_error is None
    assert status.lists == 1


def test_stopping_while_backing_off_is_quiet(cluster, start_informer, caplog):
    informer, _recorder = start_informer()
    cluster.api.fail_for(30, 500)
    cluster.api.cut_watches()
    wait_for(lambda: informer.status().last_error is not None, 5, "no failure seen")
    assert informer.stop(2.0)
    assert not [r for r in caplog.records if "unexpected error" in r.getMessage()]
    cluster.api.clear_faults()


# --- how real API servers and proxies fail watches ------------------------------------------------


def failing_for(informer: Informer, words: str) -> Callable[[], bool]:
    """The informer's error clock is running and its reason says ``words``."""
    def check() -> bool:
        status = informer.status()
        return status.error_since is not None and words in (status.last_error or "")
    return check


def test_watches_that_end_at_once_count_as_failures_and_the_cache_catches_up_after(
        cluster, start_informer):
    informer, recorder = start_informer()
    cluster.api.fail_for(60, how="empty", resource="services")
    cluster.api.cut_watches()
    wait_for(lambda: informer.status().short_watches >= 3, 10, lambda: str(informer.status()))
    # Every attempt got a 200 and headers; the error clock still runs.
    wait_for(failing_for(informer, "ended at once with no event"), 5,
             lambda: str(informer.status()))
    cluster.api.put("services", service("made-during"))
    cluster.api.clear_faults()
    wait_for(converged(recorder, cluster), 10, mismatch(recorder, cluster))
    wait_for(lambda: informer.status().error_since is None, 5, lambda: str(informer.status()))
    assert counts(cluster, "list") == 1  # re-watched from the last RV, no re-LIST


@pytest.mark.parametrize("code", [500, 429, 503])
def test_in_stream_error_events_keep_the_error_clock_running(
        cluster, make_discovery, code):
    discovery = make_discovery(cluster, unhealthy_after=0.5)
    assert discovery.wait_until_synced(5)
    wait_for(discovery.get_health, 5, lambda: str(discovery.health()))
    cluster.api.fail_for(60, code, how="error-event")
    cluster.api.cut_watches()
    wait_for(lambda: "failed in-stream" in " ".join(discovery.health().reasons), 10,
             lambda: str(discovery.health()))
    health = discovery.health()
    assert not health.healthy and str(code) in " ".join(health.reasons), health
    # health names the first informer to fail; the other one fails on its own thread
    wait_for(lambda: all(s.short_watches >= 1 for s in discovery.informer_status()), 5,
             lambda: str(discovery.informer_status()))
    services, endpoints = discovery.informer_status()
    assert services.short_watches >= 1 and endpoints.short_watches >= 1
    cluster.add_service("vllm-late", replicas=1)
    cluster.api.clear_faults()
    wait_for(discovery.get_health, 10, lambda: str(discovery.health()))
    wait_for(lambda: cluster.url_of("vllm-late") in {e.url for e in
                                                     discovery.get_endpoint_info()},
             10, "the Service made during the outage never arrived")


def test_a_silenced_watch_is_abandoned_after_the_liveness_window_without_relist(
        cluster, start_informer):
    config = dataclasses.replace(FAST_INFORMER, watch_liveness_timeout=1.0)
    informer, recorder = start_informer(config=config)
    cluster.api.silence_watches("services")  # bookmarks stop too: nothing at all arrives
    cluster.api.put("services", service("behind-the-silence"))
    wait_for(converged(recorder, cluster), 10, mismatch(recorder, cluster))
    status = informer.status()
    assert status.silent_watches >= 1, status
    assert status.lists == 1 and counts(cluster, "list") == 1  # re-opened from the last RV


def test_a_watch_silent_from_its_first_byte_is_abandoned_too(cluster, start_informer):
    config = dataclasses.replace(FAST_INFORMER, watch_liveness_timeout=1.0)
    informer, recorder = start_informer(config=config)
    cluster.api.fail_next(2, how="silent", resource="services")
    cluster.api.cut_watches()
    cluster.api.put("services", service("after-two-silent-watches"))
    wait_for(converged(recorder, cluster), 15, mismatch(recorder, cluster))
    wait_for(lambda: informer.status().silent_watches >= 2, 5, lambda: str(informer.status()))
    assert informer.status().lists == 1


def test_a_long_silence_turns_health_false_once_noticed(cluster, make_discovery):
    config = dataclasses.replace(FAST_INFORMER, watch_liveness_timeout=1.5)
    discovery = make_discovery(cluster, informer_config=config, unhealthy_after=0.5)
    assert discovery.wait_until_synced(5)
    wait_for(discovery.get_health, 5, lambda: str(discovery.health()))
    cluster.api.fail_for(60, how="silent")
    cluster.api.silence_watches()
    wait_for(lambda: not discovery.get_health(), 10, lambda: str(discovery.health()))
    assert "carried nothing" in " ".join(discovery.health().reasons)
    cluster.api.clear_faults()
    wait_for(discovery.get_health, 10, lambda: str(discovery.health()))


def test_resource_version_too_large_relists_from_scratch(cluster, start_informer):
    slow_backoff = dataclasses.replace(FAST_INFORMER, backoff_initial=60, backoff_cap=60)
    informer, recorder = start_informer(config=slow_backoff)
    cluster.api.fail_next(1, 504, verb="watch", resource="services",
                          cause="ResourceVersionTooLarge")
    cluster.api.cut_watches()
    cluster.api.put("services", service("after-504"))
    wait_for(converged(recorder, cluster), 10, mismatch(recorder, cluster))
    # the re-LIST is counted after its items were handed to the handler
    wait_for(lambda: informer.status().lists == 2, 5, lambda: str(informer.status()))
    status = informer.status()
    assert status.relists_by_cause.get("rv_too_large") == 1, status
    assert status.lists == 2 and status.last_error is None


def test_a_generic_504_backs_off_like_any_server_error(cluster, start_informer):
    informer, recorder = start_informer()
    cluster.api.fail_next(1, 504, verb="watch", resource="services")
    cluster.api.cut_watches()
    cluster.api.put("services", service("after-timeout"))
    wait_for(converged(recorder, cluster), 10, mismatch(recorder, cluster))
    status = informer.status()
    assert "rv_too_large" not in status.relists_by_cause
    assert status.relists_by_cause.get("error") == 1 and status.lists == 1


def test_paged_relist_restarts_on_an_expired_continue_token_and_replaces_once(
        cluster, start_informer):
    for i in range(5):
        cluster.api.put("services", service(f"s{i}"))
    config = dataclasses.replace(FAST_INFORMER, list_page_size=2)
    informer, recorder = start_informer(config=config)
    assert counts(cluster, "list") == 1  # at "0" the watch cache ignores limit: one page
    cluster.api.delete("services", "default", "s4")
    cluster.api.compact()
    # The re-watch is expired; the re-LIST at the last RV is refused too, so the informer
    # lists from "" in pages of 2; the token of its second page has expired: start over.
    cluster.api.fail_next(1, 410, verb="list", resource="services")
    cluster.api.expire_continue_tokens(next_requests=1)
    cluster.api.cut_watches()
    wait_for(converged(recorder, cluster), 10, mismatch(recorder, cluster))
    wait_for(lambda: informer.status().lists == 2, 5, lambda: str(informer.status()))
    # initial + refused + page 1 + expired page 2 + pages 1-2 of the restart
    assert counts(cluster, "list") == 6, cluster.api.request_counts()
    # Replace ran once, on the whole result: no object of a later page was dropped and re-added.
    for i in range(4):
        assert recorder.types_for(f"default/s{i}") == [ADDED], recorder.types_for(f"default/s{i}")
    assert recorder.types_for("default/s4") == [ADDED, DELETED]



def test_on_synced_is_called_once_after_the_first_list_is_handed_over(cluster):
    """Discovery's start-up hold ends on it: called when the LIST's items are delivered, on the
    informer's thread, and not again on a relist."""
    cluster.api.put("services", service("a"))
    recorder = Recorder()
    calls: list[set[str]] = []
    informer = Informer(
        "services", functools.partial(CoreV1Api(cluster.api_client()).list_namespaced_service,
                                      "default"),
        recorder, config=FAST_INFORMER, on_synced=lambda: calls.append(recorder.keys()))
    informer.start()
    try:
        assert informer.wait_until_synced(5), informer.status()
        wait_for(lambda: len(calls) == 1, 5, lambda: f"on_synced calls: {calls}")
        assert calls == [{"default/a"}]  # the items were handed over before
        cluster.api.fail_next(1, 410, verb="watch")
        cluster.api.cut_watches()  # the re-watch is expired: a relist
        cluster.api.put("services", service("b"))
        wait_for(converged(recorder, cluster), 10, mismatch(recorder, cluster))
        wait_for(lambda: informer.status().lists >= 2, 5, lambda: str(informer.status()))
        assert len(calls) == 1
    finally:
        assert informer.stop(2.0)
