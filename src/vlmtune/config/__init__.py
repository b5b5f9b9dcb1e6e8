"""The run configuration: one flat YAML, LLaMA-Factory key names, every problem reported at once.

    cfg = load_config("train.yaml", ["cutoff_len=1024", "overflow=[split,drop]"])
    cfg.cutoff_len, cfg.fit.overflow, cfg.read.dataset, cfg.notes

- values.py: the field helper every key is declared with, the value converters and range checks;
- sections.py: the typed sections of the data side (ModelArgs, ReadArgs, FitArgs, PrepareArgs) and SECTIONS,
  the table of all; training_sections.py: the training side (FinetuningArgs, TrainArgs, PreferenceArgs); a key
  declared `prepared=True` decides the prepared dataset;
- keys.py: the flat key table over the sections, each key's default, PREPARED_KEYS and `prepared_values`;
- bundle.py: `Config`, which holds one of each section and also reads every key flat, and `DataSections`
  (`cfg.for_data()`), the part the data layer is handed;
- compat.py: every LLaMA-Factory key vlmtune does not declare, classified (llamafactory_keys.tsv lists them);
- bounded_yaml.py: YAML read within bounds (repeated keys reported, merge keys, alias expansion and size capped);
- cross_checks.py: the rules that involve several keys;
- load.py: the YAML file and `key=value` overrides, each key converted and checked, LLaMA-Factory compatibility,
  derived defaults, advice.
"""

from .bundle import Config, DataSections
from .compat import CLASSIFIED, LLAMA_FACTORY_KEYS
from .bounded_yaml import read_yaml
from .load import LLAMA_FACTORY_REPLACED, load_config, load_sections
from .keys import KEYS, PREPARED_KEYS, default_of, prepared_values
from .sections import SECTIONS, FitArgs, ModelArgs, PrepareArgs, ReadArgs
from .training_sections import FinetuningArgs, PreferenceArgs, TrainArgs
from .values import DEFAULT_OVERFLOW, LR_SCHEDULERS, OPTIMIZERS, OVERFLOW_POLICIES, POLICIES, TERMINAL_POLICIES

__all__ = [
    "CLASSIFIED", "DEFAULT_OVERFLOW", "KEYS", "LLAMA_FACTORY_KEYS", "LLAMA_FACTORY_REPLACED", "LR_SCHEDULERS", "OPTIMIZERS",
    "OVERFLOW_POLICIES", "POLICIES", "PREPARED_KEYS", "SECTIONS", "TERMINAL_POLICIES", "Config", "DataSections",
    "FinetuningArgs", "FitArgs", "ModelArgs", "PreferenceArgs", "PrepareArgs", "ReadArgs", "TrainArgs", "default_of",
    "load_config", "load_sections", "prepared_values", "read_yaml",
]
