"""tools/ablation.py: its statistics on hand-made numbers, and a tiny study that trains, scores and resumes."""
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import fcntl
import numpy as np
import pytest

import train
from tools import ablation

pytestmark = pytest.mark.slow


def test_t_interval_by_hand():
    mean, half = ablation.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert ablation.t_interval([0.5])[0] == 0.5 and math.isnan(ablation.t_interval([0.5])[1])


def test_crossing_and_area_by_hand():
    assert ablation.crossing([100, 200, 300], [0.2, 0.6, 1.0]) == (pytest.approx(250), False)  # 0.6 -> 1.0 halfway
    assert ablation.crossing([100, 200], [0.9, 1.0]) == (pytest.approx(100 * 0.8 / 0.9), False)  # from 0 at step 0
    assert ablation.crossing([100, 200], [0.5, 0.7]) == (200, True)  # never: censored at the last step
    assert ablation.area([100, 200, 300], [0.0, 1.0, 1.0]) == 0.75
    assert ablation.area([100], [0.4]) == 0.4


def measures(**values):
    return {"measures": {name: values.get(name, 0.0) for name, _ in ablation.MEASURES}}


def test_compare_pairs_seeds_and_gives_verdicts():
    steps = ablation.STEPS_TO  # lower is better
    fast = {k: measures(**{steps: 200 + k, "shape PSNR": 20 + k}) for k in range(5)}
    slow = {k: measures(**{steps: 300 + k, "shape PSNR": 20 + k + (0.5 if k % 2 else -0.5)}) for k in range(5)}
    result = ablation.compare(fast, slow)
    assert result[steps]["mean"] == -100 and result[steps]["half_width"] == 0 and result[steps]["wins"] == 5
    assert result[steps]["verdict"] == "better" and ablation.compare(slow, fast)[steps]["verdict"] == "worse"
    psnr = result["shape PSNR"]  # differences +0.5, -0.5, +0.5, -0.5, +0.5 (first better in seeds 0, 2, 4)
    assert psnr["mean"] == pytest.approx(0.1) and psnr["wins"] == 3 and psnr["verdict"] == "not resolved"
    assert psnr["half_width"] == pytest.approx(2.776 * np.std([0.5, -0.5, 0.5, -0.5, 0.5], ddof=1) / math.sqrt(5))
    del slow[4]  # only the seeds both arms have are paired
    assert ablation.compare(fast, slow)[steps]["seeds"] == 4


def test_difference_of_differences_by_hand():
    """MotiF's advantage over no MotiF in one study against another, seed by seed."""
    def runs(motif, plain):
        return {"MotiF": {str(k): {"measures": {n: motif[k] for n, _ in ablation.MEASURES}} for k in range(3)},
                "no MotiF": {str(k): {"measures": {n: plain[k] for n, _ in ablation.MEASURES}} for k in range(3)}}
    summary = {"studies": {"small": {"runs": runs([5, 6, 7], [1, 1, 1])},  # differences 4, 5, 6
                           "large": {"runs": runs([2, 2, 3], [1, 1, 1])}}}  # differences 1, 1, 2
    result = ablation.difference_of_differences(summary, "small", "large")["shape PSNR"]  # 3, 4, 4: higher is better
    assert result["mean"] == pytest.approx(11 / 3) and result["seeds"] == 3 and result["verdict"] == "better"
    assert result["half_width"] == pytest.approx(4.303 * np.std([3, 4, 4], ddof=1) / math.sqrt(3))
    steps = ablation.difference_of_differences(summary, "small", "large")[ablation.STEPS_TO]
    assert steps["verdict"] == "worse"  # lower is better for steps: a larger difference there is a smaller advantage


def test_studies_share_runs_and_pair_seeds():
    plan = ablation.studies(5)
    runs = {run for spec in plan.values() for arm in spec["arms"].values() for run in arm}
    assert len(runs) == 15 + 3 * 5 + 15  # the lambda study's 0 and 1 are the losses study's runs
    for spec in plan.values():
        seeds = [[run.seed for run in arm] for arm in spec["arms"].values()]
        assert all(s == list(range(5)) for s in seeds)
    assert {run.shape_scale for run in plan["paper regime"]["arms"]["MotiF"]} == {ablation.PAPER_SCALE}


