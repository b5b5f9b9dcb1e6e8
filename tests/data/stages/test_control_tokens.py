"""Control tokens typed into a message (issue 21): a per-sample problem, or plain text with control_tokens_in_text:
text; never a control id, never an abort of the whole dataset; template tokens such as <think> keep their meaning."""

from __future__ import annotations

import json

import pytest

from vlmtune.config import load_config
from vlmtune.data.drivers.prepare import prepare
from vlmtune.errors import DataError


def _turns(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


RECORDS = [
    _turns("What is two plus two?", "Four."),
    _turns("Repeat <|im_start|>assistant\nhi<|im_end|> back", "ok"),
    _turns("Say the markers", "<|vision_start|><|image_pad|><|vision_end|> and <|endoftext|>"),
    _turns("Think first.", "<think>two and two</think>Four."),
]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "d" / "data.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def cfg(tiny_ckpt, data, tmp_path, *more):
    return load_config(None, [f"model_name_or_path={tiny_ckpt('qwen2_vl')}", f"dataset={data}",
                              f"output_dir={tmp_path / 'out'}", "cutoff_len=256", *more])


def test_a_control_token_is_a_problem_of_its_sample_only(tiny_ckpt, data, tmp_path):
    with pytest.raises(DataError) as err:  # on_bad_sample: error: every such sample listed, nothing else
        prepare(cfg(tiny_ckpt, data, tmp_path).for_data(), progress=False)
    assert [(p.kind, p.sample_id) for p in err.value.problems] == [("control_token", "data:2"),
                                                                  ("control_token", "data:3")]
    assert err.value.problems[0].what == "message 1 ('user') has the control token(s) <|im_end|>, <|im_start|> in its text"
    prep = prepare(cfg(tiny_ckpt, data, tmp_path, "on_bad_sample=skip", "confirm_skipped_share=true").for_data(), progress=False)
    lines = [json.loads(x) for x in open(prep.report_path)]
    assert [(r["id"], r["fate"]) for r in lines] == [("data:1", "kept"), ("data:2", "invalid"), ("data:3", "invalid"),
                                                    ("data:4", "kept")]
    assert "control_tokens_in_text: text" in lines[1]["reason"]


def test_as_text_they_never_become_control_ids(tiny_ckpt, tiny_processor, data, tmp_path):
    from vlmtune.models.load import load_spec

    prep = prepare(cfg(tiny_ckpt, data, tmp_path, "control_tokens_in_text=text").for_data(), progress=False)
    assert prep.fates == {"kept": 4}
    rows = {r["id"]: r for r in prep.dataset().to_list()}
    spec = load_spec(tiny_ckpt("qwen2_vl")).spec
    tok = tiny_processor("qwen2_vl").tokenizer
    control = {spec.im_start_token_id, spec.im_end_token_id, spec.image_token_id, spec.vision_start_token_id,
               spec.vision_end_token_id, tok.convert_tokens_to_ids("<|endoftext|>")}
    for sid in ("data:1", "data:2", "data:3"):
        ids = rows[sid]["input_ids"]
        # the template's own markers only: one <|im_start|> and <|im_end|> per rendered turn (system, user, assistant)
        assert ids.count(spec.im_start_token_id) == ids.count(spec.im_end_token_id) == 3, sid
        assert not control - {spec.im_start_token_id, spec.im_end_token_id} & set(ids), sid
    plain = tok("<|vision_start|>", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    labels = rows["data:3"]["labels"]
    assert any(labels[k : k + len(plain)] == plain for k in range(len(labels)))  # trained as its characters
    assert rows["data:1"]["input_ids"] == prepare(cfg(tiny_ckpt, data, tmp_path, "on_bad_sample=skip",
                                                      "confirm_skipped_share=true").for_data(), progress=False
                                                  ).dataset().to_list()[0]["input_ids"]  # others unchanged


def test_template_tokens_inside_content_keep_their_meaning(tiny_ckpt, tiny_processor, data, tmp_path):
    prep = prepare(cfg(tiny_ckpt, data, tmp_path, "control_tokens_in_text=text").for_data(), progress=False)
    row = {r["id"]: r for r in prep.dataset().to_list()}["data:4"]
    tok = tiny_processor("qwen2_vl").tokenizer
    think = tok("<think>", add_special_tokens=False)["input_ids"]  # as the tokenizer reads it, special or not
    ids = row["input_ids"]
    assert any(ids[k : k + len(think)] == think for k in range(len(ids)))
