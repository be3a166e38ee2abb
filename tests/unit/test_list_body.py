"""The item-by-item LIST reader agrees with ``json.loads`` on every body, and says no to the
bodies ``json.loads`` says no to before handing over a bad item."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from vllm_router_svcdisc.list_body import ListBody


def body(items: list[Any], *, indent: int | None = None, items_first: bool = False,
         extra: dict[str, Any] | None = None) -> str:
    head = {"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"resourceVersion": "42", "continue": "tok"}}
    whole = {"items": items, **head} if items_first else {**head, "items": items}
    return json.dumps({**whole, **(extra or {})}, indent=indent)


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["str", "int", "float", "bool", "null"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "str":
        return "".join(rng.choice('ab"\\/\n\u00e9\u4e2d ,:]}[{') for _ in range(rng.randint(0, 8)))
    if kind == "int":
        return rng.randint(-10**12, 10**12)
    if kind == "float":
        return rng.uniform(-1e6, 1e6)
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {f"k{i}{random_value(rng, 3) if i == 0 else ''}": random_value(rng, depth + 1)
            for i in range(rng.randint(0, 4))}


@pytest.mark.parametrize("seed", range(30))
def test_items_and_header_are_what_json_loads_reads(seed: int) -> None:
    rng = random.Random(seed)
    items = [random_value(rng) for _ in range(rng.randint(0, 20))]
    text = body(items, indent=rng.choice([None, 0, 2]), items_first=seed % 5 == 0)
    reference = json.loads(text)
    page = ListBody(text)
    assert list(page.items()) == reference["items"]
    assert page.header == {k: v for k, v in reference.items() if k != "items"}


def test_an_empty_list_and_a_list_without_items() -> None:
    assert list(ListBody(body([])).items()) == []
    page = ListBody('{"kind": "ServiceList", "metadata": {"resourceVersion": "1"}}')
    assert list(page.items()) == [] and page.header["metadata"]["resourceVersion"] == "1"


@pytest.mark.parametrize("text", ["", "[]", '{"metadata": {}, "items": 3}', '{"a" 1}',
                                  '{"a": 1 "b": 2}', "not json"])
def test_a_body_that_is_not_a_list_object_is_refused_at_once(text: str) -> None:
    with pytest.raises(ValueError):
        list(ListBody(text).items())


def test_a_malformed_item_is_refused_after_the_good_ones_before_it() -> None:
    text = body([{"a": 1}, {"b": 2}]).replace('{"b": 2}', '{"b": }')
    read: list[Any] = []
    with pytest.raises(ValueError):
        for item in ListBody(text).items():
            read.append(item)
    assert read == [{"a": 1}]
    with pytest.raises(ValueError):  # a truncated body
        list(ListBody(body([{"a": 1}, {"b": 2}])[:-12]).items())
