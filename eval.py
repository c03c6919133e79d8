"""ShapesBench: does a sampled video do what the text says?

    python eval.py --ckpt out/shapes                        # sample the held-out pairs and score them
    python eval.py --ckpt out/motif/ckpt_*.pt --loss-shares  # a curve over checkpoints, + loss shares
    python eval.py --ckpt out/shapes --text-sensitivity     # does v_hat change when only the direction word does?
    python eval.py --ckpt out/shapes --probe                # one-step denoise: how well the clip is drawn at each t
    python eval.py --baselines                              # ground truth and copy-the-first-frame

The held-out set is shapes.held_out_pairs(): test-split first frames, never seen in training, each
with several prompts. Every pair is sampled (batched, pair i with seed --seed + i), then scored by
tracking each shape by its colour in every frame:
- direction accuracy: a shape told to move left/right/up/down travelled at least MOVED (a tenth) of the
  frame width, mostly along that way;
- still accuracy: a shape told to stay still (or not mentioned) travelled less than that;
- text-contrast accuracy: over pairs of prompts on the same first frame that ask one shape for two
  different motions (a shape a prompt does not name stays still), the share of pairs where the shape
  does what each prompt asks in both clips: a model that ignores the text scores 0;
- shape integrity: share of (clip, shape) where the shape keeps 50-150 % of its first-frame area in
  every frame and no palette colour that the first frame lacks appears (shapes that dissolve into
  blobs or spawn other colours fail); occlusion keeps the ground truth below 1;
- direction accuracy by the number of shapes in the scene and by the direction asked;
- static-video rate: of the prompts that ask for motion, the share of clips that barely change
  (the conditional-image-leakage symptom);
- first-frame PSNR: frame 0 against the conditioning image;
- shape PSNR: of the prompts that ask for motion, frames 1.. against the clip the prompt describes (rendered
  exactly, as training's clips are), over the pixels a shape covers in frame 0 or in that frame: a shape that moves
  the right way as a blob, or leaves a ghost where it was, is tracked as right but scores low here;
- ghost: of the prompts that ask for motion, the mean absolute error (0..255) of frames 1.. against that clip
  over the pixels a shape covered in frame 0 and has left in that frame: what a moving shape leaves behind where
  it started (0 for the truth, the shape's contrast with the background for a copy of the first frame);
- image alignment: mean PSNR of all frames against the conditioning image. A static video scores
  best here, which is the paper's point that such metrics reward not moving.

--loss-shares reproduces the paper's loss-ratio analysis: on held-out clips, at fixed timesteps,
the share of the model's squared error that lies in high-motion regions (weighted by the latent
heatmap m'), next to the share of the area that moves. MotiF should hold it lower than the plain loss.

--text-sensitivity asks whether the model reads the prompt or only notices it: at t = 999, 900 and 500, how
much v_hat changes when only the direction words change ("moves up" -> "moves left"), and for the empty prompt.

--probe asks where a blurred or ghosted sample comes from without sampling: the held-out clips the prompts describe,
noised to fixed timesteps and denoised in one step (x_hat0 from v_hat, guided as sampling guides), scored with shape
PSNR, ghost and first-frame PSNR. A figure that is poor already at small t is the network's; one that is good there
and poor after sampling is the sampler's. On a short run's checkpoint it ranks a lever before any full run.

Writes out/results.json and, per checkpoint, a gif grid (conditioning image | heatmap | sample);
--strip K also writes a PNG per checkpoint: held-out first frame K, one row per prompt "the <first shape>
moves up / left / down / right / stays still", the frames side by side.
"""
import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from PIL import Image, ImageDraw

from checkpoint import load_model
from flow import heatmap_from_flow
from loss import latent_heatmap, q_sample, v_target
from sample import ddim_sample, ddim_timesteps, to_uint8_frames
from shapes import DIRECTIONS, PALETTE, PHRASES, ShapesDataset, held_out_pairs, render_clip
from utils import autocast, fail, pick_device, wants_bf16, write_atomically
from video_io import frames_to_tensor, to_unit_range, write_video

