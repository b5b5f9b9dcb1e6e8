"""Template rendering, image and video runs, and labels.

A sample is rendered once with the checkpoint's own chat template, with one `<|image_pad|>` per
image. The text is cut into ChatML blocks, one per message (`<|im_start|>role\\n…<|im_end|>\\n`),
right before each `<|im_start|>`. Special tokens split the tokenizer's input, so tokenizing block
by block gives exactly the ids of tokenizing the whole text; blocks can then be dropped or regrouped
(truncate_text, split) without rendering again.

Inside a block each image stays one `<|image_pad|>` (the compact form). Its run is expanded to
the grid's token count only when a row is emitted, so changing an image's pixel budget
(shrink_images) changes one number, and a run can never be cut: it is a single item until the end.

A video is the same: one `<|video_pad|>` (inside the template's `<|vision_start|>…<|vision_end|>`) until
emission, where it becomes exactly the processor's text for the clip's planned grid (`VideoRef.expansion`):
Qwen2/2.5-VL a run of t·h·w/merge² pads; Qwen3-VL, per temporal patch, its `<T seconds>` timestamp, then
`<|vision_start|>` + h·w/merge² pads + `<|vision_end|>`. The timestamps sit between special tokens, so their
ids are tokenized on their own and the block-by-block tokenization stays exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from ...errors import SampleError
from ...models.checkpoint import FileProcessor, render_template
from ...models.grid import Grid
from ...models.spec import ModelSpec
from ...models.video_grid import VideoGrid, VideoSpec
from ..media.images import ImageHeader
from ..media.video import PlannedClip
from ..schema import Row, SampleStats
from ..types import Conversation, ImagePart, Origin, VideoPart
from .template import EMPTY_THINK, THINK_OPEN, template_messages, without_thinking

IGNORE_INDEX = -100
# First of the private-use characters (Unicode plane 15) that stand for control tokens typed as plain text.
_SENTINEL_BASE = 0xF0100
# A tool turn's place in its exchange (Block.tool), by the conversation's role for it.
_TOOL_KIND = {"function_call": "call", "observation": "result"}



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


@dataclass(frozen=True)
class VideoRef:
    """One video of a sample with the plan this sample gives it: the clip's facts, the processor bounds it
    is resized under (`min_pixels`/`max_pixels` as the processor reads its `size`: per frame for
    Qwen2/2.5-VL, per clip for Qwen3-VL), the frames sampled and the grid; `stamp_ids` are the token ids
    of Qwen3-VL's per-patch timestamps (None for the other families)."""

    path: str
    total_frames: int
    fps: float
    height: int
    width: int
    rotation: int
    spec: VideoSpec  # the clip's spec (bounds, max_frames): shrink_images re-plans from it
    grid: VideoGrid
    stamp_ids: tuple[tuple[int, ...], ...] | None = None

    @property
    def min_pixels(self) -> int:
        return self.spec.min_pixels

    @property
    def max_pixels(self) -> int:
        return self.spec.max_pixels

    @property
    def frames(self) -> int:
        return self.grid.frames

    @property
    def pad_tokens(self) -> int:
        """`<|video_pad|>` tokens (one vision feature each)."""
        return self.grid.tokens

    @property
    def tokens(self) -> int:
        """Tokens of the clip's expansion (it replaces the compact prompt's one `<|video_pad|>`)."""
        if self.stamp_ids is None:
            return self.grid.tokens
        return self.grid.tokens + 2 * self.grid.t + sum(len(s) for s in self.stamp_ids)

    def expansion(self, spec: ModelSpec) -> list[int]:
        """The ids that replace the compact `<|video_pad|>`, exactly as the processor writes them."""
        pad = spec.video_token_id
        if self.stamp_ids is None:
            return [pad] * self.grid.tokens
        run = [spec.vision_start_token_id] + [pad] * self.grid.tokens_per_patch + [spec.vision_end_token_id]
        return [t for stamp in self.stamp_ids for t in (*stamp, *run)]


