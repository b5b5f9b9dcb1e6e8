"""The normalised conversation every data source produces and every later stage consumes.

A conversation is a list of messages; each message's content is a list of parts, each part either
text, an image or a video reference, in order. Images keep the path as written in the data and the path
resolved against media_dir / the dataset folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

ROLES = ("system", "user", "assistant")
# Tool turns (LLaMA-Factory's sharegpt tags): a `function_call` is an assistant turn that calls tools (trained,
# like an answer), an `observation` holds the tools' results (context, like a user turn).
TOOL_ROLES = ("function_call", "observation")


@dataclass(frozen=True)
class TextPart:
    text: str
    type: Literal["text"] = "text"


# `ImagePart.path` of an image whose bytes live inside a dataset row (Parquet, Arrow, Hub): this
# prefix and a JSON locator of the row (see data/sources/formats.py), so that no second copy is written.
EMBEDDED_PREFIX = "embedded:"


@dataclass(frozen=True)
class ImagePart:
    """An image as referenced by the data: `ref` as written, `path` resolved (None if unresolvable).

    `path` is a file, an `embedded:` locator of the bytes in a dataset row, or a `data:` URI. `data`
    holds the image's bytes while the sample is in flight when they came with the record (embedded or
    inline); the header is read from them, and the collator finds them again through `path`.
    """

    ref: str
    path: str | None
    type: Literal["image"] = "image"
    # bytes, or a memoryview into a memory-mapped table (data/sources/formats.rows_of)
    data: bytes | memoryview | None = field(default=None, compare=False, repr=False)

    def __getstate__(self):  # to a worker process: a view cannot be pickled, its bytes can
        state = dict(self.__dict__)
        if isinstance(state.get("data"), memoryview):
            state["data"] = bytes(state["data"])
        return state


@dataclass(frozen=True)
class VideoPart:
    """A video clip as referenced by the data: `ref` as written, `path` resolved (None if unresolvable).

    Only files are accepted (resolved by the same rules as image paths): a clip is decoded from disk
    at training time, a frame at a time, never held whole in a dataset row."""

    ref: str
    path: str | None
    type: Literal["video"] = "video"


Part = Union[TextPart, ImagePart, VideoPart]


@dataclass
class Message:
    role: str
    parts: list[Part]
    # OpenAI fine-tuning `weight`: 0 masks an assistant turn from the loss (it stays in the context).
    weight: int = 1
    # a `function_call` turn's calls: [{"name": str, "arguments": dict | str}, ...], rendered by the chat template
    tool_calls: list | None = None

    @property
    def images(self) -> list[ImagePart]:
        return [p for p in self.parts if isinstance(p, ImagePart)]

    @property
    def videos(self) -> list[VideoPart]:
        return [p for p in self.parts if isinstance(p, VideoPart)]

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))


@dataclass(frozen=True)
class Origin:
    """Where an input sample is, as data (`source` is its text for messages): the data file (or the dataset
    folder or Hub id of table rows) and the record's index there (the 1-based line of a JSON Lines file, else
    the 0-based position)."""

    file: str
    index: int


@dataclass
class Preference:
    """What makes a conversation a preference sample (data/sources/preference_records.py).

    pair (stage dpo): the conversation's messages are the prompt and the chosen answer (its last message);
    `rejected` is the other answer to the same prompt. kto (stage kto): the last message is the completion,
    `desirable` its tag. Answers hold text only: the images belong to the shared prompt."""

    kind: Literal["pair", "kto"]
    rejected: Message | None = None
    desirable: bool | None = None


@dataclass
class Conversation:
    """One input sample. `id` is stable across runs; `source` is `file:line` or `file#row`, `origin` the same
    as data (set by the reader)."""

    id: str
    source: str
    messages: list[Message]
    # problems found while reading (e.g. placeholder/image count mismatch); validation adds more.
    read_problems: list = field(default_factory=list)
    # the record layout it was read from (a key of data/sources/records.LAYOUTS), for the reader's note.
    layout: str = field(default="sharegpt", compare=False)
    origin: Origin | None = field(default=None, compare=False)
    # the tools the sample may call (JSON schemas, as the record gave them), rendered by the chat template
    tools: list | None = None
    # set for preference samples (ranking pairs, KTO-tagged answers); None for SFT samples
    preference: Preference | None = None

    @property
    def images(self) -> list[ImagePart]:
        return [img for m in self.messages for img in m.images]

    @property
    def videos(self) -> list[VideoPart]:
        return [v for m in self.messages for v in m.videos]

