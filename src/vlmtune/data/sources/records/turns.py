"""A list of turns → `Message`s: the part every chat layout shares (roles, contents, per-message loss flags,
tool calls), and the top-level `system` and `tools` columns."""

from __future__ import annotations

import json
from typing import Any

from ...types import Message, TextPart
from .common import (
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    BadRecord,
    Builder,
    RecordFormat,
    check_text,
    content_parts,
    role_of,
    type_name,
)

# Per-message loss flags, by who writes them: OpenAI `weight` (0/1), ms-swift `loss` (true/false/null),
# LLaMA-Factory v1 `loss_weight` (0.0/1.0). Each becomes Message.weight (0: context, 1: trained as usual).
_LOSS_FLAGS = {"weight": (0, 1), "loss": (False, True), "loss_weight": (0, 1)}


def convert_turns(turns: Any, column: str, fmt: RecordFormat, builder: Builder) -> list[Message]:
    """Every turn of `record[column]`, in order; tool results that follow each other become one observation."""
    if not isinstance(turns, list):
        raise BadRecord(f"`{column}` is {type_name(turns)}, expected a list of turns",
                        f"write `{column}` as a list of {{\"role\", \"content\"}} objects")
    messages: list[Message] = []
    for i, turn in enumerate(turns, 1):
        m = _turn(turn, f"message {i}", (column, i - 1), fmt, builder)
        if m.role == "observation" and messages and messages[-1].role == "observation":
            messages[-1].parts.extend([TextPart("\n"), *m.parts])  # as the chat template groups tool results
        else:
            messages.append(m)
    return messages


def _turn(turn: Any, where: str, pointer: tuple, fmt: RecordFormat, builder: Builder) -> Message:
    if not isinstance(turn, dict):
        raise BadRecord(f"{where} is {type_name(turn)}, expected an object with a role and a content",
                        "write each turn as {\"role\": ..., \"content\": ...}")
    role_tag, content_tag = _tags(turn, where, fmt)
    raw_role = turn[role_tag]
    if not isinstance(raw_role, str):
        raise BadRecord(f"the `{role_tag}` of {where} is {type_name(raw_role)}, expected a string",
                        "write the role as a string such as \"user\" or \"assistant\"")
    if len(raw_role) > 100:
        raise BadRecord(f"the `{role_tag}` of {where} is {len(raw_role):,} characters long", "fix the role name")
    role = "observation" if raw_role == "tool" else role_of(raw_role, fmt)
    calls = turn.get("tool_calls")
    if calls and role == "assistant":  # OpenAI: an assistant turn that calls tools
        return Message("function_call", [], weight=_weight(turn, where), tool_calls=tool_calls(calls, where))
    if content_tag not in turn:
        raise BadRecord(f"{where} has no `{content_tag}`", f"give each turn a `{content_tag}`")
    content = turn[content_tag]
    if role == "function_call":
        return Message(role, [], weight=_weight(turn, where), tool_calls=tool_calls(content, where))
    parts = content_parts(content, where, builder, (*pointer, content_tag))
    return Message(role=role, parts=parts, weight=_weight(turn, where))


def _tags(turn: dict, where: str, fmt: RecordFormat) -> tuple[str, str]:
    role_tag, content_tag = fmt.role_tag, fmt.content_tag
    if role_tag is None:
        if "role" in turn:
            role_tag = "role"
        elif "from" in turn:
            role_tag = "from"
        else:
            raise BadRecord(f"{where} has neither `role` nor `from`", "give each turn a `role` and a `content`")
    elif role_tag not in turn:
        raise BadRecord(f"{where} has no `{role_tag}`", f"give each turn a `{role_tag}`")
    return role_tag, content_tag or ("content" if role_tag == "role" else "value")


def _weight(turn: dict, where: str) -> int:
    """The turn's loss flag as 0 (not trained) or 1; more than one flag, or another value, is refused."""
    flags = [k for k in _LOSS_FLAGS if k in turn and not (k == "loss" and turn[k] is None)]
    if len(flags) > 1:
        raise BadRecord(f"{where} has both `{flags[0]}` and `{flags[1]}`", "keep one loss flag per message")
    if not flags:
        return 1
    key = flags[0]
    value, allowed = turn[key], _LOSS_FLAGS[key]
    ok = isinstance(value, bool) if key == "loss" else (not isinstance(value, bool) and value in allowed)
    if not ok:
        shown = " or ".join(json.dumps(a) for a in allowed)
        fix = ("set weight to 0 (not trained) or 1 (trained), as in OpenAI fine-tuning files" if key == "weight"
               else f"set `{key}` to {shown} (vlmtune trains a turn fully or not at all)")
        raise BadRecord(f"the `{key}` of {where} is {value!r}, expected {shown}", fix)
    return int(value)


def tool_calls(value: Any, where: str) -> list[dict]:
    """A function call as LLaMA-Factory (a JSON string of {name, arguments} or a list of them) or OpenAI
    (`tool_calls` of {"function": {name, arguments}}) write it: [{"name", "arguments"}, ...]."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise BadRecord(f"the function call of {where} is not JSON",
                            'write it as {"name": ..., "arguments": {...}} (or a list of them)') from None
    calls = value if isinstance(value, list) else [value]
    out = []
    for c in calls:
        c = c.get("function", c) if isinstance(c, dict) else c
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or "arguments" not in c:
            raise BadRecord(f"a function call of {where} is not an object with `name` and `arguments`",
                            'write each call as {"name": ..., "arguments": {...}}')
        out.append({"name": c["name"], "arguments": c["arguments"]})
    return out


def add_system(messages: list[Message], system: Any, key: str, builder: Builder) -> None:
    """A top-level system prompt becomes the first message, unless the turns already start with one."""
    if system is None or system == "" or (messages and messages[0].role == "system"):
        return
    if not isinstance(system, str):
        raise BadRecord(f"`{key}` is {type_name(system)}, expected a string", f"write `{key}` as a string")
    check_text(system, f"`{key}`")
    parts: list = []
    before = builder.placeholders + builder.video_placeholders
    builder.text(system, parts)
    if builder.placeholders + builder.video_placeholders != before:
        raise BadRecord(f"`{key}` contains an {IMAGE_PLACEHOLDER} or {VIDEO_PLACEHOLDER} placeholder",
                        "put images and videos in a user turn, not in the system prompt")
    messages.insert(0, Message(role="system", parts=parts))


def tools_of(record: dict, key: str | None) -> list | None:
    """The record's tools (a JSON string or a list of function schemas), None when it has none."""
    value = record.get(key) if key else None
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise BadRecord(f"`{key}` is not JSON", f"write `{key}` as a JSON list of function schemas") from None
    value = [value] if isinstance(value, dict) else value
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise BadRecord(f"`{key}` is {type_name(value)}, expected a list of function schemas",
                        f"write `{key}` as a JSON list of {{\"name\", \"description\", \"parameters\"}} objects")
    return value
