"""Real video clips for the tests, encoded with PyAV (mpeg4 in MP4 and Matroska, VP8 in WebM): one writer for
every test that needs a clip. Each flat frame has its own grey level, so a decoded frame can be told apart from
its neighbours despite lossy coding."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np

CONTAINERS = {"mp4": "mpeg4", "mkv": "mpeg4", "webm": "libvpx"}


def level(i: int) -> int:
    """The grey level of frame i: 24 apart, so lossy coding cannot make two frames look alike."""
    return 16 + (i * 24) % 224


def write_clip(path, n: int, width: int, height: int, rate=Fraction(25), rotation: int = 0, pts_ms=None, marker=False,
               moving: bool = False):
    """Encode n flat frames (frame i at level(i)); `pts_ms` gives each frame's time in ms (variable rate);
    `marker` paints the top-left quadrant white (to see which way a rotation turns); `moving` draws a
    diagonal colour gradient that shifts every frame instead (pixels that differ across and within frames)."""
    codec = CONTAINERS[str(path).rsplit(".", 1)[1]]
    out = av.open(str(path), "w")
    s = out.add_stream(codec, rate=rate)
    s.width, s.height, s.pix_fmt = width, height, "yuv420p"
    if pts_ms is not None:
        s.codec_context.time_base = Fraction(1, 1000)
    if rotation:
        s.set_display_rotation(rotation)
    for i in range(n):
        a = _moving(i, width, height) if moving else np.full((height, width, 3), level(i), np.uint8)
        if marker:
            a[: height // 2, : width // 2] = 255
        frame = av.VideoFrame.from_ndarray(a, format="rgb24")
        if pts_ms is not None:
            frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
        for p in s.encode(frame):
            out.mux(p)
    for p in s.encode():
        out.mux(p)
    out.close()
    return str(path)


def _moving(i: int, width: int, height: int):
    yy, xx = np.mgrid[0:height, 0:width]
    a = np.stack([(xx * 4 + i * 20) % 256, (yy * 4 + i * 9) % 256, np.full_like(xx, 16 * i % 256)], -1)
    return a.astype(np.uint8)
