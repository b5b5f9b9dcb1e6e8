"""Small file writers for the data tests (images, JSON, JSONL, crafted PNG headers)."""

from __future__ import annotations

import json
import os
import struct
import zlib

import pytest
from PIL import Image


def _write_image(path, width: int, height: int, color=(120, 30, 200), fmt: str | None = None) -> str:
    path = str(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.new("RGB", (width, height), color).save(path, format=fmt)
    return path


def _write_png_header(path, width: int, height: int) -> str:
    """A PNG whose header claims width x height, with almost no pixel data (never decode it)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    return str(path)


def _write_jsonl(path, records, raw_lines: dict[int, bytes] | None = None) -> str:
    """One record per line; `raw_lines` {1-based line: bytes} inserts raw lines at those positions."""
    raw_lines = dict(raw_lines or {})
    lines: list[bytes] = []
    it = iter(records)
    n = len(records) + len(raw_lines)
    for lineno in range(1, n + 1):
        if lineno in raw_lines:
            lines.append(raw_lines[lineno])
        else:
            lines.append(json.dumps(next(it)).encode())
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return str(path)


def _write_json(path, value) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f)
    return str(path)


@pytest.fixture
def write_image():
    return _write_image


@pytest.fixture
def write_png_header():
    return _write_png_header


@pytest.fixture
def write_jsonl():
    return _write_jsonl


@pytest.fixture
def write_json():
    return _write_json
