"""Reading users' datasets: formats, ids and sources, image path resolution and security, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmtune.config import ReadArgs
from vlmtune.data.media.paths import MediaRules
from vlmtune.data.sources.readers import ReadResult, read_samples
from vlmtune.data.sources.records import AUTO_FORMAT, MAX_TEXT_CHARS, RecordFormat, record_to_conversation
from vlmtune.data.types import Conversation, ImagePart, Message, TextPart
from vlmtune.data.stages.validate import validate
from vlmtune.errors import Problem

from _spec import pixel_spec

R = os.path.realpath
PIX = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 256, patch_size=14, merge_size=2)


def U(*parts):
    return Message("user", list(parts))


def A(*parts):
    return Message("assistant", list(parts))


def S(*parts):
    return Message("system", list(parts))


def T(text):
    return TextPart(text)


def accounted(res: ReadResult) -> bool:
    return res.records == len(res.conversations) + len(res.problems)


def conv(record, base_dir, **kw):
    kw.setdefault("sample_id", "s")
    kw.setdefault("source", "f.jsonl:1")
    return record_to_conversation(record, base_dir=str(base_dir), **kw)


# ---------------------------------------------------------------------------------------------
# Formats


def test_sharegpt_messages_jsonl(tmp_path, write_jsonl):
    data = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "<image>What is this?"},
                    {"role": "assistant", "content": "A cat."},
                    {"role": "user", "content": "And <image>?"},
                    {"role": "assistant", "content": "A dog."},
                ],
                "images": ["img/cat.jpg", "img/dog.jpg"],
            },
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "system": "Be brief."},
        ],
    )
    res = read_samples(data)
    assert res.problems == []
    assert res.records == 2
    img = R(tmp_path / "img")
    assert res.conversations == [
        Conversation(
            id="train:1",
            source=f"{data}:1",
            messages=[
                U(ImagePart("img/cat.jpg", f"{img}/cat.jpg"), T("What is this?")),
                A(T("A cat.")),
                U(T("And "), ImagePart("img/dog.jpg", f"{img}/dog.jpg"), T("?")),
                A(T("A dog.")),
            ],
        ),
        Conversation(
            id="train:2",
            source=f"{data}:2",
            messages=[S(T("Be brief.")), U(T("hi")), A(T("hello"))],
        ),
    ]


def test_sharegpt_conversations_from_value(tmp_path, write_json):
    data = write_json(
        tmp_path / "d.json",
        [
            {
                "conversations": [
                    {"from": "system", "value": "sys"},
                    {"from": "human", "value": "<image>\nQ"},
                    {"from": "gpt", "value": "A"},
                ],
                "images": ["a.png"],
                "system": "ignored: the first turn is a system turn",
            }
        ],
    )
    res = read_samples(data)
    assert res.problems == [] and res.records == 1
    assert res.conversations == [
        Conversation(
            id="d:0",
            source=f"{data}#0",
            messages=[S(T("sys")), U(ImagePart("a.png", R(tmp_path / "a.png")), T("\nQ")), A(T("A"))],
        )
    ]


def test_llamafactory_mllm_demo_entry(tmp_path, write_json):
    ds = tmp_path / "data"
    ds.mkdir()
    write_json(
        ds / "dataset_info.json",
        {
            "mllm_demo": {
                "file_name": "mllm_demo.json",
                "formatting": "sharegpt",
                "columns": {"messages": "messages", "images": "images"},
                "tags": {
                    "role_tag": "role",
                    "content_tag": "content",
                    "user_tag": "user",
                    "assistant_tag": "assistant",
                },
            }
        },
    )
    write_json(
        ds / "mllm_demo.json",
        [
            {
                "messages": [
                    {"content": "<image>Who are they?", "role": "user"},
                    {"content": "They're Kane and Gretzka.", "role": "assistant"},
                ],
                "images": ["mllm_demo_data/1.jpg"],
            }
        ],
    )
    res = read_samples(ReadArgs(dataset="mllm_demo", dataset_dir=str(ds)))
    assert res.problems == [] and res.records == 1
    src = os.path.join(str(ds), "mllm_demo.json")
    assert res.conversations == [
        Conversation(
            id="mllm_demo:0",
            source=f"{src}#0",
            messages=[
                U(ImagePart("mllm_demo_data/1.jpg", R(ds / "mllm_demo_data" / "1.jpg")), T("Who are they?")),
                A(T("They're Kane and Gretzka.")),
            ],
        )
    ]


def test_dataset_info_columns_tags_defaults_and_comma_names(tmp_path, write_json, write_jsonl):
    ds = tmp_path / "data"
    (ds / "sub").mkdir(parents=True)
    write_json(
        ds / "dataset_info.json",
        {
            # custom columns and tags
            "custom": {
                "file_name": "sub/custom.jsonl",
                "formatting": "sharegpt",
                "columns": {"messages": "dialog", "images": "pics", "system": "prompt"},
                "tags": {
                    "role_tag": "speaker",
                    "content_tag": "text",
                    "user_tag": "person",
                    "assistant_tag": "bot",
                    "system_tag": "sys",
                },
            },
            # sharegpt defaults: conversations / from / value / human / gpt
            "plain": {"file_name": "plain.json", "formatting": "sharegpt", "columns": {"images": "images"}},
        },
    )
    write_jsonl(
        ds / "sub" / "custom.jsonl",
        [
            {
                "dialog": [{"speaker": "person", "text": "<image>hi"}, {"speaker": "bot", "text": "yo"}],
                "pics": ["x.png"],
                "prompt": "P",
                # the mapped columns are used, not the usual names
                "messages": "junk",
                "images": 5,
            }
        ],
    )
    write_json(
        ds / "plain.json",
        [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "id": "p1"}],
    )
    res = read_samples(ReadArgs(dataset="custom, plain", dataset_dir=str(ds)))
    assert res.problems == [] and res.records == 2
    assert res.conversations == [
        Conversation(
            id="custom:1",
            source=os.path.join(str(ds), "sub/custom.jsonl") + ":1",
            # images resolve against dataset_dir (LLaMA-Factory's media_dir default), not sub/
            messages=[S(T("P")), U(ImagePart("x.png", R(ds / "x.png")), T("hi")), A(T("yo"))],
        ),
        Conversation(id="p1", source=os.path.join(str(ds), "plain.json") + "#0", messages=[U(T("q")), A(T("a"))]),
    ]


def test_dataset_info_tags_are_honoured_strictly(tmp_path, write_json):
    fmt = RecordFormat(messages="conversations", role_tag="from", content_tag="value", user_tag="human", assistant_tag="gpt")
    rec = {"conversations": [{"role": "user", "content": "q"}]}
    assert conv(rec, tmp_path, fmt=fmt) == Problem(
        source="f.jsonl:1", what="message 1 has no `from`", fix="give each turn a `from`", sample_id="s", kind="bad_record"
    )


def test_media_dir_overrides_dataset_dir(tmp_path, write_json):
    ds = tmp_path / "data"
    ds.mkdir()
    media = tmp_path / "media"
    write_json(ds / "dataset_info.json", {"d": {"file_name": "d.json", "formatting": "sharegpt", "columns": {"messages": "messages"}, "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}})
    write_json(ds / "d.json", [{"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a"}], "images": ["i.png"]}])
    res = read_samples(ReadArgs(dataset="d", dataset_dir=str(ds), media_dir=str(media)))
    assert res.conversations[0].images == [ImagePart("i.png", R(media / "i.png"))]


def test_hf_parts_format(tmp_path, write_json):
    data = write_json(
        tmp_path / "hf.json",
        [
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": "a.png"},
                            {"type": "image", "path": "b.png"},
                            {"type": "image_url", "image_url": {"url": "c.png"}},
                            {"type": "text", "text": "Compare."},
                        ],
                    },
                    {"role": "assistant", "content": [{"type": "text", "text": "Same."}]},
                ]
            },
            # plain string content with <image> and a top-level images list, in the same file
            {"messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}], "images": ["d.png"]},
        ],
    )
    res = read_samples(data)
    assert res.problems == [] and res.records == 2
    t = R(tmp_path)
    assert res.conversations == [
        Conversation(
            id="hf:0",
            source=f"{data}#0",
            messages=[
                U(ImagePart("a.png", f"{t}/a.png"), ImagePart("b.png", f"{t}/b.png"), ImagePart("c.png", f"{t}/c.png"), T("Compare.")),
                A(T("Same.")),
            ],
        ),
        Conversation(id="hf:1", source=f"{data}#1", messages=[U(ImagePart("d.png", f"{t}/d.png"), T("x")), A(T("y"))]),
    ]


def test_trl_style_image_parts_take_the_images_column(tmp_path):
    rec = {
        "messages": [
            {"role": "user", "content": [{"index": 0, "text": None, "type": "image"}, {"index": None, "text": "Q", "type": "text"}]},
            {"role": "assistant", "content": [{"index": None, "text": "A", "type": "text"}]},
        ],
        "images": ["p.png"],
    }
    c = conv(rec, tmp_path)
    assert c.messages == [U(ImagePart("p.png", R(tmp_path / "p.png")), T("Q")), A(T("A"))]
    assert c.read_problems == []


def test_ids_own_unique_else_fallback(tmp_path, write_jsonl):
    m = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    data = write_jsonl(
        tmp_path / "ids.jsonl",
        [
            {"id": "a", "messages": m},
            {"id": "dup", "messages": m},
            {"id": 7, "messages": m},
            {"id": "dup", "messages": m},
            {"id": None, "messages": m},
            {"id": ["x"], "messages": m},
            {"id": True, "messages": m},
        ],
    )
    res = read_samples(data)
    assert [c.id for c in res.conversations] == ["a", "ids:2", "7", "ids:4", "ids:5", "ids:6", "ids:7"]


def test_fallback_id_clash_gets_suffix(tmp_path, write_jsonl):
    m = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a = write_jsonl(tmp_path / "x" / "t.jsonl", [{"messages": m}])
    b = write_jsonl(tmp_path / "y" / "t.jsonl", [{"messages": m}, {"id": "t:1", "messages": m}])
    res = read_samples(f"{a},{b}")
    assert [c.id for c in res.conversations] == ["t:1", "t:1~2", "t:1~3"]
    assert [c.source for c in res.conversations] == [f"{a}:1", f"{b}:1", f"{b}:2"]


def test_datasets_folder_and_dataset_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = {
        "messages": [
            [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}],
            [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}],
        ],
        "images": [["imgs/1.png"], []],
        "id": ["first", None],
    }
    ds = Dataset.from_dict(rows)
    (tmp_path / "out").mkdir()
    folder = str(tmp_path / "out" / "ds")
    ds.save_to_disk(folder)
    dd_folder = str(tmp_path / "out" / "dd")
    DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(dd_folder)
    expected = lambda path, name: [  # noqa: E731
        Conversation(
            id="first",
            source=f"{path}#0",
            # relative paths resolve against the folder holding the datasets folder
            messages=[U(ImagePart("imgs/1.png", R(tmp_path / "out" / "imgs" / "1.png")), T("q")), A(T("a"))],
        ),
        Conversation(id=f"{name}:1", source=f"{path}#1", messages=[U(T("q2")), A(T("a2"))]),
    ]
    res = read_samples(folder)
    assert res.problems == [] and res.records == 2
    assert res.conversations == expected(folder, "ds")
    res = read_samples(dd_folder)
    assert res.problems == [] and res.records == 2
    assert res.conversations == expected(dd_folder, "dd")


def test_datasets_folder_with_embedded_image_bytes(tmp_path, write_image):
    from datasets import Dataset, Image, List

    from vlmtune.data.sources.formats import embedded_bytes

    write_image(tmp_path / "p.png", 8, 8)
    ds = Dataset.from_dict(
        {"messages": [[{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a"}]], "images": [[str(tmp_path / "p.png")]]}
    ).cast_column("images", List(Image()))
    folder = str(tmp_path / "ds")
    ds.save_to_disk(folder)  # embeds the bytes and keeps only the file name
    res = read_samples(folder)
    assert res.problems == [] and res.records == 1
    (img,) = res.conversations[0].images
    assert img.ref == "p.png" and img.data == (tmp_path / "p.png").read_bytes()
    assert img.path == f'embedded:["disk",{json.dumps(folder)},null,0,["images",0,"bytes"]]'
    assert embedded_bytes(img.path) == img.data  # what the collator reads at training time
    # path-only Image values (no bytes) are used as paths
    rec = {"messages": [{"role": "user", "content": "<image>"}], "images": [{"bytes": None, "path": "p.png"}]}
    assert conv(rec, tmp_path).images == [ImagePart("p.png", R(tmp_path / "p.png"))]


def test_directory_of_files(tmp_path, write_json, write_jsonl):
    m = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    d = tmp_path / "dir"
    d.mkdir()
    write_json(d / "b.json", [{"messages": m}])
    write_jsonl(d / "a.jsonl", [{"messages": m}])
    write_json(d / "dataset_info.json", {"x": {"file_name": "b.json"}})  # never read as data
    (d / "notes.txt").write_text("ignored")
    res = read_samples(str(d))
    assert res.problems == [] and res.records == 2
    assert [(c.id, c.source) for c in res.conversations] == [
        ("a:1", os.path.join(str(d), "a.jsonl") + ":1"),
        ("b:0", os.path.join(str(d), "b.json") + "#0"),
    ]


def test_tool_roles_become_function_calls_and_observations(tmp_path):
    call = '{"name": "f", "arguments": {"x": 1}}'
    rec = {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": call},
                             {"from": "observation", "value": "1"}, {"from": "tool", "value": "2"},
                             {"from": "weird", "value": "3"}]}
    c = conv(rec, tmp_path)
    # tool results that follow each other are one observation turn, as the chat template groups them
    assert [m.role for m in c.messages] == ["user", "function_call", "observation", "weird"]
    assert c.messages[1].tool_calls == [{"name": "f", "arguments": {"x": 1}}]
    assert c.messages[2].text == "1\n2"
    fmt = RecordFormat(role_tag="r", content_tag="c", user_tag="u", assistant_tag="a", observation_tag="obs", function_tag="fn")
    rec = {"messages": [{"r": "u", "c": "q"}, {"r": "fn", "c": call}, {"r": "obs", "c": "1"}, {"r": "a", "c": "x"}]}
    assert [m.role for m in conv(rec, tmp_path, fmt=fmt).messages] == ["user", "function_call", "observation", "assistant"]
    bad = conv({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "f()"}]}, tmp_path)
    assert (bad.kind, bad.what) == ("bad_record", "the function call of message 2 is not JSON")


# ---------------------------------------------------------------------------------------------
# Placeholders


def test_placeholder_more_than_images(tmp_path):
    rec = {"messages": [{"role": "user", "content": "<image><image>q"}, {"role": "assistant", "content": "a"}], "images": ["a.png"]}
    c = conv(rec, tmp_path)
    assert c.messages[0].parts == [ImagePart("a.png", R(tmp_path / "a.png")), T("q")]
    assert c.read_problems == [
        Problem(
            source="f.jsonl:1",
            what="2 <image> placeholders but 1 image in `images`",
            fix="add the missing image path or remove the extra placeholder",
            sample_id="s",
            kind="placeholder_mismatch",
        )
    ]


def test_placeholder_fewer_than_images(tmp_path):
    rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "images": ["a.png", "b.png"]}
    c = conv(rec, tmp_path)
    assert c.images == []
    assert c.read_problems == [
        Problem(
            source="f.jsonl:1",
            what="0 <image> placeholders but 2 images in `images`",
            fix="add an <image> placeholder where each image goes, or remove the extra image path",
            sample_id="s",
            kind="placeholder_mismatch",
        )
    ]


# ---------------------------------------------------------------------------------------------
# Path security


def _img_conv(base, ref, **kw):
    rec = {"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a"}], "images": [ref]}
    return conv(rec, base, **kw)


@pytest.mark.parametrize("ref", ["../secret.png", "sub/../../secret.png"])
def test_dotdot_outside_is_refused(tmp_path, ref):
    base = tmp_path / "media"
    base.mkdir()
    c = _img_conv(base, ref)
    assert c.images == [ImagePart(ref, None)]
    assert c.read_problems == [
        Problem(
            source="f.jsonl:1",
            what=f"image {ref!r} resolves to {R(tmp_path)}/secret.png, outside the media folder {R(base)}",
            fix="move the image under the media folder, set media_dir to a folder that contains it, "
            "or pass allow_paths_outside_media_dir=True if you trust this dataset",
            sample_id="s",
            kind="path_outside_media_dir",
        )
    ]


def test_dotdot_staying_inside_is_fine(tmp_path):
    c = _img_conv(tmp_path, "a/../b.png")
    assert c.images == [ImagePart("a/../b.png", R(tmp_path / "b.png"))] and c.read_problems == []


def test_absolute_paths(tmp_path):
    base = tmp_path / "media"
    base.mkdir()
    inside = str(base / "x.png")
    assert _img_conv(base, inside).images == [ImagePart(inside, R(inside))]
    c = _img_conv(base, "/etc/passwd")
    assert c.images == [ImagePart("/etc/passwd", None)]
    assert [(p.kind, p.what) for p in c.read_problems] == [
        ("path_outside_media_dir", f"image '/etc/passwd' resolves to {R('/etc/passwd')}, outside the media folder {R(base)}")
    ]
    allowed = _img_conv(base, "/etc/passwd", rules=MediaRules(allow_outside=True))
    assert allowed.images == [ImagePart("/etc/passwd", R("/etc/passwd"))] and allowed.read_problems == []


def test_symlink_pointing_outside_is_refused(tmp_path, write_image):
    base = tmp_path / "media"
    base.mkdir()
    target = write_image(tmp_path / "outside.png", 4, 4)
    os.symlink(target, base / "link.png")
    os.symlink(tmp_path, base / "dirlink")
    c = _img_conv(base, "link.png")
    assert c.images == [ImagePart("link.png", None)]
    assert [(p.kind, p.what) for p in c.read_problems] == [
        ("path_outside_media_dir", f"image 'link.png' resolves to {R(target)}, outside the media folder {R(base)}")
    ]
    assert _img_conv(base, "dirlink/outside.png").images == [ImagePart("dirlink/outside.png", None)]
    # symlinks that stay inside are followed
    write_image(base / "real.png", 4, 4)
    os.symlink(base / "real.png", base / "inlink.png")
    assert _img_conv(base, "inlink.png").images == [ImagePart("inlink.png", R(base / "real.png"))]


@pytest.mark.parametrize("ref", ["http://example.com/a.png", "https://example.com/a.png", "s3://bucket/a.png"])
def test_urls_are_refused(tmp_path, ref):
    c = _img_conv(tmp_path, ref)
    assert c.images == [ImagePart(ref, None)]
    assert c.read_problems == [
        Problem(
            source="f.jsonl:1",
            what=f"image {ref!r} is a URL; remote images are refused",
            fix="set allow_remote_images: true to fetch http(s) images, or download the image and "
            "reference the local file instead",
            sample_id="s",
            kind="remote_image",
        )
    ]
    allowed = _img_conv(tmp_path, ref, rules=MediaRules(allow_remote=True))
    assert allowed.images == [ImagePart(ref, None)]
    if ref.startswith("s3:"):
        assert [(p.kind, p.what) for p in allowed.read_problems] == [
            ("remote_image", f"image {ref!r} is a URL of a scheme that is not fetched (only http, https and file)")
        ]
    else:  # left to data/media/remote.py, which fetches it after reading
        assert allowed.read_problems == []


def test_file_urls_are_local_paths(tmp_path, write_image):
    write_image(tmp_path / "a b.png", 4, 4)
    c = _img_conv(tmp_path, f"file://{tmp_path}/a%20b.png")
    assert c.images == [ImagePart(f"file://{tmp_path}/a%20b.png", R(tmp_path / "a b.png"))] and c.read_problems == []
    outside = _img_conv(tmp_path, "file:///etc/passwd")
    assert outside.images == [ImagePart("file:///etc/passwd", None)]
    assert [p.kind for p in outside.read_problems] == ["path_outside_media_dir"]


def test_data_uris_are_inline_images(tmp_path, write_image):
    import base64

    png = Path(write_image(tmp_path / "a.png", 5, 3)).read_bytes()
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    c = _img_conv(tmp_path, uri)
    assert c.read_problems == [] and c.images == [ImagePart(uri, uri)] and c.images[0].data == png
    bad = _img_conv(tmp_path, "data:image/png;base64,@@@")
    assert bad.images == [ImagePart("data:image/png;base64,@@@", None)]
    assert [(p.kind, p.what) for p in bad.read_problems] == [
        ("bad_data_uri", "image 'data:image/png;base64,@@@' is not a base64 `data:` URI with image bytes")
    ]


def test_read_samples_passes_security_flags(tmp_path, write_jsonl):
    base = tmp_path / "d"
    base.mkdir()
    rec = {"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a"}], "images": ["../x.png"]}
    data = write_jsonl(base / "t.jsonl", [rec])
    assert read_samples(data).conversations[0].images == [ImagePart("../x.png", None)]
    res = read_samples(ReadArgs(dataset=data, dataset_dir=None, allow_paths_outside_media_dir=True))
    assert res.conversations[0].images == [ImagePart("../x.png", R(tmp_path / "x.png"))]
    assert res.conversations[0].read_problems == []


# ---------------------------------------------------------------------------------------------
# Bad input


def test_invalid_json_and_utf8_lines_are_reported_and_the_rest_read(tmp_path, write_jsonl):
    m = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    data = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"messages": m}, {"messages": m}],
        raw_lines={2: b'{"messages": [', 3: b"", 4: b'{"messages": "\xff\xfe"}', 5: b"[" * 100_000},
    )
    res = read_samples(data)
    assert [c.source for c in res.conversations] == [f"{data}:1", f"{data}:6"]
    assert [c.id for c in res.conversations] == ["bad:1", "bad:6"]
    assert res.problems == [
        Problem(
            source=f"{data}:2",
            what="line is not valid JSON: Expecting value at column 15",
            fix="fix the JSON on this line (a .jsonl file holds one JSON object per line)",
            sample_id=None,
            kind="invalid_json",
        ),
        Problem(
            source=f"{data}:4",
            what="line is not valid UTF-8 (byte 0xff at column 15)",
            fix="re-save the file as UTF-8",
            sample_id=None,
            kind="invalid_utf8",
        ),
        Problem(
            source=f"{data}:5",
            what="line is not valid JSON: the JSON is nested too deeply",
            fix="fix the JSON on this line (a .jsonl file holds one JSON object per line)",
            sample_id=None,
            kind="invalid_json",
        ),
    ]
    assert res.records == 5 and accounted(res)  # the blank line 3 is not a record


def test_json_array_that_does_not_parse_is_one_problem(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('[{"messages": []},\n {"messages": [}]')
    res = read_samples(str(p))
    assert res.conversations == []
    assert res.problems == [
        Problem(
            source=str(p),
            what="file is not valid JSON: Expecting value at line 2, column 16",
            fix="fix the JSON syntax (a .json file holds one JSON array of records; use .jsonl for one record per line)",
            sample_id=None,
            kind="invalid_json",
        )
    ]
    assert res.records == 1 and accounted(res)


def test_json_file_holding_json_lines_is_read_by_line(tmp_path):
    p = tmp_path / "lines.json"
    p.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n{"x": \n')
    res = read_samples(str(p))
    assert [c.source for c in res.conversations] == [f"{p}:1"]
    assert [(x.source, x.kind) for x in res.problems] == [(f"{p}:2", "invalid_json")]


def _bad(what, fix, source="f.jsonl:1"):
    return Problem(source=source, what=what, fix=fix, sample_id="s", kind="bad_record")


@pytest.mark.parametrize(
    "record, what, fix",
    [
        ([1, 2], "record is a list, expected an object with a `messages` list", 'write each record as {"messages": [...], "images": [...]}'),
        ({"text": "x"}, "record has no `messages` (or `conversations`) list, nor the columns of another layout "
                        "vlmtune reads (its keys: text)",
         'add the turns as a `messages` list of {"role", "content"} objects (docs/datasets.md lists every layout read)'),
        ({"messages": "hi"}, "`messages` is a string, expected a list of turns", 'write `messages` as a list of {"role", "content"} objects'),
        ({"messages": [5]}, "message 1 is a number, expected an object with a role and a content", 'write each turn as {"role": ..., "content": ...}'),
        ({"messages": [{"content": "x"}]}, "message 1 has neither `role` nor `from`", "give each turn a `role` and a `content`"),
        ({"messages": [{"role": 3, "content": "x"}]}, "the `role` of message 1 is a number, expected a string", 'write the role as a string such as "user" or "assistant"'),
        ({"messages": [{"role": "user"}]}, "message 1 has no `content`", "give each turn a `content`"),
        (
            {"messages": [{"role": "user", "content": {"a": 1}}]},
            "the content of message 1 is an object, expected a string or a list of parts",
            'write the content as a string, or as a list of {"type": "text"|"image", ...} parts',
        ),
        (
            {"messages": [{"role": "user", "content": None}]},
            "the content of message 1 is null, expected a string or a list of parts",
            'write the content as a string, or as a list of {"type": "text"|"image", ...} parts',
        ),
        (
            {"messages": [{"role": "user", "content": [[1]]}]},
            "part 1 of message 1 is a list, expected an object",
            'write each part as {"type": "text", "text": ...} or {"type": "image", "image": PATH}',
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "pdf", "pdf": "v.pdf"}]}]},
            "part 1 of message 1 has type 'pdf'; only text, image and video parts are supported",
            "remove the part or convert it to a text, image or video part",
        ),
        (
            {"messages": [{"role": "user", "content": [{"foo": 1}]}]},
            "part 1 of message 1 has no `type`",
            'give each part a type: {"type": "text", "text": ...} or {"type": "image", "image": PATH}',
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            "the text of part 1 of message 1 is a number, expected a string",
            "write the text as a string",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "image": {"nested": [1]}}]}]},
            "the image of part 1 of message 1 is an object, expected a path string",
            "write the image path as a string",
        ),
        ({"messages": [], "images": 5}, "`images` is a number, expected a list of paths", "write `images` as a list of image paths"),
        ({"messages": [], "images": ["a.png", None]}, "`images`[1] is null, expected a path string", "write the image path as a string"),
        ({"messages": [], "images": [""]}, "`images`[0] is an empty path", "write the image path, or remove the image"),
        ({"messages": [], "images": ["a\x00b"]}, "`images`[0] contains a NUL character", "fix the image path"),
        ({"messages": [], "images": ["a" * 5000]}, "`images`[0] is 5,000 characters long, above the path limit of 4,096", "fix the image path"),
        ({"messages": [], "system": ["x"]}, "`system` is a list, expected a string", "write `system` as a string"),
        (
            {"messages": [{"role": "user", "content": "x" * (MAX_TEXT_CHARS + 1)}]},
            f"the text of message 1 is {MAX_TEXT_CHARS + 1:,} characters long, above the limit of {MAX_TEXT_CHARS:,}",
            "shorten the text or remove the sample",
        ),
        (
            {"messages": [{"role": "user", "content": "<image>"}], "system": "<image>", "images": ["a.png"]},
            "`system` contains an <image> or <video> placeholder",
            "put images and videos in a user turn, not in the system prompt",
        ),
    ],
)
def test_bad_records(tmp_path, record, what, fix):
    assert conv(record, tmp_path) == _bad(what, fix)


_MEDIA_FIX = "remove the audio (or video URL part) from the sample, or the sample (audio is not supported yet)"


@pytest.mark.parametrize(
    "record, what",
    [
        ({"messages": [], "audios": ["a.wav"]}, "record has `audios`; audio is not supported yet"),
        ({"messages": [], "audio": "a.wav"}, "record has `audio`; audio is not supported yet"),
        (
            {"conversations": [{"from": "human", "value": "<audio>hi"}, {"from": "gpt", "value": "x"}]},
            "a text has a <audio> placeholder; audio is not supported yet",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
            "part 1 of message 1 is a `input_audio` part; audio is not supported yet",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "v.mp4"}}]}]},
            "part 1 of message 1 is a `video_url` part; give videos as local files (`video` parts)",
        ),
    ],
)
def test_audio_is_reported_never_trained_as_text(tmp_path, record, what):
    assert conv(record, tmp_path) == Problem(source="f.jsonl:1", what=what, fix=_MEDIA_FIX, sample_id="s",
                                             kind="unsupported_media")


def _video_parts(c):
    return [(m.role, [(type(p).__name__, getattr(p, "ref", getattr(p, "text", None))) for p in m.parts])
            for m in c.messages]


@pytest.mark.parametrize(
    "record",
    [
        {"messages": [{"role": "user", "content": "<image>then<video>what?"}, {"role": "assistant", "content": "x"}],
         "images": ["a.png"], "videos": ["v.mp4"]},
        {"messages": [{"role": "user", "content": "<image>then<video>what?"}, {"role": "assistant", "content": "x"}],
         "images": ["a.png"], "video": "v.mp4"},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "then"},
                                                   {"type": "video", "video": "v.mp4"}, {"type": "text", "text": "what?"}]},
                      {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "then"},
                                                   {"type": "video"}, {"type": "text", "text": "what?"}]},
                      {"role": "assistant", "content": "x"}], "images": ["a.png"], "videos": ["v.mp4"]},
    ],
    ids=["sharegpt", "llava-video key", "hf parts", "pathless parts"],
)
def test_videos_are_read_in_order_with_images(tmp_path, record):
    c = conv(record, tmp_path)
    assert c.read_problems == []
    assert _video_parts(c) == [("user", [("ImagePart", "a.png"), ("TextPart", "then"), ("VideoPart", "v.mp4"),
                                         ("TextPart", "what?")]), ("assistant", [("TextPart", "x")])]
    assert c.videos[0].path == str(tmp_path.resolve() / "v.mp4")


@pytest.mark.parametrize(
    "record, kind, what",
    [
        ({"messages": [{"role": "user", "content": "<video><video>q"}, {"role": "assistant", "content": "x"}],
          "videos": ["v.mp4"]}, "placeholder_mismatch", "2 <video> placeholders but 1 video in `videos`"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
          "videos": ["v.mp4"]}, "placeholder_mismatch", "0 <video> placeholders but 1 video in `videos`"),
        ({"messages": [{"role": "user", "content": "<video>q"}, {"role": "assistant", "content": "x"}],
          "videos": ["../v.mp4"]}, "path_outside_media_dir", "video '../v.mp4' resolves to"),
        ({"messages": [{"role": "user", "content": "<video>q"}, {"role": "assistant", "content": "x"}],
          "videos": ["https://x.org/v.mp4"]}, "remote_image", "video 'https://x.org/v.mp4' is a URL; remote videos"),
    ],
)
def test_video_reference_problems_are_read_problems(tmp_path, record, kind, what):
    c = conv({**record}, tmp_path)
    assert [p.kind for p in c.read_problems] == [kind]
    assert c.read_problems[0].what.startswith(what)


def test_embedded_video_bytes_are_a_bad_record(tmp_path):
    record = {"messages": [{"role": "user", "content": "<video>q"}, {"role": "assistant", "content": "x"}],
              "videos": [{"bytes": b"\x00\x00"}]}
    out = conv(record, tmp_path)
    assert out.kind == "bad_record" and out.what == "`videos`[0] holds embedded video bytes; videos are read from files"


def test_bad_records_in_a_file_are_accounted(tmp_path, write_jsonl):
    m = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    data = write_jsonl(tmp_path / "t.jsonl", [{"messages": m, "id": "ok"}, "just a string", {"messages": {"x": 1}, "id": "b"}])
    res = read_samples(data)
    assert [c.id for c in res.conversations] == ["ok"]
    assert [(p.sample_id, p.source, p.kind) for p in res.problems] == [
        ("t:2", f"{data}:2", "bad_record"),
        ("b", f"{data}:3", "bad_record"),
    ]
    assert res.records == 3 and accounted(res)


def test_missing_data_and_unknown_dataset_names(tmp_path, write_json):
    res = read_samples(str(tmp_path / "nope.jsonl"))
    assert res.problems == [
        Problem(
            source=str(tmp_path / "nope.jsonl"),
            what=f"{str(tmp_path / 'nope.jsonl')!r} is not a file or folder (and no dataset_dir was given to look up dataset names)",
            fix="point `data` at a .json/.jsonl file, a folder of them or a `save_to_disk` folder, or give dataset names with dataset_dir",
            sample_id=None,
            kind="data_not_found",
        )
    ]
    assert res.records == 1 and accounted(res)
    write_json(tmp_path / "dataset_info.json", {"a": {"file_name": "a.json", "formatting": "sharegpt"}, "hub": {"script_url": "x/y"}, "alp": {"file_name": "a.json", "formatting": "xml"}})
    write_json(tmp_path / "a.json", [])
    res = read_samples(ReadArgs(dataset="a,b,hub,alp", dataset_dir=str(tmp_path)))
    info = os.path.join(str(tmp_path), "dataset_info.json")
    assert res.problems == [
        Problem(
            source=f"{info}#b",
            what="dataset 'b' is not in dataset_info.json (it lists: a, alp, hub)",
            fix="add the dataset to dataset_info.json or fix its name",
            sample_id=None,
            kind="data_not_found",
        ),
        Problem(
            source=f"{info}#hub",
            what="dataset 'hub' has neither `file_name` nor `hf_hub_url`; "
            "only local files and Hugging Face Hub datasets are supported (not script or ModelScope ones)",
            fix="point `file_name` at the local file, or `hf_hub_url` at the Hub dataset id",
            sample_id=None,
            kind="bad_dataset_info",
        ),
        Problem(
            source=f"{info}#alp",
            what="dataset 'alp' has formatting 'xml'; vlmtune reads sharegpt, alpaca, openai",
            fix="set formatting to sharegpt, alpaca or openai (or leave it out: each record's layout is detected)",
            sample_id=None,
            kind="bad_dataset_info",
        ),
    ]
    assert res.records == 3 and accounted(res)


# ---------------------------------------------------------------------------------------------
# Fuzz: nothing escapes, everything is accounted for

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.sampled_from(["<image>", "user", "assistant", "human", "gpt", "a.png", "../x.png", "http://x/y.png", "", "image", "text"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8) | st.sampled_from(["role", "content", "from", "value", "type", "text", "image", "images", "messages", "conversations", "system", "id", "path", "image_url", "url"]), children, max_size=5),
    max_leaves=25,
)
_refs = st.sampled_from(["a.png", "b.png", "../x.png", "/etc/passwd", "", "data:x", "http://h/i.png", "a\x00b"]) | _json
_text = st.lists(st.sampled_from(["a", " ", "\n", "<image>", "é", "<image", "image>"]), max_size=8).map("".join)
_part = (
    st.fixed_dictionaries({"type": st.just("text"), "text": _text | _json})
    | st.fixed_dictionaries({"type": st.sampled_from(["image", "image_url", "video", None]), "image": _refs})
    | st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": _refs}) | _json})
    | _json
)
_good_part = st.fixed_dictionaries({"type": st.just("text"), "text": _text}) | st.fixed_dictionaries(
    {"type": st.just("image"), "image": st.sampled_from(["a.png", "b.png", "c.png"])}
)
# mostly plausible, sometimes junk: enough records get through to exercise validation too
_content = st.one_of(_text, _text, _text, st.lists(_good_part, max_size=3), st.lists(_good_part, max_size=3), st.lists(_part, max_size=3), _json)
_roles = st.sampled_from(["user", "assistant", "system", "human", "gpt", "observation", "function_call"])
_turn = st.one_of(
    st.fixed_dictionaries({"role": _roles, "content": _content}),
    st.fixed_dictionaries({"role": _roles, "content": _content}),
    st.fixed_dictionaries({"role": _roles, "content": _content}),
    st.fixed_dictionaries({"role": _roles | _json, "content": _content})
    | st.fixed_dictionaries({"from": _roles | _json, "value": _content})
    | st.fixed_dictionaries({}, optional={"role": _json, "content": _json, "from": _json, "value": _json})
    | _json,
)
_plausible = st.fixed_dictionaries(
    {"messages": st.lists(_turn, max_size=5)},
    optional={
        "images": st.lists(st.sampled_from(["a.png", "b.png", "c.png"]), max_size=3) | st.lists(_refs, max_size=3) | _json,
        "system": _text | _json,
        "id": _json,
        "videos": _json,
    },
)
_record = _plausible | _plausible | _json | st.fixed_dictionaries(
    {}, optional={"messages": _json, "conversations": st.lists(_turn, max_size=4) | _json, "images": _json, "system": _json}
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(records=st.lists(_record, max_size=5))
def test_fuzz_records_never_raise_and_are_accounted(tmp_path, write_image, records):
    if not (tmp_path / "a.png").exists():
        write_image(tmp_path / "a.png", 3, 700)  # an aspect-ratio problem
        write_image(tmp_path / "b.png", 1, 1)
    convs = []
    for i, rec in enumerate(records):
        out = record_to_conversation(rec, sample_id=f"s{i}", source=f"f:{i + 1}", base_dir=str(tmp_path), fmt=AUTO_FORMAT)
        assert isinstance(out, (Conversation, Problem))
        if isinstance(out, Problem):
            assert out.kind in ("bad_record", "unsupported_media") and out.sample_id == f"s{i}" and out.what and out.fix
        else:
            convs.append(out)
    res = validate(convs, pixel_spec(**PIX))
    ids_with_problems = {p.sample_id for p in res.problems}
    assert len(res.valid) + len(ids_with_problems) == len(convs)
    assert all(p.what and p.fix and p.kind for p in res.problems)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.binary(max_size=40) | _record.map(lambda r: json.dumps(r).encode()), max_size=6))
def test_fuzz_jsonl_files_are_accounted(tmp_path, lines):
    p = tmp_path / "fuzz.jsonl"
    p.write_bytes(b"\n".join(line.replace(b"\n", b" ").replace(b"\r", b" ") for line in lines))
    res = read_samples(str(p))
    assert accounted(res)
    data = p.read_bytes()
    data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data  # a leading byte-order mark is not a record
    assert res.records == sum(1 for line in data.split(b"\n") if line.strip())
    ids = [c.id for c in res.conversations]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------------------------------------
# Streaming ids: IdPlan equals the whole-list rule it replaced


def _whole_list_ids(raws):
    """The id rule of the whole-list reader (commit 4a5af28), kept as the reference."""
    from collections import Counter

    own = []
    for raw in raws:
        value = raw.value.get("id") if isinstance(raw.value, dict) else None
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            own.append(None)
            continue
        text = str(value)
        own.append(text if text.strip() and len(text) <= 200 else None)
    counts = Counter(x for x in own if x is not None)
    used, ids = set(), []
    for raw, mine in zip(raws, own):
        sid = mine if mine is not None and counts[mine] == 1 else raw.fallback_id
        if sid in used:
            k = 2
            while f"{sid}~{k}" in used:
                k += 1
            sid = f"{sid}~{k}"
        used.add(sid)
        ids.append(sid)
    return ids


_ID_ATOMS = st.sampled_from(["a", "b", "a:1", "a:2", "b:0", "a~2", "a:1~2", "x", "", " ", 3, True, None])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_ID_ATOMS, st.sampled_from(["a", "b"]), st.booleans()), max_size=25))
def test_id_plan_equals_the_whole_list_rule(items):
    from vlmtune.data.sources.readers import IdPlan, RawRecord

    raws = []
    for n, (own, stem, has_id) in enumerate(items):
        value = {"id": own} if has_id else {}
        raws.append(RawRecord(value, f"{stem}.jsonl:{n}", f"{stem}:{n % 4}", ".", AUTO_FORMAT))
    plan = IdPlan(iter(raws), lambda: iter(raws))
    assert [plan.next_id(r) for r in raws] == _whole_list_ids(raws)


def test_iter_raw_is_lazy(tmp_path):
    from vlmtune.data.sources.readers import RawRecord, iter_raw

    (tmp_path / "a.jsonl").write_text('{"messages": []}\n')
    (tmp_path / "b.jsonl").write_text('{"messages": []}\n')
    it = iter_raw(str(tmp_path))
    first = next(it)
    assert isinstance(first, RawRecord) and first.source == f"{tmp_path / 'a.jsonl'}:1" and first.fallback_id == "a:1"
    (tmp_path / "b.jsonl").unlink()  # b is opened only when its records are asked for
    second = next(it)
    assert isinstance(second, Problem) and second.kind == "data_not_found" and second.source == str(tmp_path / "b.jsonl")
    assert next(it, None) is None


# -- files that are not data (issue 21) ------------------------------------------------------------------------
def test_a_device_or_fifo_named_like_a_data_file_is_refused_unopened(tmp_path):
    zero = tmp_path / "zero.jsonl"
    os.symlink("/dev/zero", zero)  # read as lines it never ends: MemoryError before issue 21
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    for path in (zero, fifo):
        res = read_samples(str(path))
        assert res.conversations == []
        assert [(p.kind, p.what) for p in res.problems] == [
            ("data_not_found", "is not a regular file (a FIFO, device or socket)")]
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    (tmp_path / "ok.jsonl").write_text(json.dumps(rec) + "\n")
    res = read_samples(str(tmp_path))  # the folder read whole: the regular file is read, the others reported
    assert len(res.conversations) == 1
    assert sorted((p.source, p.what) for p in res.problems) == [
        (str(fifo), "is not a regular file (a FIFO, device or socket)"),
        (str(zero), "is not a regular file (a FIFO, device or socket)")]


def test_a_line_longer_than_the_bound_is_one_bad_line(tmp_path, monkeypatch):
    from vlmtune.data.sources import readers

    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 1000)
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(rec).encode() + b"\n" + b"x" * 5000 + b"\n" + json.dumps(rec).encode() + b"\n")
    res = read_samples(str(path))
    assert [c.source for c in res.conversations] == [f"{path}:1", f"{path}:3"]
    assert [(p.source, p.kind, p.what) for p in res.problems] == [
        (f"{path}:2", "invalid_json", "line is longer than 1,000 bytes")]
