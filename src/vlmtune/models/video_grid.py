"""The Qwen-VL video processors' arithmetic: a clip's (frame count, frame rate, size) → the frames sampled,
the vision grid, the `<|video_pad|>` tokens and the text the processor puts around them.

It is the video half of header-only accounting (models/grid.py is the image half): data/media/video.py reads
the facts from the container, this turns them into tokens, with nothing decoded. It mirrors, for the
installed transformers (5.24), what the *loaded* processor does, read into a `VideoSpec`:

* frame sampling: `Qwen2VLVideoProcessor.sample_frames` (Qwen2-VL, Qwen2.5-VL: frames = duration × fps,
  clamped to [min_frames, max_frames] and the clip, floored to a multiple of temporal_patch_size, picked
  by a float32 `torch.arange`) or `Qwen3VLVideoProcessor.sample_frames` (int(duration × fps) clamped, no
  temporal rounding, picked by `np.linspace(...).round()`, so indices can repeat in short clips);
* resize: Qwen2/2.5-VL bound each frame by `size` (the image `smart_resize`); Qwen3-VL bounds the whole
  clip (`size` counts frames × height × width, with its own video `smart_resize`). `cap_pixels_per_frame`
  (qwen-vl-utils' per-frame cap, off unless the processor config turns it on in 5.24) is applied exactly
  when the loaded processor has it on;
* grid: t = ceil(frames / temporal_patch_size) (the processor repeats the last frame to fill a patch),
  tokens = t·h·w / merge_size²;
* Qwen2.5-VL's `second_per_grid_ts` = temporal_patch_size / sampled fps, which M-RoPE multiplies by the
  config's `tokens_per_second`; Qwen3-VL's prompt text: one `<T seconds>` timestamp (mean of the temporal
  patch's first and last frame times, one decimal) plus its own `<|vision_start|>`/`<|vision_end|>` pair
  per temporal patch around that patch's tokens.

Frame sampling is the family's own rule even where the processor config says `do_sample_frames: false`
(the Qwen2/2.5-VL checkpoints): that processor would keep *every* frame of a decoded clip, so vlmtune
samples with the family's rule at `DEFAULT_VIDEO_FPS` (or the configured video_fps) and hands the
processor exactly those frames with `do_sample_frames=False` (see docs/video.md). Property-tested against
the real processors in tests/models/test_video_grid.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from .families import FAMILIES
from .grid import ImageSizeError, check_aspect
from .grid import smart_resize as image_smart_resize

# qwen-vl-utils' FPS and LLaMA-Factory's video_fps default: used where the processor has no fps of its own.
DEFAULT_VIDEO_FPS = 2.0

# transformers' Qwen3VLProcessor falls back to this frame rate when a clip's metadata has none.
FALLBACK_CLIP_FPS = 24.0

QWEN2_RULE = "qwen2_vl"  # Qwen2VLVideoProcessor (Qwen2-VL and Qwen2.5-VL)
QWEN3_RULE = "qwen3_vl"  # Qwen3VLVideoProcessor


class VideoSampleError(ValueError):
    """The processor would reject this clip (no frame to sample, too few frames, degenerate size)."""


@dataclass(frozen=True)
class VideoSpec:
    """The video settings of a loaded processor (and config): everything the arithmetic needs.

    `min_pixels` / `max_pixels` are the video processor's `size` bounds as that processor reads them:
    per frame for Qwen2/2.5-VL, for the whole sampled clip for Qwen3-VL. `fps` is the sampling rate
    (the processor's own, else DEFAULT_VIDEO_FPS); `num_frames` a fixed frame count from the processor
    config (mutually exclusive with fps there). `processor_samples` records the config's do_sample_frames,
    for reports: the arithmetic always samples (module docstring).
    """

    model_type: str
    rule: str
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_pixels: int
    min_frames: int
    max_frames: int
    fps: float | None
    num_frames: int | None
    processor_samples: bool
    cap_pixels_per_frame: bool
    max_video_tokens: int
    tokens_per_second: float | None = None
    # Qwen3-VL only: the config's per-frame video_min_pixels / video_max_pixels, turned into the processor's
    # per-clip bounds for each clip by `for_clip` (× its sampled frames)
    frame_min_pixels: int | None = None
    frame_max_pixels: int | None = None

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def second_per_grid(self) -> bool:
        """Whether the model reads `second_per_grid_ts` (Qwen2.5-VL's absolute-time M-RoPE)."""
        return self.model_type in FAMILIES and FAMILIES[self.model_type].video_absolute_time

    @property
    def timestamps(self) -> bool:
        """Whether the processor writes a `<T seconds>` text before each temporal patch (Qwen3-VL)."""
        return self.rule == QWEN3_RULE

    def with_overrides(
        self,
        fps: float | None = None,
        max_frames: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> "VideoSpec":
        """This spec with other processor settings (pixel bounds as the processor reads its `size`)."""
        changes: dict = {}
        if fps is not None:
            changes.update(fps=float(fps), num_frames=None)
        if max_frames is not None:
            changes["max_frames"] = int(max_frames)
        if min_pixels is not None:
            changes["min_pixels"] = int(min_pixels)
        if max_pixels is not None:
            changes["max_pixels"] = int(max_pixels)
        return replace(self, **changes)

    def with_config(
        self,
        video_fps: float | None = None,
        video_maxlen: int | None = None,
        video_min_pixels: int | None = None,
        video_max_pixels: int | None = None,
    ) -> "VideoSpec":
        """This spec under the config's video_fps / video_maxlen / video_min_pixels / video_max_pixels.

        The pixel keys are per frame, as in LLaMA-Factory. Qwen2/2.5-VL's processor reads its bounds per frame,
        so they replace them; Qwen3-VL's reads them for the whole sampled clip, so they are kept aside and
        applied per clip by `for_clip` (frames × per-frame bound)."""
        spec = self.with_overrides(fps=video_fps, max_frames=video_maxlen)
        if self.rule != QWEN3_RULE:
            return spec.with_overrides(min_pixels=video_min_pixels, max_pixels=video_max_pixels)
        return replace(spec, frame_min_pixels=None if video_min_pixels is None else int(video_min_pixels),
                       frame_max_pixels=None if video_max_pixels is None else int(video_max_pixels))

    def for_clip(self, total_frames: int, clip_fps: float) -> "VideoSpec":
        """The spec with the processor's bounds this clip is planned (and collated) with: the per-frame
        config bounds of a Qwen3-VL spec become its clip's bounds (× the frames sampled from it)."""
        if self.frame_min_pixels is None and self.frame_max_pixels is None:
            return self
        n = len(sample_indices(total_frames, clip_fps, self))
        lo, hi = self.min_pixels, self.max_pixels
        if self.frame_max_pixels is not None:
            hi = min(hi, self.frame_max_pixels * n)
        if self.frame_min_pixels is not None:
            lo = self.frame_min_pixels * n
        return replace(self, min_pixels=min(lo, hi), max_pixels=hi, frame_min_pixels=None, frame_max_pixels=None)

    def plan(self, total_frames: int, clip_fps: float, height: int, width: int) -> "VideoGrid":
        return plan_video(total_frames, clip_fps, height, width, self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_processor(cls, processor, config=None) -> "VideoSpec":
        """Read the settings from a loaded processor (its `video_processor`) and, for M-RoPE, the config."""
        vp = getattr(processor, "video_processor", None)
        # by class name (the class or a subclass), so that the settings read from the checkpoint's files
        # (models/checkpoint.py) are recognised without importing transformers
        names = [n for c in type(vp).__mro__ for n in (c.__name__, c.__name__.removesuffix("Fast"))]
        names.insert(0, getattr(vp, "type_name", ""))
        if "Qwen3VLVideoProcessor" in names:
            rule = QWEN3_RULE
        elif "Qwen2VLVideoProcessor" in names:
            rule = QWEN2_RULE
        else:
            raise ValueError(
                f"the processor's video_processor is {type(vp).__name__}; vlmtune accounts for videos of "
                "Qwen2VLVideoProcessor and Qwen3VLVideoProcessor only"
            )
        model_type = getattr(config, "model_type", None) if config is not None else None
        if model_type is None:
            model_type = _model_type_of(processor, rule)
        size = vp.size if isinstance(vp.size, dict) else {k: getattr(vp.size, k, None) for k in ("shortest_edge", "longest_edge")}
        fps = getattr(vp, "fps", None)
        num_frames = getattr(vp, "num_frames", None)
        if fps is None and num_frames is None:
            fps = DEFAULT_VIDEO_FPS
        vision_cfg = getattr(config, "vision_config", None) if config is not None else None
        tps = getattr(vision_cfg, "tokens_per_second", None)
        return cls(
            model_type=model_type,
            rule=rule,
            patch_size=int(vp.patch_size),
            merge_size=int(vp.merge_size),
            temporal_patch_size=int(vp.temporal_patch_size),
            min_pixels=int(size["shortest_edge"]),
            max_pixels=int(size["longest_edge"]),
            min_frames=int(vp.min_frames),
            max_frames=int(vp.max_frames),
            fps=None if fps is None else float(fps),
            num_frames=None if num_frames is None else int(num_frames),
            processor_samples=bool(getattr(vp, "do_sample_frames", False)),
            # transformers 5.24 treats an unset cap as off (and warns); the collator passes it explicitly
            cap_pixels_per_frame=bool(getattr(vp, "cap_pixels_per_frame", None)),
            max_video_tokens=int(vp.max_video_tokens),
            tokens_per_second=None if tps is None else float(tps),
        )


def _model_type_of(processor, rule: str) -> str:
    name = type(processor).__name__
    if name.startswith("Qwen2_5_VL"):
        return "qwen2_5_vl"
    return "qwen3_vl" if rule == QWEN3_RULE else "qwen2_vl"


@dataclass(frozen=True)
class VideoGrid:
    """What the processor makes of one clip: the frames it samples, its resized size, grid and tokens."""

    indices: tuple[int, ...]
    height: int
    width: int
    t: int
    h: int
    w: int
    tokens: int
    second_per_grid: float | None = None
    timestamps: tuple[float, ...] | None = None

    @property
    def frames(self) -> int:
        """Frames sampled from the clip (before the processor pads them to whole temporal patches)."""
        return len(self.indices)

    @property
    def thw(self) -> list[int]:
        return [self.t, self.h, self.w]

    @property
    def tokens_per_patch(self) -> int:
        """`<|video_pad|>` tokens per temporal patch (h·w / merge²)."""
        return self.tokens // self.t

    def timestamp_texts(self) -> list[str]:
        """Qwen3-VL's per-patch timestamp strings, exactly as its processor formats them."""
        return [f"<{t:.1f} seconds>" for t in (self.timestamps or ())]

    def replacement(self, video_token: str, vision_start: str, vision_end: str) -> str:
        """The text the processor puts in place of the prompt's one `video_token` for this clip."""
        if self.timestamps is None:
            return video_token * self.tokens
        run = vision_start + video_token * self.tokens_per_patch + vision_end
        return "".join(ts + run for ts in self.timestamp_texts())

    def prompt_tokens(self, count_text=None) -> int:
        """Tokens this clip adds where the compact prompt has one `video_token` (that one included).

        `count_text(s) -> int` counts the tokens of a plain string (the tokenizer without special tokens);
        it is needed for Qwen3-VL's timestamps only. Each timestamp sits between special tokens (the
        template's `<|vision_start|>` or the previous patch's `<|vision_end|>`, then its own
        `<|vision_start|>`), and special tokens split the tokenizer's input, so it is counted on its own.
        """
        if self.timestamps is None:
            return self.tokens
        if count_text is None:
            raise ValueError("Qwen3-VL video prompts have timestamp text: pass count_text to count its tokens")
        return self.tokens + 2 * self.t + sum(count_text(ts) for ts in self.timestamp_texts())


def sample_indices(total_frames: int, clip_fps: float, spec: VideoSpec) -> tuple[int, ...]:
    """The frame indices the family's `sample_frames` picks from a clip of `total_frames` at `clip_fps`."""
    if total_frames < 1:
        raise VideoSampleError(f"the clip has {total_frames} frames")
    if spec.fps is not None and spec.num_frames is not None:
        raise VideoSampleError("the video processor sets both fps and num_frames; they are mutually exclusive")
    if spec.rule == QWEN3_RULE:
        return _qwen3_indices(total_frames, clip_fps, spec)
    return _qwen2_indices(total_frames, clip_fps, spec)


def _qwen2_indices(total: int, clip_fps: float, spec: VideoSpec) -> tuple[int, ...]:
    tps = spec.temporal_patch_size
    n: float | int | None
    if spec.num_frames is not None:
        n = round(spec.num_frames / tps) * tps
    elif spec.fps is not None:
        cap = math.floor(min(spec.max_frames, total) / tps) * tps
        n = total / clip_fps * spec.fps
        n = min(max(n, spec.min_frames), cap, total)
        n = math.floor(n / tps) * tps
    else:
        return tuple(range(total))
    if n > total:
        raise VideoSampleError(f"the processor would sample {n} frames from a clip of {total}")
    if n <= 0 and total < tps:
        # the processor's own sampler divides by zero here; unsampled (its do_sample_frames=False default)
        # it keeps the frames and pads them to one patch, which is what vlmtune hands it
        return tuple(range(total))
    if n <= 0:
        raise VideoSampleError(
            f"max_frames={spec.max_frames} is less than one temporal patch of {tps} frames (the processor's "
            "sampler fails on it); raise video_maxlen"
        )
    indices = float32_arange_ints(total, total / n)
    if indices[-1] >= total:  # the arange's rounding can add a step past the end: the processor's own sampler fails
        raise VideoSampleError(
            f"the processor's sampler would pick frame {indices[-1]} of a clip of {total} frames (a rounding edge "
            f"of its arange for {n} frames); change video_fps or video_maxlen by one step"
        )
    return indices


def float32_arange_ints(end: int, step: float) -> tuple[int, ...]:
    """`torch.arange(0, end, step).int()` (float32), as the Qwen2-VL processor picks frames, without torch.

    torch computes each value in float32, partly in SIMD lanes (base + lane * step), so its last bits can differ
    from the exact product. They cannot change the truncation when every product is exact in float32, or when
    no value lies within a few float32 steps of an integer; only the rare remaining case asks torch itself
    (tests/models/test_video_grid.py compares with torch over many steps)."""
    import numpy as np

    size = math.ceil(end / step)  # torch sizes a float arange in double
    exact = [i * step for i in range(size)]
    as32 = np.asarray(exact, dtype=np.float32)
    if float(np.float32(step)) == step and all(float(a) == e for a, e in zip(as32, exact)):
        return tuple(int(e) for e in exact)
    values = np.asarray(exact)
    margin = 8 * np.spacing(np.maximum(np.abs(values), 1).astype(np.float32)).astype(np.float64)
    if bool(np.all(np.abs(values[1:] - np.round(values[1:])) > margin[1:])):
        return tuple(int(e) for e in exact)
    import torch  # a value within rounding of an integer: only torch's own arithmetic gives its answer

    return tuple(int(i) for i in torch.arange(0, end, step).int().tolist())


def _qwen3_indices(total: int, clip_fps: float, spec: VideoSpec) -> tuple[int, ...]:
    import numpy as np

    if spec.num_frames is not None:
        n = spec.num_frames
    elif spec.fps is not None:
        n = int(total / clip_fps * spec.fps)
        n = min(max(n, spec.min_frames), spec.max_frames, total)
    else:
        n = min(max(total, spec.min_frames), spec.max_frames)
    return tuple(int(i) for i in np.linspace(0, total - 1, n).round().astype(int).tolist())


def plan_video(total_frames: int, clip_fps: float, height: int, width: int, spec: VideoSpec) -> VideoGrid:
    """Indices, grid and tokens of a clip of `total_frames` frames at `clip_fps`, frames `height` × `width`
    as decoded (rotation applied)."""
    if not clip_fps or clip_fps <= 0:
        raise VideoSampleError(f"the clip has no usable frame rate ({clip_fps!r})")
    indices = sample_indices(total_frames, clip_fps, spec)
    n = len(indices)
    if spec.rule == QWEN3_RULE and n < spec.temporal_patch_size:  # Qwen3-VL's resize raises on it
        raise VideoSampleError(
            f"the processor would sample {n} frame(s) from a clip of {total_frames}; Qwen3-VL needs at least "
            f"{spec.temporal_patch_size} (one temporal patch)"
        )
    try:
        if spec.rule == QWEN3_RULE:
            rh, rw = _qwen3_resize(n, height, width, spec)
        else:
            rh, rw = image_smart_resize(height, width, spec.factor, spec.min_pixels, _qwen2_max_pixels(n, spec))
    except ImageSizeError as e:
        raise VideoSampleError(str(e).replace("image", "video frame")) from None
    tps = spec.temporal_patch_size
    t = -(-n // tps)
    gh, gw = rh // spec.patch_size, rw // spec.patch_size
    tokens = t * gh * gw // (spec.merge_size * spec.merge_size)
    second = None
    if spec.second_per_grid:
        sampled_fps = n / total_frames * clip_fps  # transformers' VideoMetadata.sampled_fps
        second = tps / sampled_fps
    stamps = _timestamps(indices, clip_fps, tps) if spec.timestamps else None
    return VideoGrid(
        indices=indices, height=rh, width=rw, t=t, h=gh, w=gw, tokens=tokens, second_per_grid=second, timestamps=stamps
    )


def _qwen2_max_pixels(n: int, spec: VideoSpec) -> int:
    if not spec.cap_pixels_per_frame:
        return spec.max_pixels
    total_pixels = int(spec.max_video_tokens * spec.factor * spec.factor * 0.9)
    return max(min(spec.max_pixels, total_pixels * spec.temporal_patch_size // n), int(spec.min_pixels * 1.05))


def _qwen3_resize(n: int, height: int, width: int, spec: VideoSpec) -> tuple[int, int]:
    """Qwen3-VL's video smart_resize: the pixel bounds count every sampled frame."""
    factor, tf = spec.factor, spec.temporal_patch_size
    max_pixels = spec.max_pixels
    if spec.cap_pixels_per_frame:
        per_frame = max(min(spec.max_video_tokens * factor * factor, spec.max_pixels // n), int(spec.min_pixels * 1.05))
        max_pixels = per_frame * n
    if height <= 0 or width <= 0:
        raise ImageSizeError(f"image has a zero size ({width}x{height})")
    if height < factor or width < factor:  # the processor scales tiny frames up first
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    check_aspect(height, width)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(n / tf) * tf
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((n * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < spec.min_pixels:
        beta = math.sqrt(spec.min_pixels / (n * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _timestamps(indices: tuple[int, ...], clip_fps: float, tps: int) -> tuple[float, ...]:
    """Qwen3-VL's per-patch times: the mean of each temporal patch's first and last frame time."""
    idx = list(indices)
    if len(idx) % tps:
        idx.extend(idx[-1] for _ in range(tps - len(idx) % tps))
    secs = [i / clip_fps for i in idx]
    return tuple((secs[i] + secs[i + tps - 1]) / 2 for i in range(0, len(secs), tps))


def shrink_video(
    total_frames: int, clip_fps: float, height: int, width: int, spec: VideoSpec, max_tokens: int, count_text=None,
    floor: bool = False,
) -> tuple[VideoSpec, VideoGrid] | None:
    """The largest plan whose prompt tokens are ≤ max_tokens: the pixel budget is lowered first (never
    below spec.min_pixels), then the sampled frame count (max_frames, never below spec.min_frames); for a
    frame count, the largest pixel budget that fits. None when even the smallest does not fit.
    `floor=True`: the smallest plan there is, whatever max_tokens (None only if no plan can be made).

    Tokens never grow as max_pixels shrinks (smart_resize's sides only floor further), so it bisects.
    """

    if count_text is not None:  # timestamps repeat across the candidate plans: count each string once
        seen: dict[str, int] = {}
        counter = count_text
        count_text = lambda text: seen[text] if text in seen else seen.setdefault(text, counter(text))  # noqa: E731

    def cost(s: VideoSpec) -> int:
        return plan_video(total_frames, clip_fps, height, width, s).prompt_tokens(count_text)

    def best_pixels(s: VideoSpec) -> VideoSpec | None:
        lo, hi = s.min_pixels, s.max_pixels
        if cost(replace(s, max_pixels=lo)) > max_tokens:
            return None
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if cost(replace(s, max_pixels=mid)) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        return replace(s, max_pixels=lo)

    frames_now = len(sample_indices(total_frames, clip_fps, spec))
    floor_frames = min(spec.min_frames, frames_now)
    if floor:
        smallest = None
        for max_frames in range(frames_now, max(floor_frames, 1) - 1, -1):
            s = replace(spec, max_frames=max_frames, max_pixels=spec.min_pixels)
            try:
                smallest = (s, plan_video(total_frames, clip_fps, height, width, s))
            except VideoSampleError:  # a rounding edge of the sampler, or too few frames: try fewer
                continue
        return smallest
    step = spec.temporal_patch_size if spec.rule == QWEN2_RULE else 1
    for max_frames in range(frames_now, max(floor_frames, 1) - 1, -step):
        if max_frames < floor_frames:
            break
        s = replace(spec, max_frames=max_frames) if max_frames != frames_now else spec
        try:
            found = best_pixels(s)
        except VideoSampleError:  # this frame count hits the sampler's rounding edge: fewer frames may not
            continue
        if found is not None:
            return found, plan_video(total_frames, clip_fps, height, width, found)
    return None
