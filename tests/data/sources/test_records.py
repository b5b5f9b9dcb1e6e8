"""One fixture per record layout (written here, in each tool's layout), the detector, and the refusals."""

from __future__ import annotations

import ast
import importlib
import inspect
import json

import pytest

from vlmtune.data.sources import records
from vlmtune.config import ReadArgs
from vlmtune.data.sources.readers import read_samples
from vlmtune.errors import DataError

detect_mod = importlib.import_module("vlmtune.data.sources.records.detect")

CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
TOOLS = [{"name": "get_weather", "description": "the weather", "parameters": {"type": "object"}}]

# layout -> (record, [(role, text, weight)] it becomes)
FIXTURES = {
    "sharegpt": ({"conversations": [{"from": "human", "value": "<image>What?"}, {"from": "gpt", "value": "A cat."}],
                  "images": ["a.png"], "system": "Be brief."},
                 [("system", "Be brief.", 1), ("user", "What?", 1), ("assistant", "A cat.", 1)]),
    "openai": ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0},
                             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
               [("user", "q", 1), ("assistant", "a", 0), ("user", "q2", 1), ("assistant", "a2", 1)]),
    "trl": ({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "a"}]}], "images": ["a.png"]},
            [("user", "q", 1), ("assistant", "a", 1)]),
    "llava": ({"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
              [("user", "\nq", 1), ("assistant", "a", 1)]),
    "cauldron": ({"images": ["a.png"], "texts": [{"user": "q", "assistant": "a"}]}, [("user", "q", 1), ("assistant", "a", 1)]),
    "alpaca": ({"instruction": "Add", "input": "1 2", "output": "3", "system": "s", "history": [["hi", "hello"]]},
               [("system", "s", 1), ("user", "hi", 1), ("assistant", "hello", 1), ("user", "Add\n1 2", 1),
                ("assistant", "3", 1)]),
    "v1": ({"messages": [{"role": "user", "content": [{"type": "image_url", "value": "a.png"},
                                                       {"type": "text", "value": "q"}], "loss_weight": 0.0},
                         {"role": "assistant", "content": [{"type": "text", "value": "a"}], "loss_weight": 1.0}]},
           [("user", "q", 0), ("assistant", "a", 1)]),
    "prompt_completion": ({"prompt": "q", "completion": "a", "image": "a.png"}, [("user", "q", 1), ("assistant", "a", 1)]),
    "swift": ({"query": "<img>a.png</img>q", "response": "a", "history": [["q0", "a0"]], "system": "s"},
              [("system", "s", 1), ("user", "q0", 1), ("assistant", "a0", 1), ("user", "q", 1), ("assistant", "a", 1)]),
}


def _conv(record, tmp_path, fmt=records.AUTO_FORMAT):
    return records.record_to_conversation(record, sample_id="s", source="d.json#0", base_dir=str(tmp_path), fmt=fmt)


@pytest.mark.parametrize("layout", sorted(FIXTURES))
def test_each_layout_is_detected_and_converted(layout, tmp_path, write_image):
    write_image(tmp_path / "a.png", 32, 32)
    record, want = FIXTURES[layout]
    conv = _conv(record, tmp_path)
    assert conv.layout == layout and conv.read_problems == []
    assert [(m.role, m.text, m.weight) for m in conv.messages] == want
    images = 0 if layout in ("openai", "alpaca") else 1
    assert [i.path for i in conv.images] == [str(tmp_path / "a.png")] * images


def test_every_layout_has_a_converter_and_a_fixture():
    assert set(records.LAYOUTS) == set(detect_mod.CONVERTERS)
    assert set(FIXTURES) | {"kto", "ranking"} == set(records.LAYOUTS)


def test_each_converter_states_its_row_shape_and_is_short():
    for fn in set(detect_mod.CONVERTERS.values()):
        module = inspect.getmodule(fn)
        assert "Row shape" in (module.__doc__ or "") or "Row shapes" in (module.__doc__ or ""), module.__name__
        tree = ast.parse(inspect.getsource(module))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno + 1 < 60, f"{module.__name__}.{node.name}"


def test_tools_and_tool_turns(tmp_path):
    rec = {"conversations": [{"from": "human", "value": "weather?"}, {"from": "function_call", "value": json.dumps(CALL)},
                             {"from": "observation", "value": "21"}, {"from": "gpt", "value": "21 degrees"}],
           "tools": json.dumps(TOOLS)}
    conv = _conv(rec, tmp_path)
    assert conv.tools == TOOLS
    assert [(m.role, m.tool_calls) for m in conv.messages] == [
        ("user", None), ("function_call", [CALL]), ("observation", None), ("assistant", None)]
    openai = {"messages": [{"role": "user", "content": "weather?"},
                           {"role": "assistant", "tool_calls": [{"type": "function", "function": CALL}]},
                           {"role": "tool", "content": "21"}, {"role": "tool", "content": "22"},
                           {"role": "assistant", "content": "ok"}], "tools": TOOLS}
    conv = _conv(openai, tmp_path)
    assert [(m.role, m.text) for m in conv.messages] == [
        ("user", "weather?"), ("function_call", ""), ("observation", "21\n22"), ("assistant", "ok")]
    bad = _conv({**rec, "tools": "{not json"}, tmp_path)
    assert (bad.kind, bad.what) == ("bad_record", "`tools` is not JSON")


@pytest.mark.parametrize("flag,value,weight", [("loss", False, 0), ("loss", True, 1), ("loss", None, 1),
                                               ("weight", 0, 0), ("loss_weight", 0.0, 0)])
def test_per_message_loss_flags(flag, value, weight, tmp_path):
    rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", flag: value}]}
    assert [m.weight for m in _conv(rec, tmp_path).messages] == [1, weight]


