"""The family table names real transformers classes that agree with each other and with model_type."""

from __future__ import annotations

import importlib.metadata

import pytest
import transformers
from packaging.version import Version

from vlmtune.models.families import FAMILIES, MODEL_TYPES, display_name, family_of


def test_the_supported_families():
    assert MODEL_TYPES == ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    assert [display_name(t) for t in MODEL_TYPES] == ["Qwen2-VL", "Qwen2.5-VL", "Qwen3-VL"]
    assert display_name("llava") == "llava"
    assert [f.min_transformers for f in FAMILIES.values()] == ["4.45", "4.49", "4.57"]


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
    assert f.factor == (32 if model_type == "qwen3_vl" else 28)
    assert f.tiny_max_pixels // f.factor**2 == 256
    assert f.tiny_min_pixels == (2 * f.factor) ** 2


def test_an_unknown_model_type_names_the_supported_ones():
    assert family_of("qwen2_5_vl") is FAMILIES["qwen2_5_vl"]
    with pytest.raises(ValueError, match=r"model_type='llava' is not a supported Qwen-VL family; vlmtune "
                                         r"supports qwen2_vl, qwen2_5_vl, qwen3_vl"):
        family_of("llava")
