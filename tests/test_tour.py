"""docs/code-tour.md quotes the code line by line: every quoted line must be in the file its block names."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_line_the_tour_quotes_is_in_its_file():
    tour = (ROOT / "docs" / "code-tour.md").read_text()
    blocks = re.findall(r"```python\n# (\S+)\n(.*?)```", tour, flags=re.S)
    assert len(blocks) >= 8
    for name, block in blocks:
        source = (ROOT / name).read_text().splitlines()
        for line in block.splitlines():
            if line.strip() != "...":
                assert line in source, f"docs/code-tour.md quotes a line {name} does not have: {line.strip()}"


def test_the_readmes_line_ranges_are_whole_sections():
    """Each `file.py:A-B` of the README's reading path starts at a def, class or banner and ends at the section's last
    line: a move that shifts the code shifts the range, or this fails."""
    ranges = re.findall(r"`(\w+\.py):(\d+)-(\d+)`", (ROOT / "README.md").read_text())
    assert len(ranges) >= 6
    for name, first, last in ranges:
        lines = (ROOT / name).read_text().splitlines() + [""]
        first, last = int(first), int(last)
        assert lines[first - 1].startswith(("def ", "class ", "# -")), f"README's {name}:{first}-{last} starts mid-way"
        assert lines[last - 1].strip(), f"README's {name}:{first}-{last} ends on a blank line"
        after = lines[last] if last < len(lines) else ""
        assert not after.strip() or after.startswith("# -"), f"README's {name}:{first}-{last} ends mid-way"