def test_a_loss_flag_that_cannot_be_honoured_is_refused(tmp_path):
    rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "loss_weight": 0.5}]}
    p = _conv(rec, tmp_path)
    assert (p.kind, p.what) == ("bad_record", "the `loss_weight` of message 2 is 0.5, expected 0 or 1")
    rec["messages"][1] = {"role": "assistant", "content": "a", "loss": False, "weight": 1}
    assert _conv(rec, tmp_path).what == "message 2 has both `weight` and `loss`"


def _info(tmp_path, entry, rows):
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json", **entry}}))
    return read_samples(ReadArgs(dataset="d", dataset_dir=str(tmp_path)))


KTO_ROWS = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}], "label": False},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}], "label": True}]


@pytest.mark.parametrize("entry,rows,layout", [
    ({"formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "label"},
      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}},
     KTO_ROWS, "KTO"),
    ({"formatting": "sharegpt", "ranking": True, "columns": {"messages": "conversations", "chosen": "chosen",
                                                             "rejected": "rejected"}},
     [{"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "y"},
       "rejected": {"from": "gpt", "value": "n"}}] * 3, "preference (ranking)"),
    ({}, [{"prompt": "q", "completion": "a", "label": False}] * 2, "KTO"),
    ({}, [{"prompt": "q", "chosen": "y", "rejected": "n"}] * 2, "preference (ranking)"),
    ({}, [{"query": "q", "response": "y", "rejected_response": "n"}] * 2, "preference (ranking)"),
])
def test_preference_data_is_never_trained_as_sft(entry, rows, layout, tmp_path):
    res = _info(tmp_path, entry, rows)
    assert res.conversations == [] and len(res.problems) == len(rows)
    assert {p.kind for p in res.problems} == {"untrainable_layout"}
    assert res.problems[0].what.startswith(f"the dataset is {layout} data")
    stage = "kto" if layout == "KTO" else "dpo"
    assert f"stage: {stage}" in res.problems[0].fix
    message = str(DataError(res.problems)).splitlines()
    assert message[1:] == [f"  - {tmp_path / 'd.json'} ({len(rows)} record(s)): {res.problems[0].what}; "
                           f"{res.problems[0].fix}"]  # once per file, not per record


def test_a_mapped_column_vlmtune_cannot_use_is_an_error(tmp_path):
    res = _info(tmp_path, {"formatting": "sharegpt", "columns": {"audios": "audios", "extra": "x"}}, [])
    assert [(p.kind, p.what) for p in res.problems] == [
        ("bad_dataset_info", "dataset 'd' maps columns.audios, columns.extra, which vlmtune cannot use (audio is not supported)")]


def test_alpaca_columns_from_dataset_info(tmp_path):
    entry = {"formatting": "alpaca", "columns": {"prompt": "q", "response": "a", "system": "sys"}}
    res = _info(tmp_path, entry, [{"q": "Who?", "a": "Me.", "sys": "S"}])
    (conv,) = res.conversations
    assert conv.layout == "alpaca" and [(m.role, m.text) for m in conv.messages] == [
        ("system", "S"), ("user", "Who?"), ("assistant", "Me.")]


# A chat template that renders tools itself, as Qwen3-VL's does (tools in the system turn, calls as <tool_call>
# blocks, tool results as <tool_response> in a user turn), written here in that shape.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content[0].text }}\n\n"
    "{% endif %}# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{% elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content[0].text }}<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages %}{% if m.role == 'system' %}{% elif m.role == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for p in m.content %}{{ p.text }}{% endfor %}{% endif %}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n{% endif %}{% endfor %}")


def _trained_and_context(encoder, conv, spec, tok):
    from vlmtune.data.stages.encode import emit

    row = emit(encoder.encode(conv, {}), spec)
    trained = tok.decode([t for t in row.labels if t != -100])
    return tok.decode(row.input_ids), trained


@pytest.mark.parametrize("own_template", [True, False])
def test_tool_calls_are_trained_and_tool_results_are_context(own_template, tiny_ckpt, tmp_path):
    from vlmtune.data.stages.encode import Encoder
    from vlmtune.models.load import load_spec

    loaded = load_spec(str(tiny_ckpt("qwen2_vl")))  # its own processor: the template may be changed
    processor, spec = loaded.processor, loaded.spec
    if own_template:
        processor.chat_template = TOOL_TEMPLATE
    encoder = Encoder(processor, spec)
    assert encoder.renders_tools is own_template
    rec = {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                             {"from": "function_call", "value": json.dumps(CALL)},
                             {"from": "observation", "value": "21 C"}, {"from": "gpt", "value": "It is 21 C."}],
           "tools": json.dumps(TOOLS)}
    text, trained = _trained_and_context(encoder, _conv(rec, tmp_path), spec, processor.tokenizer)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    assert trained == call + "It is 21 C.<|im_end|>"  # the call and the answer; never the tool's result
    assert '"name": "get_weather", "description": "the weather"' in text  # the tools are in the prompt
    assert "<tool_response>\n21 C\n</tool_response>" in text
    # each block knows its tool kind whatever role the template gives it (fit keeps call, result and answer together)
    blocks = encoder.encode(_conv(rec, tmp_path), {}).blocks
    assert [(b.role, b.tool) for b in blocks] == [("system", None), ("user", None), ("assistant", "call"),
                                                  ("user", "result"), ("assistant", None)]
    # mask_history: only the last answer is a target
    masked = Encoder(processor, spec, mask_history=True)
    assert _trained_and_context(masked, _conv(rec, tmp_path), spec, processor.tokenizer)[1] == "It is 21 C.<|im_end|>"
