"""`prepare`: every input record is accounted for, rows are safe, the cache works."""

from __future__ import annotations

import json

import pytest

from vlmtune.commands.cli import main
from vlmtune.config import load_config
from vlmtune.data.stages.collate import check_row
from vlmtune.data.drivers.prepare import load_prepared, prepare
from vlmtune.errors import DataError
from vlmtune.models.load import load_spec


@pytest.fixture
def dataset(tmp_path, make_image):
    for k, (w, h) in enumerate([(300, 200), (448, 448), (64, 64), (500, 120)]):
        make_image(tmp_path / f"im{k}.png", w, h, color=(60 * k, 100, 200))
    long = "please describe everything you see in great detail " * 6
    records = [
        {"messages": [{"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "red"}],
         "images": ["im0.png"]},
        {"messages": [{"role": "user", "content": "<image><image>" + long},
                      {"role": "assistant", "content": "two pictures"}], "images": ["im1.png", "im1.png"]},
        {"messages": [{"role": "user", "content": "<image>first?"}, {"role": "assistant", "content": "one"},
                      {"role": "user", "content": "<image>second?"}, {"role": "assistant", "content": "two"},
                      {"role": "user", "content": "<image>third?"}, {"role": "assistant", "content": "three"}],
         "images": ["im1.png", "im3.png", "im1.png"]},
        {"messages": [{"role": "user", "content": "<image>missing?"}, {"role": "assistant", "content": "yes"}],
         "images": ["nope.png"]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    lines = [json.dumps(r) for r in records]
    lines.insert(3, "{not json")
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return tmp_path, path


def config(tmp_path, data, ckpt, *more):
    return load_config(None, [f"model_name_or_path={ckpt}", f"dataset={data}", f"output_dir={tmp_path / 'out'}",
                              "cutoff_len=180", "on_bad_sample=skip", "confirm_skipped_share=true", *more])


def test_every_record_has_one_report_line(tiny_ckpt, dataset):
    tmp_path, data = dataset
    ckpt = tiny_ckpt("qwen2_vl")
    cfg = config(tmp_path, data, ckpt)
    prep = prepare(cfg.for_data(), progress=False)
    report = [json.loads(line) for line in open(prep.report_path)]
    assert len(report) == 6 == prep.records
    # where each line's record is, as data (no source string parsed): the file and its 1-based line
    assert {r["file"] for r in report} == {str(data)} and {r["piece"] for r in report} == {0}
    by_line = {str(r["index"]): r for r in report}
    assert sorted(by_line) == ["1", "2", "3", "4", "5", "6"]
    assert [by_line[k]["source"] for k in "14"] == [f"{data}:1", f"{data}:4"]  # the same place, as text
    assert [by_line[k]["fate"] for k in "1456"] == ["kept", "invalid", "invalid", "kept"]
    # the default overflow order tries shrink_images first, and shrinking alone fits both long samples
    fitted = {k: (by_line[k]["fate"], by_line[k]["tokens_before"], by_line[k]["tokens_after"]) for k in "23"}
    assert fitted == {"2": ("shrunk", 636, 174), "3": ("shrunk", 653, 180)}
    assert by_line["2"]["reason"].startswith("shrank 2 image(s) from 512 to 50 image tokens")
    assert by_line["3"]["reason"].startswith("shrank 3 image(s) from 584 to 111 image tokens")
    assert by_line["4"]["tokens_before"] is None and by_line["4"]["tokens_after"] is None
    assert prep.fates == {f: sum(r["fate"] == f for r in report) for f in prep.fates}
    loaded = load_spec(str(ckpt))
    ds = prep.dataset()
    assert len(ds) == prep.rows
    assert [(r["file"], r["index"], r["piece"]) for r in ds] == [(str(data), k, 0) for k in (1, 2, 3, 6)]
    for row in ds:
        assert check_row(row, loaded.spec, 180) == []
        assert row["length"] == len(row["input_ids"])
        assert len(row["images"]) == len(row["image_grid_thw"]) == len(row["image_max_pixels"])


def test_default_on_bad_sample_stops_with_all_problems(tiny_ckpt, dataset):
    tmp_path, data = dataset
    cfg = config(tmp_path, data, tiny_ckpt("qwen2_vl"), "on_bad_sample=error")
    with pytest.raises(DataError) as err:
        prepare(cfg.for_data(), progress=False)
    assert len(err.value.problems) == 2
    assert "fit report is in" in str(err.value)
    assert (tmp_path / "out" / "fit_report.jsonl").exists()
    assert not (tmp_path / "out" / "prepared").exists()


def test_second_run_is_cached_and_config_changes_invalidate(tiny_ckpt, dataset):
    tmp_path, data = dataset
    ckpt = tiny_ckpt("qwen2_vl")
    first = prepare(config(tmp_path, data, ckpt).for_data(), progress=False)
    again = prepare(config(tmp_path, data, ckpt).for_data(), progress=False)
    assert (first.cached, again.cached) == (False, True)
    assert (again.rows, again.fates) == (first.rows, first.fates)
    changed = prepare(config(tmp_path, data, ckpt, "cutoff_len=4096").for_data(), progress=False)
    assert changed.cached is False and changed.fates.get("kept") == 4
    data.write_text(data.read_text() + json.dumps({"messages": [{"role": "user", "content": "x"},
                                                                {"role": "assistant", "content": "y"}]}) + "\n")
    assert prepare(config(tmp_path, data, ckpt, "cutoff_len=4096").for_data(), progress=False).records == 7


@pytest.mark.parametrize(("strategy", "changes"), [("concat", False), ("interleave_under", True),
                                                     ("interleave_over", True)])
def test_the_seed_is_in_the_fingerprint_when_it_draws_the_mix(tiny_ckpt, dataset, strategy, changes):
    from vlmtune.data.drivers.cache import fingerprint

    tmp_path, data = dataset
    ckpt = tiny_ckpt("qwen2_vl")
    loaded = load_spec(str(ckpt))
    fps = {fingerprint(config(tmp_path, data, ckpt, f"mix_strategy={strategy}", f"seed={seed}").for_data(), loaded,
                       [str(data)]) for seed in (1, 2)}
    assert len(fps) == (2 if changes else 1)


def test_a_data_file_is_read_once_per_process_while_it_is_unchanged(tiny_ckpt, dataset, monkeypatch):
    """`train` fingerprints the data twice (the doctor's data check, then prepare): the bytes are read once, and
    a change to the file is seen."""
    import vlmtune.data.drivers.cache as cache_mod

    tmp_path, data = dataset
    ckpt = tiny_ckpt("qwen2_vl")
    loaded = load_spec(str(ckpt))
    opened: list[str] = []
    monkeypatch.setattr(cache_mod, "open", lambda path, *a, **k: opened.append(path) or open(path, *a, **k),
                        raising=False)
    monkeypatch.setattr(cache_mod, "_FINGERPRINTS", {})
    cfg = config(tmp_path, data, ckpt).for_data()
    first = cache_mod.fingerprint(cfg, loaded, [str(data)])
    assert cache_mod.fingerprint(cfg, loaded, [str(data)]) == first and opened == [str(data)]
    other = cache_mod.fingerprint(config(tmp_path, data, ckpt, "cutoff_len=4096").for_data(), loaded, [str(data)])
    assert other != first and opened == [str(data)] * 2  # another config: the bytes are hashed under it
    data.write_text(data.read_text() + "\n")
    assert cache_mod.fingerprint(cfg, loaded, [str(data)]) != first and len(opened) == 3


def test_two_workers_give_the_same_rows(tiny_ckpt, dataset, monkeypatch):
    import vlmtune.data.drivers.prepare as P

    monkeypatch.setattr(P, "CHUNK", 2)  # several chunks so that both workers get some
    tmp_path, data = dataset
    ckpt = tiny_ckpt("qwen2_vl")
    one = prepare(config(tmp_path, data, ckpt).for_data(), progress=False).dataset()
    two = prepare(config(tmp_path, data, ckpt, "preprocessing_num_workers=2", "overwrite_cache=true").for_data(),
                  progress=False).dataset()
    assert one.to_list() == two.to_list()


def test_prepare_cli_prints_summary(tiny_ckpt, dataset, capsys):
    tmp_path, data = dataset
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_ckpt('qwen2_vl')}\ndataset: {data}\noutput_dir: {tmp_path / 'out'}\n"
                   "cutoff_len: 180\non_bad_sample: skip\nconfirm_skipped_share: true\n")
    assert main(["prepare", str(cfg), "cutoff_len=4096"]) == 0
    out = capsys.readouterr().out.splitlines()
    report = [json.loads(line) for line in open(tmp_path / "out" / "fit_report.jsonl")]
    before = sum(r["tokens_before"] or 0 for r in report)
    assert out[:8] == [
        "fate       samples    rows  tokens before  tokens after",
        f"kept             4       4  {before:>13}  {before:>12}",
        "shrunk           0       0              0             0",
        "truncated        0       0              0             0",
        "split            0       0              0             0",
        "dropped          0       0              0             0",
        "invalid          2       0              0             0",
        f"total            6       4  {before:>13}  {before:>12}",
    ]


def test_error_policy_in_a_worker_names_the_sample(tiny_ckpt, dataset, monkeypatch):
    import vlmtune.data.drivers.prepare as P
    from vlmtune.errors import SampleError

    monkeypatch.setattr(P, "CHUNK", 2)
    tmp_path, data = dataset
    cfg = config(tmp_path, data, tiny_ckpt("qwen2_vl"), "overflow=[error]", "preprocessing_num_workers=2")
    with pytest.raises(SampleError) as err:
        prepare(cfg.for_data(), progress=False)
    assert err.value.source == f"{data}:2"
    assert err.value.fix.startswith("raise cutoff_len to at least ")


_KILLED_PREPARE = """
import os, signal, sys
import vlmtune.data.drivers.pipeline as pipeline
import vlmtune.data.drivers.prepare as P
from vlmtune.config import load_config

P.CHUNK = 1
done = []
real = pipeline.process_chunk

def dying(convs):
    done.append(1)
    if len(done) == 3:  # halfway: rows and report lines of two chunks are written
        os.kill(os.getpid(), signal.SIGKILL)
    return real(convs)

pipeline.process_chunk = dying
P.prepare(load_config(None, sys.argv[1:]).for_data(), progress=False)
"""


def test_a_prepare_killed_halfway_is_redone_cleanly(tiny_ckpt, dataset):
    import os
    import subprocess
    import sys

    tmp_path, data = dataset
    ckpt = tiny_ckpt("qwen2_vl")
    out = tmp_path / "out"
    old = prepare(config(tmp_path, data, ckpt, "cutoff_len=4096").for_data(), progress=False)  # a cache for another config
    args = [f"model_name_or_path={ckpt}", f"dataset={data}", f"output_dir={out}", "cutoff_len=180",
            "on_bad_sample=skip", "confirm_skipped_share=true"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", _KILLED_PREPARE, *args], env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    leftovers = sorted(p.name for p in out.iterdir() if ".tmp-" in p.name)
    assert [p.split(".tmp-")[0] for p in leftovers] == ["fit_report.jsonl", "prepared"]  # report body, rows
    assert (out / "prepared" / "data.arrow").exists()  # the old cache is untouched ...
    assert P_load_cached(out, old) is True             # ... still complete for its own config
    again = prepare(config(tmp_path, data, ckpt).for_data(), progress=False)
    assert again.cached is False and again.records == 6
    assert sorted(p.name for p in out.iterdir()) == [".vlmtune-owned", "fit_report.jsonl", "prepared",
                                                     "prepared.lock"]  # no leftovers
    clean = prepare(config(tmp_path, data, ckpt, "overwrite_cache=true").for_data(), progress=False)
    assert again.dataset().to_list() == clean.dataset().to_list()
    assert (again.fates, again.rows) == (clean.fates, clean.rows)


def P_load_cached(out, prep) -> bool:
    import json as _json

    from vlmtune.data.drivers.prepare import FINGERPRINT_FILE, Target, load_cached

    fp = _json.loads((out / "prepared" / FINGERPRINT_FILE).read_text())["fingerprint"]
    got = load_cached(Target(str(out / "prepared"), str(out / "fit_report.jsonl"), fp))
    return got is not None and got.rows == prep.rows
def test_skipping_more_than_max_skipped_share_stops_unless_confirmed(tiny_ckpt, dataset):
    tmp_path, data = dataset  # 2 of its 6 records are invalid: 33%
    ckpt = tiny_ckpt("qwen2_vl")
    base = [f"model_name_or_path={ckpt}", f"dataset={data}", f"output_dir={tmp_path / 'out'}", "cutoff_len=180",
            "on_bad_sample=skip"]
    with pytest.raises(DataError) as err:
        prepare(load_config(None, base).for_data(), progress=False)
    assert "would leave out 2 of 6 records (33.3%) as invalid, more than max_skipped_share=0.05" in str(err.value)
    assert "confirm_skipped_share: true" in str(err.value)
    assert prepare(load_config(None, [*base, "max_skipped_share=0.4"]).for_data(), progress=False).rows > 0
    assert prepare(load_config(None, [*base, "confirm_skipped_share=true"]).for_data(), progress=False).rows > 0


# -- pixels that do not decode (issue 21): a skippable bad sample, found before training --------------------------
def _undecodable_dataset(tmp_path, make_image):
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    d = tmp_path / "bad-pixels"
    make_image(d / "good.png", 64, 64)
    good = (d / "good.png").read_bytes()
    ihdr = struct.pack(">IIBBBBB", 96, 64, 8, 2, 0, 0, 0)  # header, CRCs and IEND intact; IDAT garbage
    (d / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                                    + chunk(b"IDAT", b"\x78\x9c" + bytes(range(256)) * 4) + chunk(b"IEND", b""))
    (d / "cut.png").write_bytes(good[: len(good) // 2] + good[-12:])  # truncated, its end marker put back
    recs = [{"messages": [{"role": "user", "content": "<image>colour?"}, {"role": "assistant", "content": "red"}],
             "images": [name]} for name in ("good.png", "garbage.png", "cut.png")]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d / "data.jsonl"


def test_undecodable_pixels_are_skipped_with_a_reason_or_stop_prepare(tiny_ckpt, tmp_path, make_image):
    data = _undecodable_dataset(tmp_path, make_image)
    base = [f"model_name_or_path={tiny_ckpt('qwen2_vl')}", f"dataset={data}", f"output_dir={tmp_path / 'out'}",
            "cutoff_len=256"]
    with pytest.raises(DataError) as err:  # on_bad_sample: error (the default): stopped before any training
        prepare(load_config(None, base).for_data(), progress=False)
    assert [(p.kind, p.sample_id) for p in err.value.problems] == [("corrupt_image", "data:2"), ("corrupt_image", "data:3")]
    prep = prepare(load_config(None, [*base, "on_bad_sample=skip", "confirm_skipped_share=true"]).for_data(), progress=False)
    assert prep.rows == 1 and prep.fates == {"kept": 1, "invalid": 2}
    lines = [json.loads(x) for x in open(prep.report_path)]
    assert [(r["id"], r["fate"]) for r in lines] == [("data:1", "kept"), ("data:2", "invalid"), ("data:3", "invalid")]
    assert "garbage.png' is truncated or corrupt (" in lines[1]["reason"]
    assert "cut.png' is truncated or corrupt (" in lines[2]["reason"]


def test_prepare_keeps_tool_exchanges_whole(tiny_ckpt, tmp_path):
    """LLaMA-Factory tool data through `vlmtune prepare`: split and truncate_text cut only between exchanges (a
    question, its calls, their results and the answer), and the fit report says which exchanges hold tools."""
    words = " ".join("red green blue circle square triangle picture image shows the a which is of and what".split() * 3)
    tools = json.dumps([{"name": "get_weather", "description": "The weather in a city", "parameters": {}}])

    def call(city):
        return {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": city}})}

    records = [
        {"conversations": [
            {"from": "human", "value": "Weather in Paris?"}, call("Paris"), {"from": "observation", "value": words},
            {"from": "gpt", "value": "It is 21 C in Paris."},
            {"from": "human", "value": "And Rome, then Oslo?"}, call("Rome"), {"from": "observation", "value": words},
            call("Oslo"), {"from": "observation", "value": words}, {"from": "gpt", "value": "25 C, then 9 C."},
            {"from": "human", "value": "Thanks!"}, {"from": "gpt", "value": "You are welcome."}], "tools": tools},
        {"conversations": [
            {"from": "human", "value": "Hello " + words}, {"from": "gpt", "value": "Hi."},
            {"from": "human", "value": "Weather in Oslo?"}, call("Oslo"), {"from": "observation", "value": "9 C"},
            {"from": "gpt", "value": "9 C."},
            {"from": "human", "value": "Thanks " + words}, {"from": "gpt", "value": "Welcome."}], "tools": tools},
    ]
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_ckpt('qwen2_vl')}\ndataset: {data}\noutput_dir: {tmp_path / 'out'}\n"
                   "cutoff_len: 512\n")
    tokenizer = load_spec(str(tiny_ckpt("qwen2_vl"))).processor.tokenizer
    split_reason = "split 3 exchanges into 2 samples at exchange boundaries (never inside tool exchange(s) {}: " \
                   "a call stays with its results and answer)"
    expected = {
        "[split,drop]": [
            ("split", split_reason.format([1, 2]) + "; exchange(s) [2] could not fit even alone and were left out",
             [440, 285]),
            ("split", split_reason.format([2]), [450, 452])],
        "[truncate_text,drop]": [
            ("truncated", "dropped 2 oldest text-only exchange(s), 2 with tool calls (each dropped with its results "
                          "and answer)", 285),
            ("truncated", "dropped 1 oldest text-only exchange(s)", 452)],
    }
    for overflow, lines in expected.items():
        assert main(["prepare", str(cfg), f"overflow={overflow}"]) == 0
        report = [json.loads(line) for line in open(tmp_path / "out" / "fit_report.jsonl")]
        assert [(r["fate"], r["reason"], r["tokens_after"]) for r in report] == lines
        rows = list(load_prepared(str(tmp_path / "out" / "prepared")))
        for row in rows:
            turns = tokenizer.decode(row["input_ids"]).split("<|im_start|>")[1:]
            assert turns[0].startswith("system\n# Tools")  # every piece has the tool definitions
            assert not turns[1].startswith("user\n<tool_response>")  # and starts at a question
            calls = [k for k, t in enumerate(turns) if t.startswith("assistant\n<tool_call>")]
            assert [k + 1 for k in calls] == [k for k, t in enumerate(turns) if t.startswith("user\n<tool_response>")]
