"""The package's layout: no module grows past a size one reader can hold (issue 20: no file in src/ over 600 lines)."""

from __future__ import annotations

from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "vlmtune"
MAX_LINES = 600


def _line_counts(root: Path) -> dict[str, int]:
    """Every .py file under `root`, in any subfolder, -> its number of lines."""
    return {p.relative_to(root).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
            for p in sorted(root.rglob("*.py"))}


def test_no_file_in_src_is_over_600_lines():
    counts = _line_counts(SRC)
    assert "config/load.py" in counts and "commands/doctor/__init__.py" in counts  # it walks the subfolders
    over = {path: n for path, n in counts.items() if n > MAX_LINES}
    assert over == {}, f"over {MAX_LINES} lines (split at a seam): " + ", ".join(f"{p} ({n})" for p, n in over.items())


def test_the_count_sees_a_long_file_in_a_subfolder(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "long.py").write_text("x = 1\n" * (MAX_LINES + 1), encoding="utf-8")
    (tmp_path / "short.py").write_text("x = 1\n" * MAX_LINES, encoding="utf-8")
    (tmp_path / "notes.txt").write_text("x\n" * 1000, encoding="utf-8")
    assert _line_counts(tmp_path) == {"a/b/long.py": MAX_LINES + 1, "short.py": MAX_LINES}


def test_prepare_stays_a_short_driver():
    """prepare.py drives the pipeline into a cache; the cache on disk (cache.py), the counting (tally.py) and
    streaming (streaming.py) live beside it (issue 20: prepare.py under 300 lines)."""
    n = _line_counts(SRC / "data" / "drivers")["prepare.py"]
    assert n < 300, f"data/drivers/prepare.py has {n} lines"

