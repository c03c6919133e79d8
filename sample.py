"""Animate an image from a prompt: python sample.py img.png "the red circle moves right".

The end of the data flow: the image is resized / center-cropped to the model's resolution and
encoded; its latent, repeated over T frames, is the x-cat condition. DDIM (eta = 0; with the input rescaling of
VideoCrafter2 and DynamiCrafter when the checkpoint trained with it) walks a v-prediction model down from noise
with classifier-free guidance,
v_hat = v(empty text) + s * (v(text) - v(empty text)), and the decoded frames go to an mp4 and a gif.
The checkpoint's EMA weights are used (and the script says so).

    python sample.py img.png "the red circle moves right" --ckpt out/shapes --seed 3
    python sample.py --prompts bench/prompts.csv --out samples/   # a whole benchmark (TI2V-Bench layout)

A benchmark is a CSV with the columns `image` (a file name, relative to --images, by default the
CSV's folder) and `prompt`, one row per video. Row i is sampled with seed --seed + i, so a row's
video does not depend on the batch it falls in; rows whose mp4 exists are skipped (a killed run
resumes), and out/index.csv lists what was made.
"""
import argparse
import csv
import io
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from data import fail, frames_to_tensor, resize_center_crop, to_uint8_frames, write_atomically, write_video
from demo.unet import DEMO
from model import SIZES, ModelConfig, MotifModel, autocast, load_checkpoint, pick_device, wants_bf16

MAX_IMAGE_PIXELS = 100_000_000  # refuse decompression bombs


# ----------------------------------------------------------------------------- the model of a checkpoint

DEMO_WEIGHTS = Path(__file__).parent / "demo" / "weights.pt"  # what sample.py animates with when given no --ckpt
MODEL_SIZES = (*SIZES, "demo")  # model.SIZES and the demo's


def build_model(cfg: ModelConfig) -> MotifModel:
    """The model a config describes, and the one place where the demo is chosen: size "demo" is demo/unet.py's
    U-Net (VideoCrafter2's with three additions); every other size is VideoCrafter2's U-Net of model.SIZES."""
    if cfg.size == "demo":
        return MotifModel(cfg, DEMO)
    if cfg.size not in SIZES:
        raise ValueError(f"unknown model size {cfg.size!r}; choose one of {', '.join(MODEL_SIZES)}")
    return MotifModel(cfg)


def load_model(path, device, use_ema=True):
    """The model of a checkpoint, for sampling: (model in eval mode on device, its config dict, its step).
    The EMA weights unless use_ema is False."""
    ckpt = load_checkpoint(path)
    config = ckpt.get("config")
    needed = ("model", "frames", "height", "width")
    if not isinstance(config, dict) or not all(key in config for key in needed):
        raise ValueError(f"{path}: its config lacks {[k for k in needed if k not in (config or {})]}: "
                         "not written by this version of train.py")
    model = build_model(ModelConfig.from_run_config(config))
    try:
        model.load_state_dict(ckpt["model"])
        if use_ema:
            unexpected = model.load_state_dict(ckpt["ema"], strict=False).unexpected_keys  # trainable parameters only
            if unexpected:
                raise RuntimeError(f"EMA weights that are not the model's: {unexpected[:2]}")
    except (RuntimeError, KeyError) as e:
        raise ValueError(f"{path}: its weights do not fit the model its config describes "
                         f"({str(e).splitlines()[0][:160]})") from None
    return model.to(device).eval(), config, ckpt["step"]


# ----------------------------------------------------------------------------- inputs

