"""`vlmtune demo --dpo`: preference training on the shapes task, with held-out preference accuracy before/after.

The pictures are the image demo's (data.py). Each training record is a LLaMA-Factory ranking pair
(`"ranking": true` in dataset_info.json): a picture and a question about its colour or shape, the right answer
as `chosen` and a wrong one as `rejected`; some pairs ask about two pictures and are longer than cutoff_len,
so pair-aware fitting acts (shrink_images for both sides). Held-out pairs ask the same about pictures never
trained on; preference accuracy is the share of them whose chosen answer the model finds more likely than the
rejected one (sum of the answer tokens' log-probabilities, as the image demo scores answers). A random model
is at ~50%.

Training is `stage: dpo` through the `vlmtune train` recipe, full fine-tuning (the image demo's reasons: a
random model has no features for LoRA to adapt), so the reference is a frozen copy of the starting model.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from .data import COLOUR_PARAPHRASES, COLOUR_QUESTION, COLOURS, IMAGE_TOKENS, SHAPE_PARAPHRASES, SHAPE_QUESTION, \
    SHAPES, DemoSize
from .data import picture_sets, write_dataset_files
from .data import write_json as _write_json
from .run import Task, before_after_lines, run_lines, run_task, training_keys

PREF_DATASET_NAME = "demo_shape_pairs"
PREF_CUTOFF_LEN = 64  # one picture (16 image tokens) and a question fit; the two-picture pairs do not

# The questions asked. Colour is learnt in a few hundred steps; shape late (2400 steps in the image demo, data.py),
# too long for a CPU demo of DPO, whose steps cost about three SFT steps (two sides and the reference).
KINDS = ("colour",)
PREF_FULL = DemoSize(train_images=600, eval_images=120, steps=300, batch_size=8, loader_workers=0)
PREF_QUICK = DemoSize(train_images=64, eval_images=16, steps=40, batch_size=8, loader_workers=0)


def _wrong(rng: random.Random, right: str, options) -> str:
    return rng.choice([o for o in options if o != right])


def _question(rng: random.Random, p, kind: str, paraphrase: bool = True) -> tuple[str, str, str]:
    """(question, right answer, wrong answer) about picture p."""
    if kind == "colour":
        q = rng.choice(COLOUR_PARAPHRASES) if paraphrase else COLOUR_QUESTION
        return q, p.colour, _wrong(rng, p.colour, COLOURS)
    q = rng.choice(SHAPE_PARAPHRASES) if paraphrase else SHAPE_QUESTION
    return q, p.shape, _wrong(rng, p.shape, SHAPES)


def pair_records(rng: random.Random, pics, big) -> list[dict]:
    """LLaMA-Factory ranking records (sharegpt): one pair per picture and kind, and a few two-picture pairs
    longer than cutoff_len (their large pictures are shrunk for both sides)."""
    out = []
    for p in pics:
        for kind in KINDS:
            q, right, wrong = _question(rng, p, kind)
            out.append({"conversations": [{"from": "human", "value": "<image>" + q}],
                        "chosen": {"from": "gpt", "value": right}, "rejected": {"from": "gpt", "value": wrong},
                        "images": [p.path]})
    for _ in range(max(2, len(pics) // 40)):
        a, b = rng.sample(big, 2)
        q = f"<image><image>What colour is the shape in the first picture? {rng.choice(COLOUR_PARAPHRASES)}"
        out.append({"conversations": [{"from": "human", "value": q}], "chosen": {"from": "gpt", "value": a.colour},
                    "rejected": {"from": "gpt", "value": _wrong(rng, a.colour, COLOURS)}, "images": [a.path, b.path]})
    rng.shuffle(out)
    return out


def eval_pairs(rng: random.Random, pics) -> list[dict]:
    """Held-out pairs: the demo's fixed question, the right answer against every wrong one. Balanced so that a model
    that only prefers some answer words to others (a random model does) scores 50%: over pictures whose right
    answers are spread evenly, each pair of words is met once each way round."""
    out = []
    for p in pics:
        for kind in KINDS:
            q, right, _ = _question(rng, p, kind, paraphrase=False)
            for wrong in (c for c in (COLOURS if kind == "colour" else SHAPES) if c != right):
                out.append({"image": p.path, "question": q, "kind": kind, "chosen": right, "rejected": wrong})
    return out


def write_pref_dataset(data_dir: str | os.PathLike, size: DemoSize, seed: int) -> dict:
    data = Path(data_dir)
    rng, train, big, held = picture_sets(data, size, seed, n_big=8)
    records = pair_records(rng, train, big)
    write_dataset_files(data, PREF_DATASET_NAME, records, {
        "formatting": "sharegpt", "ranking": True,
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"}})
    pairs = eval_pairs(random.Random(f"eval-pairs-{seed}"), held)
    _write_json(data / "eval_pairs.json", pairs)
    return {"records": len(records), "eval_pairs": pairs}


def preference_accuracy(model, processor, pairs: list[dict], data_dir: str, *, min_pixels: int, max_pixels: int) -> dict:
    """Share of held-out pairs whose chosen answer scores above the rejected one (overall and per kind)."""
    from .evaluation import score_answers

    questions = [{"image": p["image"], "question": p["question"]} for p in pairs]
    scores = score_answers(model, processor, questions, [(p["chosen"], p["rejected"]) for p in pairs], data_dir,
                           min_pixels=min_pixels, max_pixels=max_pixels)
    right = [s[0] > s[1] for s in scores]
    kinds = sorted({p["kind"] for p in pairs})
    by_kind = {k: sum(r for r, p in zip(right, pairs) if p["kind"] == k) / sum(p["kind"] == k for p in pairs)
               for k in kinds}
    return {"accuracy": sum(right) / len(right), "by_kind": by_kind, "pairs": len(pairs)}


def pref_demo_config(model_dir, data_dir, output_dir, *, factor: int, size: DemoSize, steps: int, seed: int,
                     overrides: dict | None = None):
    """The DPO demo's config, as a user would write it (LLaMA-Factory key names)."""
    from ...config import load_config

    base = {
        "model_name_or_path": str(model_dir),
        "stage": "dpo",
        "pref_loss": "sigmoid",
        # 0.5, not LLaMA-Factory's default 0.1: a stronger pull per step for a short CPU run. Not tuned: the one
        # value measured (docs/preference.md has the figures).
        "pref_beta": 0.5,
        "dataset": PREF_DATASET_NAME,
        "dataset_dir": str(data_dir),
        "output_dir": str(output_dir),
        "cutoff_len": PREF_CUTOFF_LEN,
        "image_max_pixels": IMAGE_TOKENS * factor * factor,
        **training_keys(size, steps, seed),
        "overflow": ["shrink_images", "truncate_text", "drop"],  # split does not apply to pairs
    }
    base.update(overrides or {})
    return load_config(None, base=base)


