"""Issue 21 on the training side: checkpoints that cannot resume are refused before any work; a full disk while
saving is a clear error."""

from __future__ import annotations

import errno
import json
import os
import struct
import zipfile

import pytest

from vlmtune.config import load_config
from vlmtune.errors import ConfigError, VlmtuneError
from vlmtune.train import recipe
from vlmtune.train.checkpoints import MARKER, check_checkpoint


def _checkpoint(root, step: int = 4):
    ck = root / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (ck / MARKER).write_text(json.dumps({"global_step": step}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (ck / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with zipfile.ZipFile(ck / "optimizer.pt", "w") as z:
        z.writestr("archive/data.pkl", b"x")
    return ck


def test_a_sound_checkpoint_passes(tmp_path):
    check_checkpoint(str(_checkpoint(tmp_path)))


@pytest.mark.parametrize("damage, name, why", [
    (lambda ck: (ck / "trainer_state.json").write_text("garbage{"), "trainer_state.json", "is not a trainer state"),
    (lambda ck: (ck / "trainer_state.json").write_text("[1, 2]"), "trainer_state.json", "no integer global_step"),
    (lambda ck: (ck / "adapter_model.safetensors").write_bytes(
        (ck / "adapter_model.safetensors").read_bytes()[:-4]), "adapter_model.safetensors", "is truncated"),
    (lambda ck: (ck / "adapter_model.safetensors").write_bytes(b"\xff" * 16), "adapter_model.safetensors",
     "is truncated"),
    (lambda ck: (ck / "optimizer.pt").write_bytes((ck / "optimizer.pt").read_bytes()[:30]), "optimizer.pt",
     "is not a complete torch.save archive"),
])
def test_a_damaged_checkpoint_is_refused_before_the_model_loads(tmp_path, monkeypatch, damage, name, why):
    out = tmp_path / "out"
    ck = _checkpoint(out)
    damage(ck)
    data = tmp_path / "d.jsonl"
    data.write_text("")
    cfg = load_config(None, [f"model_name_or_path={tmp_path / 'm'}", f"dataset={data}", f"output_dir={out}",
                             "resume_from_checkpoint=true"])
    monkeypatch.setattr(recipe, "load_spec", lambda *a: pytest.fail("the model loaded first"))
    with pytest.raises(ConfigError) as err:
        recipe.setup(cfg, progress=False)
    (problem,) = err.value.problems
    assert problem.startswith(f"resume_from_checkpoint: {ck / name} ") and why in problem
    assert "set resume_from_checkpoint to an earlier checkpoint-N folder" in problem


class _FullDiskTrainer:
    def __init__(self, exc):
        self.exc = exc

    def train(self, resume_from_checkpoint=None):
        raise self.exc


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"),
                                 RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")])
def test_a_full_disk_while_saving_a_checkpoint_is_a_clear_error(tmp_path, exc):
    cfg = load_config(None, ["model_name_or_path=m", "dataset=d", f"output_dir={tmp_path}", "worst_case_first=false"])
    run = recipe.Run(cfg, None, None, _FullDiskTrainer(exc), {}, None)
    with pytest.raises(VlmtuneError) as err:
        recipe.train(run)
    msg = str(err.value)
    assert msg.startswith(f"no space left on the device while writing a checkpoint or the model into {tmp_path}")
    assert "resume_from_checkpoint: true" in msg and "never the one cut short" in msg


def test_other_errors_while_training_pass_through(tmp_path):
    cfg = load_config(None, ["model_name_or_path=m", "dataset=d", f"output_dir={tmp_path}", "worst_case_first=false"])
    run = recipe.Run(cfg, None, None, _FullDiskTrainer(OSError(errno.EACCES, "denied")), {}, None)
    with pytest.raises(OSError):
        recipe.train(run)


def test_train_with_skip_runs_past_pixels_that_do_not_decode(make_config, write_dataset, tmp_path):
    """The bad image is found by prepare (a corrupt_image line in the fit report), so training never meets it."""
    import zlib

    path = write_dataset(["one", "one", "text"])
    folder = os.path.dirname(path)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 56, 56, 8, 2, 0, 0, 0)  # header, CRCs and IEND intact: only a decode can tell
    with open(os.path.join(folder, "img1_0.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"\x78\x9c" + bytes(range(256)) * 4)
                + chunk(b"IEND", b""))
    cfg = make_config("qwen2_vl", path, tmp_path / "out", max_steps=2, on_bad_sample="skip",
                      confirm_skipped_share=True, run_doctor=False, worst_case_first=False)
    result = recipe.run(cfg, progress=False)
    assert result.global_step == 2
    lines = [json.loads(x) for x in open(result.prepared.report_path)]
    assert [r["fate"] for r in lines] == ["kept", "invalid", "kept"]
    assert "img1_0.png' is truncated or corrupt (" in lines[1]["reason"]
