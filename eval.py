"""ShapesBench: does a sampled video do what the text says?

    python eval.py --ckpt out/shapes                        # sample the held-out pairs and score them
    python eval.py --ckpt out/motif/ckpt_*.pt --loss-shares  # a curve over checkpoints, + loss shares
    python eval.py --baselines                              # ground truth and copy-the-first-frame

The held-out set is data.held_out_pairs(): test-split first frames, never seen in training, each
with several prompts. Every pair is sampled (batched, pair i with seed --seed + i), then scored by
tracking each shape by its colour in every frame:
- direction accuracy: a shape told to move left/right/up/down travelled at least MOVED (a tenth) of the
  frame width, mostly along that way;
- still accuracy: a shape told to stay still (or not mentioned) travelled less than that;
- static-video rate: of the prompts that ask for motion, the share of clips that barely change
  (the conditional-image-leakage symptom);
- first-frame PSNR: frame 0 against the conditioning image;
- image alignment: mean PSNR of all frames against the conditioning image. A static video scores
  best here, which is the paper's point that such metrics reward not moving.

--loss-shares reproduces the paper's loss-ratio analysis: on held-out clips, at fixed timesteps,
the share of the model's squared error that lies in high-motion regions (weighted by the latent
heatmap m'), next to the share of the area that moves. MotiF should hold it lower than the plain loss.

Writes out/results.json and, per checkpoint, a gif grid (conditioning image | heatmap | sample).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import load_model
from data import DIRECTIONS, PALETTE, ShapesDataset, held_out_pairs, render_clip, write_video
from flow import heatmap_from_flow
from loss import Schedule, latent_heatmap, q_sample, v_target
from sample import ddim_sample, ddim_timesteps, to_uint8_frames
from utils import fail, pick_device, write_atomically

MOVED = 0.1  # of the frame width: the least travel that counts as moving
COLOUR_TOLERANCE = 60  # max distance in RGB (0..255) for a pixel to belong to a shape's colour
STATIC_CHANGE = 2.0  # mean absolute change (0..255) between first and last frame under which a clip is static
SHARE_TIMESTEPS = (50, 150, 250, 350, 450, 550, 650, 750, 850, 950)


# ----------------------------------------------------------------------------- scoring

def track(video, colour):
    """Centre (x, y) of the pixels of `colour` in each frame of a uint8 (T, H, W, 3) video; NaN if absent."""
    distance = np.linalg.norm(video.astype(np.float32) - np.array(colour, np.float32), axis=-1)  # (T, H, W)
    mask = distance < COLOUR_TOLERANCE
    ys, xs = np.mgrid[0:video.shape[1], 0:video.shape[2]]
    count = mask.sum(axis=(1, 2))  # (T,)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([(mask * xs).sum(axis=(1, 2)) / count, (mask * ys).sum(axis=(1, 2)) / count], 1)  # (T, 2)


def judge(displacement, motion, width):
    """Did a shape that moved by `displacement` (dx, dy) pixels follow `motion`?"""
    if np.isnan(displacement).any():
        return False  # the shape vanished
    travel = np.abs(displacement).max()
    if motion == "still":
        return travel < MOVED * width
    direction = np.array(DIRECTIONS[motion])
    along = float(displacement @ direction)
    return along >= MOVED * width and along > np.abs(displacement).sum() - along  # mostly that way


def psnr(a, b):
    mse = np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2)
    return float(10 * np.log10(255 ** 2 / max(mse, 1e-2)))  # identical images: 68 dB


def score(entries, videos):
    """entries from held_out_pairs, videos uint8 (T, H, W, 3) each -> dict of figures."""
    moves, stills, static, first, aligned = [], [], [], [], []
    for entry, video in zip(entries, videos):
        width = video.shape[2]
        for index, obj in enumerate(entry["scene"]["objects"]):
            centres = track(video, PALETTE[obj["colour"]])
            motion = entry["motions"].get(index, "still")
            ok = judge(centres[-1] - centres[0], motion, width)
            (stills if motion == "still" else moves).append(ok)
        if any(m != "still" for m in entry["motions"].values()):  # the prompt asks for motion
            static.append(np.abs(video[-1].astype(np.float32) - video[0]).mean() < STATIC_CHANGE)
        first.append(psnr(video[0], entry["image"]))
        aligned.append(np.mean([psnr(frame, entry["image"]) for frame in video]))
    return {"pairs": len(entries), "direction_accuracy": float(np.mean(moves)), "still_accuracy": float(np.mean(stills)),
            "static_video_rate": float(np.mean(static)), "first_frame_psnr": float(np.mean(first)),
            "image_alignment_psnr": float(np.mean(aligned))}


# ----------------------------------------------------------------------------- what gets scored

def ground_truth(entries, frames):
    return [render_clip(e["scene"], e["motions"], frames)[0] for e in entries]


def copy_first_frame(entries, frames):
    return [np.repeat(e["image"][None], frames, axis=0) for e in entries]


def sample_all(model, cfg, entries, steps, cfg_scale, seed, batch):
    """Every (image, prompt) pair sampled, pair i with seed `seed` + i -> uint8 videos (T, H, W, 3)."""
    videos = []
    for start in tqdm(range(0, len(entries), batch), desc="eval", unit="batch"):
        chunk = entries[start:start + batch]
        images = torch.stack([torch.from_numpy(e["image"]).permute(2, 0, 1).float() / 127.5 - 1 for e in chunk])
        out = ddim_sample(model, images, [e["caption"] for e in chunk], cfg["frames"], 8, steps, cfg_scale,
                          [seed + start + i for i in range(len(chunk))], progress=False)
        videos += [to_uint8_frames(v) for v in out]
    return videos


@torch.no_grad()
def loss_shares(model, cfg, clips=64, seed=0):
    """Per timestep: the share of the squared v-error inside high-motion regions, sum(m' err) / sum(err),
    on `clips` held-out clips (with their captions), and the share of the area that moves, mean(m')."""
    device = next(model.parameters()).device
    data = ShapesDataset("test", size=cfg["height"], frames=cfg["frames"], max_stride=cfg["max_stride"], seed=seed)
    items = [data[i] for i in range(clips)]
    z0 = model.encode_video(torch.stack([item["video"] for item in items]).to(device))  # (N, C, T, h, w)
    m = latent_heatmap(torch.stack([item["heatmap"] for item in items]).to(device), z0.shape[-2:])  # (N, 1, T, h, w)
    captions, fps = [item["caption"] for item in items], torch.stack([item["fps"] for item in items]).to(device)
    schedule, generator = Schedule(device=device), torch.Generator().manual_seed(seed)
    shares = {}
    for t in SHARE_TIMESTEPS:
        timesteps = torch.full((clips,), t, device=device)
        noise = torch.randn(z0.shape, generator=generator).to(device)
        v_hat = model(q_sample(schedule, z0, timesteps, noise), model.image_latent(z0), timesteps, captions, fps)
        err = (v_target(schedule, z0, timesteps, noise) - v_hat).square()  # (N, C, T, h, w)
        shares[t] = (m * err).sum().item() / err.sum().item()
    return {"timesteps": list(SHARE_TIMESTEPS), "moving_loss_share": [shares[t] for t in SHARE_TIMESTEPS],
            "moving_area_share": m.mean().item()}


def write_grid(entries, videos, path, count=12, scale=4):
    """A gif: one row per pair, conditioning image | exact heatmap of the intended motion | sample."""
    rows = []
    for entry, video in zip(entries[:count], videos[:count]):
        t = video.shape[0]
        _, flow = render_clip(entry["scene"], entry["motions"], t)
        heat = (heatmap_from_flow(flow).numpy()[..., None].repeat(3, -1) * 255).astype(np.uint8)  # (T, H, W, 3)
        image = np.repeat(entry["image"][None], t, axis=0)
        rows.append(np.concatenate([image, heat, video], axis=2))  # (T, H, 3W, 3)
    grid = np.concatenate(rows, axis=1).repeat(scale, 1).repeat(scale, 2)
    write_video(path, grid, fps=4)


# ----------------------------------------------------------------------------- command line

def load_shapes_model(path, device):
    model, cfg, step = load_model(path, device)
    if cfg.get("data") != "shapes":
        raise ValueError(f"{path} was trained on {cfg.get('data')!r}, not the shapes videos: ShapesBench needs a "
                         "shapes model")
    return model, cfg, step


def table(results):
    keys = ("direction_accuracy", "still_accuracy", "static_video_rate", "first_frame_psnr", "image_alignment_psnr")
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
    p.add_argument("--images", type=int, default=64, help="held-out first frames (3-5 prompts each)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", default="out/eval", help="folder for results.json and the grids")
    args = p.parse_args(argv)
    out = Path(args.out)
    results = {}
    try:
        if not args.ckpt and not args.baselines:
            raise ValueError("give --ckpt CKPT [CKPT ...] (shapes models) and/or --baselines")
        if args.images < 1 or args.batch < 1:
            raise ValueError("--images and --batch must be positive")
        ddim_timesteps(args.steps)
        device = pick_device("auto")
        models = [(path, *load_shapes_model(path, device)) for path in args.ckpt]  # all checked before the long part
        out.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as e:
        fail(e)
    for index, (path, model, cfg, step) in enumerate(models):
        entries = held_out_pairs(args.images, size=cfg["height"])
        videos = sample_all(model, cfg, entries, args.steps, args.cfg, args.seed, args.batch)
        row = {"ckpt": str(path), "step": step, **score(entries, videos)}
        if args.loss_shares:
            row["loss_shares"] = loss_shares(model, cfg, seed=args.seed)
        results.setdefault("checkpoints", []).append(row)
        write_grid(entries, videos, out / f"grid_{index}_step{step}.gif")
        print(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "loss_shares"))
    if args.baselines:  # at the checkpoints' size (the first one's), else the demo's 8 frames of 32 x 32
        size, frames = (models[0][2]["height"], models[0][2]["frames"]) if models else (32, 8)
        entries = held_out_pairs(args.images, size=size)
        results["ground_truth"] = score(entries, ground_truth(entries, frames))
        results["copy_first_frame"] = score(entries, copy_first_frame(entries, frames))
    write_atomically(out / "results.json", lambda f: f.write(json.dumps(results, indent=2).encode()))
    print(table(results))
    for row in results.get("checkpoints", []):
        if "loss_shares" in row:
            shares = row["loss_shares"]
            print(f"{row['ckpt']}: moving-region loss share by timestep "
                  + " ".join(f"t{t}:{s:.3f}" for t, s in zip(shares["timesteps"], shares["moving_loss_share"]))
                  + f" (moving area {shares['moving_area_share']:.3f})")
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main(sys.argv[1:])
