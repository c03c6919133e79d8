"""The paper's ablation, with error bars: does the motion focal loss make the text count? A tool (run from the
repository's root); nothing in the method imports it.

    python -m tools.ablation --out out/ablation                      # the default study, resumable
    python -m tools.ablation --out out/ablation --jobs 2             # two runs at a time (one CPU thread each)
    python -m tools.ablation --out out/big --seeds 8 --set steps=4000 --set device=cuda     # a bigger one

Three studies of the shapes demo (train.py --preset shapes, changed by --set KEY=VALUE):
- losses: MotiF (lambda = 1), no MotiF (lambda = 0) and Inv-MotiF, --seeds seeds each;
- lambda: lambda = 0, 0.5, 1, 2, 4 (3 seeds; its lambda = 0 and 1 runs are the losses study's);
- paper regime: the three losses on shapes PAPER_SCALE as large, so that about 3 % of the pixels move, as the
  paper reports for real videos, where focal weighting should matter most (3 seeds).
Seed k of every arm sees the same clips, initial weights, timesteps and noise (train.py draws them from the seed and
the sample index), so differences between arms are paired differences.

Each run trains in out/runs/NAME (checkpoints at POINTS evenly spaced steps) and each checkpoint is scored once into
out/evals/NAME/step_N.json: the ShapesBench tallies (eval.tally) of every held-out pair sampled with SAMPLE_SEEDS,
and the moving-region loss share per timestep (eval.loss_shares). Everything is written atomically and skipped when
present, so killing the command and running it again loses at most the runs in progress (train.py resumes them).

Statistics (out/results.json, results.md, curves.png): per arm and checkpoint, the mean over seeds and its 95 %
t-interval; per comparison (MotiF - no MotiF, MotiF - Inv-MotiF, lambda - 0) at the last checkpoint, the paired
difference with a 95 % bootstrap interval that resamples seeds and, within each, held-out images (both arms the same
images), and the number of seeds in which the first arm does better. A difference is "resolved" when its interval
excludes 0.
"""
import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

import train
from checkpoint import load_model
from eval import FIGURES, held_out, loss_shares, pool, sample_all, tally
from utils import fail, pick_device, write_atomically

POINTS = 4  # checkpoints per run that are scored
SAMPLE_SEEDS = (0, 100_000)  # each held-out pair is sampled twice: pair i with seed s + i
SHARE_CLIPS = 64  # held-out clips of the moving-region loss share (eval.loss_shares)
PAPER_SCALE = 0.65  # shapes this size: 2.95 % of the pixels move (against 5.8 % at 1), the paper's ~3 %
STUDY_SEEDS = 3  # seeds of the lambda and paper-regime studies
SCORED = ("direction_accuracy", "text_contrast_accuracy", "still_accuracy", "shape_integrity", "static_video_rate")
LOWER_IS_BETTER = {"static_video_rate"}
BOOTSTRAP = 2000  # bootstrap resamples
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
    def losses(scale, n):
        return {"MotiF": [Run(1.0, "motif", scale, k) for k in range(n)],
                "no MotiF": [Run(0.0, "motif", scale, k) for k in range(n)],
                "Inv-MotiF": [Run(1.0, "inverse", scale, k) for k in range(n)]}
    lambdas = (0.0, 0.5, 1.0, 2.0, 4.0)
    return {"losses": {"arms": losses(1.0, seeds), "compare": [("MotiF", "no MotiF"), ("MotiF", "Inv-MotiF")]},
            "lambda": {"arms": {f"lambda {lam:g}": [Run(lam, "motif", 1.0, k) for k in range(STUDY_SEEDS)]
                                for lam in lambdas},
                       "compare": [(f"lambda {lam:g}", "lambda 0") for lam in lambdas[1:]]},
            "paper regime": {"arms": losses(PAPER_SCALE, STUDY_SEEDS),
                             "compare": [("MotiF", "no MotiF"), ("MotiF", "Inv-MotiF")]}}


