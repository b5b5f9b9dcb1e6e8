"""Chat layouts: a list of turns, with images as `<image>` placeholders or content parts.

Row shape (LLaMA-Factory sharegpt / OpenAI / HF chat / TRL messages / LLaVA):
    {"messages" | "conversations": [{"role"|"from": str, "content"|"value": str | [part, ...],
                                     "weight"|"loss"?: 0/1, "tool_calls"?: [...]}, ...],
     "images"?: [path | {"bytes", "path"}], "videos"?: [path], "system"?: str, "tools"?: JSON str | [schema]}
LLaVA / ShareGPT4V keeps its one image in `image`. Parts: {"type": "text", "text"}, {"type": "image", "image"?},
{"type": "image_url", "image_url": {"url"}}, {"type": "video", "video"?}.
"""

from __future__ import annotations

from .common import BadRecord, Builder, Context, Converted, RecordFormat
from .turns import add_system, convert_turns, tools_of


def turns_column(record: dict, fmt: RecordFormat) -> str:
    """The column holding the turns: the mapping's, else `messages`, else `conversations`."""
    if fmt.messages is not None:
        if fmt.messages not in record:
            raise BadRecord(f"record has no `{fmt.messages}` list", f"add the turns as a `{fmt.messages}` list")
        return fmt.messages
    for name in ("messages", "conversations"):
        if name in record:
            return name
    raise BadRecord("record has no `messages` (or `conversations`) list",
                    "add the turns as a `messages` list of {\"role\", \"content\"} objects")


def convert_chat(record: dict, fmt: RecordFormat, ctx: Context) -> Converted:
    images_key = "image" if fmt.images not in record and "image" in record else fmt.images  # LLaVA's one image
    videos_key = fmt.videos if fmt.videos in record or "video" not in record else "video"  # LLaVA-Video's
    builder = Builder(record, ctx, images_key, videos_key)
    column = turns_column(record, fmt)
    messages = convert_turns(record[column], column, fmt, builder)
    add_system(messages, record.get(fmt.system) if fmt.system else None, fmt.system or "", builder)
    return Converted(messages, builder, tools_of(record, fmt.tools))
