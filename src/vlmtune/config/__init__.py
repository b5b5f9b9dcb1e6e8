"""The run configuration: one flat YAML, LLaMA-Factory key names, every problem reported at once.

    cfg = load_config("train.yaml", ["cutoff_len=1024", "overflow=[split,drop]"])
    cfg.cutoff_len, cfg.fit.overflow, cfg.read.dataset, cfg.notes

- values.py: the field helper every key is declared with, the value converters and range checks;
- sections.py: the typed sections (ModelArgs, ReadArgs, FitArgs, PrepareArgs, FinetuningArgs, TrainArgs) and
  `Config`, which holds one of each and also reads every key flat;
- load.py: reading the YAML, `key=value` overrides, validation across keys, LLaMA-Factory compatibility, advice.
"""

from .load import LLAMA_FACTORY_IGNORED, LLAMA_FACTORY_REPLACED, load_config, load_sections
from .sections import (
    KEYS,
    PREPARED_KEYS,
    SECTIONS,
    Config,
    DataSections,
    FinetuningArgs,
    FitArgs,
    ModelArgs,
    PrepareArgs,
    ReadArgs,
    TrainArgs,
    default_of,
    prepared_values,
)
from .values import DEFAULT_OVERFLOW, LR_SCHEDULERS, OPTIMIZERS, OVERFLOW_POLICIES, POLICIES, TERMINAL_POLICIES

__all__ = [
    "DEFAULT_OVERFLOW", "KEYS", "LLAMA_FACTORY_IGNORED", "LLAMA_FACTORY_REPLACED", "LR_SCHEDULERS", "OPTIMIZERS",
    "OVERFLOW_POLICIES", "POLICIES", "PREPARED_KEYS", "SECTIONS", "TERMINAL_POLICIES", "Config", "DataSections",
    "FinetuningArgs", "FitArgs", "ModelArgs", "PrepareArgs", "ReadArgs", "TrainArgs", "default_of", "load_config", "load_sections",
    "prepared_values",
]