def _summary(before: dict, after: dict, data: dict, cfg, result) -> dict:
    logged = [h for h in result.log_history if "rewards/accuracies" in h]
    return {
        "preference_accuracy_before": before["accuracy"],
        "preference_accuracy_after": after["accuracy"],
        "by_kind_before": before["by_kind"],
        "by_kind_after": after["by_kind"],
        "eval_pairs": before["pairs"],
        "train_reward_accuracy_last": logged[-1]["rewards/accuracies"] if logged else None,
    }


def _score(model, processor, data: dict, cfg, data_dir) -> dict:
    return preference_accuracy(model, processor, data["eval_pairs"], str(data_dir),
                               min_pixels=processor.image_processor.size["shortest_edge"],
                               max_pixels=cfg.image_max_pixels)


def _config(model_dir, data_dir, output_dir, processor, **kw):
    factor = processor.image_processor.patch_size * processor.image_processor.merge_size
    return pref_demo_config(model_dir, data_dir, output_dir, factor=factor, **kw)


PREFERENCE = Task(
    sizes=(PREF_QUICK, PREF_FULL),
    dataset=PREF_DATASET_NAME,
    write_data=lambda data_dir, size, seed, processor: write_pref_dataset(data_dir, size, seed),
    config=_config,
    score=_score,
    summary=_summary,
    config_keys=lambda cfg: ["stage", "pref_loss", "pref_beta", "finetuning_type", "learning_rate", "max_steps",
                             "per_device_train_batch_size", "cutoff_len", "image_max_pixels", "overflow"],
)


def run_pref_demo(out: str | os.PathLike = "vlmtune-demo-dpo", *, steps: int | None = None, quick: bool = False,
                  arch: str = "qwen2_vl", seed: int = 0, progress: bool = True, overrides: dict | None = None) -> dict:
    """Build, evaluate, fine-tune with DPO, evaluate again; returns (and writes) the summary."""
    return run_task(PREFERENCE, out, steps=steps, quick=quick, arch=arch, seed=seed, progress=progress,
                    overrides=overrides)


def format_pref_summary(s: dict) -> str:
    lines = [
        "",
        f"vlmtune demo --dpo: a tiny random {s['arch']} trained with DPO ({s['config']['pref_loss']}, beta "
        f"{s['config']['pref_beta']}, {s['config']['finetuning_type']}) on right-vs-wrong answers about rendered "
        f"shapes, {s['steps']} steps",
        f"held-out preference accuracy on {s['eval_pairs']} pairs (log p(chosen) > log p(rejected); chance 50%):",
        *before_after_lines(s["preference_accuracy_before"], s["by_kind_before"], s["preference_accuracy_after"],
                            s["by_kind_after"]),
    ]
    if s["quick"]:
        lines.append("  (--quick: a smoke run; the full run is `vlmtune demo --dpo`)")
    return "\n".join(lines + run_lines(s, "(each pair has one line; the two-picture pairs are longer than "
                                         "cutoff_len and were shrunk for both sides)",
                                       "LLaMA-Factory ranking sharegpt, with dataset_info.json"))
