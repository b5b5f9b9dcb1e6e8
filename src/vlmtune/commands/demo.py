"""`vlmtune demo`: the whole product on a laptop CPU in a few minutes, with nothing downloaded.

1. a tiny random Qwen2-VL checkpoint (`models/tiny.py`), written to `<out>/model`;
2. a synthetic dataset of rendered shapes in LLaMA-Factory's sharegpt format (`<out>/data`:
   `demo_shapes.json`, `dataset_info.json`, `images/`), with single-image, two-image and multi-turn
   questions, and a few samples longer than the demo's cutoff_len so that every fitting policy acts;
   plus a held-out split of single-image questions on images never trained on (`eval.json`);
3. accuracy on the held-out questions before training, scored by log-likelihood: the model picks the
   candidate answer (one of the colours, or one of the shapes) it finds most likely;
4. fine-tuning through the same recipe as `vlmtune train` (config built in `demo_config`);
5. accuracy after training, a summary on stdout and `<out>/demo_summary.json`.

Everything is seeded: the same command gives the same numbers on the same machine.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

# Colours far apart in RGB, each jittered per image; the background is a pale grey, so the shape's
# colour dominates every image token that covers it.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 50),
    "blue": (35, 70, 215),
    "yellow": (235, 205, 25),
}
SHAPES = ("circle", "square", "triangle")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")

# The held-out questions ask exactly these; training also uses paraphrases.
COLOUR_QUESTION = "What colour is the shape?"
SHAPE_QUESTION = "Which shape is this?"
COLOUR_PARAPHRASES = (COLOUR_QUESTION, "What is the colour of the shape in this picture?", "Which colour is it?")
SHAPE_PARAPHRASES = (SHAPE_QUESTION, "What shape is shown?", "Name the shape in the picture.")

DATASET_NAME = "demo_shapes"

# Image tokens per image at the demo's pixel budget: small, so that a CPU step takes a fraction of
# a second, yet enough patches (8 x 8 of 14 px for Qwen2-VL) to see a shape's outline.
IMAGE_TOKENS = 16
# Every ordinary sample (one or two images, a few turns) fits; the deliberately long ones do not.
CUTOFF_LEN = 128


@dataclass(frozen=True)
class DemoSize:
    """How much data and training a demo run gets."""

    train_images: int
    eval_images: int
    steps: int
    batch_size: int
    # A second process decodes and resizes the next batch's images (40% of a step) while the main
    # one trains; not worth its start-up in a run of a few seconds.
    loader_workers: int


# Shape is learnt late and suddenly (held-out shape accuracy with seed 0: 73% after 1600 steps,
# 98% after 2400; seeds 1 and 2 also 98% after 2400); colour is learnt within ~300 steps.
FULL = DemoSize(train_images=2000, eval_images=60, steps=2400, batch_size=8, loader_workers=1)
QUICK = DemoSize(train_images=240, eval_images=16, steps=300, batch_size=8, loader_workers=0)


# ---------------------------------------------------------------------------------------------
# Data: rendered shapes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Picture:
    path: str  # relative to the data folder
    shape: str
    colour: str


def draw_picture(rng: random.Random, shape: str, colour: str, size: tuple[int, int] | None = None):
    """One shape of one colour on a plain pale background; size, aspect and position vary."""
    from PIL import Image, ImageDraw

    if size is None:
        w = rng.randint(56, 400)
        h = max(56, min(400, round(w * rng.uniform(0.5, 2.0))))
    else:
        w, h = size
    bg = rng.randint(215, 250)
    bg_rgb = tuple(max(0, min(255, bg + rng.randint(-6, 6))) for _ in range(3))
    im = Image.new("RGB", (w, h), bg_rgb)
    fill = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLOURS[colour])
    side = min(w, h)
    d = rng.uniform(0.75, 0.95) * side  # the shape's extent
    x0 = rng.uniform(0, w - d)
    y0 = rng.uniform(0, h - d)
    draw = ImageDraw.Draw(im)
    if shape == "circle":
        draw.ellipse([x0, y0, x0 + d, y0 + d], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x0 + d, y0 + d], fill=fill)
    else:
        # Always pointing up: with triangles pointing either way, a trial on shape questions alone
        # reached 79% held-out accuracy after 1500 steps instead of 100%.
        draw.polygon([(x0 + d / 2, y0), (x0, y0 + d), (x0 + d, y0 + d)], fill=fill)
    return im


def _pictures(rng: random.Random, folder: Path, prefix: str, n: int, big: bool = False) -> list[Picture]:
    """n pictures whose shape and colour cycle through every combination, in a shuffled order."""
    combos = [(s, c) for s in SHAPES for c in COLOURS]
    out = []
    for k in range(n):
        if k % len(combos) == 0:
            rng.shuffle(combos)
        shape, colour = combos[k % len(combos)]
        size = (rng.randint(600, 900), rng.randint(600, 900)) if big else None
        name = f"{prefix}_{k:04d}.png"
        draw_picture(rng, shape, colour, size).save(folder / name)
        out.append(Picture(f"images/{name}", shape, colour))
    return out


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _colour_turns(rng, p: Picture) -> list[dict]:
    return [_user("<image>" + rng.choice(COLOUR_PARAPHRASES)), _assistant(p.colour)]


def _shape_turns(rng, p: Picture) -> list[dict]:
    return [_user("<image>" + rng.choice(SHAPE_PARAPHRASES)), _assistant(p.shape)]


def _which_picture(rng, a: Picture, b: Picture) -> dict:
    """"Which picture shows a circle, the first or the second?" over two pictures of different shapes."""
    target = rng.choice((a, b))
    answer = "the first" if target is a else "the second"
    q = f"<image><image>Which picture shows a {target.shape}, the first or the second?"
    return {"messages": [_user(q), _assistant(answer)], "images": [a.path, b.path]}


def _preamble(rng: random.Random, words: int) -> str:
    vocab = ("the picture shows a small shape on a plain background and we look at it closely because "
             "every colour and every shape matters here so please read this long note before you answer").split()
    return " ".join(rng.choice(vocab) for _ in range(words)).capitalize() + "."


def training_records(rng: random.Random, pics: list[Picture], big: list[Picture]) -> list[dict]:
    """sharegpt records over the training pictures; every picture is asked about at least once."""
    records: list[dict] = []
    for p in pics:
        # Every picture is asked its shape, most also their colour, half both in one two-turn chat
        # (one image, two answers). Colour is easy but not free: with colour asked of only 30% of
        # the pictures, held-out colour accuracy ended at 56% while shape reached 94%.
        r = rng.random()
        if r < 0.5:
            first, second = (_colour_turns, _shape_turns) if rng.random() < 0.5 else (_shape_turns, _colour_turns)
            turns = first(rng, p) + second(rng, p)
            turns[2]["content"] = turns[2]["content"].replace("<image>", "")
            records.append({"messages": turns, "images": [p.path]})
        elif r < 0.8:
            records.append({"messages": _shape_turns(rng, p), "images": [p.path]})
        else:
            records.append({"messages": _colour_turns(rng, p), "images": [p.path]})
    for _ in range(len(pics) // 8):  # two images
        a = rng.choice(pics)
        b = rng.choice([q for q in pics if q.shape != a.shape])
        records.append(_which_picture(rng, a, b))
    records += long_records(rng, pics, big)
    rng.shuffle(records)
    return records


def long_records(rng: random.Random, pics: list[Picture], big: list[Picture]) -> list[dict]:
    """Samples longer than CUTOFF_LEN, one kind per fitting policy that should act on it."""
    out = []
    n = max(2, len(pics) // 40)
    for _ in range(n):
        # Eight large pictures in one turn: too many image tokens -> shrink_images lowers the budget.
        eight = rng.sample(big, 8)
        k = rng.randrange(len(eight))
        q = "<image>" * len(eight) + f"What colour is the {ORDINALS[k]} shape?"
        out.append({"messages": [_user(q), _assistant(eight[k].colour)], "images": [p.path for p in eight]})
    for _ in range(n):
        # A long text-only exchange before the question -> truncate_text drops it.
        p = rng.choice(pics)
        msgs = [_user(_preamble(rng, 140)), _assistant("I have read the note."), *_colour_turns(rng, p)]
        out.append({"messages": msgs, "images": [p.path]})
    for _ in range(n):
        # Ten pictures, one per turn: no budget fits them in one sample -> split at turn boundaries.
        ten = rng.sample(pics, 10)
        msgs = [m for p in ten for m in (_colour_turns(rng, p) if rng.random() < 0.5 else _shape_turns(rng, p))]
        out.append({"messages": msgs, "images": [p.path for p in ten]})
    return out


def eval_questions(pics: list[Picture]) -> list[dict]:
    """Held-out single-image questions: the colour and the shape of each picture."""
    out = []
    for p in pics:
        out.append({"image": p.path, "question": COLOUR_QUESTION, "kind": "colour", "answer": p.colour})
        out.append({"image": p.path, "question": SHAPE_QUESTION, "kind": "shape", "answer": p.shape})
    return out


def write_dataset(data_dir: str | os.PathLike, size: DemoSize, seed: int) -> dict:
    """Render the pictures and write the sharegpt dataset, dataset_info.json and eval.json."""
    data = Path(data_dir)
    images = data / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train = _pictures(rng, images, "train", size.train_images)
    big = _pictures(rng, images, "big", 12, big=True)
    records = training_records(rng, train, big)
    # Its own stream, so that the held-out pictures do not change what is trained on.
    held_out = _pictures(random.Random(f"eval-{seed}"), images, "eval", size.eval_images)
    _write_json(data / f"{DATASET_NAME}.json", records)
    info = {DATASET_NAME: {
        "file_name": f"{DATASET_NAME}.json",
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    }}
    _write_json(data / "dataset_info.json", info)
    questions = eval_questions(held_out)
    _write_json(data / "eval.json", questions)
    return {"records": len(records), "eval_questions": questions}


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


# ---------------------------------------------------------------------------------------------
# Evaluation: pick the most likely candidate answer
# ---------------------------------------------------------------------------------------------


def candidates_for(kind: str) -> tuple[str, ...]:
    return tuple(COLOURS) if kind == "colour" else SHAPES


def evaluate(model, processor, questions: list[dict], data_dir: str, *, min_pixels: int, max_pixels: int,
             batch_size: int = 32) -> dict:
    """Accuracy of log-likelihood scoring over the held-out questions, overall and per kind.

    Each (question, candidate) pair is one sequence: the chat-templated prompt, then the candidate
    and `<|im_end|>`, exactly as a trained answer is laid out. Its score is the sum of the log
    probabilities of those answer tokens; the argmax over the candidates is the model's answer.
    """
    import torch
    from PIL import Image

    pairs = [(i, c) for i, q in enumerate(questions) for c in candidates_for(q["kind"])]
    scores: dict[tuple[int, str], float] = {}
    was_training = model.training
    model.eval()
    images = {}
    for q in questions:
        if q["image"] not in images:
            with Image.open(os.path.join(data_dir, q["image"])) as im:
                images[q["image"]] = im.convert("RGB")
    end = processor.tokenizer.eos_token  # <|im_end|>: a trained answer ends with it
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            prompts = [_prompt(processor, questions[i]["question"]) for i, _ in chunk]
            texts = [p + c + end for p, (_, c) in zip(prompts, chunk)]
            imgs = [images[questions[i]["image"]] for i, _ in chunk]
            size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
            full = processor(text=texts, images=imgs, size=size, padding=True, padding_side="right",
                             return_tensors="pt")
            # The answer follows the newline that ends the prompt, a pre-tokenizer boundary, so it
            # tokenizes the same alone as in context.
            answer_lens = [len(processor.tokenizer(c + end, add_special_tokens=False)["input_ids"]) for _, c in chunk]
            lens = full["attention_mask"].sum(dim=1)
            logits = model(**full).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            targets = full["input_ids"][:, 1:]
            tok_lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            for k, (i, c) in enumerate(chunk):
                # answer tokens sit at positions prompt_len .. len-1, predicted from the position before
                b = int(lens[k])
                a = b - answer_lens[k]
                scores[(i, c)] = float(tok_lp[k, a - 1 : b - 1].sum())
    model.train(was_training)
    right = {"colour": 0, "shape": 0}
    total = {"colour": 0, "shape": 0}
    for i, q in enumerate(questions):
        cands = candidates_for(q["kind"])
        pick = max(cands, key=lambda c: scores[(i, c)])
        total[q["kind"]] += 1
        right[q["kind"]] += int(pick == q["answer"])
    n = sum(total.values())
    return {
        "accuracy": sum(right.values()) / n if n else 0.0,
        "by_kind": {k: right[k] / total[k] for k in total if total[k]},
        "questions": n,
    }


def _prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def chance(questions: list[dict]) -> float:
    """Expected accuracy of guessing uniformly among each question's candidates."""
    return sum(1 / len(candidates_for(q["kind"])) for q in questions) / len(questions)


