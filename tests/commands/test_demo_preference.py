"""`vlmtune demo --dpo`: a smoke run end to end (default suite) and the learning run (slow)."""

from __future__ import annotations

import json

import pytest

from vlmtune.commands.cli import main
from vlmtune.commands.demo import PREF_FULL, PREF_QUICK, run_pref_demo


def test_quick_dpo_demo_reports_pairs_and_preference_accuracy(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--dpo", "--out", str(out), "--quick", "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    s = json.loads((out / "demo_summary.json").read_text(encoding="utf-8"))
    assert s["steps"] == 2 and s["eval_pairs"] == 3 * PREF_QUICK.eval_images  # the right colour against each of 3 wrong ones
    assert set(s["by_kind_before"]) == {"colour"}
    records = json.loads((out / "data" / "demo_shape_pairs.json").read_text(encoding="utf-8"))
    report = [json.loads(x) for x in (out / "train" / "fit_report.jsonl").read_text().splitlines()]
    assert len(report) == len(records) == s["records"] == s["rows"]  # one line and one row per pair
    assert s["fit_report"]["shrunk"] == sum(len(r["images"]) == 2 for r in records)  # the two-picture pairs
    assert all(max(x["chosen_tokens"][1], x["rejected_tokens"][1]) <= s["config"]["cutoff_len"] for x in report)
    assert "held-out preference accuracy" in printed and (out / "train" / "training_rewards.png").is_file()


@pytest.mark.slow
def test_dpo_demo_moves_held_out_preference_accuracy_from_chance_to_90_percent(tmp_path):
    s = run_pref_demo(tmp_path / "demo", progress=False)
    assert s["steps"] == PREF_FULL.steps
    assert 0.4 <= s["preference_accuracy_before"] <= 0.6
    assert s["preference_accuracy_after"] >= 0.9
