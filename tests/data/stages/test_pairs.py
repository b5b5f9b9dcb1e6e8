"""Preference data: the layouts read, invalid pairs reported per pair, stage checks, pair-aware fitting, the guard."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmtune.data.stages.collate import check_row
from vlmtune.data.stages.encode import IGNORE_INDEX, Encoder
from vlmtune.data.stages.fit import FitOptions, Fitter
from vlmtune.data.media.images import ImageHeader
from vlmtune.data.stages.pairs import (PrefEncoded, emit_row, encode_samples, fit_sample, rejected_view,
                                       stage_problems, stage_that_reads)
from vlmtune.config import ReadArgs
from vlmtune.data.sources.readers import read_samples
from vlmtune.data.types import Conversation, ImagePart, Message, Origin, Preference, TextPart
from vlmtune.errors import SampleError
from vlmtune.models.load import load_spec

WORDS = "red green blue circle square triangle picture image shows the a which is of and what colour".split()


@pytest.fixture(scope="module")
def env(tiny_ckpt):
    loaded = load_spec(str(tiny_ckpt("qwen2_vl")))
    return loaded, Encoder(loaded.processor, loaded.spec)


def _shape(conv):
    return [(m.role, [type(p).__name__ for p in m.parts], m.text) for m in conv.messages]


# -- the layouts ---------------------------------------------------------------------------------------------------
def test_llama_factory_ranking_sharegpt_and_alpaca(tmp_path, write_image, write_json):
    write_image(tmp_path / "a.png", 56, 56)
    write_json(tmp_path / "rank.json", [{"conversations": [{"from": "human", "value": "<image>Colour?"}],
                                         "chosen": {"from": "gpt", "value": "red"},
                                         "rejected": {"from": "gpt", "value": "blue"}, "images": ["a.png"]}])
    write_json(tmp_path / "alp.json", [{"instruction": "<image>Colour?", "input": "Be brief.", "chosen": "red",
                                        "rejected": "blue", "images": ["a.png"]}])
    write_json(tmp_path / "dataset_info.json", {
        "rank": {"file_name": "rank.json", "formatting": "sharegpt", "ranking": True,
                 "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected",
                             "images": "images"}},
        "alp": {"file_name": "alp.json", "formatting": "alpaca", "ranking": True,
                "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected",
                            "images": "images"}}})
    got = read_samples(ReadArgs(dataset="rank,alp", dataset_dir=str(tmp_path)), preference=True)
    assert got.problems == []
    rank, alp = got.conversations
    assert _shape(rank) == [("user", ["ImagePart", "TextPart"], "Colour?"), ("assistant", ["TextPart"], "red")]
    assert _shape(alp) == [("user", ["ImagePart", "TextPart"], "Colour?\nBe brief."),
                           ("assistant", ["TextPart"], "red")]
    for c in (rank, alp):
        assert (c.preference.kind, c.preference.rejected.role, c.preference.rejected.text) == ("pair", "assistant",
                                                                                               "blue")
        assert c.layout == "ranking" and c.read_problems == []


def test_trl_preference_explicit_and_implicit_prompt_and_kto_layouts(tmp_path, write_image, write_jsonl, write_json):
    write_image(tmp_path / "a.png", 56, 56)
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    write_jsonl(tmp_path / "trl.jsonl", [
        {"prompt": user, "chosen": [{"role": "assistant", "content": "red"}],
         "rejected": [{"role": "assistant", "content": "blue"}], "images": ["a.png"]},
        {"chosen": [*user, {"role": "assistant", "content": "red"}],
         "rejected": [*user, {"role": "assistant", "content": "blue"}], "images": ["a.png"]},
        {"prompt": "<image>Colour?", "completion": "blue", "label": False, "images": ["a.png"]},
    ])
    got = read_samples(str(tmp_path / "trl.jsonl"), preference=True)
    explicit, implicit, unpaired = got.conversations
    for c in (explicit, implicit):
        assert _shape(c) == [("user", ["ImagePart", "TextPart"], "Colour?"), ("assistant", ["TextPart"], "red")]
        assert (c.layout, c.preference.rejected.text) == ("ranking", "blue")
    assert _shape(unpaired)[-1] == ("assistant", ["TextPart"], "blue")
    assert (unpaired.layout, unpaired.preference) == ("kto", Preference("kto", desirable=False))

    write_json(tmp_path / "kto.json", [
        {"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "red"}],
         "label": True, "images": ["a.png"]},
        {"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "green"}],
         "label": "yes", "images": ["a.png"]}])
    write_json(tmp_path / "dataset_info.json", {"kto": {"file_name": "kto.json", "formatting": "sharegpt", "columns": {
        "messages": "messages", "kto_tag": "label", "images": "images"}, "tags": {
        "role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}})
    got = read_samples(ReadArgs(dataset="kto", dataset_dir=str(tmp_path)), preference=True)
    assert [c.preference for c in got.conversations] == [Preference("kto", desirable=True)]
    assert [(p.sample_id, p.kind, p.what) for p in got.problems] == [
        ("kto:1", "missing_side", "`label` is 'yes', expected true (desirable) or false (undesirable)")]


def test_ms_swift_pairs_and_sft_runs_refusing_preference_files(tmp_path, write_image, write_jsonl):
    write_image(tmp_path / "a.png", 56, 56)
    write_jsonl(tmp_path / "s.jsonl", [{"query": "<image>Colour?", "response": "red", "rejected_response": "blue",
                                        "images": ["a.png"]}])
    (conv,) = read_samples(str(tmp_path / "s.jsonl"), preference=True).conversations
    assert _shape(conv)[-1] == ("assistant", ["TextPart"], "red") and conv.preference.rejected.text == "blue"
    # without the preference stages the reader refuses the file (records/preference.py): never SFT targets
    got = read_samples(str(tmp_path / "s.jsonl"))
    assert got.conversations == [] and [p.kind for p in got.problems] == ["untrainable_layout"]


def test_invalid_pairs_are_reported_per_pair(tmp_path, write_image, write_jsonl):
    write_image(tmp_path / "a.png", 56, 56)
    q = {"role": "user", "content": "<image>Colour?"}
    write_jsonl(tmp_path / "p.jsonl", [
        {"messages": [q], "chosen": "red", "rejected": "red", "images": ["a.png"]},  # identical sides
        {"messages": [q], "chosen": "red", "images": ["a.png"]},  # a side missing
        {"messages": [q], "chosen": "red", "rejected": "   ", "images": ["a.png"]},  # an empty side
        {"messages": [{"role": "user", "content": "Colour?"}], "chosen": "<image>red", "rejected": "blue",
         "images": ["a.png"]},  # an image in an answer
        {"messages": [q], "chosen": "red", "rejected": "blue", "images": ["a.png", "a.png"]},  # 1 placeholder, 2 images
    ])
    got = read_samples(str(tmp_path / "p.jsonl"), preference=True)
    assert [(p.sample_id, p.kind) for p in got.problems] == [("p:2", "missing_side")]
    kinds = {c.id: sorted(p.kind for p in c.read_problems) for c in got.conversations}
    assert kinds == {"p:1": ["identical_pair"], "p:3": ["missing_side"],
                     "p:4": ["image_count_mismatch", "placeholder_mismatch"], "p:5": ["placeholder_mismatch"]}


def test_stage_decides_which_samples_are_valid():
    sft = Conversation("s", "f:1", [Message("user", [TextPart("q")]), Message("assistant", [TextPart("a")])])
    pair = Conversation("p", "f:2", sft.messages, preference=Preference("pair", rejected=Message("assistant", [])))
    kto = Conversation("k", "f:3", sft.messages, preference=Preference("kto", desirable=True))
    allowed = {(s, c.id) for s in ("sft", "dpo", "kto", None) for c in (sft, pair, kto) if not stage_problems(c, s)}
    assert allowed == {("sft", "s"), ("dpo", "p"), ("kto", "k"), (None, "s"), (None, "p"), (None, "k")}
    assert [p.kind for p in stage_problems(pair, "sft")] == ["wrong_stage"]
    # the stage that would read each refused sample (inspect names it as the --stage to add)
    reads = {(s, c.id): [stage_that_reads(p) for p in stage_problems(c, s)] for s in ("sft", "dpo", "kto")
             for c in (sft, pair, kto)}
    assert {k: v for k, v in reads.items() if v} == {
        ("sft", "p"): ["dpo"], ("sft", "k"): ["kto"], ("dpo", "s"): ["sft"], ("dpo", "k"): ["kto"],
        ("kto", "s"): ["sft"], ("kto", "p"): ["dpo"]}


def test_stage_that_reads_a_preference_file_refused_under_sft(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                       {"prompt": "q", "completion": "a", "label": True}, [1]])
    got = read_samples(str(tmp_path / "p.jsonl"))  # stage sft: both preference records refused
    assert [(p.kind, stage_that_reads(p)) for p in got.problems] == [
        ("untrainable_layout", "dpo"), ("untrainable_layout", "kto"), (got.problems[2].kind, None)]
    assert got.problems[2].kind != "untrainable_layout"  # any other problem: no stage reads it


# -- pair-aware fitting --------------------------------------------------------------------------------------------
def _pair(sid: str, sizes, prompt_words: int, chosen_words: int, rejected_words: int, rnd) -> tuple:
    headers, parts = {}, []
    for k, (w, h) in enumerate(sizes):
        path = f"/img/{sid}_{k}.png"
        headers[path] = ImageHeader(width=w, height=h, format="PNG")
        parts.append(ImagePart(ref=path, path=path))
    words = lambda n: " ".join(rnd.choice(WORDS) for _ in range(n))  # noqa: E731
    parts.append(TextPart("Compare the pictures. " + words(prompt_words)))
    conv = Conversation(sid, f"pairs.jsonl:{sid}", [Message("user", parts), Message("assistant",
                        [TextPart("chosen " + words(chosen_words))])],
                        preference=Preference("pair", rejected=Message("assistant",
                                                                       [TextPart("rejected " + words(rejected_words))])),
                        origin=Origin("pairs.jsonl", 3))
    return conv, headers


def _answer(row_ids, row_labels):
    return [t for t, lab in zip(row_ids, row_labels) if lab != IGNORE_INDEX]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(28, 600), st.integers(28, 600)), min_size=2, max_size=2),
       st.integers(0, 120), st.integers(0, 30), st.integers(0, 30), st.integers(60, 400), st.randoms())
def test_every_pair_is_fitted_as_one_unit_both_sides_within_cutoff_and_whole_runs(
        env, sizes, prompt_words, chosen_words, rejected_words, cutoff, rnd):
    loaded, encoder = env
    spec = loaded.spec
    conv, headers = _pair("p", sizes, prompt_words, chosen_words, rejected_words, rnd)
    (enc,) = encode_samples(encoder, [conv], headers, {})
    out = fit_sample(Fitter(spec, FitOptions(cutoff_len=cutoff), encoder), enc)
    line = out.report()
    # one line per pair, with both sides' tokens before (and after, when emitted)
    assert line["chosen_tokens"][0] == enc.chosen.length and line["rejected_tokens"][0] == enc.rejected.length
    assert line["tokens_before"] == max(enc.chosen.length, enc.rejected.length)
    assert (line["file"], line["index"], line["piece"]) == ("pairs.jsonl", 3, 0)  # whichever side is longer
    if out.fate == "dropped":
        assert out.pieces == [] and line["chosen_tokens"][1] is None and line["rejected_tokens"][1] is None
        return
    assert out.fate in ("kept", "shrunk", "truncated")
    (piece,) = out.pieces
    row = emit_row(piece, spec)
    assert (row["file"], row["index"], row["piece"], row["sample_id"]) == ("pairs.jsonl", 3, 0, "p")
    chosen, rejected = row, rejected_view(row)
    for side in (chosen, rejected):
        assert len(side["input_ids"]) <= cutoff
        assert check_row(side, spec, cutoff) == []  # every image run whole and equal to its grid
    assert [line["chosen_tokens"][1], line["rejected_tokens"][1]] == [len(chosen["input_ids"]),
                                                                      len(rejected["input_ids"])]
    assert len(row["images"]) == 2  # the prompt's images, once, shared by both sides
    # the answers survive whole and are the only targets; the prompt is the same on both sides
    assert _answer(chosen["input_ids"], chosen["labels"]) == enc.chosen.blocks[-1].ids[
        enc.chosen.blocks[-1].header_len:-1]
    assert _answer(rejected["input_ids"], rejected["labels"]) == enc.rejected.blocks[-1].ids[
        enc.rejected.blocks[-1].header_len:-1]
    prompt = len(piece.chosen.blocks[-1].ids)
    assert chosen["input_ids"][: len(chosen["input_ids"]) - prompt] == \
        rejected["input_ids"][: len(rejected["input_ids"]) - len(piece.rejected.blocks[-1].ids)]


def test_an_over_long_two_image_pair_shrinks_images_for_both_sides(env):
    import random

    loaded, encoder = env
    conv, headers = _pair("p", [(448, 448), (448, 224)], 10, 20, 2, random.Random(0))
    (enc,) = encode_samples(encoder, [conv], headers, {})
    cutoff = enc.chosen.length - 100
    out = fit_sample(Fitter(loaded.spec, FitOptions(cutoff_len=cutoff, overflow=("shrink_images", "drop"))), enc)
    assert out.fate == "shrunk"
    piece = out.pieces[0]
    assert [i.grid for i in piece.chosen.images] == [i.grid for i in piece.rejected.images]
    assert piece.chosen.length <= cutoff and piece.rejected.length < piece.chosen.length
    assert out.report()["chosen_tokens"] == [enc.chosen.length, piece.chosen.length]


def test_pair_that_cannot_fit_is_dropped_with_both_sides_named(env):
    import random

    loaded, encoder = env
    conv, headers = _pair("p", [(56, 56), (56, 56)], 0, 200, 1, random.Random(0))
    (enc,) = encode_samples(encoder, [conv], headers, {})
    out = fit_sample(Fitter(loaded.spec, FitOptions(cutoff_len=60)), enc)
    assert out.fate == "dropped" and out.pieces == []
    assert "split does not apply to preference samples" in out.reason
    assert out.report()["rejected_tokens"] == [enc.rejected.length, None]


def test_prepare_writes_one_line_per_pair_and_pair_rows(tmp_path, tiny_ckpt, write_image, write_jsonl):
    from vlmtune.config import load_config
    from vlmtune.data.drivers.prepare import prepare

    write_image(tmp_path / "a.png", 300, 300)
    q = {"role": "user", "content": "<image><image>" + "Describe both pictures. " * 8}
    write_jsonl(tmp_path / "p.jsonl", [
        {"messages": [q], "chosen": "Both are purple squares.", "rejected": "No.", "images": ["a.png", "a.png"]},
        {"messages": [q], "chosen": "same", "rejected": "same", "images": ["a.png", "a.png"]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},  # SFT sample
    ])
    cfg = load_config(None, base={"model_name_or_path": str(tiny_ckpt("qwen2_vl")), "dataset": str(tmp_path / "p.jsonl"),
                                  "output_dir": str(tmp_path / "out"), "stage": "dpo", "cutoff_len": 120,
                                  "on_bad_sample": "skip", "confirm_skipped_share": True})
    prep = prepare(cfg.for_data(), progress=False)
    lines = [json.loads(x) for x in open(prep.report_path, encoding="utf-8")]
    assert [(x["id"], x["fate"]) for x in lines] == [("p:1", "shrunk"), ("p:2", "invalid"), ("p:3", "invalid")]
    assert "identical" in lines[1]["reason"] and "stage='dpo'" in lines[2]["reason"]
    data = str(tmp_path / "p.jsonl")
    assert [(x["file"], x["index"], x["piece"]) for x in lines] == [(data, 1, 0), (data, 2, 0), (data, 3, 0)]
    (row,) = prep.dataset()
    assert (row["file"], row["index"], row["piece"]) == (data, 1, 0)
    assert [len(row["input_ids"]), len(row["rejected_input_ids"])] == [lines[0]["chosen_tokens"][1],
                                                                       lines[0]["rejected_tokens"][1]]
    assert row["length"] == max(len(row["input_ids"]), len(row["rejected_input_ids"])) <= 120


# -- the guard -----------------------------------------------------------------------------------------------------
def test_collator_guards_both_sides_before_the_forward(env, tiny_processor):
    import random

    from vlmtune.data.stages.pair_collate import PreferenceCollator

    loaded, encoder = env
    conv, headers = _pair("p", [(56, 56), (56, 56)], 3, 3, 3, random.Random(0))
    (enc,) = encode_samples(encoder, [conv], headers, {})
    row = emit_row(enc, loaded.spec)
    collate = PreferenceCollator(tiny_processor("qwen2_vl"), loaded.spec, cutoff_len=200)
    pad = loaded.spec.image_token_id
    k = row["rejected_input_ids"].index(pad)
    broken = {**row, "rejected_input_ids": row["rejected_input_ids"][:k] + row["rejected_input_ids"][k + 1:],
              "rejected_labels": row["rejected_labels"][1:]}
    with pytest.raises(SampleError) as e:
        collate([broken])
    assert e.value.sample_id == "p" and "rejected: image 0 has a run of 3 pad tokens" in str(e.value)
    with pytest.raises(SampleError, match="has no rejected side"):
        collate([{**row, "rejected_input_ids": [], "rejected_labels": []}])
    assert isinstance(enc, PrefEncoded)


def test_the_collator_processes_a_pairs_prompt_images_once(tmp_path, tiny_ckpt, tiny_processor, write_image,
                                                           write_jsonl):
    from vlmtune.config import load_config
    from vlmtune.data.drivers.prepare import prepare
    from vlmtune.data.stages.pair_collate import PreferenceCollator
    from vlmtune.models.load import load_spec

    write_image(tmp_path / "a.png", 120, 90)
    write_image(tmp_path / "b.png", 64, 64)
    write_jsonl(tmp_path / "p.jsonl", [
        {"messages": [{"role": "user", "content": "<image><image>Which is bigger?"}], "chosen": "The first.",
         "rejected": "The second.", "images": ["a.png", "b.png"]},
        {"messages": [{"role": "user", "content": "<image>Colour?"}], "chosen": "Red.", "rejected": "Blue.",
         "images": ["b.png"]},
    ])
    ckpt = tiny_ckpt("qwen2_vl")
    cfg = load_config(None, base={"model_name_or_path": str(ckpt), "dataset": str(tmp_path / "p.jsonl"),
                                  "output_dir": str(tmp_path / "out"), "stage": "dpo", "cutoff_len": 400})
    rows = list(prepare(cfg.for_data(), progress=False).dataset())
    collate = PreferenceCollator(tiny_processor("qwen2_vl"), load_spec(str(ckpt)).spec, cutoff_len=400)
    real, calls = collate.inner.image_processor, []
    collate.inner.image_processor = lambda **kw: calls.append(kw["images"][0].size) or real(**kw)
    batch = collate(rows)
    # a.png, b.png for the first pair; b.png again for the second (same bounds and grid: processed once per batch)
    assert calls == [(120, 90), (64, 64)]
    grids = batch["image_grid_thw"].tolist()
    assert len(grids) == 6 and grids[:3] == grids[3:]  # the chosen sides' images, then the rejected sides'
    per_image = [t * h * w for t, h, w in grids]
    assert batch["pixel_values"].shape[0] == sum(per_image)
    half = sum(per_image[:3])
    import torch

    assert torch.equal(batch["pixel_values"][:half], batch["pixel_values"][half:])
