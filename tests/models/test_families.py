"""The family table names real transformers classes that agree with each other and with model_type."""

from __future__ import annotations

import importlib.metadata

import pytest
import transformers
from packaging.version import Version

from vlmtune.models.families import FAMILIES, MODEL_TYPES, display_name, family_of


def test_the_supported_families():
    assert MODEL_TYPES == ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
    assert [display_name(t) for t in MODEL_TYPES] == [
        "Qwen2-VL", "Qwen2.5-VL", "Qwen3-VL", "Qwen3-VL-MoE", "Qwen3.5", "Qwen3.5-MoE"]
    assert display_name("llava") == "llava"
    assert [f.min_transformers for f in FAMILIES.values()] == ["4.45", "4.49", "4.57", "4.57", "5.2", "5.2"]


def test_traits_say_how_the_families_differ():
    def having(trait):
        return [t for t, f in FAMILIES.items() if getattr(f, trait)]

    assert having("video_timestamps") == ["qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"]
    assert having("video_absolute_time") == ["qwen2_5_vl"]
    assert having("linear_attention") == ["qwen3_5", "qwen3_5_moe"]
    assert having("moe") == ["qwen3_vl_moe", "qwen3_5_moe"]
    # Qwen3.5 ships its own tokenizer class (its pre-tokenizer keeps combining marks inside words)
    assert [t for t, f in FAMILIES.items() if f.tokenizer_class != "Qwen2Tokenizer"] == ["qwen3_5", "qwen3_5_moe"]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_the_processor_transformers_maps_to_the_family(model_type):
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    f = FAMILIES[model_type]
    assert PROCESSOR_MAPPING_NAMES[model_type] == f.processor_class
    assert TOKENIZER_MAPPING_NAMES[model_type] == f.tokenizer_class


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_class_names_are_transformers_classes_of_that_family(model_type):
    f = FAMILIES[model_type]
    model_cls = getattr(transformers, f.model_class)
    config_cls = getattr(transformers, f.config_class)
    assert model_cls.config_class is config_cls
    assert config_cls.model_type == model_type
    assert getattr(transformers, f.processor_class).__name__ == f.processor_class
    assert getattr(transformers, f.video_processor_class).__name__ == f.video_processor_class
    assert Version(importlib.metadata.version("transformers")) >= Version(f.min_transformers)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_tiny_sizes_allow_at_most_256_image_tokens(model_type):
    f = FAMILIES[model_type]
    assert f.factor == (28 if model_type in ("qwen2_vl", "qwen2_5_vl") else 32)
    assert f.tiny_max_pixels // f.factor**2 == 256
    assert f.tiny_min_pixels == (2 * f.factor) ** 2


def test_an_unknown_model_type_names_the_supported_ones():
    from vlmtune.errors import VlmtuneError

    assert family_of("qwen2_5_vl") is FAMILIES["qwen2_5_vl"]
    with pytest.raises(VlmtuneError, match=r"^model_type='llava' is not a supported Qwen-VL family; vlmtune "
                                           r"supports Qwen2-VL \(qwen2_vl\), Qwen2.5-VL \(qwen2_5_vl\), Qwen3-VL "
                                           r"\(qwen3_vl\), Qwen3-VL-MoE \(qwen3_vl_moe\), Qwen3.5 \(qwen3_5\), "
                                           r"Qwen3.5-MoE \(qwen3_5_moe\)$"):
        family_of("llava")