def run_config(run, out, overrides):
    """train.py's config of a run: the shapes preset, the study's --set overrides, then the run's own keys."""
    base = train.load_config(["--preset", "shapes", *(f"--{o}" for o in overrides)])
    return train.load_config(["--preset", "shapes", *(f"--{o}" for o in overrides),
                              f"--motif_lambda={run.motif_lambda}", f"--loss_mode={run.loss_mode}",
                              f"--shape_scale={run.shape_scale}", f"--seed={run.seed}",
                              f"--out_dir={out / 'runs' / run.name}", "--resume=latest", "--sample_every=0",
                              f"--ckpt_every={max(1, base.steps // POINTS)}", f"--keep_checkpoints={POINTS + 1}"])


# ----------------------------------------------------------------------------- train and score one run

class Stopped(Exception):
    """A run stopped before its last step (a stop signal): the study stops too, to be resumed."""


def checkpoints(run_dir):
    """{step: path} of a run folder's checkpoints."""
    return {int(p.stem.split("_")[1]): p for p in sorted(Path(run_dir).glob("ckpt_*.pt"))}


def evaluate(path, settings):
    """One checkpoint's scores: ShapesBench tallies per sampling seed, and the moving-region loss shares."""
    model, cfg, step = load_model(path, pick_device(settings["device"]))
    entries = held_out(cfg, settings["images"])
    tallies = [tally(entries, sample_all(model, cfg, entries, settings["ddim_steps"], settings["cfg"], seed,
                                         settings["batch"])) for seed in SAMPLE_SEEDS]
    return {"step": step, "tallies": tallies, "loss_shares": loss_shares(model, cfg, clips=SHARE_CLIPS)}


def train_and_evaluate(run, out, settings):
    """Train `run` to its last step (resuming what is there) and score each of its checkpoints not yet scored."""
    torch.set_num_threads(settings["threads"])
    cfg = run_config(run, out, settings["overrides"])
    done = checkpoints(cfg.out_dir)
    if cfg.steps not in done:
        train.train(cfg)
        done = checkpoints(cfg.out_dir)
        if cfg.steps not in done:
            raise Stopped(f"{run.name} stopped at step {max(done, default=0)}")
    for step, path in done.items():
        result = out / "evals" / run.name / f"step_{step:07d}.json"
        if not result.is_file():
            figures = evaluate(path, settings)
            result.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(result, lambda f: f.write(json.dumps(figures).encode()))


# ----------------------------------------------------------------------------- statistics

