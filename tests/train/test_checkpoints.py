"""train/checkpoints.py: an earlier run's checkpoints in output_dir are continued or started over, never mixed."""

from __future__ import annotations

import os

import pytest

from vlmtune.config import folders
from vlmtune.train.checkpoints import MARKER, earlier_run_problem, remove_earlier_checkpoints


def checkpoint(out, step: int, complete: bool = True):
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    if complete:
        (path / MARKER).write_text("{}")
    return path


def test_no_checkpoints_or_a_resume_is_no_problem(tmp_path):
    assert earlier_run_problem(str(tmp_path / "absent"), None, False) is None
    (tmp_path / "adapter_model.safetensors").write_text("x")  # an earlier run's model is written over by name
    assert earlier_run_problem(str(tmp_path), None, False) is None
    checkpoint(tmp_path, 4)
    assert earlier_run_problem(str(tmp_path), str(tmp_path / "checkpoint-4"), False) is None
    assert earlier_run_problem(str(tmp_path), str(tmp_path / "checkpoint-4"), True) is None
    # resuming from a checkpoint elsewhere starts a new lineage here: the earlier checkpoints are in its way
    assert earlier_run_problem(str(tmp_path), str(tmp_path / "other" / "checkpoint-9"), False).startswith(
        f"output_dir={str(tmp_path)!r} holds an earlier run's checkpoints (checkpoint-4)")
    assert earlier_run_problem(str(tmp_path), str(tmp_path / "other" / "checkpoint-9"), True) is None


def test_earlier_checkpoints_without_resume_or_overwrite_are_refused(tmp_path):
    for step in (2, 4, 6, 8):
        checkpoint(tmp_path, step)
    assert earlier_run_problem(str(tmp_path), None, False) == (
        f"output_dir={str(tmp_path)!r} holds an earlier run's checkpoints (checkpoint-2, checkpoint-4, checkpoint-6 "
        "and 1 more); set resume_from_checkpoint: true to continue it, overwrite_output_dir: true to train from "
        "scratch in it (its complete checkpoints are removed first), or output_dir to a new folder")


def test_only_cut_short_checkpoints_offer_no_resume(tmp_path):
    checkpoint(tmp_path, 3, complete=False)
    assert earlier_run_problem(str(tmp_path), None, False) == (
        f"output_dir={str(tmp_path)!r} holds an earlier run's checkpoints (checkpoint-3); set overwrite_output_dir: "
        "true to train from scratch in it (its complete checkpoints are removed first), or output_dir to a new folder")


def test_overwrite_refuses_a_checkpoint_vlmtune_did_not_mark_complete(tmp_path):
    checkpoint(tmp_path, 2)
    checkpoint(tmp_path, 3, complete=False)
    assert earlier_run_problem(str(tmp_path), None, True) == (
        f"output_dir={str(tmp_path)!r}: overwrite_output_dir: true removes only checkpoints vlmtune marked complete "
        "(vlmtune_complete), and checkpoint-3 has none (cut short, or not vlmtune's); remove it yourself, or set "
        "output_dir to a new folder")


def test_overwrite_removes_only_complete_checkpoints_in_a_marked_output_dir(tmp_path):
    out = tmp_path / "out"
    folders.claim(out, folders.OUTPUT)
    for step in (2, 4):
        checkpoint(out, step)
    (out / "notes.txt").write_text("mine")
    (out / "checkpoint-x").mkdir()  # not a checkpoint name
    assert earlier_run_problem(str(out), None, True) is None
    assert remove_earlier_checkpoints(str(out)) == [str(out / "checkpoint-2"), str(out / "checkpoint-4")]
    assert sorted(os.listdir(out)) == [folders.MARKER_FILE, "checkpoint-x", "notes.txt"]


@pytest.mark.parametrize("marked_as", [None, folders.EXPORT])
def test_nothing_is_removed_from_an_output_dir_vlmtune_did_not_mark_as_its_own(tmp_path, marked_as):
    if marked_as:
        folders.mark(tmp_path, marked_as)
    checkpoint(tmp_path, 2)
    assert remove_earlier_checkpoints(str(tmp_path)) == []
    assert (tmp_path / "checkpoint-2" / MARKER).exists()
