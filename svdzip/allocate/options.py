"""Declared allocator options: name, type, default and a line of help, parsed from `key=value` text.

`svdzip compress --allocator-option key=value` gives a value as JSON where it parses (`8`, `true`,
`[0, 0.1]`) and as text otherwise (`paper`, `0,0.1`); the Python API gives typed values. Both go
through the same parser, so a typo in a key or a malformed value is one clear `SvdzipError` that
names the valid options, raised before any calibration — never a traceback from deep inside a run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from svdzip.errors import SvdzipError

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


class BadValue(ValueError):
    """A value an option's parser refuses; the message says what was expected."""


@dataclass(frozen=True)
class Option:
    """One option an allocator accepts. `parse` turns a typed or textual value into the typed one."""

    name: str
    kind: str  # what the value is, in words ("integer ≥ 1", "list of numbers", …)
    default: Any
    doc: str
    parse: Callable[[Any], Any]

    def describe(self) -> str:
        default = "none" if self.default is None else json.dumps(self.default, default=str)
        return f"{self.name} ({self.kind}, default {default}): {self.doc}"


def parse_options(owner: str, declared: Sequence[Option], raw: Mapping[str, Any],
                  forward: Iterable[str] = ()) -> dict[str, Any]:
    """Every declared option of `owner`, typed (defaults filled in); keys in `forward` pass through untouched.

    Idempotent: parsing an already parsed dict gives it back.
    """
    known = {o.name: o for o in declared}
    forward = set(forward)
    unknown = sorted(k for k in raw if k not in known and k not in forward)
    if unknown:
        raise SvdzipError(f"unknown option(s) {', '.join(unknown)} for the '{owner}' allocator; "
                          + describe(owner, declared))
    out = {o.name: o.default for o in declared}
    for key, value in raw.items():
        if key in forward:
            out[key] = value
            continue
        try:
            out[key] = known[key].parse(value)
        except BadValue as exc:
            raise SvdzipError(f"allocator option {key}={_show(value)} of '{owner}' is not valid: {exc}; "
                              f"{known[key].describe()}") from None
    return out


def describe(owner: str, declared: Sequence[Option]) -> str:
    if not declared:
        return f"'{owner}' takes no options"
    return f"'{owner}' takes: " + "; ".join(o.describe() for o in declared)


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


# --------------------------------------------------------------------------- value parsers


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) else None


def as_flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = _text(value)
    if text is not None and text.lower() in TRUE + FALSE:
        return text.lower() in TRUE
    raise BadValue("expected true or false")


def as_number(value: Any) -> float:
    if isinstance(value, bool):
        raise BadValue("expected a number")
    if isinstance(value, int | float):
        number = float(value)
    else:
        text = _text(value)
        if text is None:
            raise BadValue("expected a number")
        try:
            number = float(text)
        except ValueError:
            raise BadValue("expected a number") from None
    if not math.isfinite(number):
        raise BadValue("expected a finite number")
    return number


def as_integer(value: Any) -> int:
    number = as_number(value)
    if not number.is_integer():
        raise BadValue("expected a whole number")
    return int(number)


def numbers_where(accept: Callable[[float], bool], rule: str) -> Callable[[Any], list[float]]:
    """A list of numbers (`as_numbers`) each of which `accept`s; `rule` says which in the error."""
    def check(value: Any) -> list[float]:
        values = as_numbers(value)
        if not all(accept(v) for v in values):
            raise BadValue(rule)
        return values
    return check


def as_numbers(value: Any) -> list[float]:
    """A list of numbers: a JSON list, one number, or comma-separated text (`0,0.1,0.2`)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise BadValue("expected a list of numbers such as [0, 0.1] or 0,0.1") from None
        else:
            value = [p for p in text.split(",") if p.strip()]
    elif isinstance(value, int | float) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list | tuple) or not value:
        raise BadValue("expected a non-empty list of numbers such as [0, 0.1] or 0,0.1")
    try:
        return [as_number(v) for v in value]
    except BadValue:
        raise BadValue("expected a non-empty list of numbers such as [0, 0.1] or 0,0.1") from None


def at_least(parse: Callable[[Any], float], low: float, strict: bool = False) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        v = parse(value)
        if v < low or (strict and v == low):
            raise BadValue(f"expected a value {'>' if strict else '≥'} {low:g}")
        return v
    return check


def between(parse: Callable[[Any], float], low: float, high: float) -> Callable[[Any], Any]:
    """low ≤ v < high."""
    def check(value: Any) -> Any:
        v = parse(value)
        if not low <= v < high:
            raise BadValue(f"expected a value in [{low:g}, {high:g})")
        return v
    return check


def one_of(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        text = _text(value)
        if text not in choices:
            raise BadValue(f"expected one of {', '.join(choices)}")
        return text
    return check


def other_allocator(own: str) -> Callable[[Any], str]:
    """The name of another registered allocator (for allocators that start from or wrap one)."""
    def check(value: Any) -> str:
        from svdzip.allocate import available

        name = one_of(*available())(value)
        if name == own:
            raise BadValue(f"{own} cannot start from or wrap itself")
        return name
    return check


def or_none(parse: Callable[[Any], Any], word: str = "auto") -> Callable[[Any], Any]:
    """None (JSON null, or the word) keeps the allocator's own default."""
    def check(value: Any) -> Any:
        if value is None or (_text(value) or "").lower() in (word, "none", "null"):
            return None
        return parse(value)
    return check


def or_word(parse: Callable[[Any], Any], word: str) -> Callable[[Any], Any]:
    """A value, or one literal word (ARA's lr=auto)."""
    def check(value: Any) -> Any:
        if _text(value) == word:
            return word
        return parse(value)
    return check


def flag_or_path(value: Any) -> bool | str:
    """true / false, or a directory (STRS's cache)."""
    try:
        return as_flag(value)
    except BadValue:
        text = _text(value)
        if text:
            return text
        raise BadValue("expected true, false or a directory") from None


def integer(name: str, default: int, doc: str, minimum: int | None = None) -> Option:
    parse = as_integer if minimum is None else at_least(as_integer, minimum)
    return Option(name, "whole number" + (f" ≥ {minimum}" if minimum is not None else ""), default, doc, parse)


def number(name: str, default: float | None, doc: str, parse: Callable[[Any], Any] = as_number,
           kind: str = "number") -> Option:
    return Option(name, kind, default, doc, parse)


def flag(name: str, default: bool, doc: str) -> Option:
    return Option(name, "true or false", default, doc, as_flag)


def choice(name: str, choices: Sequence[str], default: str, doc: str) -> Option:
    return Option(name, " | ".join(choices), default, doc, one_of(*choices))


def numbers(name: str, default: list[float], doc: str, parse: Callable[[Any], Any] = as_numbers) -> Option:
    return Option(name, "list of numbers, e.g. [0, 0.1] or 0,0.1", default, doc, parse)


__all__ = ["BadValue", "Option", "as_flag", "as_integer", "as_number", "as_numbers", "choice", "describe", "flag",
           "flag_or_path", "integer", "number", "numbers", "parse_options"]