MOVED = 0.1  # of the frame width: the least travel that counts as moving
COLOUR_TOLERANCE = 60  # max distance in RGB (0..255) for a pixel to belong to a shape's colour
STATIC_CHANGE = 2.0  # mean absolute change (0..255) between first and last frame under which a clip is static
INTACT_AREA = (0.5, 1.5)  # a shape's area in every frame, relative to the conditioning image, for shape integrity
FOREIGN_PIXELS = 4  # pixels of a palette colour that make it present in a frame (shape integrity)
SHARE_TIMESTEPS = (50, 150, 250, 350, 450, 550, 650, 750, 850, 950)
PROBE_TIMESTEPS = (20, 100, 250, 500, 750)


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


def shape_psnr(video, entry):
    """PSNR of frames 1.. of a uint8 (T, H, W, 3) video against the clip entry's prompt describes, over the pixels
    where a shape is in frame 0 or in that frame of the described clip (where a shape must appear or leave)."""
    truth = render_clip(entry["scene"], entry["motions"], len(video))[0]  # (T, H, W, 3) uint8
    background = np.round(entry["scene"]["background"] * 255)  # (H, W, 3)
    shape = (truth != background).any(axis=-1)  # (T, H, W)
    region = shape[:1] | shape[1:]  # (T-1, H, W)
    return psnr(video[1:][region], truth[1:][region])  # over (N, 3) pixels


def ghost(video, entry):
    """What a moving shape leaves where it started: the mean absolute error (0..255) of frames 1.. of a uint8
    (T, H, W, 3) video against the clip the prompt describes, over the pixels a shape covered in frame 0 that the
    described clip shows as background in that frame. 0 for the truth; a copy of the first frame leaves the whole
    shape there. NaN when no pixel is vacated (nothing moves)."""
    truth = render_clip(entry["scene"], entry["motions"], len(video))[0]  # (T, H, W, 3) uint8
    background = np.round(entry["scene"]["background"] * 255)  # (H, W, 3)
    shape = (truth != background).any(axis=-1)  # (T, H, W)
    vacated = shape[:1] & ~shape[1:]  # (T-1, H, W)
    if not vacated.any():
        return float("nan")
    return float(np.abs(video[1:].astype(np.float32) - truth[1:])[vacated].mean())


def colour_counts(video):
    """Pixels within COLOUR_TOLERANCE of each palette colour in each frame: {colour: (T,) int}."""
    pixels = video.astype(np.float32)  # (T, H, W, 3)
    return {name: (np.linalg.norm(pixels - np.array(rgb, np.float32), axis=-1) < COLOUR_TOLERANCE).sum(axis=(1, 2))
            for name, rgb in PALETTE.items()}


def intact(counts, image_counts, colour):
    """Did the shape of `colour` keep its area in every frame (INTACT_AREA of its area in the conditioning image),
    in a clip where no palette colour absent from the conditioning image shows (FOREIGN_PIXELS or more)?"""
    area = counts[colour] / max(image_counts[colour], 1)  # (T,)
    foreign = any(counts[name].max() >= FOREIGN_PIXELS for name in PALETTE if image_counts[name] < FOREIGN_PIXELS)
    return bool((area >= INTACT_AREA[0]).all() and (area <= INTACT_AREA[1]).all() and not foreign)


def contrast_pairs(entries):
    """(i, j, shape index) for the pairs of entries on the same first frame that ask the same shape for different
    motions; a shape a prompt does not name is asked to stay still (as everywhere in the scorer)."""
    pairs = []
    for i, a in enumerate(entries):
        for j in range(i + 1, len(entries)):
            b = entries[j]
            if a["image_id"] == b["image_id"]:
                pairs += [(i, j, k) for k in range(len(a["scene"]["objects"]))
                          if a["motions"].get(k, "still") != b["motions"].get(k, "still")]
    return pairs


FIGURES = ("direction_accuracy", "text_contrast_accuracy", "still_accuracy", "shape_integrity", "static_video_rate",
           "first_frame_psnr", "shape_psnr", "ghost", "image_alignment_psnr")


