"""Fixtures for the command tests: real video clips (PyAV), flat frames."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def make_clip():
    """`make_clip(path, n, width, height, rate=25) -> str`: a real MP4 clip."""
    pytest.importorskip("av")
    from clips import write_clip

    return write_clip
