"""Sample ids: a record's own id when it is unique across everything read, else its fallback id
(`<file stem>:<line>`...), then `~2`, `~3`... on a clash (the rule is in data/sources/readers.py's docstring).

`IdPlan` plans them in a first pass that keeps 16 bytes per record, so that ids are global while the records
stream.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from ...errors import Problem

if TYPE_CHECKING:  # readers imports this module
    from .readers import RawRecord


def _own_id(value: Any) -> str | None:
    own = value.get("id") if isinstance(value, dict) else None
    if isinstance(own, bool) or not isinstance(own, (str, int)):
        return None
    text = str(own)
    return text if text.strip() and len(text) <= 200 else None


def _h(text: str) -> int:
    """A 64-bit hash of an id, never 0 (0 marks "no own id")."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little") or 1


class IdPlan:
    """Assigns ids in one pass over the records after a first pass has counted them.

    Uniqueness is global, so every record's id must be known before the first sample is emitted. The
    first pass keeps 8-byte hashes in numpy arrays (16 bytes per record, not the records); exact strings
    are kept only for the rare ids whose hashes repeat, so a hash collision never merges two ids. Results
    equal the whole-list rule: own id if unique, else the fallback, then `~2`, `~3`... on a clash.
    """

    def __init__(self, raws: Iterable[RawRecord | Problem], recount: Callable[[], Iterable[RawRecord | Problem]]):
        own_h, fb_h = array("Q"), array("Q")
        for raw in raws:
            if not isinstance(raw, Problem):
                own = _own_id(raw.value)
                own_h.append(0 if own is None else _h(own))
                fb_h.append(_h(raw.fallback_id))
        own = np.frombuffer(own_h, dtype=np.uint64) if own_h else np.zeros(0, np.uint64)
        fb = np.frombuffer(fb_h, dtype=np.uint64) if fb_h else np.zeros(0, np.uint64)
        self.records = len(own)
        vals, counts = np.unique(own[own != 0], return_counts=True)
        dup_h = set(vals[counts > 1].tolist())
        # Exact counts for the own ids whose hashes repeat (a second pass over the records, when any).
        self._own_counts: Counter = Counter()
        if dup_h:
            for raw in recount():
                if not isinstance(raw, Problem):
                    mine = _own_id(raw.value)
                    if mine is not None and _h(mine) in dup_h:
                        self._own_counts[mine] += 1
        self._dup_h = dup_h
        dup = np.fromiter(dup_h, np.uint64, len(dup_h))
        in_dup = np.isin(own, dup)
        first = np.where((own != 0) & ~in_dup, own, fb)  # the first choice of each record (see below)
        vals, counts = np.unique(first, return_counts=True)
        # Ids that take the exact path (strings, `_used`): first choices that repeat, and, for records whose
        # own id's hash repeats, both candidates (their first choice needs the exact counts).
        self._contested = set(vals[counts > 1].tolist()) | dup_h | set(fb[in_dup].tolist())
        order = np.argsort(first, kind="stable")
        self._sorted, self._order = first[order], order
        self._used: set[str] = set()  # final ids of records that took the exact path, and generated suffixes
        self._generated: set[str] = set()
        self._i = 0

    def _first_choice(self, raw: RawRecord) -> str:
        mine = _own_id(raw.value)
        if mine is None:
            return raw.fallback_id
        if _h(mine) in self._dup_h and self._own_counts[mine] != 1:
            return raw.fallback_id
        return mine

    def _earlier(self, sid: str, i: int) -> bool:
        """Whether a record before i has taken `sid` as its id without the exact path."""
        h = _h(sid)
        if h in self._contested:
            return False  # every record with this first choice takes the exact path: it is in _used
        k = int(np.searchsorted(self._sorted, h))
        return k < len(self._sorted) and int(self._sorted[k]) == h and int(self._order[k]) < i

    def next_id(self, raw: RawRecord) -> str:
        i = self._i
        self._i += 1
        sid = self._first_choice(raw)
        if _h(sid) not in self._contested and sid not in self._generated:
            return sid  # unique among the first choices, and no suffix took it: final
        base = sid
        if sid in self._used or self._earlier(sid, i):
            k = 2
            while f"{base}~{k}" in self._used or self._earlier(f"{base}~{k}", i):
                k += 1
            sid = f"{base}~{k}"
            self._generated.add(sid)
        self._used.add(sid)
        return sid
