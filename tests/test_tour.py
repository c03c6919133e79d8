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
