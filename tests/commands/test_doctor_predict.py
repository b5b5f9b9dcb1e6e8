"""The doctor on a predict-only config (do_train: false): the checks that apply, the data read from eval_dataset."""

from __future__ import annotations

import json

from vlmtune.commands.doctor import DeviceInfo, run_checks
from vlmtune.config import load_config

CPU = DeviceInfo("cpu", "test CPU", 64 * 2**30, False, None, 8, 48 * 2**30)


def _config(tiny_ckpt, make_image, tmp_path, **keys):
    make_image(tmp_path / "a.png", 56, 56)
    lines = [{"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "Red."}],
              "images": ["a.png"]},
             {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return load_config(None, base={"model_name_or_path": str(tiny_ckpt("qwen2_vl")), "dataset_dir": None,
                                   "eval_dataset": str(tmp_path / "eval.jsonl"), "output_dir": str(tmp_path / "out"),
                                   "do_predict": True, "predict_with_generate": True, "cutoff_len": 256, **keys})


def test_predict_only_runs_the_checks_that_apply_on_eval_dataset(tiny_ckpt, make_image, tmp_path):
    checks = run_checks(_config(tiny_ckpt, make_image, tmp_path), device_info=CPU)
    assert [c.name for c in checks] == ["versions", "precision", "model", "quantization", "linear_attention",
                                        "predict", "data", "video"]
    by = {c.name: c for c in checks}
    assert all(c.status == "ok" for c in checks if c.name != "versions"), [c for c in checks if c.status != "ok"]
    assert " train (" not in by["model"].message  # nothing trains
    assert by["data"].message.startswith("cutoff_len=256: 0 of 2 valid samples are longer")
    assert (tmp_path / "out" / "eval_fit_report.jsonl").exists() and not (tmp_path / "out" / "fit_report.jsonl").exists()


def test_a_missing_adapter_fails_the_predict_check(tiny_ckpt, make_image, tmp_path):
    cfg = _config(tiny_ckpt, make_image, tmp_path, adapter_name_or_path=str(tmp_path / "no-adapter"))
    (c,) = [c for c in run_checks(cfg, device_info=CPU) if c.name == "predict"]
    assert c.status == "fail" and "no-adapter" in c.message and c.fix.startswith("set adapter_name_or_path")
