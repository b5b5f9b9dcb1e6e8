"""The CPU micro-benchmarks and the precision fallback `vlmtune train` takes from them."""

from __future__ import annotations

import pytest

from vlmtune.config import load_config
from vlmtune.train import recipe, speed

REQUIRED = {"model_name_or_path": "m", "dataset": "d", "output_dir": "o"}


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(recipe.torch.cuda, "is_available", lambda: False)


AVX512 = frozenset({"avx512_bf16"})
AMX = frozenset({"avx512_bf16", "amx_bf16"})


@pytest.mark.parametrize("keys, flags, bf16, said", [
    ({"bf16": True}, AVX512, False, "bf16=true on a CPU without fast bf16 (the CPU has AVX512-BF16 but no AMX-BF16, "
                                    "and its bf16 kernels are slower than float32 there): training in float32 "
                                    "instead (set force_cpu_bf16: true to keep bf16; `vlmtune doctor` measures the "
                                    "difference)"),
    ({"bf16": True}, frozenset(), False, "bf16=true on a CPU without fast bf16 (the CPU has no bf16 instructions "
                                         "(AVX512-BF16 or AMX-BF16)): training in float32 instead (set "
                                         "force_cpu_bf16: true to keep bf16; `vlmtune doctor` measures the "
                                         "difference)"),
    ({"bf16": True, "force_cpu_bf16": True}, AVX512, True, None),
    ({"bf16": True}, AMX, True, None),
    ({"bf16": False}, AMX, False, None),
])
def test_train_precision_on_the_cpu_follows_its_bf16_instructions(no_gpu, capsys, keys, flags, bf16, said):
    cfg = load_config(None, base={**REQUIRED, **keys})
    out = recipe.cpu_precision(cfg, decision=speed.cpu_bf16(flags))
    assert out.bf16 is bf16
    assert out.force_cpu_bf16 is cfg.force_cpu_bf16
    printed = capsys.readouterr().out.strip()
    assert printed == (said or "")


def test_the_choice_is_deterministic_and_never_timed(no_gpu, monkeypatch):
    monkeypatch.setattr(speed, "_time_block", lambda *a: pytest.fail("train timed a benchmark to choose"))
    cfg = load_config(None, base={**REQUIRED, "bf16": True})
    speed.cpu_bf16.cache_clear()
    choices = {recipe.cpu_precision(cfg).bf16 for _ in range(5)}
    assert choices == {speed.cpu_bf16_flags() >= {"amx_bf16"}}


def test_flags_come_from_proc_cpuinfo_or_torch(monkeypatch):
    import builtins

    real_open = builtins.open

    def no_cpuinfo(path, *a, **k):
        if path == "/proc/cpuinfo":
            raise FileNotFoundError(path)
        return real_open(path, *a, **k)

    import torch

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(builtins, "open", no_cpuinfo)
    assert speed.cpu_bf16_flags() == frozenset({"amx_bf16"})


def test_micro_benchmarks_measure_positive_figures():
    assert speed.cpu_bf16_slowdown(tokens=16, hidden=32, repeats=1) > 0
    assert speed.cpu_flops(tokens=16, hidden=32, repeats=1) > 0
