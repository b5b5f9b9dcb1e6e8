"""config/folders.py: vlmtune writes into new, empty or its own marked folders, and refuses everything else."""

from __future__ import annotations

import json
import os

import pytest

from vlmtune import __version__
from vlmtune.config import folders
from vlmtune.config.folders import DEMO, EXPORT, MARKER_FILE, OUTPUT, TINY

FIX = ("; vlmtune writes into or replaces only folders it created and never deletes or overwrites yours: set {key} to "
       "a new folder, or empty that one yourself")


def test_mark_names_vlmtune_and_the_kind_and_leaves_no_temp_file(tmp_path):
    folders.mark(tmp_path, EXPORT)
    assert json.loads((tmp_path / MARKER_FILE).read_text()) == {"owner": "vlmtune export", "version": __version__}
    assert os.listdir(tmp_path) == [MARKER_FILE]
    assert folders.owner_of(tmp_path) == EXPORT and folders.is_marked(tmp_path, EXPORT)
    assert not folders.is_marked(tmp_path, OUTPUT)


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"owner": 3}', '{"version": "0.1.0"}'])
def test_a_marker_that_does_not_name_an_owner_is_no_marker(tmp_path, content):
    (tmp_path / MARKER_FILE).write_text(content)
    assert folders.owner_of(tmp_path) is None


def test_a_link_to_a_marked_folder_is_not_marked(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    folders.mark(real, TINY)
    (tmp_path / "link").symlink_to(real)
    assert folders.owner_of(tmp_path / "link") is None


@pytest.mark.parametrize("owner", [OUTPUT, EXPORT, TINY, DEMO])
def test_new_empty_or_own_folders_may_be_written(tmp_path, owner):
    assert folders.refusal(tmp_path / "new" / "deeper", owner, "output_dir") is None
    assert folders.refusal(tmp_path, owner, "output_dir") is None  # empty
    (tmp_path / f"{MARKER_FILE}.tmp-123").write_text("{")  # another rank's marker, being written
    assert folders.refusal(tmp_path, owner, "output_dir") is None
    folders.claim(tmp_path / "mine", owner)
    (tmp_path / "mine" / "weights").write_text("x")
    assert folders.refusal(tmp_path / "mine", owner, "output_dir") is None


def test_everything_else_is_refused_with_the_path_the_key_and_the_fix(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    other = tmp_path / "other"
    folders.claim(other, EXPORT)
    (other / "model.safetensors").write_text("x")
    assert folders.refusal(user, OUTPUT, "output_dir") == (
        f"output_dir={str(user)!r} is a folder with content that vlmtune did not create (it has no .vlmtune-owned)"
        + FIX.format(key="output_dir"))
    assert folders.refusal(tmp_path / "file", EXPORT, "--out") == (
        f"--out {tmp_path / 'file'} is a file" + FIX.format(key="--out"))
    assert folders.refusal(tmp_path / "link", TINY, "OUT") == f"OUT {tmp_path / 'link'} is a link" + FIX.format(key="OUT")
    assert folders.refusal(other, OUTPUT, "output_dir") == (
        f"output_dir={str(other)!r} is a folder vlmtune made for something else (vlmtune export, says its "
        ".vlmtune-owned)" + FIX.format(key="output_dir"))
    assert (user / "notes.txt").read_text() == "mine" and (other / "model.safetensors").exists()


@pytest.mark.parametrize("evidence", ["vlmtune_config.yaml", "checkpoint-4/vlmtune_complete",
                                      "prepared/.vlmtune-owned", "prepared/vlmtune_fingerprint.json"])
def test_an_output_dir_an_earlier_vlmtune_wrote_before_markers_is_recognised(tmp_path, evidence):
    (tmp_path / evidence).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / evidence).write_text("{}")
    assert folders.is_legacy_output(tmp_path)
    assert folders.refusal(tmp_path, OUTPUT, "output_dir") is None
    assert folders.refusal(tmp_path, EXPORT, "--out") is not None  # only as a training output


def test_an_unmarked_folder_with_other_names_is_not_legacy(tmp_path):
    (tmp_path / "config.yaml").write_text("x")
    (tmp_path / "checkpoint-4").mkdir()  # a checkpoint vlmtune never marked complete
    assert not folders.is_legacy_output(tmp_path)


def test_remove_marked_removes_only_its_own_kind_or_an_empty_folder(tmp_path):
    mine, other, user, empty = (tmp_path / n for n in ("mine", "other", "user", "empty"))
    folders.claim(mine, TINY)
    (mine / "config.json").write_text("{}")
    folders.claim(other, EXPORT)
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    empty.mkdir()
    assert [folders.remove_marked(p, TINY) for p in (mine, other, user, empty, tmp_path / "absent")] == \
        [True, False, False, True, True]
    assert sorted(os.listdir(tmp_path)) == ["other", "user"]


def test_named_says_a_flag_or_a_key():
    assert folders.named("--out", "x") == "--out x"
    assert folders.named("OUT", "x") == "OUT x"
    assert folders.named("output_dir", "x") == "output_dir='x'"


def test_replacing_writes_the_file_whole_and_never_touches_a_file_beside_it(tmp_path):
    path = tmp_path / "out.jsonl"
    beside = tmp_path / f"out.jsonl.tmp-{os.getpid()}"  # a user's file, named as a fixed temp name would be
    beside.write_text("mine\n")
    with folders.replacing(path, "w", encoding="utf-8") as f:
        f.write("new\n")
    assert path.read_text() == "new\n" and beside.read_text() == "mine\n"
    with pytest.raises(RuntimeError), folders.replacing(path, "w", encoding="utf-8") as f:
        f.write("half")
        raise RuntimeError("stopped")
    assert path.read_text() == "new\n"  # an error leaves what was there and no temp file
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl", beside.name]


def test_check_raises_the_refusal_and_check_and_claim_claims_only_what_it_may(tmp_path):
    from vlmtune.errors import VlmtuneError

    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(VlmtuneError) as err:
        folders.check_and_claim(user, DEMO, "--out")
    assert str(err.value) == folders.refusal(user, DEMO, "--out") and str(user) in str(err.value)
    assert os.listdir(user) == ["notes.txt"] and (user / "notes.txt").read_text() == "mine"
    folders.check_and_claim(tmp_path / "new" / "demo", DEMO, "--out")
    assert folders.owner_of(tmp_path / "new" / "demo") == DEMO
