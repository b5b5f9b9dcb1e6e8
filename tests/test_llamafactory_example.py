"""LLaMA-Factory's Qwen-VL example config, unchanged but for the model, output_dir and max_steps, trains on data in
LLaMA-Factory's own layouts (fixtures written here): a multimodal sharegpt dataset mixed with alpaca and
identity-style datasets, and the fit report accounts for every record of all three."""

from __future__ import annotations

import json

import pytest

from vlmtune.commands.cli import main

# The keys of LLaMA-Factory's examples/train_lora/qwen2vl_lora_sft.yaml (and the no-op defaults its other
# examples carry), with the model, output_dir and max_steps changed.
EXAMPLE = """\
### model
model_name_or_path: {model}
image_max_pixels: 262144
video_max_pixels: 16384
trust_remote_code: true
flash_attn: auto

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
disable_gradient_checkpointing: false
enable_liger_kernel: false
use_unsloth: false

### dataset
dataset: mllm_demo,identity,alpaca_en_demo
dataset_dir: {data}
template: qwen2_vl
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 1
dataloader_num_workers: 0
neat_packing: false
mask_history: false
tokenized_path: null

### output
output_dir: {out}
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 1
learning_rate: 1.0e-4
max_steps: 1
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: false
ddp_timeout: 180000000
resume_from_checkpoint: null
"""

MLLM = [
    {"messages": [{"role": "user", "content": "<image>Who are they?"}, {"role": "assistant", "content": "Two players."},
                  {"role": "user", "content": "What are they doing?<image>"},
                  {"role": "assistant", "content": "Celebrating."}], "images": ["mllm/1.png", "mllm/1.png"]},
    {"messages": [{"role": "user", "content": "<image>Describe it."}, {"role": "assistant", "content": "A red square."}],
     "images": ["mllm/2.png"]},
]
IDENTITY = [{"instruction": "hi", "input": "", "output": "Hello! I am {{name}}, an AI assistant."},
            {"instruction": "Who are you?", "input": "", "output": "I am {{name}}, made by {{author}}."}]
ALPACA = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
          {"instruction": "Name a colour.", "input": "", "output": "Blue."},
          {"instruction": "Translate to French.", "input": "cat", "output": "chat"}]
INFO = {
    "mllm_demo": {"file_name": "mllm_demo.json", "formatting": "sharegpt",
                  "columns": {"messages": "messages", "images": "images"},
                  "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                           "assistant_tag": "assistant"}},
    "identity": {"file_name": "identity.json"},
    "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
}


@pytest.fixture
def lf_data(tmp_path, make_image):
    data = tmp_path / "data"
    make_image(data / "mllm" / "1.png", 64, 48, (255, 0, 0))
    make_image(data / "mllm" / "2.png", 40, 40, (0, 0, 255))
    for name, rows in (("mllm_demo", MLLM), ("identity", IDENTITY), ("alpaca_en_demo", ALPACA)):
        (data / f"{name}.json").write_text(json.dumps(rows))
    (data / "dataset_info.json").write_text(json.dumps(INFO))
    return data


def test_the_qwen2vl_example_trains_on_mixed_llamafactory_data(lf_data, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    yaml_path = tmp_path / "qwen2vl_lora_sft.yaml"
    yaml_path.write_text(EXAMPLE.format(model=tiny_ckpt("qwen2_vl"), data=lf_data, out=out))
    assert main(["train", str(yaml_path)]) == 0
    printed = capsys.readouterr().out
    notes = [line for line in printed.splitlines() if line.startswith("note: ")]
    assert not any("stage" in n for n in notes)  # stage is a vlmtune key (sft, dpo, kto): nothing to note
    assert "note: ignored flash_attn='auto': the model loads with transformers' default attention (SDPA) and stock " \
           "kernels" in notes
    assert "plot_loss: no loss was logged in 1 step(s) (logging_steps=10), so no loss plot was written" in printed
    lines = [json.loads(x) for x in (out / "fit_report.jsonl").read_text().splitlines()]
    # every record of all three datasets has its line, and was kept
    assert sorted(line["id"] for line in lines) == sorted(
        [f"mllm_demo:{i}" for i in range(2)] + [f"identity:{i}" for i in range(2)]
        + [f"alpaca_en_demo:{i}" for i in range(3)])
    assert {line["fate"] for line in lines} == {"kept"}
    assert (out / "adapter_model.safetensors").is_file()


def test_the_doctor_prints_the_same_notes(lf_data, tiny_ckpt, tmp_path, capsys):
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text(EXAMPLE.format(model=tiny_ckpt("qwen2_vl"), data=lf_data, out=tmp_path / "o"))
    main(["doctor", str(yaml_path)])
    doctor = capsys.readouterr().out
    from vlmtune.config import load_config

    for note in load_config(str(yaml_path)).notes:
        assert f"note: {note}" in doctor


def test_eval_dataset_and_interleaving(lf_data, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    text = EXAMPLE.format(model=tiny_ckpt("qwen2_vl"), data=lf_data, out=out).replace(
        "dataset: mllm_demo,identity,alpaca_en_demo",
        "dataset: mllm_demo,alpaca_en_demo\nmix_strategy: interleave_under\neval_dataset: identity\neval_steps: 1\n"
        "do_predict: true\npredict_with_generate: true\nmax_new_tokens: 4\ndo_sample: false")
    (tmp_path / "c.yaml").write_text(text)
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    printed = capsys.readouterr().out
    train_ids = [json.loads(x)["id"] for x in (out / "fit_report.jsonl").read_text().splitlines()]
    # drawn in turn until mllm_demo (2 records) runs out: the third alpaca record is never drawn, and said so
    assert train_ids == ["mllm_demo:0", "alpaca_en_demo:0", "mllm_demo:1", "alpaca_en_demo:1"]
    eval_ids = [json.loads(x)["id"] for x in (out / "eval_fit_report.jsonl").read_text().splitlines()]
    assert eval_ids == ["identity:0", "identity:1"]
    assert "eval_dataset:\nfate " in printed
    state = json.loads((out / "trainer_state.json").read_text())
    assert any("eval_loss" in h for h in state["log_history"])
    assert ("mix_strategy=interleave_under: 1 record(s) of alpaca_en_demo were not drawn (the first dataset to run "
            "out ends the mix; interleave_over repeats the smaller ones instead)") in printed
    # LLaMA-Factory's predict: one line per eval row, with the answer as its label, and the scores
    predictions = [json.loads(x) for x in (out / "generated_predictions.jsonl").read_text().splitlines()]
    assert [p["label"] for p in predictions] == [r["output"] for r in IDENTITY]
    assert all(p["prompt"].endswith("<|im_start|>assistant\n") for p in predictions)
    results = json.loads((out / "predict_results.json").read_text())
    assert {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l"} <= set(results)
    assert results["predict_samples"] == 2 and results["predict_skipped"] == 0
