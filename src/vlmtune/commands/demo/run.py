"""The demo's run: the training config a user would write, before/after accuracy, the summary."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ...config import folders
from .data import CUTOFF_LEN, DATASET_NAME, FULL, IMAGE_TOKENS, QUICK, DemoSize, write_dataset
from .data import write_json as _write_json
from .evaluation import chance, evaluate


def demo_config(model_dir: str, data_dir: str, output_dir: str, *, factor: int, size: DemoSize, steps: int,
                seed: int, overrides: dict | None = None):
    """The demo's training config, as a user would write it in YAML (LLaMA-Factory key names)."""
    from ...config import load_config

    base = {
        "model_name_or_path": str(model_dir),
        "dataset": DATASET_NAME,
        "dataset_dir": str(data_dir),
        "output_dir": str(output_dir),
        "cutoff_len": CUTOFF_LEN,
        "image_max_pixels": IMAGE_TOKENS * factor * factor,
        **training_keys(size, steps, seed),
    }
    base.update(overrides or {})
    return load_config(None, base=base)


def training_keys(size, steps: int, seed: int) -> dict:
    """How both demos train (the image demo's choices; the video demo's reasons are in video_run.py)."""
    return {
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
        # A demo run again into its folder starts over: its earlier checkpoints are vlmtune's, marked complete.
        "overwrite_output_dir": True,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.05,
        "logging_steps": max(1, steps // 60),
        "save_steps": steps + 1,  # no intermediate checkpoints: the demo keeps only the final model
        "plot_loss": True,
        "report_to": "none",
        "seed": seed,
        "dataloader_num_workers": size.loader_workers,
    }


def load_trained(model_dir: str, output_dir: str, finetuning_type: str):
    """The fine-tuned model as a user gets it from output_dir: the base plus the adapter, or the full model."""
    from transformers import AutoModelForImageTextToText

    if finetuning_type == "lora":
        from peft import PeftModel

        base = AutoModelForImageTextToText.from_pretrained(model_dir)
        return PeftModel.from_pretrained(base, output_dir)
    return AutoModelForImageTextToText.from_pretrained(output_dir)


@dataclass(frozen=True)
class Task:
    """What one demo does its own way. `run_task` runs every demo the same way around it: a tiny checkpoint in
    <out>/model, the task's data in <out>/data, its score before training, the `vlmtune train` recipe into
    <out>/train, its score after, and the summary in <out>/demo_summary.json."""

    sizes: tuple[Any, Any]  # (--quick, full): the data's size, the steps, the batch
    dataset: str  # the dataset's name in <out>/data/dataset_info.json
    write_data: Callable  # (data_dir, size, seed, processor) -> what the score and the summary read
    config: Callable  # (model_dir, data_dir, output_dir, processor, *, size, steps, seed, overrides) -> Config
    score: Callable  # (model, processor, data, cfg, data_dir) -> the held-out result
    summary: Callable  # (before, after, data, cfg, result) -> the task's own keys of the summary (result: the run's)
    config_keys: Callable  # (cfg) -> the config keys the summary repeats


def run_task(task: Task, out: str | os.PathLike, *, steps: int | None, quick: bool, arch: str, seed: int,
             progress: bool, overrides: dict | None) -> dict:
    """Build, score, fine-tune, score again; returns (and writes) the summary."""
    with one_thread():
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from ...models.tiny import build_tiny_checkpoint
        from ...train.recipe import run

        start = time.perf_counter()
        size = task.sizes[0] if quick else task.sizes[1]
        steps = size.steps if steps is None else int(steps)
        out = Path(out)
        claim_out(out)
        model_dir, data_dir, train_dir = out / "model", out / "data", out / "train"
        build_tiny_checkpoint(model_dir, arch=arch, seed=seed)
        processor = AutoProcessor.from_pretrained(model_dir)
        data = task.write_data(data_dir, size, seed, processor)
        cfg = task.config(model_dir, data_dir, train_dir, processor, size=size, steps=steps, seed=seed,
                          overrides=overrides)
        before = task.score(AutoModelForImageTextToText.from_pretrained(model_dir), processor, data, cfg, data_dir)
        t_train = time.perf_counter()
        result = run(cfg, progress=progress)
        train_seconds = time.perf_counter() - t_train
        after = task.score(load_trained(str(model_dir), cfg.output_dir, cfg.finetuning_type), processor, data, cfg,
                           data_dir)
        summary = {
            **task.summary(before, after, data, cfg, result),
            **run_facts(result, cfg, start, train_seconds, arch=arch, quick=quick, seed=seed, model_dir=model_dir,
                        data=data_dir / f"{task.dataset}.json"),
            "config": {k: getattr(cfg, k) for k in task.config_keys(cfg)},
        }
        return write_summary(out, summary)


@contextlib.contextmanager
def one_thread():
    """The model's matrices are tiny (hidden size 64): one thread beats two, and on a shared 2-core machine
    other threads' spin-waits made a step 4x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def claim_out(out: Path) -> None:
    """The demo writes its model, data, training output and summary under --out: a new or empty folder, or an
    earlier demo's (config/folders.py); anything else is refused before any work."""
    folders.check_and_claim(out, folders.DEMO, "--out")


# -- the image demo --------------------------------------------------------------------------------------
def _budget(processor, cfg) -> dict:
    """The pixel bounds the held-out pictures are scored at: the processor's floor, the config's ceiling."""
    return {"min_pixels": processor.image_processor.size["shortest_edge"], "max_pixels": cfg.image_max_pixels}


def _image_config(model_dir, data_dir, output_dir, processor, **kw):
    factor = processor.image_processor.patch_size * processor.image_processor.merge_size
    return demo_config(model_dir, data_dir, output_dir, factor=factor, **kw)


def _image_summary(before: dict, after: dict, data: dict, cfg, result) -> dict:
    return {
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "chance": chance(data["eval_questions"]),
        "accuracy_by_kind_before": before["by_kind"],
        "accuracy_by_kind_after": after["by_kind"],
        "eval_questions": before["questions"],
    }


def _config_keys(cfg) -> list[str]:
    keys = ["finetuning_type", "freeze_vision_tower", "learning_rate", "max_steps", "per_device_train_batch_size",
            "cutoff_len", "image_max_pixels", "overflow"]
    if cfg.finetuning_type == "lora":
        keys[1:1] = ["lora_rank", "lora_target"]
    return keys


IMAGE = Task(
    sizes=(QUICK, FULL),
    dataset=DATASET_NAME,
    write_data=lambda data_dir, size, seed, processor: write_dataset(data_dir, size, seed),
    config=_image_config,
    score=lambda model, processor, data, cfg, data_dir: evaluate(model, processor, data["eval_questions"],
                                                                 str(data_dir), **_budget(processor, cfg)),
    summary=_image_summary,
    config_keys=_config_keys,
)


def run_demo(out: str | os.PathLike = "vlmtune-demo", *, steps: int | None = None, quick: bool = False,
             arch: str = "qwen2_vl", seed: int = 0, progress: bool = True, overrides: dict | None = None) -> dict:
    """The image demo: build, evaluate, fine-tune, evaluate again; returns (and writes) the summary."""
    return run_task(IMAGE, out, steps=steps, quick=quick, arch=arch, seed=seed, progress=progress,
                    overrides=overrides)


def run_facts(result, cfg, start: float, train_seconds: float, **run) -> dict:
    """What both demos' summaries say about the training run: the fit report, the losses, the times, the paths."""
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    return {
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
        "arch": run["arch"],
        "quick": bool(run["quick"]),
        "seed": run["seed"],
        "model_dir": str(run["model_dir"]),
        "data": str(run["data"]),
        "output_dir": str(cfg.output_dir),
    }


def write_summary(out: Path, summary: dict) -> dict:
    summary["summary_path"] = str(out / "demo_summary.json")
    _write_json(out / "demo_summary.json", summary)
    return summary


def _ordered(fates: dict[str, int]) -> dict[str, int]:
    """Fate counts in the fit report's order (kept first), zero counts left out."""
    order = ["kept", "shrunk", "truncated", "split", "dropped", "invalid"]
    keys = [k for k in order if k in fates] + sorted(k for k in fates if k not in order)
    return {k: int(fates[k]) for k in keys if fates[k]}


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def before_after_lines(before: float, by_before: dict, after: float, by_after: dict) -> list[str]:
    """Every demo's two result lines: the held-out score before and after training, and per kind of question."""
    def per_kind(d: dict) -> str:
        return ", ".join(f"{k} {pct(v)}" for k, v in d.items())

    return [f"  before  {pct(before):>6}   ({per_kind(by_before)})",
            f"  after   {pct(after):>6}   ({per_kind(by_after)})"]


def format_summary(s: dict) -> str:
    """The demo's result for a person: accuracy before/after, the fit report, where things are."""
    lines = [
        "",
        f"vlmtune demo: a tiny random {s['arch']} fine-tuned ({s['config']['finetuning_type']}) on rendered shapes, "
        f"{s['steps']} steps",
        f"held-out accuracy on {s['eval_questions']} single-image questions (colour and shape; chance "
        f"{pct(s['chance'])}):",
        *before_after_lines(s["accuracy_before"], s["accuracy_by_kind_before"], s["accuracy_after"],
                            s["accuracy_by_kind_after"]),
    ]
    if s["quick"]:
        lines.append("  (--quick: colour is learnt in a few hundred steps; shape needs the full run, `vlmtune demo`)")
    return "\n".join(lines + run_lines(s, "(the data holds some over-long samples on purpose, so that every "
                                         "fitting policy acts)", "LLaMA-Factory sharegpt, with dataset_info.json"))


def run_lines(s: dict, fit_note: str | None, data_note: str) -> list[str]:
    """The end of both demos' printed summary: the fit report, the loss, where things are, the time."""
    fates = ", ".join(f"{k} {v}" for k, v in s["fit_report"].items())
    return [
        f"fit report: {s['records']} records -> {s['rows']} training rows at cutoff_len={s['config']['cutoff_len']}: "
        f"{fates}",
        *([f"  {fit_note}"] if fit_note else []),
        f"  one line per record, with the reason: {s['fit_report_path']}",
        f"loss plot: {s['loss_plot'] or '(nothing logged)'}"
        + (f"  (loss {s['first_loss']:.2f} -> {s['final_loss']:.2f})" if s["first_loss"] is not None else ""),
        f"data: {s['data']} ({data_note})",
        f"fine-tuned model: {s['output_dir']}",
        f"time: {s['seconds']:.0f} s ({s['train_seconds']:.0f} s training)",
        f"summary: {s['summary_path']}",
    ]
