"""pack_fill and packed_vs_padded_tokens_per_s on a skewed length mix.

Rows come from the real encoder on the tiny qwen2_vl checkpoint: 85% short samples (a short
question and answer, half with one small image) and 15% long ones (long text, 1-2 larger images),
the mix where padding wastes most. cutoff_len 1024.

* pack_fill: real tokens / tokens in the batches. Padded: batches of 8 in random order, each padded
  to its longest row. Packed: best-fit packing into cutoff_len rows (one row per batch).
* packed_vs_padded_tokens_per_s: real (non-pad) tokens per second of forward+backward+AdamW steps
  on the CPU over the same rows, padded batches vs packed rows; same model (the tiny architecture
  widened to hidden 256, see _medium_model), the same rows timed in full both ways.
"""

from __future__ import annotations

import random
import resource
import time

from _common import cached_dir, tiny_checkpoint

CUTOFF = 1024
BATCH = 8


def _images(root):
    from PIL import Image, ImageDraw

    for k, (w, h) in enumerate([(80, 80), (120, 90), (300, 300), (448, 336)]):
        im = Image.new("RGB", (w, h), (255, 255, 255))
        ImageDraw.Draw(im).ellipse([4, 4, w - 4, h - 4], fill=(40 * k, 200 - 40 * k, 120))
        im.save(root / f"im{k}.png")


def _rows(n: int, seed: int = 0, arch: str = "qwen2_vl"):
    from vlmtune.data.stages.encode import Encoder, emit
    from vlmtune.data.media.images import read_header
    from vlmtune.data.types import Conversation, ImagePart, Message, TextPart
    from vlmtune.models.load import load_spec

    model = tiny_checkpoint(arch)
    img_dir = cached_dir("pack-images-v1", _images)
    loaded = load_spec(str(model))
    paths = [str(img_dir / f"im{k}.png") for k in range(4)]
    headers = {p: read_header(p) for p in paths}
    words = "the red circle blue square green triangle picture shows a small large shape on white".split()
    rnd = random.Random(seed)
    convs = []
    for i in range(n):
        long = rnd.random() < 0.15
        text = " ".join(rnd.choice(words) for _ in range(rnd.randint(150, 400) if long else rnd.randint(3, 25)))
        parts = []
        if long:
            parts += [ImagePart(p, p) for p in rnd.sample(paths[2:], rnd.randint(1, 2))]
        elif rnd.random() < 0.5:
            parts.append(ImagePart(paths[rnd.randint(0, 1)], paths[rnd.randint(0, 1)]))
        answer = " ".join(rnd.choice(words) for _ in range(rnd.randint(2, 30)))
        convs.append(Conversation(str(i), f"bench:{i}", [Message("user", parts + [TextPart(text)]),
                                                          Message("assistant", [TextPart(answer)])]))
    enc = Encoder(loaded.processor, loaded.spec)
    rows = [emit(e, loaded.spec).to_dict() for e in enc.encode_many(convs, headers)]
    return model, loaded, [r for r in rows if len(r["input_ids"]) <= CUTOFF]


def _medium_model(path):
    """The tiny checkpoint's architecture widened (hidden 256, head_dim 64) so that the model's compute,
    which padding wastes, outweighs the per-batch overheads as it does at real scale."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    cfg = AutoConfig.from_pretrained(str(path))
    t = cfg.text_config
    t.hidden_size, t.intermediate_size, t.num_hidden_layers = 256, 768, 2
    t.num_attention_heads, t.num_key_value_heads = 4, 2
    t.head_dim = 64
    t.layer_types = ["full_attention"] * t.num_hidden_layers
    t.rope_parameters = {**t.rope_parameters, "mrope_section": [8, 12, 12]}
    cfg.vision_config.hidden_size = 256  # the merger's output feeds the language model
    if hasattr(cfg.vision_config, "out_hidden_size"):
        cfg.vision_config.out_hidden_size = 256
    return AutoModelForImageTextToText.from_config(cfg)


def train_seconds(model, batches, collate, clock=time.perf_counter) -> float:
    """`clock` seconds of forward + backward + AdamW steps over `batches` (bench_pack_hybrid passes CPU time)."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    start = clock()
    for rows in batches:
        model(**collate(rows)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return clock() - start


def train_like_vlmtune(model):
    """Training mode, no KV cache, and vlmtune's defaults: vision tower and projector frozen."""
    from vlmtune.models.load import component_of

    model.config.use_cache = False
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad = component_of(name) == "language_model"
    return model


def run(quick: bool) -> dict[str, float | str]:
    import torch
    from vlmtune.data.stages.collate import Collator
    from vlmtune.data.stages.pack import pack_rows

    torch.manual_seed(0)
    model_path, loaded, rows = _rows(400 if quick else 1200)
    rnd = random.Random(1)
    order = rows[:]
    rnd.shuffle(order)
    padded = [order[i : i + BATCH] for i in range(0, len(order), BATCH)]
    packed = [[p] for p in pack_rows(rows, CUTOFF)]
    real = sum(len(r["input_ids"]) for r in rows)
    fill_padded = real / sum(len(b) * max(len(r["input_ids"]) for r in b) for b in padded)
    fill_packed = real / (len(packed) * CUTOFF)

    model = train_like_vlmtune(_medium_model(model_path))
    collate = Collator(loaded.processor, loaded.spec, cutoff_len=CUTOFF)
    # The same rows both ways, timed in full: padded batches in random order vs best-fit packed rows.
    subset = order[: 48 if quick else 160]
    timed_padded = [subset[i : i + BATCH] for i in range(0, len(subset), BATCH)]
    timed_packed = [[p] for p in pack_rows(subset, CUTOFF)]
    train_seconds(model, timed_padded[:1], collate)  # warm-up
    tokens = sum(len(r["input_ids"]) for r in subset)
    tps_padded = tokens / train_seconds(model, timed_padded, collate)
    tps_packed = tokens / train_seconds(model, timed_packed, collate)
    return {
        "packed_vs_padded_tokens_per_s": round(tps_packed / tps_padded, 2),
        "pack_fill_packed": round(fill_packed, 3),
        "pack_fill_padded": round(fill_padded, 3),
        "pack_fill_ratio": round(fill_packed / fill_padded, 2),
        "tokens_per_s_packed": round(tps_packed, 1),
        "tokens_per_s_padded": round(tps_padded, 1),
        "train_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "pack_rows": f"{len(rows)} rows -> {len(packed)} packed rows of <= {CUTOFF} tokens; padded batches of {BATCH}",
    }
