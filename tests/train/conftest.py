"""Fixtures for the training tests: small sharegpt datasets of chosen modalities and run configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# Per kind of sample: (user turn, assistant turn, image sizes). Answers differ so that losses differ.
_SAMPLES = {
    "text": ("Say something about the sky.", "The sky is blue and there is one cloud.", []),
    "one": ("<image>What colour is the shape?", "The shape is {colour}.", [(56, 56)]),
    "one_big": ("<image>Describe this image in detail.", "A large {colour} square on a white background.",
                [(112, 84)]),
    "two": ("<image><image>Compare the two pictures.", "The first is {colour} and the second is brighter.",
            [(56, 84), (84, 56)]),
}
_COLOURS = [("red", (255, 0, 0)), ("green", (0, 200, 0)), ("blue", (0, 0, 255)), ("yellow", (250, 240, 0)),
            ("purple", (128, 0, 128)), ("orange", (255, 140, 0)), ("grey", (128, 128, 128))]


@pytest.fixture
def write_dataset(tmp_path, make_image):
    """`write_dataset(kinds, name="data") -> path of a sharegpt JSONL`: one sample per kind, in order.

    Kinds: "text" (no image), "one" (one small image), "one_big" (one larger image), "two" (two images).
    Images lie next to the JSONL, named relative to it.
    """

    def write(kinds: list[str], name: str = "data") -> str:
        folder = tmp_path / name
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, kind in enumerate(kinds):
            user, answer, sizes = _SAMPLES[kind]
            colour, rgb = _COLOURS[i % len(_COLOURS)]
            images = []
            for k, (w, h) in enumerate(sizes):
                shade = tuple(min(255, c + 40 * k) for c in rgb)
                images.append(make_image(folder / f"img{i}_{k}.png", w, h, shade).name)
            record = {"messages": [{"role": "user", "content": user},
                                   {"role": "assistant", "content": answer.format(colour=colour)}]}
            if images:
                record["images"] = images
            lines.append(json.dumps(record))
        path = folder / f"{name}.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return str(path)

    return write


@pytest.fixture
def base_cfg(tiny_ckpt):
    """`base_cfg(arch, dataset, output_dir, **keys) -> dict` of config keys for a short CPU run."""

    def make(arch: str, dataset: str, output_dir, **keys) -> dict:
        cfg = {
            "model_name_or_path": str(tiny_ckpt(arch)),
            "dataset": dataset,
            "output_dir": str(output_dir),
            "cutoff_len": 200,
            "per_device_train_batch_size": 1,
            "gradient_accumulation_steps": 1,
            "max_steps": 3,
            "logging_steps": 1,
            "save_steps": 1000,
            "group_by_length": False,
            "report_to": "none",
            "seed": 0,
        }
        cfg.update(keys)
        return cfg

    return make


@pytest.fixture
def make_config(base_cfg):
    """`make_config(arch, dataset, output_dir, **keys) -> Config` (validated like a YAML config)."""
    from vlmtune.config import load_config

    def make(arch: str, dataset: str, output_dir, **keys):
        return load_config(None, base=base_cfg(arch, dataset, output_dir, **keys))

    return make


@pytest.fixture
def out_dir(tmp_path) -> Path:
    return tmp_path / "out"
