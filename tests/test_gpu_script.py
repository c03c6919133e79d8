"""tools/gpu_rows.sh at toy sizes on the CPU (SMALL=1): every row ends with exit 0, and the run stopped by SIGTERM
is continued by --resume from the step it saved to the last. The GPU half (NCCL, the profiler) needs a lent GPU."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROWS = ["versions", "files", "train_stopped", "train_resumed", "resume_check", "three_ddp", "three_shard",
        "shard_vs_ddp", "train", "sample", "heatmap", "states_ddp", "states_shard"]


@pytest.mark.slow
def test_the_gpu_script_at_toy_sizes(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "tools" / "gpu_rows.sh"), str(tmp_path)], cwd=ROOT, text=True,
                            capture_output=True, timeout=900, env={**os.environ, "SMALL": "1", "PYTHON": sys.executable})
    ended = dict(re.findall(r"^== (\w+): exit (\d+) in", result.stdout, flags=re.M))
    assert list(ended) == ROWS, result.stdout[-3000:]
    assert all(code == "0" for code in ended.values()) and result.returncode == 0, (ended, result.stdout[-6000:])

    saved = re.findall(r"stop signal: saved step (\d+)", result.stdout)
    assert len(saved) == 1 and 1 <= int(saved[0]) < 4, result.stdout[-3000:]
    logged = [json.loads(line)["step"] for line in (tmp_path / "train" / "log.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert logged == list(range(1, 5))  # steps 1 .. saved by the stopped run, the rest by the resumed one
    assert f"resumed from step {saved[0]} to step 4" in result.stdout
    assert (tmp_path / "train" / "latest").is_file() and list((tmp_path / "train" / "samples").glob("*.gif"))
    monitored = [json.loads(line)["validation"] for line in (tmp_path / "train" / "log.jsonl").read_text().splitlines()
                 if '"validation"' in line]
    assert monitored and all("motion_ratio" in v for v in monitored)  # the motion monitor scored the samples
