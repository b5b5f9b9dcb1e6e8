"""Checkpoints that are complete or not chosen.

The Trainer writes a checkpoint's files one after another; a kill in between leaves a folder that
looks like a checkpoint but cannot be resumed from. A marker written after the Trainer's save
returns (`on_save`) tells complete checkpoints apart, and resume picks the newest marked one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading

from transformers import TrainerCallback

from ..errors import ConfigError

MARKER = "vlmtune_complete"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# What the data order and the step count depend on: resuming with other values silently changes both.
LAYOUT_KEYS = ("world_size", "per_device_train_batch_size", "gradient_accumulation_steps")


def run_layout(args) -> dict:
    return {"world_size": args.world_size, "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps}


class CompleteCheckpointCallback(TrainerCallback):
    """Marks a checkpoint complete (with the run's layout) once the Trainer has written all of it."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(path):
                with open(os.path.join(path, MARKER), "w", encoding="utf-8") as f:
                    json.dump({"global_step": state.global_step, **run_layout(args)}, f)
                    f.flush()
                    os.fsync(f.fileno())
        return control


class GracefulStopCallback(TrainerCallback):
    """SIGTERM (a preemption, `kill`, a scheduler's time limit): finish the current step, save a
    checkpoint and stop cleanly. Under DDP the ranks agree on stopping with one all-reduce per step,
    so a signal that reaches one rank only cannot leave the others waiting."""

    def __init__(self):
        self.requested = False
        self.stopped_at: int | None = None
        self._previous = None

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return control

    def _handle(self, signum, frame):
        self.requested = True

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed():
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        return control

    def _agreed(self) -> bool:
        import torch

        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def checkpoints(output_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, d)) for d in os.listdir(output_dir)
             if (m := _CHECKPOINT.match(d)) and os.path.isdir(os.path.join(output_dir, d))]
    return sorted(found)


def is_complete(path: str) -> bool:
    return os.path.exists(os.path.join(path, MARKER)) and os.path.exists(os.path.join(path, "trainer_state.json"))


def last_complete_checkpoint(output_dir: str) -> str | None:
    for _, path in reversed(checkpoints(output_dir)):
        if is_complete(path):
            return path
    return None


def resolve_resume(value, output_dir: str) -> str | None:
    """resume_from_checkpoint: true → the last complete checkpoint in output_dir; a path → that one."""
    if value is None or value is False:
        return None
    if value is True:
        path = last_complete_checkpoint(output_dir)
        if path is None:
            raise ConfigError([f"resume_from_checkpoint=true but {output_dir} holds no complete checkpoint; "
                               "remove resume_from_checkpoint to start from scratch"])
        check_checkpoint(path)
        return path
    if not os.path.isdir(value):
        raise ConfigError([f"resume_from_checkpoint={value!r} is not a folder; set it to a checkpoint-N folder "
                           "or to true for the last complete one"])
    if not is_complete(value):
        raise ConfigError([f"resume_from_checkpoint={value!r} is an incomplete checkpoint (interrupted while "
                           "saving); set resume_from_checkpoint to true to take the last complete one"])
    check_checkpoint(value)
    return value


def earlier_run_problem(output_dir: str, resume: str | None, overwrite: bool) -> str | None:
    """An output_dir holding an earlier run's checkpoints must be continued (resume_from_checkpoint) or started
    over (overwrite_output_dir: true, as in transformers' and LLaMA-Factory's scripts): a new run among them would
    have the Trainer's save_total_limit delete its own newest checkpoint (they are sorted by step) and a later
    `resume_from_checkpoint: true` pick the earlier run's. Starting over removes only the checkpoints vlmtune
    marked complete, so one cut short (no marker, maybe not vlmtune's) is refused instead. A resume from a
    checkpoint elsewhere starts a new lineage here, so it too must not meet earlier checkpoints."""
    if continues_in(output_dir, resume):
        return None
    found = [path for _, path in checkpoints(output_dir)]
    if not found:
        return None
    names = ", ".join(os.path.basename(p) for p in found[:3])
    names += f" and {len(found) - 3} more" if len(found) > 3 else ""
    if not overwrite:
        cont = "resume_from_checkpoint: true to continue it, " if last_complete_checkpoint(output_dir) else ""
        return (f"output_dir={output_dir!r} holds an earlier run's checkpoints ({names}); set {cont}"
                "overwrite_output_dir: true to train from scratch in it (its complete checkpoints are removed first), "
                "or output_dir to a new folder")
    cut = [os.path.basename(p) for p in found if not is_complete(p) or os.path.islink(p)]
    if cut:
        return (f"output_dir={output_dir!r}: overwrite_output_dir: true removes only checkpoints vlmtune marked "
                f"complete ({MARKER}), and {', '.join(cut)} has none (cut short, or not vlmtune's); remove it "
                "yourself, or set output_dir to a new folder")
    return None


