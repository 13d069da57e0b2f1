"""Typed configuration schemas: each option declared once, with its type, range, default and a one-line doc.

Recipes (``asla.agents.config.Recipe``) and problems (``asla.problem``) are stdlib dataclasses whose fields carry an
:class:`Option` in their metadata. :func:`from_mapping` checks a plain mapping against such a dataclass and raises
the caller's error class with one line naming the dotted field and what is allowed
(``learning.lr: must be a positive number, got 'fast'``); :func:`to_mapping` turns it back into the same plain dict;
:func:`rows` lists (dotted key, default, doc) for the README's option tables. Stdlib dataclasses rather than pydantic:
the checks are simple ranges and choices, the error text must follow the project's one-line style, and the training
loop reads the recipe as a plain dict, so a model layer would only be converted back and forth.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

MAX_DEPTH = 32          # nesting depth of any loaded YAML mapping or list
MAX_NODES = 100_000     # values in a loaded file, counting every use of a YAML alias (an alias bomb expands past it)


@dataclass(frozen=True)
class Option:
    """What a field accepts. ``kind``: int, number, bool, str, choice, mapping, list, any or section."""

    doc: str
    kind: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False     # minimum itself not allowed (rates > 0)
    choices: tuple[str, ...] = ()
    odd: bool = False
    nullable: bool = False              # None (YAML null) allowed
    check: Callable[[Any, str], Any] | None = None  # extra check on the value: returns it normalised or raises

    def describe(self) -> str:
        """The allowed values in words, for the error message."""
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind == "bool":
            return "true or false"
        if self.kind in ("int", "number"):
            noun = ("an odd integer" if self.odd else "an integer") if self.kind == "int" else "a number"
            lo, hi = self.minimum, self.maximum
            if lo == 0 and self.exclusive_minimum and hi is None:
                text = f"{'a positive integer' if self.kind == 'int' else 'a positive number'}"
            elif lo is not None and hi is not None:
                text = f"{noun} {'>' if self.exclusive_minimum else '>='} {_num(lo)} and <= {_num(hi)}"
            elif lo is not None:
                text = f"{noun} {'>' if self.exclusive_minimum else '>='} {_num(lo)}"
            elif hi is not None:
                text = f"{noun} <= {_num(hi)}"
            else:
                text = f"a finite {noun.split(' ', 1)[1]}" if self.kind == "number" else noun
            return text
        return {"str": "a string", "mapping": "a mapping", "list": "a list"}.get(self.kind, "any value")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def option(default: Any, doc: str, kind: str, **constraints: Any) -> Any:
    """A dataclass field with its Option; mutable defaults are copied per instance."""
    meta = {"option": Option(doc, kind, **constraints)}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: _copy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, doc: str, nullable: bool = False) -> Any:
    """A nested dataclass field (a YAML mapping of its own options); null gives its defaults, or None if nullable
    (then None is also the default: a section that is absent unless given, such as a problem's template)."""
    meta = {"option": Option(doc, "section", nullable=nullable), "section": cls}
    if nullable:
        return dataclasses.field(default=None, metadata=meta)
    return dataclasses.field(default_factory=cls, metadata=meta)


def _copy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_copy(v) for v in x]
    return x


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_value(opt: Option, value: Any, name: str, error: type[Exception]) -> Any:
    """The value normalised (a number given as a YAML 1.1 string such as '1e-3' becomes a float), or `error`."""
    if value is None:
        if opt.nullable or opt.kind == "any":
            return None
        raise error(name, f"must be {opt.describe()}, got null")
    kind = opt.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise error(name, f"must be true or false, got {_short(value)}")
    elif kind == "choice":
        if not isinstance(value, str) or value not in opt.choices:
            raise error(name, f"unknown value {_short(value)}; allowed: {', '.join(opt.choices)}")
    elif kind in ("int", "number"):
        value = _checked_number(opt, value, name, error)
    elif kind == "str":
        if not isinstance(value, str):
            raise error(name, f"must be a string, got {_short(value)}")
    elif kind == "mapping":
        if not isinstance(value, dict):
            raise error(name, f"must be a mapping, got {_short(value)}")
    elif kind == "list":
        if not isinstance(value, list):
            raise error(name, f"must be a list, got {_short(value)}")
    return opt.check(value, name) if opt.check is not None else value


