"""The data driver: streamed prepare equals the whole-list prepare it replaced; one pipeline for every command."""

from __future__ import annotations

import json

import pytest

from _golden import CONFIGS, GOLDEN, build_dataset, produce


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_reproduces_the_golden_rows_and_report(tmp_path, tiny_ckpt, make_image, name, workers):
    root = tmp_path.resolve()
    data = build_dataset(root, make_image)
    got = produce(root, data, tiny_ckpt("qwen2_vl"), name, f"preprocessing_num_workers={workers}")
    want = json.loads((GOLDEN / f"{name}.json").read_text())
    assert len(got["report"]) == len(want["report"]) == 55
    assert got["report"] == want["report"]
    assert got["rows"] == want["rows"]