# ---------------------------------------------------------------------------------------------
# Training config and the run
# ---------------------------------------------------------------------------------------------


def demo_config(model_dir: str, data_dir: str, output_dir: str, *, factor: int, size: DemoSize, steps: int,
                seed: int, overrides: dict | None = None):
    """The demo's training config, as a user would write it in YAML (LLaMA-Factory key names)."""
    from ..config import load_config

    base = {
        "model_name_or_path": str(model_dir),
        "dataset": DATASET_NAME,
        "dataset_dir": str(data_dir),
        "output_dir": str(output_dir),
        "cutoff_len": CUTOFF_LEN,
        "image_max_pixels": IMAGE_TOKENS * factor * factor,
        "overflow": ["shrink_images", "truncate_text", "split", "drop"],
        # Full fine-tuning of every part, vision tower and projector included, chosen by experiment
        # (2400 steps, seed 0, held-out accuracy): the model is random, so there are no features to
        # adapt, and its embeddings are tiny (row norm ~0.2): while they and the norms are frozen no
        # logit can exceed ~1.6 and the loss cannot fall below ~6. LoRA alone therefore stays at
        # chance (rank 64, lr 2e-3, vision tower unfrozen: 29%, loss 6.9 -> 6.1); LoRA rank 32 with
        # additional_target: norm escapes that and reaches 99% too, but its loss stays near 3.
        # Full fine-tuning reaches 99% (colour within ~300 steps, shape late and suddenly) with a
        # loss that falls to ~0.04. lr 2e-3: 4e-3 learns faster at first, unsteadily on mixed
        # colour and shape questions.
        "finetuning_type": "full",
        "freeze_vision_tower": False,
        "freeze_multi_modal_projector": False,
        "learning_rate": 2.0e-3,
        # Length-grouped batches hold samples of one length, which here means mostly one answer
        # ("square", "red"...) per batch: held-out shape accuracy fell from 69% to 40% with it.
        "group_by_length": False,
        # Memory is no concern for a model this size; recomputing activations would only cost time.
        "gradient_checkpointing": False,
        "per_device_train_batch_size": size.batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": steps,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.05,
        "logging_steps": max(1, steps // 60),
        "save_steps": steps + 1,  # no intermediate checkpoints: the demo keeps only the final model
        "plot_loss": True,
        "report_to": "none",
        "seed": seed,
        "dataloader_num_workers": size.loader_workers,
    }
    base.update(overrides or {})
    return load_config(None, base=base)


def load_trained(model_dir: str, output_dir: str, finetuning_type: str):
    """The fine-tuned model as a user gets it from output_dir: the base plus the adapter, or the full model."""
    from transformers import AutoModelForImageTextToText

    if finetuning_type == "lora":
        from peft import PeftModel

        base = AutoModelForImageTextToText.from_pretrained(model_dir)
        return PeftModel.from_pretrained(base, output_dir)
    return AutoModelForImageTextToText.from_pretrained(output_dir)


def run_demo(out: str | os.PathLike = "vlmtune-demo", *, steps: int | None = None, quick: bool = False,
             arch: str = "qwen2_vl", seed: int = 0, progress: bool = True, overrides: dict | None = None) -> dict:
    """Build, evaluate, fine-tune, evaluate again; returns (and writes) the summary."""
    import torch

    threads = torch.get_num_threads()
    # The model's matrices are tiny (hidden size 64): one thread beats two, and on a shared 2-core
    # machine other threads' spin-waits made a step 4x slower.
    torch.set_num_threads(1)
    try:
        return _run_demo(out, steps=steps, quick=quick, arch=arch, seed=seed, progress=progress, overrides=overrides)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out, *, steps, quick, arch, seed, progress, overrides) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..models.tiny import build_tiny_checkpoint
    from ..train.recipe import run

    start = time.perf_counter()
    size = QUICK if quick else FULL
    steps = size.steps if steps is None else int(steps)
    out = Path(out)
    model_dir, data_dir, train_dir = out / "model", out / "data", out / "train"
    build_tiny_checkpoint(model_dir, arch=arch, seed=seed)
    data = write_dataset(data_dir, size, seed)
    questions = data["eval_questions"]

    processor = AutoProcessor.from_pretrained(model_dir)
    factor = processor.image_processor.patch_size * processor.image_processor.merge_size
    cfg = demo_config(model_dir, data_dir, train_dir, factor=factor, size=size, steps=steps, seed=seed,
                      overrides=overrides)
    budget = {"min_pixels": processor.image_processor.size["shortest_edge"], "max_pixels": cfg.image_max_pixels}
    before = evaluate(AutoModelForImageTextToText.from_pretrained(model_dir), processor, questions, str(data_dir),
                      **budget)
    t_train = time.perf_counter()
    result = run(cfg, progress=progress)
    train_seconds = time.perf_counter() - t_train
    after = evaluate(load_trained(str(model_dir), cfg.output_dir, cfg.finetuning_type), processor, questions,
                     str(data_dir), **budget)
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    summary = {
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "chance": chance(questions),
        "accuracy_by_kind_before": before["by_kind"],
        "accuracy_by_kind_after": after["by_kind"],
        "eval_questions": before["questions"],
        "fit_report": _ordered(result.prepared.fates),
        "fit_report_path": str(result.prepared.report_path),
        "records": result.prepared.records,
        "rows": result.prepared.rows,
        "loss_plot": str(result.loss_plot) if result.loss_plot else "",
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "steps": int(result.global_step),
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - start, 1),
        "arch": arch,
        "quick": bool(quick),
        "seed": seed,
        "model_dir": str(model_dir),
        "data": str(data_dir / f"{DATASET_NAME}.json"),
        "output_dir": str(cfg.output_dir),
        "config": _config_summary(cfg),
    }
    summary["summary_path"] = str(out / "demo_summary.json")
    _write_json(out / "demo_summary.json", summary)
    return summary