def _checked_number(opt: Option, value: Any, name: str, error: type[Exception]) -> int | float:
    bad = error(name, f"must be {opt.describe()}, got {_short(value)}")
    if isinstance(value, bool):
        raise bad
    if opt.kind == "int":
        if not isinstance(value, int):
            raise bad
    else:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if not isinstance(value, (int, float)):
            raise bad
        try:
            if not math.isfinite(float(value)):
                raise bad
        except OverflowError:  # an int too large for a float
            raise bad from None
    if opt.minimum is not None and (value < opt.minimum or (opt.exclusive_minimum and value == opt.minimum)):
        raise bad
    if opt.maximum is not None and value > opt.maximum:
        raise bad
    if opt.odd and value % 2 == 0:
        raise bad
    return value


def options(cls: type) -> Iterator[tuple[dataclasses.Field, Option]]:
    for f in dataclasses.fields(cls):
        yield f, f.metadata["option"]


def from_mapping(cls: type, data: Any, prefix: str, error: type[Exception]) -> Any:
    """An instance of dataclass `cls` from a mapping, every field checked; missing fields take their defaults."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, Mapping):
        raise error(where, f"must be a mapping with keys {', '.join(f.name for f in dataclasses.fields(cls))}, "
                           f"got {_short(data)}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise error(f"{prefix}{key}", f"unknown key; allowed: {', '.join(sorted(names))}")
    values = {}
    for f, opt in options(cls):
        if f.name not in data:
            continue
        if opt.kind == "section":
            value = data[f.name]
            if value is None:
                values[f.name] = None if opt.nullable else f.metadata["section"]()
            else:
                values[f.name] = from_mapping(f.metadata["section"], value, f"{prefix}{f.name}.", error)
        else:
            values[f.name] = check_value(opt, data[f.name], f"{prefix}{f.name}", error)
    return cls(**values)


def to_mapping(obj: Any) -> dict:
    """The plain dict of a schema instance, in field order (sections as nested dicts)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out[f.name] = to_mapping(value) if dataclasses.is_dataclass(value) else _copy(value)
    return out


def rows(cls: type, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """(dotted key, default, doc) of every leaf option, in field order."""
    for f, opt in options(cls):
        if opt.kind == "section":
            yield from rows(f.metadata["section"], f"{prefix}{f.name}.")
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            yield f"{prefix}{f.name}", default, opt.doc


def check_size(data: Any, name: str, error: type[Exception]) -> None:
    """Refuse loaded YAML nested deeper than MAX_DEPTH or holding more than MAX_NODES values (aliases counted at
    every use), before anything walks or copies it: such a file would otherwise hang or exhaust memory."""
    budget = [MAX_NODES]

    def walk(x: Any, depth: int) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise error(name, f"holds more than {MAX_NODES} values (a YAML alias expanding without bound?)")
        if isinstance(x, (dict, list)):
            if depth >= MAX_DEPTH:
                raise error(name, f"is nested deeper than {MAX_DEPTH} levels")
            for v in (x.values() if isinstance(x, dict) else x):
                walk(v, depth + 1)
            if isinstance(x, dict):
                for k in x:
                    walk(k, depth + 1)

    walk(data, 0)


def load_yaml_file(path: Any, name: str, error: type[Exception]) -> Any:
    """yaml.safe_load of a file; a missing file, bad encoding, YAML syntax error or oversized content is one line."""
    import yaml
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(name, f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise error(name, f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "?"
        raise error(name, f"{path} is not valid YAML ({where}): {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise error(name, f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of more than 4300 digits
        raise error(name, f"{path}: value refused by the YAML reader: {str(exc).splitlines()[0][:120]}") from None
    check_size(data, name, error)
    return data
