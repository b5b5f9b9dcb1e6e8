"""LLaMA-Factory alpaca: one instruction (plus optional input) and its output, after earlier exchanges.

Row shape (column names from dataset_info.json `columns`: prompt, query, response, history, system):
    {"instruction": str, "input"?: str, "output": str, "system"?: str,
     "history"?: [[question, answer], ...], "images"?: [path], "videos"?: [path], "tools"?: JSON str}
The user turn is the instruction and the input joined by a newline, as LLaMA-Factory writes it;
`<image>` / `<video>` placeholders in them take the `images` / `videos` paths in order.
"""

from __future__ import annotations

from typing import Any

from .common import BadRecord, Builder, Context, Converted, RecordFormat, column
from .turns import add_system, convert_turns, tools_of


def convert_alpaca(record: dict, fmt: RecordFormat, ctx: Context) -> Converted:
    builder = Builder(record, ctx, fmt.images, fmt.videos)
    turns = history_turns(record.get(fmt.history) if fmt.history else None, fmt.history or "history")
    instruction = column(record, fmt.prompt, str, "the instruction", required=False) or ""
    query = column(record, fmt.query, str, "the input", required=False) or ""
    output = column(record, fmt.response, str, "the answer")
    prompt = "\n".join(t for t in (instruction, query) if t)
    if not prompt:
        raise BadRecord(f"record has neither `{fmt.prompt}` nor `{fmt.query}` text", "write the instruction")
    turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    messages = convert_turns(turns, fmt.prompt, _ROLE_CONTENT, builder)
    add_system(messages, record.get(fmt.system) if fmt.system else None, fmt.system or "", builder)
    return Converted(messages, builder, tools_of(record, fmt.tools))


_ROLE_CONTENT = RecordFormat(role_tag="role", content_tag="content")


def history_turns(history: Any, key: str) -> list[dict]:
    """Earlier exchanges, [[question, answer], ...], as turns."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise BadRecord(f"`{key}` is not a list of [question, answer] pairs", f"write `{key}` as [[q, a], ...]")
    turns = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise BadRecord(f"`{key}`[{i}] is not a [question, answer] pair of strings",
                            f"write each entry of `{key}` as [\"question\", \"answer\"]")
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return turns