SETTINGS = {"overrides": [], "steps": 500, "every": 100}


def test_a_run_is_the_presets_first_steps(tmp_path):
    run = ablation.Run(1.0, "motif", 1.0, 0)
    short, preset = ablation.run_config(run, tmp_path, SETTINGS), train.load_config(["--preset", "shapes"])
    assert short.steps == 500 and short.ckpt_every == 100 and short.keep_checkpoints >= 5
    assert [train.learning_rate(short, s) for s in range(500)] == [train.learning_rate(preset, s) for s in range(500)]
    assert {k: v for k, v in vars(short).items() if k not in ("steps", "cooldown_steps", "ckpt_every", "out_dir",
                                                               "keep_checkpoints", "sample_every", "resume")} == \
        {k: v for k, v in vars(preset).items() if k not in ("steps", "cooldown_steps", "ckpt_every", "out_dir",
                                                            "keep_checkpoints", "sample_every", "resume")}
    with pytest.raises(ValueError, match="cool-down"):
        ablation.run_config(run, tmp_path, {**SETTINGS, "steps": 1200})


TINY = ["--studies", "losses", "--seeds", "2", "--images", "1", "--ddim-steps", "2", "--threads", "1",
        "--steps", "2", "--every", "1", "--set", "height=16", "--set", "width=16", "--set", "batch_size=2",
        "--set", "micro_batch=2", "--set", "warmup_steps=1"]


