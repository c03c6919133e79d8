"""The paper's ablation, built to tell the losses apart: does the motion focal loss make the text count, and how
soon? A tool (run from the repository's root); nothing in the method imports it.

    python -m tools.ablation --studies losses --jobs 2 --threads 1 --max-minutes 20   # a chunk; rerun to go on
    python -m tools.ablation --report                           # tables and curves from docs/ablation/runs/ alone
    python -m tools.ablation --studies losses --agreement 300   # the cheap scorer against the full one, at step 300
    python -m tools.ablation --results out/quick --out out/quick-work --seeds 2 --set height=16   # a smaller one

The demo reaches direction accuracy 1.000 by step 500 with any loss, so a study that scored the end of training
would say nothing. Each run here is the first --steps (500) steps of `train.py --preset shapes`, exactly (same
lr schedule: the preset's cool-down starts later), with a checkpoint every --every (100) steps, and each
checkpoint is scored while the losses still differ:
- ShapesBench (eval.tally) on the first --images (32) held-out first frames, every prompt, DDIM --ddim-steps (5)
  at the run's guidance scale, sampling seed 0: direction, text-contrast, still accuracy, integrity, shape PSNR;
- the mean squared v-error in moving and in static regions (eval.loss_shares, SHARE_CLIPS clips), and the
  text sensitivity of v_hat from pure noise (eval.text_sensitivity), which keep changing after the accuracies
  saturate.
Per run that gives the learning curves, and from them STEPS_TO (steps until direction accuracy reaches 0.8,
interpolated between checkpoints), the text-contrast AUC (its mean over the scored steps), and the last
checkpoint's shape PSNR, errors and sensitivity (MEASURES).

Three studies, every arm with --seeds (5) seeds; seed k of every arm sees the same clips, initial weights,
timesteps and noise (train.py draws them from the seed and the sample index), and every checkpoint is scored on
the same pairs with the same sampling noise, so differences between arms are paired:
- losses: MotiF (lambda = 1), no MotiF (lambda = 0), Inv-MotiF;
- lambda: lambda = 0, 0.5, 1, 2, 4 (its 0 and 1 are the losses study's runs), each against 0 and against the
  paper's 1;
- paper regime: the three losses on shapes PAPER_SCALE as large, about 3 % of the pixels moving as the paper
  reports for real videos, where focal weighting should matter most.
Per comparison and measure: the mean of the per-seed differences, its 95 % Student-t interval and the seeds in
which the first arm does better; the verdict is "better" or "worse" when the interval excludes 0, else "not
resolved", and the half-width says how large a difference the study could have resolved.

What survives is in the repository: each finished run writes RESULTS/runs/NAME.json (default docs/ablation/:
the run, the study's settings, train.py's config, the commit, its seconds and its scores at every checkpoint),
and a run whose file is there is not run again, so a study is a chain of short commands, each run's file
committed as it lands (--max-runs N, --max-minutes M: no run starts after M minutes). The tables (RESULTS/
results.md, results.json) and the picture (curves.png) are made from those files alone (`--report`). The work
folder OUT (out/ablation) holds checkpoints (OUT/runs/NAME, resumed by train.py) and per-checkpoint scores
(OUT/evals/NAME/step_N.json), each written atomically, so a killed command loses at most the steps since a run's
last checkpoint. RESULTS/study.json and OUT/plan.json keep the settings: other settings are refused, not mixed
in. Runs go seed by seed (seed 0 of every arm first), so a study cut short is still paired. --agreement scores
seed 0's checkpoints of the losses study (all, or the steps it names) with demo/bench.py's full scorer (64 held-out
frames, 25 DDIM steps) into RESULTS/agreement/NAME.json and tabulates the cheap score against it (results.md's
last table).
"""
import argparse
import functools
import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import ctypes
import fcntl
import numpy as np
import torch
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

import train
from data import fail, write_atomically
from demo.bench import held_out, loss_shares, pool, tally, text_sensitivity
from model import autocast, pick_device, wants_bf16
from sample import load_model
from tools.shapesbench import sample_all

PAPER_SCALE = 0.65  # shapes this size: 2.95 % of the pixels move (against 5.8 % at 1), the paper's ~3 %
LAMBDAS = (0.0, 0.5, 1.0, 2.0, 4.0)
SHARE_CLIPS = 32  # held-out clips of the moving / static v-error (eval.loss_shares)
SENSITIVITY_IMAGES = 16  # held-out first frames of the text sensitivity (eval.text_sensitivity)
FULL_SCORER = {"images": 64, "ddim_steps": 25}  # demo/bench.py's defaults, for --agreement
THRESHOLD = 0.8  # direction accuracy whose first crossing STEPS_TO measures
STEPS_TO = f"steps to direction {THRESHOLD:g}"
# (name, higher is better): what is compared between arms, per run
MEASURES = ((STEPS_TO, False), ("text-contrast AUC", True), ("direction AUC", True), ("shape PSNR", True),
            ("moving error", False), ("static error", False), ("text sensitivity", True))
