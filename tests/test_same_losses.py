"""The losses of the demo and of the recipe, recorded so that a change that only moves code is seen to change nothing.

A change that only moves code (names, files, the training step written out in one place) must leave training as it
was: same initial weights, same randomness, same sums in the same order. tests/fixtures/losses_before.json holds, for
3 steps of `--preset shapes` and 2 steps of the recipe (`--data=videos --init=model.ckpt` at test_commands.py's shrunk
sizes), every logged loss term and grad norm as float.hex, each final weight tensor's norm, a sha256 of the final
weights, and the machine's fingerprint (CPU model, torch's CPU capability, the oneDNN / MKL ISA caps, torch, numpy and
Pillow versions, one thread). Where the whole fingerprint matches, the run must match bit for bit; anywhere else (MKL
and oneDNN pick kernels by finer CPU features than torch's capability string, so the sums round differently) the
logged terms to 1e-4 and the weight norms to 1e-5, relative.

    python tests/test_same_losses.py --record     # writes the fixture (only when a change is meant to alter training)
"""
import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import PIL
import numpy
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_commands import SHRINK_PREPARE, SHRINK_TRAIN, clips, make_named_files, shrink  # noqa: E402

import data  # noqa: E402
import train  # noqa: E402

RECORD = Path(__file__).resolve().parent / "fixtures" / "losses_before.json"
TERMS = ("loss", "diffusion", "motif", "moving", "static", "grad_norm")
RUNS = {"demo": ["--preset", "shapes", "--steps=3", "--log_every=1", "--sample_every=0", "--batch_size=4",
                 "--micro_batch=2", "--workers=0"],
        "recipe": ["--data=videos", "--init=model.ckpt", *SHRINK_TRAIN, "--batch_size=2", "--steps=2", "--workers=0"]}


def machine():
    """What the bit-for-bit sums depend on, beyond the code: the CPU, the kernels' ISA, the libraries' versions."""
    model = platform.processor()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return {"cpu": model, "capability": torch.backends.cpu.get_cpu_capability(),
            "isa_caps": [os.environ.get(k, "") for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")],
            "torch": torch.__version__, "numpy": numpy.__version__, "pillow": PIL.__version__,
            "threads": torch.get_num_threads()}


def fingerprint(name, work):
    """{"log": [{term: float.hex}], "norms": {tensor: norm}, "weights": sha256} of a short run of RUNS[name] in the
    folder `work`."""
    out_dir = work / f"out_{name}"
    model = train.train(train.load_config(RUNS[name] + [f"--out_dir={out_dir}"]))
    log = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    digest, norms = hashlib.sha256(), {}
    for key, value in model.state_dict().items():
        digest.update(key.encode() + value.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        if value.is_floating_point():
            norms[key] = value.detach().double().norm().item()
    return {"log": [{k: float(entry[k]).hex() for k in TERMS} for entry in log], "norms": norms,
            "weights": digest.hexdigest()}


def recipe_files(work):
    """model.ckpt and videos/ with its heatmap cache. GIFs, not mp4s: libx264's output here was seen to depend on
    what the process ran before (the same frames encoded twice in one process gave two files)."""
    (work / "videos").mkdir()
    for name, video, _ in clips():
        data.write_video(work / "videos" / f"{name}.gif", video, fps=10)
    (work / "videos" / "captions.csv").write_text("path,caption\n" + "".join(f"{n}.gif,{c}\n" for n, _, c in clips()))
    make_named_files(["--init=model.ckpt"])
    data.main(["heatmaps", "videos"] + SHRINK_PREPARE["heatmaps"])


@pytest.mark.parametrize("name", list(RUNS))
def test_training_is_bit_for_bit_as_recorded(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shrink(monkeypatch.setitem, monkeypatch.setattr)
    if name == "recipe":
        recipe_files(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as recorded: the reductions' order depends on the threads
    try:
        here, now, recorded = machine(), fingerprint(name, tmp_path), json.loads(RECORD.read_text())
    finally:
        torch.set_num_threads(threads)
    if here == recorded["machine"]:
        assert now == recorded[name]
        return
    assert len(now["log"]) == len(recorded[name]["log"])
    for step_now, step_recorded in zip(now["log"], recorded[name]["log"]):
        for term in TERMS:
            assert float.fromhex(step_now[term]) == pytest.approx(float.fromhex(step_recorded[term]), rel=1e-4), term
    assert now["norms"].keys() == recorded[name]["norms"].keys()
    # abs 1e-8: a zero-initialised output layer's norm (about 6e-7 after the few steps) moves by 1e-9 with other
    # kernels (torch 2.6's against 2.14's), 0.2 % of itself; a change in the maths moves norms far more than that
    for key, norm in recorded[name]["norms"].items():
        assert now["norms"][key] == pytest.approx(norm, rel=1e-5, abs=1e-8), key


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile
    torch.set_num_threads(1)
    shrink(lambda d, k, v: d.__setitem__(k, v), setattr)
    with tempfile.TemporaryDirectory() as work:
        os.chdir(work)
        recipe_files(Path(work))
        record = {"machine": machine(),
                  **{name: fingerprint(name, Path(work)) for name in RUNS}}
    RECORD.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {RECORD}")