def t_interval(values):
    """Mean of the values and the half-width of its 95 % Student-t interval (0 for a single value)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), 0.0
    t = T_975[len(values) - 2] if len(values) - 1 <= len(T_975) else 1.96
    return float(values.mean()), float(t * values.std(ddof=1) / np.sqrt(len(values)))


def merge(tallies):
    """Per-image tallies of several samplings added up into one {image_id: {key: [sum, count]}}."""
    merged = {}
    for one in tallies:
        for image, keys in one.items():
            for key, (total, count) in keys.items():
                cell = merged.setdefault(str(image), {}).setdefault(key, [0.0, 0])
                cell[0] += total
                cell[1] += count
    return merged


def as_arrays(per_seed, key, images):
    """(sums, counts), each (seeds, images), of one key of per-seed merged tallies."""
    sums = np.array([[t.get(i, {}).get(key, [0.0, 0])[0] for i in images] for t in per_seed], dtype=float)
    counts = np.array([[t.get(i, {}).get(key, [0.0, 0])[1] for i in images] for t in per_seed], dtype=float)
    return sums, counts


def paired_difference(first, second, key, rng, resamples=BOOTSTRAP):
    """first, second: per seed k (the same k in both), the merged tallies of one checkpoint. The mean over seeds of
    figure(first_k) - figure(second_k), its 95 % bootstrap interval (seeds resampled, and within each resampled
    seed the held-out images, the same ones for both arms) and the number of seeds in which `first` does better."""
    images = sorted({i for t in first + second for i in t})
    sa, ca = as_arrays(first, key, images)
    sb, cb = as_arrays(second, key, images)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_seed = sa.sum(1) / ca.sum(1) - sb.sum(1) / cb.sum(1)  # (seeds,)
        n, m = len(first), len(images)
        seeds = rng.integers(0, n, size=(resamples, n))  # (R, n)
        weights = rng.multinomial(m, np.full(m, 1 / m), size=(resamples, n)).astype(float)  # (R, n, m)
        fa = (weights * sa[seeds]).sum(-1) / (weights * ca[seeds]).sum(-1)  # (R, n)
        fb = (weights * sb[seeds]).sum(-1) / (weights * cb[seeds]).sum(-1)
        boot = np.nanmean(fa - fb, axis=1)  # (R,)
    low, high = np.nanpercentile(boot, [2.5, 97.5])
    better = per_seed < 0 if key in LOWER_IS_BETTER else per_seed > 0
    return {"mean": float(np.nanmean(per_seed)), "low": float(low), "high": float(high),
            "wins": int(better.sum()), "seeds": n, "resolved": bool(low > 0 or high < 0)}


def summarise(plan, out):
    """results.json's content from the scored checkpoints: per run, per arm and per comparison."""
    rng = np.random.default_rng(0)
    results = {"studies": {}}
    for study, spec in plan.items():
        arms, merged = {}, {}
        for arm, runs in spec["arms"].items():
            per_step = {}
            for run in runs:
                for path in sorted((out / "evals" / run.name).glob("step_*.json")):
                    scored = json.loads(path.read_text())
                    per_step.setdefault(scored["step"], []).append((merge(scored["tallies"]), scored["loss_shares"]))
            merged[arm] = per_step
            arms[arm] = {}
            for step, rows in sorted(per_step.items()):
                figures = [pool(t.values()) for t, _ in rows]
                arms[arm][step] = {key: t_interval([f.get(key, np.nan) for f in figures]) for key in FIGURES}
                shares = np.array([s["moving_loss_share"] for _, s in rows])  # (seeds, timesteps)
                arms[arm][step]["moving_loss_share"] = [t_interval(column) for column in shares.T]
                arms[arm][step]["timesteps"] = rows[0][1]["timesteps"]
                arms[arm][step]["seeds"] = len(rows)
        last = max((max(per_step) for per_step in merged.values() if per_step), default=0)
        differences = {}
        for a, b in spec["compare"]:
            first, second = merged[a].get(last, []), merged[b].get(last, [])
            if first and len(first) == len(second):
                differences[f"{a} - {b}"] = {key: paired_difference([t for t, _ in first], [t for t, _ in second],
                                                                    key, rng) for key in SCORED}
        results["studies"][study] = {"arms": arms, "last_step": last, "differences": differences}
    return results


# ----------------------------------------------------------------------------- reports

NAMES = {"direction_accuracy": "direction", "text_contrast_accuracy": "text-contrast", "still_accuracy": "still",
         "shape_integrity": "integrity", "static_video_rate": "static rate"}


