"""Record layouts → `Conversation`: one converter per way a dataset row can hold turns and images, and one
detector (detect.py) that chooses among them.

A bad record raises nothing: it yields exactly one Problem (see readers.py for the accounting rules).
"""

from __future__ import annotations

from typing import Any

from ....errors import Problem
from ...media.paths import MediaRules
from ...types import Conversation
from .common import (
    AUTO_FORMAT,
    IMAGE_PLACEHOLDER,
    MAX_TEXT_CHARS,
    SHAREGPT_DEFAULTS,
    UNSUPPORTED_KEYS,
    VIDEO_PLACEHOLDER,
    BadRecord,
    Context,
    RecordFormat,
    file_problem,
    finish,
    type_name,
    unsupported,
)
from .detect import CONVERTERS, LAYOUTS, detect
from .preference import KIND as UNTRAINABLE

__all__ = [
    "AUTO_FORMAT", "IMAGE_PLACEHOLDER", "LAYOUTS", "MAX_TEXT_CHARS", "SHAREGPT_DEFAULTS", "UNTRAINABLE",
    "VIDEO_PLACEHOLDER", "RecordFormat", "file_problem", "record_to_conversation", "type_name",
]


def record_to_conversation(
    record: Any,
    *,
    sample_id: str,
    source: str,
    base_dir: str,
    fmt: RecordFormat = AUTO_FORMAT,
    rules: MediaRules | None = None,
    origin: list | None = None,
) -> Conversation | Problem:
    """One record as a `Conversation`, or the one `Problem` why it yields none.

    Never raises on bad input. Placeholder/image count mismatches and refused image paths still
    yield a conversation, with the problems in its `read_problems` (refused images have `path=None`).
    Relative image paths resolve against `base_dir`, which is also the folder they must stay in unless `rules`
    (the read's `MediaRules`, default: the safe ones) allow otherwise; pass one `rules` for all the records of
    one read, so that its PathCache makes path resolution cheap. `origin` (a
    JSON list naming the source row, see data/sources/formats.py) is where embedded image bytes are found
    again at training time; without it they are kept inline as a `data:` URI.
    """
    ctx = Context(base_dir, rules or MediaRules(), origin)
    try:
        for key in UNSUPPORTED_KEYS if isinstance(record, dict) else ():
            if record.get(key):
                raise unsupported(f"record has `{key}`; {key.rstrip('s')} is not supported yet")
        layout = detect(record, fmt)
        converted = CONVERTERS[layout](record, fmt, ctx)
        return finish(converted.builder, converted.messages, layout, sample_id, source, converted.tools)
    except BadRecord as e:
        return Problem(source=source, what=e.what, fix=e.fix, sample_id=sample_id, kind=e.kind)
    except RecursionError:
        return Problem(source=source, what="record is nested too deeply to read", fix="fix the record's structure",
                       sample_id=sample_id, kind="bad_record")
