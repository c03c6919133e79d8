"""Write the demo weights that `python sample.py IMAGE "PROMPT"` uses when it is given no --ckpt.

    python -m tools.demo_weights --ckpt RUN_FOLDER_OR_FILE --out demo/weights.pt

A shapes run's EMA weights, in half precision (sample.py loads them back into fp32), in a checkpoint that
sample.load_model reads like any other: "model" holds the EMA weights and "ema" is empty (there are no raw weights
to choose instead). The run's config goes with them, so tests/test_demo_weights.py can tell a stale file: one whose
model the preset no longer builds.
"""
import argparse
import sys

import torch

from data import fail, write_atomically
from model import CHECKPOINT_KIND, load_checkpoint


def demo_weights(ckpt):
    """A checkpoint dict -> the shipped file's dict: its EMA weights merged into its model weights, fp16."""
    if ckpt["config"].get("data") != "shapes":
        raise ValueError("the demo weights come from a shapes run (--preset shapes)")
    weights = {**ckpt["model"], **ckpt["ema"]}
    half = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    return {"kind": CHECKPOINT_KIND, "step": ckpt["step"], "config": ckpt["config"], "model": half, "ema": {}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="a shapes run's checkpoint, or its run folder (uses its latest)")
    p.add_argument("--out", default="demo/weights.pt")
    args = p.parse_args(argv)
    try:
        state = demo_weights(load_checkpoint(args.ckpt))
        write_atomically(args.out, lambda f: torch.save(state, f))
    except (ValueError, OSError) as e:
        fail(e)
    print(f"wrote {args.out}: step {state['step']}, {sum(v.numel() for v in state['model'].values())} values in fp16")


if __name__ == "__main__":
    main(sys.argv[1:])
