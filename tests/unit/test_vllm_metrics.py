"""Tests of vllm_metrics: page parsing, per-pod stats and Service aggregation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vllm_router_svcdisc.types import EngineStats
from vllm_router_svcdisc.vllm_metrics import (
    MetricsParseError,
    PodReading,
    PodSample,
    aggregate_service,
    parse_metrics,
    pod_stats,
)

FIXTURE = "vllm-0.33-metrics-dp2.txt"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _fixture(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def dp2_page() -> str:
    return _fixture(FIXTURE)


def _page(*lines: str) -> str:
    return "\n".join(lines) + "\n"


def _sample(**overrides: object) -> PodSample:
    base = PodSample(
        running=0.0,
        waiting=0.0,
        kv_usage=0.0,
        kv_usage_max=0.0,
        prefix_queries=0.0,
        prefix_hits=0.0,
        sleeping=False,
        max_lora=None,
        running_lora_adapters=(),
        waiting_lora_adapters=(),
        legacy_names=False,
        model_names=frozenset({"m"}),
    )
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


# --- the vLLM 0.33 fixture (two data-parallel ranks) ------------------------------------------


def test_fixture_sums_ranks(dp2_page: str) -> None:
    sample = parse_metrics(dp2_page)
    assert sample.running == 8.0  # 3 + 5
    assert sample.waiting == 1.0  # 1 + 0
    assert sample.prefix_queries == 7168.0  # 5120 + 2048
    assert sample.prefix_hits == 3584.0  # 3072 + 512
    assert sample.legacy_names is False
    assert sample.model_names == frozenset({"Qwen/Qwen3-8B"})


def test_fixture_kv_mean_and_max(dp2_page: str) -> None:
    sample = parse_metrics(dp2_page)
    assert sample.kv_usage == pytest.approx((0.4213 + 0.1875) / 2)
    assert sample.kv_usage_max == pytest.approx(0.4213)


def test_fixture_lora_and_sleep(dp2_page: str) -> None:
    sample = parse_metrics(dp2_page)
    assert sample.max_lora == 4
    assert sample.running_lora_adapters == ("sql-lora", "tweet-lora")
    assert sample.waiting_lora_adapters == ()
    assert sample.sleeping is False  # no sleep-state metric on the page


def test_fixture_pod_stats(dp2_page: str) -> None:
    reading = pod_stats(parse_metrics(dp2_page), None, 100.0)
    stats = reading.stats
    assert stats.num_running_requests == 8.0
    assert stats.num_queuing_requests == 1.0
    assert stats.gpu_cache_usage_perc == pytest.approx(0.3044)
    assert stats.gpu_cache_usage_perc_max == pytest.approx(0.4213)
    assert stats.gpu_prefix_cache_hits_total == 3584.0
    assert stats.gpu_prefix_cache_queries_total == 7168.0
    assert stats.gpu_prefix_cache_hit_rate == 0.0  # no previous sample yet
    assert stats.max_lora == 4
    assert stats.running_lora_adapters == ("sql-lora", "tweet-lora")
    assert stats.pods_scraped == 1
    assert stats.sample_time == stats.oldest_sample_time == 100.0
    assert stats.per_pod == {}
    assert reading.interval_hits == reading.interval_queries == 0.0


def test_counter_family_with_total_in_type_line() -> None:
    # Untyped counters keep ``_total`` in the family name too; ``_created`` must be ignored.
    page = _page(
        "vllm:num_requests_running 1",
        "vllm:prefix_cache_queries_total 10",
        "vllm:prefix_cache_queries_created 1.7e9",
        "# TYPE vllm:prefix_cache_hits counter",
        "vllm:prefix_cache_hits_total 4",
        "vllm:prefix_cache_hits_created 1.7e9",
    )
    sample = parse_metrics(page)
    assert sample.prefix_queries == 10.0
    assert sample.prefix_hits == 4.0


# --- legacy names -----------------------------------------------------------------------------

LEGACY_PAGE = _page(
    "# TYPE vllm:num_requests_running gauge",
    'vllm:num_requests_running{model_name="llama"} 2',
    "# TYPE vllm:num_requests_waiting gauge",
    'vllm:num_requests_waiting{model_name="llama"} 7',
    "# TYPE vllm:gpu_cache_usage_perc gauge",
    'vllm:gpu_cache_usage_perc{model_name="llama"} 0.5',
    "# TYPE vllm:gpu_prefix_cache_queries_total counter",
    'vllm:gpu_prefix_cache_queries_total{model_name="llama"} 100',
    "# TYPE vllm:gpu_prefix_cache_hits_total counter",
    'vllm:gpu_prefix_cache_hits_total{model_name="llama"} 25',
    "# TYPE vllm:gpu_prefix_cache_hit_rate gauge",
    'vllm:gpu_prefix_cache_hit_rate{model_name="llama"} 0.99',
)


def test_legacy_only_page() -> None:
    sample = parse_metrics(LEGACY_PAGE)
    assert sample.legacy_names is True
    assert sample.running == 2.0
    assert sample.waiting == 7.0
    assert sample.kv_usage == sample.kv_usage_max == 0.5
    assert sample.prefix_queries == 100.0
    assert sample.prefix_hits == 25.0
    assert sample.model_names == frozenset({"llama"})


def test_kv_legacy_alone_is_enough_to_be_a_metrics_page() -> None:
    sample = parse_metrics(_page("vllm:gpu_cache_usage_perc 0.25"))
    assert sample.kv_usage == 0.25
    assert sample.legacy_names is True
    assert sample.running == 0.0


def test_mixed_page_current_names_win() -> None:
    page = LEGACY_PAGE + _page(
        'vllm:kv_cache_usage_perc{model_name="llama"} 0.125',
        'vllm:prefix_cache_queries_total{model_name="llama"} 40',
        'vllm:prefix_cache_hits_total{model_name="llama"} 8',
    )
    sample = parse_metrics(page)
    assert sample.legacy_names is False
    assert sample.kv_usage == 0.125
    assert sample.prefix_queries == 40.0
    assert sample.prefix_hits == 8.0


def test_partial_fallback_is_flagged() -> None:
    page = _page(
        "vllm:kv_cache_usage_perc 0.1",
        "vllm:prefix_cache_queries_total 40",
        "vllm:gpu_prefix_cache_hits_total 8",
    )
    sample = parse_metrics(page)
    assert sample.legacy_names is True
    assert sample.prefix_hits == 8.0
    assert sample.kv_usage == 0.1


# --- bad values -------------------------------------------------------------------------------


def test_nan_is_ignored() -> None:
    page = _page(
        'vllm:num_requests_running{engine="0"} NaN',
        'vllm:num_requests_running{engine="1"} 4',
        'vllm:kv_cache_usage_perc{engine="0"} NaN',
        'vllm:kv_cache_usage_perc{engine="1"} 0.6',
    )
    sample = parse_metrics(page)
    assert sample.running == 4.0
    assert sample.kv_usage == 0.6  # the NaN rank is not averaged in as 0
    assert sample.kv_usage_max == 0.6


def test_nan_current_falls_back_to_legacy() -> None:
    page = _page("vllm:kv_cache_usage_perc NaN", "vllm:gpu_cache_usage_perc 0.3")
    sample = parse_metrics(page)
    assert sample.kv_usage == 0.3
    assert sample.legacy_names is True


def test_infinities_on_gauges_are_ignored() -> None:
    page = _page(
        'vllm:num_requests_running{engine="0"} +Inf',
        'vllm:num_requests_running{engine="1"} 2',
        'vllm:num_requests_waiting{engine="0"} -Inf',
        'vllm:num_requests_waiting{engine="1"} 3',
        'vllm:kv_cache_usage_perc{engine="0"} +Inf',
        'vllm:kv_cache_usage_perc{engine="1"} 0.2',
    )
    sample = parse_metrics(page)
    assert sample.running == 2.0
    assert sample.waiting == 3.0
    assert sample.kv_usage == sample.kv_usage_max == 0.2


def test_negative_values_clamp_to_zero() -> None:
    page = _page(
        'vllm:num_requests_running{engine="0"} -3',
        'vllm:num_requests_running{engine="1"} 2',
        "vllm:num_requests_waiting -1",
        "vllm:kv_cache_usage_perc -0.5",
        "vllm:prefix_cache_queries_total -10",
    )
    sample = parse_metrics(page)
    assert sample.running == 2.0  # -3 does not cancel the other rank out
    assert sample.waiting == 0.0
    assert sample.kv_usage == 0.0
    assert sample.prefix_queries == 0.0


def test_missing_metrics_give_zero() -> None:
    sample = parse_metrics(_page("vllm:num_requests_waiting 5"))
    assert sample.waiting == 5.0
    assert sample.running == 0.0
    assert sample.kv_usage == sample.kv_usage_max == 0.0
    assert sample.prefix_queries == sample.prefix_hits == 0.0
    assert sample.sleeping is False
    assert sample.max_lora is None
    assert sample.running_lora_adapters == sample.waiting_lora_adapters == ()
    assert sample.legacy_names is False
    assert sample.model_names == frozenset()


def test_duplicate_series_last_wins() -> None:
    page = _page(
        'vllm:num_requests_running{engine="0",model_name="m"} 9',
        'vllm:num_requests_running{engine="1",model_name="m"} 1',
        'vllm:num_requests_running{model_name="m",engine="0"} 2',
        'vllm:kv_cache_usage_perc{engine="0"} 0.9',
        'vllm:kv_cache_usage_perc{engine="0"} 0.4',
    )
    sample = parse_metrics(page)
    assert sample.running == 3.0  # 2 (last of engine 0) + 1
    assert sample.kv_usage == sample.kv_usage_max == 0.4


# --- pages that are not metrics ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage\n",
        "this is not a metrics page at all\n",
        "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head></html>\n",
        "<html><body>" + "x" * 5000 + "</body></html>\n",
        "# only a comment\n",
        'process_cpu_seconds_total 12.5\npython_info{version="3.11"} 1\n',
        "vllm:num_requests_running NaN\n",
        '{"detail":"Not Found"}\n',
    ],
    ids=["empty", "word", "sentence", "html", "long-html", "comment", "other", "all-nan", "json"],
)
def test_not_a_metrics_page_raises(text: str) -> None:
    with pytest.raises(MetricsParseError) as info:
        parse_metrics(text)
    assert len(str(info.value)) < 200  # short: never the whole body


def test_parse_error_is_a_value_error() -> None:
    assert issubclass(MetricsParseError, ValueError)


# --- sleep state ------------------------------------------------------------------------------


def _sleep_page(rank0: str, rank1: str) -> str:
    lines = ["# TYPE vllm:num_requests_running gauge", "vllm:num_requests_running 0"]
    for engine, active in (("0", rank0), ("1", rank1)):
        for state in ("awake", "weights_offloaded", "discard_all"):
            value = "1" if state == active else "0"
            lines.append(
                f'vllm:engine_sleep_state{{engine="{engine}",model_name="m",'
                f'sleep_state="{state}"}} {value}'
            )
    return _page(*lines)


@pytest.mark.parametrize(
    ("rank0", "rank1", "expected"),
    [
        ("awake", "awake", False),
        ("weights_offloaded", "awake", True),
        ("awake", "discard_all", True),
        ("discard_all", "weights_offloaded", True),
    ],
)
def test_sleep_state(rank0: str, rank1: str, expected: bool) -> None:
    assert parse_metrics(_sleep_page(rank0, rank1)).sleeping is expected


def test_sleep_state_without_label_is_not_sleep() -> None:
    page = _page("vllm:num_requests_running 0", "vllm:engine_sleep_state 1")
    assert parse_metrics(page).sleeping is False


# --- LoRA info --------------------------------------------------------------------------------


def test_lora_highest_value_wins() -> None:
    page = _page(
        "vllm:num_requests_running 1",
        "# TYPE vllm:lora_requests_info gauge",
        'vllm:lora_requests_info{max_lora="4",running_lora_adapters="a",'
        'waiting_lora_adapters="b"} 1.7000000e+09',
        'vllm:lora_requests_info{max_lora="4",running_lora_adapters="c,a",'
        'waiting_lora_adapters=""} 1.7000009e+09',
        'vllm:lora_requests_info{max_lora="4",running_lora_adapters="",'
        'waiting_lora_adapters="z"} 1.7000005e+09',
    )
    sample = parse_metrics(page)
    assert sample.max_lora == 4
    assert sample.running_lora_adapters == ("c", "a")
    assert sample.waiting_lora_adapters == ()


def test_lora_empty_adapters_and_bad_max_lora() -> None:
    page = _page(
        "vllm:num_requests_running 1",
        'vllm:lora_requests_info{max_lora="many",running_lora_adapters="",'
        'waiting_lora_adapters=""} 1',
    )
    sample = parse_metrics(page)
    assert sample.max_lora is None
    assert sample.running_lora_adapters == sample.waiting_lora_adapters == ()


# --- per-pod hit rate over an interval --------------------------------------------------------


def test_hit_rate_over_interval() -> None:
    first = _sample(prefix_queries=1000.0, prefix_hits=400.0)
    second = _sample(prefix_queries=1200.0, prefix_hits=550.0)
    reading = pod_stats(second, first, 5.0)
    assert reading.interval_queries == 200.0
    assert reading.interval_hits == 150.0
    assert reading.stats.gpu_prefix_cache_hit_rate == pytest.approx(0.75)
    assert reading.stats.gpu_prefix_cache_hits_total == 550.0
    assert reading.stats.gpu_prefix_cache_queries_total == 1200.0
    assert reading.sample is second


def test_hit_rate_no_new_queries_is_zero() -> None:
    sample = _sample(prefix_queries=1000.0, prefix_hits=400.0)
    reading = pod_stats(sample, sample, 5.0)
    assert reading.stats.gpu_prefix_cache_hit_rate == 0.0
    assert reading.interval_queries == reading.interval_hits == 0.0


def test_hit_rate_after_counter_reset() -> None:
    before = _sample(prefix_queries=5000.0, prefix_hits=100.0)
    after = _sample(prefix_queries=300.0, prefix_hits=120.0)  # engine restarted
    reading = pod_stats(after, before, 5.0)
    # Both deltas restart from zero, even the hits counter that did not visibly go back.
    assert reading.interval_queries == 300.0
    assert reading.interval_hits == 120.0
    assert reading.stats.gpu_prefix_cache_hit_rate == pytest.approx(0.4)


def test_pod_stats_copies_the_sample() -> None:
    sample = _sample(
        running=2.0,
        waiting=3.0,
        kv_usage=0.25,
        kv_usage_max=0.5,
        sleeping=True,
        max_lora=2,
        running_lora_adapters=("a",),
        waiting_lora_adapters=("b",),
    )
    stats = pod_stats(sample, None, 42.0).stats
    assert stats == EngineStats(
        num_running_requests=2.0,
        num_queuing_requests=3.0,
        gpu_cache_usage_perc=0.25,
        gpu_cache_usage_perc_max=0.5,
        sleep=True,
        max_lora=2,
        running_lora_adapters=("a",),
        waiting_lora_adapters=("b",),
        pods_scraped=1,
        sample_time=42.0,
        oldest_sample_time=42.0,
    )


# --- Service aggregation ----------------------------------------------------------------------


def _reading(
    previous: PodSample | None = None, sample_time: float = 10.0, **fields: object
) -> PodReading:
    return pod_stats(_sample(**fields), previous, sample_time)


def test_aggregate_empty_is_none() -> None:
    assert aggregate_service([]) is None
    assert aggregate_service([], stale=2, failed=3) is None


def test_aggregate_sums_mean_max() -> None:
    readings = [
        _reading(
            running=3.0,
            waiting=1.0,
            kv_usage=0.2,
            kv_usage_max=0.3,
            sample_time=10.0,
            prefix_queries=100.0,
            prefix_hits=10.0,
        ),
        _reading(
            running=5.0,
            waiting=0.0,
            kv_usage=0.6,
            kv_usage_max=0.9,
            sample_time=12.0,
            prefix_queries=50.0,
            prefix_hits=40.0,
        ),
    ]
    stats = aggregate_service(readings, stale=1, failed=2)
    assert stats is not None
    assert stats.num_running_requests == 8.0
    assert stats.num_queuing_requests == 1.0
    assert stats.gpu_cache_usage_perc == pytest.approx(0.4)
    assert stats.gpu_cache_usage_perc_max == pytest.approx(0.9)
    assert stats.gpu_prefix_cache_queries_total == 150.0
    assert stats.gpu_prefix_cache_hits_total == 50.0
    assert stats.pods_scraped == 2
    assert stats.pods_stale == 1
    assert stats.pods_failed == 2
    assert stats.sample_time == 12.0
    assert stats.oldest_sample_time == 10.0
    assert stats.per_pod == {}


def test_aggregate_hit_rate_is_ratio_of_summed_deltas() -> None:
    busy = pod_stats(
        _sample(prefix_queries=1900.0, prefix_hits=1000.0),
        _sample(prefix_queries=1000.0, prefix_hits=100.0),
        1.0,
    )  # 900 hits / 900 queries -> 1.0
    quiet = pod_stats(
        _sample(prefix_queries=200.0, prefix_hits=0.0),
        _sample(prefix_queries=100.0, prefix_hits=0.0),
        1.0,
    )  # 0 hits / 100 queries -> 0.0
    stats = aggregate_service([busy, quiet])
    assert stats is not None
    assert stats.gpu_prefix_cache_hit_rate == pytest.approx(0.9)  # not the mean 0.5


def test_aggregate_hit_rate_no_queries() -> None:
    stats = aggregate_service([_reading(), _reading()])
    assert stats is not None
    assert stats.gpu_prefix_cache_hit_rate == 0.0


@pytest.mark.parametrize(
    ("sleeps", "expected"),
    [((True, True), True), ((True, False), False), ((False, False), False), ((True,), True)],
)
def test_aggregate_sleep_only_when_all_sleep(sleeps: tuple[bool, ...], expected: bool) -> None:
    stats = aggregate_service([_reading(sleeping=s) for s in sleeps])
    assert stats is not None
    assert stats.sleep is expected


def test_aggregate_lora() -> None:
    readings = [
        _reading(max_lora=4, running_lora_adapters=("b", "a"), waiting_lora_adapters=("x",)),
        _reading(max_lora=2, running_lora_adapters=("c", "a")),
        _reading(max_lora=None),
    ]
    stats = aggregate_service(readings)
    assert stats is not None
    assert stats.max_lora == 2
    assert stats.running_lora_adapters == ("a", "b", "c")
    assert stats.waiting_lora_adapters == ("x",)


def test_aggregate_lora_none_reported() -> None:
    stats = aggregate_service([_reading(), _reading()])
    assert stats is not None
    assert stats.max_lora is None
    assert stats.running_lora_adapters == ()


def test_aggregate_fixture_two_pods(dp2_page: str) -> None:
    sample = parse_metrics(dp2_page)
    stats = aggregate_service([pod_stats(sample, None, 1.0), pod_stats(sample, None, 2.0)])
    assert stats is not None
    assert stats.num_running_requests == 16.0
    assert stats.gpu_cache_usage_perc == pytest.approx(0.3044)
    assert stats.gpu_cache_usage_perc_max == pytest.approx(0.4213)
    assert stats.gpu_prefix_cache_queries_total == 14336.0
    assert stats.running_lora_adapters == ("sql-lora", "tweet-lora")
