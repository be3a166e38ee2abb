"""Internal: turn a vLLM ``/metrics`` page into load figures: one pod, then a whole Service.

Pure functions (no I/O, no threads) so the scraper thread stays thin and every rule here can be
tested against plain text.  The rules, and why:

* Current metric names are read first; the legacy ``gpu_*`` names (vLLM <= 0.10) are only a
  fallback when the current name is absent, so a page that emits both is never double counted.
* Series are matched on *sample* names: prometheus_client strips ``_total`` from counter family
  names but keeps it on samples, and an untyped counter keeps it in both places.
* One page carries one series per data-parallel rank (``engine`` label): counts and counters are
  summed over ranks, KV usage is averaged (and its max kept).  If the exact same label set
  appears twice, the last line wins, so a duplicated line is not counted twice.
* Non-finite values (NaN, +Inf, -Inf) are dropped as if the line were absent: one bad rank must
  not poison a sum or a mean.  Negative values are clamped to 0 (counts cannot be negative).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from prometheus_client.parser import text_string_to_metric_families

from vllm_router_svcdisc.errors import SvcDiscError
from vllm_router_svcdisc.types import EngineStats

__all__ = [
    "MetricsParseError",
    "PodReading",
    "PodSample",
    "Progress",
    "aggregate_service",
    "parse_metrics",
    "parse_progress",
    "pod_stats",
]

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
PREFIX_HITS = "vllm:prefix_cache_hits_total"
LEGACY_KV_USAGE = "vllm:gpu_cache_usage_perc"
LEGACY_PREFIX_QUERIES = "vllm:gpu_prefix_cache_queries_total"
LEGACY_PREFIX_HITS = "vllm:gpu_prefix_cache_hits_total"
SLEEP_STATE = "vllm:engine_sleep_state"
LORA_INFO = "vllm:lora_requests_info"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
GENERATION_TOKENS = "vllm:generation_tokens_total"

_WANTED = frozenset(
    {
        RUNNING,
        WAITING,
        KV_USAGE,
        PREFIX_QUERIES,
        PREFIX_HITS,
        LEGACY_KV_USAGE,
        LEGACY_PREFIX_QUERIES,
        LEGACY_PREFIX_HITS,
        SLEEP_STATE,
        LORA_INFO,
        PROMPT_TOKENS,
        GENERATION_TOKENS,
    }
)
_LOAD_NAMES = (RUNNING, WAITING, KV_USAGE, LEGACY_KV_USAGE)
_ERROR_DETAIL_MAX = 120

# A series' identity on one page: its label set.
_LabelKey = frozenset[tuple[str, str]]


class MetricsParseError(SvcDiscError, ValueError):
    """The page is not a usable vLLM metrics page (the message is short, never the body)."""


@dataclass(frozen=True)
class PodSample:
    """What one ``/metrics`` page says, ranks already folded together."""

    running: float
    waiting: float
    kv_usage: float
    kv_usage_max: float
    prefix_queries: float
    prefix_hits: float
    sleeping: bool
    max_lora: int | None
    running_lora_adapters: tuple[str, ...]
    waiting_lora_adapters: tuple[str, ...]
    legacy_names: bool
    model_names: frozenset[str]
    tokens: float | None = None  # prompt + generation tokens so far (None: neither exported)


@dataclass(frozen=True)
class PodReading:
    """One pod's figures at one scrape, plus the counter deltas a Service hit rate needs.

    ``interval_hits``/``interval_queries`` are kept apart from ``stats`` because a Service's hit
    rate must be the ratio of summed deltas, not the mean of per-pod ratios.
    """

    stats: EngineStats
    interval_hits: float
    interval_queries: float
    sample: PodSample


def _shorten(text: str) -> str:
    """Keep error messages short: a parser message may quote a whole line of the body."""
    text = " ".join(text.split())
    if len(text) > _ERROR_DETAIL_MAX:
        return text[: _ERROR_DETAIL_MAX - 3] + "..."
    return text


# Family names (counters without ``_total``) of what we read, for the line pre-filter.
_FAMILIES = frozenset(name.removesuffix("_total") for name in _WANTED)


def _line_family(line: str) -> str:
    """The family a line belongs to as the pre-filter sees it ("" for HELP and blank lines)."""
    if line.startswith("#"):  # HELP lines are dropped: the parser does not need them
        parts = line.split(None, 3)
        return parts[2] if len(parts) > 2 and parts[1] == "TYPE" else ""
    words = line.split("{", 1)[0].split(None, 1)
    return words[0] if words else ""  # blank, or a line opening with "{" (JSON): no family


def _relevant_lines(text: str) -> str:
    """Only the lines of the families we read, so the parser skips the histograms.

    A vLLM page is mostly histogram buckets; parsing them would cost ten times the useful work,
    which matters when one process scrapes a thousand pods a second.
    """
    kept = [line for line in text.splitlines()
            if _line_family(line).removesuffix("_total") in _FAMILIES]  # never *_created
    return "\n".join(kept) + "\n"


def _collect(text: str) -> tuple[dict[str, dict[_LabelKey, float]], frozenset[str]]:
    """Series of the metrics we read, keyed by sample name then label set; model names seen.

    The fast path reads the canonical exposition that vLLM (prometheus_client) writes; a page it
    is not sure about goes to prometheus_client's parser, whose result is the reference.
    """
    collected = _collect_fast(text)
    return collected if collected is not None else _collect_reference(text)


def _collect_reference(text: str) -> tuple[dict[str, dict[_LabelKey, float]], frozenset[str]]:
    """:func:`_collect` through prometheus_client's parser (after the line pre-filter).

    Non-finite values are skipped here, before de-duplication, so a NaN line neither counts nor
    hides an earlier good line with the same labels.
    """
    series: dict[str, dict[_LabelKey, float]] = {}
    models: set[str] = set()
    try:
        for family in text_string_to_metric_families(_relevant_lines(text)):
            for sample in family.samples:
                model = sample.labels.get("model_name")
                if model:
                    models.add(model)
                if sample.name not in _WANTED:
                    continue
                value = float(sample.value)
                if not math.isfinite(value):
                    continue
                key: _LabelKey = frozenset(sample.labels.items())
                series.setdefault(sample.name, {})[key] = value
    except Exception as exc:  # the parser raises assorted errors on non-exposition text
        detail = _shorten(str(exc)) or type(exc).__name__
        raise MetricsParseError(f"not Prometheus text exposition: {detail}") from exc
    return series, frozenset(models)


# The canonical sample line: ``name{label="value",...} value [timestamp]``, single spaces.
_SAMPLE_LINE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})? (\S+)(?: (\S+))?")
_LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')
_ESCAPE = re.compile(r"\\(.)")
_UNESCAPED = {"\\": "\\", "n": "\n", '"': '"'}
_FAMILY_PREFIXES = tuple(sorted(_FAMILIES))
# Gauges declared as counters would have their samples renamed by the reference parser.
_GAUGES = frozenset(name for name in _WANTED if not name.endswith("_total"))


class _NotCanonical(Exception):
    """The fast path is unsure about a line: the reference parser decides the whole page."""


def _unescape(match: re.Match[str]) -> str:
    char = match.group(1)
    return _UNESCAPED.get(char, "\\" + char)


def _labels(block: str) -> dict[str, str]:
    """``a="x",b="y"`` (an optional trailing comma) as a dict; anything else is not canonical."""
    labels: dict[str, str] = {}
    position = 0
    while position < len(block):
        match = _LABEL_PAIR.match(block, position)
        if match is None:
            raise _NotCanonical
        name, value = match.group(1), match.group(2)
        if name in labels or name.startswith("__"):
            raise _NotCanonical  # the reference rejects duplicate and reserved names
        labels[name] = _ESCAPE.sub(_unescape, value) if "\\" in value else value
        position = match.end()
    return labels


def _number(token: str) -> float:
    if "_" in token:
        raise _NotCanonical
    try:
        return float(token)
    except ValueError:
        raise _NotCanonical from None


def _collect_fast(text: str) -> tuple[dict[str, dict[_LabelKey, float]], frozenset[str]] | None:
    """:func:`_collect_reference`'s result for canonical pages, None when unsure.

    Only lines of the families we read are looked at, as the pre-filter does; the rest of the
    page (histograms, other exporters' lines) is skipped unread.
    """
    series: dict[str, dict[_LabelKey, float]] = {}
    models: set[str] = set()
    try:
        for line in text.splitlines():
            if not line:
                continue
            if line[0] == "#":
                if line.startswith("# HELP "):
                    continue
                family = _line_family(line)  # "" unless a TYPE line
                if family.removesuffix("_total") in _FAMILIES and (
                    " ".join(parts := line.split(None, 3)) != line or '"' in line
                    or len(parts) != 4 or (family in _GAUGES and parts[3] == "counter")
                ):
                    raise _NotCanonical  # the reference may reject it or rename samples
                continue
            if not line.startswith(_FAMILY_PREFIXES):
                # A line of ours starts with its family name, unless indented (then unsure).
                if line[0].isspace() and _line_family(line).removesuffix("_total") in _FAMILIES:
                    raise _NotCanonical
                continue
            match = _SAMPLE_LINE.fullmatch(line)
            if match is None:
                if _line_family(line).removesuffix("_total") in _FAMILIES:
                    raise _NotCanonical
                continue
            name = match.group(1)
            if name not in _WANTED:
                if name.removesuffix("_total") in _FAMILIES:
                    raise _NotCanonical  # e.g. a counter without _total: renamed by the reference
                continue
            labels = _labels(match.group(2) or "")
            value = _number(match.group(3))
            if match.group(4) is not None:
                _number(match.group(4))  # a timestamp: validated, not used
            model = labels.get("model_name")
            if model:
                models.add(model)
            if math.isfinite(value):
                series.setdefault(name, {})[frozenset(labels.items())] = value
    except _NotCanonical:
        return None
    return series, frozenset(models)


def _values(series: Mapping[str, Mapping[_LabelKey, float]], name: str) -> list[float]:
    """Values of every rank's series of ``name``, negatives clamped to 0."""
    return [max(0.0, v) for v in series.get(name, {}).values()]


def _pick(
    series: Mapping[str, Mapping[_LabelKey, float]], current: str, legacy: str
) -> tuple[list[float], bool]:
    """Values under the current name, else under the legacy one; True when legacy was used."""
    values = _values(series, current)
    if values:
        return values, False
    legacy_values = _values(series, legacy)
    return legacy_values, bool(legacy_values)


def _sleeping(series: Mapping[_LabelKey, float]) -> bool:
    """Any rank in a non-awake sleep state: that rank cannot serve until woken."""
    for key, value in series.items():
        state = dict(key).get("sleep_state")
        if state is not None and state != "awake" and value > 0:
            return True
    return False


def _split_adapters(joined: str | None) -> tuple[str, ...]:
    """vLLM comma-joins adapter names into one label; "" means none."""
    if not joined:
        return ()
    return tuple(name for name in (part.strip() for part in joined.split(",")) if name)


def _parse_int(raw: str | None) -> int | None:
    """``max_lora`` as an int, or None when the label is missing or not a number."""
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        number = float(raw)
    except ValueError:
        return None
    return int(number) if math.isfinite(number) else None


def _lora(
    series: Mapping[_LabelKey, float],
) -> tuple[int | None, tuple[str, ...], tuple[str, ...]]:
    """The newest ``lora_requests_info`` series (its value is a timestamp; old ones pile up)."""
    best: dict[str, str] | None = None
    best_value = -math.inf
    for key, value in series.items():
        if value >= best_value:  # ties: the later line wins, as for duplicates
            best, best_value = dict(key), value
    if best is None:
        return None, (), ()
    return (
        _parse_int(best.get("max_lora")),
        _split_adapters(best.get("running_lora_adapters")),
        _split_adapters(best.get("waiting_lora_adapters")),
    )


def parse_metrics(text: str) -> PodSample:
    """Parse one vLLM ``/metrics`` page into a :class:`PodSample`.

    Raises :class:`MetricsParseError` when the text is not Prometheus exposition, or when it
    has none of the running/waiting/KV-usage metrics (an HTML error page, another exporter):
    such a page says nothing about load and must not read as an idle engine.  A page missing
    only some of them gives 0 for the missing ones.
    """
    series, models = _collect(text)
    if not any(series.get(name) for name in _LOAD_NAMES):
        raise MetricsParseError("no vLLM running/waiting/kv-cache metrics on the page")

    kv, kv_legacy = _pick(series, KV_USAGE, LEGACY_KV_USAGE)
    kv = [min(1.0, v) for v in kv]  # a fraction of the cache; anything above 1 is noise
    queries, queries_legacy = _pick(series, PREFIX_QUERIES, LEGACY_PREFIX_QUERIES)
    hits, hits_legacy = _pick(series, PREFIX_HITS, LEGACY_PREFIX_HITS)
    max_lora, running_adapters, waiting_adapters = _lora(series.get(LORA_INFO, {}))

    return PodSample(
        running=sum(_values(series, RUNNING)),
        waiting=sum(_values(series, WAITING)),
        kv_usage=sum(kv) / len(kv) if kv else 0.0,
        kv_usage_max=max(kv, default=0.0),
        prefix_queries=sum(queries),
        prefix_hits=sum(hits),
        sleeping=_sleeping(series.get(SLEEP_STATE, {})),
        max_lora=max_lora,
        running_lora_adapters=running_adapters,
        waiting_lora_adapters=waiting_adapters,
        legacy_names=kv_legacy or queries_legacy or hits_legacy,
        model_names=models,
        tokens=_tokens(series),
    )


def _tokens(series: Mapping[str, Mapping[_LabelKey, float]]) -> float | None:
    """``vllm:prompt_tokens_total + vllm:generation_tokens_total`` over every rank and model,
    None when the page has neither (then progress cannot be judged)."""
    if not series.get(PROMPT_TOKENS) and not series.get(GENERATION_TOKENS):
        return None
    return sum(_values(series, PROMPT_TOKENS)) + sum(_values(series, GENERATION_TOKENS))


class Progress(NamedTuple):
    """What a liveness check reads from ``/metrics``: the token counters' sum (None when the
    page has neither) and the requests running tell a wedged engine from a busy one; the
    adapters of running and waiting requests tell that a LoRA adapter was loaded."""

    tokens: float | None
    running: float
    adapters: frozenset[str] = frozenset()


def parse_progress(body: bytes) -> Progress:
    """The :class:`Progress` of a ``/metrics`` body."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise MetricsParseError("metrics body is not UTF-8 text") from None
    series, _models = _collect(text)
    if not series.get(RUNNING):
        raise MetricsParseError("no vllm:num_requests_running on the page")
    _max, running, waiting = _lora(series.get(LORA_INFO, {}))
    return Progress(_tokens(series), sum(_values(series, RUNNING)),
                    frozenset(running) | frozenset(waiting))


def _ratio(hits: float, queries: float) -> float:
    """Hit rate in 0..1; 0.0 when nothing was queried."""
    if queries <= 0:
        return 0.0
    return min(1.0, max(0.0, hits / queries))


def pod_stats(sample: PodSample, previous: PodSample | None, sample_time: float) -> PodReading:
    """One pod's :class:`EngineStats`, with its prefix-cache hit rate since ``previous``.

    The hit rate is over the interval, not lifetime, so it follows the current workload.  If
    either counter went backwards the engine restarted: both deltas are then the new values
    (what was counted since the restart), never a negative number.
    """
    if previous is None:
        interval_hits = interval_queries = 0.0
    elif (
        sample.prefix_queries < previous.prefix_queries or sample.prefix_hits < previous.prefix_hits
    ):
        interval_hits, interval_queries = sample.prefix_hits, sample.prefix_queries
    else:
        interval_hits = sample.prefix_hits - previous.prefix_hits
        interval_queries = sample.prefix_queries - previous.prefix_queries

    stats = EngineStats(
        num_running_requests=sample.running,
        num_queuing_requests=sample.waiting,
        gpu_prefix_cache_hit_rate=_ratio(interval_hits, interval_queries),
        gpu_prefix_cache_hits_total=sample.prefix_hits,
        gpu_prefix_cache_queries_total=sample.prefix_queries,
        gpu_cache_usage_perc=sample.kv_usage,
        gpu_cache_usage_perc_max=sample.kv_usage_max,
        sleep=sample.sleeping,
        max_lora=sample.max_lora,
        running_lora_adapters=sample.running_lora_adapters,
        waiting_lora_adapters=sample.waiting_lora_adapters,
        pods_scraped=1,
        sample_time=sample_time,
        oldest_sample_time=sample_time,
    )
    return PodReading(
        stats=stats,
        interval_hits=interval_hits,
        interval_queries=interval_queries,
        sample=sample,
    )


def _union(groups: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
    """Sorted union of adapter names, so the result does not depend on pod order."""
    return tuple(sorted({name for group in groups for name in group}))


def aggregate_service(
    readings: Sequence[PodReading], *, stale: int = 0, failed: int = 0, ejected: int = 0
) -> EngineStats | None:
    """Fold the readings of a Service's pods into one :class:`EngineStats`.

    Returns None for no readings: a Service whose pods all failed must be absent from the
    stats, not reported as an idle engine.  ``per_pod`` is left empty for the caller to fill.
    """
    if not readings:
        return None
    stats = [reading.stats for reading in readings]
    interval_hits = sum(reading.interval_hits for reading in readings)
    interval_queries = sum(reading.interval_queries for reading in readings)
    lora_limits = [s.max_lora for s in stats if s.max_lora is not None]
    return EngineStats(
        num_running_requests=sum(s.num_running_requests for s in stats),
        num_queuing_requests=sum(s.num_queuing_requests for s in stats),
        gpu_prefix_cache_hit_rate=_ratio(interval_hits, interval_queries),
        gpu_prefix_cache_hits_total=sum(s.gpu_prefix_cache_hits_total for s in stats),
        gpu_prefix_cache_queries_total=sum(s.gpu_prefix_cache_queries_total for s in stats),
        gpu_cache_usage_perc=sum(s.gpu_cache_usage_perc for s in stats) / len(stats),
        gpu_cache_usage_perc_max=max(s.gpu_cache_usage_perc_max for s in stats),
        sleep=all(s.sleep for s in stats),
        max_lora=min(lora_limits) if lora_limits else None,
        running_lora_adapters=_union(s.running_lora_adapters for s in stats),
        waiting_lora_adapters=_union(s.waiting_lora_adapters for s in stats),
        pods_scraped=len(stats),
        pods_stale=stale,
        pods_failed=failed,
        pods_ejected=ejected,
        sample_time=max(s.sample_time for s in stats),
        oldest_sample_time=min(s.oldest_sample_time for s in stats),
    )