# (name, ShapesBench figure, higher is better): the full scorer's figures at the last step (--final)
FINAL_MEASURES = (("direction", "direction_accuracy", True), ("text-contrast", "text_contrast_accuracy", True),
                  ("still", "still_accuracy", True), ("integrity", "shape_integrity", True),
                  ("shape PSNR", "shape_psnr", True), ("ghost", "ghost", False),
                  ("first-frame PSNR", "first_frame_psnr", True))
CURVES = {"direction_accuracy": "direction", "text_contrast_accuracy": "text-contrast", "shape_psnr": "shape PSNR (dB)",
          "moving_error": "moving-region v-error", "static_error": "static-region v-error"}
RESULTS_START, RESULTS_END = "<!-- tables of tools/ablation.py: start -->", "<!-- tables of tools/ablation.py: end -->"
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086)  # Student's t quantile 0.975 for 1..20 degrees of freedom


# ----------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Run:
    motif_lambda: float
    loss_mode: str
    shape_scale: float
    seed: int

    @property
    def name(self):
        return f"lambda{self.motif_lambda:g}_{self.loss_mode}_scale{self.shape_scale:g}_seed{self.seed}"


def studies(seeds):
    """{study: {"arms": {arm: [Run per seed]}, "compare": [(arm, arm), ...]}}. Runs shared between studies have the
    same name, so they are trained once."""
    def losses(scale):
        return {"MotiF": [Run(1.0, "motif", scale, k) for k in range(seeds)],
                "no MotiF": [Run(0.0, "motif", scale, k) for k in range(seeds)],
                "Inv-MotiF": [Run(1.0, "inverse", scale, k) for k in range(seeds)]}
    return {"losses": {"arms": losses(1.0), "compare": [("MotiF", "no MotiF"), ("MotiF", "Inv-MotiF")]},
            "lambda": {"arms": {f"lambda {lam:g}": [Run(lam, "motif", 1.0, k) for k in range(seeds)]
                                for lam in LAMBDAS},
                       "compare": [(f"lambda {lam:g}", "lambda 0") for lam in LAMBDAS[1:]]  # MotiF at all
                                  + [(f"lambda {lam:g}", "lambda 1") for lam in LAMBDAS[1:] if lam != 1]},  # the paper's λ
            "paper regime": {"arms": losses(PAPER_SCALE), "compare": [("MotiF", "no MotiF"), ("MotiF", "Inv-MotiF")]}}


def run_config(run, out, settings):
    """train.py's config of a run: the first settings["steps"] steps of the shapes preset (with the study's --set
    overrides), its lr schedule kept (the cool-down only when the run is the preset's whole run), a checkpoint every
    settings["every"] steps, then the run's own keys."""
    preset = ["--preset", "shapes", *(f"--{o}" for o in settings["overrides"])]
    base = train.load_config(preset)
    steps, every = settings["steps"], settings["every"]
    whole = steps == base.steps  # the preset's whole run, its cool-down included
    if not whole and steps > base.steps - min(base.cooldown_steps, base.steps):
        raise ValueError(f"--steps {steps} reaches into the preset's cool-down (its last {base.cooldown_steps} of "
                         f"{base.steps} steps): a shorter run would not be the preset's first steps; "
                         f"--steps {base.steps} is its whole run")
    cooldown = [] if whole else ["--cooldown_steps=0"]
    return train.load_config([*preset, f"--steps={steps}", *cooldown, f"--ckpt_every={every}",
                              f"--keep_checkpoints={steps // every + 1}", "--sample_every=0", "--resume=latest",
                              f"--motif_lambda={run.motif_lambda}", f"--loss_mode={run.loss_mode}",
                              f"--shape_scale={run.shape_scale}", f"--seed={run.seed}",
                              f"--out_dir={out / 'runs' / run.name}"])


# ----------------------------------------------------------------------------- train and score one run

class Stopped(Exception):
    """A run stopped before its last step (a stop signal): the study stops too, to be resumed."""


def checkpoints(run_dir):
    """{step: path} of a run folder's checkpoints."""
    return {int(p.stem.split("_")[1]): p for p in sorted(Path(run_dir).glob("ckpt_*.pt"))}


def evaluate(path, images, ddim_steps, device="auto", errors=True):
    """One checkpoint's scores: ShapesBench's figures on the first `images` held-out frames (every prompt, DDIM
    `ddim_steps`, the run's guidance scale, sampling seed 0) and, if `errors`, the moving / static v-error per
    timestep and the text sensitivity of v_hat from pure noise."""
    device = pick_device(device)
    model, cfg, step = load_model(path, device)
    entries = held_out(cfg, images)
    with autocast(device, wants_bf16(cfg.get("dtype", "auto"), device)):  # as demo/bench.py scores it
        videos = sample_all(model, cfg, entries, ddim_steps, cfg.get("cfg_scale", 7.5), 0, len(entries))
        scores = {"step": step, "figures": pool(tally(entries, videos).values())}
        if errors:
            scores.update(share_scores(loss_shares(model, cfg, clips=SHARE_CLIPS)))
            scores["text_sensitivity"] = text_sensitivity(model, cfg, SENSITIVITY_IMAGES)["from_noise"]["direction_words"]
    return scores


