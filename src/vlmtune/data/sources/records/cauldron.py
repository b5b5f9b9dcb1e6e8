"""the_cauldron: exchanges as {user, assistant} pairs; the images open the first user turn.

Row shape: {"images": [image, ...], "texts": [{"user": str, "assistant": str, "source"?: str}, ...]}
"""

from __future__ import annotations

from typing import Any

from .common import BadRecord, Builder, Context, Converted, RecordFormat, type_name
from .turns import convert_turns


def convert_cauldron(record: dict, fmt: RecordFormat, ctx: Context) -> Converted:
    builder = Builder(record, ctx, fmt.images, fmt.videos)
    turns = _turns(record.get("texts"), len(builder.images))
    return Converted(convert_turns(turns, "texts", fmt, builder), builder, None)


def _turns(texts: Any, n_images: int) -> list[dict]:
    if not isinstance(texts, list):
        raise BadRecord(f"`texts` is {type_name(texts)}, expected a list of {{user, assistant}} objects",
                        "write `texts` as a list of {\"user\": ..., \"assistant\": ...} objects")
    turns: list[dict] = []
    for i, t in enumerate(texts, 1):
        if not isinstance(t, dict) or not isinstance(t.get("user"), str) or not isinstance(t.get("assistant"), str):
            raise BadRecord(f"`texts`[{i - 1}] is not an object with `user` and `assistant` strings",
                            "write each exchange as {\"user\": ..., \"assistant\": ...}")
        head = [{"type": "image"}] * n_images if i == 1 else []
        turns.append({"role": "user", "content": [*head, {"type": "text", "text": t["user"]}]})
        turns.append({"role": "assistant", "content": t["assistant"]})
    return turns
