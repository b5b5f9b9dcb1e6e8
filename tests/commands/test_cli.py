"""The command line: options and overrides in any order, JSON output even for a config that does not load."""

from __future__ import annotations

import json

import pytest

from vlmtune.commands.cli import build_parser, main
from vlmtune.models.families import MODEL_TYPES


@pytest.mark.parametrize("argv, overrides", [
    (["doctor", "c.yaml", "--json", "cutoff_len=256"], ["cutoff_len=256"]),
    (["doctor", "--json", "c.yaml", "cutoff_len=256", "seed=1"], ["cutoff_len=256", "seed=1"]),
    (["doctor", "c.yaml", "cutoff_len=256", "--json", "seed=1"], ["cutoff_len=256", "seed=1"]),
])
def test_overrides_may_follow_an_option(argv, overrides):
    args = build_parser().parse_args(argv)
    assert (args.config, args.overrides, args.json) == ("c.yaml", overrides, True)


@pytest.mark.parametrize("command", ["prepare", "train"])
def test_config_commands_take_overrides(command):
    args = build_parser().parse_args([command, "c.yaml", "a=1", "b=2"])
    assert (args.config, args.overrides) == ("c.yaml", ["a=1", "b=2"])


def test_chat_question_may_sit_between_options():
    args = build_parser().parse_args(["chat", "--model", "m", "what is it?", "--image", "a.png", "--image", "b.png"])
    assert (args.model, args.question, args.image) == ("m", "what is it?", ["a.png", "b.png"])


def test_arch_choices_are_the_families():
    for command in (["tiny-model", "out"], ["demo"]):
        action = next(a for a in build_parser()._subparsers._group_actions[0].choices[command[0]]._actions
                      if a.dest == "arch")
        assert tuple(action.choices) == MODEL_TYPES == (
            "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")


@pytest.mark.parametrize("model_type", ["qwen2", "not_a_model_type"])
@pytest.mark.parametrize("command", ["inspect", "chat", "export"])
def test_an_unsupported_model_type_is_one_line_naming_the_families(tmp_path, capsys, model_type, command):
    """A text-only Qwen2 (which transformers knows) and a model type transformers does not know: one line on
    stderr, no traceback, whatever the command."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": model_type}))
    data = tmp_path / "d.jsonl"
    data.write_text("")
    argv = {"inspect": ["inspect", "--model", str(model), "--data", str(data)],
            "chat": ["chat", "--model", str(model), "hello"],
            "export": ["export", "--model", str(model), "--out", str(tmp_path / "out")]}[command]
    if command == "export":
        adapter = tmp_path / "a"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text("{}")
        argv += ["--adapter", str(adapter)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"error: model_type='{model_type}' is not a supported Qwen-VL family; vlmtune supports "
                   "Qwen2-VL (qwen2_vl), Qwen2.5-VL (qwen2_5_vl), Qwen3-VL (qwen3_vl), Qwen3-VL-MoE (qwen3_vl_moe), "
                   "Qwen3.5 (qwen3_5), Qwen3.5-MoE (qwen3_5_moe)\n")


def test_doctor_json_reports_an_invalid_config_as_json(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_name_or_path: m\ndataset: d\noutput_dir: o\ncutof_len: 256\n")
    assert main(["doctor", str(cfg), "--json", "learning_rate=0"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert [(c["name"], c["status"]) for c in out] == [("config", "fail")] * 2
    assert out[0]["message"].startswith("unknown key 'cutof_len'") and out[0]["fix"] == "did you mean 'cutoff_len'?"
    assert out[1] == {"name": "config", "status": "fail", "message": "learning_rate=0 is not positive",
                      "fix": "set learning_rate to a positive number such as 1.0e-4"}


def test_doctor_without_json_reports_an_invalid_config_on_stderr(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_name_or_path: m\ndataset: d\noutput_dir: o\ncutoff_len: 0\n")
    assert main(["doctor", str(cfg)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "cutoff_len=0 is not positive" in captured.err


def test_tiny_model_refuses_a_folder_it_did_not_create(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert main(["tiny-model", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: OUT {out} is a folder with content that vlmtune did not create")
    assert [p.name for p in out.iterdir()] == ["config.json"]


def test_deepspeeds_accelerator_detection_stays_out_of_a_commands_output(capsys):
    import logging

    from vlmtune.commands.cli import DEEPSPEED_DETECTION

    with pytest.raises(SystemExit):
        main(["inspect", "--help"])  # main installs the filter before parsing
    capsys.readouterr()
    ds = logging.getLogger("DeepSpeed")
    assert DEEPSPEED_DETECTION in ds.filters
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    ds.addHandler(handler)
    try:
        ds.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        ds.info("Setting ds_accelerator to cuda (auto detect)")
        ds.warning("ZeRO-3 is enabled")
    finally:
        ds.removeHandler(handler)
    assert seen == ["ZeRO-3 is enabled"]


def test_tiny_model_prints_one_line_with_deepspeed_installed(tmp_path):
    pytest.importorskip("deepspeed")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "vlmtune.commands.cli", "tiny-model", str(tmp_path / "m")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == [f"wrote a tiny random qwen2_vl checkpoint to {tmp_path / 'm'}"]
