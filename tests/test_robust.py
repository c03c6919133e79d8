"""Crashes, preemption, NaNs and untrusted checkpoints: nothing beyond one checkpoint interval is lost."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sample
import train
from conftest import free_port, user_error
from model import CHECKPOINT_KIND, load_checkpoint
from sample import load_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
# 2 clips a step as 2 micro-batches of 1 (accumulation); one a rank under torchrun
TINY = ["--preset=shapes", "--height=16", "--width=16", "--frames=4", "--batch_size=2", "--micro_batch=1",
        "--log_every=1", "--warmup_steps=2", "--device=cpu"]


def start(args, **popen):
    return subprocess.Popen([sys.executable, "train.py", *TINY, *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def last_losses(out_dir):
    """step -> the last logged record of that step (a resumed run logs re-done steps again)."""
    records = {}
    for line in (Path(out_dir) / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return records


def wait_for_step(out_dir, step, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        log = Path(out_dir) / "log.jsonl"
        if log.exists() and any(json.loads(l)["step"] >= step for l in log.read_text().splitlines()):
            return
        assert process.poll() is None, process.stderr.read()[-2000:]
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached")


def test_sigkill_at_random_moments_loses_nothing(tmp_path):
    steps = ["--steps=10", "--ckpt_every=2", "--keep_checkpoints=2"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference in this process, on the killed runs' one thread (ENV): the same sums
    try:
        train.train(train.load_config(TINY + steps + [f"--out_dir={tmp_path / 'ref'}"]))
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "killed"
    rng = random.Random(0)
    # one kill during start-up, then kills a random moment after steps 3 and 7 were logged: in steps and saves
    for target in (None, 3, 7):
        process = start(steps + [f"--out_dir={out}", "--resume"])
        if target is None:
            time.sleep(1.0)
        else:
            wait_for_step(out, target, process)
            time.sleep(rng.uniform(0.0, 0.3))
        process.send_signal(signal.SIGKILL)
        process.wait()
        if (out / "latest").exists():  # whatever the moment, the pointer names a complete checkpoint
            assert load_checkpoint(out)["step"] >= 1
    final = start(steps + [f"--out_dir={out}", "--resume"])
    assert final.wait(timeout=300) == 0, final.stderr.read()[-2000:]
    ref, got = last_losses(tmp_path / "ref"), last_losses(out)
    assert sorted(got) == list(range(1, 11))
    for step in ref:
        assert ref[step]["loss"] == got[step]["loss"], step
    a, b = load_checkpoint(tmp_path / "ref"), load_checkpoint(out)
    assert a["step"] == b["step"] == 10
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert len(list(out.glob("ckpt_*.pt"))) == 2  # keep_checkpoints


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_saves_and_exits_cleanly(tmp_path, workers):
    """To the process alone, or, as a scheduler sends it, to its whole process group with its loader workers."""
    process = start(["--steps=1000", "--ckpt_every=500", f"--out_dir={tmp_path}", f"--workers={workers}"],
                    start_new_session=True)
    wait_for_step(tmp_path, 3, process)
    if workers:
        os.killpg(process.pid, signal.SIGTERM)  # the run's own group: start_new_session made it its leader
    else:
        process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0, process.stderr.read()[-2000:]
    saved = load_checkpoint(tmp_path)["step"]
    assert saved >= 3 and saved == max(last_losses(tmp_path))  # nothing trained was lost
    assert "continue with --resume" in process.stdout.read()


def test_sigusr1_to_one_rank_stops_all_ranks(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                f"--master_port={free_port()}",
                                "train.py", *TINY, "--steps=1000", "--ckpt_every=500",
                                f"--out_dir={tmp_path}"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path, 2, process)
    workers = subprocess.run(["pgrep", "-f", f"out_dir={tmp_path}"], capture_output=True, text=True).stdout.split()
    ranks = [int(p) for p in workers if int(p) != process.pid]
    assert len(ranks) >= 2
    os.kill(ranks[-1], signal.SIGUSR1)
    assert process.wait(timeout=120) == 0, process.stderr.read()[-2000:]
    assert load_checkpoint(tmp_path)["step"] >= 2


def test_rank_0_decides_the_resume_step_and_a_rank_without_its_file_stops_in_one_line(tmp_path):
    """Nodes without a shared file system, here a working folder per rank: rank 1 lacks rank 0's checkpoint, and
    every rank stops with one line that names it, rather than training from another step."""
    for node in ("node0", "node1"):
        (tmp_path / node).mkdir()
    train.train(train.load_config(TINY + ["--steps=2", f"--out_dir={tmp_path / 'node0' / 'run'}"]))
    script = tmp_path / "node.py"
    script.write_text("import os, sys\nimport train\nos.chdir(sys.argv[1 + int(os.environ['RANK'])])\n"
                      "train.main(sys.argv[3:])\n")
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                f"--master_port={free_port()}", str(script), str(tmp_path / "node0"),
                                str(tmp_path / "node1"), *TINY, "--steps=4", "--out_dir=run", "--resume"],
                               cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"the ranks did not stop: {process.communicate()[1][-2000:]}") from None
    assert process.returncode != 0
    expected = "error: rank 1 cannot resume at rank 0's step 2: checkpoint run/ckpt_0000002.pt does not exist"
    assert expected in err, err[-3000:]
    assert not (tmp_path / "node1" / "run").exists() and load_checkpoint(tmp_path / "node0" / "run")["step"] == 2


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    real = train.motif_loss
    calls = []

    def flaky(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) in (3, 4):  # step 2's two micro-steps: a NaN loss
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(train, "motif_loss", flaky)
    model = train.train(train.load_config(TINY + ["--steps=4", f"--out_dir={tmp_path / 'a'}"]))
    log = last_losses(tmp_path / "a")
    assert log[1]["skipped_steps"] == 0 and log[2]["skipped_steps"] == 1 and log[4]["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())

    monkeypatch.setattr(train, "motif_loss", lambda *a, **k: {**real(*a, **k), "loss": torch.tensor(float("inf"), requires_grad=True)})
    with pytest.raises(train.TrainingStopped, match="3 steps in a row"):
        train.train(train.load_config(TINY + ["--steps=10", "--max_bad_steps=3", f"--out_dir={tmp_path / 'b'}"]))
    assert not (tmp_path / "b" / "latest").exists()  # nothing broken was saved


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create a file when unpickled


def test_a_checkpoint_carrying_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"kind": CHECKPOINT_KIND, "model": Payload(str(marker))}, evil)
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(evil)
    assert "cannot read" in user_error(sample.main, [str(evil), "x", f"--ckpt={evil}"])
    assert "cannot read" in user_error(train.main, [*TINY, f"--init={evil}", f"--out_dir={tmp_path / 'run'}"])
    assert not marker.exists()
    truncated = tmp_path / "half.pt"
    good = tmp_path / "good.pt"
    torch.save({"kind": CHECKPOINT_KIND, "x": torch.zeros(1000)}, good)
    truncated.write_bytes(good.read_bytes()[:500])
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(truncated)


def test_a_checkpoint_whose_config_does_not_describe_its_model_is_a_clear_error(tmp_path):
    """Another version's config (keys missing, keys extra) or another model's weights: a ValueError, one line."""
    out = tmp_path / "run"
    train.train(train.load_config(TINY + ["--steps=1", f"--out_dir={out}"]))
    ckpt = load_checkpoint(out)
    model, config, step = load_model(out, "cpu")
    assert step == 1 and config["frames"] == 4
    extra = {**ckpt, "config": {**ckpt["config"], "a_key_of_a_later_version": 3}}
    missing = {**ckpt, "config": {k: v for k, v in ckpt["config"].items() if k != "frames"}}
    other = {**ckpt, "config": {**ckpt["config"], "pixel_patch": 4}}
    torch.save(extra, tmp_path / "extra.pt")
    assert load_model(tmp_path / "extra.pt", "cpu")[2] == 1  # keys it does not know are not the model's
    for name, changed, message in (("missing", missing, r"lacks \['frames'\]"), ("other", other, "do not fit")):
        torch.save(changed, tmp_path / f"{name}.pt")
        with pytest.raises(ValueError, match=message) as error:
            load_model(tmp_path / f"{name}.pt", "cpu")
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_checkpoints_on_disk_never_exceed_keep_plus_the_newest(tmp_path, monkeypatch, keep):
    """The oldest checkpoints are deleted before a new one is written (a vc2 checkpoint is about 24 GB), yet the
    newest stays until the new one is in."""
    on_disk = []
    save = torch.save

    def counting_save(obj, f):
        on_disk.append(sorted(p.name for p in tmp_path.glob("ckpt_*.pt")))
        save(obj, f)
    monkeypatch.setattr(train.torch, "save", counting_save)
    for step in range(1, 6):
        train.save_checkpoint(tmp_path, {"step": step}, keep)
    assert all(len(names) <= max(keep - 1, 1) for names in on_disk)  # + the one being written: at most max(keep, 2)
    assert all(names[-1] == f"ckpt_{step:07d}.pt" for step, names in enumerate(on_disk[1:], 1))  # the newest kept
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == [f"ckpt_{s:07d}.pt" for s in range(6 - keep, 6)]
    assert (tmp_path / "latest").read_text().strip() == "ckpt_0000005.pt"
