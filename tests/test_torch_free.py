"""The data path imports no torch (issue 26): a guard for everyone who changes an import.

Header-only accounting needs the tokenizer, the chat template and the processor's JSON, so the modules of the
read -> validate -> encode -> fit path, inspect, the doctor and the CLI must import without torch or
transformers' model code; torch is imported only where tensors are made (collate, train, chat, export, the
doctor's device and memory checks). Each check runs in a fresh interpreter, since this one has torch loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# torch, and what would pull it or print on import (bitsandbytes warns about its CPU kernels).
HEAVY = ("torch", "bitsandbytes", "peft", "accelerate", "torchvision")

DATA_PATH_MODULES = (
    "vlmtune.data.drivers.pipeline",
    "vlmtune.data.drivers.prepare",
    "vlmtune.data.sources.readers",
    "vlmtune.data.sources.formats",
    "vlmtune.data.stages.validate",
    "vlmtune.data.stages.encode",
    "vlmtune.data.stages.fit",
    "vlmtune.data.stages.pack",
    "vlmtune.models.load",
    "vlmtune.models.spec",
    "vlmtune.models.video_grid",
    "vlmtune.commands.cli",
    "vlmtune.commands.inspect",
    "vlmtune.commands.doctor",
)


def heavy_modules_after(code: str, env: dict | None = None) -> list[str]:
    """The HEAVY modules (and transformers' model/processor modules) loaded once `code` has run, in a fresh
    interpreter."""
    probe = (
        f"{code}\nimport json, sys\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "heavy += sorted(m for m in sys.modules if m.startswith('transformers.models.') "
        "or m.startswith('transformers.modeling') or m.startswith('transformers.processing'))\n"
        "print('HEAVY=' + json.dumps(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("HEAVY=")][-1]
    return json.loads(line[len("HEAVY="):])


@pytest.mark.parametrize("module", DATA_PATH_MODULES)
def test_data_path_modules_import_no_torch(module):
    assert heavy_modules_after(f"import {module}") == []


def _small_dataset(folder, make_image) -> str:
    make_image(folder / "a.png", 120, 80)
    make_image(folder / "b.jpg", 300, 500)
    rows = [
        {"id": "s0", "messages": [{"role": "user", "content": "<image>What is it?"},
                                  {"role": "assistant", "content": "A red box."}], "images": ["a.png"]},
        {"id": "s1", "messages": [{"role": "user", "content": "<image><image>Compare."},
                                  {"role": "assistant", "content": "Same colour."}], "images": ["a.png", "b.jpg"]},
        {"id": "s2", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ]
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _small_pairs(folder, make_image) -> str:
    """The same prompts as preference pairs (stage dpo): chosen / rejected answers."""
    rows = [json.loads(x) for x in open(_small_dataset(folder, make_image), encoding="utf-8")]
    pairs = [{"messages": r["messages"][:-1], "chosen": r["messages"][-1]["content"], "rejected": "No.",
              "images": r.get("images", [])} for r in rows]
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return str(path)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_inspect_runs_without_torch(tiny_ckpt, tmp_path, make_image, stage):
    """`vlmtune inspect` end to end in a fresh interpreter: the summary is right, torch was never imported,
    and nothing but the summary is printed (no import notices of optional libraries); preference pairs too."""
    data = (_small_dataset if stage == "sft" else _small_pairs)(tmp_path, make_image)
    code = ("import contextlib, io, sys\nfrom vlmtune.commands.cli import main\nout = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            f"    rc = main(['inspect', '--model', {str(tiny_ckpt('qwen2_vl'))!r}, '--data', {data!r}, '--json', "
            f"'--stage', {stage!r}])\n"
            "assert rc == 0, rc\nprint('SUMMARY=' + out.getvalue().replace(chr(10), ' '))\n")
    out = subprocess.run([sys.executable, "-c", code + "import json\nprint('HEAVY=' + json.dumps("
                          f"[m for m in {HEAVY!r} if m in sys.modules]))"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.split("SUMMARY=", 1)[1].split("\nHEAVY=")[0])
    assert (summary["samples"], summary["images"], summary["invalid_samples"], summary["stage"]) == (3, 3, 0, stage)
    assert json.loads(out.stdout.rsplit("HEAVY=", 1)[1]) == []
    assert out.stderr == ""


def test_prepare_workers_start_without_torch(tiny_ckpt):
    """prepare's and inspect's worker processes fork from a server that imported only the data path, even
    when the process asking for them holds torch (as `train` does)."""
    import torch  # noqa: F401  (the parent has torch; the workers must not inherit it)

    from vlmtune.data.drivers.pipeline import Stages, worker_pool
    from vlmtune.models.load import load_spec

    loaded = load_spec(str(tiny_ckpt("qwen2_vl")))
    with worker_pool(2, loaded, Stages()) as pool:
        found = [pool.submit(eval, f"[m for m in {HEAVY!r} if m in __import__('sys').modules]").result()
                 for _ in range(4)]
    assert found == [[]] * 4


def test_bitsandbytes_notice_only_when_quantizing():
    """peft imports bitsandbytes whenever it is installed, and bitsandbytes logs a CPU-kernel notice at import:
    the CLI keeps it out of commands that asked for no quantization, and lets it through for those that did."""
    pytest.importorskip("bitsandbytes")
    code = ("import logging\nfrom vlmtune.models.quant import quiet_bitsandbytes, BITSANDBYTES_NOTICE\n"
            "quiet_bitsandbytes()\nimport peft\n"
            "rec = logging.LogRecord('bitsandbytes.backends.cpu.ops', logging.WARNING, 'x', 1, "
            "'Failed to load CPU gemm_4bit_forward from kernels-community: %s', ('x',), None)\n"
            "assert not BITSANDBYTES_NOTICE.filter(rec)\nBITSANDBYTES_NOTICE.quantizing = True\n"
            "assert BITSANDBYTES_NOTICE.filter(rec)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "gemm_4bit" not in out.stderr


@pytest.mark.slow
def test_doctor_prints_no_bitsandbytes_notice(tiny_ckpt, tmp_path, make_image):
    data = _small_dataset(tmp_path, make_image)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_ckpt('qwen2_vl')}\ndataset: {data}\noutput_dir: {tmp_path / 'out'}\n"
                   "cutoff_len: 512\nbf16: false\n")
    out = subprocess.run([sys.executable, "-m", "vlmtune", "doctor", str(cfg)], capture_output=True, text=True,
                         timeout=600)
    assert "data" in out.stdout and out.returncode in (0, 1), out.stderr[-3000:]
    assert "gemm_4bit" not in out.stdout + out.stderr
