"""data/drivers/cache.py: vlmtune replaces or deletes only the folders it made; overlapping folders are refused early."""

from __future__ import annotations

import json
import os

import pytest

from vlmtune.config import folders, load_config
from vlmtune.data.drivers import cache
from vlmtune.data.drivers.prepare import prepare
from vlmtune.errors import ConfigError


@pytest.fixture
def data(tmp_path, make_image):
    """tmp/ds/ holding data.jsonl, an image and a README (a user's dataset folder)."""
    ds = tmp_path / "ds"
    make_image(ds / "im.png", 64, 64)
    rec = {"messages": [{"role": "user", "content": "<image>colour?"}, {"role": "assistant", "content": "red"}],
           "images": ["im.png"]}
    (ds / "data.jsonl").write_text(json.dumps(rec) + "\n")
    (ds / "README.md").write_text("my dataset\n")
    return ds


def cfg(ckpt, dataset, out, *more):
    return load_config(None, [f"model_name_or_path={ckpt}", f"dataset={dataset}", f"output_dir={out}",
                              "cutoff_len=256", *more])


def survives(ds) -> bool:
    return sorted(p.name for p in ds.iterdir()) == ["README.md", "data.jsonl", "im.png"]


def test_prepared_dir_at_the_dataset_folder_is_refused_and_the_data_survives(tiny_ckpt, data, tmp_path):
    c = cfg(tiny_ckpt(), data / "data.jsonl", tmp_path / "out", f"prepared_dir={data}")
    with pytest.raises(ConfigError) as err:
        prepare(c.for_data(), progress=False)
    assert any(p.startswith(f"prepared_dir={str(data)!r} is or holds the data") and "set prepared_dir" in p
               for p in err.value.problems)
    assert survives(data)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_prepared_dir_equal_to_or_holding_output_dir_is_refused(tmp_path, data):
    out = tmp_path / "out"
    for prep in (out, tmp_path):
        with pytest.raises(ConfigError) as err:
            cache.check_folders(cfg("m", data / "data.jsonl", out, f"prepared_dir={prep}").for_data())
        assert "output_dir" in err.value.problems[0] and "set prepared_dir" in err.value.problems[0]


def test_output_dir_at_or_inside_a_folder_read_whole_is_refused(tmp_path, data):
    with pytest.raises(ConfigError) as err:
        cache.check_folders(cfg("m", data, data / "run").for_data())
    assert any(p.startswith(f"output_dir={str(data / 'run')!r} is inside {str(data)!r}, which is read whole")
               for p in err.value.problems)
    with pytest.raises(ConfigError) as err:
        cache.check_folders(cfg("m", data / "data.jsonl", data).for_data())
    assert any(p.startswith(f"output_dir={str(data)!r} is the data folder") for p in err.value.problems)
    cache.check_folders(cfg("m", data / "data.jsonl", tmp_path / "out").for_data())  # apart: fine


def test_a_users_own_prepared_folder_in_output_dir_survives_train(tiny_ckpt, data, tmp_path, monkeypatch):
    from vlmtune.train import recipe

    mine = tmp_path / "out" / "prepared"
    mine.mkdir(parents=True)
    folders.mark(tmp_path / "out", folders.OUTPUT)  # vlmtune's output_dir, holding a prepared/ of the user's
    (mine / "notes.txt").write_text("mine\n")
    monkeypatch.setattr(recipe, "load_spec", lambda *a: pytest.fail("the model loaded before the refusal"))
    with pytest.raises(ConfigError) as err:
        recipe.setup(cfg(tiny_ckpt(), data / "data.jsonl", tmp_path / "out"), progress=False)
    assert err.value.problems[0].startswith(f"prepared_dir={str(mine)!r} is a folder that vlmtune did not create")
    assert "set prepared_dir to a new folder" in err.value.problems[0]
    assert (mine / "notes.txt").read_text() == "mine\n"


def test_prepare_replaces_its_own_marked_cache_only(tiny_ckpt, data, tmp_path):
    c = cfg(tiny_ckpt(), data / "data.jsonl", tmp_path / "out")
    first = prepare(c.for_data(), progress=False)
    assert cache.is_ours(first.path)
    assert json.loads((tmp_path / "out" / "prepared" / cache.MARKER_FILE).read_text())["owner"] == cache.OWNER
    again = prepare(cfg(tiny_ckpt(), data / "data.jsonl", tmp_path / "out", "overwrite_cache=true").for_data(),
                    progress=False)
    assert again.cached is False and cache.is_ours(again.path)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [cache.MARKER_FILE, "fit_report.jsonl", "prepared",
                                                                    "prepared.lock"]
    assert folders.owner_of(tmp_path / "out") == folders.OUTPUT
    assert survives(data)


def test_swap_in_refuses_a_folder_that_appeared_in_the_way(tmp_path):
    tmp, out = tmp_path / "prepared.tmp-x-1", tmp_path / "prepared"
    cache.make_temp(str(tmp))
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConfigError):
        cache.swap_in(str(tmp), str(out))
    assert (out / "keep.txt").read_text() == "x" and tmp.is_dir()
    (out / "keep.txt").unlink()  # an empty folder in the way is replaced (nothing in it to lose)
    cache.swap_in(str(tmp), str(out))
    assert cache.is_ours(str(out)) and not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_a_link_or_file_at_prepared_dir_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    os.symlink(tmp_path / "f", tmp_path / "link")
    for name, what in (("f", "a file"), ("link", "a link")):
        with pytest.raises(ConfigError) as err:
            cache.check_replaceable(str(tmp_path / name))
        assert f"is {what};" in err.value.problems[0]
    assert (tmp_path / "f").read_text() == "x"


def test_a_folder_vlmtune_made_as_another_kind_is_never_replaced_as_a_cache(tmp_path):
    export = tmp_path / "merged"
    folders.claim(export, folders.EXPORT)
    (export / "model.safetensors").write_text("x")
    assert not cache.is_ours(str(export))
    with pytest.raises(ConfigError) as err:
        cache.check_replaceable(str(export))
    assert err.value.problems == [
        f"prepared_dir={str(export)!r} is a folder vlmtune made for something else (vlmtune export, says its "
        ".vlmtune-owned); vlmtune replaces only its own prepared folders and never deletes yours: set prepared_dir "
        "to a new folder (or move that one away)"]


def test_stale_cleanup_removes_only_marked_leftovers_of_dead_processes(tmp_path):
    node = os.uname().nodename
    out, report = tmp_path / "prepared", tmp_path / "fit_report.jsonl"
    dead = 2**22 + 12345  # above pid_max's default: no such process
    ours, theirs = tmp_path / f"prepared.tmp-{node}-{dead}", tmp_path / f"prepared.tmp-{node}-{dead + 1}"
    cache.make_temp(str(ours))
    theirs.mkdir()
    (theirs / "x").write_text("x")
    alive = tmp_path / f"prepared.tmp-{node}-{os.getpid()}"
    cache.make_temp(str(alive))
    cache.remove_stale(str(out), str(report))
    assert not ours.exists() and (theirs / "x").exists() and alive.exists()


def test_stale_cleanup_never_removes_a_file_or_unmarked_folder_named_like_a_temp_report(tmp_path):
    # The report's temp files live in a marked folder (Target.tmp_files): a name alone never gets a path removed.
    node = os.uname().nodename
    out, report = tmp_path / "prepared", tmp_path / "fit_report.jsonl"
    dead = 2**22 + 12345  # above pid_max's default: no such process
    mine_file, mine_dir = tmp_path / f"fit_report.jsonl.tmp-{node}-{dead}", tmp_path / f"prepared.tmp-{node}-{dead}"
    mine_file.write_text("mine\n")
    mine_dir.mkdir()
    (mine_dir / "notes.txt").write_text("mine\n")
    ours = cache.Target(str(out), str(report), "fp")
    ours = tmp_path / ours.tmp_files.rsplit("/", 1)[1].replace(str(os.getpid()), str(dead + 1))
    cache.make_temp(str(ours))
    (ours / "fit_report.jsonl").write_text("{}\n")
    cache.remove_stale(str(out), str(report))
    assert not ours.exists()
    assert mine_file.read_text() == "mine\n" and (mine_dir / "notes.txt").read_text() == "mine\n"


def test_a_prepares_temp_report_files_are_in_a_marked_folder_beside_the_report(tmp_path):
    t = cache.Target(str(tmp_path / "prepared"), str(tmp_path / "fit_report.jsonl"), "fp")
    assert t.tmp_files == f"{tmp_path}/fit_report.jsonl.tmp-{os.uname().nodename}-{os.getpid()}"
    assert (t.tmp_report, t.tmp_body) == (f"{t.tmp_files}/fit_report.jsonl", f"{t.tmp_files}/fit_report.jsonl.body")
    cache.make_temp(t.tmp_dir, t.tmp_files)
    assert cache.is_ours(t.tmp_dir) and cache.is_ours(t.tmp_files)
    cache.discard(t.tmp_dir, t.tmp_files)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_full_disk_during_prepare_is_a_clear_error_and_leaves_the_old_cache(tiny_ckpt, data, tmp_path, monkeypatch):
    import errno

    from datasets.arrow_writer import ArrowWriter

    from vlmtune.errors import VlmtuneError

    old = prepare(cfg(tiny_ckpt(), data / "data.jsonl", tmp_path / "out").for_data(), progress=False)

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ArrowWriter, "write_table", full)
    with pytest.raises(VlmtuneError) as err:
        prepare(cfg(tiny_ckpt(), data / "data.jsonl", tmp_path / "out", "overwrite_cache=true").for_data(), progress=False)
    assert str(err.value).startswith("no space left on the device while writing the prepared dataset into ")
    assert "set prepared_dir and output_dir to a disk with room" in str(err.value)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [cache.MARKER_FILE, "fit_report.jsonl", "prepared",
                                                                    "prepared.lock"]
    assert folders.owner_of(tmp_path / "out") == folders.OUTPUT
    assert cache.is_ours(old.path) and (tmp_path / "out" / "prepared" / "data.arrow").exists()


def test_streaming_writes_no_prepared_folder_so_a_users_one_is_left_alone(tmp_path, data):
    mine = tmp_path / "out" / "prepared"
    mine.mkdir(parents=True)
    folders.mark(tmp_path / "out", folders.OUTPUT)
    (mine / "notes.txt").write_text("mine\n")
    cache.check_folders(cfg("m", data / "data.jsonl", tmp_path / "out", "streaming=true", "max_steps=5").for_data())
    with pytest.raises(ConfigError):  # output_dir's own rules still hold
        cache.check_folders(cfg("m", data, data / "run", "streaming=true", "max_steps=5").for_data())


# -- output_dir: new, empty or vlmtune's (config/folders.py) ------------------------------------------------------
def _user_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    return out


def test_a_users_folder_as_output_dir_is_refused_before_prepare_loads_the_model(tmp_path, data, monkeypatch):
    from vlmtune.data.drivers import prepare as prep

    out = _user_output(tmp_path)
    monkeypatch.setattr(prep, "load_spec", lambda *a: pytest.fail("the model loaded before the refusal"))
    for c in (cfg("m", data / "data.jsonl", out), cfg("m", data / "data.jsonl", out, "streaming=true", "max_steps=5")):
        with pytest.raises(ConfigError) as err:
            prepare(c.for_data(), progress=False)
        assert err.value.problems == [
            f"output_dir={str(out)!r} is a folder with content that vlmtune did not create (it has no .vlmtune-owned); "
            "vlmtune writes into or replaces only folders it created and never deletes or overwrites yours: set "
            "output_dir to a new folder, or empty that one yourself"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_every_folder_problem_is_reported_at_once(tmp_path, data):
    out = _user_output(tmp_path)
    (out / "prepared").write_text("a file where the cache would go")
    with pytest.raises(ConfigError) as err:
        cache.check_folders(cfg("m", data / "data.jsonl", out).for_data())
    assert [p.split(" is ")[0] for p in err.value.problems] == [f"output_dir={str(out)!r}",
                                                                f"prepared_dir={str(out / 'prepared')!r}"]


def test_output_dir_made_by_another_vlmtune_command_is_refused(tmp_path, data):
    out = tmp_path / "out"
    folders.claim(out, folders.EXPORT)
    (out / "model.safetensors").write_text("x")
    with pytest.raises(ConfigError) as err:
        cache.check_folders(cfg("m", data / "data.jsonl", out).for_data())
    assert err.value.problems[0].startswith(f"output_dir={str(out)!r} is a folder vlmtune made for something else "
                                            "(vlmtune export, says its .vlmtune-owned)")


def test_prepare_marks_a_new_or_empty_output_dir_and_an_earlier_vlmtunes_one(tiny_ckpt, data, tmp_path):
    empty, legacy = tmp_path / "empty", tmp_path / "legacy"
    empty.mkdir()
    legacy.mkdir()
    (legacy / "vlmtune_config.yaml").write_text("output_dir: legacy\n")  # written by vlmtune before markers
    (legacy / "notes.txt").write_text("mine\n")
    for out in (tmp_path / "new" / "run", empty, legacy):
        prepare(cfg(tiny_ckpt(), data / "data.jsonl", out).for_data(), progress=False)
        assert folders.owner_of(out) == folders.OUTPUT
    assert (legacy / "notes.txt").read_text() == "mine\n" and (legacy / "vlmtune_config.yaml").exists()


def test_a_cache_written_under_another_row_schema_is_not_taken_as_complete(tiny_ckpt, data, tmp_path, monkeypatch):
    from vlmtune.data import schema

    c = cfg(tiny_ckpt(), data / "data.jsonl", tmp_path / "out")
    assert [prepare(c.for_data(), progress=False).cached for _ in range(2)] == [False, True]
    declared = schema.signature

    def retyped(decl=schema.Row):  # the same column names, one type changed
        return [[name, "int64" if name == "piece" else arrow] for name, arrow in declared(decl)]

    monkeypatch.setattr(schema, "signature", retyped)
    again = prepare(c.for_data(), progress=False)
    assert again.cached is False and again.rows == 1
    monkeypatch.setattr(schema, "signature", lambda decl=schema.Row: declared(decl)[:-1])  # a column fewer
    assert prepare(c.for_data(), progress=False).cached is False
