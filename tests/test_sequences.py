"""The README's command sequences, each run in order as written, from the files a user would have.

test_commands.py starts every documented command alone, on caches it makes itself; that cannot see that a sequence
does not fit together (a cache made at one size, training at another). Here the commands of each README.md section
(its fenced blocks, in order) run top to bottom in a fresh folder that holds only what a user brings: `videos/` (two
real clips and captions.csv) and, where a command names it, VideoCrafter2's `model.ckpt` (downloaded by hand in the
recipe). Only size-shrinking flags are appended at the end of each command, and they keep the sizes' relations:
every frame size a command gives or defaults to maps through shrunk() (at most 64 px to 32, larger to 64), so two
commands that disagree on a size still disagree after shrinking. torchrun lines run train.py's main in this
process (test_commands.py runs the recipe under torchrun itself)."""
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_commands import ROOT, make_named_files, shrink, split_launcher  # noqa: E402

from tools import shapesbench  # noqa: E402
import data  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402

PROGRAMS = {"train.py": train.main, "data.py": data.main, "sample.py": sample.main, "tools.shapesbench": shapesbench.main}


def shrunk(pixels):
    return 32 if pixels <= 64 else 64


def sequences():
    """[(the section's heading, [argv, ...])] of README.md's sections whose fenced blocks hold two or more of
    PROGRAMS' commands, in the order they are shown (a command shown twice runs once: the second is the same step)."""
    found = []
    for section in re.split(r"\n(?=## )", (ROOT / "README.md").read_text()):
        commands = []
        for block in re.findall(r"```[^\n]*\n(.*?)```", section, re.S):
            for line in block.splitlines():
                line = line.split("#")[0].strip()
                if re.match(r"(python|torchrun)\s", line) and any(p in line.split() for p in PROGRAMS):
                    if shlex.split(line) not in commands:
                        commands.append(shlex.split(line))
        if len(commands) >= 2:
            found.append((section.splitlines()[0].lstrip("# "), commands))
    return found


def shrink_flags(program, args):
    """The flags appended to one command: smaller sizes (related as the command's own), fewer steps and frames."""
    if program == "train.py":
        cfg = train.load_config(args)
        return [f"--height={shrunk(cfg.height)}", f"--width={shrunk(cfg.width)}", "--frames=4", "--max_stride=2",
                "--batch_size=1", "--micro_batch=1", "--steps=1", "--workers=0", "--log_every=1", "--sample_every=0",
                "--ckpt_every=1"]
    if program == "data.py" and args[0] in ("heatmaps", "latents"):
        height, width = map(int, args[args.index("--size") + 1].split("x")) if "--size" in args else (320, 512)
        return ["--size", f"{shrunk(height)}x{shrunk(width)}"] + (["--max-stride", "2"] if args[0] == "heatmaps" else [])
    if program == "data.py" and args[0] == "check":
        return ["--frames", "4"]
    if program == "sample.py":
        return ["--steps", "2"]
    if program == "tools.shapesbench":
        return ["--images", "2", "--steps", "2"]
    return []


@pytest.mark.slow
@pytest.mark.parametrize("first,commands", sequences(), ids=[first[:40] for first, _ in sequences()])
def test_each_readme_sequence_runs_in_order_as_written(first, commands, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shrink(monkeypatch.setitem, monkeypatch.setattr)
    make_named_files(["--data=videos"])                                # what a user brings: videos and captions
    (tmp_path / "demo").symlink_to(ROOT / "demo")                      # and the clone's shipped first frame
    for argv in commands:
        program = next(p for p in argv if p in PROGRAMS)
        _, args = split_launcher(argv, program)
        brought = [a for a in args if a.startswith("--init=") or (a.startswith("--data=") and a.endswith(".csv"))]
        make_named_files(brought + (["--init=model.ckpt"] if "--init" in args else []))  # downloaded by hand
        if program == "sample.py" and not Path(args[0]).exists():  # a user's own image
            Image.fromarray(np.full((48, 64, 3), 128, np.uint8)).save(args[0])
        PROGRAMS[program](args + shrink_flags(program, args))


def test_the_readme_has_its_sequences():
    firsts = [first for first, _ in sequences()]
    assert len(firsts) >= 3, firsts   # the quick start, your own videos, the recipe
