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
    capsys.readouterr()  # building the checkpoint may print (deepspeed's accelerator notice): not inspect's output
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


# -- --per-sample and --plot: new files, or ones inspect wrote; never a file of yours ------------------------------
def _one_sample(tmp_path, make_image):
    make_image(tmp_path / "a.png", 56, 56)
    rec = {"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "red"}],
           "images": ["a.png"]}
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    return str(tmp_path / "d.jsonl")


def test_inspect_refuses_to_overwrite_files_it_did_not_write_before_any_work(tmp_path, make_image, capsys,
                                                                            monkeypatch):
    data = _one_sample(tmp_path, make_image)
    (tmp_path / "notes.jsonl").write_text('{"mine": 1}\n')
    make_image(tmp_path / "photo.png", 20, 20)
    photo = (tmp_path / "photo.png").read_bytes()
    (tmp_path / "folder").mkdir()
    monkeypatch.setattr("vlmtune.models.load.load_spec", lambda *a: (_ for _ in ()).throw(AssertionError("loaded")))
    fix = "; vlmtune never overwrites your files: set {flag} to a new file name, or delete that one yourself"
    for per, plot, what in [("notes.jsonl", "photo.png", "a file that vlmtune inspect did not write"),
                            ("folder", "folder", "not a regular file")]:
        argv = ["inspect", "--model", "m", "--data", data, "--per-sample", str(tmp_path / per), "--plot",
                str(tmp_path / plot)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"  - --per-sample {tmp_path / per} is {what}{fix.format(flag='--per-sample')}\n" in err
        assert f"  - --plot {tmp_path / plot} is {what}{fix.format(flag='--plot')}\n" in err
    assert (tmp_path / "notes.jsonl").read_text() == '{"mine": 1}\n' and (tmp_path / "photo.png").read_bytes() == photo


def test_inspect_writes_over_its_own_earlier_files(tiny_ckpt, tmp_path, make_image, capsys):
    from PIL import Image

    data = _one_sample(tmp_path, make_image)
    per, plot = tmp_path / "per.jsonl", tmp_path / "lengths.png"
    per.write_text("")  # an empty file holds nothing to lose
    argv = ["inspect", "--model", str(tiny_ckpt("qwen2_vl")), "--data", data, "--per-sample", str(per), "--plot",
            str(plot), "--json"]
    for _ in range(2):
        assert main(argv) == 0
        capsys.readouterr()
        assert list(json.loads(per.read_text().splitlines()[0])) == ["id", "tokens", "image_tokens", "text_tokens",
                                                                     "images", "videos", "video_tokens"]
        with Image.open(plot) as im:
            assert im.info["Software"] == "vlmtune inspect"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "d.jsonl", "lengths.png", "per.jsonl"]
