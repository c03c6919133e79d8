"""One process, two DDP processes and two sharded (FSDP2) processes train the same model; checkpoints move between
them; a sharded run killed at random moments resumes exactly. CPU, gloo, tiny shapes runs."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import train as train_py
from conftest import free_port
from model import ModelConfig, load_checkpoint
from sample import build_model, load_model, main as sample_main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
# 4 clips a step as 4 micro-batches of 1 in one process, or 2 on each of two ranks: accumulation both ways;
# the recipe's temporal dropout (the shapes preset has none)
ARGS = ["--preset=shapes", "--temporal_dropout=0.1", "--height=16", "--width=16", "--frames=4", "--batch_size=4",
        "--micro_batch=1", "--log_every=1", "--warmup_steps=2", "--device=cpu", "--steps=4", "--ckpt_every=2",
        "--gradient_checkpointing=true", "--sample_every=0"]
TERMS = ("loss", "diffusion", "motif", "moving", "static", "grad_norm")


def command(processes, script="train.py"):
    if processes == 1:
        return [sys.executable, script]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
            f"--master_port={free_port()}", script]


def train(out_dir, processes=1, *extra, script="train.py"):
    result = subprocess.run([*command(processes, script), *ARGS, *extra, f"--out_dir={out_dir}"], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def train_here(out_dir, *extra):
    """The same run in this process, as one `python train.py` trains (no interpreter to start: the suite stays fast)."""
    train_py.train(train_py.load_config([*ARGS, *extra, f"--out_dir={out_dir}"]))


def log(out_dir):
    """step -> the last logged record of that step (a resumed run logs re-done steps again)."""
    return {r["step"]: r for r in map(json.loads, (Path(out_dir) / "log.jsonl").read_text().splitlines())}


def assert_same_losses(a, b, steps):
    for step in steps:
        for key in TERMS:
            x, y = a[step][key], b[step][key]
            assert abs(x - y) <= 1e-5 * abs(x), (step, key, x, y)


def assert_same_state(a, b, exact=False):
    """Two checkpoints' weights, EMA and AdamW state: equal, or as equal as a different order of summing gradients
    allows: AdamW moves a parameter whose gradient is at rounding level (the zero-initialised output layers) by up to
    lr = 1e-3 a step, in a direction the rounding decides (DDP and sharded runs alike, 8.5e-5 seen)."""
    def same(x, y):
        return torch.equal(x, y) if exact else torch.allclose(x, y, rtol=1e-4, atol=2e-4)
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys() and a["ema"].keys() == b["ema"].keys()
    assert all(same(v, b["model"][k]) for k, v in a["model"].items())
    assert all(same(v, b["ema"][k]) for k, v in a["ema"].items())
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]  # the same format, parameters by index
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, state in a["optimizer"]["state"].items():
        assert state.keys() == b["optimizer"]["state"][i].keys()
        assert all(same(v, b["optimizer"]["state"][i][k]) for k, v in state.items()), i


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4 steps in one process, two DDP processes and two sharded processes (checkpoints at 2 and 4), with the
    recipe's temporal_dropout: its masks are seeded by each micro-batch's first sample, so one process and two draw
    the same ones and train alike (step 3's loss is 2e-5 apart, past the tolerance, when each rank draws its own)."""
    root = tmp_path_factory.mktemp("runs")
    train_here(root / "one")
    train(root / "ddp", 2, script="tests/ddp_worker.py")
    sharded = train(root / "shard", 2, "--shard=true")
    assert "2 process(es) on cpu, sharded" in sharded.stdout
    return root


