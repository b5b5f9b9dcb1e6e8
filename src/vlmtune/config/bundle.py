"""The whole validated configuration (`Config`: one of each section, every key also read flat) and the part of it
the data layer is handed (`DataSections`). The sections and their keys are declared in sections.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Iterable

from .keys import KEY_TABLE, KEYS, copy_value
from .sections import SECTIONS, FitArgs, ModelArgs, PrepareArgs, ReadArgs
from .training_sections import FinetuningArgs, PreferenceArgs, TrainArgs


# --- the Config object --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSections:
    """What the data layer reads of a config (prepare, streaming, the doctor's data check): the model, read,
    fit, prepare and preference sections, and the three training keys it needs. The commands and the recipe hand this down
    (`cfg.for_data()`) instead of the whole Config."""

    model: ModelArgs
    read: ReadArgs
    fit: FitArgs
    prepare: PrepareArgs
    output_dir: str  # the fit report is written here
    wait_s: float  # ddp_timeout: how long a process waits for another one preparing the same folder
    seed: int = 0  # the run's seed: the order of interleaved datasets (mix_strategy)
    preference: PreferenceArgs = field(default_factory=PreferenceArgs)  # its stage: which samples are read



@dataclass(frozen=True)
class Config:
    """A validated configuration: one typed section per concern, and every key also read flat.

    Hand a function the section it uses (`cfg.read`, `cfg.fit`, `cfg.prepare`, `cfg.model`, `cfg.finetuning`,
    `cfg.training`, `cfg.preference`); `cfg.cutoff_len` still reads the key from its section.
    Equal when every key is equal (notes aside). Frozen: change keys with `cfg.replace(cutoff_len=1024)`,
    which validates the result again.
    `notes` lists what was accepted but ignored (LLaMA-Factory keys) and other advice that is not an error.
    Keys whose null default depends on another key (lora_alpha, preprocessing_num_workers, prepared_dir) hold
    the effective value; `derived` names those that were filled in that way.
    """

    model: ModelArgs
    read: ReadArgs
    fit: FitArgs
    prepare: PrepareArgs
    finetuning: FinetuningArgs
    training: TrainArgs
    preference: PreferenceArgs
    notes: tuple[str, ...] = field(default=(), compare=False)
    derived: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def __getattr__(self, name: str) -> Any:
        # Called only when normal lookup fails, i.e. for the flat keys that live in a section.
        if name not in KEY_TABLE:
            raise AttributeError(f"Config has no key {name!r}")
        return getattr(object.__getattribute__(self, KEY_TABLE[name][0]), name)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(KEYS))

    def for_data(self) -> DataSections:
        """The sections the data layer reads."""
        return DataSections(self.model, self.read, self.fit, self.prepare, self.training.output_dir,
                            self.training.ddp_timeout, self.training.seed, self.preference)

    def to_dict(self) -> dict[str, Any]:
        """Every key, flat, in declaration order; plain YAML types, so `yaml.safe_dump` writes it."""
        return {k: copy_value(getattr(self, k)) for k in KEYS}

    def fingerprint_dict(self, keys: Iterable[str]) -> dict[str, Any]:
        """The values of the given keys, e.g. those that decide a prepared dataset's content.

        Strict: a name that is not a declared key raises KeyError, so a typo cannot hash silently as None.
        """
        keys = list(keys)
        unknown = [k for k in keys if k not in KEY_TABLE]
        if unknown:
            raise KeyError(f"not config keys: {unknown}")
        return {k: copy_value(getattr(self, k)) for k in keys}

    def replace(self, **changes: Any) -> Config:
        """A new Config with some keys changed, validated like a loaded one; raises ConfigError."""
        # Derived keys go back to null so that they follow their source: replace(lora_rank=16) doubles lora_alpha.
        given = {k: None if k in self.derived else v for k, v in self.to_dict().items()}
        from .load import load_config  # load.py builds Configs, so it imports this module, not the reverse

        new = load_config(None, base={**given, **changes})
        return dataclasses.replace(new, notes=tuple(dict.fromkeys((*self.notes, *new.notes))))


def assemble(values: dict[str, Any], notes: list[str], derived: frozenset[str]) -> Config:
    sections = {name: cls(**{f.name: values[f.name] for f in fields(cls)}) for name, cls in SECTIONS.items()}
    return Config(**sections, notes=tuple(dict.fromkeys(notes)), derived=derived)

