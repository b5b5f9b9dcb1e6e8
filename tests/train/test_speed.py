"""The CPU micro-benchmarks and the precision fallback `vlmtune train` takes from them."""

from __future__ import annotations

import pytest

from vlmtune.config import load_config
from vlmtune.train import recipe, speed

REQUIRED = {"model_name_or_path": "m", "dataset": "d", "output_dir": "o"}


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(recipe.torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("keys, slowdown, bf16, said", [
    ({"bf16": True}, 23.1, False, "bf16=true on a CPU where bfloat16 autocast measured 23.1x slower than float32: "
                                  "training in float32 instead (set force_cpu_bf16: true to keep bf16)"),
    ({"bf16": True, "force_cpu_bf16": True}, 23.1, True, None),
    ({"bf16": True}, 1.1, True, None),
    ({"bf16": False}, 23.1, False, None),
])
def test_train_falls_back_to_float32_where_bf16_is_slow(no_gpu, capsys, keys, slowdown, bf16, said):
    cfg = load_config(None, base={**REQUIRED, **keys})
    out = recipe.cpu_precision(cfg, slowdown=lambda: slowdown)
    assert out.bf16 is bf16
    assert out.force_cpu_bf16 is cfg.force_cpu_bf16
    printed = capsys.readouterr().out.strip()
    assert printed == (said or "")


def test_micro_benchmarks_measure_positive_figures():
    assert speed.cpu_bf16_slowdown(tokens=16, hidden=32, repeats=1) > 0
    assert speed.cpu_flops(tokens=16, hidden=32, repeats=1) > 0