def tally(entries, videos):
    """What score() counts, per held-out image: {image_id: {key: [sum, count]}}, for the keys of FIGURES and
    "direction_accuracy/<number of shapes>", "direction_accuracy/<direction>". pool() of the tallies of any set of
    images gives that set's figures (ablation.py resamples images this way)."""
    tallies, correct = {}, []  # correct[entry][shape]: did the shape do what the prompt asks?

    def add(image_id, key, value):
        counted = tallies.setdefault(image_id, {}).setdefault(key, [0.0, 0])
        counted[0] += float(value)
        counted[1] += 1

    for entry, video in zip(entries, videos):
        image, width, objects = entry["image_id"], video.shape[2], entry["scene"]["objects"]
        counts, image_counts = colour_counts(video), colour_counts(entry["image"][None])
        correct.append([])
        for index, obj in enumerate(objects):
            centres = track(video, PALETTE[obj["colour"]])
            motion = entry["motions"].get(index, "still")
            ok = judge(centres[-1] - centres[0], motion, width)
            correct[-1].append(ok)
            if motion == "still":
                add(image, "still_accuracy", ok)
            else:
                for key in ("direction_accuracy", f"direction_accuracy/{len(objects)}", f"direction_accuracy/{motion}"):
                    add(image, key, ok)
            add(image, "shape_integrity", intact(counts, image_counts, obj["colour"]))
        if any(m != "still" for m in entry["motions"].values()):  # the prompt asks for motion
            add(image, "static_video_rate", np.abs(video[-1].astype(np.float32) - video[0]).mean() < STATIC_CHANGE)
            add(image, "shape_psnr", shape_psnr(video, entry))
            left = ghost(video, entry)
            if not np.isnan(left):
                add(image, "ghost", left)
        add(image, "first_frame_psnr", psnr(video[0], entry["image"]))
        add(image, "image_alignment_psnr", np.mean([psnr(frame, entry["image"]) for frame in video]))
    for i, j, k in contrast_pairs(entries):
        add(entries[i]["image_id"], "text_contrast_accuracy", correct[i][k] and correct[j][k])
    return tallies


def pool(tallies):
    """The figures of a set of images' tallies: each key's summed values over its summed count."""
    sums = {}
    for image in tallies:
        for key, (total, count) in image.items():
            pooled = sums.setdefault(key, [0.0, 0])
            pooled[0] += total
            pooled[1] += count
    return {key: total / count for key, (total, count) in sums.items()}


def score(entries, videos):
    """entries from held_out_pairs, videos uint8 (T, H, W, 3) each -> dict of figures (NaN where none was counted):
    - direction_accuracy, also by the number of shapes in the scene (direction_accuracy_by_shapes) and by the
      direction asked (direction_accuracy_by_direction); still_accuracy; static_video_rate; PSNRs (module doc);
    - text_contrast_accuracy: over the pairs of prompts on the same first frame that ask one shape for two
      different motions (contrast_pairs), the share where that shape does what each prompt asks in both clips.
      Identical clips for both prompts score 0: a model that ignores the text scores 0;
    - shape_integrity: share of (clip, shape) whose shape keeps 50-150 % of its area in every frame, in a clip
      without palette colours that the first frame lacks (intact)."""
    figures = pool(tally(entries, videos).values())
    return {"pairs": len(entries), **{key: figures.get(key, float("nan")) for key in FIGURES},
            "contrast_pairs": len(contrast_pairs(entries)),
            "direction_accuracy_by_shapes": {n: figures[f"direction_accuracy/{n}"] for n in "123"
                                             if f"direction_accuracy/{n}" in figures},
            "direction_accuracy_by_direction": {d: figures[f"direction_accuracy/{d}"] for d in ("left", "right", "up", "down")
                                                if f"direction_accuracy/{d}" in figures}}


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
        images = torch.stack([frames_to_tensor(e["image"][None])[0] for e in chunk])  # (n, 3, H, W)
        out = ddim_sample(model, images, [e["caption"] for e in chunk], cfg["frames"], 8, steps, cfg_scale,
                          [seed + start + i for i in range(len(chunk))], progress=False)
        videos += [to_uint8_frames(v) for v in out]
    return videos