def _config_summary(cfg) -> dict:
    keys = ["finetuning_type", "freeze_vision_tower", "learning_rate", "max_steps", "per_device_train_batch_size",
            "cutoff_len", "image_max_pixels", "overflow"]
    if cfg.finetuning_type == "lora":
        keys[1:1] = ["lora_rank", "lora_target"]
    return {k: getattr(cfg, k) for k in keys}


def _ordered(fates: dict[str, int]) -> dict[str, int]:
    """Fate counts in the fit report's order (kept first), zero counts left out."""
    order = ["kept", "shrunk", "truncated", "split", "dropped", "invalid"]
    keys = [k for k in order if k in fates] + sorted(k for k in fates if k not in order)
    return {k: int(fates[k]) for k in keys if fates[k]}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_summary(s: dict) -> str:
    """The demo's result for a person: accuracy before/after, the fit report, where things are."""
    def by_kind(d: dict) -> str:
        return ", ".join(f"{k} {_pct(v)}" for k, v in d.items())

    fates = ", ".join(f"{k} {v}" for k, v in s["fit_report"].items())
    lines = [
        "",
        f"vlmtune demo: a tiny random {s['arch']} fine-tuned ({s['config']['finetuning_type']}) on rendered shapes, "
        f"{s['steps']} steps",
        f"held-out accuracy on {s['eval_questions']} single-image questions (colour and shape; chance "
        f"{_pct(s['chance'])}):",
        f"  before  {_pct(s['accuracy_before']):>6}   ({by_kind(s['accuracy_by_kind_before'])})",
        f"  after   {_pct(s['accuracy_after']):>6}   ({by_kind(s['accuracy_by_kind_after'])})",
    ]
    if s["quick"]:
        lines.append("  (--quick: colour is learnt in a few hundred steps; shape needs the full run, `vlmtune demo`)")
    lines += [
        f"fit report: {s['records']} records -> {s['rows']} training rows at cutoff_len={s['config']['cutoff_len']}: "
        f"{fates}",
        "  (the data holds some over-long samples on purpose, so that every fitting policy acts)",
        f"  one line per record, with the reason: {s['fit_report_path']}",
        f"loss plot: {s['loss_plot'] or '(nothing logged)'}"
        + (f"  (loss {s['first_loss']:.2f} -> {s['final_loss']:.2f})" if s["first_loss"] is not None else ""),
        f"data: {s['data']} (LLaMA-Factory sharegpt, with dataset_info.json)",
        f"fine-tuned model: {s['output_dir']}",
        f"time: {s['seconds']:.0f} s ({s['train_seconds']:.0f} s training)",
        f"summary: {s['summary_path']}",
    ]
    return "\n".join(lines)