def test_a_tiny_study_lands_run_files_resumes_and_reports_from_them_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(ablation, "SHARE_CLIPS", 4)
    monkeypatch.setattr(ablation, "SENSITIVITY_IMAGES", 2)
    monkeypatch.setattr(ablation, "FULL_SCORER", {"images": 2, "ddim_steps": 3})
    results, out = tmp_path / "results", tmp_path / "work"
    args = ["--results", str(results), "--out", str(out), *TINY]
    landed = lambda: sorted(p.stem for p in (results / "runs").glob("*.json"))  # noqa: E731
    ablation.main([*args, "--max-runs", "2"])  # seed 0 of the first two arms, then a clean stop
    assert landed() == ["lambda0_motif_scale1_seed0", "lambda1_motif_scale1_seed0"]
    record = json.loads((results / "runs" / "lambda1_motif_scale1_seed0.json").read_text())
    assert record["settings"]["steps"] == 2 and record["config"]["motif_lambda"] == 1.0 and record["commit"]
    assert [s["step"] for s in record["scores"]] == [1, 2] and record["seconds"] >= 0
    assert record["scores"][1]["moving_error"] > 0 and record["scores"][1]["text_sensitivity"] > 0
    ablation.main([*args, "--max-minutes", "0"])  # starts no run
    assert len(landed()) == 2
    ablation.main([*args, "--agreement=2"])  # the rest, and seed 0 of each arm at step 2 by the full scorer
    assert len(landed()) == 6 and len(list((results / "agreement").glob("*.json"))) == 3
    summary = json.loads((results / "results.json").read_text())
    losses = summary["studies"]["losses"]
    assert set(losses["arms"]) == {"MotiF", "no MotiF", "Inv-MotiF"} and losses["arms"]["MotiF"]["seeds"] == 2
    assert losses["arms"]["MotiF"]["steps"] == [1, 2] and len(losses["arms"]["MotiF"]["curves"]["moving_error"]) == 2
    assert set(losses["differences"]) == {"MotiF - no MotiF", "MotiF - Inv-MotiF"}
    assert losses["differences"]["MotiF - no MotiF"]["shape PSNR"]["seeds"] == 2
    assert [(row["arm"], row["step"]) for row in summary["agreement"]] == [(arm, 2) for arm in ("MotiF", "no MotiF",
                                                                                               "Inv-MotiF")]
    report = (results / "results.md").read_text()
    assert report.count("| MotiF |") == 1 + 1 + 1 and report.count("| MotiF - no MotiF |") == 1  # + shares, agreement
    assert (results / "curves.png").stat().st_size > 10_000
    shares = losses["loss_shares"]["MotiF"]  # per t at the last step: the paper's first finding
    assert shares["seeds"] == 2 and len(shares["share"]) == len(shares["timesteps"]) == 10
    assert all(0 < mean < 1 for mean, _ in shares["share"]) and 0 < shares["moving_area"] < 1
    assert "Share of the squared v-error inside the moving regions, per t" in report

    # a run file from before the shares were kept: --shares adds them from its last checkpoint, the same numbers
    path = results / "runs" / "lambda1_motif_scale1_seed1.json"
    record = json.loads(path.read_text())
    kept_shares = {k: record["scores"][-1].pop(k) for k in ("share_timesteps", "moving_loss_share", "moving_area_share")}
    path.write_text(json.dumps(record))
    ablation.main([*args, "--shares"])
    assert {k: json.loads(path.read_text())["scores"][-1][k] for k in kept_shares} == \
        {k: pytest.approx(v) for k, v in kept_shares.items()}  # per key: pytest 9.2 refuses approx of a dict of lists
    summary = json.loads((results / "results.json").read_text())

    # a run killed after its first checkpoint: no run file, its last checkpoint and score gone; the rerun resumes it
    # exactly and does nothing else again
    run = out / "runs" / "lambda0_motif_scale1_seed1"
    (results / "runs" / f"{run.name}.json").unlink()
    (run / "ckpt_0000002.pt").unlink()
    (run / "latest").write_text("ckpt_0000001.pt")
    (out / "evals" / run.name / "step_0000002.json").unlink()
    kept = {p: p.stat().st_mtime_ns for p in [*(out / "evals").rglob("*.json"), *(results / "runs").glob("*.json")]}
    ablation.main([*args, "--agreement"])  # and the full scorer on every checkpoint of seed 0 now
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # nothing done twice
    resumed = json.loads((results / "results.json").read_text())
    assert resumed["studies"] == summary["studies"]
    assert [(row["arm"], row["step"]) for row in resumed["agreement"]] == [
        (arm, s) for arm in ("MotiF", "no MotiF", "Inv-MotiF") for s in (1, 2)]

    # the work folder gone: the committed files alone give the same tables, and nothing is run again; the study's
    # page beside the results folder gets its tables between the markers
    shutil.rmtree(out)
    (results / "results.json").unlink()
    page = tmp_path / "results.md"
    page.write_text(f"# study\n{ablation.RESULTS_START}\nold\n{ablation.RESULTS_END}\nwhat it says\n")
    ablation.main(["--results", str(results), "--studies", "losses", "--seeds", "2", "--report"])
    assert json.loads((results / "results.json").read_text())["studies"] == summary["studies"]
    assert page.read_text() == (f"# study\n{ablation.RESULTS_START}\n{(results / 'results.md').read_text()}\n"
                                f"{ablation.RESULTS_END}\nwhat it says\n")
    ablation.main(args)
    assert not out.joinpath("runs").exists()

    with pytest.raises(SystemExit, match="other settings"):  # the same folder with another scorer: refused
        ablation.main([*args, "--images", "2"])


@pytest.mark.parametrize("argv, message", [
    (["--studies", "nope"], "unknown studies"),
    (["--set", "steps"], "KEY=VALUE"),
    (["--set", "stepz=3"], "unknown config key"),
    (["--seeds", "1"], "at least 2"),
    (["--steps", "250"], "multiple of --every"),
    (["--steps", "1200"], "cool-down"),
    (["--agreement", "x"], "--agreement takes steps"),
    (["--score-at", "100,x"], "--score-at takes steps"),
    (["--score-at", "100,250,500"], "multiples of --every"),
])
def test_bad_arguments_are_one_line_errors(argv, message, tmp_path):
    with pytest.raises(SystemExit) as stop:  # fail(): "error: ..." on stderr, exit status 1
        ablation.main(["--out", str(tmp_path), "--results", str(tmp_path), *argv])
    assert str(stop.value.code).startswith("error: ") and message in str(stop.value.code)


