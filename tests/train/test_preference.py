"""Preference training: each loss against the formula by hand, ln 2 before any update, pairs that had to be fitted
train, KTO never makes an undesirable answer an SFT target, the references (adapter off, frozen copy, precomputed)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vlmtune.config import load_config
from vlmtune.config.training_sections import PREF_LOSSES
from vlmtune.data.stages.encode import IGNORE_INDEX
from vlmtune.train.preference import AVERAGED, PrefOptions, dpo_losses

# -- the losses, on numbers ------------------------------------------------------------------------------------
PC, PR, RC, RR = [-1.2, -3.5, -0.4], [-2.0, -1.1, -0.9], [-1.5, -2.5, -0.7], [-1.8, -1.6, -0.5]


def _ls(x: float) -> float:  # log σ(x)
    return -math.log1p(math.exp(-x))


def _by_hand(loss: str, beta: float, eps: float, gamma: float) -> float:
    out = []
    for pc, pr, rc, rr in zip(PC, PR, RC, RR):
        a, b = pc - rc, pr - rr
        x = a - b
        if loss == "sigmoid":
            v = -_ls(beta * x) * (1 - eps) - _ls(-beta * x) * eps
        elif loss == "robust":
            v = (-_ls(beta * x) * (1 - eps) + _ls(-beta * x) * eps) / (1 - 2 * eps)
        elif loss == "hinge":
            v = max(0.0, 1 - beta * x)
        elif loss == "ipo":
            v = (x - 1 / (2 * beta)) ** 2
        elif loss == "sppo_hard":
            v = (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
        elif loss == "nca_pair":
            v = -_ls(beta * a) - 0.5 * _ls(-beta * a) - 0.5 * _ls(-beta * b)
        elif loss == "orpo":
            odds = (pc - pr) - (math.log(1 - math.exp(pc)) - math.log(1 - math.exp(pr)))
            v = -pc - beta * _ls(odds)
        elif loss == "simpo":
            v = -_ls(beta * ((pc - pr) - gamma / beta))
        out.append(v)
    return sum(out) / len(out)


@pytest.mark.parametrize("loss", PREF_LOSSES)
def test_each_pref_loss_equals_its_formula_by_hand(loss):
    eps = 0.1 if loss in ("sigmoid", "robust") else 0.0
    opt = PrefOptions("dpo", beta=0.3, loss=loss, simpo_gamma=0.7, label_smoothing=eps)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    losses, chosen, rejected = dpo_losses(t(PC), t(PR), t(RC), t(RR), opt)
    assert float(losses.mean()) == pytest.approx(_by_hand(loss, 0.3, eps, 0.7), abs=1e-5)
    if loss not in ("orpo", "simpo"):
        assert chosen.tolist() == pytest.approx([0.3 * (c - r) for c, r in zip(PC, RC)], abs=1e-9)


# -- with the tiny model ---------------------------------------------------------------------------------------
def _pairs(folder, make_image, n: int = 2, words: int = 4) -> str:
    recs = []
    for i in range(n):
        a = make_image(folder / f"a{i}.png", 56 + 28 * i, 56)
        b = make_image(folder / f"b{i}.png", 56, 84, (0, 0, 255))
        q = "<image><image>" + " ".join(["Which picture is red?"] * words)
        recs.append({"conversations": [{"from": "human", "value": q}], "chosen": {"from": "gpt", "value": "the first"},
                     "rejected": {"from": "gpt", "value": "the second one, surely"},
                     "images": [a.name, b.name]})
    (folder / "pairs.json").write_text(json.dumps(recs), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"pairs": {
        "file_name": "pairs.json", "formatting": "sharegpt", "ranking": True,
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"}}}))
    return "pairs"


@pytest.fixture
def dpo_cfg(tmp_path, make_image, base_cfg):
    def make(**keys):
        data = tmp_path / "data"
        data.mkdir(exist_ok=True)
        name = _pairs(data, make_image, n=keys.pop("n", 2), words=keys.pop("words", 4))
        base = base_cfg("qwen2_vl", name, tmp_path / "out", dataset_dir=str(data), stage="dpo",
                        per_device_train_batch_size=2, **keys)
        return load_config(None, base=base)

    return make


def _sequence_logp(model, collator, row) -> float:
    """One side alone, unpadded: the sum over its answer tokens of log p(token | everything before it)."""
    batch = collator.inner([row])
    labels = batch.pop("labels")[0]
    logp = model(**batch).logits[0].double().log_softmax(-1)
    return sum(float(logp[t - 1, labels[t]]) for t in range(1, labels.shape[0]) if labels[t] != IGNORE_INDEX)


def test_first_dpo_loss_is_ln2_and_every_pref_loss_equals_the_hand_computed_one(dpo_cfg):
    from vlmtune.data.stages.pairs import rejected_view
    from vlmtune.train.recipe import setup

    run = setup(dpo_cfg(), progress=False)
    trainer = run.trainer
    model = trainer.model
    rows = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer.data_collator(rows)
    assert batch["input_ids"].shape[0] == 4  # the two chosen sides, then the two rejected ones, in one forward
    model.train()
    assert float(trainer.compute_loss(model, batch)) == pytest.approx(math.log(2), abs=1e-6)

    torch.manual_seed(0)  # move the policy away from the reference (LoRA B is zero at the start)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.eval()
    sides = [*rows, *(rejected_view(r) for r in rows)]
    counts = [sum(1 for x in s["labels"][1:] if x != IGNORE_INDEX) for s in sides]
    with torch.no_grad():
        policy = [_sequence_logp(model, trainer.data_collator, s) for s in sides]
        with model.disable_adapter():
            reference = [_sequence_logp(model, trainer.data_collator, s) for s in sides]
    assert policy != pytest.approx(reference)
    global PC, PR, RC, RR
    saved = PC, PR, RC, RR
    try:
        for loss in PREF_LOSSES:
            avg = (lambda v, k: v / counts[k]) if loss in AVERAGED else (lambda v, k: v)
            PC, PR = [avg(policy[k], k) for k in (0, 1)], [avg(policy[k], k) for k in (2, 3)]
            RC, RR = [avg(reference[k], k) for k in (0, 1)], [avg(reference[k], k) for k in (2, 3)]
            trainer.pref = PrefOptions("dpo", beta=0.1, loss=loss, simpo_gamma=0.5)
            with torch.no_grad():
                got = float(trainer.compute_loss(model, batch))
            assert got == pytest.approx(_by_hand(loss, 0.1, 0.0, 0.5), abs=1e-5), loss
    finally:
        PC, PR, RC, RR = saved


def test_two_image_pairs_longer_than_cutoff_train_with_every_pair_reported(dpo_cfg):
    from vlmtune.train.recipe import run

    cfg = dpo_cfg(n=3, words=30, cutoff_len=90, max_steps=2, plot_loss=True)
    result = run(cfg, progress=False)
    lines = [json.loads(x) for x in open(result.prepared.report_path, encoding="utf-8")]
    assert [x["id"] for x in lines] == ["pairs:0", "pairs:1", "pairs:2"]
    assert all(x["fate"] in ("shrunk", "truncated") and x["tokens_before"] > 90 for x in lines)
    assert all(max(x["chosen_tokens"][1], x["rejected_tokens"][1]) <= 90 for x in lines)
    ds = result.prepared.dataset()
    assert all(len(r["input_ids"]) <= 90 and len(r["rejected_input_ids"]) <= 90 and len(r["images"]) == 2
               for r in ds)
    logged = [h for h in result.log_history if "loss" in h]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(logged[0])
    assert result.global_step == 2
    assert (result.output_dir and __import__("os").path.isfile(f"{result.output_dir}/training_rewards.png"))


@pytest.mark.slow
@pytest.mark.parametrize("keys", [{"finetuning_type": "full"}, {"precompute_ref_log_probs": True},
                                  {"ref_model": "tiny"}], ids=["frozen-copy", "precomputed", "ref_model"])
def test_the_other_references_also_start_at_ln2(dpo_cfg, tiny_ckpt, keys):
    from vlmtune.train.recipe import setup

    if keys.get("ref_model") == "tiny":  # the starting checkpoint, loaded again as a separate frozen model
        keys = {"ref_model": str(tiny_ckpt("qwen2_vl"))}
    run = setup(dpo_cfg(**keys), progress=False)
    trainer = run.trainer
    if "precompute_ref_log_probs" in keys:
        assert trainer.ref_model is None and "ref_rejected_logps" in trainer.train_dataset.column_names
    else:
        assert trainer.ref_model is not None and not any(p.requires_grad for p in trainer.ref_model.parameters())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    trainer.model.eval()
    with torch.no_grad():
        assert float(trainer.compute_loss(trainer.model, batch)) == pytest.approx(math.log(2), abs=1e-6)


# -- KTO ---------------------------------------------------------------------------------------------------------
def _kto(folder, make_image) -> str:
    img = make_image(folder / "k.png", 56, 56)
    answers = [("red", True), ("blue", False), ("a red square", True), ("green", False)]
    recs = [{"messages": [{"role": "user", "content": "<image>What colour is it?"},
                          {"role": "assistant", "content": a}], "label": tag, "images": [img.name]}
            for a, tag in answers]
    (folder / "kto.json").write_text(json.dumps(recs), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"kto": {
        "file_name": "kto.json", "formatting": "sharegpt",
        "columns": {"messages": "messages", "kto_tag": "label", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    return "kto"


def test_kto_trains_and_an_undesirable_answer_is_never_an_sft_target(tmp_path, make_image, base_cfg):
    from vlmtune.data.drivers.prepare import prepare
    from vlmtune.errors import DataError
    from vlmtune.train.recipe import run, setup

    data = tmp_path / "data"
    data.mkdir()
    name = _kto(data, make_image)
    keys = base_cfg("qwen2_vl", name, tmp_path / "out", dataset_dir=str(data), per_device_train_batch_size=4)
    # as SFT data the file is refused: its undesirable answers would be learned
    with pytest.raises(DataError, match="stage: kto"):
        prepare(load_config(None, base=keys).for_data(), progress=False)

    cfg = load_config(None, base={**keys, "stage": "kto", "pref_ftx": 1.0, "max_steps": 2})
    r = setup(cfg, progress=False)
    trainer, model = r.trainer, r.trainer.model
    rows = [trainer.train_dataset[i] for i in range(4)]
    assert [x["kto_tag"] for x in rows] == [1, 0, 1, 0]
    batch = trainer.data_collator(rows)
    model.eval()
    with torch.no_grad():
        with_ftx = float(trainer.compute_loss(model, batch))
        trainer.pref = PrefOptions("kto", beta=0.1, loss="sigmoid")
        without = float(trainer.compute_loss(model, batch))
        one = trainer.data_collator.inner
        avg = []
        for row in rows:
            b = one([row])
            labels = b.pop("labels")[0]
            logp = model(**b).logits[0].double().log_softmax(-1)
            picked = [float(logp[t - 1, labels[t]]) for t in range(1, labels.shape[0]) if labels[t] != IGNORE_INDEX]
            avg.append(sum(picked) / len(picked))
    # the SFT term is the mean NLL of the desirable answers (rows 0 and 2) only
    assert with_ftx - without == pytest.approx(-(avg[0] + avg[2]) / 2, abs=1e-5)
    # before any update policy == reference: every row's reward is 0, KL 0, loss 1 - σ(0) = 0.5
    assert without == pytest.approx(0.5, abs=1e-6)

    result = run(cfg, progress=False)
    assert result.global_step == 2
    assert any("rewards/chosen" in h and "kl" in h for h in result.log_history)


# -- DDP ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_two_ddp_ranks_train_preference_stages_and_agree(stage, tmp_path, make_image, base_cfg):
    import os
    import subprocess
    import sys

    import yaml
    from _ranks import stop_torchrun
    from test_recipe import _tail

    from vlmtune.train import recipe

    data = tmp_path / "data"
    data.mkdir()
    name = _pairs(data, make_image, n=4) if stage == "dpo" else _kto(data, make_image)
    out = tmp_path / "out"
    cfg = base_cfg("qwen2_vl", name, out, dataset_dir=str(data), stage=stage, max_steps=2, learning_rate=1e-3)
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", recipe.DEBUG_RANK_HASH_ENV: "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vlmtune",
           "train", str(path)]
    log = tmp_path / "ddp.log"
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            stop_torchrun(proc)
            pytest.fail(f"the 2-rank {stage} run hung; its output:\n{_tail(log.read_text())}")
    output = log.read_text()
    assert proc.returncode == 0, _tail(output)
    assert "trained 2 step(s)" in output
    ranks = [(out / f"rank_{r}_weights.sha256").read_text() for r in (0, 1)]
    assert ranks[0] == ranks[1]  # every parameter bit-identical on both ranks