def share_scores(shares):
    """What a checkpoint's scores keep of eval.loss_shares: the moving / static v-error averaged over its grid of t,
    and per t the share of the squared error inside the moving regions (the paper's first finding), with the
    share of the area that moves."""
    return {"moving_error": float(np.mean(shares["moving_error"])), "static_error": float(np.mean(shares["static_error"])),
            "share_timesteps": shares["timesteps"], "moving_loss_share": shares["moving_loss_share"],
            "moving_area_share": shares["moving_area_share"]}


def backfill_shares(run, out, settings):
    """A run file from before the per-t shares were kept: its last checkpoint (still in OUT) scored again with
    eval.loss_shares, the per-t shares added to its last scores. The recomputed mean moving error must equal the
    stored one: the checkpoint is the run's."""
    path = run_file(settings["results"], run)
    record = json.loads(path.read_text())
    last = record["scores"][-1]
    ckpt = checkpoints(run_config(run, out, settings).out_dir).get(last["step"])
    if "moving_loss_share" in last or ckpt is None:
        return
    torch.set_num_threads(settings["threads"])
    device = pick_device(settings["device"])
    model, cfg, _ = load_model(ckpt, device)
    with torch.no_grad(), autocast(device, wants_bf16(cfg.get("dtype", "auto"), device)):
        shares = share_scores(loss_shares(model, cfg, clips=SHARE_CLIPS))
    if not np.isclose(shares["moving_error"], last["moving_error"], rtol=1e-4):
        raise Stopped(f"{run.name}: {ckpt} gives moving error {shares['moving_error']:.6f}, its file "
                      f"{last['moving_error']:.6f}: not the run's checkpoint")
    last.update({k: shares[k] for k in ("share_timesteps", "moving_loss_share", "moving_area_share")})
    write_atomically(path, lambda f: f.write(json.dumps(record, indent=1).encode()))


def score_once(path, result, images, ddim_steps, device, errors=True):
    if not result.is_file():
        scores = evaluate(path, images, ddim_steps, device, errors)
        result.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(result, lambda f: f.write(json.dumps(scores).encode()))


@functools.cache
def commit():
    """The commit this process's code came from (with "+changes" when its code, config or requirements differed), for a run
    file: read once, when the process starts (main, or a --jobs worker's start), and kept, since a later commit may
    land while it trains."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    head = git("rev-parse", "--short=12", "HEAD") or "unknown"
    code = (":(top)*.py", ":(top)config", ":(top)requirements.txt")  # what a run computes with: the docs a report rewrites do not count
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no", "--", *code) else "")


def scored_steps(settings):
    """The checkpoints the cheap scorer scores: settings["score_at"], or every settings["every"] steps."""
    return settings.get("score_at") or list(range(settings["every"], settings["steps"] + 1, settings["every"]))


def run_file(results, run):
    return Path(results) / "runs" / f"{run.name}.json"


def train_and_evaluate(run, out, settings):
    """Train `run` to its last step (resuming what is there), score each of its checkpoints not yet scored, then
    write the run's file into the results folder: its settings, train.py config, commit, seconds and scores. A lock
    file lets two commands work on one study side by side, each run by one of them."""
    (out / "runs").mkdir(parents=True, exist_ok=True)
    with open(out / "runs" / f".{run.name}.lock", "w") as lock:
        try:  # another command on the same study may be on this run: leave it to that one
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{run.name}: another command is training it; skipped here")
            return
        if not run_file(settings["results"], run).is_file():  # or has finished it
            train_and_score(run, out, settings)


def train_and_score(run, out, settings):
    torch.set_num_threads(settings["threads"])
    start, code = time.time(), commit()
    cfg = run_config(run, out, settings)
    scores = out / "evals" / run.name
    wanted = scored_steps(settings)
    final = out / "final" / run.name / f"step_{cfg.steps:07d}.json"
    if not (all((scores / f"step_{s:07d}.json").is_file() for s in wanted)  # else its checkpoints may be gone
            and (final.is_file() or not settings["final"])):
        done = checkpoints(cfg.out_dir)
        if cfg.steps not in done:
            train.train(cfg)
            done = checkpoints(cfg.out_dir)
            if cfg.steps not in done:
                raise Stopped(f"{run.name} stopped at step {max(done, default=0)}")
        for step in wanted:
            score_once(done[step], scores / f"step_{step:07d}.json", settings["images"],
                       settings["ddim_steps"], settings["device"])
        if settings["final"]:
            score_once(done[cfg.steps], final, FULL_SCORER["images"], FULL_SCORER["ddim_steps"], settings["device"],
                       errors=False)
    scored = load_scores(scores)
    record = {"run": {"name": run.name, **asdict(run)}, "settings": kept_settings(settings), "commit": code,
              "seconds": round(time.time() - start), "threads": settings["threads"],
              "config": {k: v for k, v in vars(cfg).items() if k not in ("out_dir", "resume")},
              "scores": [scored[s] for s in wanted]}
    if settings["final"]:
        record["final"] = {"scorer": FULL_SCORER, **json.loads(final.read_text())}
    write_atomically(run_file(settings["results"], run), lambda f: f.write(json.dumps(record, indent=1).encode()))


def agree(run, out, settings):
    """A seed-0 run's checkpoints (those of settings["agreement"], or all) scored again with the full scorer
    (FULL_SCORER): OUT/agreement/NAME/ while it works, then RESULTS/agreement/NAME.json, added to what it holds."""
    torch.set_num_threads(settings["threads"])
    folder, path = out / "agreement" / run.name, Path(settings["results"]) / "agreement" / f"{run.name}.json"
    scored = {s["step"]: s for s in json.loads(path.read_text())["scores"]} if path.is_file() else {}
    wanted = settings["agreement"]
    todo = {step: ckpt for step, ckpt in checkpoints(run_config(run, out, settings).out_dir).items()
            if step not in scored and (wanted is None or step in wanted)}
    if not todo:
        return
    for step, ckpt in todo.items():
        score_once(ckpt, folder / f"step_{step:07d}.json", FULL_SCORER["images"], FULL_SCORER["ddim_steps"],
                   settings["device"], errors=False)
    scored.update(load_scores(folder))
    record = {"run": run.name, "scorer": FULL_SCORER, "commit": commit(), "scores": [scored[s] for s in sorted(scored)]}
    write_atomically(path, lambda f: f.write(json.dumps(record, indent=1).encode()))


# ----------------------------------------------------------------------------- statistics

def t_interval(values):
    """Mean of the values and the half-width of its 95 % Student-t interval (NaN for a single value: no interval)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    t = T_975[len(values) - 2] if len(values) - 1 <= len(T_975) else 1.96
    return float(values.mean()), float(t * values.std(ddof=1) / np.sqrt(len(values)))


