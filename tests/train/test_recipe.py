"""`vlmtune train` end to end on tiny checkpoints (CPU): what trains, resume, DDP, worst case, plots.

Every run is a real Trainer run of a few steps on a tiny random Qwen-VL checkpoint with its real
processor, so these tests meet the real PEFT wrapping, the real Trainer loop and checkpointing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from _ranks import stop_torchrun  # tests/train is on sys.path (pytest's rootdir-less import)

from vlmtune.config import folders
from vlmtune.train import recipe
from vlmtune.train.checkpoints import MARKER, resolve_resume

MIXED = ["one", "text", "two", "one_big"]


# -- helpers -----------------------------------------------------------------------------------
def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_tracked(cfg):
    """setup → train → cleanup (what `recipe.run` does), with the parameters before and after."""
    run = recipe.setup(cfg, progress=False)
    before = params(run.trainer.model)
    try:
        result = recipe.train(run)
    finally:
        recipe.cleanup(run)
    return run, result, before, params(run.trainer.model)


def part(name: str) -> str:
    """The model part a parameter belongs to, written out here independently of vlmtune's own rule."""
    parts = name.split(".")
    if "visual" not in parts:
        return "llm"
    return "projector" if "merger" in parts or "deepstack_merger_list" in parts else "vision"


def group(name: str) -> str:
    """Finer than `part`: LoRA weights, PEFT's trained copy of a module, and the LLM's layers apart."""
    p = part(name)
    if ".lora_A." in name or ".lora_B." in name:
        return f"{p}.lora"
    if ".modules_to_save." in name:
        return f"{p}.trained_copy"
    if p == "llm":
        m = re.search(r"language_model\.layers\.(\d+)\.", name)
        return f"llm.layer{m.group(1)}" if m else "llm.other"
    return p  # projector groups PEFT's frozen original_module with the bare projector


def losses(log_history: list[dict]) -> dict[int, tuple[float, float]]:
    """step → (loss, grad_norm) of the training log lines."""
    return {h["step"]: (h["loss"], h["grad_norm"]) for h in log_history if "loss" in h}


def base_counts(ckpt) -> dict[str, int]:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(ckpt))
    out = {"llm": 0, "vision": 0, "projector": 0}
    for n, p in model.named_parameters():
        out[part(n)] += p.numel()
    return out


SUMMARY_LINE = re.compile(r"^\s+(\w+)\s+([\d,]+) /\s+([\d,]+) trainable \(([\d.]+)%\)$", re.M)
VLMTUNE_PART = {"language_model": "llm", "vision_tower": "vision", "projector": "projector"}

LLM = {"llm.layer0", "llm.layer1", "llm.other"}
# (arch, config keys, the groups whose every parameter must change; all other parameters stay bit-identical)
CASES = {
    "lora": ("qwen2_vl", {}, {"llm.lora"}),
    "lora-vision": ("qwen2_vl", {"freeze_vision_tower": False}, {"llm.lora", "vision.lora"}),
    "lora-projector": ("qwen2_vl", {"freeze_multi_modal_projector": False}, {"llm.lora", "projector.trained_copy"}),
    "full": ("qwen2_vl", {"finetuning_type": "full"}, LLM),
    "full-vision": ("qwen2_vl", {"finetuning_type": "full", "freeze_vision_tower": False}, LLM | {"vision"}),
    "full-projector": ("qwen2_vl", {"finetuning_type": "full", "freeze_multi_modal_projector": False},
                       LLM | {"projector"}),
    "freeze-last": ("qwen2_vl", {"finetuning_type": "freeze", "freeze_trainable_layers": 1}, {"llm.layer1"}),
    "freeze-first-vision": ("qwen2_vl", {"finetuning_type": "freeze", "freeze_trainable_layers": -1,
                                         "freeze_vision_tower": False}, {"llm.layer0", "vision"}),
    "qwen3-lora-vision": ("qwen3_vl", {"freeze_vision_tower": False}, {"llm.lora", "vision.lora"}),
    "qwen3-lora-vision-projector": ("qwen3_vl", {"freeze_vision_tower": False, "freeze_multi_modal_projector": False},
                                    {"llm.lora", "vision.lora", "projector.trained_copy"}),
    "qwen3-full-vision": ("qwen3_vl", {"finetuning_type": "full", "freeze_vision_tower": False}, LLM | {"vision"}),
}


