"""Template rendering, image runs and labels.

A sample is rendered once with the checkpoint's own chat template, with one `<|image_pad|>` per
image. The text is cut into ChatML blocks, one per message (`<|im_start|>role\\n…<|im_end|>\\n`),
right before each `<|im_start|>`. Special tokens split the tokenizer's input, so tokenizing block
by block gives exactly the ids of tokenizing the whole text; blocks can then be dropped or regrouped
(truncate_text, split) without rendering again.

Inside a block each image stays one `<|image_pad|>` (the compact form). Its run is expanded to
the grid's token count only when a row is emitted, so changing an image's pixel budget
(shrink_images) changes one number, and a run can never be cut: it is a single item until the end.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import SampleError
from ..models.grid import Grid
from ..models.spec import ModelSpec
from .images import ImageHeader
from .types import Conversation, ImagePart

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ImageRef:
    """One image of a sample with the pixel budget this sample gives it."""

    path: str
    width: int
    height: int
    min_pixels: int
    max_pixels: int
    grid: Grid

    @property
    def tokens(self) -> int:
        return self.grid.tokens


@dataclass
class Block:
    """One rendered message in compact form, with its own images in order.

    `ids[:header_len]` is the ChatML header (`<|im_start|>role\n`); the last two ids close the turn
    (`<|im_end|>`, `\n`). `ids[label_start:label_end]` are the trained tokens (an empty span for
    untrained blocks). The template's default system prompt is a "system" block with
    `message_index=None`.
    """

    role: str
    ids: list[int]
    images: list[ImageRef]
    header_len: int
    label_start: int = 0
    label_end: int = 0
    message_index: int | None = None

    @property
    def trained(self) -> bool:
        return self.label_end > self.label_start

    @property
    def length(self) -> int:
        return len(self.ids) - len(self.images) + sum(i.tokens for i in self.images)

    def replace(self, **changes) -> "Block":
        return replace(self, **changes)


@dataclass
class Encoded:
    """A sample between encoding and emission: its blocks in compact form."""

    id: str
    source: str
    blocks: list[Block]

    @property
    def images(self) -> list[ImageRef]:
        return [img for b in self.blocks for img in b.images]

    @property
    def image_tokens(self) -> int:
        return sum(img.tokens for b in self.blocks for img in b.images)

    @property
    def length(self) -> int:
        """Tokens after every image run is expanded: exactly len(input_ids) of the emitted row."""
        return sum(b.length for b in self.blocks)

    @property
    def text_tokens(self) -> int:
        return self.length - self.image_tokens

    @property
    def has_target(self) -> bool:
        return any(b.trained for b in self.blocks)

    def with_blocks(self, blocks: list[Block], id: str | None = None) -> "Encoded":
        return Encoded(self.id if id is None else id, self.source, list(blocks))


@dataclass
class Row:
    """An emitted training sample: what `prepare` stores and the collator consumes."""

    id: str
    source: str
    input_ids: list[int]
    labels: list[int]
    images: list[str]
    image_grid_thw: list[list[int]]
    image_min_pixels: list[int]
    image_max_pixels: list[int]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class Encoder:
    """Renders conversations with a checkpoint's chat template and tokenizes them into blocks."""

    def __init__(self, processor, spec: ModelSpec, train_on_prompt: bool = False):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.spec = spec
        self.train_on_prompt = train_on_prompt
        template = getattr(processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError("the processor has no chat template; vlmtune renders samples with the checkpoint's own")
        self.chat_template = template
        self._headers = {
            role: self._ids(f"{spec.im_start_token}{role}\n") for role in ("system", "user", "assistant")
        }

    # -- rendering ---------------------------------------------------------------------------
    def render(self, conv: Conversation) -> str:
        """The conversation as the chat template renders it, one image pad per image."""
        return self.render_many([conv])[0]

    def render_many(self, convs: list[Conversation]) -> list[str]:
        """Render many conversations in one call of transformers' template renderer (the same code
        `apply_chat_template` runs, without its per-call overhead)."""
        chats = [_template_messages(c) for c in convs]
        try:
            from transformers.utils.chat_template_utils import render_jinja_template
        except ImportError:  # an older or newer transformers without it: the public path
            return [self.processor.apply_chat_template(m, chat_template=self.chat_template, tokenize=False)
                    for m in chats]
        rendered, _ = render_jinja_template(conversations=chats, chat_template=self.chat_template,
                                            **self.tokenizer.special_tokens_map)
        return rendered

    def split_blocks(self, text: str) -> list[str]:
        start = self.spec.im_start_token
        pieces = text.split(start)
        if pieces[0]:
            raise ValueError(f"the chat template put text before the first {start}: {pieces[0][:40]!r}")
        return [start + p for p in pieces[1:]]

    def _tokenize_blocks(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many blocks; repeated blocks (system prompts, stock questions) are tokenized once.

        The Rust tokenizer's fast batch path is used when available: it skips the character offsets
        that transformers' wrapper computes and we never read."""
        if not texts:
            return []
        unique = list(dict.fromkeys(texts))
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and hasattr(backend, "encode_batch_fast"):
            ids = [e.ids for e in backend.encode_batch_fast(unique, add_special_tokens=False)]
        else:
            ids = self.tokenizer(unique, add_special_tokens=False)["input_ids"]
        by_text = dict(zip(unique, ids))
        return [by_text[t] for t in texts]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- encoding ----------------------------------------------------------------------------
    def encode_many(
        self,
        convs: list[Conversation],
        headers: dict[str, ImageHeader],
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> list[Encoded]:
        """Encode many conversations with one batched tokenizer call (the tokenizer is the hot path)."""
        texts = [self.split_blocks(t) for t in self.render_many(convs)] if convs else []
        flat = [t for blocks in texts for t in blocks]
        flat_ids = self._tokenize_blocks(flat)
        out, k = [], 0
        for conv, blocks in zip(convs, texts):
            ids = flat_ids[k : k + len(blocks)]
            k += len(blocks)
            out.append(self._assemble(conv, blocks, ids, headers, min_pixels, max_pixels))
        return out

    def encode(self, conv, headers, min_pixels=None, max_pixels=None) -> Encoded:
        return self.encode_many([conv], headers, min_pixels, max_pixels)[0]

    def _assemble(self, conv, block_texts, block_ids, headers, min_pixels, max_pixels) -> Encoded:
        roles = [t[len(self.spec.im_start_token) :].split("\n", 1)[0] for t in block_texts]
        offset = len(roles) - len(conv.messages)
        if offset not in (0, 1) or (offset == 1 and roles[0] != "system"):
            raise SampleError(
                conv.id,
                conv.source,
                f"the chat template rendered {len(roles)} turns for {len(conv.messages)} messages",
                "use a Qwen-VL checkpoint whose chat template renders one ChatML turn per message",
            )
        blocks = []
        for i, (role, ids) in enumerate(zip(roles, block_ids)):
            mi = i - offset if i >= offset else None
            msg_images = conv.messages[mi].images if mi is not None else []
            ids = list(ids)
            if ids.count(self.spec.image_token_id) != len(msg_images):
                raise SampleError(
                    conv.id, conv.source,
                    f"turn {i} renders {ids.count(self.spec.image_token_id)} image pads for {len(msg_images)} images",
                    "the chat template must render each image part as one image pad",
                )
            images = [self.image_ref(conv, img, headers, min_pixels, max_pixels) for img in msg_images]
            blocks.append(self._block(conv, role, ids, images, mi))
        return Encoded(conv.id, conv.source, blocks)

    def _block(self, conv, role: str, ids: list[int], images, message_index: int | None) -> Block:
        header = self._headers.get(role) or self._ids(f"{self.spec.im_start_token}{role}\n")
        if ids[: len(header)] != header or ids[-2:-1] != [self.spec.im_end_token_id]:
            raise SampleError(conv.id, conv.source, f"the {role} turn is not a ChatML turn (<|im_start|>{role}\\n…<|im_end|>\\n)",
                              "use a Qwen-VL checkpoint with a ChatML chat template")
        block = Block(role, ids, images, header_len=len(header), message_index=message_index)
        trained = role == "assistant" or (self.train_on_prompt and role != "system")
        if message_index is not None and conv.messages[message_index].weight == 0:
            trained = False  # OpenAI `weight: 0`: context, not a target
        # Train through <|im_end|> (so the model learns to stop) but not the newline after it.
        return block.replace(label_start=len(header), label_end=len(ids) - 1) if trained else block

    def image_ref(self, conv, img: ImagePart, headers, min_pixels=None, max_pixels=None) -> ImageRef:
        lo = self.spec.min_pixels if min_pixels is None else min_pixels
        hi = self.spec.max_pixels if max_pixels is None else max_pixels
        h = headers.get(img.path) if img.path else None
        if h is None:
            raise SampleError(conv.id, conv.source, f"image {img.ref!r} has no readable header",
                              "run validation first; it reports missing and unreadable images")
        return ImageRef(img.path, h.width, h.height, lo, hi, self.spec.grid(h.height, h.width, lo, hi))


def _template_messages(conv: Conversation) -> list[dict]:
    return [
        {
            "role": m.role,
            "content": [
                {"type": "image"} if isinstance(p, ImagePart) else {"type": "text", "text": p.text} for p in m.parts
            ],
        }
        for m in conv.messages
    ]


def regrid(img: ImageRef, spec: ModelSpec, max_pixels: int) -> ImageRef:
    """The same image under a different pixel budget."""
    return replace(img, max_pixels=max_pixels, grid=spec.grid(img.height, img.width, img.min_pixels, max_pixels))


def with_budget(enc: Encoded, spec: ModelSpec, budget: int) -> Encoded:
    """The sample with every image capped at `budget` pixels (images already below it are unchanged)."""
    blocks = [
        b.replace(images=[regrid(i, spec, min(budget, i.max_pixels)) for i in b.images]) if b.images else b
        for b in enc.blocks
    ]
    return enc.with_blocks(blocks)


def emit(enc: Encoded, spec: ModelSpec) -> Row:
    """Expand every image run to its grid's token count and build labels."""
    input_ids: list[int] = []
    labels: list[int] = []
    pad = spec.image_token_id
    # Vision markers are inputs, never targets, even inside a trained turn.
    untrainable = {spec.vision_start_token_id, spec.vision_end_token_id}
    for b in enc.blocks:
        images = iter(b.images)
        for j, tok in enumerate(b.ids):
            if tok == pad:
                n = next(images).tokens
                input_ids.extend([pad] * n)
                labels.extend([IGNORE_INDEX] * n)
            else:
                input_ids.append(tok)
                trained = b.label_start <= j < b.label_end and tok not in untrainable
                labels.append(tok if trained else IGNORE_INDEX)
    images = enc.images
    return Row(
        id=enc.id,
        source=enc.source,
        input_ids=input_ids,
        labels=labels,
        images=[i.path for i in images],
        image_grid_thw=[i.grid.thw for i in images],
        image_min_pixels=[i.min_pixels for i in images],
        image_max_pixels=[i.max_pixels for i in images],
    )
