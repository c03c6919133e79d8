"""tools/ablation.py: its statistics on hand-made numbers, and a tiny study that trains, scores and resumes."""
import json
import math

import numpy as np
import pytest

from tools import ablation

pytestmark = pytest.mark.slow


def tallies(per_image):
    """Merged tallies with one key: {image: {"direction_accuracy": [right, asked]}}."""
    return {str(i): {"direction_accuracy": [float(r), n]} for i, (r, n) in enumerate(per_image)}


def test_t_interval_by_hand():
    mean, half = ablation.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert ablation.t_interval([0.5]) == (0.5, 0.0)


def test_paired_difference_by_hand():
    rng = np.random.default_rng(0)
    right = [tallies([(4, 4), (2, 2), (3, 3)])] * 3
    wrong = [tallies([(0, 4), (0, 2), (0, 3)])] * 3
    always = ablation.paired_difference(right, wrong, "direction_accuracy", rng)
    assert always == {"mean": 1.0, "low": 1.0, "high": 1.0, "wins": 3, "seeds": 3, "resolved": True}
    same = ablation.paired_difference(right, right, "direction_accuracy", rng)
    assert same["mean"] == 0 and same["low"] == same["high"] == 0 and same["wins"] == 0 and not same["resolved"]
    # seed 0: 3/4 against 1/4 (+0.5); seed 1: 1/4 against 3/4 (-0.5): no resolved difference, one win
    a = [tallies([(3, 4)]), tallies([(1, 4)])]
    b = [tallies([(1, 4)]), tallies([(3, 4)])]
    mixed = ablation.paired_difference(a, b, "direction_accuracy", rng)
    assert mixed["mean"] == 0 and mixed["wins"] == 1 and mixed["low"] < 0 < mixed["high"] and not mixed["resolved"]
    # images are resampled inside a seed: image 0 always better, image 1 always worse -> an interval around +0.25
    a = [tallies([(2, 2), (0, 2)])] * 2
    b = [tallies([(0, 2), (1, 2)])] * 2
    split = ablation.paired_difference(a, b, "direction_accuracy", rng)
    assert split["mean"] == pytest.approx(0.25) and split["low"] < 0.25 < split["high"]
    # a lower static-video rate is the better one
    static = [{"0": {"static_video_rate": [0.0, 2]}}] * 2
    moving = [{"0": {"static_video_rate": [2.0, 2]}}] * 2
    assert ablation.paired_difference(static, moving, "static_video_rate", rng)["wins"] == 2


def test_studies_share_runs_and_pair_seeds():
    plan = ablation.studies(5)
    runs = {run for spec in plan.values() for arm in spec["arms"].values() for run in arm}
    assert len(runs) == 15 + 3 * 3 + 3 * 3  # the lambda study's 0 and 1 are the losses study's runs
    for spec in plan.values():
        seeds = [[run.seed for run in arm] for arm in spec["arms"].values()]
        assert all(s == seeds[0] for s in seeds) and len(seeds[0]) >= 3
    assert {run.shape_scale for run in plan["paper regime"]["arms"]["MotiF"]} == {ablation.PAPER_SCALE}


TINY = ["--studies", "losses", "--seeds", "2", "--images", "1", "--ddim-steps", "2", "--batch", "8", "--threads", "1",
        "--set", "steps=2", "--set", "height=16", "--set", "width=16", "--set", "batch_size=2",
        "--set", "micro_batch=2", "--set", "warmup_steps=1"]


def test_a_tiny_study_trains_scores_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(ablation, "SHARE_CLIPS", 4)
    out = tmp_path / "study"
    ablation.main(["--out", str(out), *TINY])
    results = json.loads((out / "results.json").read_text())
    losses = results["studies"]["losses"]
    assert losses["last_step"] == 2 and set(losses["arms"]) == {"MotiF", "no MotiF", "Inv-MotiF"}
    assert set(losses["arms"]["MotiF"]) == {"1", "2"} and losses["arms"]["MotiF"]["2"]["seeds"] == 2
    assert set(losses["differences"]) == {"MotiF - no MotiF", "MotiF - Inv-MotiF"}
    assert (out / "results.md").read_text().count("| MotiF |") == 1 and (out / "curves.png").stat().st_size > 10_000
    scored = json.loads((out / "evals" / "lambda1_motif_scale1_seed0" / "step_0000002.json").read_text())
    assert len(scored["tallies"]) == len(ablation.SAMPLE_SEEDS) and "moving_loss_share" in scored["loss_shares"]

    # a run killed after its first checkpoint: its last checkpoint and score are gone; the rerun resumes it exactly
    run = out / "runs" / "lambda0_motif_scale1_seed1"
    (run / "ckpt_0000002.pt").unlink()
    (run / "latest").write_text("ckpt_0000001.pt")
    (out / "evals" / run.name / "step_0000002.json").unlink()
    kept = {p: p.stat().st_mtime_ns for p in (out / "evals").rglob("*.json")}
    ablation.main(["--out", str(out), *TINY])
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # nothing done twice
    assert json.loads((out / "results.json").read_text())["studies"] == results["studies"]


@pytest.mark.parametrize("argv, message", [
    (["--studies", "nope"], "unknown studies"),
    (["--set", "steps"], "KEY=VALUE"),
    (["--set", "stepz=3"], "unknown config key"),
    (["--seeds", "1"], "at least 2"),
])
def test_bad_arguments_are_one_line_errors(argv, message, tmp_path):
    with pytest.raises(SystemExit) as stop:  # fail(): "error: ..." on stderr, exit status 1
        ablation.main(["--out", str(tmp_path), *argv])
    assert str(stop.value.code).startswith("error: ") and message in str(stop.value.code)