# -- 1. what trains ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_exactly_the_chosen_parameters_change(case, make_config, write_dataset, out_dir, tiny_ckpt, capsys):
    arch, keys, expected = CASES[case]
    cfg = make_config(arch, write_dataset(MIXED), out_dir, worst_case_first=False, **keys)
    run, result, before, after = train_tracked(cfg)
    assert result.global_step == 3

    changed = {n for n in before if not torch.equal(before[n], after[n])}
    trainable = {n for n, p in run.trainer.model.named_parameters() if p.requires_grad}
    groups = {n: group(n) for n in before}
    must_change = {n for n, g in groups.items() if g in expected}
    # Every parameter of the chosen groups moved, and nothing else did (frozen ones bit for bit).
    assert sorted(must_change - changed) == [], "should have trained"
    assert sorted(changed - must_change) == [], "should have stayed frozen"
    assert trainable == must_change
    # Adapters exist exactly on the parts that train (LoRA never adapts the projector: it trains in full).
    lora_parts = {part(n) for n, g in groups.items() if g.endswith(".lora")}
    assert lora_parts == {g.split(".")[0] for g in expected if g.endswith(".lora")}

    # The per-component summary: printed, recorded in trainable_parameters.json, and true.
    with open(out_dir / "trainable_parameters.json", encoding="utf-8") as f:
        recorded = json.load(f)
    assert recorded == result.trainable == run.trainable
    printed = {VLMTUNE_PART[c]: (int(t.replace(",", "")), int(n.replace(",", "")))
               for c, t, n, _ in SUMMARY_LINE.findall(capsys.readouterr().out)}
    assert printed == {VLMTUNE_PART[c]: (d["trainable"], d["total"]) for c, d in recorded.items()}
    base = base_counts(tiny_ckpt(arch))
    for c, d in recorded.items():
        p = VLMTUNE_PART[c]
        moved = sum(after[n].numel() for n in changed if part(n) == p)
        adapters = sum(after[n].numel() for n, g in groups.items() if g == f"{p}.lora")
        assert d["trainable"] == moved, c
        # total: the part's own weights plus its adapters; PEFT's frozen original_module copy is not counted twice
        assert d["total"] == base[p] + adapters, c

    if keys.get("finetuning_type", "lora") == "lora":
        r = cfg.lora_rank
        from transformers import AutoModelForImageTextToText

        plain = AutoModelForImageTextToText.from_pretrained(str(tiny_ckpt(arch)))
        linears = [(n, m) for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
        for p in lora_parts:
            want = sum(r * (m.in_features + m.out_features) for n, m in linears if part(n) == p)
            assert sum(after[n].numel() for n, g in groups.items() if g == f"{p}.lora") == want
        # What was saved is the adapter (and the trained projector), with the trained values.
        from safetensors.torch import load_file

        saved = load_file(str(out_dir / "adapter_model.safetensors"))
        assert {part(k) for k in saved if ".lora_" in k} == lora_parts
        assert any(part(k) == "projector" for k in saved) == ("projector.trained_copy" in expected)
        assert len(saved) == len(changed)
        for k, v in saved.items():
            match = [n for n in changed if _peft_key(n) == k]
            assert len(match) == 1, k
            assert torch.equal(v, after[match[0]])


def _peft_key(name: str) -> str:
    """The key under which PEFT saves a trained parameter (adapter name and copy wrapper dropped)."""
    return name.replace(".default.", ".").replace(".modules_to_save.", ".")


# -- 2. resume ---------------------------------------------------------------------------------
def test_resume_inside_a_later_epoch_matches_an_uninterrupted_run(make_config, write_dataset, out_dir):
    # 6 rows, batch 1, gradient accumulation 2: 3 updates per epoch. Checkpoints every 2 updates;
    # the resume starts from step 4, inside epoch 1 (epoch 1.33), and runs to step 8 in epoch 2.
    data = write_dataset(["one", "text", "two", "one_big", "text", "one"])
    keys = dict(max_steps=8, save_steps=2, gradient_accumulation_steps=2, lora_dropout=0.1,
                freeze_vision_tower=False, learning_rate=1e-3)
    cfg = make_config("qwen2_vl", data, out_dir, **keys)
    _, full, _, full_after = train_tracked(cfg)
    reference = losses(full.log_history)
    assert sorted(reference) == list(range(1, 9))
    epoch_at = {h["step"]: h["epoch"] for h in full.log_history if "loss" in h}
    assert 1 < epoch_at[4] < 2 and epoch_at[8] > 2

    # "Stop" at step 4 with a kill while checkpoint-6 was being saved: checkpoint-6 has no marker
    # (and lost its optimizer state), checkpoint-8 and the final outputs never came to be.
    ckpt = {s: out_dir / f"checkpoint-{s}" for s in (2, 4, 6, 8)}
    assert all((c / MARKER).exists() for c in ckpt.values())
    shutil.rmtree(ckpt[8])
    (ckpt[6] / MARKER).unlink()
    (ckpt[6] / "optimizer.pt").unlink()
    for name in os.listdir(out_dir):
        if os.path.isfile(out_dir / name) and name != "fit_report.jsonl":
            os.remove(out_dir / name)
    assert resolve_resume(True, str(out_dir)) == str(ckpt[4])

    resumed_run, resumed, _, resumed_after = train_tracked(cfg.replace(resume_from_checkpoint=True))
    assert resumed_run.resume == str(ckpt[4])
    assert resumed.global_step == 8
    with open(out_dir / "trainer_state.json", encoding="utf-8") as f:
        history = json.load(f)["log_history"]
    again = losses(history)
    assert sorted(again) == list(range(1, 9))
    # Steps 5..8 were trained again and match exactly (loss and gradient norm), and so do the weights.
    for step in range(5, 9):
        assert again[step] == reference[step], step
    assert again == reference
    assert full_after.keys() == resumed_after.keys()
    for n in full_after:
        assert torch.equal(full_after[n], resumed_after[n]), n
    assert (ckpt[6] / MARKER).exists() and (ckpt[8] / MARKER).exists()


def test_resume_refuses_incomplete_or_missing_checkpoints(tmp_path):
    from vlmtune.errors import ConfigError

    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        resolve_resume(True, str(out))
    for step in (3, 10, 20):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    (out / "checkpoint-3" / MARKER).write_text("3\n")
    (out / "checkpoint-10" / MARKER).write_text("10\n")
    (out / "checkpoint-x").mkdir()
    # numeric order (10 after 3, not before it as strings sort), the newest complete one
    assert resolve_resume(True, str(out)) == str(out / "checkpoint-10")
    assert resolve_resume(False, str(out)) is None and resolve_resume(None, str(out)) is None
    assert resolve_resume(str(out / "checkpoint-3"), str(out)) == str(out / "checkpoint-3")
    with pytest.raises(ConfigError, match="incomplete checkpoint"):
        resolve_resume(str(out / "checkpoint-20"), str(out))
    with pytest.raises(ConfigError, match="not a folder"):
        resolve_resume(str(out / "checkpoint-99"), str(out))


def test_output_dir_problems_are_refused_together_before_the_model_loads(make_config, write_dataset, tmp_path,
                                                                          monkeypatch):
    from vlmtune.errors import ConfigError

    data = write_dataset(["one", "text"])
    monkeypatch.setattr(recipe, "load_spec", lambda *a: pytest.fail("the model loaded before the refusal"))
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError) as err:
        recipe.setup(make_config("qwen2_vl", data, user, resume_from_checkpoint=True), progress=False)
    assert [p.split(";")[0] for p in err.value.problems] == [
        f"output_dir={str(user)!r} is a folder with content that vlmtune did not create (it has no .vlmtune-owned)",
        f"resume_from_checkpoint=true but {user} holds no complete checkpoint"]
    assert os.listdir(user) == ["notes.txt"]

    earlier = tmp_path / "earlier"  # vlmtune's, with a checkpoint of an earlier run: continue it or start over
    folders.claim(earlier, folders.OUTPUT)
    (earlier / "checkpoint-2").mkdir()
    (earlier / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    (earlier / "checkpoint-2" / MARKER).write_text("{}")
    with pytest.raises(ConfigError) as err:
        recipe.setup(make_config("qwen2_vl", data, earlier), progress=False)
    assert err.value.problems[0].startswith(f"output_dir={str(earlier)!r} holds an earlier run's checkpoints "
                                            "(checkpoint-2); set resume_from_checkpoint: true to continue it, "
                                            "overwrite_output_dir: true to train from scratch in it")
    assert sorted(os.listdir(earlier)) == [folders.MARKER_FILE, "checkpoint-2"]


def test_overwrite_output_dir_starts_over_keeping_what_vlmtune_did_not_write(make_config, write_dataset, out_dir,
                                                                             capsys):
    data = write_dataset(["one", "text"])
    folders.claim(out_dir, folders.OUTPUT)
    old = out_dir / "checkpoint-5"
    old.mkdir()
    (old / "trainer_state.json").write_text('{"global_step": 5}')
    (old / MARKER).write_text("{}")
    (out_dir / "notes.txt").write_text("mine")
    recipe.run(make_config("qwen2_vl", data, out_dir, max_steps=2, save_steps=1, overwrite_output_dir=True),
               progress=False)
    assert f"overwrite_output_dir: removed the earlier run's {old}" in capsys.readouterr().out
    assert not old.exists()
    assert [n for n in sorted(os.listdir(out_dir)) if n.startswith("checkpoint-")] == ["checkpoint-1", "checkpoint-2"]
    assert (out_dir / "notes.txt").read_text() == "mine"
    assert resolve_resume(True, str(out_dir)) == str(out_dir / "checkpoint-2")  # this run's, not the earlier one


# -- 3. DDP ------------------------------------------------------------------------------------
DDP_TIMEOUT_S = 240


def test_ddp_two_ranks_with_text_only_batches_and_a_trainable_vision_tower(base_cfg, write_dataset, tmp_path):
    # One text-only sample among six: in every epoch it is one rank's batch while the other rank
    # has an image batch in the same step, whatever the shuffle. Three steps per epoch, two epochs.
    data = write_dataset(["one", "two", "text", "one_big", "one", "two"])
    out = tmp_path / "ddp"
    cfg = base_cfg("qwen2_vl", data, out, max_steps=6, freeze_vision_tower=False, learning_rate=1e-3)
    cfg_path = tmp_path / "ddp.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", recipe.DEBUG_RANK_HASH_ENV: "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vlmtune", "train", str(cfg_path)]
    log = tmp_path / "ddp.log"
    with open(log, "w", encoding="utf-8") as f:  # a file, not a pipe: a stray worker cannot block the wait
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=DDP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stop_torchrun(proc)
            pytest.fail(f"the 2-rank DDP run hung (> {DDP_TIMEOUT_S} s); its output:\n{_tail(log.read_text())}")
    output = log.read_text()
    assert proc.returncode == 0, _tail(output)
    assert "trained 6 step(s)" in output

    with open(out / "trainer_state.json", encoding="utf-8") as f:
        state = json.load(f)
    assert sorted(losses(state["log_history"])) == list(range(1, 7))
    assert state["log_history"][-1]["epoch"] == 2.0
    # Every parameter, trained or frozen, is bit-identical on both ranks ...
    ranks = [dict(reversed(line.split("  ", 1)) for line in (out / f"rank_{r}_weights.sha256").read_text().splitlines())
             for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    differ = sorted(n for n in ranks[0] if ranks[0][n] != ranks[1][n])
    assert differ == [], f"parameters that differ between the ranks: {differ}"
    # ... and the adapter rank 0 saved, vision adapters included, is what both ranks hold.
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter_model.safetensors"))
    assert any(part(k) == "vision" for k in saved)
    by_saved_key = {_peft_key(n): h for n, h in ranks[0].items() if ".lora_" in n}
    assert by_saved_key.keys() == saved.keys()
    assert all(recipe.weight_hash(v) == by_saved_key[k] for k, v in saved.items())


def _tail(text: str, n: int = 6000) -> str:
    return text[-n:]


# -- 4. worst case first -----------------------------------------------------------------------
def test_worst_case_step_takes_the_longest_batch_and_leaves_training_unchanged(make_config, write_dataset, tmp_path):
    data = write_dataset(["one", "text", "two", "one_big", "text", "one"])
    keys = dict(per_device_train_batch_size=2, max_steps=3, lora_dropout=0.2, freeze_vision_tower=False)
    _, with_worst, _, weights_with = train_tracked(make_config("qwen2_vl", data, tmp_path / "on",
                                                               worst_case_first=True, **keys))
    _, without, _, weights_without = train_tracked(make_config("qwen2_vl", data, tmp_path / "off",
                                                               worst_case_first=False, **keys))
    assert without.worst_case is None
    worst = with_worst.worst_case
    rows = with_worst.prepared.dataset()
    ranked = sorted(zip(rows["length"], rows["id"], rows["images"]), reverse=True)
    assert ranked[1][0] > ranked[2][0], "the two longest rows must be unambiguous"
    assert sorted(worst["ids"]) == sorted(i for _, i, _ in ranked[:2])
    assert worst["tokens"] == ranked[0][0] + ranked[1][0]
    assert worst["images"] == len(ranked[0][2]) + len(ranked[1][2])

    assert losses(with_worst.log_history) == losses(without.log_history)
    assert len(losses(without.log_history)) == 3
    for n in weights_with:
        assert torch.equal(weights_with[n], weights_without[n]), n


# -- 5. loss plot and validation ---------------------------------------------------------------
def _orange_pixels(path) -> int:
    """Pixels of matplotlib's tab:orange (255, 127, 14), the eval-loss colour of the plot."""
    from PIL import Image

    with Image.open(path) as im:
        px = torch.tensor(list(im.convert("RGB").getdata()), dtype=torch.int32)
    return int(((px - torch.tensor([255, 127, 14])).abs().max(dim=1).values <= 12).sum())


def test_plot_loss_with_and_without_validation(make_config, write_dataset, tmp_path):
    data = write_dataset(["one", "text", "two", "one_big", "one", "text"])
    _, plain, _, _ = train_tracked(make_config("qwen2_vl", data, tmp_path / "plain", plot_loss=True,
                                               worst_case_first=False))
    assert plain.loss_plot == str(tmp_path / "plain" / "training_loss.png")
    assert os.path.getsize(plain.loss_plot) > 0
    assert not any("eval_loss" in h for h in plain.log_history)
    assert _orange_pixels(plain.loss_plot) == 0

    _, val, _, _ = train_tracked(make_config("qwen2_vl", data, tmp_path / "val", plot_loss=True, val_size=2,
                                             eval_steps=2, max_steps=4, worst_case_first=False))
    evals = [h for h in val.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4]
    assert all(h["eval_loss"] > 0 for h in evals)
    assert os.path.exists(tmp_path / "val" / "training_loss.png")
    assert _orange_pixels(val.loss_plot) > 50, "the eval loss is not in the plot"


def test_the_validation_split_keeps_the_pieces_of_a_sample_together():
    from datasets import Dataset

    from vlmtune.train.recipe import split_validation

    # pieces of one sample share its sample_id (whatever their ids look like); no id is parsed back
    ids = ["a#1", "a#2", "b", "c#1", "c#2", "c#3", "d#x"]
    samples = ["a", "a", "b", "c", "c", "c", "d#x"]
    ds = Dataset.from_dict({"id": ids, "sample_id": samples})
    for seed in range(5):
        train, val = split_validation(ds, 2, seed)
        held = set(val["sample_id"])
        assert len(held) == 2 and not held & set(train["sample_id"])
        assert sorted(val["id"]) == sorted(i for i, s in zip(ids, samples) if s in held)
