"""Fitting samples to cutoff_len: the one place that decides a sample's fate.

Policies (config `overflow`) are tried in order on a sample longer than cutoff_len:

- shrink_images: videos first, each to its share of the room left (its pixel budget lowered, then its
  sampled frame count, never below video_min_pixels nor the processor's min_frames); then one pixel budget
  for all of the sample's images, lowered until the sample fits (largest images shrink first, aspect kept,
  never below image_min_pixels nor min_image_tokens);
- truncate_text: drop the oldest text-only exchanges, then the tail of the longest user texts;
  never an image run, never the last assistant target, never a tool result's text;
- split: cut the conversation at exchange boundaries into pieces that each fit, each with exactly
  its own images and as much preceding context (masked) as fits; each piece goes through the
  policies listed before `split` on its own;
- drop: leave the sample out; error: stop and name it.

An exchange (`exchanges_of`) is the turns up to and including an assistant answer. A tool call is an
assistant turn that does not close its exchange while tool results follow it: the user's question, each call,
its results and the answer that uses them are one exchange, so split never starts a piece (or its
context) at a tool result and truncate_text drops a tool exchange whole or not at all.

shrink_images and truncate_text act cumulatively and minimally (each does only what is still
needed). split starts again from the original sample, so an image is not shrunk for a
conversation that splitting alone would have fitted.

Every input sample gets exactly one `FitOutcome`; emitted rows are always ≤ cutoff_len and hold
whole image and video runs only (the invariants are property-tested in tests/data/stages/test_fit.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ...config import DEFAULT_OVERFLOW, POLICIES, FitArgs
from ...errors import SampleError
from ...models.spec import ModelSpec
from ...models.video_grid import shrink_video
from ..types import Origin
from .encode import Block, Encoded, VideoRef, with_budget


@dataclass(frozen=True)
class FitOptions:
    """The fit keys alone (the names and defaults of config.FitArgs), for fitting without a config (tests)."""

    cutoff_len: int
    overflow: tuple[str, ...] = tuple(DEFAULT_OVERFLOW)
    min_image_tokens: int = 4
    max_image_token_share: float = 1.0
    split_keep_context: bool = True


@dataclass
class FitOutcome:
    """One line of the fit report. `origin`: the input sample's file and index (None: unknown, e.g. a record that
    could not be read); `piece` on the line is 0 for a sample emitted whole (or not at all) and, for a split one,
    its pieces' numbers 1..n, in the order of `tokens_after` (the rows' `piece` column)."""

    id: str
    source: str
    fate: str  # kept | shrunk | truncated | split | dropped | invalid
    reason: str
    tokens_before: int | None
    tokens_after: int | list[int] | None
    pieces: list[Encoded] = field(default_factory=list, repr=False)
    origin: Origin | None = None

    def report(self) -> dict:
        return {
            "id": self.id,
            "source": self.source,
            "fate": self.fate,
            "reason": self.reason,
            "tokens_before": self.tokens_before,
            "tokens_after": self.tokens_after,
            "file": self.origin.file if self.origin else None,
            "index": self.origin.index if self.origin else None,
            "piece": [p.piece for p in self.pieces] if self.fate == "split" else 0,
        }


class Fitter:
    """`encoder` (data/stages/encode.Encoder) re-plans videos when shrink_images lowers their budget: Qwen3-VL's
    timestamps are text, tokenized by it. Samples without videos never need it."""

    def __init__(self, spec: ModelSpec, options: FitArgs | FitOptions, encoder=None):
        unknown = [p for p in options.overflow if p not in POLICIES]
        if unknown:
            raise ValueError(f"unknown overflow policies {unknown}; choose from {', '.join(POLICIES)}")
        self.spec = spec
        self.opt = options
        self.encoder = encoder

    # -- entry point ------------------------------------------------------------------------
    def fit(self, enc: Encoded) -> FitOutcome:
        cut = self.opt.cutoff_len
        state, notes = self._cap_image_share(enc)
        capped = state
        if state.length <= cut:
            fate = "shrunk" if notes else "kept"
            return self._done(enc, fate, "; ".join(notes) or f"fits ({state.length} <= {cut})", [state])
        for i, policy in enumerate(self.opt.overflow):
            if policy == "shrink_images":
                state, note = self._shrink(state)
                notes += [note] if note else []
                if state.length <= cut:
                    return self._done(enc, "shrunk", "; ".join(notes), [state])
            elif policy == "truncate_text":
                state, note = self._truncate(state)
                notes += [note] if note else []
                if state.length <= cut and state.has_target:
                    return self._done(enc, "truncated", "; ".join(notes), [state])
            elif policy == "split":
                result = self._split(capped, self.opt.overflow[:i])
                if result is not None:
                    return self._done(enc, "split", result[1], result[0])
            elif policy == "drop":
                why = f"{enc.length} tokens > cutoff_len={cut}"
                if notes:
                    why += f"; still {state.length} after: " + "; ".join(notes)
                return FitOutcome(enc.id, enc.source, "dropped", why, enc.length, None, origin=enc.origin)
            elif policy == "error":
                raise SampleError(
                    enc.id, enc.source,
                    f"{enc.length} tokens exceed cutoff_len={cut} and the overflow policies before 'error' cannot fit it",
                    f"raise cutoff_len to at least {enc.length} or add shrink_images / truncate_text / split / drop to overflow",
                )
        tried = ", ".join(self.opt.overflow) or "none"
        return FitOutcome(enc.id, enc.source, "dropped",
                          f"{enc.length} tokens > cutoff_len={cut} and no overflow policy could fit it (tried: {tried})",
                          enc.length, None, origin=enc.origin)

    def _done(self, enc: Encoded, fate: str, reason: str, pieces: list[Encoded]) -> FitOutcome:
        after: int | list[int] = [p.length for p in pieces] if fate == "split" else pieces[0].length
        return FitOutcome(enc.id, enc.source, fate, reason, enc.length, after, pieces, origin=enc.origin)

    # -- shrink_images ----------------------------------------------------------------------
    def floor_budget(self) -> int:
        """The smallest pixel budget shrink_images may give an image."""
        return max(self.spec.min_pixels, self.opt.min_image_tokens * self.spec.factor ** 2)

    def _largest_budget(self, enc: Encoded, max_image_tokens: int) -> Encoded:
        """The sample under the largest budget (in whole-token steps) whose images fit
        `max_image_tokens`, or under the floor budget when none does."""
        f2 = self.spec.factor ** 2
        floor = self.floor_budget()
        lo = -(-floor // f2)
        hi = max(img.max_pixels for img in enc.images) // f2
        if hi < lo or with_budget(enc, self.spec, lo * f2).image_tokens > max_image_tokens:
            return with_budget(enc, self.spec, floor)
        while lo < hi:  # image tokens never grow as the budget shrinks, so bisect on it
            mid = (lo + hi + 1) // 2
            if with_budget(enc, self.spec, mid * f2).image_tokens <= max_image_tokens:
                lo = mid
            else:
                hi = mid - 1
        return with_budget(enc, self.spec, lo * f2)

    def _shrink(self, enc: Encoded) -> tuple[Encoded, str | None]:
        if not enc.images and not enc.videos:
            return enc, None
        return self._fit_media(enc, self.opt.cutoff_len - enc.text_tokens)

    def _fit_media(self, enc: Encoded, max_media: int) -> tuple[Encoded, str | None]:
        """The sample with its videos, then its images, shrunk until their tokens are ≤ max_media (or at
        their floors); the note says what changed."""
        notes = []
        state = enc
        if enc.videos and enc.image_tokens + enc.video_tokens > max_media:
            state, note = self._shrink_videos(state, max_media - state.image_tokens)
            notes += [note] if note else []
        if state.images and state.image_tokens + state.video_tokens > max_media:
            best = self._largest_budget(state, max_media - state.video_tokens)
            note = _shrink_note(state, best)
            notes += [note] if note else []
            state = best
        return state, "; ".join(notes) or None

    def _shrink_videos(self, enc: Encoded, room: int) -> tuple[Encoded, str | None]:
        """Each video to its share of `room` tokens, in proportion to its tokens now. A clip that cannot get
        down to its share stays at its smallest plan, and the room it could not give up is taken from the
        shares of the others (so text is not cut while a clip could still shrink)."""
        olds = enc.videos
        if sum(v.tokens for v in olds) <= room:
            return enc, None
        fixed: dict[int, VideoRef] = {}  # clips at their smallest plan, still over their share
        news: dict[int, VideoRef] = {}
        for _ in range(len(olds)):
            free = [k for k in range(len(olds)) if k not in fixed]
            left = max(0, room - sum(v.tokens for v in fixed.values()))
            weight = sum(olds[k].tokens for k in free) or 1
            over = False
            for k in free:
                budget = left * olds[k].tokens // weight
                news[k], fits = self._shrink_video(olds[k], budget)
                if not fits:
                    fixed[k], over = news[k], True
            if not over:
                break
        notes = [f"video {k + 1}: {v.tokens} -> {news[k].tokens} tokens, {v.frames} -> {news[k].frames} frames, "
                 f"{v.grid.height}x{v.grid.width} -> {news[k].grid.height}x{news[k].grid.width} px"
                 for k, v in enumerate(olds) if news[k].tokens != v.tokens]
        if not notes:
            return enc, None
        it = iter(news[k] for k in range(len(olds)))
        blocks = [b.replace(videos=[next(it) for _ in b.videos]) if b.videos else b for b in enc.blocks]
        return enc.with_blocks(blocks), "shrank " + "; ".join(notes)

    def _shrink_video(self, v: VideoRef, budget: int) -> tuple[VideoRef, bool]:
        """The largest plan of `v` within `budget` tokens (and True), else its smallest plan (pixel floor,
        fewest frames) and False."""
        if self.encoder is None:
            raise ValueError("fitting samples with videos needs the encoder (Fitter(..., encoder=...))")
        count = self.encoder.count_text if v.stamp_ids is not None else None
        found = shrink_video(v.total_frames, v.fps, v.height, v.width, v.spec, budget, count)
        if found is not None:
            return self.encoder.plan_video(v, *found), True
        # nothing fits: the floor, so that the next policies start from the least
        found = shrink_video(v.total_frames, v.fps, v.height, v.width, v.spec, 0, count, floor=True)
        return (v if found is None else self.encoder.plan_video(v, *found)), False

    def _cap_image_share(self, enc: Encoded) -> tuple[Encoded, list[str]]:
        cap = int(self.opt.max_image_token_share * self.opt.cutoff_len)
        if self.opt.max_image_token_share >= 1.0 or enc.image_tokens + enc.video_tokens <= cap:
            return enc, []
        best, note = self._fit_media(enc, cap)
        share = f"max_image_token_share={self.opt.max_image_token_share} ({cap} tokens)"
        return best, [f"{note} to respect {share}"] if note else []

    # -- truncate_text ----------------------------------------------------------------------
    def _truncate(self, enc: Encoded) -> tuple[Encoded, str | None]:
        cut = self.opt.cutoff_len
        system, exchanges = exchanges_of(enc)
        notes = []
        # Oldest text-only exchanges first; the last exchange (the final target) always stays.
        dropped = tools = 0
        length = enc.length
        for k in range(len(exchanges) - 1):
            if length <= cut:
                break
            if not any(b.media for b in exchanges[k]):
                length -= sum(b.length for b in exchanges[k])
                tools += _has_tools(exchanges[k])
                exchanges[k] = []
                dropped += 1
        state = _join(enc, system, [e for e in exchanges if e])
        if dropped:
            whole = f", {tools} with tool calls (each dropped with its results and answer)" if tools else ""
            notes.append(f"dropped {dropped} oldest text-only exchange(s){whole}")
        if state.length > cut:
            state, removed = self._cut_user_tails(state, state.length - cut)
            if removed:
                notes.append(f"cut {removed} token(s) from the end of user text")
        return state, "; ".join(notes) or None

    def _cut_user_tails(self, enc: Encoded, over: int) -> tuple[Encoded, int]:
        """Remove text tokens from the end of user turns, longest text first; runs stay whole. A tool result
        (rendered as a user turn) is never cut: its tail is the template's `</tool_response>`, and a cut result
        is a different result for the answer that uses it."""
        keep = {self.spec.image_token_id, self.spec.video_token_id, self.spec.vision_start_token_id,
                self.spec.vision_end_token_id}
        blocks = list(enc.blocks)
        users = [i for i, b in enumerate(blocks) if b.role == "user" and b.tool is None]
        users.sort(key=lambda i: -sum(1 for t in _body(blocks[i]) if t not in keep))
        removed = 0
        for i in users:
            if removed >= over:
                break
            b = blocks[i]
            body = _body(b)
            j = len(body) - 1
            while removed < over and j >= 0:
                if body[j] not in keep:
                    del body[j]
                    removed += 1
                j -= 1
            ids = b.ids[: b.header_len] + body + b.ids[-2:]
            # a trained user turn (train_on_prompt) keeps training through its <|im_end|>
            blocks[i] = b.replace(ids=ids, label_end=len(ids) - 1 if b.trained else 0)
        return enc.with_blocks(blocks), removed

    # -- split ------------------------------------------------------------------------------
    def _split(self, enc: Encoded, earlier: tuple[str, ...]) -> tuple[list[Encoded], str] | None:
        system, exchanges = exchanges_of(enc)
        if len(exchanges) < 2:
            return None
        inner = Fitter(self.spec, replace(
            self.opt, overflow=tuple(p for p in earlier if p in ("shrink_images", "truncate_text"))), self.encoder)
        cut = self.opt.cutoff_len
        sys_len = sum(b.length for b in system)
        lengths = [sum(b.length for b in ex) for ex in exchanges]
        pieces: list[Encoded] = []
        lost: list[int] = []
        notes: list[str] = []
        k = 0
        while k < len(exchanges):
            end, total = k + 1, sys_len + lengths[k]
            while end < len(exchanges) and total + lengths[end] <= cut:
                total += lengths[end]
                end += 1
            # ids name the exchanges a piece holds, so a report line can be traced to the input
            label = f"{k + 1}" if end == k + 1 else f"{k + 1}-{end}"
            piece = _join(enc, system, exchanges[k:end], id=f"{enc.id}#{label}")
            if piece.length > cut:
                inner_out = inner.fit(piece)  # with no inner policy this is a drop
                piece = inner_out.pieces[0] if inner_out.pieces else None
                if piece is not None:
                    notes.append(f"piece {label}: {inner_out.reason}")
            if piece is None or not piece.has_target:
                lost.append(k + 1)
            else:
                if self.opt.split_keep_context:
                    piece = _with_context(piece, len(system), exchanges[:k], cut)
                pieces.append(piece)
            k = end
        if not pieces:
            return None
        pieces = [replace(p, piece=n) for n, p in enumerate(pieces, 1)]  # numbered as emitted: 1..n, no gaps
        note = f"split {len(exchanges)} exchanges into {len(pieces)} samples at exchange boundaries"
        tools = [k + 1 for k, ex in enumerate(exchanges) if _has_tools(ex)]
        if tools:
            note += f" (never inside tool exchange(s) {tools}: a call stays with its results and answer)"
        if lost:
            note += f"; exchange(s) {lost} could not fit even alone and were left out"
        return pieces, "; ".join([note] + notes)


# -- helpers over blocks ---------------------------------------------------------------------
def exchanges_of(enc: Encoded) -> tuple[list[Block], list[list[Block]]]:
    """Leading system blocks, then exchanges: runs of turns each closed by an assistant turn that no tool
    result follows (a tool call and its results stay with the answer that uses them)."""
    blocks = enc.blocks
    i = 0
    while i < len(blocks) and blocks[i].role == "system":
        i += 1
    system, exchanges, cur = blocks[:i], [], []
    rest = blocks[i:]
    for k, b in enumerate(rest):
        cur.append(b)
        if b.role == "assistant" and not (k + 1 < len(rest) and rest[k + 1].tool == "result"):
            exchanges.append(cur)
            cur = []
    if cur:  # trailing turns without an answer belong to the last exchange
        if exchanges:
            exchanges[-1].extend(cur)
        else:
            exchanges.append(cur)
    return system, exchanges


def _join(enc: Encoded, system: list[Block], exchanges: list[list[Block]], id: str | None = None) -> Encoded:
    joined = enc.with_blocks(list(system) + [b for ex in exchanges for b in ex], id=id)
    if id is not None:  # a piece: it keeps its input sample's id as data (recipe.split_validation groups by it)
        joined.sample_id = enc.sample
    return joined


def _with_context(piece: Encoded, n_system: int, earlier: list[list[Block]], cut: int) -> Encoded:
    """Prepend the most recent earlier exchanges, untrained, while the piece still fits."""
    length = piece.length
    context: list[Block] = []
    for ex in reversed(earlier):
        extra = sum(b.length for b in ex)
        if length + extra > cut:
            break
        context = [b.replace(label_start=0, label_end=0) for b in ex] + context
        length += extra
    if not context:
        return piece
    return piece.with_blocks(piece.blocks[:n_system] + context + piece.blocks[n_system:])


def _has_tools(exchange: list[Block]) -> bool:
    return any(b.tool is not None for b in exchange)


def _body(b: Block) -> list[int]:
    """The turn's content ids, between the ChatML header and the closing `<|im_end|>`, `\n`."""
    return list(b.ids[b.header_len : len(b.ids) - 2])


def _shrink_note(before: Encoded, after: Encoded) -> str | None:
    if after.image_tokens == before.image_tokens:
        return None
    budget = max(i.max_pixels for i in after.images)
    return (f"shrank {len(after.images)} image(s) from {before.image_tokens} to {after.image_tokens} "
            f"image tokens (pixel budget {budget})")
