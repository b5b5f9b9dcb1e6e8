"""do_predict: batched generation (per_device_eval_batch_size 8, left-padded) against one row at a time (1), on the
same prepared rows of the tiny qwen2_vl checkpoint, greedy, in the same run.

    python bench/run.py --only predict
    python bench/bench_predict.py --device cuda     # the same on a GPU (wall-clock seconds there)

Headline: `predict_batch8_speedup` = time(batch 1) / time(batch 8). On the CPU the times are CPU seconds
(`time.process_time`, torch on one thread: the machine is shared); on a GPU, wall-clock seconds after a warm-up.
`same_predictions` checks that both wrote the same generated_predictions.jsonl.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from _common import cached_dir, tiny_checkpoint


def _data(n: int) -> Path:
    def build(d: Path) -> None:
        from PIL import Image

        rng = random.Random(0)
        lines = []
        for i in range(n):
            k = rng.choice([0, 0, 1, 1, 2])
            images = []
            for j in range(k):
                Image.new("RGB", (rng.choice([56, 84, 112]), rng.choice([56, 84, 112])),
                          (rng.randrange(256), 90, 40 * j)).save(d / f"{i}_{j}.png")
                images.append(f"{i}_{j}.png")
            words = " ".join(rng.choice(["shape", "colour", "left", "right", "sky", "red", "large"])
                             for _ in range(rng.randrange(2, 60)))
            record = {"messages": [{"role": "user", "content": "<image>" * k + f"Describe: {words}?"},
                                   {"role": "assistant", "content": f"It is answer {i}."}]}
            lines.append(json.dumps({**record, "images": images} if images else record))
        (d / "eval.jsonl").write_text("\n".join(lines) + "\n")

    return cached_dir(f"predict-eval-{n}", build) / "eval.jsonl"


def run(quick: bool = False, device: str = "cpu") -> dict:
    import torch
    from transformers import AutoModelForImageTextToText

    from vlmtune.config import load_config
    from vlmtune.data.drivers.prepare import eval_config, prepare
    from vlmtune.data.stages.collate import Collator
    from vlmtune.models.load import load_spec
    from vlmtune.train.predict import predict

    if device == "cpu":
        torch.set_num_threads(1)
    n, new = (16, 8) if quick else (64, 16)
    model_dir = tiny_checkpoint("qwen2_vl")
    work = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    cfg = load_config(None, base={"model_name_or_path": str(model_dir), "eval_dataset": str(_data(n)),
                                  "dataset_dir": None, "output_dir": str(work / "out"), "do_predict": True,
                                  "predict_with_generate": True, "do_sample": False, "max_new_tokens": new,
                                  "cutoff_len": 512})
    loaded = load_spec(cfg.model, cfg.fit)
    rows = prepare(eval_config(cfg.for_data()), loaded, progress=False).dataset()
    model = AutoModelForImageTextToText.from_pretrained(model_dir).to(device).eval()
    collator = Collator(loaded.processor, loaded.spec, cutoff_len=cfg.cutoff_len)
    clock = time.process_time if device == "cpu" else time.perf_counter
    seconds, written = {}, {}
    for size in (8, 1, 8):  # the first batch-8 pass warms up (kernels, caches); the second is timed
        out = work / f"b{size}"
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        sync()
        t = clock()
        predict(model, collator, loaded.processor.tokenizer, rows, cfg.replace(per_device_eval_batch_size=size),
                str(out), log=lambda _: None)
        sync()
        seconds[size] = clock() - t
        written[size] = (out / "generated_predictions.jsonl").read_text()
    return {"predict_batch8_speedup": round(seconds[1] / seconds[8], 2),
            "seconds_batch1": round(seconds[1], 2), "seconds_batch8": round(seconds[8], 2),
            "samples": len(rows), "max_new_tokens": new, "device": device,
            "same_predictions": "yes" if written[1] == written[8] else "NO"}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    for k, v in run(a.quick, a.device).items():
        print(f"{k}: {v}")
    sys.exit(0)