@torch.no_grad()
def loss_shares(model, cfg, clips=64, seed=0):
    """Per timestep, on `clips` held-out clips (with their captions): the share of the squared v-error inside
    high-motion regions, sum(m' err) / sum(err); the mean squared v-error per latent value inside them,
    sum(m' err) / sum(m'), and outside, sum((1 - m') err) / sum(1 - m'); and the share of the area that moves,
    mean(m'). The errors keep falling after the accuracies saturate (tools/ablation.py compares them)."""
    device = next(model.parameters()).device
    data = ShapesDataset("test", size=cfg["height"], frames=cfg["frames"], max_stride=cfg["max_stride"], seed=seed,
                         max_shapes=cfg.get("max_shapes", 3),
                         shape_scale=cfg.get("shape_scale", 1.0))
    items = [data[i] for i in range(clips)]
    z0 = model.encode_video(to_unit_range(torch.stack([item["video"] for item in items]).to(device)))  # (N, C, T, h, w)
    m = latent_heatmap(torch.stack([item["heatmap"] for item in items]).to(device), z0.shape[-2:])  # (N, 1, T, h, w)
    captions, fps = [item["caption"] for item in items], torch.stack([item["fps"] for item in items]).to(device)
    schedule, generator = model.schedule, torch.Generator().manual_seed(seed)
    shares, moving, static = {}, {}, {}
    m_all = m.expand_as(z0)  # (N, C, T, h, w)
    for t in SHARE_TIMESTEPS:
        timesteps = torch.full((clips,), t, device=device)
        noise = torch.randn(z0.shape, generator=generator).to(device)
        v_hat = model(q_sample(schedule, z0, timesteps, noise), model.image_latent(z0), timesteps, captions, fps)
        err = (v_target(schedule, z0, timesteps, noise) - v_hat).square()  # (N, C, T, h, w)
        shares[t] = (m * err).sum().item() / err.sum().item()
        moving[t] = (m_all * err).sum().item() / m_all.sum().item()
        static[t] = ((1 - m_all) * err).sum().item() / (1 - m_all).sum().item()
    return {"timesteps": list(SHARE_TIMESTEPS), "moving_loss_share": [shares[t] for t in SHARE_TIMESTEPS],
            "moving_error": [moving[t] for t in SHARE_TIMESTEPS], "static_error": [static[t] for t in SHARE_TIMESTEPS],
            "moving_area_share": m.mean().item()}


NEXT_DIRECTION = {"up": "left", "left": "down", "down": "right", "right": "up", "still": "still"}
SENSITIVITY_TIMESTEPS = (999, 900, 500)


@torch.no_grad()
def text_sensitivity(model, cfg, images=16, seed=0):
    """Does v_hat depend on what the prompt says, or only on there being one? On the held-out pairs of the first
    `images` first frames whose prompt asks for a direction: the relative change
    ||v_hat(other) - v_hat(caption)|| / ||v_hat(caption)|| when every direction word is replaced by the next of
    NEXT_DIRECTION ("moves up" -> "moves left", all else kept), and when the caption is replaced by the empty prompt,
    - from pure noise at t = 999 (z_t = eps, the same for every prompt): what DDIM's first step sees, where only the
      image and the text can tell the clip. A model that reads the direction changes v_hat about as much as the clips
      of two directions differ (~1); one that ignores it, hardly at all;
    - from the ground-truth clip noised at fixed timesteps: at small frames z_t still shows the motion even at
      t = 999 under VideoCrafter2's schedule, so there a model need not read the text, and this under-reports it.
    Returns {"from_noise": {"direction_words", "empty_prompt"}, "timesteps", "direction_words", "empty_prompt"}: the
    last two lists, one value per timestep."""
    device = next(model.parameters()).device
    entries = [e for e in held_out(cfg, images) if set(e["motions"].values()) != {"still"}]
    video = torch.stack([frames_to_tensor(v).transpose(0, 1)
                         for v in ground_truth(entries, cfg["frames"])]).to(device)  # (N, 3, T, H, W)
    z0 = model.encode_video(video)  # (N, C, T, h, w)
    fps = torch.full((len(entries),), 8.0, device=device)
    captions = [e["caption"] for e in entries]
    prompts = {"caption": captions, "empty": [""] * len(entries),
               "other": [re.sub(r"moves (up|left|down|right)", lambda m: f"moves {NEXT_DIRECTION[m[1]]}", c)
                         for c in captions]}
    generator = torch.Generator().manual_seed(seed)

    def changes(z_t, t):
        timesteps = torch.full((len(entries),), t, device=device)
        v = {name: model(z_t, model.image_latent(z0), timesteps, texts, fps) for name, texts in prompts.items()}
        norm = v["caption"].norm().item()
        return (v["other"] - v["caption"]).norm().item() / norm, (v["empty"] - v["caption"]).norm().item() / norm

    words, empty = changes(torch.randn(z0.shape, generator=generator).to(device), model.schedule.num_steps - 1)
    result = {"from_noise": {"direction_words": words, "empty_prompt": empty},
              "timesteps": list(SENSITIVITY_TIMESTEPS), "direction_words": [], "empty_prompt": []}
    for t in SENSITIVITY_TIMESTEPS:
        timesteps = torch.full((len(entries),), t, device=device)
        noise = torch.randn(z0.shape, generator=generator).to(device)
        words, empty = changes(q_sample(model.schedule, z0, timesteps, noise), t)
        result["direction_words"].append(words)
        result["empty_prompt"].append(empty)
    return result


