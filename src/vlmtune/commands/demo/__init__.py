"""`vlmtune demo`: the whole product on a laptop CPU in a few minutes, with nothing downloaded.

1. a tiny random Qwen2-VL checkpoint (`models/tiny.py`), written to `<out>/model`;
2. a synthetic dataset of rendered shapes in LLaMA-Factory's sharegpt format (`<out>/data`:
   `demo_shapes.json`, `dataset_info.json`, `images/`), with single-image, two-image and multi-turn
   questions, and a few samples longer than the demo's cutoff_len so that every fitting policy acts;
   plus a held-out split of single-image questions on images never trained on (`eval.json`);
3. accuracy on the held-out questions before training, scored by log-likelihood: the model picks the
   candidate answer (one of the colours, or one of the shapes) it finds most likely;
4. fine-tuning through the same recipe as `vlmtune train` (config built in `demo_config`);
5. accuracy after training, a summary on stdout and `<out>/demo_summary.json`.

`vlmtune demo --dpo` trains with DPO instead, on right-vs-wrong answer pairs about the same pictures, and reports
held-out preference accuracy before and after (preference.py).

`vlmtune demo --video` does the same with clips: MP4s of one shape moving left, right, up or down
(video_data.py), scored among the four directions (video_eval.py), run by video_run.py.

Everything is seeded: the same command gives the same numbers on the same machine.

data.py writes the dataset (1-2), evaluation.py scores answers (3, 5), run.py builds the config, trains and
summarises (4-5). Each demo is a `Task` (its data, config, score and summary keys) that run.py's `run_task` runs
through the same steps: the image demo's is run.py's, the others' are preference.py's and video_run.py's.
"""

from .data import COLOURS, DATASET_NAME, FULL, QUICK, SHAPES, DemoSize, write_dataset
from .evaluation import chance, evaluate
from .run import demo_config, format_summary, run_demo
from .preference import PREF_FULL, PREF_QUICK, format_pref_summary, pref_demo_config, run_pref_demo
from .video_data import DIRECTIONS, VIDEO_DATASET_NAME, VIDEO_FULL, VIDEO_QUICK, VideoDemoSize, write_video_dataset
from .video_eval import evaluate_video
from .video_run import format_video_summary, run_video_demo, video_demo_config

__all__ = [
    "COLOURS", "DATASET_NAME", "DIRECTIONS", "FULL", "QUICK", "SHAPES", "VIDEO_DATASET_NAME", "VIDEO_FULL",
    "VIDEO_QUICK", "DemoSize", "VideoDemoSize", "chance", "demo_config", "evaluate", "evaluate_video",
    "PREF_FULL", "PREF_QUICK", "format_pref_summary", "pref_demo_config", "run_pref_demo",
    "format_summary", "format_video_summary", "run_demo", "run_video_demo", "video_demo_config", "write_dataset",
    "write_video_dataset",
]
