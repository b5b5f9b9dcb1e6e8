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
    "vlmtune.data.pipeline",
    "vlmtune.data.prepare",
    "vlmtune.data.readers",
    "vlmtune.data.formats",
    "vlmtune.data.validate",
    "vlmtune.data.encode",
    "vlmtune.data.fit",
    "vlmtune.data.pack",
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