@dataclass
class Block:
    """One rendered message in compact form, with its own images in order.

    `ids[:header_len]` is the ChatML header (`<|im_start|>role\n`); the last two ids close the turn
    (`<|im_end|>`, `\n`). `ids[label_start:label_end]` are the trained tokens (an empty span for
    untrained blocks). The template's default system prompt is a "system" block with
    `message_index=None`. `tool` marks a tool exchange's turns, whatever role the template renders them
    with: "call" (a `function_call` message, an assistant turn) or "result" (an `observation`, a user
    turn); fit keeps a call, its results and the answer after them in one exchange.
    """

    role: str
    ids: list[int]
    images: list[ImageRef]
    header_len: int
    label_start: int = 0
    label_end: int = 0
    message_index: int | None = None
    videos: list[VideoRef] = field(default_factory=list)
    tool: str | None = None  # "call" | "result" | None

    @property
    def trained(self) -> bool:
        return self.label_end > self.label_start

    @property
    def media(self) -> bool:
        return bool(self.images or self.videos)

    @property
    def length(self) -> int:
        return (len(self.ids) - len(self.images) - len(self.videos) + sum(i.tokens for i in self.images)
                + sum(v.tokens for v in self.videos))

    def replace(self, **changes) -> "Block":
        return replace(self, **changes)


@dataclass
class Encoded:
    """A sample between encoding and emission: its blocks in compact form. A piece cut by `split` has its own
    `id` (`<sample>#<exchanges>`, shown to users; never parsed), keeps its input sample's in `sample_id` and its
    `origin`, and is numbered in `piece`."""

    id: str
    source: str
    blocks: list[Block]
    sample_id: str | None = None  # None: this is the whole input sample (its id is `id`)
    origin: Origin | None = None  # the input sample's data file and record index (None: not read from a file)
    piece: int = 0  # 0: the whole input sample; 1..n: the k-th piece `split` cut from it, in order

    def stats(self) -> SampleStats:
        """The sample's token counts before fitting (schema's SampleStats)."""
        return SampleStats(self.id, self.source, self.length, self.image_tokens, self.text_tokens, len(self.images),
                           len(self.videos), self.video_tokens, max((v.tokens for v in self.videos), default=0))

    @property
    def sample(self) -> str:
        """The id of the input sample this is (a piece of)."""
        return self.id if self.sample_id is None else self.sample_id

    @property
    def images(self) -> list[ImageRef]:
        return [img for b in self.blocks for img in b.images]

    @property
    def videos(self) -> list[VideoRef]:
        return [v for b in self.blocks for v in b.videos]

    @property
    def image_tokens(self) -> int:
        return sum(img.tokens for b in self.blocks for img in b.images)

    @property
    def video_tokens(self) -> int:
        """Tokens of the videos' expansions (Qwen3-VL's timestamps and per-patch markers included)."""
        return sum(v.tokens for b in self.blocks for v in b.videos)

    @property
    def length(self) -> int:
        """Tokens after every image and video run is expanded: exactly len(input_ids) of the emitted row."""
        return sum(b.length for b in self.blocks)

    @property
    def text_tokens(self) -> int:
        return self.length - self.image_tokens - self.video_tokens

    @property
    def has_target(self) -> bool:
        return any(b.trained for b in self.blocks)

    def with_blocks(self, blocks: list[Block], id: str | None = None) -> "Encoded":
        return replace(self, id=self.id if id is None else id, blocks=list(blocks))