def test_sharded_and_ddp_processes_train_like_one_process(runs):
    one, ddp, shard = (log(runs / name) for name in ("one", "ddp", "shard"))
    assert sorted(one) == sorted(ddp) == sorted(shard) == list(range(1, 5))
    assert_same_losses(one, ddp, range(1, 5))
    assert_same_losses(one, shard, range(1, 5))  # and the global gradient norm (clipped over the shards)
    reference = load_checkpoint(runs / "one")
    assert_same_state(reference, load_checkpoint(runs / "ddp"))
    assert_same_state(reference, load_checkpoint(runs / "shard"))  # one file, laid out as an unsharded run's
    rank0, rank1 = (torch.load(runs / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(v, rank1[k]) for k, v in rank0.items())  # DDP keeps the ranks identical
    initial = build_model(ModelConfig.from_run_config(reference["config"])).state_dict()
    moved = sum(not torch.equal(v, initial[k]) for k, v in reference["model"].items())
    assert moved > len(initial) // 2  # training changed the weights


def test_checkpoints_resume_across_sharding_and_world_sizes(runs, tmp_path):
    one = log(runs / "one")
    # two sharded processes -> one process, not sharded
    train_here(tmp_path / "unsharded", f"--resume={runs / 'shard' / 'ckpt_0000002.pt'}")
    assert sorted(log(tmp_path / "unsharded")) == [3, 4]
    assert_same_losses(one, log(tmp_path / "unsharded"), range(3, 5))
    assert_same_state(load_checkpoint(runs / "one"), load_checkpoint(tmp_path / "unsharded"))
    # two DDP processes -> one process, sharded, its shards in CPU memory (the single-GPU setting)
    offloaded = train(tmp_path / "offload", 1, "--shard=true", "--offload=true",
                      f"--resume={runs / 'ddp' / 'ckpt_0000002.pt'}")
    assert "sharded and offloaded" in offloaded.stdout
    assert_same_losses(one, log(tmp_path / "offload"), range(3, 5))
    assert_same_state(load_checkpoint(runs / "one"), load_checkpoint(tmp_path / "offload"))


def test_a_sharded_checkpoint_samples(runs, tmp_path):
    ckpt = load_checkpoint(runs / "shard")
    model, _, step = load_model(runs / "shard", "cpu")
    weights = model.state_dict()
    assert step == 4 and all(torch.equal(v, weights[k]) for k, v in ckpt["ema"].items())  # the EMA, gathered whole
    image = tmp_path / "img.png"
    iio.imwrite(image, np.full((16, 16, 3), 120, np.uint8))
    sample_main([str(image), "the red circle moves up", f"--ckpt={runs / 'shard'}", "--steps=2",
                f"--out={tmp_path / 'clip'}"])
    assert (tmp_path / "clip.mp4").is_file()


def test_a_sharded_run_killed_at_a_random_moment_resumes_exactly(runs, tmp_path):
    """SIGKILL of every process at once (a node lost) at a random moment after step 3 was logged (in step 4, in the
    checkpoint after it, or at the end), then --resume on two sharded processes: the same losses, weights, EMA and
    AdamW state as the uninterrupted sharded run, bit for bit."""
    def start():
        return subprocess.Popen([*command(2), *ARGS, "--shard=true", "--resume", f"--out_dir={tmp_path}"], cwd=ROOT,
                                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    process = start()
    deadline = time.time() + 180
    logged = tmp_path / "log.jsonl"
    while not (logged.exists() and '"step": 3,' in logged.read_text()):  # text, not JSON: a line may be half-written
        assert process.poll() is None and time.time() < deadline, process.stderr.read()[-2000:]
        time.sleep(0.05)
    time.sleep(random.Random(0).uniform(0.0, 0.3))
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert load_checkpoint(tmp_path)["step"] >= 2  # the pointer names a complete checkpoint
    final = start()
    out, err = final.communicate(timeout=300)
    assert final.returncode == 0, err[-2000:]
    assert "resumed from" in out
    reference, resumed = log(runs / "shard"), log(tmp_path)
    assert sorted(resumed) == list(range(1, 5))
    for step in reference:
        assert all(reference[step][key] == resumed[step][key] for key in TERMS), step
    assert_same_state(load_checkpoint(runs / "shard"), load_checkpoint(tmp_path), exact=True)
