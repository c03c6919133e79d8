"""Score checkpoints of the shapes demo on ShapesBench (demo/bench.py): sample every held-out pair, score it.

    python -m tools.shapesbench --ckpt out/shapes                        # sample the held-out pairs and score them
    python -m tools.shapesbench --ckpt out/motif/ckpt_*.pt --loss-shares  # a curve over checkpoints, + loss shares
    python -m tools.shapesbench --ckpt out/shapes --text-sensitivity     # does v_hat change when only the direction word does?
    python -m tools.shapesbench --ckpt out/shapes --probe                # one-step denoise: how well the clip is drawn at each t
    python -m tools.shapesbench --baselines                              # ground truth and copy-the-first-frame

The measures, --loss-shares, --text-sensitivity and --probe are described in demo/bench.py. Writes out/results.json
and, per checkpoint, a gif grid (conditioning image | heatmap | sample); --strip K also writes a PNG per checkpoint:
held-out first frame K, one row per prompt "the <first shape> moves up / left / down / right / stays still", the
frames side by side.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from data import fail, frames_to_tensor, to_uint8_frames, write_atomically
from demo.bench import (FIGURES, copy_first_frame, denoise_probe, ground_truth, held_out, loss_shares, score,
                        text_sensitivity, write_grid)
from demo.shapes import PHRASES
from model import autocast, pick_device, wants_bf16
from sample import ddim_sample, ddim_timesteps, load_model

def sample_all(model, cfg, entries, steps, cfg_scale, seed, batch):
    """Every (image, prompt) pair sampled, pair i with seed `seed` + i -> uint8 videos (T, H, W, 3)."""
    videos = []
    for start in tqdm(range(0, len(entries), batch), desc="eval", unit="batch"):
        chunk = entries[start:start + batch]
        images = torch.stack([frames_to_tensor(e["image"][None])[0] for e in chunk])  # (n, 3, H, W)
        out = ddim_sample(model, images, [e["caption"] for e in chunk], cfg["frames"], 8, steps, cfg_scale,
                          [seed + start + i for i in range(len(chunk))], progress=False)
        videos += [to_uint8_frames(v) for v in out]
    return videos


def write_strip(model, cfg, entry, path, steps, cfg_scale, seed, scale=4):
    """A PNG to look at: the first shape of a held-out first frame told to move up, left, down, right and to stay
    still, one row per prompt (sampled with seed `seed`), the conditioning image then the T frames side by side."""
    obj = entry["scene"]["objects"][0]
    prompts = [f"the {obj['colour']} {obj['shape']} {PHRASES[m]}" for m in ("up", "left", "down", "right", "still")]
    image = frames_to_tensor(entry["image"][None])[0]  # (3, H, W)
    videos = ddim_sample(model, image[None].expand(len(prompts), -1, -1, -1), prompts, cfg["frames"], 8, steps,
                         cfg_scale, [seed] * len(prompts), progress=False)
    size, gap, label = cfg["height"] * scale, 2, 150
    canvas = Image.new("RGB", (label + (cfg["frames"] + 1) * (size + gap), len(prompts) * (size + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (prompt, video) in enumerate(zip(prompts, videos)):
        frames = [entry["image"]] + list(to_uint8_frames(video))  # (H, W, 3) each
        for col, frame in enumerate(frames):
            tile = Image.fromarray(np.ascontiguousarray(frame)).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (label + col * (size + gap), row * (size + gap)))
        draw.text((4, row * (size + gap) + size // 2), prompt.replace(f"the {obj['colour']} ", "", 1), fill="black")
    canvas.save(path)


def load_shapes_model(path, device):
    model, cfg, step = load_model(path, device)
    if cfg.get("data") != "shapes":
        raise ValueError(f"{path} was trained on {cfg.get('data')!r}, not the shapes videos: ShapesBench needs a "
                         "shapes model")
    return model, cfg, step


def table(results):
    keys = FIGURES
    lines = ["| what | step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for name, figures in results.items():
        for row in figures if isinstance(figures, list) else [figures]:
            if "direction_accuracy" in row:
                lines.append(f"| {row.get('ckpt', name)} | {row.get('step', '')} | "
                             + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="ShapesBench: score text-following on held-out shapes pairs")
    p.add_argument("--ckpt", nargs="+", default=[], help="train.py checkpoints of shapes models, or run folders")
    p.add_argument("--baselines", action="store_true", help="also score ground truth and copy-the-first-frame")
    p.add_argument("--loss-shares", action="store_true", help="also measure the moving-region loss share per timestep")
    p.add_argument("--text-sensitivity", action="store_true",
                   help="also measure how much v_hat changes when the direction words change, and for the empty prompt")
    p.add_argument("--probe", action="store_true",
                   help="also denoise the described clips in one step at fixed t and score them (see the docstring)")
    p.add_argument("--images", type=int, default=64, help="held-out first frames (3-5 prompts each)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale (default: the run's cfg_scale, 7.5 unless its config says)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", default="out/eval", help="folder for results.json and the grids")
    p.add_argument("--strip", type=int, default=None, metavar="K",
                   help="also write strip_<i>_step<N>.png: held-out first frame K, its first shape told each motion")
    args = p.parse_args(argv)
    out = Path(args.out)
    results = {}
    try:
        if not args.ckpt and not args.baselines:
            raise ValueError("give --ckpt CKPT [CKPT ...] (shapes models) and/or --baselines")
        if args.images < 1 or args.batch < 1 or args.seed < 0:
            raise ValueError("--images and --batch must be positive and --seed 0 or more")
        if args.cfg is not None and not (math.isfinite(args.cfg) and args.cfg >= 0):
            raise ValueError(f"--cfg (the guidance scale) must be a number 0 or more, not {args.cfg}")
        if args.strip is not None and not 0 <= args.strip < args.images:
            raise ValueError(f"--strip K draws one of the scored held-out images, 0..{args.images - 1} with --images "
                             f"{args.images}, not {args.strip}" + (f": add --images {args.strip + 1}" if args.strip > 0 else ""))
        ddim_timesteps(args.steps)
        device = pick_device("auto")
        models = [(path, *load_shapes_model(path, device)) for path in args.ckpt]  # all checked before the long part
        out.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as e:
        fail(e)
    for index, (path, model, cfg, step) in enumerate(models):
        scale = cfg.get("cfg_scale", 7.5) if args.cfg is None else args.cfg
        entries = held_out(cfg, args.images)
        with autocast(device, wants_bf16(cfg.get("dtype", "auto"), device)):  # as the run trained
            videos = sample_all(model, cfg, entries, args.steps, scale, args.seed, args.batch)
            row = {"ckpt": str(path), "step": step, **score(entries, videos)}
            if args.loss_shares:
                row["loss_shares"] = loss_shares(model, cfg, seed=args.seed)
            if args.text_sensitivity:
                row["text_sensitivity"] = text_sensitivity(model, cfg, seed=args.seed)
            if args.probe:
                row["probe"] = denoise_probe(model, cfg, scale, args.images, args.seed)
            if args.strip is not None:
                entry = next(e for e in held_out(cfg, args.strip + 1) if e["image_id"] == args.strip)
                write_strip(model, cfg, entry, out / f"strip_{index}_step{step}.png", args.steps, scale, args.seed)
        results.setdefault("checkpoints", []).append(row)
        write_grid(entries, videos, out / f"grid_{index}_step{step}.gif")
        print(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                       if not isinstance(v, dict)))
        print("direction accuracy by shapes in the scene: " + " ".join(
            f"{n}: {v:.3f}" for n, v in row["direction_accuracy_by_shapes"].items()) + "; by direction: " + " ".join(
            f"{d}: {v:.3f}" for d, v in row["direction_accuracy_by_direction"].items()))
    if args.baselines:  # at the checkpoints' size and shape scale (the first one's), else the demo's 8 frames of 32 x 32
        cfg = models[0][2] if models else {"height": 32, "frames": 8}
        entries, frames = held_out(cfg, args.images), cfg["frames"]
        results["ground_truth"] = score(entries, ground_truth(entries, frames))
        results["copy_first_frame"] = score(entries, copy_first_frame(entries, frames))
    write_atomically(out / "results.json", lambda f: f.write(json.dumps(results, indent=2).encode()))
    print(table(results))
    for row in results.get("checkpoints", []):
        if "text_sensitivity" in row:
            s = row["text_sensitivity"]
            print(f"{row['ckpt']}: relative change of v_hat, other direction words / empty prompt: from pure noise "
                  f"{s['from_noise']['direction_words']:.4f} / {s['from_noise']['empty_prompt']:.4f}; noised clip " + " ".join(
                f"t{t}: {a:.4f} / {b:.4f}" for t, a, b in zip(s["timesteps"], s["direction_words"], s["empty_prompt"])))
        if "probe" in row:
            probe = row["probe"]
            print(f"{row['ckpt']}: one-step denoise of the described clips, shape PSNR / ghost / first-frame PSNR: "
                  + " ".join(f"t{t}: {a:.1f} dB / {b:.1f} / {c:.1f} dB" for t, a, b, c in zip(
                      probe["timesteps"], probe["shape_psnr"], probe["ghost"], probe["first_frame_psnr"])))
        if "loss_shares" in row:
            shares = row["loss_shares"]
            print(f"{row['ckpt']}: moving-region loss share by timestep "
                  + " ".join(f"t{t}:{s:.3f}" for t, s in zip(shares["timesteps"], shares["moving_loss_share"]))
                  + f" (moving area {shares['moving_area_share']:.3f})")
    print(f"wrote {out / 'results.json'}")



if __name__ == "__main__":
    main(sys.argv[1:])
