"""Every shipped YAML is itself a test case: it must load against the config schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmtune.config import load_config

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_loads(path):
    cfg = load_config(str(path))
    assert cfg.model_name_or_path and cfg.output_dir and cfg.dataset
