"""Batches of preference rows: both sides of every pair guarded, then one forward's worth of sequences.

Pairs: the B chosen sides first, then the B rejected sides (TRL's concatenated forward), so that one forward
scores both; KTO: the rows with their tags. The guard (data/stages/collate.check_row) runs on both sides of a pair
before anything reaches the model.
"""

from __future__ import annotations

from ...errors import SampleError
from ...models.spec import ModelSpec
from ..schema import RowView
from .collate import Collator, check_row
from .pairs import NOT_KTO, is_pair, rejected_view


class PreferenceCollator:
    """Pairs: guards both sides of every pair, then one batch of 2B sequences, the B chosen sides first and the B
    rejected sides after them (one forward scores both; each side carries its copy of the prompt's pixels).
    KTO: the rows as they are, with their tags (`kto_tags`). SFT rows are refused: they have no other side."""

    def __init__(self, processor, spec: ModelSpec, cutoff_len: int | None = None, video=None, stage: str = "dpo"):
        self.inner = Collator(processor, spec, cutoff_len=cutoff_len, video=video)
        self.spec, self.cutoff_len, self.stage = spec, cutoff_len, stage

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        if self.stage == "kto":
            tags = [int(r.get("kto_tag", NOT_KTO)) for r in rows]
            self._refuse([r for r, t in zip(rows, tags) if t == NOT_KTO], "has no kto tag")
            batch = self.inner(rows)
            batch["kto_tags"] = torch.tensor(tags, dtype=torch.long)
            if all("ref_chosen_logps" in r for r in rows):  # precompute_ref_log_probs
                batch["ref_logps"] = torch.tensor([r["ref_chosen_logps"] for r in rows], dtype=torch.float64)
            return batch
        self._refuse([r for r in rows if not is_pair(r)], "has no rejected side")
        for row in rows:
            self.guard(row)
        batch = self.inner.collate([*rows, *(rejected_view(r) for r in rows)])  # guarded just above
        if all("ref_chosen_logps" in r for r in rows):  # precompute_ref_log_probs
            batch["ref_logps"] = torch.tensor([r["ref_chosen_logps"] for r in rows]
                                              + [r["ref_rejected_logps"] for r in rows], dtype=torch.float64)
        return batch

    def guard(self, row: dict) -> None:
        """Both sides of a pair, checked before the forward (runs against grids, lengths <= cutoff_len)."""
        found = [f"{side}: {p}" for side, r in (("chosen", row), ("rejected", rejected_view(row)))
                 for p in check_row(r, self.spec, self.cutoff_len)]
        if found:
            raise SampleError(*RowView(row).named(), "; ".join(found),
                              "this pair would crash the model's forward; run `vlmtune prepare` again with "
                              "overwrite_cache=true")

    def _refuse(self, rows: list[dict], why: str) -> None:
        if rows:
            r = rows[0]
            raise SampleError(*RowView(r).named(), f"the row {why}, but stage={self.stage!r}",
                              "prepare the data again with this stage (overwrite_cache=true)")
