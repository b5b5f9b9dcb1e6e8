"""Below the commands, models/ and data/ take the config sections they use (ModelArgs, ReadArgs, FitArgs, ...),
annotated, never the whole Config: each function's signature shows what it reads."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import pytest

import vlmtune.data
import vlmtune.models

WHOLE_CONFIG = re.compile(r"\bConfig\b")


def _modules(package) -> list:
    """Every module of the package, its sub-packages' included (data/ is folders: sources, media, stages, ...)."""
    return [importlib.import_module(m.name) for m in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")]


def _functions(module) -> list:
    """Every function and method defined in `module` (not imported into it)."""
    out = []
    for _, obj in vars(module).items():
        if inspect.isfunction(obj) and obj.__module__ == module.__name__:
            out.append(obj)
        elif inspect.isclass(obj) and obj.__module__ == module.__name__:
            out += [f for f in vars(obj).values() if inspect.isfunction(f)]
            out += [f.__func__ for f in vars(obj).values() if isinstance(f, (classmethod, staticmethod))]
    return out


def whole_config_parameters(module) -> list[str]:
    """`module.function(parameter)` for each parameter that takes the whole Config: annotated Config, or an
    un-annotated `cfg`."""
    bad = []
    for fn in _functions(module):
        for p in inspect.signature(fn).parameters.values():
            note = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
            if WHOLE_CONFIG.search(note or "") or p.name == "cfg":
                bad.append(f"{module.__name__}.{fn.__qualname__}({p.name})")
    return bad


MODULES = _modules(vlmtune.models) + _modules(vlmtune.data)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_no_function_below_the_commands_takes_the_whole_config(module):
    assert whole_config_parameters(module) == []


def test_the_check_finds_a_function_that_takes_the_whole_config():
    import types

    planted = types.ModuleType("vlmtune.data.planted")
    exec("def typed(cfg: 'Config'): ...\n"
         "def loose(cfg, n): ...\n"
         "def fine(fit: 'FitArgs', config): ...\n"
         "class K:\n    def method(self, c: 'Config | None' = None): ...\n", planted.__dict__)
    for f in (planted.typed, planted.loose, planted.fine, planted.K):
        f.__module__ = planted.__name__
    assert whole_config_parameters(planted) == ["vlmtune.data.planted.typed(cfg)", "vlmtune.data.planted.loose(cfg)",
                                                "vlmtune.data.planted.K.method(c)"]


def test_the_sections_that_models_and_data_use_are_annotated():
    from vlmtune.data.drivers import pipeline, prepare, tally
    from vlmtune.data.media import paths, remote
    from vlmtune.data.sources import mix, readers
    from vlmtune.data.stages import pack, validate
    from vlmtune.models import load, quant

    assert str(inspect.signature(load.load_spec).parameters["fit"].annotation) == "FitArgs | None"
    assert inspect.signature(load.apply_finetuning).parameters["ft"].annotation == "FinetuningArgs"
    assert inspect.signature(quant.quantization_config).parameters["ft"].annotation == "FinetuningArgs"
    assert inspect.signature(pipeline.run_pipeline).parameters["read"].annotation == "ReadArgs"
    assert inspect.signature(prepare.prepare).parameters["data"].annotation == "DataSections"
    assert inspect.signature(tally.verdict).parameters["read"].annotation == "ReadArgs"
    assert inspect.signature(validate.validate).parameters["spec"].annotation == "ModelSpec"
    assert inspect.signature(pack.packed_position_ids).parameters["spec"].annotation == "ModelSpec"
    for fn in (readers.iter_samples, readers.read_samples, readers.iter_raw, readers.reading):
        assert inspect.signature(fn).parameters["read"].annotation == "ReadArgs | str | os.PathLike", fn
    assert inspect.signature(remote.fetch_options).parameters["read"].annotation == "ReadArgs"
    assert inspect.signature(mix.Mix.of).parameters["read"].annotation == "ReadArgs"
    assert inspect.signature(paths.MediaRules.of).parameters["read"].annotation == "ReadArgs"
