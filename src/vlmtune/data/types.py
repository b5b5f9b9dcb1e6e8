"""The normalised conversation every data source produces and every later stage consumes.

A conversation is a list of messages; each message's content is a list of parts, each part either
text or an image reference, in order. Images keep the path as written in the data and the path
resolved against media_dir / the dataset folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class TextPart:
    text: str
    type: Literal["text"] = "text"


@dataclass(frozen=True)
class ImagePart:
    """An image as referenced by the data: `ref` as written, `path` resolved (None if unresolvable)."""

    ref: str
    path: str | None
    type: Literal["image"] = "image"


Part = Union[TextPart, ImagePart]


@dataclass
class Message:
    role: str
    parts: list[Part]

    @property
    def images(self) -> list[ImagePart]:
        return [p for p in self.parts if isinstance(p, ImagePart)]

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))


@dataclass
class Conversation:
    """One input sample. `id` is stable across runs; `source` is `file:line` or `file#row`."""

    id: str
    source: str
    messages: list[Message]
    # problems found while reading (e.g. placeholder/image count mismatch); validation adds more.
    read_problems: list = field(default_factory=list)

    @property
    def images(self) -> list[ImagePart]:
        return [img for m in self.messages for img in m.images]

