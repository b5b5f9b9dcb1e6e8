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

from dataclasses import dataclass, field, replace

from ..errors import SampleError
from ..models.spec import ModelSpec
from .images import Grid, ImageHeader
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
    """One rendered message in compact form.

    `ids[label_start:label_end]` are the trained tokens (empty span for untrained blocks).
    `role` is "system" for the template's default system prompt too (`default_system=True`).
    """

    role: str
    ids: list[int]
    n_images: int
    label_start: int
    label_end: int
    message_index: int | None = None

    @property
    def trained(self) -> bool:
        return self.label_end > self.label_start


@dataclass
class Encoded:
    """A sample between encoding and emission: blocks in compact form plus its images in order."""

    id: str
    source: str
    blocks: list[Block]
    images: list[ImageRef]
    pad_id: int = field(repr=False, default=-1)

    @property
    def image_tokens(self) -> int:
        return sum(img.tokens for img in self.images)

    @property
    def length(self) -> int:
        """Tokens after every image run is expanded: exactly len(input_ids) of the emitted row."""
        compact = sum(len(b.ids) for b in self.blocks)
        return compact - len(self.images) + self.image_tokens

    @property
    def text_tokens(self) -> int:
        return self.length - self.image_tokens

    @property
    def has_target(self) -> bool:
        return any(b.trained for b in self.blocks)

    def block_images(self) -> list[list[ImageRef]]:
        """The images of each block, in order."""
        out, i = [], 0
        for b in self.blocks:
            out.append(self.images[i : i + b.n_images])
            i += b.n_images
        return out

    def with_blocks(self, blocks: list[Block], images: list[ImageRef]) -> "Encoded":
        return replace(self, blocks=list(blocks), images=list(images))


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
        messages = [
            {
                "role": m.role,
                "content": [
                    {"type": "image"} if isinstance(p, ImagePart) else {"type": "text", "text": p.text}
                    for p in m.parts
                ],
            }
            for m in conv.messages
        ]
        return self.processor.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False)

    def split_blocks(self, text: str) -> list[str]:
        start = self.spec.im_start_token
        pieces = text.split(start)
        if pieces[0]:
            raise ValueError(f"the chat template put text before the first {start}: {pieces[0][:40]!r}")
        return [start + p for p in pieces[1:]]

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
        texts = [self.split_blocks(self.render(c)) for c in convs]
        flat = [t for blocks in texts for t in blocks]
        flat_ids = self.tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
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
            blocks.append(self._block(conv, role, list(ids), mi))
        images = [self.image_ref(conv, img, headers, min_pixels, max_pixels) for img in conv.images]
        expected = [len(m.images) for m in conv.messages]
        got = [b.n_images for b in blocks[offset:]]
        if got != expected:
            raise SampleError(
                conv.id, conv.source, f"image pads per turn {got} differ from images per turn {expected}",
                "the chat template must render each image part as one image pad",
            )
        return Encoded(conv.id, conv.source, blocks, images, pad_id=self.spec.pad_token_id)

    def _block(self, conv, role: str, ids: list[int], message_index: int | None) -> Block:
        n_images = ids.count(self.spec.image_token_id)
        trained = role == "assistant" or (self.train_on_prompt and role != "system")
        if not trained:
            return Block(role, ids, n_images, 0, 0, message_index)
        header = self._headers.get(role) or self._ids(f"{self.spec.im_start_token}{role}\n")
        if ids[: len(header)] != header:
            raise SampleError(conv.id, conv.source, f"the {role} turn does not start with its ChatML header",
                              "use a Qwen-VL checkpoint with a ChatML chat template")
        # Train through <|im_end|> (so the model learns to stop) but not the newline after it.
        end = len(ids) - ids[::-1].index(self.spec.im_end_token_id) if self.spec.im_end_token_id in ids else len(ids)
        return Block(role, ids, n_images, len(header), end, message_index)

    def image_ref(self, conv, img: ImagePart, headers, min_pixels=None, max_pixels=None) -> ImageRef:
        lo = self.spec.min_pixels if min_pixels is None else min_pixels
        hi = self.spec.max_pixels if max_pixels is None else max_pixels
        h = headers.get(img.path) if img.path else None
        if h is None:
            raise SampleError(conv.id, conv.source, f"image {img.ref!r} has no readable header",
                              "run validation first; it reports missing and unreadable images")
        return ImageRef(img.path, h.width, h.height, lo, hi, self.spec.grid(h.height, h.width, lo, hi))


def regrid(img: ImageRef, spec: ModelSpec, max_pixels: int) -> ImageRef:
    """The same image under a different pixel budget."""
    return replace(img, max_pixels=max_pixels, grid=spec.grid(img.height, img.width, img.min_pixels, max_pixels))


def emit(enc: Encoded, spec: ModelSpec) -> Row:
    """Expand every image run to its grid's token count and build labels."""
    input_ids: list[int] = []
    labels: list[int] = []
    images = iter(enc.images)
    pad = spec.image_token_id
    # Vision markers are inputs, never targets, even inside a trained turn.
    untrainable = {spec.vision_start_token_id, spec.vision_end_token_id}
    for b in enc.blocks:
        for j, tok in enumerate(b.ids):
            trained = b.label_start <= j < b.label_end and tok not in untrainable
            if tok == pad:
                n = next(images).tokens
                input_ids.extend([pad] * n)
                labels.extend([IGNORE_INDEX] * n)
            else:
                input_ids.append(tok)
                labels.append(tok if trained else IGNORE_INDEX)
    return Row(
        id=enc.id,
        source=enc.source,
        input_ids=input_ids,
        labels=labels,
        images=[i.path for i in enc.images],
        image_grid_thw=[i.grid.thw for i in enc.images],
        image_min_pixels=[i.min_pixels for i in enc.images],
        image_max_pixels=[i.max_pixels for i in enc.images],
    )
