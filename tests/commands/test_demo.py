"""`vlmtune demo`: the quick variant end to end (default suite) and the full learning run (slow)."""

from __future__ import annotations

import json

import pytest

from vlmtune.commands.cli import main
from vlmtune.config import folders
from vlmtune.commands.demo import COLOURS, DATASET_NAME, QUICK, SHAPES, run_demo, write_dataset

SUMMARY_TYPES = {
    "accuracy_before": float,
    "accuracy_after": float,
    "chance": float,
    "fit_report": dict,
    "loss_plot": str,
    "steps": int,
    "seconds": float,
    "train_seconds": float,
    "records": int,
    "rows": int,
    "eval_questions": int,
}


def _records(data_dir):
    return json.loads((data_dir / f"{DATASET_NAME}.json").read_text(encoding="utf-8"))


def test_quick_demo_writes_summary_report_and_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--steps", "12"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "demo_summary.json").read_text(encoding="utf-8"))

    for key, kind in SUMMARY_TYPES.items():
        assert type(summary[key]) is kind, (key, summary[key])
    assert summary["steps"] == 12
    assert 0.0 <= summary["accuracy_before"] <= 1.0 and 0.0 <= summary["accuracy_after"] <= 1.0
    # 3 shape and 4 colour candidates, one question of each kind per held-out picture
    assert summary["chance"] == pytest.approx((1 / len(SHAPES) + 1 / len(COLOURS)) / 2)
    assert summary["eval_questions"] == 2 * QUICK.eval_images

    fates = summary["fit_report"]
    assert all(type(k) is str and type(v) is int for k, v in fates.items())
    n_records = len(_records(out / "data"))
    assert sum(fates.values()) == summary["records"] == n_records
    assert {"shrunk", "truncated", "split"} <= set(fates), fates  # the long samples met every policy
    report = (out / "train" / "fit_report.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(report) == n_records
    assert summary["rows"] > n_records - fates.get("dropped", 0)  # split pieces are extra rows

    assert summary["loss_plot"].endswith(".png")
    assert (out / "train" / "training_loss.png").is_file()
    assert summary["loss_plot"] == str(out / "train" / "training_loss.png")
    assert "held-out accuracy" in printed and summary["loss_plot"] in printed
    owners = {p: folders.owner_of(out / p) for p in ("", "model", "train", "data")}
    assert owners == {"": folders.DEMO, "model": folders.TINY, "train": folders.OUTPUT, "data": None}


@pytest.mark.parametrize("variant", [[], ["--video"], ["--dpo"]])
def test_the_demo_refuses_a_folder_it_did_not_create(tmp_path, capsys, variant):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["demo", *variant, "--out", str(out), "--quick"]) == 2
    assert capsys.readouterr().err == (
        f"error: --out {out} is a folder with content that vlmtune did not create (it has no .vlmtune-owned); "
        "vlmtune writes into or replaces only folders it created and never deletes or overwrites yours: set --out to "
        "a new folder, or empty that one yourself\n")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_dataset_is_sharegpt_seeded_and_eval_is_held_out(tmp_path):
    a = write_dataset(tmp_path / "a", QUICK, seed=3)
    b = write_dataset(tmp_path / "b", QUICK, seed=3)
    names = ("dataset_info.json", f"{DATASET_NAME}.json", "eval.json")
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for png in sorted((tmp_path / "a" / "images").iterdir())[:10]:
        assert png.read_bytes() == (tmp_path / "b" / "images" / png.name).read_bytes()

    info = json.loads((tmp_path / "a" / "dataset_info.json").read_text())
    assert info[DATASET_NAME]["formatting"] == "sharegpt"
    records = _records(tmp_path / "a")
    assert a["records"] == len(records)
    for r in records:
        placeholders = sum(m["content"].count("<image>") for m in r["messages"])
        assert placeholders == len(r["images"]) >= 1
        assert [m["role"] for m in r["messages"]][-1] == "assistant"
    kinds = {len(r["images"]) for r in records}
    assert {1, 2} <= kinds and max(kinds) >= 8  # single, two-image and long multi-image samples
    assert any(len(r["messages"]) > 2 for r in records if len(r["images"]) == 1)  # multi-turn

    trained = {p for r in records for p in r["images"]}
    held_out = {q["image"] for q in a["eval_questions"]}
    assert held_out and not held_out & trained
    assert a["eval_questions"] == b["eval_questions"]
    for q in a["eval_questions"]:
        assert q["answer"] in (COLOURS if q["kind"] == "colour" else SHAPES)


@pytest.mark.slow
def test_full_demo_learns(tmp_path):
    summary = run_demo(tmp_path / "demo", progress=False)
    assert summary["accuracy_before"] <= summary["chance"] + 0.25
    assert summary["accuracy_after"] >= 0.9


@pytest.mark.slow
def test_full_demo_learns_on_qwen3_5(tmp_path):
    """`vlmtune demo --arch qwen3_5`: the hybrid model (linear attention, thinking template) learns the task too."""
    summary = run_demo(tmp_path / "demo", arch="qwen3_5", progress=False)
    assert summary["accuracy_before"] <= summary["chance"] + 0.25
    assert summary["accuracy_after"] >= 0.9