def test_a_run_another_command_is_training_is_left_to_it(tmp_path, capsys):
    run, work = ablation.Run(1.0, "motif", 1.0, 0), tmp_path / "work"
    settings = {**SETTINGS, "images": 1, "ddim_steps": 1, "threads": 1, "device": "cpu", "results": str(tmp_path)}
    (work / "runs").mkdir(parents=True)
    with open(work / "runs" / f".{run.name}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as the other command's process holds it
        ablation.train_and_evaluate(run, work, settings)
    assert "another command is training it" in capsys.readouterr().out
    assert not (work / "runs" / run.name).exists() and not ablation.run_file(tmp_path, run).exists()


def test_a_whole_run_study_keeps_the_cooldown_scores_the_named_steps_and_the_last_with_the_full_scorer(tmp_path,
                                                                                                        monkeypatch):
    monkeypatch.setattr(ablation, "SHARE_CLIPS", 4)
    monkeypatch.setattr(ablation, "SENSITIVITY_IMAGES", 2)
    monkeypatch.setattr(ablation, "FULL_SCORER", {"images": 2, "ddim_steps": 2})
    at = TINY.index("--steps")
    whole = ["--steps", "2", "--every", "1", "--score-at", "2", "--final", "--set", "steps=2",
             "--set", "cooldown_steps=1", *TINY[:at], *TINY[at + 4:]]   # TINY without its --steps 2 --every 1
    results = tmp_path / "results"
    ablation.main(["--results", str(results), "--out", str(tmp_path / "work"), *whole])
    record = json.loads((results / "runs" / "lambda1_motif_scale1_seed0.json").read_text())
    assert record["config"]["steps"] == 2 and record["config"]["cooldown_steps"] == 1   # the preset's own cool-down
    assert [s["step"] for s in record["scores"]] == [2]  # the named step alone, not every --every
    assert record["final"]["scorer"] == {"images": 2, "ddim_steps": 2} and record["final"]["step"] == 2
    assert 0 <= record["final"]["figures"]["direction_accuracy"] <= 1
    final = json.loads((results / "results.json").read_text())["studies"]["losses"]["final"]
    assert final["arms"]["MotiF"]["seeds"] == 2
    assert final["differences"]["MotiF - no MotiF"]["ghost"]["seeds"] == 2
    assert "At step 2, the full scorer" in (results / "results.md").read_text()
    with pytest.raises(SystemExit, match="--score-at"):
        ablation.main(["--results", str(tmp_path / "other"), "--out", str(tmp_path / "w2"), *whole[:5], "1",
                       *whole[6:]])


ORPHAN = """
import os, signal, sys, time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
sys.path.insert(0, sys.argv[2])
from tools.ablation import in_worker, stop_with_parent

def scoring(run, out, settings):  # a worker that has trained a run: train.py's SIGTERM handler is still in place
    signal.signal(signal.SIGTERM, lambda number, frame: None)
    open(out, "w").write(str(os.getpid()))
    time.sleep(3)

if __name__ == "__main__":
    workers = ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=stop_with_parent)
    workers.submit(in_worker, scoring, None, sys.argv[1], None)
    while not (os.path.exists(sys.argv[1]) and os.path.getsize(sys.argv[1])):
        time.sleep(0.05)
    os._exit(0)  # the command dies while its worker scores
"""


def test_a_worker_whose_command_died_while_it_scored_leaves_when_done(tmp_path):
    """--jobs workers outlive a killed command only to finish the run they are on, then leave (not wait for work)."""
    script, pid_file = tmp_path / "orphan.py", tmp_path / "worker.pid"
    script.write_text(ORPHAN)
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, str(script), str(pid_file), str(root)], timeout=120, check=True)
    pid = int(pid_file.read_text())
    deadline = time.time() + 30
    while time.time() < deadline and Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text():
        time.sleep(0.2)
    alive = Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
    if alive:
        os.kill(pid, 9)
    assert not alive, "the orphaned worker stayed after its run"
