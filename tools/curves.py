"""A run's log as one picture: the loss, moving vs static error and the motion of the validation samples against
training steps. A tool (run from the repository's root); nothing in the method imports it.

    python -m tools.curves out/RUN                  # writes out/RUN/curves.png
    python -m tools.curves out/RUN --out run.png

It reads out/RUN/log.jsonl (train.py's: a line per log_every steps, a line per validation pass; a resumed run
logs some steps twice, and the later line wins) and draws three panels:
- the loss and its diffusion term (log scale);
- the error in moving and in static regions (m'-weighted and (1 - m')-weighted squared v-error): MotiF exists
  to bring the first down, which the plain loss leaves to the many static pixels;
- the validation passes: on a video folder the motion ratio (samples' flow over their real clips'; the dashed
  line is the monitor's warning level), the static-sample rate and VBench's dynamic degree (flow.py); on the
  shapes demo direction accuracy and the static-video rate.
"""
import argparse
import json
from pathlib import Path

from data import fail, write_atomically
from flow import WARN_RATIO

PASS_CURVES = {"motion_ratio": "motion ratio", "static_sample_rate": "static-sample rate",
               "dynamic_degree": "dynamic degree (VBench)", "direction_accuracy": "direction accuracy",
               "text_contrast_accuracy": "text-contrast accuracy", "static_video_rate": "static-video rate"}


def read_log(path):
    """(loss records by step, validation records by step) of a log.jsonl; ValueError if it has no loss line."""
    losses, passes = {}, {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{number} is not a JSON line") from None
        if "validation" in record:
            passes[record["step"]] = record["validation"]
        elif "loss" in record:
            losses[record["step"]] = record
    if not losses:
        raise ValueError(f"{path} has no loss line yet")
    return dict(sorted(losses.items())), dict(sorted(passes.items()))


def draw(losses, passes, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = list(losses)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for key, label in (("loss", "loss (diffusion + λ motif)"), ("diffusion", "diffusion term")):
        axes[0].plot(steps, [losses[s][key] for s in steps], label=label)
    axes[0].set_yscale("log")
    axes[0].set_title("loss", fontsize=10)
    for key, label in (("moving", "moving regions"), ("static", "static regions")):
        axes[1].plot(steps, [losses[s][key] for s in steps], label=label)
    axes[1].set_yscale("log")
    axes[1].set_title("squared v-error by region", fontsize=10)
    ax = axes[2]
    for key, label in PASS_CURVES.items():
        points = [(s, figures[key]) for s, figures in passes.items() if key in figures]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    if any("motion_ratio" in figures for figures in passes.values()):
        ax.axhline(WARN_RATIO, color="grey", lw=0.8, ls="--")
        ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_ylim(bottom=0)
    ax.set_xlim(axes[0].get_xlim())
    ax.set_title("validation samples" if passes else "validation samples (no pass logged)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("training step", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description="loss, moving vs static error and the validation samples' motion of a "
                                            "run, against steps, in one PNG")
    p.add_argument("run", help="a run folder (train.py's --out_dir) or its log.jsonl")
    p.add_argument("--out", default=None, help="the PNG (default: RUN/curves.png)")
    args = p.parse_args(argv)
    run = Path(args.run)
    log = run if run.suffix == ".jsonl" else run / "log.jsonl"
    out = Path(args.out) if args.out else log.parent / "curves.png"
    try:
        if not log.is_file():
            raise ValueError(f"{log} does not exist: give a run folder of train.py (its --out_dir)")
        losses, passes = read_log(log)
        draw(losses, passes, out, str(log.parent))
    except (ValueError, OSError) as e:
        fail(e)
    print(f"wrote {out} ({len(losses)} log lines, {len(passes)} validation passes)")


if __name__ == "__main__":
    main()
