"""`inspect --show`: one sample as the model sees it."""

from __future__ import annotations

import json

from vlmtune.commands.cli import main


def test_show_marks_trained_spans_and_image_runs(tiny_ckpt, tmp_path, make_image, capsys):
    make_image(tmp_path / "a.png", 280, 280)
    rec = {"id": "q1", "messages": [{"role": "user", "content": "<image>What colour?"},
                                    {"role": "assistant", "content": "red"}], "images": ["a.png"]}
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    model = str(tiny_ckpt("qwen2_vl"))
    assert main(["inspect", "--model", model, "--data", str(tmp_path / "d.jsonl"), "--show", "q1"]) == 0
    out = capsys.readouterr().out.splitlines()
    src = f"{tmp_path / 'd.jsonl'}:1"
    assert out[0].startswith(f"sample q1 ({src}): ") and out[0].endswith("1 image(s)")
    assert out[1] == "legend: \u27e6trained\u27e7 text is in the loss; the rest is masked"
    body = "\n".join(out[2:])
    assert f"[image 1: {tmp_path / 'a.png'} grid 1x20x20 = 100 tokens]" in body
    assert "<|im_start|>assistant\n\u27e6red<|im_end|>\u27e7" in body
    assert "\u27e6" not in body.split("<|im_start|>assistant")[0]


def test_show_fits_with_the_given_policies(tiny_ckpt, tmp_path, make_image, capsys):
    make_image(tmp_path / "a.png", 448, 448)
    rec = {"id": "big", "messages": [{"role": "user", "content": "<image>What?"},
                                     {"role": "assistant", "content": "a shape"}], "images": ["a.png"]}
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    args = ["inspect", "--model", str(tiny_ckpt("qwen2_vl")), "--data", str(tmp_path / "d.jsonl"), "--show", "big",
            "--cutoff-len", "100"]
    assert main(args + ["--overflow", "drop"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("fit to cutoff_len=100: dropped (")
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("fit to cutoff_len=100: shrunk (shrank 1 image(s) from 256")


def test_show_an_unknown_id_is_an_error_naming_the_ids(tiny_ckpt, tmp_path, make_image, capsys):
    make_image(tmp_path / "a.png", 280, 280)
    rec = {"id": "q1", "messages": [{"role": "user", "content": "<image>What colour?"},
                                    {"role": "assistant", "content": "red"}], "images": ["a.png"]}
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    args = ["inspect", "--model", str(tiny_ckpt("qwen2_vl")), "--data", str(tmp_path / "d.jsonl")]
    assert main(args + ["--show", "nope"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: no sample with id 'nope' in the data; ids look like: q1;")
    assert main(args + ["--show", "q1", "--cutoff-len", "50", "--overflow", "shrink,drop"]) == 2
    assert "'shrink' is not a policy" in capsys.readouterr().err
