"""`inspect --per-sample` token counts for samples with 0–2 videos and 0–2 images (0–3 on the current
generation: Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE) == len(input_ids) from the real processor of each family, given the whole decoded clips and left to sample the frames itself.

The clips are real MP4 files (PyAV), read header-only by vlmtune; the processor gets every decoded frame and
its own `do_sample_frames=True` at the same fps, so the frame sampling, the resize, the grid, Qwen3-VL's
timestamps and the chat template are all checked against transformers, not against our own plan.
"""

from __future__ import annotations

import itertools
import json
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image
from transformers.video_utils import VideoMetadata

from clips import write_clip
from vlmtune.commands import cli
from vlmtune.data.media.video import decode_frames, read_facts
from vlmtune.models.load import load_spec

# (frames, fps, width, height): short and long, slow and fast, landscape and portrait, odd sizes
CLIPS = [(12, Fraction(6), 64, 48), (30, Fraction(25), 40, 72), (9, Fraction(3), 90, 34), (50, Fraction(30000, 1001), 56, 56)]
IMAGES = [(50, 40), (120, 33), (28, 90)]


def _write_dataset(root, max_images: int):
    for k, (n, rate, w, h) in enumerate(CLIPS):
        write_clip(root / f"c{k}.mp4", n, w, h, rate=rate)
    for k, (w, h) in enumerate(IMAGES):
        Image.new("RGB", (w, h), (40 * k, 120, 200)).save(root / f"i{k}.png")
    records = []
    for s, (nv, ni) in enumerate(itertools.product(range(3), range(max_images + 1))):
        vids = [f"c{(s + j) % len(CLIPS)}.mp4" for j in range(nv)]
        imgs = [f"i{(s + j) % len(IMAGES)}.png" for j in range(ni)]
        text = "".join("<image>" for _ in imgs) + "Describe" + "".join(f" clip {j}: <video>" for j in range(nv))
        records.append({"messages": [{"role": "user", "content": text + " please."},
                                     {"role": "assistant", "content": f"answer {s}"}], "images": imgs, "videos": vids})
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return root, records


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return _write_dataset(tmp_path_factory.mktemp("videos"), 2)


@pytest.fixture(scope="module")
def dataset3(tmp_path_factory):
    return _write_dataset(tmp_path_factory.mktemp("videos3"), 3)


def processor_length(processor, fps, root, record) -> int:
    content = []
    for piece in record["messages"][0]["content"].replace("<image>", "\0i\0").replace("<video>", "\0v\0").split("\0"):
        if piece == "i":
            content.append({"type": "image"})
        elif piece == "v":
            content.append({"type": "video"})
        elif piece:
            content.append({"type": "text", "text": piece})
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": [
        {"type": "text", "text": record["messages"][1]["content"]}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    kwargs = {}
    if record["images"]:
        kwargs["images"] = [Image.open(root / p).convert("RGB") for p in record["images"]]
    if record["videos"]:
        clips, metadata = [], []
        for p in record["videos"]:
            facts = read_facts(str(root / p))
            clips.append(np.stack(decode_frames(str(root / p), range(facts.frames))))
            metadata.append(VideoMetadata(total_num_frames=facts.frames, fps=facts.fps, width=facts.width,
                                          height=facts.height, duration=facts.duration))
        kwargs.update(videos=clips, video_metadata=metadata, do_sample_frames=True, fps=fps,
                      input_data_format="channels_last")
    return len(processor(text=[text], **kwargs)["input_ids"][0])


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_inspect_per_sample_equals_processor_input_ids(tmp_path, tiny_ckpt, dataset, arch):
    _check_family(tmp_path, tiny_ckpt, dataset, arch)


@pytest.mark.parametrize("arch", ["qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"])
def test_inspect_per_sample_equals_processor_input_ids_current_generation(tmp_path, tiny_ckpt, dataset3, arch):
    # Qwen3.5's template also writes the (empty) thinking block of each answer: counted like any text
    _check_family(tmp_path, tiny_ckpt, dataset3, arch)


def _check_family(tmp_path, tiny_ckpt, dataset, arch):
    root, records = dataset
    ckpt = str(tiny_ckpt(arch))
    out = tmp_path / "per_sample.jsonl"
    assert cli.main(["inspect", "--model", ckpt, "--data", str(root / "data.jsonl"), "--per-sample", str(out)]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(got) == len(records) == len({(len(r["images"]), len(r["videos"])) for r in records})
    loaded = load_spec(ckpt)
    want = [processor_length(loaded.processor, loaded.video.fps, root, r) for r in records]
    assert [g["tokens"] for g in got] == want
    assert [g["videos"] for g in got] == [len(r["videos"]) for r in records]
    assert [g["images"] for g in got] == [len(r["images"]) for r in records]
    assert all(g["tokens"] == g["text_tokens"] + g["image_tokens"] + g["video_tokens"] for g in got)
