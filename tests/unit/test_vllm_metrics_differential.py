"""The fast metrics path against prometheus_client's parser: same series, same errors.

``vllm_metrics`` reads canonical pages with its own small parser and sends anything it is unsure
about to prometheus_client.  These tests hold the two to the same answer on the fixtures, on
pages rendered by the simulator, and on generated pages full of the awkward parts of the text
format (escapes, NaN, duplicates, odd whitespace, TYPE lines that rename samples).  The fast
path must also really be taken on canonical pages, or the comparison would prove nothing.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from vllm_router_svcdisc.sim.engine import FakeEngine
from vllm_router_svcdisc.vllm_metrics import (
    MetricsParseError,
    _collect_fast,
    _collect_reference,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

WANTED_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
WANTED_COUNTERS = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits",
                   "vllm:gpu_prefix_cache_queries", "vllm:gpu_prefix_cache_hits")
OTHER_FAMILIES = ("vllm:time_to_first_token_seconds", "vllm:num_preemptions",
                  "process_cpu_seconds", "vllm:num_requests_running_extra")
MODEL_NAMES = ("Qwen/Qwen3-8B", "meta-llama/Llama-3.1-8B-Instruct", 'odd "quoted" name',
               "back\\slash", "brace}name", "comma,name", "ünïcode", "new\nline")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _value(rng: random.Random, canonical: bool) -> str:
    choices = ["0", "3", "3.0", "0.4213", "1e3", "1.7957707942852721e+09", "-2", "NaN",
               "+Inf", "-Inf"]
    if not canonical and rng.random() < 0.15:
        choices += ["1_000", "abc", "0x10", ""]
    return rng.choice(choices)


def _labels(rng: random.Random, canonical: bool, model: str) -> str:
    pairs = [f'engine="{rng.randrange(3)}"', f'model_name="{_escape(model)}"']
    if rng.random() < 0.3:
        pairs.append('sleep_state="{}"'.format(rng.choice(["awake", "weights_offloaded"])))
    rng.shuffle(pairs)
    text = ",".join(pairs)
    if not canonical and rng.random() < 0.15:
        text = rng.choice([text, text + ",", " " + text, text.replace(",", ", "),
                           text + ',engine="9"', "__name__=\"x\"," + text, text + ",,", ""])
    return text


def _sample_line(rng: random.Random, name: str, canonical: bool, model: str) -> str:
    labels = _labels(rng, canonical, model)
    line = f"{name}{{{labels}}} {_value(rng, canonical)}"
    if rng.random() < 0.2:
        line = f"{name} {_value(rng, canonical)}"
    if rng.random() < 0.1:
        line += " 1700000000000"
    if not canonical and rng.random() < 0.15:
        line = rng.choice([line, "  " + line, line + " ", line.replace(" ", "\t", 1),
                           line.replace(" ", "  ", 1), line + " 12 extra"])
    return line


def _page(rng: random.Random, canonical: bool) -> str:
    lines: list[str] = []
    model = rng.choice(MODEL_NAMES) if not canonical else rng.choice(MODEL_NAMES[:2])
    families = [(f, "gauge", f) for f in WANTED_GAUGES] + [
        (f, "counter", f + "_total") for f in WANTED_COUNTERS] + [
        (f, rng.choice(["histogram", "counter", "gauge"]), f + "_bucket")
        for f in OTHER_FAMILIES]
    rng.shuffle(families)
    for family, kind, sample_name in families[: rng.randint(1, len(families))]:
        if rng.random() < 0.7:
            lines.append(f"# HELP {family} Some help text, with TYPE in it.")
        if rng.random() < 0.8:
            type_name = family if rng.random() < 0.7 or kind != "counter" else family + "_total"
            type_kind = kind
            if not canonical and rng.random() < 0.1:
                type_kind = rng.choice(["counter", "untyped", ""])
            lines.append(f"# TYPE {type_name} {type_kind}".rstrip())
        for _ in range(rng.randint(1, 3)):
            name = sample_name
            if not canonical and kind == "counter" and rng.random() < 0.1:
                name = family  # a counter sample without _total: the reference renames it
            lines.append(_sample_line(rng, name, canonical, model))
        if kind == "counter" and rng.random() < 0.5:
            lines.append(f'{family}_created{{model_name="m"}} 1.7e9')
    if not canonical and rng.random() < 0.3:
        lines.insert(rng.randrange(len(lines) + 1),
                     rng.choice(["<html>", '{"detail": 1}', "#TYPE vllm:kv_cache_usage_perc x",
                                 "garbage line", ""]))
    separator = "\r\n" if not canonical and rng.random() < 0.2 else "\n"
    return separator.join(lines) + separator


def _reference(text: str) -> object:
    try:
        return _collect_reference(text)
    except MetricsParseError:
        return MetricsParseError


def _same_answer(text: str) -> bool:
    """True when the fast path answered (not deferred); asserts it agrees with the reference."""
    fast = _collect_fast(text)
    if fast is None:
        return False
    assert fast == _reference(text), text
    return True


@pytest.mark.parametrize("name", ["vllm-0.33-metrics-dp2.txt"])
def test_fixture_is_read_by_the_fast_path_with_the_reference_result(name: str) -> None:
    assert _same_answer((FIXTURES / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("options", [{}, {"dp_ranks": 2}, {"legacy_names": True},
                                     {"lora_adapters": ["sql-lora"]}])
def test_simulator_pages_are_read_by_the_fast_path(options: dict[str, object]) -> None:
    engine = FakeEngine("127.0.0.1", 0, **options)  # rendered, never started
    assert _same_answer(engine.metrics_text().decode())


def test_generated_canonical_pages_agree_and_take_the_fast_path() -> None:
    rng = random.Random(20261201)
    for _ in range(400):
        assert _same_answer(_page(rng, canonical=True))


def test_generated_awkward_pages_agree_whenever_the_fast_path_answers() -> None:
    rng = random.Random(1201)
    answered = deferred = 0
    for _ in range(1500):
        text = _page(rng, canonical=False)
        if _same_answer(text):
            answered += 1
        else:
            deferred += 1  # always allowed: the reference then answers alone
    assert answered > 100 and deferred > 100  # both branches really exercised


@pytest.mark.parametrize("line", [
    'vllm:num_requests_running{model_name="m"} 1_000',           # Go/Python-only digit groups
    'vllm:num_requests_running{model_name="m",model_name="n"} 1',  # duplicate label
    'vllm:num_requests_running{__name__="x"} 1',                 # reserved label name
    "vllm:prefix_cache_queries 5",                               # counter without _total
    "  vllm:num_requests_running 1",                             # indented
    'vllm:num_requests_running{model_name="m"} 1 2 3',           # extra tokens
])
def test_lines_the_fast_path_defers(line: str) -> None:
    assert _collect_fast(f"{line}\n") is None


def test_a_gauge_declared_as_counter_is_left_to_the_reference() -> None:
    page = "# TYPE vllm:num_requests_running counter\nvllm:num_requests_running 3\n"
    assert _collect_fast(page) is None
    series, _ = _collect_reference(page)  # renamed to ..._total: not a running count
    assert "vllm:num_requests_running" not in series