class Encoder:
    """Renders conversations with a checkpoint's chat template and tokenizes them into blocks."""

    def __init__(self, processor, spec: ModelSpec, train_on_prompt: bool = False, mask_history: bool = False,
                 default_system: str | None = None, enable_thinking: bool = True,
                 plain_tokens: tuple[str, ...] = ()):
        """`processor`: transformers' processor, or the checkpoint's files read by models/checkpoint.py
        (`Loaded.data_processor`), which render and tokenize identically without importing torch."""
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.spec = spec
        self.train_on_prompt = train_on_prompt
        self.mask_history = mask_history  # LLaMA-Factory's: only the last answer is a target
        self.default_system = default_system  # for samples without a system turn
        self.enable_thinking = enable_thinking
        self._text_ids: dict[str, tuple[int, ...]] = {}
        template = getattr(processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError("the processor has no chat template; vlmtune renders samples with the checkpoint's own")
        self.chat_template = template
        # Qwen3-VL's template renders `tools` and tool turns itself; older ones (Qwen2/2.5-VL) do not, and get
        # Qwen's own tool format written out (tool_format).
        self.renders_tools = "tool_call" in template and "tools" in template
        self._headers = {
            role: self._ids(f"{spec.im_start_token}{role}\n") for role in ("system", "user", "assistant")
        }
        # control_tokens_in_text: text. Each of these tokens typed in a message's text is swapped for a private-use
        # character before rendering (so the template and the block split never see it), and that character is
        # tokenized as the token's text with special tokens split (so it never becomes the control id).
        self._to_sentinel = {t: chr(_SENTINEL_BASE + k) for k, t in enumerate(plain_tokens)}
        self._from_sentinel = {c: t for t, c in self._to_sentinel.items()}
        self._plain_re = re.compile("|".join(map(re.escape, plain_tokens))) if plain_tokens else None
        self._sentinel_re = re.compile("([" + "".join(self._from_sentinel) + "])") if plain_tokens else None
        # enable_thinking=false: an answer's leading empty thinking block is prompt, not target (docs/thinking.md)
        self._empty_think = self._ids(EMPTY_THINK) if not enable_thinking and THINK_OPEN in template else None

    # -- rendering ---------------------------------------------------------------------------
    def render(self, conv: Conversation) -> str:
        """The conversation as the chat template renders it, one image pad per image."""
        return self.render_many([conv])[0]

    def render_many(self, convs: list[Conversation]) -> list[str]:
        """Render many conversations in one call of transformers' template renderer (the same code
        `apply_chat_template` runs, without its per-call overhead)."""
        if not self.enable_thinking:
            convs = [without_thinking(c) for c in convs]
        chats = [self._with_default_system(template_messages(c, self.renders_tools)) for c in convs]
        if self._plain_re is not None:
            chats = [[self._escape(m) for m in chat] for chat in chats]
        # the template reads enable_thinking as apply_chat_template passes it (Qwen3.5's generation prompt)
        think = {"enable_thinking": self.enable_thinking}
        if isinstance(self.processor, FileProcessor):  # the checkpoint's files: jinja2 as transformers runs it
            render_jinja_template = render_template
        else:
            try:
                from transformers.utils.chat_template_utils import render_jinja_template
            except ImportError:  # an older or newer transformers without it: the public path
                return [self.processor.apply_chat_template(m, chat_template=self.chat_template, tokenize=False,
                                                           **think, **self._tools(c)) for c, m in zip(convs, chats)]
        out: list[str | None] = [None] * len(convs)
        plain = [i for i, c in enumerate(convs) if not self._tools(c)]
        if plain:
            rendered, _ = render_jinja_template(conversations=[chats[i] for i in plain],
                                                chat_template=self.chat_template, **think,
                                                **self.tokenizer.special_tokens_map)
            for i, text in zip(plain, rendered):
                out[i] = text
        for i, c in enumerate(convs):  # each sample's own tools: the renderer takes one list per call
            if out[i] is None:
                out[i] = render_jinja_template(conversations=[chats[i]], chat_template=self.chat_template, **think,
                                               **self._tools(c), **self.tokenizer.special_tokens_map)[0][0]
        return out

    def _with_default_system(self, chat: list[dict]) -> list[dict]:
        """default_system for a sample without a system turn: rendered like the template's own default (a system
        block with no message of its own), so it is never trained."""
        if not self.default_system or (chat and chat[0]["role"] == "system"):
            return chat
        return [{"role": "system", "content": [{"type": "text", "text": self.default_system}]}, *chat]

    def _escape(self, message: dict) -> dict:
        """A template message with the plain-text tokens in its text swapped for their private-use characters."""
        sub = lambda text: self._plain_re.sub(lambda m: self._to_sentinel[m.group(0)], text)  # noqa: E731
        content = message.get("content")
        if isinstance(content, str):
            return {**message, "content": sub(content)}
        if isinstance(content, list):
            return {**message, "content": [{**p, "text": sub(p["text"])} if p.get("type") == "text" else p
                                           for p in content]}
        return message

    def _plain_ids(self, text: str) -> list[int]:
        """Ids of a block holding private-use characters: the text around them as usual, each of them as its
        token's text with special tokens split (plain characters, never the control id)."""
        ids: list[int] = []
        for k, piece in enumerate(self._sentinel_re.split(text)):
            if not piece:
                continue
            if k % 2:
                ids += self.tokenizer(self._from_sentinel[piece], add_special_tokens=False,
                                      split_special_tokens=True)["input_ids"]
            else:
                ids += self._ids(piece)
        return ids

    def _tools(self, conv: Conversation) -> dict:
        return {"tools": conv.tools} if conv.tools and self.renders_tools else {}

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
        if self._sentinel_re is not None:
            by_text.update((t, self._plain_ids(t)) for t in unique if self._sentinel_re.search(t))
        return [by_text[t] for t in texts]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_ids(self, text: str) -> tuple[int, ...]:
        """Ids of a plain string (Qwen3-VL's timestamps), cached: the same few strings recur in every clip."""
        ids = self._text_ids.get(text)
        if ids is None:
            ids = self._text_ids[text] = tuple(self._ids(text))
        return ids

    def count_text(self, text: str) -> int:
        return len(self.text_ids(text))

    # -- encoding ----------------------------------------------------------------------------
    def encode_many(
        self,
        convs: list[Conversation],
        headers: dict[str, ImageHeader],
        videos: dict[str, PlannedClip] | None = None,
    ) -> list[Encoded]:
        """Encode many conversations with one batched tokenizer call (the tokenizer is the hot path)."""
        texts = [self.split_blocks(t) for t in self.render_many(convs)] if convs else []
        flat = [t for blocks in texts for t in blocks]
        flat_ids = self._tokenize_blocks(flat)
        out, k = [], 0
        for conv, blocks in zip(convs, texts):
            ids = flat_ids[k : k + len(blocks)]
            k += len(blocks)
            out.append(self._assemble(conv, blocks, ids, headers, videos or {}))
        return out

    def encode(self, conv, headers, videos=None) -> Encoded:
        return self.encode_many([conv], headers, videos)[0]

    def _assemble(self, conv, block_texts, block_ids, headers, videos) -> Encoded:
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
        targets = [k for k, m in enumerate(conv.messages) if m.role in ("assistant", "function_call")]
        last = targets[-1] if targets else None
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
            images = [self.image_ref(conv, img, headers) for img in msg_images]
            msg_videos = conv.messages[mi].videos if mi is not None else []
            self._check_video_pads(conv, i, ids, len(msg_videos))
            block = self._block(conv, role, ids, images, mi, last)
            if msg_videos:
                block.videos = [self.video_ref(conv, v, videos) for v in msg_videos]
            blocks.append(block)
        return Encoded(conv.id, conv.source, blocks, origin=conv.origin)

    def _check_video_pads(self, conv, turn: int, ids: list[int], n_videos: int) -> None:
        """One video pad per video, each right inside `<|vision_start|>…<|vision_end|>`: what makes a video's
        expansion (and Qwen3-VL's timestamps) independent of the text around it."""
        s = self.spec
        at = [k for k, t in enumerate(ids) if t == s.video_token_id]
        if len(at) != n_videos:
            raise SampleError(conv.id, conv.source, f"turn {turn} renders {len(at)} video pads for {n_videos} videos",
                              "the chat template must render each video part as one video pad")
        for k in at:
            if not (0 < k < len(ids) - 1 and ids[k - 1] == s.vision_start_token_id and ids[k + 1] == s.vision_end_token_id):
                raise SampleError(conv.id, conv.source,
                                  f"turn {turn} renders a video pad outside {s.vision_start_token}…{s.vision_end_token}",
                                  "use a Qwen-VL chat template (it writes <|vision_start|><|video_pad|><|vision_end|>)")

    def video_ref(self, conv, video: VideoPart, planned_by_path: dict[str, PlannedClip]) -> VideoRef:
        """The clip as validation read and planned it (data/media/video.plan_clip), with its timestamps' ids."""
        planned = planned_by_path.get(video.path) if video.path else None
        if planned is None:
            raise SampleError(conv.id, conv.source, f"video {video.ref!r} was not planned",
                              "run validation first; it reads and plans every video, and reports the bad ones")
        facts = planned.facts
        return VideoRef(video.path, facts.frames, facts.fps, facts.height, facts.width, facts.rotation,
                        planned.spec, planned.grid, self._stamp_ids(planned.grid))

    def plan_video(self, ref: VideoRef, spec: VideoSpec, grid: VideoGrid) -> VideoRef:
        """`ref` with another plan (shrink_images): its spec, grid and, for Qwen3-VL, its timestamps' ids."""
        return replace(ref, spec=spec, grid=grid, stamp_ids=self._stamp_ids(grid))

    def _stamp_ids(self, grid: VideoGrid) -> tuple[tuple[int, ...], ...] | None:
        return tuple(self.text_ids(t) for t in grid.timestamp_texts()) if grid.timestamps is not None else None

    def _block(self, conv, role: str, ids: list[int], images, message_index: int | None,
               last_target: int | None = None) -> Block:
        header = self._headers.get(role) or self._ids(f"{self.spec.im_start_token}{role}\n")
        if ids[: len(header)] != header or ids[-2:-1] != [self.spec.im_end_token_id]:
            raise SampleError(conv.id, conv.source, f"the {role} turn is not a ChatML turn (<|im_start|>{role}\\n…<|im_end|>\\n)",
                              "use a Qwen-VL checkpoint with a ChatML chat template")
        kind = conv.messages[message_index].role if message_index is not None else None
        block = Block(role, ids, images, header_len=len(header), message_index=message_index,
                      tool=_TOOL_KIND.get(kind))
        trained = role == "assistant" or (self.train_on_prompt and role != "system")
        if message_index is not None and conv.messages[message_index].weight == 0:
            trained = False  # a per-message loss flag (OpenAI `weight`, ms-swift `loss`): context, not a target
        if self.mask_history and message_index != last_target:
            trained = False
        # Train through <|im_end|> (so the model learns to stop) but not the newline after it.
        start = len(header)
        if role == "assistant" and self._empty_think and ids[start : start + len(self._empty_think)] == self._empty_think:
            start += len(self._empty_think)  # enable_thinking=false: the empty thinking block is prompt
        return block.replace(label_start=start, label_end=len(ids) - 1) if trained else block

    def image_ref(self, conv, img: ImagePart, headers) -> ImageRef:
        """The image under the spec's pixel bounds (shrink_images lowers them per sample later: `regrid`)."""
        lo, hi = self.spec.min_pixels, self.spec.max_pixels
        h = headers.get(img.path) if img.path else None
        if h is None:
            raise SampleError(conv.id, conv.source, f"image {img.ref!r} has no readable header",
                              "run validation first; it reports missing and unreadable images")
        return ImageRef(img.path, h.width, h.height, lo, hi, self.spec.grid(h.height, h.width, lo, hi))


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
    pad, video_pad = spec.image_token_id, spec.video_token_id
    # Vision markers are inputs, never targets, even inside a trained turn.
    untrainable = {spec.vision_start_token_id, spec.vision_end_token_id}
    for b in enc.blocks:
        images = iter(b.images)
        videos = iter(b.videos)
        for j, tok in enumerate(b.ids):
            if tok == pad:
                n = next(images).tokens
                input_ids.extend([pad] * n)
                labels.extend([IGNORE_INDEX] * n)
            elif tok == video_pad:
                run = next(videos).expansion(spec)
                input_ids.extend(run)
                labels.extend([IGNORE_INDEX] * len(run))
            else:
                input_ids.append(tok)
                trained = b.label_start <= j < b.label_end and tok not in untrainable
                labels.append(tok if trained else IGNORE_INDEX)
    images = enc.images
    return Row(
        id=enc.id,
        source=enc.source,
        sample_id=enc.sample,
        **origin_columns(enc),
        input_ids=input_ids,
        labels=labels,
        images=[i.path for i in images],
        image_grid_thw=[i.grid.thw for i in images],
        image_min_pixels=[i.min_pixels for i in images],
        image_max_pixels=[i.max_pixels for i in images],
        **video_columns(enc.videos),
    )


def video_columns(videos: list[VideoRef]) -> dict:
    """The row's video columns (docs/video.md): what the collator hands the video processor."""
    return {
        "videos": [v.path for v in videos],
        "video_grid_thw": [v.grid.thw for v in videos],
        "video_frames": [list(v.grid.indices) for v in videos],
        "video_total_frames": [v.total_frames for v in videos],
        "video_fps": [float(v.fps) for v in videos],
        "video_rotation": [v.rotation for v in videos],
        "video_min_pixels": [v.min_pixels for v in videos],
        "video_max_pixels": [v.max_pixels for v in videos],
        "video_second_per_grid": [float(v.grid.second_per_grid or 0.0) for v in videos],
    }


def origin_columns(enc: Encoded) -> dict:
    """The row's origin columns (data/schema.Row): the input sample's file and index, and which piece this is."""
    o = enc.origin
    return {"file": o.file if o else "", "index": o.index if o else -1, "piece": enc.piece}