def crossing(steps, values, threshold=THRESHOLD):
    """The step at which a curve first reaches `threshold`, linear between checkpoints (from 0 at step 0), and
    whether it never does (censored: then the last step, which can only understate a difference)."""
    xs, ys = [0, *steps], [0.0, *values]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if y1 >= threshold:
            return x0 + (x1 - x0) * (threshold - y0) / (y1 - y0) if y1 > y0 else x1, False
    return xs[-1], True


def area(steps, values):
    """The mean of a curve over its steps (trapezoids, from its first to its last checkpoint)."""
    if len(steps) < 2:
        return float(values[0])
    return float(np.trapezoid(values, steps) / (steps[-1] - steps[0]))


def run_measures(scored):
    """A run's {step: scores} -> its curves {key: [value per step]}, "steps", MEASURES and "censored"."""
    steps = sorted(scored)
    curve = {key: [scored[s]["figures"].get(key, np.nan) for s in steps] for key in
             ("direction_accuracy", "text_contrast_accuracy", "still_accuracy", "shape_integrity", "shape_psnr")}
    for key in ("moving_error", "static_error", "text_sensitivity"):
        curve[key] = [scored[s][key] for s in steps]
    reached, censored = crossing(steps, curve["direction_accuracy"])
    last = {key: values[-1] for key, values in curve.items()}
    return {"steps": steps, "curves": curve, "censored": censored,
            "measures": {STEPS_TO: reached, "text-contrast AUC": area(steps, curve["text_contrast_accuracy"]),
                         "direction AUC": area(steps, curve["direction_accuracy"]), "shape PSNR": last["shape_psnr"],
                         "moving error": last["moving_error"], "static error": last["static_error"],
                         "text sensitivity": last["text_sensitivity"]}}


def compare(first, second, measures=MEASURES):
    """first, second: {seed: {"measures": {name: value}}} of two arms (run_measures). Per measure (name, higher is
    better) over the seeds both have: the mean difference, its 95 % t-interval, the seeds where `first` does better,
    and the verdict."""
    seeds = sorted(set(first) & set(second))
    result = {}
    for name, higher in measures:
        diffs = [first[k]["measures"][name] - second[k]["measures"][name] for k in seeds]
        mean, half = t_interval(diffs) if diffs else (np.nan, np.nan)
        wins = sum((d > 0) if higher else (d < 0) for d in diffs)
        verdict = "not resolved"
        if len(diffs) >= 2 and abs(mean) > half:
            verdict = "better" if (mean > 0) == higher else "worse"
        result[name] = {"mean": mean, "half_width": half, "wins": int(wins), "seeds": len(seeds), "verdict": verdict}
    return result


def load_scores(folder):
    """{step: scores} of the checkpoints scored in a folder of the work folder (none if it does not exist)."""
    scored = [json.loads(p.read_text()) for p in sorted(folder.glob("step_*.json"))]
    return {s["step"]: s for s in scored}


def load_run(results, run):
    """{step: scores} of a finished run from its file in the results folder, or None if it has none."""
    path = run_file(results, run)
    return {s["step"]: s for s in json.loads(path.read_text())["scores"]} if path.is_file() else None


def load_final(results, run):
    """{"measures": {name: value}} of a finished run's full-scorer figures at its last step, or None without them."""
    path = run_file(results, run)
    final = json.loads(path.read_text()).get("final") if path.is_file() else None
    return {"measures": {name: final["figures"][key] for name, key, _ in FINAL_MEASURES}} if final else None


