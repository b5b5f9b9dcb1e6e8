"""Preference layouts, recognised so that supervised fine-tuning never trains them: a KTO tag marks answers
as desirable or not, a ranking pairs a chosen with a rejected answer. As SFT targets the undesirable and
rejected answers would be learned, so under `stage: sft` each file of them is refused, naming the stage
that trains it (the preference stages read these rows themselves).

Row shapes: LLaMA-Factory kto_tag (`columns.kto_tag` names a boolean column, e.g. `label`) and ranking
(`"ranking": true`, `columns.chosen` / `columns.rejected`); TRL unpaired preference {"prompt", "completion",
"label": bool}; TRL / LLaMA-Factory pairs {"chosen", "rejected"} (with `prompt` or `messages`); ms-swift
{"query", "response", "rejected_response"}.
"""

from __future__ import annotations

from .common import BadRecord, Context, Converted, RecordFormat

KIND = "untrainable_layout"  # a Problem kind: DataError shows one line per file for it


def is_kto(record: dict, fmt: RecordFormat) -> bool:
    if fmt.kto_tag is not None:
        return True
    return fmt.formatting is None and isinstance(record.get("label"), bool) and "completion" in record


def is_ranking(record: dict, fmt: RecordFormat) -> bool:
    if fmt.ranking or fmt.chosen is not None or fmt.rejected is not None:
        return True
    return fmt.formatting is None and ("rejected_response" in record or ("chosen" in record and "rejected" in record))


def refuse_kto(record: dict, fmt: RecordFormat, ctx: Context) -> Converted:
    tag = fmt.kto_tag or "label"
    raise BadRecord(
        f"the dataset is KTO data (a `{tag}` tag marks each answer desirable or undesirable); supervised "
        "fine-tuning would train the undesirable answers as targets",
        "train it with stage: kto, or list only SFT datasets under stage: sft", kind=KIND)


def refuse_ranking(record: dict, fmt: RecordFormat, ctx: Context) -> Converted:
    raise BadRecord(
        "the dataset is preference (ranking) data, a chosen and a rejected answer per prompt; supervised "
        "fine-tuning would train the rejected answers as targets",
        "train it with stage: dpo, or list only SFT datasets under stage: sft", kind=KIND)
