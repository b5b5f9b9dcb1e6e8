"""Two torchrun "nodes" on loopback sharing output_dir: exactly one process prepares, the other loads its cache."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

_NODE = """
import json, sys
from vlmtune.config import load_config
from vlmtune.models.load import load_spec
from vlmtune.train import recipe

cfg = load_config(None, sys.argv[1:])
loaded = load_spec(cfg.model_name_or_path)
recipe.init_cpu_distributed(cfg.ddp_timeout)
args = recipe.training_arguments(cfg, progress=False)
prep = recipe.prepare_once(cfg, loaded, args, progress=False)
print("RESULT " + json.dumps({"rank": args.process_index, "cached": prep.cached, "rows": prep.rows,
                              "fates": prep.fates, "ids": list(prep.dataset()["id"])}), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_sharing_output_dir_prepare_once(tiny_ckpt, tmp_path, make_image):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "data"))
    from _golden import build_dataset

    root = tmp_path.resolve()
    data = build_dataset(root, make_image)
    script = tmp_path / "node.py"
    script.write_text(_NODE)
    port = _free_port()
    keys = [f"model_name_or_path={tiny_ckpt('qwen2_vl')}", f"dataset={data}", f"output_dir={root / 'shared'}",
            "cutoff_len=180", "on_bad_sample=skip", "confirm_skipped_share=true", "max_steps=1", "ddp_timeout=240",
            "report_to=none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    procs, logs = [], []
    for rank in (0, 1):
        log = open(tmp_path / f"node{rank}.log", "w+", encoding="utf-8")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(script), *keys]
        procs.append(subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    try:
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outputs = [(tmp_path / f"node{r}.log").read_text() for r in (0, 1)]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    results = sorted((json.loads(line[7:]) for o in outputs for line in o.splitlines() if line.startswith("RESULT ")),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    assert sorted(r["cached"] for r in results) == [False, True]  # one prepared, the other loaded its cache
    assert results[0]["ids"] == results[1]["ids"] and results[0]["rows"] == results[1]["rows"] == 43
    assert results[0]["fates"] == results[1]["fates"] == {"kept": 21, "shrunk": 22, "invalid": 12}
    shared = sorted(p.name for p in (root / "shared").iterdir() if ".tmp-" in p.name or ".old" in p.name)
    assert shared == []
