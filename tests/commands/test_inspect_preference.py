"""`inspect --stage dpo | kto`: preference data counted as the preference stages' prepare fits it (a pair by its
longer side), exactly; and a preference file inspected without --stage is one line per file naming the flag."""

from __future__ import annotations

import json
import random

import pytest

from _chat import hf_content
from vlmtune.commands.cli import main
from vlmtune.models.families import MODEL_TYPES

# (width, height) of the prompts' images: odd sizes, landscape and portrait
SIZES = [(300, 200), (120, 400), (57, 91), (448, 448)]
WORDS = "red green blue circle square triangle picture shows the a which is of and what colour left right".split()


def _words(rnd: random.Random, n: int) -> str:
    return " ".join(rnd.choice(WORDS) for _ in range(n))


def _ranking_dataset(root, make_image, n: int = 9, seed: int = 3) -> list[dict]:
    """LLaMA-Factory ranking sharegpt pairs named in dataset_info.json (`ranking: true`): 0, 1 and 2 images per
    prompt, some prompts with an earlier exchange, answers of random lengths (either side the longer)."""
    for k, (w, h) in enumerate(SIZES):
        make_image(root / f"i{k}.png", w, h, color=(40 * k, 90, 200))
    rnd = random.Random(seed)
    records = []
    for i in range(n):
        images = [f"i{(i + j) % len(SIZES)}.png" for j in range(i % 3)]
        turns = []
        if i % 4 == 3:  # an earlier exchange: context of the final answers, never scored
            turns += [{"from": "human", "value": _words(rnd, 4) + "?"}, {"from": "gpt", "value": _words(rnd, 6)}]
        turns.append({"from": "human", "value": "<image>" * len(images) + "Describe: " + _words(rnd, rnd.randint(1, 9))})
        records.append({"conversations": turns, "images": images,
                        "chosen": {"from": "gpt", "value": _words(rnd, rnd.randint(1, 25))},
                        "rejected": {"from": "gpt", "value": _words(rnd, rnd.randint(1, 25))}})
    (root / "pairs.json").write_text(json.dumps(records))
    (root / "dataset_info.json").write_text(json.dumps({"pairs": {
        "file_name": "pairs.json", "formatting": "sharegpt", "ranking": True,
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"}}}))
    return records


def _processor_length(processor, root, record: dict, answer: dict) -> int:
    """len(input_ids) of prompt + one answer from the real processor (its chat template, its image processor
    on the decoded images)."""
    from PIL import Image

    role = {"human": "user", "gpt": "assistant"}
    messages = [{"role": role[t["from"]], "content": hf_content(t["value"])} for t in record["conversations"]]
    messages.append({"role": "assistant", "content": [{"type": "text", "text": answer["value"]}]})
    text = processor.apply_chat_template(messages, tokenize=False)
    images = [Image.open(root / p).convert("RGB") for p in record["images"]] or None
    return len(processor(text=[text], images=images, return_tensors="pt")["input_ids"][0])


def _inspect(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["inspect", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _model(tiny_ckpt, capsys, arch: str = "qwen2_vl") -> str:
    path = str(tiny_ckpt(arch))
    capsys.readouterr()  # building the checkpoint may print (deepspeed's accelerator notice): not inspect's output
    return path


@pytest.fixture
def model(tiny_ckpt, capsys):
    return _model(tiny_ckpt, capsys)


@pytest.mark.parametrize("arch", MODEL_TYPES)  # every family of the table: 28- and 32-pixel patches, their templates
def test_pair_tokens_equal_prepare_and_the_real_processor(tmp_path, make_image, tiny_ckpt, tiny_processor, capsys,
                                                          arch):
    """The product's promise for pairs: inspect's per-pair numbers are prepare's fit report's (before fitting)
    and len(input_ids) of the real processor for prompt + chosen and prompt + rejected; a pair's length is
    its longer side, and the summary's numbers are those lengths'."""
    from vlmtune.config import load_config
    from vlmtune.data.drivers.prepare import prepare

    model = _model(tiny_ckpt, capsys, arch)
    records = _ranking_dataset(tmp_path, make_image)
    per = tmp_path / "per.jsonl"
    rc, out, _ = _inspect(capsys, "--model", model, "--data", "pairs", "--dataset-dir", str(tmp_path), "--stage", "dpo",
                          "--per-sample", str(per), "--json")
    assert rc == 0
    summary = json.loads(out)
    rows = [json.loads(x) for x in per.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"pairs:{i}" for i in range(len(records))]

    proc = tiny_processor(arch)
    expected = [(_processor_length(proc, tmp_path, r, r["chosen"]), _processor_length(proc, tmp_path, r, r["rejected"]))
                for r in records]
    assert [(r["chosen_tokens"], r["rejected_tokens"]) for r in rows] == expected
    assert [r["tokens"] for r in rows] == [max(c, j) for c, j in expected]
    assert [r["images"] for r in rows] == [len(r["images"]) for r in records]
    assert any(c > j for c, j in expected) and any(j > c for c, j in expected)  # either side can be the longer

    cfg = load_config(None, base={"model_name_or_path": model, "dataset": "pairs", "dataset_dir": str(tmp_path),
                                  "stage": "dpo", "cutoff_len": 8192, "output_dir": str(tmp_path / "out")})
    report = [json.loads(x) for x in open(prepare(cfg.for_data(), progress=False).report_path, encoding="utf-8")]
    assert [(x["id"], x["fate"]) for x in report] == [(r["id"], "kept") for r in rows]
    assert [(x["chosen_tokens"][0], x["rejected_tokens"][0], x["tokens_before"]) for x in report] == \
        [(r["chosen_tokens"], r["rejected_tokens"], r["tokens"]) for r in rows]

    longer = sorted(r["tokens"] for r in rows)
    assert summary["stage"] == "dpo" and summary["pairs"] == summary["samples"] == len(records)
    assert summary["lengths"]["max"] == summary["recommended_cutoff_len"]["max"] == longer[-1]
    assert summary["tokens"] == sum(longer)
    assert summary["chosen_lengths"]["max"] == max(c for c, _ in expected)
    assert summary["rejected_lengths"]["max"] == max(j for _, j in expected)
    assert sorted(summary["by_image_count"]) == ["0", "1", "2"]
    assert summary["longer_side"] == {"chosen": sum(c > j for c, j in expected),
                                      "rejected": sum(j > c for c, j in expected),
                                      "equal": sum(c == j for c, j in expected)}


def test_cutoff_len_counts_the_pairs_whose_longer_side_is_over(tmp_path, make_image, model, capsys):
    _ranking_dataset(tmp_path, make_image)
    args = ["--model", model, "--data", "pairs", "--dataset-dir", str(tmp_path), "--stage", "dpo"]
    per = tmp_path / "per.jsonl"
    assert _inspect(capsys, *args, "--per-sample", str(per), "--json")[0] == 0
    rows = [json.loads(x) for x in per.read_text().splitlines()]
    # a cutoff between the sides of some pair: the pair is over when its longer side is
    cutoff = sorted(r["tokens"] for r in rows)[len(rows) // 2]
    rc, out, _ = _inspect(capsys, *args, "--cutoff-len", str(cutoff), "--json")
    over = [r["id"] for r in rows if max(r["chosen_tokens"], r["rejected_tokens"]) > cutoff]
    assert rc == 0 and json.loads(out)["over_cutoff"] == len(over) > 0
    plot = tmp_path / "pairs.png"
    rc, out, _ = _inspect(capsys, *args, "--cutoff-len", str(cutoff), "--plot", str(plot))
    assert rc == 0 and plot.stat().st_size > 0
    lines = out.splitlines()
    assert lines[0].startswith(f"pairs: {len(rows)} valid of {len(rows)} records (0 invalid, 0 problem(s)); a pair's "
                               "length is its longer side")
    assert f"cutoff_len={cutoff}: {len(over)} pair(s) exceed it (their longer side) and will be fitted by the " \
           "overflow policies" in lines
    table = lines[lines.index(next(x for x in lines if x.lstrip().startswith("images/pair"))):]
    assert [x.split()[0] for x in table[1:6]] == ["0", "1", "2", "all", "chosen"]


def test_show_prints_both_sides_and_the_pairs_fit(tmp_path, make_image, model, capsys):
    make_image(tmp_path / "a.png", 448, 448)
    rec = {"messages": [{"role": "user", "content": "<image>What colour?"}], "chosen": "red",
           "rejected": "blue, a light blue", "images": ["a.png"]}
    (tmp_path / "p.jsonl").write_text(json.dumps(rec) + "\n")
    args = ["--model", model, "--data", str(tmp_path / "p.jsonl"), "--stage", "dpo", "--show", "p:1"]
    rc, out, _ = _inspect(capsys, *args)
    assert rc == 0
    lines = out.splitlines()
    head = f"pair p:1 ({tmp_path / 'p.jsonl'}:1): "
    assert lines[0].startswith(head) and "1 image(s) (the longer side, rejected); prompt + chosen: " in lines[0]
    assert lines[1] == "legend: \u27e6scored\u27e7 text is the answer the preference loss scores; the rest is masked"
    chosen, rejected = out.split("--- p:1 chosen: ")[1].split("--- p:1 rejected: ")
    assert f"[image 1: {tmp_path / 'a.png'} grid 1x32x32 = 256 tokens]" in chosen
    assert f"[image 1: {tmp_path / 'a.png'} grid 1x32x32 = 256 tokens]" in rejected
    assert "<|im_start|>assistant\n\u27e6red<|im_end|>\u27e7" in chosen
    assert "<|im_start|>assistant\n\u27e6blue, a light blue<|im_end|>\u27e7" in rejected
    assert "\u27e6" not in chosen.split("<|im_start|>assistant")[0]  # the prompt is masked on both sides
    n_chosen, n_rejected = int(chosen.split(" tokens")[0]), int(rejected.split(" tokens")[0])
    assert lines[0].endswith(f"prompt + chosen: {n_chosen}, prompt + rejected: {n_rejected}")
    assert lines[0].startswith(f"{head}{n_rejected} tokens = ")

    rc, out, _ = _inspect(capsys, *args, "--cutoff-len", str(n_rejected - 10))
    fit = out.splitlines()[1]
    assert rc == 0 and fit.startswith(f"fit to cutoff_len={n_rejected - 10}: shrunk (shrank 1 image(s) from 256")
    c, r = (int(out.split(f"--- p:1 {side}: ")[1].split(" tokens")[0]) for side in ("chosen", "rejected"))
    assert fit.endswith(f"tokens after: {r} (chosen {c}, rejected {r}: both <= {n_rejected - 10})") and c < r
    rc, out, _ = _inspect(capsys, *args, "--cutoff-len", "20", "--overflow", "drop")
    assert out.splitlines()[1] == ("fit to cutoff_len=20: dropped (" + f"{n_rejected} tokens > cutoff_len=20); "
                                   "tokens after: none (the pair is left out, both sides)")


def test_kto_one_sample_per_record_with_its_tag(tmp_path, make_image, model, capsys):
    make_image(tmp_path / "a.png", 120, 80)
    recs = [{"prompt": "<image>What colour?", "completion": "blue", "label": False, "images": ["a.png"]},
            {"prompt": "<image>What colour?", "completion": "red", "label": True, "images": ["a.png"]},
            {"prompt": "Say hi.", "completion": "Hello!", "label": True}]
    (tmp_path / "k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    per, plot = tmp_path / "per.jsonl", tmp_path / "k.png"
    args = ["--model", model, "--data", str(tmp_path / "k.jsonl"), "--stage", "kto"]
    rc, out, _ = _inspect(capsys, *args, "--per-sample", str(per), "--plot", str(plot))
    assert rc == 0 and out.splitlines()[0] == ("samples: 3 valid of 3 records (0 invalid, 0 problem(s)); "
                                               "2 desirable, 1 undesirable")
    rows = [json.loads(x) for x in per.read_text().splitlines()]
    assert [(r["id"], r["images"], r["kto_tag"]) for r in rows] == [("k:1", 1, False), ("k:2", 1, True),
                                                                   ("k:3", 0, True)]
    assert list(rows[0]) == ["id", "tokens", "image_tokens", "text_tokens", "images", "videos", "video_tokens",
                             "kto_tag"]
    rc, out, _ = _inspect(capsys, *args, "--show", "k:1")
    assert out.splitlines()[0].endswith("; kto_tag: false (undesirable: scored, never an SFT target)")
    assert f"--- k:1 (undesirable): {rows[0]['tokens']} tokens ---" in out and "\u27e6blue<|im_end|>\u27e7" in out
    rc, out, _ = _inspect(capsys, *args, "--json")
    assert (json.loads(out)["desirable"], json.loads(out)["undesirable"], json.loads(out)["stage"]) == (2, 1, "kto")


def test_a_preference_file_without_stage_is_one_line_naming_the_flag(tmp_path, make_image, model, capsys):
    """What a user typing `vlmtune inspect --data dpo_pairs.json` gets: one line per file, the --stage to add,
    exit 2; never a line per record. Likewise a file of another kind than the --stage given."""
    _ranking_dataset(tmp_path, make_image)  # 9 pairs, in pairs.json, named `pairs` in dataset_info.json
    (tmp_path / "k.jsonl").write_text(json.dumps({"prompt": "Hi", "completion": "Hello", "label": True}) + "\n")
    (tmp_path / "s.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                               {"role": "assistant", "content": "Hello"}]}) + "\n")
    base = ["--model", model, "--dataset-dir", str(tmp_path)]
    for data in ("pairs", str(tmp_path / "pairs.json")):
        rc, out, err = _inspect(capsys, *base, "--data", data)
        assert (rc, out) == (2, "")
        assert err == (f"error: {tmp_path / 'pairs.json'}: 9 record(s) are preference pairs (chosen / rejected), "
                       "which stage sft (the default) does not read; inspect them with --stage dpo\n")
    rc, out, err = _inspect(capsys, *base, "--data", str(tmp_path / "k.jsonl"), "--stage", "dpo")
    assert rc == 2 and err.endswith("1 record(s) are KTO samples (answers tagged desirable or not), which stage dpo "
                                    "does not read; inspect them with --stage kto\n")
    rc, out, err = _inspect(capsys, *base, "--data", str(tmp_path / "s.jsonl"), "--stage", "kto")
    assert rc == 2 and err.endswith("are SFT samples (no rejected answer, no tag), which stage kto does not read; "
                                    "inspect them with --stage sft (the default)\n")
    # mixed with samples the stage reads: their numbers, and the others as one problem line per file
    rc, out, err = _inspect(capsys, *base, "--data", f"{tmp_path / 's.jsonl'},{tmp_path / 'pairs.json'}")
    assert rc == 0 and out.splitlines()[0] == "samples: 1 valid of 10 records (9 invalid, 9 problem(s))"
    assert out.split("problems:\n")[1] == (f"  - {tmp_path / 'pairs.json'}: 9 record(s) are preference pairs "
                                           "(chosen / rejected), which stage sft (the default) does not read; "
                                           "inspect them with --stage dpo\n")


def test_per_sample_file_of_pairs_is_rewritten_by_inspect(tmp_path, make_image, model, capsys):
    _ranking_dataset(tmp_path, make_image, n=3)
    per = tmp_path / "per.jsonl"
    argv = ["--model", model, "--data", "pairs", "--dataset-dir", str(tmp_path), "--per-sample", str(per), "--json"]
    for stage in ("dpo", "dpo"):  # the second run writes over the first's file: inspect's own
        assert _inspect(capsys, *argv, "--stage", stage)[0] == 0
    assert list(json.loads(per.read_text().splitlines()[0]))[-2:] == ["chosen_tokens", "rejected_tokens"]
