"""Run `vlmtune train` on 2 gloo CPU ranks under torchrun and read back what each rank did.

The node script records, per micro-batch, which modalities the rank's batch held, and every logged loss, in one
JSON file per rank. With
VLMTUNE_TEST_SEQUENTIAL=1 the training sampler keeps the dataset's order, so micro-batch k goes to rank k % 2:
a dataset written as [text, image, text, image, ...] gives rank 0 only text and rank 1 only images.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from fractions import Fraction

NODE = """
import json, os, sys
import torch
from vlmtune.config import load_config
from vlmtune.train import recipe
from vlmtune.train.trainer import VlmTrainer

if os.environ.get("VLMTUNE_TEST_SEQUENTIAL") == "1":
    VlmTrainer._get_train_sampler = lambda self, ds=None: torch.utils.data.SequentialSampler(ds or self.train_dataset)
bad = os.environ.get("VLMTUNE_TEST_CUT_RUN")  # a row id whose image run loses one pad token (a corrupt row)
if bad:
    from vlmtune.data.stages.collate import Collator
    _guard = Collator.guard
    def guard(self, row):
        if row["id"] == bad:
            pad = self.spec.image_token_id
            k = list(row["input_ids"]).index(pad)
            row = {**row, "input_ids": row["input_ids"][:k] + row["input_ids"][k + 1:],
                   "labels": row["labels"][:k] + row["labels"][k + 1:]}
        return _guard(self, row)
    Collator.guard = guard
seen = []
_loss = VlmTrainer.compute_loss
def compute_loss(self, model, inputs, *a, **k):
    seen.append("".join(c for c, key in (("i", "pixel_values"), ("v", "pixel_values_videos")) if key in inputs) or "t")
    return _loss(self, model, inputs, *a, **k)
VlmTrainer.compute_loss = compute_loss
cfg = load_config(None, sys.argv[1:])
run = recipe.setup(cfg, progress=False)
result = recipe.train(run)
recipe.cleanup(run)
losses = [h["loss"] for h in result.log_history if "loss" in h]
engine = ("fsdp" if any(type(p).__name__ == "DTensor" for p in run.trainer.model.parameters())
          else "deepspeed" if run.trainer.is_deepspeed_enabled else "ddp")
result = {"rank": int(os.environ["RANK"]), "losses": losses, "seen": seen, "step": result.global_step, "engine": engine}
# one file per rank: ranks printing to one shared log can interleave their lines
with open(os.path.join(os.environ["VLMTUNE_TEST_RESULTS"], f"rank{result['rank']}.json"), "w") as f:
    json.dump(result, f)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path, keys: dict, *, name: str, nproc: int = 2, timeout: float = 300, env: dict | None = None,
             launcher: list[str] | None = None) -> dict:
    """Run the node script on `nproc` ranks with these config keys; {"rc", "log", "results" (by rank)}.
    A run that outlives `timeout` is killed and reported with rc None (a hang is the failure it shows)."""
    script = tmp_path / "node.py"
    script.write_text(NODE)
    log_path = tmp_path / f"{name}.log"
    args = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in keys.items()]
    cmd = launcher or [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                       "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    results_dir = tmp_path / f"{name}-results"
    results_dir.mkdir(exist_ok=True)
    for old in results_dir.iterdir():
        old.unlink()
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": os.pathsep.join(sys.path), "VLMTUNE_TEST_RESULTS": str(results_dir), **(env or {})}
    with open(log_path, "w+", encoding="utf-8") as log:  # a file, not a pipe: a stray rank cannot block the wait
        proc = subprocess.Popen([*cmd, str(script), *args], env=full_env, cwd=tmp_path, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_torchrun(proc)
            rc = None
    text = log_path.read_text()
    results = {r["rank"]: r for r in (json.loads(p.read_text()) for p in sorted(results_dir.glob("rank*.json")))}
    return {"rc": rc, "log": text, "results": results}


def stop_torchrun(proc: subprocess.Popen) -> None:
    """End a hung torchrun and its ranks: torchrun puts each rank in a session of its own, so SIGTERM lets
    torchrun stop them, and those still alive after it are killed by pid (found before, as torchrun's children)."""
    ranks = [int(e) for e in os.listdir("/proc") if e.isdigit() and _parent(e) == proc.pid]
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid in ranks:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _parent(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def write_mixed(folder, kinds: list[str], make_image) -> str:
    """A sharegpt JSONL with one sample per kind, in order: "t" text, "i" one image, "v" one video clip,
    "iv" an image and a clip. Answers differ so that losses differ."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
    from clips import write_clip

    folder.mkdir(parents=True, exist_ok=True)
    colours = [("red", (255, 0, 0)), ("green", (0, 200, 0)), ("blue", (0, 0, 255)), ("grey", (128, 128, 128))]
    lines = []
    for k, kind in enumerate(kinds):
        colour, rgb = colours[k % len(colours)]
        record = {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]}
        prompt, answer = "Say something about the sky.", f"The sky is {colour} today, number {k}."
        if "i" in kind:
            record["images"] = [make_image(folder / f"img{k}.png", 56, 56, rgb).name]
            prompt, answer = "<image>" + "What colour is it?", f"It is {colour}."
        if "v" in kind:
            write_clip(folder / f"clip{k}.mp4", 4, 56, 56, rate=Fraction(2))
            record["videos"] = [f"clip{k}.mp4"]
            prompt, answer = "<video>" + prompt, f"It shows {colour} frames, {k}."
        record["messages"][0]["content"], record["messages"][1]["content"] = prompt, answer
        lines.append(json.dumps(record))
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)
