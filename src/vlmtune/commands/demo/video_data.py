"""The video demo's data: short MP4 clips of one shape moving left, right, up or down, in LLaMA-Factory's
sharegpt format (`videos` lists and `<video>` placeholders), and held-out questions on clips never trained on.

Each clip is one shape (circle, square or triangle) of one colour on a plain pale background, moving in a
straight line at a constant speed. Everything but the direction is drawn independently of it: the shape, its
colour, its size, its speed, the background and its *start position*, uniform over every place where the
whole shape fits in the frame. So the first frame carries no information about the direction (by
construction: its distribution is the same for all four answers), and the answer needs motion. The shape may
leave the frame later in the clip, as things do in real footage; it is still partly visible in the frame
after the first (its speed per frame is below half its size).

The clips are real MP4 files (H.264 in yuv420p through PyAV's bundled FFmpeg, MPEG-4 part 2 where that
FFmpeg has no libx264 encoder), so that training and evaluation go through the real decoder.
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

from .data import COLOURS, SHAPES, write_json as _write_json, write_sharegpt

DIRECTIONS = ("left", "right", "up", "down")
# (dx, dy) per frame, image coordinates (y grows downwards)
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

QUESTION = "Which way does the shape move? Answer left, right, up or down."
# Training also asks in other words; the held-out questions ask exactly QUESTION.
PARAPHRASES = (
    QUESTION,
    "In which direction is the shape moving: left, right, up or down?",
    "Where does the shape go? Answer left, right, up or down.",
)

VIDEO_DATASET_NAME = "demo_motion"

FRAMES = 8
# With 8 frames at 4 fps (2 s), vlmtune's sampling (the processor's fps, else 2.0) picks frames 0, 2, 4, 6 of
# the tiny Qwen2-VL: two temporal patches of two frames each. The decoder must find exactly those frames.
FPS = 4
# The side of a frame in merged patches (28 px each for Qwen2/2.5-VL, 32 px for Qwen3-VL): 4 -> 112 x 112 px,
# 16 tokens per temporal patch, 32 per clip.
SIDE_PATCHES = 4
# Shape size and speed as fractions of the frame's side. The speed per frame is at most a quarter of the
# size, so the shape is still (partly) in the first two sampled frames (0 and 2) wherever it started.
# Chosen by experiment (tiny Qwen2-VL, full fine-tuning, batch 8, 1200 clips, held-out accuracy on 80 clips, in a
# plain training loop on the processor's batches, as the collator builds them, written before the data path took
# videos and removed once the recipe trained them). On 56 px frames (8 tokens a clip) learning is late, sudden and unreliable:
# shapes of 0.25-0.35 of the side stayed at chance after 2400 steps (the model learnt only the answers' prior); with
# 0.4-0.55, one data seed reached 100% after 2400 steps, others stayed at chance after 2400-4000 steps at lr 2e-3 or
# 4e-3, a frozen vision tower or extra colour questions; batch 16 learnt one seed of three. Yet a linear probe on
# the untrained vision tower's output read the direction at 96%: the language model's read-out is the slow part. On
# 112 px frames (32 tokens) with 0.4-0.55, lr 2e-3, a 2400-step schedule: seeds 1 and 2 were at 56% and 95% after
# 600 steps, 97.5% and 100% after 900, 100% from 1500 on. With 1500 steps (VIDEO_FULL): seed 3 100% (99% after 600),
# seed 4 81% (69% after 600, then flat), seed 5 79%; with 1200: seed 0 100%, seed 3 85%. Through the recipe
# (`vlmtune demo --video`, data and model seeded alike): seed 0 25% -> 100% and seed 1 31% -> 100%, each in ~135 s
# on 2 CPU cores (~12 steps/s).
SIZE_RANGE = (0.4, 0.55)
SPEED_RANGE = (0.06, 0.1)


@dataclass(frozen=True)
class VideoDemoSize:
    """How much data and training a video demo run gets."""

    train_clips: int
    eval_clips: int
    steps: int
    batch_size: int
    loader_workers: int


VIDEO_FULL = VideoDemoSize(train_clips=1200, eval_clips=80, steps=1500, batch_size=8, loader_workers=1)
VIDEO_QUICK = VideoDemoSize(train_clips=96, eval_clips=16, steps=60, batch_size=8, loader_workers=0)


@dataclass(frozen=True)
class Clip:
    """One rendered clip, as written; positions in pixels of the first frame's top-left corner."""

    path: str  # relative to the data folder
    direction: str
    shape: str
    colour: str
    size: float
    speed: float  # pixels per frame
    x0: float
    y0: float
    side: int
    background: tuple[int, int, int]
    fill: tuple[int, int, int]

    def position(self, k: int) -> tuple[float, float]:
        dx, dy = _STEP[self.direction]
        return self.x0 + dx * self.speed * k, self.y0 + dy * self.speed * k