def summarise_final(spec, results):
    """The --final figures of a study: per arm the mean and interval of each, and the paired comparisons."""
    arms = {arm: {run.seed: final for run in runs if (final := load_final(results, run))}
            for arm, runs in spec["arms"].items()}
    measures = [(name, higher) for name, _, higher in FINAL_MEASURES]
    return {"arms": {arm: {"seeds": len(per_seed), "measures": {name: t_interval([r["measures"][name] for r in
                                                                                   per_seed.values()])
                                                                for name, _ in measures}}
                     for arm, per_seed in arms.items() if per_seed},
            "differences": {f"{a} - {b}": compare(arms[a], arms[b], measures) for a, b in spec["compare"]
                            if arms[a] and arms[b]}}


def summarise(plan, results):
    """results.json's content, from the run files in the results folder alone: per study, arm and seed the curves
    and measures of finished runs, the arms' means with intervals, and the paired comparisons."""
    summary_ = {"studies": {}}
    for study, spec in plan.items():
        arms = {arm: {run.seed: run_measures(scored) for run in runs if (scored := load_run(results, run))}
                for arm, runs in spec["arms"].items()}
        summary = {}
        for arm, per_seed in arms.items():
            if not per_seed:
                continue
            runs = list(per_seed.values())
            summary[arm] = {"seeds": len(runs), "steps": runs[0]["steps"],
                            "censored": sum(r["censored"] for r in runs),
                            "measures": {name: t_interval([r["measures"][name] for r in runs]) for name, _ in MEASURES},
                            "curves": {key: [t_interval(column) for column in np.array([r["curves"][key] for r in runs]).T]
                                       for key in runs[0]["curves"]}}
        differences = {f"{a} - {b}": compare(arms[a], arms[b]) for a, b in spec["compare"] if arms[a] and arms[b]}
        shares = {}
        for arm, runs in spec["arms"].items():  # per t, at the last checkpoint, of the runs that kept it
            last = [scored[max(scored)] for run in runs if (scored := load_run(results, run))]
            last = [s for s in last if "moving_loss_share" in s]
            if last:
                shares[arm] = {"seeds": len(last), "timesteps": last[0]["share_timesteps"],
                               "share": [t_interval(c) for c in np.array([s["moving_loss_share"] for s in last]).T],
                               "moving_area": float(np.mean([s["moving_area_share"] for s in last]))}
        final = summarise_final(spec, results)
        summary_["studies"][study] = {"arms": summary, "differences": differences, "loss_shares": shares,
                                      **({"final": final} if final["arms"] else {}),
                                      "runs": {arm: {str(k): v for k, v in per_seed.items()}
                                               for arm, per_seed in arms.items()}}
    return summary_


def difference_of_differences(summary, first, second, arms=("MotiF", "no MotiF")):
    """Is arms[0] - arms[1] larger in study `first` than in `second`? Per measure, over the seeds all four runs
    have: the paired differences' difference, its interval and verdict ("better": a larger advantage of arms[0]
    in `first`)."""
    def per_seed(study):
        runs = summary["studies"][study]["runs"]
        a, b = runs.get(arms[0], {}), runs.get(arms[1], {})
        return {k: {"measures": {name: a[k]["measures"][name] - b[k]["measures"][name] for name, _ in MEASURES}}
                for k in set(a) & set(b)}
    return compare(per_seed(first), per_seed(second))


def agreement(plan, results):
    """Rows (arm, step, cheap figures, full figures) of the checkpoints that --agreement scored again."""
    rows = []
    for arm, runs in plan["losses"]["arms"].items():
        path = Path(results) / "agreement" / f"{runs[0].name}.json"
        cheap = load_run(results, runs[0])
        if cheap and path.is_file():
            full = {s["step"]: s for s in json.loads(path.read_text())["scores"]}
            rows += [{"arm": arm, "step": s, "cheap": cheap[s]["figures"], "full": full[s]["figures"]}
                     for s in sorted(full) if s in cheap]
    return rows


# ----------------------------------------------------------------------------- reports

def fmt(value, half=None, digits=3, sign=""):
    text = f"{value:{sign}.{digits}f}"
    return text if half is None or np.isnan(half) else f"{text} ± {half:.{digits}f}"


