"""Preference samples between encoding and the forward: stage checks, pair-aware fitting, rows, the collator.

A pair (stage dpo) is its prompt once and two answers. Both sides are encoded with the checkpoint's template
(the prompt's blocks come out identical), and fitted as one unit: the longer side goes through the overflow
policies (shrink_images lowers the one pixel budget of the prompt's images, truncate_text cuts the prompt's
text, drop leaves the pair out), and the other side takes the fitted prompt with its own answer. The other
answer is no longer than the longer one, so both sides are then <= cutoff_len, with the same images at the
same grids, and every image run whole. `split` does not apply: a piece of the prompt would pair the answers
with a question they do not answer. Only the final answer is a target (label span); earlier turns are context.

A KTO sample (stage kto) is one conversation whose last answer is tagged desirable or undesirable; it is fitted
like an SFT sample without `split`. Its labels mark the answer so that its log-probability can be scored; the
trainer (train/preference.py) never uses an undesirable answer as an SFT target (pref_ftx counts desirable
rows only).

One fit-report line per pair, with both sides' tokens before and after (`chosen_tokens`, `rejected_tokens`).
The collator that guards both sides before the forward is data/stages/pair_collate.py (it needs torch; this module not).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ...errors import Problem, SampleError
from ...models.spec import ModelSpec
from ..schema import SampleStats
from ..sources.records import UNTRAINABLE
from ..types import Conversation
from .encode import Encoded, Encoder, emit
from .fit import FitOutcome, Fitter

# kto_tag column of a row: 1 desirable, 0 undesirable, -1 not a KTO row
NOT_KTO = -1


# -- stage checks ----------------------------------------------------------------------------------------------
def stage_problems(conv: Conversation, stage: str | None) -> list[Problem]:
    """What makes a sample unfit for the run's stage (None: any stage, as inspect reads data)."""
    pref = conv.preference
    kind = pref.kind if pref is not None else None

    def problem(what: str, fix: str) -> list[Problem]:
        return [Problem(source=conv.source, what=what, fix=fix, sample_id=conv.id, kind="wrong_stage")]

    if stage is None or (stage, kind) in (("sft", None), ("dpo", "pair"), ("kto", "kto")):
        return []
    if stage == "sft":
        name = "a preference pair (chosen / rejected)" if kind == "pair" else "a KTO sample (tagged answer)"
        return problem(f"the sample is {name} but stage='sft'",
                       f"set stage: {'dpo' if kind == 'pair' else 'kto'}, or train on an SFT dataset")
    have = {"pair": "a preference pair", "kto": "a KTO sample", None: "an SFT sample (no rejected answer)"}[kind]
    want = ("a pair: a ranking dataset (ranking: true, chosen / rejected) or TRL prompt / chosen / rejected"
            if stage == "dpo" else "a tagged answer: kto_tag in dataset_info.json, or TRL prompt / completion / label")
    return problem(f"the sample is {have} but stage={stage!r}", f"stage {stage} trains on {want}")


_KINDS = (("the sample is a preference pair", "dpo"), ("the sample is a KTO sample", "kto"),
          ("the sample is an SFT sample", "sft"))


def stage_that_reads(p: Problem) -> str | None:
    """The stage that reads a sample refused for its kind: a `wrong_stage` problem (above), or a ranking / KTO
    record refused under sft (`untrainable_layout`, data/sources/records/preference.py); None for other problems.
    inspect names it as the --stage to add."""
    if p.kind == UNTRAINABLE:
        return "kto" if "stage: kto" in p.fix else "dpo"
    if p.kind == "wrong_stage":
        return next((stage for prefix, stage in _KINDS if p.what.startswith(prefix)), None)
    return None


@dataclass(frozen=True)
class PrefStats(SampleStats):
    """A preference sample's token counts before fitting: SampleStats of the longer side (what must fit
    cutoff_len) and both sides' lengths (a pair: prompt + chosen, prompt + rejected) or the KTO tag. Only
    SampleStats' declared columns are stored by prepare; inspect reads the rest."""

    chosen_tokens: int | None = None
    rejected_tokens: int | None = None
    kto_tag: bool | None = None


# -- encoding ----------------------------------------------------------------------------------------------------
@dataclass
class PrefEncoded:
    """A preference sample in compact form: `chosen` (KTO: the completion), `rejected` (pairs) and the tag
    (KTO). Reads like the longer side's Encoded for statistics (length, tokens, images)."""

    chosen: Encoded
    rejected: Encoded | None = None
    desirable: bool | None = None

    @property
    def sides(self) -> list[Encoded]:
        return [self.chosen] + ([self.rejected] if self.rejected is not None else [])

    @property
    def longer(self) -> Encoded:
        return max(self.sides, key=lambda e: e.length)

    def stats(self) -> PrefStats:
        return PrefStats(**asdict(self.longer.stats()), chosen_tokens=self.chosen.length,
                         rejected_tokens=self.rejected.length if self.rejected is not None else None,
                         kto_tag=self.desirable)

    def __getattr__(self, name: str):  # id, source, length, image_tokens, videos, blocks ...: the longer side's
        if name in ("chosen", "rejected", "desirable"):
            raise AttributeError(name)
        return getattr(self.longer, name)