def markdown(results):
    lines = []
    for study, summary in results["studies"].items():
        last = summary["last_step"]
        lines += [f"### {study} (step {last}; mean and 95 % interval over seeds)", "",
                  "| arm | seeds | " + " | ".join(NAMES[k] for k in SCORED) + " | moving-region loss share, mean over t |",
                  "|---" * (len(SCORED) + 3) + "|"]
        for arm, steps in summary["arms"].items():
            row = steps.get(last)
            if not row:
                continue
            share = np.mean([m for m, _ in row["moving_loss_share"]])
            lines.append(f"| {arm} | {row['seeds']} | " + " | ".join(f"{row[k][0]:.3f} ± {row[k][1]:.3f}" for k in SCORED)
                         + f" | {share:.3f} |")
        if summary["differences"]:
            lines += ["", "| paired difference | " + " | ".join(NAMES[k] for k in SCORED) + " |",
                      "|---" * (len(SCORED) + 1) + "|"]
            for name, keys in summary["differences"].items():
                lines.append(f"| {name} | " + " | ".join(
                    f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] {d['wins']}/{d['seeds']}"
                    f"{' **resolved**' if d['resolved'] else ''}" for d in (keys[k] for k in SCORED)) + " |")
            lines += ["", "Each cell: mean paired difference [95 % bootstrap interval] and the seeds in which the first "
                      "arm does better; **resolved**: the interval excludes 0."]
        lines.append("")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = SCORED[:4]
    names = list(results["studies"])
    fig, axes = plt.subplots(len(names), len(keys), figsize=(4 * len(keys), 3 * len(names)), squeeze=False)
    for row, study in enumerate(names):
        for col, key in enumerate(keys):
            ax = axes[row][col]
            for arm, steps in results["studies"][study]["arms"].items():
                xs = sorted(steps)
                mean, half = np.array([steps[s][key] for s in xs]).T  # (steps,) each
                ax.plot(xs, mean, marker="o", label=arm)
                ax.fill_between(xs, mean - half, mean + half, alpha=0.2)
            ax.set_title(f"{study}: {NAMES[key]}", fontsize=9)
            ax.set_xlabel("training step")
            ax.set_ylim(0, 1)
        axes[row][0].legend(fontsize=7)
    fig.tight_layout()
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    p = argparse.ArgumentParser(description="MotiF vs no MotiF vs Inv-MotiF on the shapes demo, with error bars")
    p.add_argument("--out", default="out/ablation", help="folder of runs, scores and results")
    p.add_argument("--seeds", type=int, default=5, help="seeds of the losses study")
    p.add_argument("--studies", default="losses,lambda,paper regime", help="comma-separated: losses, lambda, paper regime")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a train.py config key for every run")
    p.add_argument("--images", type=int, default=64, help="held-out first frames scored (64: all)")
    p.add_argument("--ddim-steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--batch", type=int, default=64, help="pairs sampled at once")
    p.add_argument("--jobs", type=int, default=1, help="runs trained and scored at once, each on --threads threads")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        wanted = [s.strip() for s in args.studies.split(",") if s.strip()]
        plan = studies(args.seeds)
        unknown = [s for s in wanted if s not in plan]
        if unknown or not wanted:
            raise ValueError(f"unknown studies {unknown}; choose from {', '.join(plan)}")
        plan = {s: plan[s] for s in wanted}
        if args.seeds < 2 or args.images < 1 or args.jobs < 1 or args.threads < 1:
            raise ValueError("--seeds must be at least 2 (intervals), --images, --jobs and --threads positive")
        if any("=" not in o for o in args.set):
            raise ValueError("--set takes KEY=VALUE (a train.py config key)")
        runs = list(dict.fromkeys(run for spec in plan.values() for arm in spec["arms"].values() for run in arm))
        for run in runs[:1]:
            train.check_config(run_config(run, out, args.set), world_size=1)
    except ValueError as e:
        fail(e)
    settings = {"overrides": args.set, "images": args.images, "ddim_steps": args.ddim_steps, "cfg": args.cfg,
                "batch": args.batch, "threads": args.threads, "device": args.device}
    print(f"{len(runs)} runs in {out / 'runs'}; each scored at {POINTS} checkpoints on {args.images} held-out images "
          f"x {len(SAMPLE_SEEDS)} sampling seeds")
    try:
        if args.jobs == 1:
            for run in runs:
                train_and_evaluate(run, out, settings)
        else:
            with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as jobs:
                for done in [jobs.submit(train_and_evaluate, run, out, settings) for run in runs]:
                    done.result()
    except (Stopped, train.TrainingStopped) as e:
        fail(f"{e}; run the same command again to resume")
    results = summarise(plan, out)
    results["settings"] = {**settings, "seeds": args.seeds, "points": POINTS, "sample_seeds": SAMPLE_SEEDS}
    write_atomically(out / "results.json", lambda f: f.write(json.dumps(results, indent=1).encode()))
    write_atomically(out / "results.md", lambda f: f.write(markdown(results).encode()))
    plot(results, out / "curves.png")
    print(markdown(results))
    print(f"wrote {out / 'results.json'}, results.md and curves.png")


if __name__ == "__main__":
    main()