def load_image(path, height, width):
    """Any image (RGB, RGBA, grey, palette) -> (3, H, W) in [-1, 1], resized to cover then center-cropped.
    Transparent pixels are composited on white."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read {path} as an image: {str(e).splitlines()[0][:160]}") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    pixels = np.array(image.convert("RGB"))[None]                        # (1, H0, W0, 3), writable
    pixels = resize_center_crop(pixels, (height, width))[0]              # (H, W, 3)
    return frames_to_tensor(pixels[None])[0]  # (3, H, W) in [-1, 1]


def check_prompt(prompt, model):
    if not prompt.strip():
        raise ValueError("the prompt is empty: describe the motion, e.g. \"the red circle moves right\" "
                         "(the empty prompt is the unconditional half of guidance, not a prompt)")
    length, limit = model.text_encoder.length(prompt), model.text_encoder.max_len
    if length > limit:
        raise ValueError(f"the prompt is {length} tokens long; this model's text encoder reads at most {limit}")


# ----------------------------------------------------------------------------- DDIM

def ddim_timesteps(steps, num_steps=1000):
    """VideoCrafter's uniform DDIM timesteps 1, 1 + stride, ..., descending."""
    if not 1 <= steps <= num_steps // 2:
        raise ValueError(f"DDIM steps must be in 1..{num_steps // 2}, not {steps}")
    stride = num_steps // steps
    return [1 + i * stride for i in range(steps)][::-1]


def ddim(predict, z, schedule, steps, cfg_scale, dynamicrafter_end=False, progress=False):
    """DDIM, eta = 0, for a v-prediction model with classifier-free guidance: predict(z, t) -> (v(text), v(empty text)),
    z (B, C, T, h, w) the starting noise. Returns (the sampler's final latent, the last step's clean prediction).

    With the schedule's input rescaling s_t (loss.input_scale) the model saw s_t z0 at step t, so its clean
    prediction is divided by s_t and the next z_t is built from s_prev x0, as VideoCrafter2's and DynamiCrafter's
    samplers do. They differ only at the last step, from t = 1 to abar_0: VideoCrafter2 renoises s_0 x0 with s_0 = 1
    (an unscaled latent), DynamiCrafter (dynamicrafter_end) s_1 x0 with that step's own s_1 = 0.99925. The returned
    clean prediction, which sample.py decodes, is the unscaled x0 either way."""
    abar = schedule.alphas_cumprod
    timesteps = ddim_timesteps(steps, schedule.num_steps)
    for i, t in enumerate(tqdm(timesteps, desc="sample", disable=not progress)):
        last = i + 1 == len(timesteps)
        t_prev = 0 if last else timesteps[i + 1]
        a_t, a_prev = abar[t].item(), abar[t_prev].item()
        v_text, v_null = predict(z, t)
        v = v_null + cfg_scale * (v_text - v_null)  # classifier-free guidance
        x0 = a_t ** 0.5 * z - (1 - a_t) ** 0.5 * v  # (B, C, T, h, w): s_t x0 with rescaling
        eps = a_t ** 0.5 * v + (1 - a_t) ** 0.5 * z
        scaled_x0 = x0
        if schedule.scale is not None:
            s_t = schedule.scale[t].item()
            s_prev = s_t if last and dynamicrafter_end else schedule.scale[t_prev].item()
            x0 = x0 / s_t
            scaled_x0 = s_prev * x0
        z = a_prev ** 0.5 * scaled_x0 + (1 - a_prev) ** 0.5 * eps
    return z, x0