def markdown(results, settings):
    lines = [f"Runs: the first {settings['steps']} steps of `train.py --preset shapes`"
             + (f" with {', '.join(settings['overrides'])}" if settings["overrides"] else "")
             + ", scored at steps " + ", ".join(map(str, scored_steps(settings)))
             + f" on {settings['images']} held-out frames with "
             f"{settings['ddim_steps']} DDIM steps. Mean ± 95 % t-interval over seeds.", ""]
    names = [name for name, _ in MEASURES]
    for study, summary in results["studies"].items():
        if not summary["arms"]:
            continue
        lines += [f"### {study}", "", "| arm | seeds | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
        for arm, row in summary["arms"].items():
            cells = [fmt(*row["measures"][n], digits=0 if n == STEPS_TO else 2 if n == "shape PSNR" else 3)
                     for n in names]
            if row["censored"]:
                cells[0] += f" ({row['censored']} never)"
            lines.append(f"| {arm} | {row['seeds']} | " + " | ".join(cells) + " |")
        if summary["differences"]:
            lines += ["", "| paired difference | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
            for name, keys in summary["differences"].items():
                lines.append(f"| {name} | " + " | ".join(
                    f"{fmt(d['mean'], d['half_width'], 0 if n == STEPS_TO else 3, '+')}, "
                    f"{d['wins']}/{d['seeds']}, **{d['verdict']}**" for n, d in ((n, keys[n]) for n in names)) + " |")
        final = summary.get("final")
        if final:
            names_final = [name for name, _, _ in FINAL_MEASURES]
            lines += ["", f"At step {settings['steps']}, the full scorer ({FULL_SCORER['images']} held-out frames, all "
                      f"their pairs, {FULL_SCORER['ddim_steps']} DDIM steps):", "",
                      "| arm | seeds | " + " | ".join(names_final) + " |", "|---" * (len(names_final) + 2) + "|"]
            for arm, row in final["arms"].items():
                lines.append(f"| {arm} | {row['seeds']} | " + " | ".join(
                    fmt(*row["measures"][n], digits=2 if "PSNR" in n or n == "ghost" else 3) for n in names_final) + " |")
            if final["differences"]:
                lines += ["", f"| paired difference at step {settings['steps']} | " + " | ".join(names_final) + " |",
                          "|---" * (len(names_final) + 1) + "|"]
                for name, keys in final["differences"].items():
                    lines.append(f"| {name} | " + " | ".join(
                        f"{fmt(d['mean'], d['half_width'], 2 if 'PSNR' in n or n == 'ghost' else 3, '+')}, "
                        f"{d['wins']}/{d['seeds']}, **{d['verdict']}**" for n, d in ((n, keys[n]) for n in names_final))
                        + " |")
        shares = summary.get("loss_shares", {})
        if shares:
            steps = next(iter(shares.values()))["timesteps"]
            lines += ["", f"Share of the squared v-error inside the moving regions, per t, at step {settings['steps']} "
                      "(mean ± 95 % interval over seeds; the paper's first finding: lower with MotiF)", "",
                      "| arm | seeds | moving area | " + " | ".join(f"t = {t}" for t in steps) + " |",
                      "|---" * (len(steps) + 3) + "|"]
            for arm, row in shares.items():
                lines.append(f"| {arm} | {row['seeds']} | {row['moving_area']:.3f} | "
                             + " | ".join(fmt(m, h) for m, h in row["share"]) + " |")
        lines.append("")
    if results.get("difference of differences"):
        names = [name for name, _ in MEASURES]
        lines += ["### MotiF − no MotiF at the paper's 3 % of moving pixels, against the demo's size", "",
                  "The paired difference of the two studies' paired differences (per seed); **better**: MotiF's "
                  "advantage is larger where fewer pixels move.", "",
                  "| difference of differences | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
                  "| paper regime − losses | " + " | ".join(
                      f"{fmt(d['mean'], d['half_width'], 0 if n == STEPS_TO else 3, '+')}, {d['seeds']} seeds, "
                      f"**{d['verdict']}**" for n, d in ((n, results['difference of differences'][n]) for n in names))
                  + " |", ""]
    if results.get("agreement"):
        keys = ("direction_accuracy", "text_contrast_accuracy", "shape_integrity", "shape_psnr")
        lines += [f"### the cheap scorer ({settings['images']} frames, {settings['ddim_steps']} DDIM steps) against "
                  f"the full one ({FULL_SCORER['images']} frames, {FULL_SCORER['ddim_steps']} steps), seed 0", "",
                  "| arm | step | " + " | ".join(f"{CURVES.get(k, k)} cheap / full" for k in keys) + " |",
                  "|---" * (len(keys) + 2) + "|"]
        for row in results["agreement"]:
            lines.append(f"| {row['arm']} | {row['step']} | " + " | ".join(
                f"{row['cheap'][k]:.3f} / {row['full'][k]:.3f}" for k in keys) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [s for s, summary in results["studies"].items() if summary["arms"]]
    fig, axes = plt.subplots(max(1, len(names)), len(CURVES), figsize=(3.6 * len(CURVES), 2.9 * max(1, len(names))),
                             squeeze=False)
    for row, study in enumerate(names):
        for col, (key, label) in enumerate(CURVES.items()):
            ax = axes[row][col]
            for arm, summary in results["studies"][study]["arms"].items():
                mean, half = np.array(summary["curves"][key]).T  # (steps,) each
                ax.plot(summary["steps"], mean, marker="o", markersize=3, label=f"{arm} ({summary['seeds']})")
                if summary["seeds"] >= 3:  # a 95 % band over 2 seeds (t = 12.7) would only hide the curves
                    ax.fill_between(summary["steps"], mean - half, mean + half, alpha=0.2)
            ax.set_title(f"{study}: {label}", fontsize=9)
            ax.set_xlabel("training step", fontsize=8)
            if key == "direction_accuracy":
                ax.axhline(THRESHOLD, color="grey", lw=0.5, ls="--")
            if key in ("direction_accuracy", "text_contrast_accuracy"):
                ax.set_ylim(0, 1)
        axes[row][0].legend(fontsize=7)
    fig.tight_layout()
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)


# ----------------------------------------------------------------------------- command line

def kept_settings(settings):
    """The settings every run of one results folder must share."""
    kept = {k: settings[k] for k in ("overrides", "steps", "every", "images", "ddim_steps")}
    kept.update({k: settings[k] for k in ("score_at", "final") if settings.get(k)})  # a study of 500 steps has neither
    return kept


def stop_with_parent():
    """A worker of --jobs gets SIGTERM when the command that started it dies (Linux's PR_SET_PDEATHSIG): train.py
    then saves and stops, as on any SIGTERM, and the worker exits (in_worker) instead of waiting for work that will
    not come; scoring, it finishes the run first."""
    commit()  # the code this worker has loaded
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the workers finish their runs
        pass


def in_worker(work, run, out, settings):
    """work(run, out, settings) in a worker of --jobs; a worker whose command has died leaves, instead of waiting for
    work: training, at once (train.py saves and stops); scoring after it has trained, once the run's file is written
    (train.py's SIGTERM handler is still in place, so the signal does not end it)."""
    parent = os.getppid()
    try:
        work(run, out, settings)
    except (Stopped, train.TrainingStopped):
        if os.getppid() != parent:
            os._exit(1)
        raise
    if os.getppid() != parent:
        os._exit(0)


def run_all(work, runs, out, settings, jobs, deadline):
    """work(run, out, settings) for each run, `jobs` at a time; no run starts after `deadline` (time.time()), the
    runs in progress finish. The number of runs done."""
    done = 0
    if jobs == 1:
        for run in runs:
            if time.time() >= deadline:
                break
            work(run, out, settings)
            done += 1
        return done
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=stop_with_parent) as workers:
        todo, running = list(runs), set()
        while todo or running:
            while todo and len(running) < jobs and time.time() < deadline:
                running.add(workers.submit(in_worker, work, todo.pop(0), out, settings))
            if not running:
                break
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                future.result()
                done += 1
    return done


def check_folder(folder, name, kept):
    """Refuse a folder that holds a study with other settings; else record them there."""
    path = Path(folder) / name
    if path.is_file() and json.loads(path.read_text()) != kept:
        raise ValueError(f"{folder} holds a study with other settings ({path.read_text().strip()}); "
                         "give another folder")
    write_atomically(path, lambda f: f.write(json.dumps(kept).encode()))


def main(argv=None):
    p = argparse.ArgumentParser(description="MotiF vs no MotiF vs Inv-MotiF on the shapes demo: learning curves, "
                                            "paired seeds, intervals and verdicts")
    p.add_argument("--results", default="docs/ablation", help="one small file per finished run (commit them), "
                   "and the tables and curves made from those files alone")
    p.add_argument("--out", default="out/ablation", help="work folder: the runs' checkpoints and per-step scores")
    p.add_argument("--seeds", type=int, default=5, help="paired seeds of every arm")
    p.add_argument("--studies", default="losses,lambda,paper regime", help="comma-separated: losses, lambda, paper regime")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a train.py config key for every run")
    p.add_argument("--steps", type=int, default=500, help="the preset's first STEPS steps are trained")
    p.add_argument("--every", type=int, default=100, help="a checkpoint scored every EVERY steps")
    p.add_argument("--images", type=int, default=32, help="held-out first frames of the cheap scorer")
    p.add_argument("--ddim-steps", type=int, default=5, help="DDIM steps of the cheap scorer")
    p.add_argument("--score-at", default=None, metavar="STEPS", help="score only these checkpoints (comma-separated "
                   "multiples of --every, ending at --steps), e.g. 100,200,300,500,800,1100,1400")
    p.add_argument("--final", action="store_true", help="also score every run's last checkpoint with the full scorer "
                   f"({FULL_SCORER['images']} held-out frames, all their pairs, {FULL_SCORER['ddim_steps']} DDIM steps)")
    p.add_argument("--max-runs", type=int, default=None, help="do at most N runs not yet finished, then stop")
    p.add_argument("--max-minutes", type=float, default=None, help="start no run after M minutes (the runs in "
                   "progress finish: a run takes about 15 minutes on 2 cores)")
    p.add_argument("--agreement", nargs="?", const="all", default=None, metavar="STEPS",
                   help="also score seed 0 of the losses study with the full scorer: every checkpoint, or the steps "
                   "given (comma-separated, e.g. 200,300,400)")
    p.add_argument("--shares", action="store_true", help="add the per-t moving-region loss shares to the files of "
                   "runs finished before they were kept (their last checkpoint must be in --out), then report")
    p.add_argument("--report", action="store_true", help="train and score nothing: write the tables and curves of "
                   "the run files in --results")
    p.add_argument("--jobs", type=int, default=1, help="runs trained and scored at once, each on --threads threads")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    commit()  # the code this command has loaded
    out, results = Path(args.out), Path(args.results)
    settings = {"overrides": args.set, "steps": args.steps, "every": args.every, "images": args.images,
                "ddim_steps": args.ddim_steps, "threads": args.threads, "device": args.device,
                "results": str(results), "agreement": None, "final": args.final, "score_at": None}
    if (args.report or args.shares) and (results / "study.json").is_file():  # the study's own settings
        settings.update(json.loads((results / "study.json").read_text()))
    try:
        wanted = [s.strip() for s in args.studies.split(",") if s.strip()]
        plan = studies(args.seeds)
        unknown = [s for s in wanted if s not in plan]
        if unknown or not wanted:
            raise ValueError(f"unknown studies {unknown}; choose from {', '.join(plan)}")
        if args.seeds < 2 or args.images < 1 or args.jobs < 1 or args.threads < 1 or args.ddim_steps < 1:
            raise ValueError("--seeds must be at least 2 (intervals); --images, --ddim-steps, --jobs, --threads positive")
        if (args.max_runs is not None and args.max_runs < 0) or (args.max_minutes is not None and
                                                                 not args.max_minutes >= 0):
            raise ValueError("--max-runs and --max-minutes must be 0 or more")
        if args.every < 1 or args.steps % args.every or args.steps // args.every < 2:
            raise ValueError(f"--steps ({args.steps}) must be a multiple of --every ({args.every}), at least twice it")
        if args.score_at is not None:
            try:
                settings["score_at"] = sorted({int(step) for step in args.score_at.split(",")})
            except ValueError:
                raise ValueError(f"--score-at takes steps like 100,200,500, not {args.score_at!r}") from None
            if any(s % args.every or s < 1 for s in settings["score_at"]) or settings["score_at"][-1] != args.steps:
                raise ValueError(f"--score-at's steps must be multiples of --every ({args.every}) ending at --steps "
                                 f"({args.steps})")
        if args.agreement not in (None, "all"):
            try:
                settings["agreement"] = {int(step) for step in args.agreement.split(",")}
            except ValueError:
                raise ValueError(f"--agreement takes steps like 200,300,400, not {args.agreement!r}") from None
        if any("=" not in o for o in args.set):
            raise ValueError("--set takes KEY=VALUE (a train.py config key)")
        plan = {s: plan[s] for s in wanted}
        runs = list(dict.fromkeys(run for spec in plan.values() for arm in spec["arms"].values() for run in arm))
        runs.sort(key=lambda run: run.seed)  # seed 0 of every arm first: a study cut short is still paired
        train.check_config(run_config(runs[0], out, settings), world_size=1)
        kept = kept_settings(settings)  # after --score-at is read: it is one of the settings a folder's runs share
        check_folder(results, "study.json", kept)
        if not (args.report or args.shares):
            check_folder(out, "plan.json", kept)
    except (ValueError, OSError) as e:
        fail(e)
    pending = [run for run in runs if not run_file(results, run).is_file()]
    todo = pending[:args.max_runs]
    deadline = time.time() + 60 * args.max_minutes if args.max_minutes is not None else float("inf")
    if not (args.report or args.shares):
        print(f"{len(runs)} runs of {args.steps} steps, {len(runs) - len(pending)} done ({results / 'runs'}); "
              f"{len(todo)} to do now in {out / 'runs'}, each scored at steps {','.join(map(str, scored_steps(settings)))} "
              f"on {args.images} held-out frames with {args.ddim_steps} DDIM steps"
              + (", and at its last by the full scorer" if args.final else ""))
        try:
            done = run_all(train_and_evaluate, todo, out, settings, args.jobs, deadline)
            if args.agreement and "losses" in plan:
                run_all(agree, [arm[0] for arm in plan["losses"]["arms"].values()], out, settings, args.jobs,
                        float("inf"))  # a few checkpoints, asked for by name: not cut by --max-minutes
        except (Stopped, train.TrainingStopped) as e:
            fail(f"{e}; run the same command again to resume")
        if done < len(todo):
            print(f"stopped after {done} runs (--max-minutes); {len(todo) - done} left: run it again to go on")
    if args.shares:
        try:
            run_all(backfill_shares, [run for run in runs if run_file(results, run).is_file()], out, settings, args.jobs,
                    float("inf"))
        except Stopped as e:
            fail(e)
    everything = studies(args.seeds)  # the report covers every study with run files, whichever this command ran
    summary = summarise(everything, results)
    summary["agreement"] = agreement(everything, results)
    if all(summary["studies"][s]["runs"].get(arm) for s in ("losses", "paper regime") for arm in ("MotiF", "no MotiF")):
        summary["difference of differences"] = difference_of_differences(summary, "paper regime", "losses")
    summary["settings"] = {**kept, "seeds": args.seeds}
    write_atomically(results / "results.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
    tables = markdown(summary, kept)
    write_atomically(results / "results.md", lambda f: f.write(tables.encode()))
    plot(summary, results / "curves.png")
    print(tables)
    doc = results.with_suffix(".md")  # docs/ablation.md beside docs/ablation/: its tables, between the markers
    if doc.is_file() and RESULTS_START in (text := doc.read_text()) and RESULTS_END in text:
        start, end = text.index(RESULTS_START) + len(RESULTS_START), text.index(RESULTS_END)
        write_atomically(doc, lambda f: f.write((text[:start] + "\n" + tables + "\n" + text[end:]).encode()))
    print(f"wrote {results / 'results.md'} and curves.png from {results / 'runs'}"
          + (f", and the tables in {doc}" if doc.is_file() else "")
          + f"; regenerate them with: python -m tools.ablation --results {results} --report")


if __name__ == "__main__":
    main()
