"""The losses of the demo and of the recipe, as recorded before the method-first reorganisation of the code.

A change that only moves code (the demo's conditioning out of VideoCrafter2's U-Net, the training step written out
in one place, names) must leave training bit for bit as it was: same initial weights, same randomness, same sums
in the same order. tests/fixtures/losses_before.json holds, for 3 steps of `--preset shapes` and 2 steps of the
recipe (`--data=videos --init=model.ckpt` at test_commands.py's shrunk sizes), every logged loss term and grad
norm as float.hex, and a sha256 of the final weights, recorded on a CPU of one kind (torch's capability, e.g.
AVX512). On that kind of CPU they must match exactly; on another kind (other kernels, other roundings) to 1e-4.

    python tests/test_same_losses.py --record     # writes the fixture (only when a change is meant to alter training)
"""
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_commands import SHRINK_PREPARE, SHRINK_TRAIN, clips, make_named_files, shrink  # noqa: E402

import video_io  # noqa: E402
import prepare  # noqa: E402
import train  # noqa: E402

RECORD = Path(__file__).resolve().parent / "fixtures" / "losses_before.json"
TERMS = ("loss", "diffusion", "motif", "moving", "static", "grad_norm")
RUNS = {"demo": ["--preset", "shapes", "--steps=3", "--log_every=1", "--sample_every=0", "--batch_size=4",
                 "--micro_batch=2", "--workers=0"],
        "recipe": ["--data=videos", "--init=model.ckpt", *SHRINK_TRAIN, "--steps=2", "--workers=0"]}


def fingerprint(name, work):
    """{"log": [{term: float.hex}], "weights": sha256} of a short run of RUNS[name] in the folder `work`."""
    out_dir = work / f"out_{name}"
    model = train.train(train.load_config(RUNS[name] + [f"--out_dir={out_dir}"]))
    log = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode() + value.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"log": [{k: float(entry[k]).hex() for k in TERMS} for entry in log], "weights": digest.hexdigest()}


def recipe_files(work):
    """model.ckpt and videos/ with its heatmap cache. GIFs, not mp4s: libx264's output here was seen to depend on
    what the process ran before (the same frames encoded twice in one process gave two files)."""
    (work / "videos").mkdir()
    for name, video, _ in clips():
        video_io.write_video(work / "videos" / f"{name}.gif", video, fps=10)
    (work / "videos" / "captions.csv").write_text("path,caption\n" + "".join(f"{n}.gif,{c}\n" for n, _, c in clips()))
    make_named_files(["--init=model.ckpt"])
    prepare.main(["heatmaps", "videos"] + SHRINK_PREPARE["heatmaps"])


@pytest.mark.parametrize("name", list(RUNS))
def test_training_is_bit_for_bit_as_recorded(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shrink(monkeypatch.setitem, monkeypatch.setattr)
    if name == "recipe":
        recipe_files(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as recorded: the reductions' order depends on the threads
    try:
        now, recorded = fingerprint(name, tmp_path), json.loads(RECORD.read_text())
    finally:
        torch.set_num_threads(threads)
    if torch.backends.cpu.get_cpu_capability() == recorded["cpu"]:
        assert now == recorded[name]
    else:
        assert len(now["log"]) == len(recorded[name]["log"])
        for step_now, step_recorded in zip(now["log"], recorded[name]["log"]):
            for term in TERMS:
                assert float.fromhex(step_now[term]) == pytest.approx(float.fromhex(step_recorded[term]), rel=1e-4), term


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import os
    import tempfile
    torch.set_num_threads(1)
    shrink(lambda d, k, v: d.__setitem__(k, v), setattr)
    with tempfile.TemporaryDirectory() as work:
        os.chdir(work)
        recipe_files(Path(work))
        record = {"cpu": torch.backends.cpu.get_cpu_capability(),
                  **{name: fingerprint(name, Path(work)) for name in RUNS}}
    RECORD.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {RECORD}")
