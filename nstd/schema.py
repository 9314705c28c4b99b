"""A small declarative validator for config.yaml and job files.

Every error names the key (as a dotted path) and what was expected, because the people reading
it are users looking at a YAML file, not programmers reading a traceback.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from nstd.errors import NstdError


class SchemaError(NstdError, ValueError):
    """Values in a config or job file that are unknown, of the wrong type or out of range.

    `problems` lists every one as (dotted key, what is wrong), so a user fixes them all at once;
    the message joins them with "; "."""

    def __init__(self, key: str, message: str, problems: list[tuple[str, str]] | None = None):
        self.problems = problems if problems is not None else [(key, message)]
        self.key = self.problems[0][0]
        super().__init__("; ".join(self.lines()))

    def lines(self) -> list[str]:
        return [f"{k}: {m}" if k else m for k, m in self.problems]

    def renamed(self, names: Mapping[str, str]) -> "SchemaError":
        """The same problems with keys renamed (a CLI names `--size`, not `size`)."""
        return SchemaError("", "", [(names.get(k, k), m) for k, m in self.problems])


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class Field:
    """One key: its default, a one-line doc, and a parser that returns the clean value or raises."""

    default: Any
    doc: str
    parse: Callable[[Any, str], Any]


def integer(lo: int | None = None, hi: int | None = None) -> Callable[[Any, str], int]:
    def parse(v: Any, key: str) -> int:
        if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise SchemaError(key, f"expected an integer{_range(lo, hi)}, got {_show(v)}")
        return v

    return parse


#: PyYAML follows YAML 1.1, where `1e4` and `1.0e4` (no exponent sign) are strings; users mean numbers.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def number(lo: float | None = None, hi: float | None = None) -> Callable[[Any, str], float]:
    def parse(v: Any, key: str) -> float:
        if isinstance(v, str) and _FLOAT_TEXT.fullmatch(v.strip()):
            v = float(v)
        ok = (_is_int(v) or isinstance(v, float)) and v == v  # NaN is not a number here
        if not ok or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise SchemaError(key, f"expected a number{_range(lo, hi)}, got {_show(v)}")
        return float(v)

    return parse


def _range(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f" from {lo:g} to {hi:g}"
    if lo is not None:
        return f" >= {lo:g}"
    if hi is not None:
        return f" <= {hi:g}"
    return ""


def boolean(v: Any, key: str) -> bool:
    if not isinstance(v, bool):
        raise SchemaError(key, f"expected true or false, got {_show(v)}")
    return v


def string(v: Any, key: str) -> str:
    if not isinstance(v, str) or not v:
        raise SchemaError(key, f"expected a non-empty string, got {_show(v)}")
    return v


def optional(parse: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    def inner(v: Any, key: str) -> Any:
        return None if v is None else parse(v, key)

    return inner


def choice(*options: str) -> Callable[[Any, str], str]:
    def parse(v: Any, key: str) -> str:
        if v not in options:
            raise SchemaError(key, f"expected one of {', '.join(options)}, got {_show(v)}")
        return v

    return parse


def list_of(item: Callable[[Any, str], Any], min_len: int = 0) -> Callable[[Any, str], list]:
    def parse(v: Any, key: str) -> list:
        if not isinstance(v, list) or len(v) < min_len:
            need = f" with at least {min_len} item{'s' * (min_len != 1)}" if min_len else ""
            raise SchemaError(key, f"expected a list{need}, got {_show(v)}")
        return [item(x, f"{key}[{i}]") for i, x in enumerate(v)]

    return parse


def section(fields: Mapping[str, "Field | Mapping"]) -> Callable[[Any, str], dict]:
    def parse(v: Any, key: str) -> dict:
        return validate(v, fields, key)

    return parse


def validate(data: Any, fields: Mapping[str, Any], where: str = "") -> dict:
    """Check `data` against `fields` (a Field or a nested mapping of them) and fill in defaults.
    Raises one SchemaError listing every problem found, not only the first."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SchemaError(where, f"expected a mapping of keys, got {_show(data)}")
    problems: list[tuple[str, str]] = [(_join(where, str(k)), unknown_key(str(k), fields)) for k in data if k not in fields]
    out = {}
    for k, spec in fields.items():
        key = _join(where, k)
        try:
            if isinstance(spec, Field):
                out[k] = spec.parse(data[k], key) if k in data else spec.default
            else:
                out[k] = validate(data.get(k), spec, key)
        except SchemaError as exc:
            problems.extend(exc.problems)
    if problems:
        raise SchemaError("", "", problems)
    return out


def unknown_key(key: str, known: Mapping[str, Any] | list[str]) -> str:
    """'unknown key', with the closest known key when there is one ('stpes': did you mean 'steps'?)."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean {close[0]!r}?)"
    return f"unknown key (known keys here: {', '.join(known)})"


def defaults(fields: Mapping[str, Any]) -> dict:
    return validate({}, fields)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def yaml_problem(exc: Exception) -> str:
    """A YAML syntax error in one line a person reads: where, and what ('line 3, column 7: ...')."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context = getattr(exc, "context", None)
    return f"{where}{problem}" + (f" ({context})" if context else "")
