"""errors.py: an error lists at most MAX_LISTED problems, each bounded, then how many more there are."""

from vlmtune.errors import MAX_LINE, MAX_LISTED, ConfigError, DataError, Problem


def test_config_error_lists_the_first_problems_and_counts_the_rest():
    err = ConfigError([f"key{i} is wrong" for i in range(MAX_LISTED + 3)])
    lines = str(err).splitlines()
    assert lines[0] == f"{MAX_LISTED + 3} problem(s) in the configuration:"
    assert lines[1:-1] == [f"  - key{i} is wrong" for i in range(MAX_LISTED)]
    assert lines[-1] == "  ... and 3 more"


def test_data_error_lists_the_first_problems_each_bounded():
    problems = [Problem(f"f.jsonl:{i}", "x" * (3 * MAX_LINE), "fix it") for i in range(MAX_LISTED + 1)]
    lines = str(DataError(problems)).splitlines()
    assert lines[0] == f"{MAX_LISTED + 1} problem(s) in the data:"
    assert len(lines) == MAX_LISTED + 2 and lines[-1] == "  ... and 1 more"
    assert all(len(line) < MAX_LINE + 100 and "characters cut" in line for line in lines[1:-1])


def test_a_short_list_has_no_count_of_more():
    assert str(ConfigError(["a", "b"])) == "2 problem(s) in the configuration:\n  - a\n  - b"
