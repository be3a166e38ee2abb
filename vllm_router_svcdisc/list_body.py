"""Internal: a Kubernetes LIST body read one item at a time.

Why not ``json.loads``: a LIST of 10 000 EndpointSlices of 10 pods is a 28 MB body whose
decoded objects all exist at once; they are garbage a moment later, but the process keeps much
of that memory.  The API server writes ``kind``, ``apiVersion`` and ``metadata`` before
``items``, so the header is read first and the items are decoded as the informer consumes them,
each with :meth:`json.JSONDecoder.raw_decode` — the standard library's parser, item by item.  A
body in another order is decoded whole, as before.  ``tests/unit/test_list_body.py``
cross-checks the result against ``json.loads``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")


class ListBody:
    """The header (every key before ``items``) and an iterator over the items of one body."""

    def __init__(self, text: str) -> None:
        """Raises ValueError when ``text`` is not a JSON object (its items are checked as
        they are read)."""
        self._text = text
        self._start: int | None = None  # just past the items array's "["
        self._items: list[Any] | None = None  # the whole body was decoded (another order)
        self.header: dict[str, Any] = {}
        at = _skip(text, 0)
        if not text.startswith("{", at):
            raise ValueError("a LIST body is a JSON object")
        at = _skip(text, at + 1)
        while not text.startswith("}", at):
            key, at = _DECODER.raw_decode(text, at)
            at = _skip(text, at)
            if not isinstance(key, str) or not text.startswith(":", at):
                raise ValueError(f"expected a key and ':' at {at}")
            at = _skip(text, at + 1)
            if key == "items" and "metadata" in self.header:
                if not text.startswith("[", at):
                    raise ValueError("'items' is not a list")
                self._start = at + 1
                return
            if key == "items":  # before the metadata: not the API server's order
                whole = json.loads(text)
                self.header = {k: v for k, v in whole.items() if k != "items"}
                items = whole.get("items")
                self._items = items if isinstance(items, list) else []
                return
            value, at = _DECODER.raw_decode(text, at)
            self.header[key] = value
            at = _skip(text, at)
            if text.startswith(",", at):
                at = _skip(text, at + 1)
            elif not text.startswith("}", at):
                raise ValueError(f"expected ',' or '}}' at {at}")

    def items(self) -> Iterator[Any]:
        """The items, decoded one at a time (ValueError at a malformed one)."""
        if self._items is not None:
            yield from self._items
            return
        if self._start is None:
            return
        text = self._text
        at = _skip(text, self._start)
        if text.startswith("]", at):
            return
        while True:
            item, at = _DECODER.raw_decode(text, at)
            yield item
            at = _skip(text, at)
            if text.startswith(",", at):
                at = _skip(text, at + 1)
            elif text.startswith("]", at):
                return
            else:
                raise ValueError(f"expected ',' or ']' at {at} in 'items'")


def _skip(text: str, at: int) -> int:
    match = _SPACE.match(text, at)
    return match.end() if match is not None else at