def continues_in(output_dir: str, resume: str | None) -> bool:
    """Whether the run resumes from one of output_dir's own checkpoints (so they are its history, kept)."""
    return resume is not None and os.path.realpath(os.path.dirname(resume.rstrip("/"))) == os.path.realpath(output_dir)


def remove_earlier_checkpoints(output_dir: str) -> list[str]:
    """overwrite_output_dir: the earlier run's checkpoints, each marked complete by vlmtune in an output_dir that
    vlmtune marked, removed (before the first step, after every check passed); the removed paths."""
    from ..config import folders

    if not folders.is_marked(output_dir, folders.OUTPUT):
        return []
    removed = []
    for _, path in checkpoints(output_dir):
        if is_complete(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def layout_change(checkpoint: str, args) -> str | None:
    """A sentence naming what differs between the checkpoint's run and this one, or None."""
    try:
        with open(os.path.join(checkpoint, MARKER), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None  # checkpoints marked by an earlier version record no layout
    now = run_layout(args)
    diffs = [f"{k} {saved[k]} -> {now[k]}" for k in LAYOUT_KEYS if k in saved and saved[k] != now[k]]
    if not diffs:
        return None
    return (f"resuming {checkpoint} with a different layout ({', '.join(diffs)}): the global batch, the data "
            "order and the meaning of global_step change, so the run will not continue as it would have")


def check_checkpoint(path: str) -> None:
    """Refuse (ConfigError naming each bad file) a checkpoint whose files cannot be what the Trainer reads back,
    before the model loads and the data is prepared: trainer_state.json must be a JSON object with a global_step;
    each .safetensors file a complete header with its data; each torch.save file (optimizer.pt, scheduler.pt,
    rng_state.pth, training_args.bin) a complete zip archive. Cheap: headers and zip directories, not the data."""
    problems = []
    fix = ("set resume_from_checkpoint to an earlier checkpoint-N folder, or remove this checkpoint and set "
           "resume_from_checkpoint: true for the last complete one before it")
    state = os.path.join(path, "trainer_state.json")
    try:
        with open(state, encoding="utf-8") as f:
            data = json.loads(f.read(64 * 1024 * 1024))
        if not isinstance(data, dict) or not isinstance(data.get("global_step"), int):
            raise ValueError("it has no integer global_step")
    except (OSError, ValueError) as e:
        problems.append(f"resume_from_checkpoint: {state} is not a trainer state ({_short(e)}); {fix}")
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        why = _weights_problem(full) if os.path.isfile(full) else None
        if why:
            problems.append(f"resume_from_checkpoint: {full} {why}; {fix}")
    if problems:
        raise ConfigError(problems)


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e)[:120]}"


def _weights_problem(path: str) -> str | None:
    """What is wrong with a weights or state file, or None (other files are not checked)."""
    import struct
    import zipfile

    if path.endswith(".safetensors"):
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    return f"is truncated (a {n:,}-byte header in {size:,} bytes)"
                header = json.loads(f.read(n))
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
            if 8 + n + max(ends, default=0) > size:
                return f"is truncated ({size:,} bytes, its tensors need {8 + n + max(ends):,})"
        except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError) as e:
            return f"is not a safetensors file ({_short(e)})"
    elif path.endswith((".pt", ".pth", ".bin")):
        try:
            with zipfile.ZipFile(path) as z:
                z.namelist()
        except (OSError, zipfile.BadZipFile) as e:
            return f"is not a complete torch.save archive ({_short(e)})"
    return None
