"""Label and field selector parsing, following the Kubernetes selector grammar.

The fake API server filters LIST and WATCH results with these, so that code under test sees
the same answers (including 400s for malformed selectors) as from a real cluster.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_router_svcdisc.errors import SvcDiscError

__all__ = [
    "FieldSelector",
    "LabelSelector",
    "Requirement",
    "SelectorError",
    "parse_field_selector",
    "parse_label_selector",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_PREFIX_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_OPERATOR_CHARS = "(),=!<>"
_EQUALITY_OPS = ("=", "==", "!=")
_FIELDS = ("metadata.name", "metadata.namespace")


class SelectorError(SvcDiscError, ValueError):
    """A selector string that the real API server would reject with 400 BadRequest."""


@dataclass(frozen=True)
class Requirement:
    """One comma-separated term of a label selector.

    op is one of "in" (also for = and ==), "notin" (also for !=), "exists", "!", "gt", "lt".
    """

    key: str
    op: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Apply the term; inequality and notin also hold when the label is absent."""
        value = labels.get(self.key)
        if self.op == "in":
            return value is not None and value in self.values
        if self.op == "notin":
            return value is None or value not in self.values
        if self.op == "exists":
            return value is not None
        if self.op == "!":
            return value is None
        return _compare_int(value, self.op, int(self.values[0]))


def _compare_int(value: str | None, op: str, bound: int) -> bool:
    """gt/lt compare integers; a missing or non-integer label never matches."""
    if value is None:
        return False
    try:
        number = int(value)
    except ValueError:
        return False
    return number > bound if op == "gt" else number < bound


@dataclass(frozen=True)
class LabelSelector:
    """A parsed label selector: the AND of its requirements (empty matches everything)."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        """True when every requirement holds for these labels."""
        present = labels or {}
        return all(req.matches(present) for req in self.requirements)


@dataclass(frozen=True)
class FieldSelector:
    """A parsed field selector over metadata.name / metadata.namespace."""

    terms: tuple[tuple[str, bool, str], ...] = ()  # (field, equal?, value)

    def matches(self, obj: Mapping[str, Any]) -> bool:
        """True when every term holds for this object."""
        metadata = obj.get("metadata") or {}
        for field, equal, value in self.terms:
            actual = str(metadata.get(field.split(".", 1)[1]) or "")
            if (actual == value) != equal:
                return False
        return True


# --- label selector lexer / parser -------------------------------------------------------------

_Token = tuple[str, str]  # (kind, text); kind is "op" or "id"


def _tokenize(text: str) -> list[_Token]:
    """Split into operator and identifier tokens; whitespace only separates."""
    tokens: list[_Token] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char.isspace():
            i += 1
        elif text.startswith(("!=", "=="), i):
            tokens.append(("op", text[i : i + 2]))
            i += 2
        elif char in _OPERATOR_CHARS:
            tokens.append(("op", char))
            i += 1
        else:
            j = i
            while j < len(text) and not text[j].isspace() and text[j] not in _OPERATOR_CHARS:
                j += 1
            tokens.append(("id", text[i:j]))
            i = j
    return tokens


def _validate_key(key: str) -> str:
    """Check a label key: optional DNS-subdomain prefix and a name of at most 63 characters."""
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > 253 or not _PREFIX_RE.match(prefix)):
        raise SelectorError(f"invalid label key {key!r}: bad prefix")
    if not name or len(name) > 63 or not _NAME_RE.match(name):
        raise SelectorError(f"invalid label key {key!r}")
    return key


def _validate_value(value: str) -> str:
    """Check a label value: at most 63 characters, alphanumeric at both ends (or empty)."""
    if len(value) > 63 or not _VALUE_RE.match(value):
        raise SelectorError(f"invalid label value {value!r}")
    return value


class _Parser:
    """Recursive-descent parser over the token list."""

    def __init__(self, tokens: list[_Token]) -> None:
        self._tokens = tokens
        self._pos = 0

    def _peek(self) -> _Token | None:
        return self._tokens[self._pos] if self._pos < len(self._tokens) else None

    def _next(self, expected: str) -> _Token:
        token = self._peek()
        if token is None:
            raise SelectorError(f"unexpected end of selector, expected {expected}")
        self._pos += 1
        return token

    def parse(self) -> tuple[Requirement, ...]:
        if not self._tokens:
            return ()
        requirements = [self._requirement()]
        while self._peek() is not None:
            if self._next("','") != ("op", ","):
                raise SelectorError("expected ',' between requirements")
            requirements.append(self._requirement())
        return tuple(requirements)

    def _identifier(self, what: str) -> str:
        kind, text = self._next(what)
        if kind != "id":
            raise SelectorError(f"expected {what}, found {text!r}")
        return text

    def _requirement(self) -> Requirement:
        if self._peek() == ("op", "!"):
            self._pos += 1
            return Requirement(_validate_key(self._identifier("label key")), "!")
        key = _validate_key(self._identifier("label key"))
        following = self._peek()
        if following is None or following == ("op", ","):
            return Requirement(key, "exists")
        kind, text = self._next("operator")
        if kind == "op" and text in _EQUALITY_OPS:
            return Requirement(key, "notin" if text == "!=" else "in", (self._single_value(),))
        if kind == "id" and text in ("in", "notin"):
            return Requirement(key, text, self._value_set())
        if kind == "op" and text in ("<", ">"):
            bound = self._identifier("integer")
            if not re.fullmatch(r"-?[0-9]+", bound):
                raise SelectorError(f"{bound!r} is not an integer")
            return Requirement(key, "gt" if text == ">" else "lt", (bound,))
        raise SelectorError(f"unknown operator {text!r}")

    def _single_value(self) -> str:
        following = self._peek()
        if following is None or following == ("op", ","):
            return ""  # "a=" selects an empty value, as in Kubernetes
        return _validate_value(self._identifier("value"))

    def _value_set(self) -> tuple[str, ...]:
        if self._next("'('") != ("op", "("):
            raise SelectorError("expected '(' after in/notin")
        values: list[str] = []
        while True:
            kind, text = self._next("value or ')'")
            if kind == "id":
                values.append(_validate_value(text))
                kind, text = self._next("',' or ')'")
            if (kind, text) == ("op", ")"):
                break
            if (kind, text) != ("op", ","):
                raise SelectorError(f"unexpected {text!r} in value set")
        if not values:
            raise SelectorError("values set can't be empty for in/notin")
        return tuple(values)


def parse_label_selector(text: str | None) -> LabelSelector:
    """Parse a labelSelector query value; None or blank selects everything."""
    if not text or not text.strip():
        return LabelSelector()
    return LabelSelector(_Parser(_tokenize(text)).parse())


def parse_field_selector(text: str | None) -> FieldSelector:
    """Parse a fieldSelector query value (metadata.name and metadata.namespace only)."""
    if not text or not text.strip():
        return FieldSelector()
    terms: list[tuple[str, bool, str]] = []
    for raw in text.split(","):
        term = raw.strip()
        for op in ("!=", "==", "="):
            field, sep, value = term.partition(op)
            if sep:
                break
        else:
            raise SelectorError(f"invalid field selector term {term!r}")
        field = field.strip()
        if field not in _FIELDS:
            raise SelectorError(f"field label not supported: {field}")
        terms.append((field, op != "!=", value.strip()))
    return FieldSelector(tuple(terms))
