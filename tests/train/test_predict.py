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
@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_5", *(pytest.param(a, marks=pytest.mark.slow)
                                                           for a in ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe",
                                                                     "qwen3_5_moe"))])
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


@pytest.mark.parametrize("arch", ["qwen2_5_vl", pytest.param("qwen3_vl", marks=pytest.mark.slow)])
def test_batched_greedy_generation_with_videos_equals_one_row_at_a_time(make_config, make_image, tmp_path, arch):
    """Clips of different lengths next to images and text (Qwen2.5-VL's second_per_grid_ts, Qwen3-VL's timestamps)."""
    import json

    import torch
    from transformers import AutoModelForImageTextToText

    from clips import write_clip
    from vlmtune.data.drivers.prepare import prepare
    from vlmtune.data.stages.collate import Collator
    from vlmtune.models.load import load_spec
    from vlmtune.train.predict import batches_of, generate_batch, generation_kwargs, prompts_of

    write_clip(tmp_path / "a.mp4", 8, 64, 48)
    write_clip(tmp_path / "b.mp4", 16, 48, 64, moving=True)
    make_image(tmp_path / "i.png", 56, 84)
    records = [({"videos": ["a.mp4"]}, "<video>What moves?"), ({}, "Say hi " * 9),
               ({"videos": ["b.mp4"], "images": ["i.png"]}, "<image><video>Same colour?"),
               ({"videos": ["a.mp4", "b.mp4"]}, "<video><video>Which is longer?")]
    (tmp_path / "v.jsonl").write_text("".join(json.dumps({**media, "messages": [
        {"role": "user", "content": text}, {"role": "assistant", "content": f"answer {i}"}]}) + "\n"
        for i, (media, text) in enumerate(records)))
    cfg = make_config(arch, str(tmp_path / "v.jsonl"), tmp_path / "out", do_sample=False, max_new_tokens=5,
                      cutoff_len=1024, video_fps=4.0, video_maxlen=4)
    loaded = load_spec(cfg.model, cfg.fit)
    rows = list(prepare(cfg.for_data(), loaded, progress=False).dataset())
    model = AutoModelForImageTextToText.from_pretrained(cfg.model_name_or_path).eval()
    collate = Collator(loaded.processor, loaded.spec, cutoff_len=cfg.cutoff_len, video=loaded.video)
    items, skipped = prompts_of(rows, (loaded.spec.image_token_id, loaded.spec.video_token_id))
    assert skipped == 0 and [len(r["videos"]) for r in rows] == [1, 0, 1, 2]
    gen = generation_kwargs(cfg)
    with torch.inference_mode():
        alone = {k: generate_batch(model, collate, [p], gen)[0] for k, p, _ in items}
        (chunk,) = batches_of(items, 4)
        together = dict(zip([c[0] for c in chunk], generate_batch(model, collate, [c[1] for c in chunk], gen)))
    assert together == alone and all(len(ids) == 5 for ids in alone.values())


