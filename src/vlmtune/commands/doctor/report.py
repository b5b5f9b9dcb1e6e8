"""The doctor's report: one `Check` per line (ok / warn / fail, the numbers it used, the fix), as text or JSON."""

from __future__ import annotations

import json
import textwrap
from collections import Counter
from dataclasses import asdict, dataclass

from ...errors import VlmtuneError

STATUSES = ("ok", "warn", "fail")


GiB = 1024**3


MiB = 1024**2


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report. `fix` is empty when status is ok."""

    name: str
    status: str
    message: str
    fix: str = ""

    def __post_init__(self):
        assert self.status in STATUSES, self.status

    def to_dict(self) -> dict:
        return asdict(self)


class DoctorError(VlmtuneError):
    """The doctor found failing checks before training."""

    def __init__(self, failed: list[Check]):
        self.failed = list(failed)
        lines = "\n".join(f"  - {c.name}: {c.message}\n    fix: {c.fix}" for c in self.failed)
        super().__init__(
            f"{len(self.failed)} doctor check(s) failed before training:\n{lines}\n"
            "fix them, or set run_doctor: false to train anyway"
        )


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= 10 * GiB else f"{n / GiB:.2f} GiB"


def size_text(n: float) -> str:
    return gib(n) if n >= GiB else f"{n / MiB:.0f} MiB"


def failures(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.status == "fail"]


def mib(n: float) -> str:
    return f"{n / MiB:.0f} MiB"


def format_checks(checks: list[Check], width: int = 110) -> str:
    """A table: status, check, message (wrapped), and the fix under each check that is not ok."""
    head = f"{'status':<7} {'check':<12} message"
    lines = [head, "-" * min(width, 100)]
    indent = " " * 21
    for c in checks:
        status = c.status.upper() if c.status != "ok" else "ok"
        body = textwrap.wrap(c.message, width - 21) or [""]
        lines.append(f"{status:<7} {c.name:<12} {body[0]}")
        lines += [indent + b for b in body[1:]]
        if c.fix:
            fix = textwrap.wrap("fix: " + c.fix, width - 21)
            lines += [indent + b for b in fix]
    counts = Counter(c.status for c in checks)
    lines += ["", f"{counts['fail']} failed, {counts['warn']} warning(s), {counts['ok']} ok"]
    return "\n".join(lines)


def to_json(checks: list[Check]) -> str:
    return json.dumps([c.to_dict() for c in checks], indent=2)


def leaf_names(names) -> list[str]:
    """Module names by their last part, each once, sorted."""
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def names_text(names) -> str:
    """A list of names as the config writes it: [a, b]."""
    return "[" + ", ".join(names) + "]"
