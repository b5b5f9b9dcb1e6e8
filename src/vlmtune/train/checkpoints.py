"""Checkpoints that are complete or not chosen.

The Trainer writes a checkpoint's files one after another; a kill in between leaves a folder that
looks like a checkpoint but cannot be resumed from. A marker written after the Trainer's save
returns (`on_save`) tells complete checkpoints apart, and resume picks the newest marked one.
"""

from __future__ import annotations

import os
import re

from transformers import TrainerCallback

from ..errors import ConfigError

MARKER = "vlmtune_complete"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CompleteCheckpointCallback(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(path):
                with open(os.path.join(path, MARKER), "w", encoding="utf-8") as f:
                    f.write(f"{state.global_step}\n")
                    f.flush()
                    os.fsync(f.fileno())
        return control


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
        return path
    if not os.path.isdir(value):
        raise ConfigError([f"resume_from_checkpoint={value!r} is not a folder; set it to a checkpoint-N folder "
                           "or to true for the last complete one"])
    if not is_complete(value):
        raise ConfigError([f"resume_from_checkpoint={value!r} is an incomplete checkpoint (interrupted while "
                           "saving); set resume_from_checkpoint to true to take the last complete one"])
    return value
