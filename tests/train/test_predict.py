"""do_predict's pieces: a row cut at its last answer, and the four scores LLaMA-Factory reports."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vlmtune.train.predict import bleu4, rouge_l, rouge_n, scores, split_row, tokens

X = -100


def test_split_row_cuts_before_the_last_answer():
    row = {"input_ids": [1, 2, 3, 4, 5, 6, 7], "labels": [X, X, 3, X, X, 6, 7], "images": []}
    prompt, label = split_row(row)
    assert (prompt["input_ids"], prompt["labels"], label) == ([1, 2, 3, 4, 5], [X] * 5, [6, 7])
    assert split_row({"input_ids": [1, 2], "labels": [X, X]}) is None
    # an image pad (9) in what would be cut off: the row cannot be predicted from its prompt
    assert split_row({"input_ids": [1, 9, 6], "labels": [X, 9, 6]}, (9,)) is None


def test_tokens_split_cjk_characters():
    assert tokens("a cat 你好x") == ["a", "cat", "你", "好", "x"]


def test_scores_exact_values():
    assert bleu4(["a", "b", "c", "d"], ["a", "b", "c", "d"]) == 1.0
    # one unigram of two matches, no higher n-gram: NIST geometric smoothing 1/2, 1/(2*1), 1/(4*0→1), ...
    assert bleu4(["a", "x"], ["a", "y"]) == pytest.approx(math.exp((math.log(1 / 2) + math.log(1 / 2) +
                                                                    math.log(1 / 4) + math.log(1 / 8)) / 4))
    assert rouge_n(["a", "b", "c"], ["a", "b", "d"], 1) == pytest.approx(2 / 3)
    assert rouge_n(["a", "b", "c"], ["a", "b", "d"], 2) == pytest.approx(1 / 2)
    assert rouge_l(["a", "x", "b", "c"], ["a", "b", "c"]) == pytest.approx(2 * 3 / 7)
    assert scores([{"predict": "a b", "label": "a b"}]) == {
        "predict_bleu-4": pytest.approx(100 * math.exp(-1.5 * 0) * math.exp((0 + 0 + math.log(1 / 2) + math.log(1 / 4)) / 4)),
        "predict_rouge-1": 100.0, "predict_rouge-2": 100.0, "predict_rouge-l": 100.0}


@given(st.lists(st.sampled_from("abcd"), min_size=1, max_size=12), st.lists(st.sampled_from("abcd"), min_size=1,
                                                                             max_size=12))
def test_scores_are_in_range_and_perfect_for_identity(hyp, ref):
    for f in (bleu4, rouge_l, lambda h, r: rouge_n(h, r, 1), lambda h, r: rouge_n(h, r, 2)):
        assert 0.0 <= f(hyp, ref) <= 1.0 + 1e-12
    assert rouge_l(ref, ref) == pytest.approx(1.0) and rouge_n(ref, ref, 1) == pytest.approx(1.0)


def test_left_pad_moves_each_prompt_to_the_right_end():
    import torch

    from vlmtune.train.predict import answer_ids, left_pad

    batch = {"input_ids": torch.tensor([[5, 6, 7], [8, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 0]]),
             "mm_token_type_ids": torch.tensor([[0, 1, 0], [1, 0, 0]]), "pixel_values": "kept"}
    out = left_pad(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert out["mm_token_type_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    assert out["pixel_values"] == "kept"
    # a row that ended early is padded while the others go on: cut after its first end token
    assert answer_ids([4, 2, 0, 0], {2, 3}) == [4, 2] and answer_ids([4, 4], {2}) == [4, 4]


# -- batched generation ------------------------------------------------------------------------------------------
def _write_eval(folder, make_image) -> str:
    """Seven samples with 0, 1 or 2 images and prompts of very different lengths (so rows are padded by up to ~40
    tokens in a batch)."""
    import json

    specs = [("Hi?", 0), ("<image>" + "Describe the colour and the shape in detail please. " * 3, 1),
             ("<image><image>Which is brighter?", 2), ("Say something about the sky, the sea and the hills " * 2, 0),
             ("<image>Colour?", 1), ("<image><image>" + "Compare them. " * 5, 2), ("Why?", 0)]
    lines = []
    for i, (user, n) in enumerate(specs):
        images = [make_image(folder / f"i{i}_{k}.png", 56 + 28 * k, 56 + 28 * (i % 2), (40 * i, 90, 200 - k * 60)).name
                  for k in range(n)]
        record = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": f"answer {i}"}]}
        lines.append(json.dumps({**record, "images": images} if images else record))
    (folder / "eval.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "eval.jsonl")


def _rows_and_model(make_config, make_image, tmp_path, arch="qwen2_vl"):
    from transformers import AutoModelForImageTextToText

    from vlmtune.data.drivers.prepare import prepare
    from vlmtune.data.stages.collate import Collator
    from vlmtune.models.load import load_spec

    data = _write_eval(tmp_path, make_image)
    cfg = make_config(arch, data, tmp_path / "out", do_sample=False, max_new_tokens=6)
    loaded = load_spec(cfg.model, cfg.fit)
    rows = list(prepare(cfg.for_data(), loaded, progress=False).dataset())
    model = AutoModelForImageTextToText.from_pretrained(cfg.model_name_or_path).eval()
    return cfg, rows, model, Collator(loaded.processor, loaded.spec, cutoff_len=cfg.cutoff_len)


# qwen3_5: linear-attention layers, whose state must not take the left pads in
@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_5", pytest.param("qwen2_5_vl", marks=pytest.mark.slow),
                                  pytest.param("qwen3_vl", marks=pytest.mark.slow)])
def test_batched_greedy_generation_equals_one_row_at_a_time(make_config, make_image, tmp_path, arch):
    import torch

    from vlmtune.train.predict import batches_of, generate_batch, generation_kwargs, prompts_of

    cfg, rows, model, collate = _rows_and_model(make_config, make_image, tmp_path, arch)
    spec = collate.spec
    items, skipped = prompts_of(rows, (spec.image_token_id, spec.video_token_id))
    assert skipped == 0 and [k for k, _, _ in items] == list(range(7))
    assert [sum(t == spec.image_token_id for t in p["input_ids"]) > 0 for _, p, _ in items] == [
        False, True, True, False, True, True, False]
    lengths = [len(p["input_ids"]) for _, p, _ in items]
    assert len(set(lengths)) == 7 and max(lengths) - min(lengths) >= 30
    gen = generation_kwargs(cfg)
    with torch.inference_mode():
        alone = {k: generate_batch(model, collate, [p], gen)[0] for k, p, _ in items}
        for size in (3, 7):
            chunks = batches_of(items, size)
            assert [len(c) for c in chunks] == ([3, 3, 1] if size == 3 else [7])
            together = {}
            for chunk in chunks:
                together.update(zip([c[0] for c in chunk], generate_batch(model, collate, [c[1] for c in chunk], gen)))
            assert together == alone
    assert all(len(ids) == 6 for ids in alone.values())  # the random model never ends early: six ids each