# -- predict without training (do_train: false) ------------------------------------------------------------------
def _random_adapter(model_dir, out) -> str:
    """A LoRA adapter with random (non-zero) B matrices, so that it changes what the model generates."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    lora = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out)
    return str(out)


def test_predict_only_writes_one_line_per_sample_in_input_order(tiny_ckpt, make_image, tmp_path, capsys):
    import json

    from vlmtune.commands.cli import main

    model = tiny_ckpt("qwen2_vl")
    data = _write_eval(tmp_path, make_image)
    adapter = _random_adapter(model, tmp_path / "adapter")
    predictions = {}
    for name, keys in (("with_adapter", f"adapter_name_or_path: {adapter}\nper_device_eval_batch_size: 3\n"),
                       ("base", "per_device_eval_batch_size: 1\n")):
        out = tmp_path / name
        # LLaMA-Factory's predict config: no dataset, no do_train, training keys it does not use
        (tmp_path / f"{name}.yaml").write_text(
            f"model_name_or_path: {model}\neval_dataset: {data}\ndataset_dir: null\noutput_dir: {out}\n"
            "stage: sft\nfinetuning_type: lora\nreport_to: none\ndo_predict: true\npredict_with_generate: true\n"
            "do_sample: false\nmax_new_tokens: 4\ncutoff_len: 256\n" + keys)
        assert main(["train", str(tmp_path / f"{name}.yaml")]) == 0
        printed = capsys.readouterr().out
        assert "note: do_train=false: only predicting, so these training keys are not used: finetuning_type, " \
               "report_to" in printed
        assert "predicted 7 sample(s) (do_train: false, nothing trained)" in printed
        assert "doctor: warning" not in printed
        lines = [json.loads(x) for x in (out / "generated_predictions.jsonl").read_text().splitlines()]
        assert [x["label"] for x in lines] == [f"answer {i}" for i in range(7)]  # one per sample, in input order
        assert all(x["prompt"].endswith("<|im_start|>assistant\n") for x in lines)
        results = json.loads((out / "predict_results.json").read_text())
        assert (results["predict_samples"], results["predict_skipped"]) == (7, 0)
        assert not (out / "adapter_model.safetensors").exists() and not list(out.glob("checkpoint-*"))
        assert (out / "eval_fit_report.jsonl").exists() and not (out / "fit_report.jsonl").exists()
        predictions[name] = [x["predict"] for x in lines]
    assert predictions["with_adapter"] != predictions["base"]  # the adapter is applied


@pytest.mark.parametrize("keys,problem", [
    ({"do_train": False}, "do_predict=true has nothing to predict on: set eval_dataset (the datasets to generate "
                          "answers for)"),
    ({"dataset": "d.jsonl"}, "do_predict=true has nothing to predict on: set eval_dataset (the datasets to generate "
                             "answers for), or val_size to hold out part of dataset"),
    ({"do_train": False, "val_size": 0.1, "dataset": "d.jsonl"},
     "do_predict=true has nothing to predict on: set eval_dataset (the datasets to generate answers for) and "
     "val_size: 0 (do_train=false holds out nothing)"),
    ({"dataset": "d.jsonl", "eval_dataset": "e.jsonl", "adapter_name_or_path": "a"},
     "adapter_name_or_path='a' with training: training on top of an adapter is not supported (a run starts a new "
     "adapter; resume_from_checkpoint continues one); remove adapter_name_or_path, or set do_train: false to "
     "predict with it"),
])
def test_predict_config_errors_name_the_key(keys, problem):
    from vlmtune.config import load_config
    from vlmtune.errors import ConfigError

    base = {"model_name_or_path": "m", "output_dir": "o", "do_predict": True, "predict_with_generate": True, **keys}
    with pytest.raises(ConfigError) as e:
        load_config(None, base=base)
    assert e.value.problems == [problem]


def test_do_train_resolves_from_the_config():
    from vlmtune.config import load_config

    common = {"model_name_or_path": "m", "output_dir": "o", "eval_dataset": "e.jsonl"}
    predict = {"do_predict": True, "predict_with_generate": True}
    assert load_config(None, base={**common, **predict}).do_train is False  # LLaMA-Factory's predict config
    assert load_config(None, base={**common, **predict, "dataset": "d.jsonl"}).do_train is True
    assert load_config(None, base={**common, "dataset": "d.jsonl", "val_size": 0.5, "eval_dataset": None,
                                   **predict}).do_train is True  # predicts on the held-out split after training
    cfg = load_config(None, base={**common, **predict, "do_train": False, "dataset": "d.jsonl", "learning_rate": 1})
    assert cfg.notes == ("do_train=false: only predicting, so these training keys are not used: learning_rate, "
                         "dataset",)


def test_predict_only_refuses_a_users_output_dir_and_leaves_its_same_named_files(tiny_ckpt, make_image, tmp_path,
                                                                                 capsys, monkeypatch):
    # predict writes generated_predictions.jsonl / predict_results.json / eval_fit_report.jsonl into output_dir by
    # fixed names: a user's folder (no marker) holding files of those names is refused before the model loads.
    from vlmtune.commands.cli import main
    from vlmtune.train import recipe

    data = _write_eval(tmp_path, make_image)
    out = tmp_path / "mine"
    out.mkdir()
    mine = {n: f"my own {n}\n" for n in ("generated_predictions.jsonl", "predict_results.json",
                                          "eval_fit_report.jsonl")}
    for n, text in mine.items():
        (out / n).write_text(text)
    monkeypatch.setattr(recipe, "load_spec", lambda *a: pytest.fail("the model loaded before the refusal"))
    (tmp_path / "p.yaml").write_text(
        f"model_name_or_path: {tiny_ckpt('qwen2_vl')}\neval_dataset: {data}\ndataset_dir: null\noutput_dir: {out}\n"
        "stage: sft\ndo_predict: true\npredict_with_generate: true\nmax_new_tokens: 4\ncutoff_len: 256\n")
    assert main(["train", str(tmp_path / "p.yaml")]) == 2
    assert f"output_dir={str(out)!r} is a folder with content that vlmtune did not create (it has no " \
           ".vlmtune-owned)" in capsys.readouterr().err
    assert {p.name: p.read_text() for p in out.iterdir()} == mine