def video_codec() -> str:
    """H.264 (libx264) when PyAV's FFmpeg can encode it, else MPEG-4 part 2; both decode everywhere."""
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def draw_scene(rng: random.Random, direction: str, shape: str, colour: str, side: int, path: str = "") -> Clip:
    """Everything about a clip but its direction, drawn from rng without looking at the direction."""
    size = rng.uniform(*SIZE_RANGE) * side
    speed = rng.uniform(*SPEED_RANGE) * side
    x0 = rng.uniform(0, side - size)
    y0 = rng.uniform(0, side - size)
    bg = rng.randint(215, 250)
    background = tuple(max(0, min(255, bg + rng.randint(-6, 6))) for _ in range(3))
    fill = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLOURS[colour])
    return Clip(path, direction, shape, colour, size, speed, x0, y0, side, background, fill)


def render_clip(clip: Clip, frames: int = FRAMES):
    """The clip's frames as one uint8 array (frames, side, side, 3), RGB."""
    import numpy as np
    from PIL import Image, ImageDraw

    out = []
    for k in range(frames):
        im = Image.new("RGB", (clip.side, clip.side), clip.background)
        x, y = clip.position(k)
        d = clip.size
        draw = ImageDraw.Draw(im)
        if clip.shape == "circle":
            draw.ellipse([x, y, x + d, y + d], fill=clip.fill)
        elif clip.shape == "square":
            draw.rectangle([x, y, x + d, y + d], fill=clip.fill)
        else:
            draw.polygon([(x + d / 2, y), (x, y + d), (x + d, y + d)], fill=clip.fill)
        out.append(np.asarray(im))
    return np.stack(out)


def write_mp4(path: str | os.PathLike, frames, fps: int = FPS, codec: str | None = None) -> str:
    """Encode RGB frames (n, h, w, 3) into an MP4 (yuv420p), deterministically: one encoder thread (x264's
    output depends on its thread count) and a fixed quality. x264's psychovisual tuning is off: with it (and
    adaptive quantisation and mb-tree), writing the same clips again in one process gave different bytes
    for ~15% of them, and different pixels for a few; without it three writes were byte-identical."""
    import av

    codec = codec or video_codec()
    n, h, w, _ = frames.shape
    out = av.open(str(path), "w")
    try:
        options = ({"crf": "20", "preset": "medium", "threads": "1", "x264-params": "psy=0:mbtree=0:aq-mode=0"}
                   if codec == "libx264" else {})
        s = out.add_stream(codec, rate=Fraction(fps), options=options)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.thread_count = 1
        for a in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    finally:
        out.close()
    return str(path)


def _clips(rng: random.Random, folder: Path, prefix: str, n: int, side: int, codec: str) -> list[Clip]:
    """n clips whose direction cycles through all four in shuffled blocks (balanced labels), shape and colour
    through every combination in their own shuffled order."""
    directions = list(DIRECTIONS)
    combos = [(s, c) for s in SHAPES for c in COLOURS]
    out = []
    for k in range(n):
        if k % len(directions) == 0:
            rng.shuffle(directions)
        if k % len(combos) == 0:
            rng.shuffle(combos)
        shape, colour = combos[k % len(combos)]
        name = f"{prefix}_{k:04d}.mp4"
        clip = draw_scene(rng, directions[k % len(directions)], shape, colour, side, f"videos/{name}")
        write_mp4(folder / name, render_clip(clip), FPS, codec)
        out.append(clip)
    return out


def training_records(rng: random.Random, clips: list[Clip]) -> list[dict]:
    """One single-turn question per clip, in one of the paraphrases."""
    records = []
    for c in clips:
        q = "<video>" + rng.choice(PARAPHRASES)
        records.append({
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": c.direction}],
            "videos": [c.path],
        })
    rng.shuffle(records)
    return records


def eval_questions(clips: list[Clip]) -> list[dict]:
    return [{"video": c.path, "question": QUESTION, "kind": "direction", "answer": c.direction} for c in clips]


def write_video_dataset(data_dir: str | os.PathLike, size: VideoDemoSize, seed: int, side: int = 112,
                        codec: str | None = None) -> dict:
    """Render and encode the clips; write the sharegpt dataset, dataset_info.json and eval.json.

    `side` is the frames' width and height in pixels (even: yuv420p halves the chroma planes). Returns the
    record count, the held-out questions, the codec and every clip's description (`clips`, for tests)."""
    if side % 2:
        raise ValueError(f"side={side}: yuv420p needs an even frame size")
    codec = codec or video_codec()
    data = Path(data_dir)
    videos = data / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"video-{seed}")
    train = _clips(rng, videos, "train", size.train_clips, side, codec)
    records = training_records(rng, train)
    # Its own stream, so that the held-out clips do not change what is trained on.
    held_out = _clips(random.Random(f"video-eval-{seed}"), videos, "eval", size.eval_clips, side, codec)
    write_sharegpt(data, VIDEO_DATASET_NAME, records, "videos")
    questions = eval_questions(held_out)
    _write_json(data / "eval.json", questions)
    return {
        "records": len(records),
        "eval_questions": questions,
        "codec": codec,
        "clips": {"train": [asdict(c) for c in train], "eval": [asdict(c) for c in held_out]},
    }
