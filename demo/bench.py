"""ShapesBench, the demo's scorer: does a video do what the text says? tools/shapesbench.py samples a checkpoint's
held-out pairs and scores them with this file (`python -m tools.shapesbench --ckpt out/shapes`); train.py scores its
validation samples with it.

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

"""
import re

import numpy as np
import torch

from data import frames_to_tensor, to_uint8_frames, to_unit_range, write_video
from demo.shapes import DIRECTIONS, PALETTE, ShapesDataset, held_out_pairs, render_clip
from flow import heatmap_from_flow
from loss import latent_heatmap, q_sample, v_target

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


# ----------------------------------------------------------------------------- the held-out pairs of a run

def held_out(cfg, images):
    """The held-out pairs at a checkpoint's frame size and shape scale (train.py's config as a dict)."""
    return held_out_pairs(images, size=cfg["height"], shape_scale=cfg.get("shape_scale", 1.0),
                          max_shapes=cfg.get("max_shapes", 3))