def encode_samples(encoder: Encoder, convs: list[Conversation], headers, videos) -> list:
    """Every conversation encoded (one batched tokenizer call): SFT ones as Encoded, preference ones as
    PrefEncoded with only their final answer trained."""
    rejected = [_rejected_conv(c) for c in convs if c.preference is not None and c.preference.kind == "pair"]
    encoded = encoder.encode_many(convs + rejected, headers, videos=videos)
    by_id = {e.id: e for e in encoded[len(convs):]}
    out = []
    for conv, enc in zip(convs, encoded[: len(convs)]):
        pref = conv.preference
        if pref is None:
            out.append(enc)
        elif pref.kind == "kto":
            out.append(PrefEncoded(_answer_only(enc), desirable=pref.desirable))
        else:
            rej = _answer_only(by_id[conv.id])
            _check_same_prompt(enc, rej)
            out.append(PrefEncoded(_answer_only(enc), rej))
    return out


def _rejected_conv(conv: Conversation) -> Conversation:
    return Conversation(conv.id, conv.source, conv.messages[:-1] + [conv.preference.rejected], layout=conv.layout,
                        origin=conv.origin)


def _answer_only(enc: Encoded) -> Encoded:
    """Only the last block (the answer) trained: earlier answers are context of a preference sample."""
    blocks = [b.replace(label_start=0, label_end=0) for b in enc.blocks[:-1]] + enc.blocks[-1:]
    return enc.with_blocks(blocks)


def _check_same_prompt(chosen: Encoded, rejected: Encoded) -> None:
    if [b.ids for b in chosen.blocks[:-1]] != [b.ids for b in rejected.blocks[:-1]]:
        raise SampleError(chosen.id, chosen.source, "the chat template renders the prompt differently before the "
                          "chosen and the rejected answer", "use a Qwen-VL checkpoint with a ChatML chat template")


# -- fitting -----------------------------------------------------------------------------------------------------
@dataclass
class PrefOutcome(FitOutcome):
    """A preference sample's fit-report line: both sides' tokens (pairs) or the tag (KTO)."""

    sides: dict | None = None

    def report(self) -> dict:
        return {**super().report(), **(self.sides or {})}


def fit_sample(fitter: Fitter, enc) -> FitOutcome:
    """An SFT sample through the Fitter; a preference sample as one unit (module docstring)."""
    if not isinstance(enc, PrefEncoded):
        return fitter.fit(enc)
    inner = Fitter(fitter.spec, replace(fitter.opt, overflow=tuple(p for p in fitter.opt.overflow if p != "split")),
                   fitter.encoder)
    longer = enc.longer
    out = inner.fit(longer)
    if enc.rejected is None:
        fitted = [PrefEncoded(out.pieces[0], desirable=enc.desirable)] if out.pieces else []
        return _outcome(out, enc, fitted, {"kto_tag": enc.desirable}, fitter)
    other = enc.rejected if longer is enc.chosen else enc.chosen
    fitted: list = []
    if out.pieces:
        prompt = out.pieces[0].blocks[:-1]  # the answer is the last block; no policy touches it
        sides = {id(longer): out.pieces[0], id(other): other.with_blocks(prompt + other.blocks[-1:])}
        fitted = [PrefEncoded(sides[id(enc.chosen)], sides[id(enc.rejected)])]
    after = fitted[0].sides if fitted else [None, None]
    tokens = {"chosen_tokens": [enc.chosen.length, after[0].length if after[0] else None],
              "rejected_tokens": [enc.rejected.length, after[1].length if after[1] else None]}
    return _outcome(out, enc, fitted, tokens, fitter)


def _outcome(out: FitOutcome, enc: PrefEncoded, pieces: list, sides: dict, fitter: Fitter) -> PrefOutcome:
    reason = out.reason
    if out.fate == "dropped" and "split" in fitter.opt.overflow:
        reason += " (split does not apply to preference samples: it would cut the prompt from its answers)"
    after = pieces[0].length if pieces else None
    return PrefOutcome(enc.id, enc.source, out.fate, reason, enc.length, after, pieces, enc.chosen.origin, sides=sides)


# -- rows --------------------------------------------------------------------------------------------------------
def emit_row(piece, spec: ModelSpec) -> dict:
    """The stored row of a fitted piece: an SFT row, or a preference row (the chosen side's columns, the
    rejected side's ids and labels, the KTO tag). Both sides share the images and their grids."""
    if not isinstance(piece, PrefEncoded):
        return emit(piece, spec).to_dict()
    sides: dict = {}
    if piece.rejected is not None:
        rejected = emit(piece.rejected, spec)
        sides.update(rejected_input_ids=rejected.input_ids, rejected_labels=rejected.labels)
    if piece.desirable is not None:
        sides["kto_tag"] = int(piece.desirable)
    return replace(emit(piece.chosen, spec), **sides).to_dict()  # Row sets `length`: the longer side's


def rejected_view(row: dict) -> dict:
    """The rejected side of a pair row as a row of its own (same images, grids and id)."""
    return {**row, "input_ids": row["rejected_input_ids"], "labels": row["rejected_labels"]}


def is_pair(row: dict) -> bool:
    return bool(row.get("rejected_input_ids"))