@torch.no_grad()
def ddim_sample(model, image, captions, frames, fps, steps=50, cfg_scale=7.5, seeds=(0,), progress=True):
    """image (B, 3, H, W) in [-1, 1], B captions, fps (one, or B), B seeds -> video (B, 3, T, H, W) in [-1, 1].

    DDIM (ddim), each sample's starting noise from its own seed. The result is the last step's prediction of the
    clean latent (VideoCrafter returns z at alphas_cumprod[0], which keeps 3 % of noise)."""
    device = next(model.parameters()).device
    b = image.shape[0]
    z_img = model.encode_video(image.to(device)[:, :, None]).expand(-1, -1, frames, -1, -1)  # (B, C, T, h, w): x-cat
    context = model.text_encoder(list(captions) + [""] * b)  # (2B, L, D): text, then the empty prompt
    z = torch.stack([torch.randn(z_img.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)
    fps = torch.as_tensor(fps, dtype=torch.float32, device=device).expand(b).repeat(2)  # (2B,): one, or one each

    def predict(z, t):
        tt = torch.full((2 * b,), t, device=device, dtype=torch.long)
        v = model.denoise(torch.cat([z, z]), torch.cat([z_img, z_img]), tt, context, fps)  # (2B, C, T, h, w)
        return v.float().chunk(2)  # fp32 under bf16: v(text), v(empty text)

    _, x0 = ddim(predict, z, model.schedule, steps, cfg_scale, progress=progress)
    return model.autoencoder.decode(x0).clamp(-1, 1)  # (B, 3, T, H, W): the last step's clean prediction


# ----------------------------------------------------------------------------- a benchmark set

def read_benchmark(prompts_csv, images_dir):
    """Rows of a TI2V-Bench style CSV (columns image, prompt) -> [(row, image path, prompt)]."""
    prompts_csv = Path(prompts_csv)
    if not prompts_csv.is_file():
        raise ValueError(f"prompts file {prompts_csv} does not exist")
    try:
        with open(prompts_csv, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"image", "prompt"} <= set(reader.fieldnames):
                raise ValueError(f"{prompts_csv} needs a header with the columns image and prompt "
                                 f"(found {reader.fieldnames})")
            rows = [(i, (row["image"] or "").strip(), (row["prompt"] or "").strip()) for i, row in enumerate(reader)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"cannot read {prompts_csv} as UTF-8 CSV: {e}") from None
    images_dir = Path(images_dir) if images_dir else prompts_csv.parent
    bad = [f"row {i + 2}" for i, image, prompt in rows if not image or not prompt]
    missing = [image for _, image, _ in rows if image and not (images_dir / image).is_file()]
    if bad or missing:
        raise ValueError(f"{prompts_csv}: {len(bad)} rows without image or prompt ({', '.join(bad[:3])}), "
                         f"{len(missing)} images missing from {images_dir} ({', '.join(missing[:3])})")
    if not rows:
        raise ValueError(f"{prompts_csv} has no rows")
    return [(i, images_dir / image, prompt) for i, image, prompt in rows]


def video_name(row, image):
    return f"{row:04d}_{Path(image).stem}.mp4"


def sample_benchmark(model, cfg, rows, out_dir, args):
    """Sample every row not yet done, batch by batch; each mp4 is written whole, then renamed into place."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for _, image, prompt in rows:
        check_prompt(prompt, model)
    todo = [r for r in rows if not (out_dir / video_name(r[0], r[1])).is_file()]
    print(f"{len(rows)} rows, {len(rows) - len(todo)} already sampled in {out_dir}, {len(todo)} to go")
    for start in tqdm(range(0, len(todo), args.batch), desc="benchmark", unit="batch"):
        batch = todo[start:start + args.batch]
        images = torch.stack([load_image(image, cfg["height"], cfg["width"]) for _, image, _ in batch])
        videos = ddim_sample(model, images, [p for _, _, p in batch], cfg["frames"], args.fps, args.steps, args.cfg,
                             [args.seed + row for row, _, _ in batch], progress=False)
        for (row, image, _), video in zip(batch, videos):
            write_video(out_dir / video_name(row, image), to_uint8_frames(video), args.fps)
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["row", "image", "prompt", "seed", "video"])
    writer.writerows([row, image.name, prompt, args.seed + row, video_name(row, image)] for row, image, prompt in rows)
    index = out_dir / "index.csv"
    write_atomically(index, lambda f: f.write(table.getvalue().encode("utf-8")))
    print(f"wrote {len(todo)} videos; {index} lists all {len(rows)}")


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("image", nargs="?", help="the first frame (any size or mode; resized and center-cropped)")
    p.add_argument("prompt", nargs="?", help="what should move, and how")
    p.add_argument("--prompts", help="sample a benchmark: a CSV with the columns image, prompt")
    p.add_argument("--images", help="folder of the benchmark's images (default: the CSV's folder)")
    p.add_argument("--batch", type=int, default=8, help="benchmark rows sampled together")
    p.add_argument("--ckpt", default=None, help="a train.py checkpoint, or its run folder (uses its latest); "
                   f"default: the shipped demo weights, {DEMO_WEIGHTS.relative_to(Path(__file__).parent)}")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale (default: the run's cfg_scale, 7.5 unless its config says)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=8, help="frame rate told to the model and written to the files")
    p.add_argument("--out", default="out/sample", help="one image: output path without extension (.mp4 and .gif "
                   "are written); a benchmark: the output folder")
    p.add_argument("--upscale", type=int, default=0, help="nearest-neighbour upscale of the written frames (0: to >= 256 px)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = p.parse_args(argv)
    try:
        if bool(args.prompts) == bool(args.image or args.prompt):
            raise ValueError("give either an image and a prompt, or --prompts FILE.csv")
        if args.image and args.prompt is None:
            raise ValueError("give a prompt after the image, e.g. sample.py img.png \"the red circle moves right\"")
        ddim_timesteps(args.steps)
        if not (math.isfinite(args.fps) and args.fps > 0) or args.batch < 1 or args.upscale < 0 or args.seed < 0:
            raise ValueError(f"--fps and --batch must be positive, --upscale and --seed 0 or more (got {args.fps}, "
                             f"{args.batch}, {args.upscale}, {args.seed})")
        if args.cfg is not None and not (math.isfinite(args.cfg) and args.cfg >= 0):
            raise ValueError(f"--cfg (the guidance scale) must be a number 0 or more, not {args.cfg}")
        rows = read_benchmark(args.prompts, args.images) if args.prompts else None
        device = pick_device(args.device)
        if args.ckpt is None:
            if args.no_ema:
                raise ValueError("the shipped demo weights are EMA weights only: --no-ema needs --ckpt")
            args.ckpt = DEMO_WEIGHTS
            print(f"no --ckpt: using the shipped demo weights {DEMO_WEIGHTS.relative_to(Path(__file__).parent)} "
                  "(the shapes demo's EMA weights: docs/demo-weights.md)")
        model, cfg, step = load_model(args.ckpt, device, use_ema=not args.no_ema)
        args.cfg = cfg.get("cfg_scale", 7.5) if args.cfg is None else args.cfg
        print(f"sampling {args.ckpt} (step {step}, {'raw' if args.no_ema else 'EMA'} weights): {cfg['frames']} frames "
              f"at {cfg['height']}x{cfg['width']}, {args.steps} DDIM steps, cfg {args.cfg}, seed {args.seed}")
        precision = autocast(device, wants_bf16(cfg.get("dtype", "auto"), device))  # as the run trained
        if rows:
            with precision:
                sample_benchmark(model, cfg, rows, args.out, args)
            return
        check_prompt(args.prompt, model)
        image = load_image(args.image, cfg["height"], cfg["width"])
        with precision:
            video = ddim_sample(model, image[None], [args.prompt], cfg["frames"], args.fps, args.steps, args.cfg,
                                [args.seed])
        frames = to_uint8_frames(video[0], args.upscale or max(1, -(-256 // min(cfg["height"], cfg["width"]))))
        out = Path(args.out)
        for suffix in (".mp4", ".gif"):
            write_video(out.with_suffix(suffix), frames, args.fps)
    except (ValueError, OSError) as e:
        fail(e)
    print(f"wrote {out.with_suffix('.mp4')} and {out.with_suffix('.gif')}")


if __name__ == "__main__":
    main(sys.argv[1:])
