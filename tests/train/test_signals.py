"""Preemption: SIGTERM saves a complete checkpoint and exits cleanly; the run resumes from it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from vlmtune.train.checkpoints import is_complete, last_complete_checkpoint, layout_change


def _dataset(tmp_path, make_image):
    make_image(tmp_path / "a.png", 112, 84)
    recs = [{"messages": [{"role": "user", "content": "<image>What colour?"},
                          {"role": "assistant", "content": "red"}], "images": ["a.png"]}] * 4
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return data


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_ckpt, tmp_path, make_image):
    data = _dataset(tmp_path, make_image)
    out = tmp_path / "out"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_ckpt('qwen2_vl')}\ndataset: {data}\noutput_dir: {out}\n"
                   "cutoff_len: 200\nmax_steps: 100000\nsave_steps: 100000\nlogging_steps: 1\n"
                   "gradient_accumulation_steps: 1\nworst_case_first: false\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vlmtune", "train", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines, logged = [], 0
    deadline = time.time() + 180
    try:
        for line in proc.stdout:  # wait until three training steps have been logged
            lines.append(line)
            logged += line.count("'loss'")
            if logged >= 3:
                break
            assert time.time() < deadline, "".join(lines[-20:])
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines) + rest
    assert proc.returncode == 0, text[-3000:]
    assert "stopped by SIGTERM after step" in text
    ckpt = last_complete_checkpoint(str(out))
    assert ckpt is not None and is_complete(ckpt)
    step = int(ckpt.rsplit("-", 1)[1])
    assert f"stopped by SIGTERM after step {step};" in text
    marker = json.loads(open(os.path.join(ckpt, "vlmtune_complete")).read())
    assert marker == {"global_step": step, "world_size": 1, "per_device_train_batch_size": 1,
                      "gradient_accumulation_steps": 1}


def test_layout_change_is_named(tmp_path):
    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    (ckpt / "vlmtune_complete").write_text(json.dumps(
        {"global_step": 4, "world_size": 2, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8}))

    class Args:
        world_size, per_device_train_batch_size, gradient_accumulation_steps = 1, 1, 8

    assert layout_change(str(ckpt), Args) == (
        f"resuming {ckpt} with a different layout (world_size 2 -> 1): the global batch, the data order and the "
        "meaning of global_step change, so the run will not continue as it would have"
    )
    Args.world_size = 2
    assert layout_change(str(ckpt), Args) is None
