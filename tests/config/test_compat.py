"""Every LLaMA-Factory key is classified (config/compat.py over llamafactory_keys.tsv), and each kind behaves."""

from __future__ import annotations

import pytest

from vlmtune.config import CLASSIFIED, KEYS, LLAMA_FACTORY_KEYS, load_config
from vlmtune.config.compat import allowed
from vlmtune.errors import ConfigError

BASE = {"model_name_or_path": "m", "dataset": "d", "output_dir": "o"}


def test_every_llama_factory_key_is_classified():
    unclassified = [k for k in LLAMA_FACTORY_KEYS if k not in KEYS and k not in CLASSIFIED]
    assert unclassified == []
    assert len(LLAMA_FACTORY_KEYS) == 357  # the list itself is data: a key dropped from it fails here
    assert {c.kind for c in CLASSIFIED.values()} == {"noop", "default", "alias", "command"}


def test_no_declared_key_is_also_classified():
    # load.py reads a declared key before it looks in CLASSIFIED, so a classification of one would never be used
    # (keys became declared this way: fsdp, stage, do_train, pref_beta, ...; their entries had to go)
    assert sorted(set(CLASSIFIED) & set(KEYS)) == []


@pytest.mark.parametrize("key", sorted(k for k, c in CLASSIFIED.items() if c.kind == "default" and k in LLAMA_FACTORY_KEYS))
def test_a_key_whose_behaviour_is_missing_is_accepted_at_its_default(key):
    value = allowed(key)[0]
    cfg = load_config(None, base={**BASE, key: value})
    assert f"ignored {key}={value!r}: {CLASSIFIED[key].why}" in cfg.notes


@pytest.mark.parametrize("key,value", [("use_unsloth", True), ("enable_liger_kernel", True), ("use_galore", True),
                                       ("pref_bco_weight", 0.2), ("generation_num_beams", 4), ("flash_attn", "fa3"),
                                       ("compute_accuracy", True)])
def test_and_refused_with_its_reason_otherwise(key, value):
    with pytest.raises(ConfigError) as e:
        load_config(None, base={**BASE, key: value})
    (problem,) = e.value.problems
    assert problem.startswith(f"{key}={value!r} is not supported; {CLASSIFIED[key].why}; remove {key} or set it to ")


# The no-op defaults of LLaMA-Factory's own Qwen-VL example configs load, each with a note.
EXAMPLE = {"flash_attn": "auto", "disable_gradient_checkpointing": False, "enable_liger_kernel": False,
           "use_unsloth": False, "neat_packing": False, "tokenized_path": None, "quantization_method": "bnb",
           "template": "qwen3_vl_nothink", "do_train": True, "overwrite_output_dir": True, "save_only_model": False,
           "logging_dir": "runs", "run_name": "x", "upcast_layernorm": False, "print_param_status": True,
           "preprocessing_batch_size": 1000, "buffer_size": 16384, "tool_format": None, "save_strategy": "steps",
           "report_to": "none", "ddp_timeout": 180000000, "stage": "sft"}


def test_the_example_keys_load_with_notes():
    cfg = load_config(None, base={**BASE, **EXAMPLE})
    noted = {n.split("=", 1)[0].removeprefix("ignored ") for n in cfg.notes}
    assert noted >= set(EXAMPLE) - set(KEYS) - {"disable_gradient_checkpointing"}


def test_aliases_carry_the_value_over():
    cfg = load_config(None, base={**BASE, "disable_gradient_checkpointing": True, "neat_packing": True,
                                  "tokenized_path": "tok"})
    assert (cfg.gradient_checkpointing, cfg.packing, cfg.prepared_dir) == (False, True, "tok")
    with pytest.raises(ConfigError) as e:
        load_config(None, base={**BASE, "disable_gradient_checkpointing": True, "gradient_checkpointing": True})
    assert e.value.problems[0].startswith("disable_gradient_checkpointing=true (in the base config) contradicts "
                                          "gradient_checkpointing=true")


@pytest.mark.parametrize("typo,hint", [("use_unslot", "did you mean 'use_unsloth'?"),
                                       ("cutof_len", "did you mean 'cutoff_len'?"),
                                       ("max_new_token", "did you mean 'max_new_tokens'?"),
                                       ("logging_dirr", "did you mean 'logging_dir'?"),
                                       ("my_own_setting", "see docs/config.md")])
def test_did_you_mean_only_for_a_close_spelling(typo, hint):
    with pytest.raises(ConfigError) as e:
        load_config(None, base={**BASE, typo: 1})
    assert e.value.problems == [f"unknown key {typo!r} (in the base config); {hint}"]


def test_the_migration_doc_is_generated_from_the_table():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("gen_config_docs", root / "scripts" / "gen_config_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    doc = (root / "docs" / "migrating-from-llamafactory.md").read_text(encoding="utf-8")
    assert doc == gen.render_migrating(doc), "run scripts/gen_config_docs.py"
    for key in LLAMA_FACTORY_KEYS:
        assert f"`{key}`" in doc, key
    # the four places it once contradicted the code
    assert "| `template` | `null` | accepted at `qwen2_vl`, `qwen3_vl`, `qwen3_vl_nothink`, `qwen3_5`," in doc
    assert "gradient_checkpointing`: on by default" in doc and load_config(None, base=BASE).gradient_checkpointing
    assert "streaming" in KEYS and "`streaming`, " in doc  # a vlmtune key, listed as one (it was called unknown)
    assert "at most that many samples of each dataset" in doc
