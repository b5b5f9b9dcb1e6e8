"""The conversation as the checkpoint's chat template reads it: template messages (tool turns OpenAI-style, or
Qwen's tool format written out for a template that cannot render them) and answers without their thinking blocks
(enable_thinking=false). data/stages/encode.py renders these.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

from ..types import TOOL_ROLES, Conversation, ImagePart, VideoPart

# Thinking blocks (Qwen3.5): what its chat template writes around an answer's reasoning, and writes empty when
# there is none or thinking is off (docs/thinking.md).
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
EMPTY_THINK = "<think>\n\n</think>\n\n"
_THOUGHT = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


def _template_part(p) -> dict:
    if isinstance(p, ImagePart):
        return {"type": "image"}
    if isinstance(p, VideoPart):
        return {"type": "video"}
    return {"type": "text", "text": p.text}


def template_messages(conv: Conversation, renders_tools: bool = True) -> list[dict]:
    """The conversation as the chat template reads it. Tool turns are OpenAI-style (an assistant turn with
    `tool_calls`, a `tool` turn); for a template that cannot render them, Qwen's tool format is written out."""
    if not renders_tools and (conv.tools or any(m.role in TOOL_ROLES for m in conv.messages)):
        return tool_format(conv)
    out = []
    for m in conv.messages:
        if m.role == "function_call":
            calls = [{"type": "function", "function": c} for c in m.tool_calls or []]
            out.append({"role": "assistant", "content": "", "tool_calls": calls})
        elif m.role == "observation":
            out.append({"role": "tool", "content": m.text if not m.images and not m.videos
                        else [_template_part(p) for p in m.parts]})
        else:
            out.append({"role": m.role, "content": [_template_part(p) for p in m.parts]})
    return out


# Qwen's tool format (what the Qwen2.5 / Qwen3 chat templates write), for templates without tool support.
_TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                 "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                 "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                 "\"arguments\": <args-json-object>}\n</tool_call>")


def tool_format(conv: Conversation) -> list[dict]:
    """Tools in the system turn, calls as `<tool_call>` blocks, results as `<tool_response>` user turns."""
    out = []
    for m in conv.messages:
        if m.role == "function_call":
            text = "\n".join(f"<tool_call>\n{json.dumps(c, ensure_ascii=False)}\n</tool_call>" for c in m.tool_calls or [])
            out.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
        elif m.role == "observation":
            parts = [_template_part(p) for p in m.parts]
            out.append({"role": "user", "content": [{"type": "text", "text": "<tool_response>\n"}, *parts,
                                                    {"type": "text", "text": "\n</tool_response>"}]})
        else:
            out.append({"role": m.role, "content": [_template_part(p) for p in m.parts]})
    if conv.tools:
        tools = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in conv.tools)
        block = {"type": "text", "text": _TOOLS_HEADER + tools + _TOOLS_FOOTER}
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": [*out[0]["content"], {"type": "text", "text": "\n\n"}, block]}
        else:
            out.insert(0, {"role": "system", "content": [block]})
    return out


def without_thinking(conv: Conversation) -> Conversation:
    """The conversation with `<think>…</think>` reasoning removed from its answers (enable_thinking=false, as
    LLaMA-Factory does)."""
    if not any(m.role == "assistant" and THINK_CLOSE in m.text for m in conv.messages):
        return conv
    messages = [replace(m, parts=[_without_thought(p) for p in m.parts]) if m.role == "assistant" else m
                for m in conv.messages]
    return replace(conv, messages=messages)


def _without_thought(part):
    if isinstance(part, (ImagePart, VideoPart)) or THINK_CLOSE not in part.text:
        return part
    return replace(part, text=_THOUGHT.sub("", part.text).lstrip("\n"))
