"""ms-swift query / response: the last exchange in two columns, earlier ones in `history`; images as `<image>`
placeholders taking `images` in order, or inline as `<img>PATH</img>` tags.

Row shape: {"query": str, "response": str, "history"?: [[query, response], ...], "system"?: str,
            "images"?: [path], "videos"?: [path], "tools"?: JSON str}
"""

from __future__ import annotations

import re

from ...types import Message, TextPart
from .alpaca import history_turns
from .common import Builder, Context, Converted, RecordFormat, check_ref, column
from .turns import add_system, convert_turns, tools_of

_IMG_TAG = re.compile(r"<img>(.*?)</img>", re.DOTALL)
_ROLE_CONTENT = RecordFormat(role_tag="role", content_tag="content")


def convert_swift(record: dict, fmt: RecordFormat, ctx: Context) -> Converted:
    builder = Builder(record, ctx, fmt.images, fmt.videos)
    turns = history_turns(record.get("history"), "history")
    turns += [{"role": "user", "content": column(record, "query", str, "the question")},
              {"role": "assistant", "content": column(record, "response", str, "the answer")}]
    messages = [_inline_images(m, builder) for m in convert_turns(turns, "query", _ROLE_CONTENT, builder)]
    add_system(messages, record.get("system"), "system", builder)
    return Converted(messages, builder, tools_of(record, fmt.tools))


def _inline_images(message: Message, builder: Builder) -> Message:
    """Each `<img>PATH</img>` tag of the message's text becomes that image, where it stands."""
    parts = []
    for part in message.parts:
        if not isinstance(part, TextPart) or "<img>" not in part.text:
            parts.append(part)
            continue
        for k, piece in enumerate(_IMG_TAG.split(part.text)):
            if k % 2:
                parts.append(builder.image(check_ref(piece.strip(), "an <img> tag")))
            elif piece:
                parts.append(TextPart(piece))
    message.parts = parts
    return message
