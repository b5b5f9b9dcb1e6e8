"""config_enum_import_cost: why config keeps its own copy of transformers' scheduler and optimizer names.

Two fresh interpreters, CPU time (user + system, so that the shared machine's load counts less than in
wall time), fastest of a few runs each:

* vlmtune: `import vlmtune.config` and `load_config` of a minimal config (what `doctor --json` and every
  config error cost before anything heavy loads);
* baseline: importing transformers' `SchedulerType` and `OptimizerNames`, what config would have to do
  to validate lr_scheduler_type and optim against the enums themselves.

Headline: the enums' import cost / config's whole load cost. tests/config checks the copies still equal
the enums of the installed transformers.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")

CONFIG = ("from vlmtune.config import load_config; "
          "load_config(None, base={'model_name_or_path': 'm', 'dataset': 'd', 'output_dir': 'o'})")
ENUMS = "from transformers.trainer_utils import SchedulerType; from transformers.training_args import OptimizerNames"


def _cpu_seconds(code: str) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**os.environ, "PYTHONPATH": SRC}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run(quick: bool = False) -> dict:
    repeats = 1 if quick else 3
    config = min(_cpu_seconds(CONFIG) for _ in range(repeats))
    enums = min(_cpu_seconds(ENUMS) for _ in range(repeats))
    return {
        "config_enum_import_cost": round(enums / config, 1),
        "config_load_cpu_s": round(config, 3),
        "transformers_enums_import_cpu_s": round(enums, 3),
        "repeats": repeats,
    }


if __name__ == "__main__":
    for k, v in run("--quick" in sys.argv).items():
        print(f"{k}: {v}")
