"""The user guide keeps up with the package."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_environment_switch_is_in_the_user_guide():
    """Each ``FP8COMPILE_*`` variable the package reads has a row in the guide's table."""
    read = set()
    for path in (ROOT / "fp8compile").rglob("*.py"):
        read |= set(re.findall(r"\bFP8COMPILE_[A-Z0-9_]+", path.read_text()))
    assert len(read) >= 6, read  # the scan itself found the switches
    guide = (ROOT / "docs" / "index.md").read_text()
    table = guide[guide.index("### Environment switches"):guide.index("## Reading the plan")]
    rows = set(re.findall(r"^\| `(FP8COMPILE_[A-Z0-9_]+)", table, flags=re.M))
    assert rows == read, f"missing from docs/index.md: {read - rows}; gone: {rows - read}"
