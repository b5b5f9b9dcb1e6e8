"""The flat key table over the sections (the YAML is flat; keys are unique across sections): each key's section,
declaration and type, its default, and the keys declared `prepared=True`, which decide the prepared dataset."""

from __future__ import annotations

import typing
from dataclasses import MISSING, fields
from typing import Any

from .sections import SECTIONS
from .values import converter as _converter


def _key_table() -> dict[str, tuple[str, Any, Any]]:
    """key -> (section, dataclass Field, resolved type hint), in declaration order."""
    table = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            assert f.name not in table, f"key {f.name} is declared twice; the YAML is flat, keys must be unique"
            table[f.name] = (section, f, hints[f.name])
    return table


KEY_TABLE = _key_table()
KEYS: tuple[str, ...] = tuple(KEY_TABLE)


def _check_declarations() -> None:
    """Every declared type needs a converter: fail at import, not when some user's config sets the key."""
    for _, f, hint in KEY_TABLE.values():
        _converter(f, hint)


_check_declarations()


PREPARED_KEYS: tuple[str, ...] = tuple(k for k, (_, f, _) in KEY_TABLE.items() if f.metadata["prepared"])


def prepared_values(*sections: Any) -> dict[str, Any]:
    """The values of the keys declared `prepared=True` in these sections: what decides a prepared dataset's
    content (its fingerprint), read from the declarations instead of a hand-kept list."""
    return {f.name: copy_value(getattr(s, f.name)) for s in sections for f in fields(s) if f.metadata["prepared"]}


def copy_value(v: Any) -> Any:
    """A key's value that a caller may change: lists are copied."""
    return list(v) if isinstance(v, list) else v


def default_of(key: str) -> Any:
    """The declared default of a key (None for required keys), as a fresh object."""
    f = KEY_TABLE[key][1]
    return f.default_factory() if f.default is MISSING else f.default
