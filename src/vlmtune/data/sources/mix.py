"""Several datasets in one run, as LLaMA-Factory's mix_strategy mixes them: one after the other, or interleaved
(in turn, or at random by interleave_probs with the run's seed) until the first or the last runs out."""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from ...config import ReadArgs
from ...errors import Problem

if TYPE_CHECKING:  # readers imports this module
    from .readers import RawRecord


@dataclass
class Mix:
    """LLaMA-Factory's mix_strategy over several datasets: `concat` reads them one after the other;
    `interleave_under` draws from them in turn (or at random with `probs`, seeded) until the first runs out,
    `interleave_over` until each has run out once, reading the others again (a repeat is its own record).
    `left_out` counts, per dataset, the records interleave_under never drew (for the run's notes)."""

    strategy: str = "concat"
    probs: tuple[float, ...] | None = None
    seed: int = 0
    left_out: Counter = field(default_factory=Counter)

    @classmethod
    def of(cls, read: ReadArgs, seed: int = 0) -> "Mix":
        """How the read section's datasets mix (mix_strategy, interleave_probs), drawn with the run's `seed`."""
        probs = tuple(float(p) for p in read.interleave_probs.split(",")) if read.interleave_probs else None
        return cls(read.mix_strategy, probs, seed)

    def notes(self) -> list[str]:
        return [f"mix_strategy={self.strategy}: {n} record(s) of {name} were not drawn (the first dataset to run "
                "out ends the mix; interleave_over repeats the smaller ones instead)"
                for name, n in self.left_out.items() if n]


def interleave(sources: list[tuple[str, Callable[[], Iterator]]], mix: Mix,
                count_left_out: bool) -> Iterator[RawRecord | Problem]:
    """The datasets' records drawn in turn (or at random by `mix.probs`); see Mix. Unreadable inputs' problems
    pass straight through and draw nothing. Deterministic: every pass over the data draws the same records."""
    rng = np.random.default_rng(mix.seed)
    its = [read() for _, read in sources]
    done = [False] * len(its)  # has run out at least once
    k = 0
    while True:
        i = k % len(its) if mix.probs is None else int(rng.choice(len(its), p=mix.probs))
        k += 1
        item = next(its[i], None)
        while isinstance(item, Problem):
            yield item
            item = next(its[i], None)
        if item is not None:
            yield copy.copy(item) if done[i] else item
            continue
        done[i] = True
        if mix.strategy == "interleave_under" or all(done):
            break
        its[i] = sources[i][1]()  # interleave_over: read it again
        item = next((x for x in its[i] if not isinstance(x, Problem)), None)
        if item is None:
            break  # an empty dataset cannot be repeated
        yield copy.copy(item)
    if mix.strategy == "interleave_under":
        for (name, _), it in zip(sources, its):
            for item in it:
                if isinstance(item, Problem):
                    yield item  # an input that cannot be read is still reported
                elif count_left_out:
                    mix.left_out[name] += 1
