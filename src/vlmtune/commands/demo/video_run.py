"""`vlmtune demo --video`: the video demo's config, before/after accuracy and summary.

The same steps as the image demo (run.py): a tiny random checkpoint, the synthetic motion clips
(video_data.py), held-out accuracy before training, the real `vlmtune train` recipe, accuracy after.
"""

from __future__ import annotations

import os

from .run import Task, before_after_lines, run_lines, run_task, training_keys
from .run import pct as _pct
from .video_data import FPS, FRAMES, SIDE_PATCHES, VIDEO_DATASET_NAME, VIDEO_FULL, VIDEO_QUICK, VideoDemoSize, \
    write_video_dataset
from .video_eval import evaluate_video, video_chance

# A clip costs 32 video tokens (2 temporal patches x 4 x 4 merged patches); with the question and the
# chat template a sample is ~75 tokens.
VIDEO_CUTOFF_LEN = 128


def video_demo_config(model_dir: str, data_dir: str, output_dir: str, *, size: VideoDemoSize, steps: int, seed: int,
                      overrides: dict | None = None):
    """The video demo's training config, as a user would write it in YAML (LLaMA-Factory key names).

    No video_* keys: the clips are sampled at the processor's rate (2 fps for the tiny checkpoint), which
    takes frames 0, 2, 4, 6 of each 8-frame, 4 fps clip, and 112 x 112 px frames are inside every bound.
    """
    from ...config import load_config

    base = {
        "model_name_or_path": str(model_dir),
        "dataset": VIDEO_DATASET_NAME,
        "dataset_dir": str(data_dir),
        "output_dir": str(output_dir),
        "cutoff_len": VIDEO_CUTOFF_LEN,
        # Full fine-tuning of every part, for the image demo's reasons (run.py): the model is random, so
        # there are no features for LoRA to adapt. Motion is read by the vision tower's patch embedding,
        # a Conv3d over the two frames of a temporal patch, so the tower must train.
        **training_keys(size, steps, seed),
    }
    base.update(overrides or {})
    return load_config(None, base=base)


def video_spec(cfg):
    """The VideoSpec the data path plans the training clips with: the processor's, with the config's video keys."""
    from ...models.load import load_spec

    return load_spec(cfg.model, cfg.fit).video


def _write_data(data_dir, size: VideoDemoSize, seed: int, processor) -> dict:
    return {**write_video_dataset(data_dir, size, seed, side=_side(processor)), "side": _side(processor)}


def _side(processor) -> int:
    vp = processor.video_processor
    return SIDE_PATCHES * vp.patch_size * vp.merge_size


def _summary(before: dict, after: dict, data: dict, cfg, result) -> dict:
    side = data["side"]
    grid = video_spec(cfg).for_clip(FRAMES, FPS).plan(FRAMES, FPS, side, side)
    return {
        "task": "video",
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "chance": video_chance(),
        "accuracy_by_direction_before": before["by_direction"],
        "accuracy_by_direction_after": after["by_direction"],
        "picked_before": before["picked"],
        "picked_after": after["picked"],
        "eval_questions": before["questions"],
        "clip": {"frames": FRAMES, "fps": FPS, "width": side, "height": side, "codec": data["codec"],
                 "sampled_frames": list(grid.indices), "grid_thw": grid.thw, "video_tokens": grid.tokens},
    }


VIDEO = Task(
    sizes=(VIDEO_QUICK, VIDEO_FULL),
    dataset=VIDEO_DATASET_NAME,
    write_data=_write_data,
    config=lambda model_dir, data_dir, output_dir, processor, **kw: video_demo_config(model_dir, data_dir, output_dir,
                                                                                      **kw),
    score=lambda model, processor, data, cfg, data_dir: evaluate_video(model, processor, data["eval_questions"],
                                                                       str(data_dir), video_spec(cfg)),
    summary=_summary,
    config_keys=lambda cfg: ["finetuning_type", "freeze_vision_tower", "learning_rate", "max_steps",
                             "per_device_train_batch_size", "cutoff_len"],
)


def run_video_demo(out: str | os.PathLike = "vlmtune-demo-video", *, steps: int | None = None, quick: bool = False,
                   arch: str = "qwen2_vl", seed: int = 0, progress: bool = True, overrides: dict | None = None) -> dict:
    """Build, evaluate, fine-tune, evaluate again; returns (and writes) the summary."""
    return run_task(VIDEO, out, steps=steps, quick=quick, arch=arch, seed=seed, progress=progress,
                    overrides=overrides)


def format_video_summary(s: dict) -> str:
    """The video demo's result for a person: accuracy before/after, the clips, the fit report, where things are."""
    c = s["clip"]
    lines = [
        "",
        f"vlmtune demo --video: a tiny random {s['arch']} fine-tuned ({s['config']['finetuning_type']}) on clips of "
        f"a moving shape, {s['steps']} steps",
        f"clips: {c['frames']} frames of {c['width']}x{c['height']} at {c['fps']} fps ({c['codec']}); sampled frames "
        f"{c['sampled_frames']} -> grid {c['grid_thw']}, {c['video_tokens']} video tokens",
        f"held-out accuracy on {s['eval_questions']} clips (which way does the shape move; "
        f"chance {_pct(s['chance'])}):",
        *before_after_lines(s["accuracy_before"], s["accuracy_by_direction_before"], s["accuracy_after"],
                            s["accuracy_by_direction_after"]),
    ]
    if s["quick"]:
        lines.append("  (--quick: too few steps to learn motion; the full run is `vlmtune demo --video`)")
    return "\n".join(lines + run_lines(s, None, "LLaMA-Factory sharegpt with videos, with dataset_info.json"))
