"""Fixtures for the command tests: real video clips (PyAV), flat frames."""

from __future__ import annotations

from fractions import Fraction

import pytest


def write_clip(path, n: int, width: int, height: int, rate=Fraction(25)) -> str:
    """An MP4 (MPEG-4 part 2) of n flat frames, frame i at grey level 20·i mod 256."""
    import av
    import numpy as np

    out = av.open(str(path), "w")
    stream = out.add_stream("mpeg4", rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for i in range(n):
        frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), (20 * i) % 256, np.uint8), format="rgb24")
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    return str(path)


@pytest.fixture(scope="session")
def make_clip():
    """`make_clip(path, n, width, height, rate=25) -> str`: a real MP4 clip."""
    pytest.importorskip("av")
    return write_clip
