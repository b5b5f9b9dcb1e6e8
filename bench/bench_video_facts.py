"""video_accounting_speedup: header facts + arithmetic (data/media/video.py, models/video_grid.py) vs decoding.

The data: a few clips of 6-12 s at 25-30 fps, 320x240 to 640x480, mpeg4 in MP4 and VP8 in WebM, with moving
noise so that decoding costs what it costs; written once and cached.

* vlmtune: `read_facts` (container header, the video packets counted by demuxing, the first frame decoded
  for its rotation)
  and `plan_video` with the tiny Qwen2-VL checkpoint's video processor;
* the baseline: what learning the grid costs without header accounting: decode the clip (PyAV, every
  frame, as transformers' own pyav reader does) and run the real video processor on it with the same
  sampling (`do_sample_frames=True`, fps 2).

Both sides' grids are checked to be equal. The ratio is CPU time per clip (`time.process_time`, torch on
one thread, the fastest of the repeats): the work each side does, which other jobs barely move.
"""

from __future__ import annotations

import time
from fractions import Fraction
from pathlib import Path

from _common import cached_dir, tiny_checkpoint

CLIPS = [  # (name, seconds, fps, width, height)
    ("a.mp4", 6, 30, 320, 240),
    ("b.webm", 8, 25, 480, 360),
    ("c.mp4", 12, 30, 640, 480),
    ("d.webm", 10, 30, 640, 360),
]


def _write(path: Path, seconds: int, fps: int, width: int, height: int) -> None:
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (height + 64, width + 64, 3), dtype=np.uint8)
    out = av.open(str(path), "w")
    s = out.add_stream("mpeg4" if path.suffix == ".mp4" else "libvpx", rate=Fraction(fps))
    s.width, s.height, s.pix_fmt = width, height, "yuv420p"
    for i in range(seconds * fps):
        y, x = i % 64, (2 * i) % 64
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(noise[y : y + height, x : x + width]), format="rgb24")
        for p in s.encode(frame):
            out.mux(p)
    for p in s.encode():
        out.mux(p)
    out.close()


def _clips() -> list[Path]:
    def build(d: Path) -> None:
        for name, seconds, fps, w, h in CLIPS:
            _write(d / name, seconds, fps, w, h)

    d = cached_dir("video-clips-v1", build)
    return [d / name for name, *_ in CLIPS]


def _cpu_best(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        t = time.process_time()
        result = fn()
        best = min(best, time.process_time() - t)
    return best, result


def run(quick: bool = False) -> dict:
    import av
    import numpy as np
    import torch
    from transformers import AutoProcessor
    from transformers.video_utils import VideoMetadata

    from vlmtune.data.media.video import read_facts
    from vlmtune.models.video_grid import VideoSpec, plan_video

    torch.set_num_threads(1)
    processor = AutoProcessor.from_pretrained(tiny_checkpoint("qwen2_vl"))
    spec = VideoSpec.from_processor(processor)
    vp = processor.video_processor
    clips = _clips()[:2] if quick else _clips()
    repeats = 2 if quick else 3

    def ours(path):
        f = read_facts(str(path))
        return plan_video(f.frames, f.fps, f.height, f.width, spec).thw

    def theirs(path):
        with av.open(str(path)) as c:
            stream = c.streams.video[0]
            frames = np.stack([fr.to_ndarray(format="rgb24") for fr in c.decode(stream)])
            fps = float(stream.average_rate)
        md = VideoMetadata(total_num_frames=len(frames), fps=fps)
        out = vp(videos=[frames], video_metadata=[md], do_sample_frames=True, fps=spec.fps,
                 cap_pixels_per_frame=False, input_data_format="channels_last")
        return out["video_grid_thw"][0].tolist()

    ours_s = theirs_s = 0.0
    for path in clips:
        a, ga = _cpu_best(lambda: ours(path), repeats)
        b, gb = _cpu_best(lambda: theirs(path), repeats)
        assert ga == gb, (path.name, ga, gb)
        ours_s += a
        theirs_s += b
    n = len(clips)
    return {
        "video_accounting_speedup": round(theirs_s / ours_s, 1),
        "video_vlmtune_ms_per_clip": round(1000 * ours_s / n, 2),
        "video_decode_and_process_ms_per_clip": round(1000 * theirs_s / n, 1),
        "video_clips": n,
    }


if __name__ == "__main__":
    for k, v in run().items():
        print(f"{k}: {v}")
