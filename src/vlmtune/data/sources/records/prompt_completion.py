"""TRL prompt / completion: the prompt and the answer in two columns, each a string or a list of turns.

Row shape: {"prompt": str | [turn, ...], "completion": str | [turn, ...],
            "image"?: image, "images"?: [image, ...]}
Images (TRL's one `image`, or `images`) go where `<image>` placeholders or pathless image parts stand, else
they open the first user turn, as TRL's vision collators put them.
"""

from __future__ import annotations

from typing import Any

from .common import BadRecord, Builder, Context, Converted, RecordFormat, type_name
from .turns import convert_turns, tools_of


def convert_prompt_completion(record: dict, fmt: RecordFormat, ctx: Context) -> Converted:
    images_key = "image" if fmt.images not in record and "image" in record else fmt.images
    builder = Builder(record, ctx, images_key, fmt.videos)
    turns = _as_turns(record.get("prompt"), "user", "prompt") + _as_turns(record.get("completion"), "assistant",
                                                                           "completion")
    if builder.images and not _mentions_images(turns):
        first = next((t for t in turns if t["role"] == "user"), None)
        if first is not None:
            text = first["content"]
            head = [{"type": "image"}] * len(builder.images)
            first["content"] = head + ([{"type": "text", "text": text}] if isinstance(text, str) else list(text))
    messages = convert_turns(turns, "prompt", RecordFormat(role_tag="role", content_tag="content"), builder)
    return Converted(messages, builder, tools_of(record, fmt.tools))


def _as_turns(value: Any, role: str, key: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(t, dict) for t in value):
        return [dict(t) for t in value]
    raise BadRecord(f"`{key}` is {type_name(value)}, expected a string or a list of turns",
                    f"write `{key}` as a string, or as [{{\"role\", \"content\"}}, ...]")


def _mentions_images(turns: list[dict]) -> bool:
    for t in turns:
        c = t.get("content")
        if isinstance(c, str) and "<image>" in c:
            return True
        if isinstance(c, list) and any(isinstance(p, dict) and p.get("type") == "image" for p in c):
            return True
    return False