@torch.no_grad()
def denoise_probe(model, cfg, cfg_scale, images=16, seed=0):
    """The one-step denoise probe. On the held-out pairs of the first `images` first frames whose prompt asks for
    motion: the clip the prompt describes, noised to each of PROBE_TIMESTEPS (one draw of noise per t), its clean
    clip predicted in one step, x_hat0 = sqrt(abar_t) z_t - sqrt(1 - abar_t) v_hat, with v_hat guided at cfg_scale as
    sampling guides it; then shape PSNR, ghost and first-frame PSNR of the decoded x_hat0, each the mean over clips.
    Returns {"timesteps": [...], "shape_psnr": [...], "ghost": [...], "first_frame_psnr": [...]}, one value per t."""
    device = next(model.parameters()).device
    entries = [e for e in held_out(cfg, images) if set(e["motions"].values()) != {"still"}]
    video = torch.stack([frames_to_tensor(v).transpose(0, 1)
                         for v in ground_truth(entries, cfg["frames"])]).to(device)  # (N, 3, T, H, W)
    z0 = model.encode_video(video)  # (N, C, T, h, w)
    n = len(entries)
    z_img = model.image_latent(z0).repeat(2, 1, 1, 1, 1)  # (2N, C, T, h, w): text, then the empty prompt
    context = model.text_encoder([e["caption"] for e in entries] + [""] * n)  # (2N, L, D)
    fps = torch.full((2 * n,), 8.0, device=device)
    generator = torch.Generator().manual_seed(seed)
    result = {"timesteps": list(PROBE_TIMESTEPS), "shape_psnr": [], "ghost": [], "first_frame_psnr": []}
    for t in PROBE_TIMESTEPS:
        timesteps = torch.full((n,), t, device=device)
        z_t = q_sample(model.schedule, z0, timesteps, torch.randn(z0.shape, generator=generator).to(device))
        v_text, v_null = model.denoise(z_t.repeat(2, 1, 1, 1, 1), z_img, timesteps.repeat(2), context,
                                       fps).float().chunk(2)  # (N, C, T, h, w) each
        v_hat = v_null + cfg_scale * (v_text - v_null)
        abar = model.schedule.alphas_cumprod[t].item()
        x0 = abar ** 0.5 * z_t - (1 - abar) ** 0.5 * v_hat  # (N, C, T, h, w)
        if model.schedule.scale is not None:  # a rescaled model's clean prediction is s_t x0 (loss.input_scale)
            x0 = x0 / model.schedule.scale[t].item()
        clips = [to_uint8_frames(v) for v in model.autoencoder.decode(x0).clamp(-1, 1)]  # (T, H, W, 3) each
        result["shape_psnr"].append(float(np.mean([shape_psnr(c, e) for c, e in zip(clips, entries)])))
        result["ghost"].append(float(np.nanmean([ghost(c, e) for c, e in zip(clips, entries)])))
        result["first_frame_psnr"].append(float(np.mean([psnr(c[0], e["image"]) for c, e in zip(clips, entries)])))
    return result


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


# ----------------------------------------------------------------------------- command line

def held_out(cfg, images):
    """The held-out pairs at a checkpoint's frame size and shape scale (train.py's config as a dict)."""
    return held_out_pairs(images, size=cfg["height"], shape_scale=cfg.get("shape_scale", 1.0),
                          max_shapes=cfg.get("max_shapes", 3))


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
