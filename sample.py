"""Animate an image from a prompt: python sample.py img.png "the red circle moves right".

The end of the data flow: the image is resized / center-cropped to the model's resolution and
encoded; its latent, repeated over T frames, is the x-cat condition. DDIM (eta = 0) walks a
v-prediction model down from noise with classifier-free guidance,
v_hat = v(empty text) + s * (v(text) - v(empty text)), and the decoded frames go to an mp4 and a gif.
The checkpoint's EMA weights are used (and the script says so).
"""
import argparse
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from loss import Schedule
from model import MotifModel
from train import Config, load_checkpoint, model_config

MAX_IMAGE_PIXELS = 100_000_000  # refuse decompression bombs


def load_model(ckpt_path, device, use_ema=True):
    """Rebuild the model from a train.py checkpoint; EMA weights unless use_ema is False."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = Config(**ckpt["config"])
    model = MotifModel(model_config(cfg))
    model.load_state_dict(ckpt["model"])
    if use_ema:
        trainable = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            for p, e in zip(trainable, ckpt["ema"]):
                p.copy_(e)
    return model.to(device).eval(), cfg, ckpt["step"]


def load_image(path, height, width):
    """Any image (RGB, RGBA, grey, palette) -> (3, H, W) in [-1, 1], resized to cover then center-cropped."""
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
    image = image.convert("RGB")
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)  # (3, H, W)
    return pixels / 127.5 - 1


@torch.no_grad()
def ddim_sample(model, image, captions, frames, fps, steps=50, cfg_scale=7.5, seed=0, progress=True):
    """image (B, 3, H, W) in [-1, 1], captions list of B strings -> video (B, 3, T, H, W) in [-1, 1].

    DDIM over VideoCrafter's uniform timesteps (1, 1 + 1000/steps, ...), eta = 0, v-prediction."""
    device = next(model.parameters()).device
    schedule = Schedule()
    abar = schedule.alphas_cumprod
    b = image.shape[0]
    video = image.to(device)[:, :, None].expand(-1, -1, frames, -1, -1)  # (B, 3, T, H, W)
    z_img = model.image_latent(model.encode_video(video))  # (B, C, T, h, w)
    context = model.text_encoder(list(captions) + [""] * b)  # (2B, L, D): text, then the empty prompt
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(z_img.shape, generator=generator).to(device)  # (B, C, T, h, w)
    fps = torch.full((2 * b,), float(fps), device=device)
    stride = schedule.num_steps // steps  # VideoCrafter's uniform DDIM timesteps 1, 1 + stride, ...
    timesteps = [1 + i * stride for i in range(steps)][::-1]
    for i, t in enumerate(tqdm(timesteps, desc="sample", disable=not progress)):
        a_t = abar[t].item()
        a_prev = abar[timesteps[i + 1]].item() if i + 1 < len(timesteps) else abar[0].item()
        tt = torch.full((2 * b,), t, device=device, dtype=torch.long)
        v_text, v_null = model.denoise(torch.cat([z, z]), torch.cat([z_img, z_img]), tt, context, fps).chunk(2)
        v = v_null + cfg_scale * (v_text - v_null)  # classifier-free guidance
        x0 = a_t ** 0.5 * z - (1 - a_t) ** 0.5 * v
        eps = a_t ** 0.5 * v + (1 - a_t) ** 0.5 * z
        z = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return model.autoencoder.decode(z).clamp(-1, 1)  # (B, 3, T, H, W)


def to_uint8_frames(video, upscale=1):
    """(3, T, H, W) in [-1, 1] -> (T, H*upscale, W*upscale, 3) uint8."""
    frames = ((video.float().cpu() + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 3, 0)
    if upscale > 1:
        frames = frames.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2)
    return frames.numpy()


def write_video(frames, out_prefix, fps):
    """Write out_prefix.mp4 and out_prefix.gif; return both paths."""
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    mp4, gif = out_prefix.with_suffix(".mp4"), out_prefix.with_suffix(".gif")
    iio.imwrite(mp4, frames, fps=fps, codec="libx264", macro_block_size=1)
    iio.imwrite(gif, frames, duration=1000 / fps, loop=0)
    return mp4, gif


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("image", help="the first frame (any size or mode; resized and center-cropped)")
    p.add_argument("prompt", help="what should move, and how")
    p.add_argument("--ckpt", default="out/shapes", help="a train.py checkpoint, or its run folder (uses its latest)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=8, help="frame rate told to the model and written to the files")
    p.add_argument("--out", default="out/sample", help="output path without extension: writes .mp4 and .gif")
    p.add_argument("--upscale", type=int, default=0, help="nearest-neighbour upscale of the written frames (0: to >= 256 px)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        if not args.prompt.strip():
            raise ValueError("the prompt is empty: describe the motion, e.g. \"the red circle moves right\"")
        if not 1 <= args.steps <= 500 or args.fps <= 0:
            raise ValueError(f"--steps must be in 1..500 and --fps positive (got {args.steps}, {args.fps})")
        model, cfg, step = load_model(args.ckpt, args.device, use_ema=not args.no_ema)
        limit = model.text_encoder.max_len
        if len(args.prompt.encode("utf-8")) > limit:
            raise ValueError(f"the prompt is {len(args.prompt.encode('utf-8'))} bytes; this model reads at most {limit}")
        image = load_image(args.image, cfg.height, cfg.width)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"sampling {args.ckpt} (step {step}, {'EMA' if not args.no_ema else 'raw'} weights): "
          f"{cfg.frames} frames at {cfg.height}x{cfg.width}, {args.steps} DDIM steps, cfg {args.cfg}, seed {args.seed}")
    video = ddim_sample(model, image[None], [args.prompt], cfg.frames, args.fps, args.steps, args.cfg, args.seed)
    upscale = args.upscale or max(1, -(-256 // min(cfg.height, cfg.width)))
    mp4, gif = write_video(to_uint8_frames(video[0], upscale), args.out, args.fps)
    print(f"wrote {mp4} and {gif}")


if __name__ == "__main__":
    main(sys.argv[1:])
