"""LLaMA-Factory v1: every content is a list of {"type", "value"} parts; a per-message `loss_weight`.

Row shape:
    {"messages": [{"role": "system"|"user"|"assistant"|"tool",
                   "content": [{"type": "text"|"image_url"|"video_url"|"tool_call", "value": str}, ...],
                   "loss_weight"?: 0.0 | 1.0}, ...],
     "tools"?: JSON str}
An `image_url` / `video_url` value is the media's path (or URL); a `tool_call` value is the call as JSON.
"""

from __future__ import annotations

from typing import Any

from .common import BadRecord, Builder, Context, Converted, RecordFormat, type_name
from .turns import convert_turns, tools_of

_PART = {"text": ("text", "text"), "image_url": ("image", "image"), "video_url": ("video", "video")}


def convert_v1(record: dict, fmt: RecordFormat, ctx: Context) -> Converted:
    column = fmt.messages or "messages"
    turns = record.get(column)
    if not isinstance(turns, list):
        raise BadRecord(f"`{column}` is {type_name(turns)}, expected a list of turns",
                        f"write `{column}` as a list of {{\"role\", \"content\"}} objects")
    builder = Builder(record, ctx, fmt.images, fmt.videos)
    rewritten = [_turn(t, f"message {i}") for i, t in enumerate(turns, 1)]
    messages = convert_turns(rewritten, column, RecordFormat(role_tag="role", content_tag="content"), builder)
    return Converted(messages, builder, tools_of(record, fmt.tools))


def _turn(turn: Any, where: str) -> Any:
    """The turn with its parts in the HF chat spelling, and its `tool_call` parts as OpenAI `tool_calls`."""
    if not isinstance(turn, dict) or not isinstance(turn.get("content"), list):
        return turn  # convert_turns reports what is wrong with it
    parts, calls = [], []
    for j, part in enumerate(turn["content"], 1):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "tool_call":
            calls.append(part.get("value"))
        elif kind in _PART and isinstance(part, dict) and "value" in part:
            new_type, key = _PART[kind]
            parts.append({"type": new_type, key: part["value"]})
        else:
            raise BadRecord(f"part {j} of {where} is {type_name(part) if kind is None else repr(kind)}; "
                            "v1 parts are text, image_url, video_url and tool_call with a `value`",
                            "remove the part (reasoning parts are not supported) or fix its type")
    out = {k: v for k, v in turn.items() if k != "content"}
    out["content"] = parts
    if calls:
        out["tool_calls"] = calls
    return out
