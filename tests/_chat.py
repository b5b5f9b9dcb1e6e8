"""Chat messages as the real processors take them, for tests that count tokens against `apply_chat_template`."""

from __future__ import annotations


def hf_content(text: str) -> list[dict]:
    """The sharegpt text as HF chat parts: `<image>` placeholders become image parts."""
    parts: list[dict] = []
    for i, piece in enumerate(text.split("<image>")):
        if i:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts
