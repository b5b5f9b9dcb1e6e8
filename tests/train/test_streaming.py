"""`streaming: true`: training straight from the data, fitted on the fly, with a fit report of every sample read."""

from __future__ import annotations

import json

import pytest

from vlmtune.config import load_config
from vlmtune.errors import ConfigError
from vlmtune.train import recipe


def test_streaming_trains_and_its_report_accounts_for_every_sample_read(make_config, write_dataset, tmp_path):
    data = write_dataset(["one", "text", "two", "one_big", "one", "two"])
    with open(data, "a", encoding="utf-8") as f:
        f.write("{not json\n")  # one unreadable record: a report line too
    cfg = make_config("qwen2_vl", data, tmp_path / "s", streaming=True, max_steps=8, on_bad_sample="skip",
                      worst_case_first=True)
    run = recipe.setup(cfg, progress=False)
    try:
        result = recipe.train(run)
    finally:
        recipe.cleanup(run)
    assert result.global_step == 8  # 8 rows: more than one pass over the 6 samples
    assert not (tmp_path / "s" / "prepared").exists()
    report = [json.loads(line) for line in open(tmp_path / "s" / "fit_report.jsonl", encoding="utf-8")]
    # written once (not per pass): every record read, the unreadable one included, as prepare writes it
    assert sorted(r["index"] for r in report) == [1, 2, 3, 4, 5, 6, 7]  # each line's record, as data
    assert {r["file"] for r in report} == {str(data)} and {r["piece"] for r in report} == {0}
    prepared = recipe.prepare(make_config("qwen2_vl", data, tmp_path / "p", on_bad_sample="skip",
                                          confirm_skipped_share=True).for_data(), progress=False)
    assert report == [json.loads(line) for line in open(prepared.report_path, encoding="utf-8")]
    assert sum(r["fate"] == "invalid" for r in report) == 1


@pytest.mark.parametrize("keys, needle", [({"max_steps": -1}, "needs max_steps"),
                                         ({"packing": True}, "cannot pack"),
                                         ({"val_size": 0.1}, "takes no val_size")])
def test_streaming_config_rules(keys, needle, tiny_ckpt):
    with pytest.raises(ConfigError) as err:
        load_config(None, base={"model_name_or_path": str(tiny_ckpt("qwen2_vl")), "dataset": "d.jsonl",
                                "output_dir": "o", "streaming": True, "max_steps": 10, **keys})
    assert needle in str(err.value)
