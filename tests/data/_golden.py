"""A fixed mixed dataset and the prepared rows + fit report that the pre-streaming `prepare` produced for it.

`python tests/data/_golden.py` rewrote tests/data/golden/*.json with the implementation of commit 4a5af28 (the
whole-list prepare) before it was replaced by the streaming one; tests/data/drivers/test_pipeline.py checks that the
streaming prepare reproduces them row for row and line for line. Paths are stored relative to the data root.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"
CONFIGS = {  # name -> extra config keys
    "default": ["cutoff_len=180"],
    "drop": ["cutoff_len=120", "overflow=[drop]"],
}


def build_dataset(root: Path, make_image) -> Path:
    """A folder `root/data` of a JSONL, a JSON array and a second JSONL with the same records' quirks:
    duplicated and clashing ids, bad lines, missing images, long and multi-turn samples."""
    rnd = random.Random(13)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for k, (w, h) in enumerate([(300, 200), (448, 448), (64, 64), (500, 120), (90, 700)]):
        make_image(data / f"im{k}.png", w, h, color=(50 * k, 100, 200))
    words = "the a red blue cat dog sky tree what is in this picture describe count".split()

    def text(n):
        return " ".join(rnd.choice(words) for _ in range(n))

    def record(i):
        kind = i % 6
        if kind == 0:
            return {"messages": [{"role": "user", "content": "<image>" + text(5)},
                                 {"role": "assistant", "content": text(4)}], "images": [f"im{i % 5}.png"]}
        if kind == 1:
            return {"messages": [{"role": "user", "content": "<image><image>" + text(40)},
                                 {"role": "assistant", "content": text(6)}], "images": ["im1.png", f"im{i % 5}.png"]}
        if kind == 2:
            turns = []
            for t in range(3):
                turns += [{"role": "user", "content": "<image>" + text(8)}, {"role": "assistant", "content": text(3)}]
            return {"messages": turns, "images": ["im1.png", "im3.png", f"im{i % 5}.png"]}
        if kind == 3:
            return {"messages": [{"role": "user", "content": "<image>" + text(3)},
                                 {"role": "assistant", "content": text(2)}], "images": ["missing.png"]}
        if kind == 4:
            return {"conversations": [{"from": "human", "value": text(60)}, {"from": "gpt", "value": text(30)}],
                    "system": "be brief"}
        return {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text(6)}]},
                             {"role": "assistant", "content": [{"type": "text", "text": text(5)}]}],
                "images": [f"im{i % 5}.png"]}

    lines = []
    for i in range(30):
        rec = record(i)
        if i % 7 == 1:
            rec["id"] = "dup"          # duplicated own id: falls back to file:line
        elif i % 7 == 3:
            rec["id"] = f"own-{i}"     # unique own id
        elif i == 5:
            rec["id"] = "a:9"          # clashes with another record's fallback id: suffixed
        lines.append(json.dumps(rec))
    lines.insert(4, "{not json")
    lines.insert(11, "")
    lines.insert(17, "[1, 2]")
    (data / "a.jsonl").write_text("\n".join(lines) + "\n")
    arr = [record(i) for i in range(30, 45)]
    arr[2]["id"] = "dup"
    arr[4]["id"] = 7
    arr.append("not a record")
    (data / "b.json").write_text(json.dumps(arr))
    more = [json.dumps(record(i) | {"id": f"own-{i % 4}"}) for i in range(45, 52)]
    (data / "c.jsonl").write_text("\n".join(more) + "\n")
    return data


def config_args(root: Path, data: Path, ckpt, name: str, *more: str) -> list[str]:
    return [f"model_name_or_path={ckpt}", f"dataset={data}", f"output_dir={root / ('out-' + name)}",
            "on_bad_sample=skip", "confirm_skipped_share=true", *CONFIGS[name], *more]


def normalise(value, root: Path):
    """Paths relative to the data root, so the files compare across tmp folders."""
    if isinstance(value, str):
        return value.replace(str(root), "<ROOT>")
    if isinstance(value, list):
        return [normalise(v, root) for v in value]
    if isinstance(value, dict):
        return {k: normalise(v, root) for k, v in value.items()}
    return value


def produce(root: Path, data: Path, ckpt, name: str, *more: str) -> dict:
    from vlmtune.config import load_config
    from vlmtune.data.drivers.prepare import prepare

    cfg = load_config(None, config_args(root, data, ckpt, name, *more))
    prep = prepare(cfg.for_data(), progress=False)
    rows = prep.dataset().to_list()
    with open(prep.report_path, encoding="utf-8") as f:
        report = [json.loads(line) for line in f]
    return {"rows": normalise(rows, root), "report": normalise(report, root)}


if __name__ == "__main__":
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent.parent))
    from conftest import _make_image

    from vlmtune.models.tiny import build_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp).resolve()
        ckpt = build_tiny_checkpoint(root / "ckpt", arch="qwen2_vl", seed=0)
        data = build_dataset(root, _make_image)
        for name in CONFIGS:
            out = produce(root, data, ckpt, name)
            (GOLDEN / f"{name}.json").write_text(json.dumps(out, indent=0, sort_keys=True) + "\n")
            fates = {}
            for r in out["report"]:
                fates[r["fate"]] = fates.get(r["fate"], 0) + 1
            print(name, len(out["rows"]), "rows", fates)
