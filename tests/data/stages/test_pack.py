"""Packing: whole samples only, positions as if alone, the same loss and gradients as unpacked."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForImageTextToText

from _packing import assert_same_loss_and_grads
from vlmtune.data.stages.collate import Collator, check_row, find_runs
from vlmtune.data.stages.encode import Encoder, emit
from vlmtune.data.media.images import read_header
from vlmtune.data.stages.pack import best_fit, mrope_positions, pack_dataset, pack_rows
from vlmtune.data.types import Conversation, ImagePart, Message, TextPart
from vlmtune.models.families import FAMILIES
from vlmtune.models.load import load_spec

# Every family of the table; the hybrid ones (linear attention) pack exactly only through models/hybrid.py's
# segment-aware path, which tests/models/test_hybrid.py checks (packed == unpacked, and that it leaks without it).
ARCHS = [name for name, fam in FAMILIES.items() if not fam.linear_attention]


@settings(max_examples=300, deadline=None)
@given(lengths=st.lists(st.integers(1, 100), min_size=0, max_size=60), capacity=st.integers(100, 400))
def test_best_fit_places_every_item_once_within_capacity(lengths, capacity):
    bins = best_fit(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    # best fit never leaves two bins that could have been one
    loads = sorted(sum(lengths[i] for i in b) for b in bins)
    assert len(loads) < 2 or loads[0] + loads[1] > capacity


def test_best_fit_fills_a_skewed_mix():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in np.concatenate([rng.integers(20, 120, 300), rng.integers(600, 1000, 60)])]
    bins = best_fit(lengths, 1024)
    fill = sum(lengths) / (len(bins) * 1024)
    assert fill >= 0.95


def _rows(loaded, tmp_path, make_image):
    paths = [make_image(tmp_path / f"p{k}.png", w, h, color=(50 * k, 90, 200 - 40 * k))
             for k, (w, h) in enumerate([(120, 90), (64, 200), (150, 150)])]
    headers = {str(p): read_header(str(p)) for p in paths}
    img = [ImagePart(str(p), str(p)) for p in paths]
    T = TextPart
    convs = [
        Conversation("a", "d:1", [Message("user", [img[0], T("What colour?")]), Message("assistant", [T("red")])]),
        Conversation("b", "d:2", [Message("user", [T("Say hi.")]), Message("assistant", [T("hi there")])]),
        Conversation("c", "d:3", [Message("user", [T("Compare "), img[1], T(" with "), img[2]]),
                                  Message("assistant", [T("the second is bigger")])]),
    ]
    enc = Encoder(loaded.processor, loaded.spec)
    return [emit(e, loaded.spec).to_dict() for e in enc.encode_many(convs, headers)]


@pytest.fixture(scope="module", params=ARCHS)
def family(request, tiny_ckpt):
    path = str(tiny_ckpt(request.param))
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return load_spec(path), model


def test_positions_match_the_models_own(family, tmp_path, make_image):
    loaded, model = family
    collate = Collator(loaded.processor, loaded.spec)
    for row in _rows(loaded, tmp_path, make_image):
        batch = collate([row])
        if "image_grid_thw" not in batch:
            continue
        want, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                             image_grid_thw=batch["image_grid_thw"])
        got = mrope_positions(row["input_ids"], row["image_grid_thw"], loaded.spec.image_token_id,
                              loaded.spec.merge_size)
        assert np.array_equal(got, want[:, 0].numpy())


def test_packed_loss_and_gradients_equal_unpacked(family, tmp_path, make_image):
    loaded, model = family
    rows = _rows(loaded, tmp_path, make_image)
    cutoff = sum(len(r["input_ids"]) for r in rows)
    packed = pack_rows(rows, cutoff)
    assert len(packed) == 1 and packed[0]["segments"] == [len(r["input_ids"]) for r in rows]
    collate = Collator(loaded.processor, loaded.spec, cutoff_len=cutoff)
    pb, ub = collate(packed), collate(rows)
    assert "attention_mask" not in pb and pb["position_ids"].shape == (4, 1, cutoff)
    # positions of each packed sample equal its positions alone
    start = 0
    for r in rows:
        n = len(r["input_ids"])
        alone = mrope_positions(r["input_ids"], r["image_grid_thw"], loaded.spec.image_token_id, loaded.spec.merge_size)
        assert np.array_equal(pb["position_ids"][1:, 0, start : start + n].numpy(), alone)
        assert pb["position_ids"][0, 0, start : start + n].tolist() == list(range(n))
        start += n

    lp, lu = assert_same_loss_and_grads(model, pb, ub)
    # token-weighted mean of the losses of the samples run alone
    alone = []
    for r in rows:
        with torch.no_grad():
            alone.append((model(**collate([r])).loss.item(), sum(1 for x in r["labels"][1:] if x != -100)))
    mean = sum(l * n for l, n in alone) / sum(n for _, n in alone)
    assert abs(lp.item() - mean) <= 1e-4 * mean


def test_packed_rows_keep_images_in_run_order(tiny_ckpt, tmp_path, make_image):
    loaded = load_spec(str(tiny_ckpt("qwen2_vl")))
    rows = _rows(loaded, tmp_path, make_image)
    packed = pack_rows(rows, 10_000)[0]
    assert packed["images"] == [p for r in rows for p in r["images"]]
    runs, _ = find_runs(packed["input_ids"], loaded.spec)
    assert [n for _, n in runs] == [g[0] * g[1] * g[2] // 4 for g in packed["image_grid_thw"]]
    assert check_row(packed, loaded.spec, 10_000) == []
    broken = {**packed, "segments": packed["segments"][:-1]}
    assert check_row(broken, loaded.spec, None)[0].startswith("packed segments")


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 40)), min_size=1, max_size=25),
       cutoff=st.integers(60, 300))
def test_packing_never_exceeds_cutoff_nor_splits_a_run(sizes, cutoff):
    """Synthetic rows: k runs of 4 pads each plus text; every pack stays ≤ cutoff with whole runs."""
    from vlmtune.models.spec import ModelSpec

    spec = ModelSpec("qwen2_vl", "<|image_pad|>", 9, "<|video_pad|>", 10, "<|vision_start|>", 7, "<|vision_end|>", 8,
                     "<|im_start|>", 1, "<|im_end|>", 2, 0, 2, 14, 2, 2, 3136, 200704, 100)
    rows = []
    for k, (n_img, text) in enumerate(sizes):
        ids = [1] + [5] * text + [7, 9, 9, 9, 9, 8] * n_img + [2]
        if len(ids) > cutoff:
            continue
        rows.append({"id": str(k), "source": f"s:{k}", "input_ids": ids, "labels": ids, "images": ["x"] * n_img,
                     "image_grid_thw": [[1, 4, 4]] * n_img, "image_min_pixels": [1] * n_img,
                     "image_max_pixels": [1] * n_img})
    packed = pack_rows(rows, cutoff)
    assert sum(len(p["segments"]) for p in packed) == len(rows)
    for p in packed:
        assert check_row(p, spec, cutoff) == []


def test_pack_dataset_plans_from_the_length_column_and_equals_pack_rows(tmp_path):
    from datasets import Dataset

    rng = random.Random(5)
    rows = []
    for k in range(40):
        n = rng.randint(1, 30)
        rows.append({"id": f"s{k}", "source": f"f:{k}", "input_ids": [7] * n, "labels": [1] * n,
                     "images": [], "image_grid_thw": [], "image_min_pixels": [], "image_max_pixels": [], "length": n})
    ds = Dataset.from_list(rows)
    packed = pack_dataset(ds, 64, str(tmp_path / "p.arrow"), batch=3)
    assert packed.to_list() == pack_rows(rows, 64)
    assert os.listdir(tmp_path) == ["p.arrow"]
    # the plan reads only the length column: lengths of 1 put all 40 rows into one pack
    lied = ds.map(lambda r: {"length": 1})
    assert [r["segments"] for r in pack_dataset(lied, 64, str(tmp_path / "q.arrow"))] == [[len(r["input_ids"]) for r in rows]]
