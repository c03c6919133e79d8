"""Optical flow -> motion heatmaps, the weights of MotiF's motion focal loss.

Where it sits: data.py hands over a clip of T frames; this file turns it into a heatmap
m (T, H, W) in [0, 1] that is ~1 where things move and ~0 where they do not; loss.py
area-downsamples m to the latent size and weights the diffusion loss with it.

    frames (T, 3, H, W) --RAFT--> flow (T-1, 2, H, W), pixels
          --> x = |flow| / width            relative motion, independent of the resolution
          --> sigma(x) = 1 / (1 + exp(100 (0.05 - x)))      pair heatmaps (T-1, H, W)
          --> frame i: max of the pair into it and the pair out of it       (T, H, W)

The synthetic shapes videos know their exact flow and skip RAFT, not the rest.

    python flow.py cache ROOT --size 320x512 --max-stride 8   # heatmaps of a video folder, once
    python flow.py show VIDEO --out vis.mp4                     # frame | flow | heatmap, side by side
"""
import argparse
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.optical_flow import Raft_Large_Weights, Raft_Small_Weights, raft_large, raft_small
from torchvision.utils import flow_to_image
from tqdm import tqdm

MOTION_THRESHOLD = 0.05   # relative motion (fraction of the width per frame) where sigma = 0.5
MOTION_SHARPNESS = 100.0  # slope of sigma: 0.0067 at no motion, 0.993 at 0.1 widths per frame
RAFT_MIN_SIDE = 128       # RAFT sees frames at least this big (small ones are upsampled)
RAFT_MULTIPLE = 8         # and padded to a multiple of this

# ---- flow -> heatmaps ----


def sigma(x):
    """1 / (1 + exp(100 (0.05 - x))), elementwise: polarises relative motion to ~0 or ~1."""
    return torch.sigmoid(MOTION_SHARPNESS * (x - MOTION_THRESHOLD))


def pair_heatmaps(flow, width=None):
    """flow (..., 2, H, W) in pixels -> heatmaps (..., H, W) of the frame pairs.

    width: the width in pixels of the frames the flow was computed on (default: the flow's)."""
    width = width or flow.shape[-1]
    return sigma(flow.norm(dim=-3) / width)                        # (..., H, W)


def frame_heatmaps(pair_heatmap):
    """Pair heatmaps (..., T-1, H, W) -> frame heatmaps (..., T, H, W).

    Frame i gets the max of pair i-1 (into it) and pair i (out of it); the first and last frames
    have one side only. sigma is monotonic, so this is sigma of the larger motion."""
    out_of = torch.cat([pair_heatmap, pair_heatmap[..., -1:, :, :]], dim=-3)   # (..., T, H, W)
    into = torch.cat([pair_heatmap[..., :1, :, :], pair_heatmap], dim=-3)      # (..., T, H, W)
    return torch.maximum(out_of, into)


def heatmap_from_flow(flow, width=None):
    """flow (T-1, 2, H, W) in pixels -> heatmap (T, H, W) in [0, 1]."""
    return frame_heatmaps(pair_heatmaps(flow, width))


# ---- RAFT ----


def load_raft_model(weights):
    """torchvision's raft_small / raft_large with its own pretrained weights ("small", "large"),
    or with a state dict file of either (which one is found from the file)."""
    if weights == "small":
        return raft_small(weights=Raft_Small_Weights.DEFAULT)
    if weights == "large":
        return raft_large(weights=Raft_Large_Weights.DEFAULT)
    path = Path(weights)
    if not path.is_file():
        raise SystemExit(f"error: RAFT weights must be 'small', 'large' or a state dict file; {weights} is none")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:      # torch.load raises many types for a file that is not a checkpoint
        raise SystemExit(f"error: cannot read RAFT weights {path}: {str(error).splitlines()[0]}")
    for build in (raft_small, raft_large):
        model = build()
        try:
            model.load_state_dict(state)
            return model
        except (RuntimeError, TypeError, AttributeError):
            continue
    raise SystemExit(f"error: {path} is neither a torchvision raft_small nor a raft_large state dict")


class RAFT:
    """Frozen RAFT (fp32, eval, no grad): frames in [-1, 1] -> optical flow in pixels."""

    def __init__(self, weights="small", device="cpu", chunk=8):
        self.device, self.chunk = torch.device(device), chunk
        self.model = load_raft_model(weights).to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def pairs(self, first, second):
        """Flow from first to second, both (N, 3, H, W) in [-1, 1] -> (N, 2, H, W) in pixels.

        Frames whose smaller side is under 128 px are upsampled (bilinear) for RAFT and the flow
        is scaled back (area average, values divided by the factor); all are padded to a multiple
        of 8 by repeating the border. Pairs go through RAFT `chunk` at a time."""
        height, width = first.shape[-2:]
        scale = max(1.0, RAFT_MIN_SIDE / min(height, width))
        run_height, run_width = round(height * scale), round(width * scale)
        pad = (0, -run_width % RAFT_MULTIPLE, 0, -run_height % RAFT_MULTIPLE)
        flows = []
        for start in range(0, len(first), self.chunk):
            images = [images[start:start + self.chunk].to(self.device, torch.float32) for images in (first, second)]
            if scale > 1:
                images = [F.interpolate(x, size=(run_height, run_width), mode="bilinear", align_corners=False)
                          for x in images]                                     # (n, 3, h, w)
            images = [F.pad(x, pad, mode="replicate") for x in images]         # (n, 3, h+, w+)
            flow = self.model(*images)[-1][..., :run_height, :run_width]       # (n, 2, h, w)
            if scale > 1:
                flow = F.interpolate(flow, size=(height, width), mode="area")  # (n, 2, H, W)
                flow = flow * torch.tensor([width / run_width, height / run_height],
                                           device=flow.device).view(1, 2, 1, 1)
            flows.append(flow.to(first.device))
        return torch.cat(flows)                                                # (N, 2, H, W)

    def __call__(self, frames):
        """frames (T, 3, H, W) in [-1, 1] -> flow (T-1, 2, H, W) between consecutive frames."""
        return self.pairs(frames[:-1], frames[1:])


def video_heatmap(frames, raft):
    """frames (T, 3, H, W) in [-1, 1] -> motion heatmap (T, H, W) through RAFT."""
    return heatmap_from_flow(raft(frames))


# ---- command line: cache a folder's heatmaps, show one video's ----


def cache_is_complete(path, max_stride):
    """Whether the cache file at path holds every stride up to max_stride that its video allows
    (False for a missing or damaged file, or one written with a smaller --max-stride)."""
    try:
        with np.load(path) as cache:
            needed = min(max_stride, int(cache["num_frames"]) - 1)
            return all(f"stride_{stride}" in cache.files for stride in range(1, needed + 1))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False


def cache_folder(root, weights, size, max_stride, device):
    """Store, for every listed video, the pair heatmaps of frames (j, j+s) for all j and each
    stride s <= max_stride, as uint8 (round(255 h)) under "stride_s", and the video's frame count
    under "num_frames", in data.cache_path(root, video, size). Complete caches are kept; missing,
    damaged or too-few-strides ones are (re)computed. Unusable videos are skipped and counted;
    a folder where nothing is usable is a SystemExit."""
    from data import (UnusableVideo, cache_path, frames_to_tensor, load_frames, read_captions, resize_center_crop,
                      save_npz, summarise)
    videos, skipped = read_captions(root)
    todo = [video for video in videos if not cache_is_complete(cache_path(root, video["path"], size), max_stride)]
    print(f"{root}: {len(videos)} videos listed, {len(videos) - len(todo)} already cached, {len(skipped)} "
          f"skipped{': ' + summarise(skipped) if skipped else ''}")
    raft = RAFT(weights, device) if todo else None
    started, done, pairs, unusable = time.perf_counter(), 0, 0, []
    for video in tqdm(todo, desc="caching heatmaps", unit="video", disable=None):
        try:
            frames, _ = load_frames(Path(root) / video["path"], min_frames=2)   # (N, H0, W0, 3)
        except UnusableVideo as error:
            unusable.append((error.reason, video["path"]))
            continue
        frames = resize_center_crop(frames, size)                               # (N, H, W, 3)
        strides = range(1, min(max_stride, len(frames) - 1) + 1)
        heatmaps = {"num_frames": np.array(len(frames))}
        with tqdm(total=sum(len(frames) - s for s in strides), desc=video["path"], unit="pair", leave=False,
                  disable=None) as bar:
            for stride in strides:
                chunks = []
                for start in range(0, len(frames) - stride, raft.chunk):
                    end = min(start + raft.chunk, len(frames) - stride)
                    flow = raft.pairs(frames_to_tensor(frames[start:end]),
                                      frames_to_tensor(frames[start + stride:end + stride]))  # (n, 2, H, W)
                    chunks.append(pair_heatmaps(flow))                                  # (n, H, W)
                    bar.update(end - start)
                heatmaps[f"stride_{stride}"] = (torch.cat(chunks) * 255).round().to(torch.uint8).numpy()  # (N-s, H, W)
        save_npz(cache_path(root, video["path"], size), **heatmaps)
        done, pairs = done + 1, pairs + bar.total
    seconds = time.perf_counter() - started
    print(f"cached {done} videos ({pairs} frame pairs) in {seconds:.1f} s ({seconds / max(done, 1):.1f} s/clip)"
          f"; {len(unusable)} unusable{': ' + summarise(unusable) if unusable else ''}")
    if len(videos) == len(unusable):
        raise SystemExit(f"error: no usable video in {root}")


def show(video_path, weights, size, num_frames, stride, out, device):
    """Write an animation: frame | flow (colour = direction, white = still) | heatmap."""
    from data import FALLBACK_FPS, UnusableVideo, frames_to_tensor, load_frames, resize_center_crop, write_video
    try:
        frames, fps = load_frames(video_path, (num_frames - 1) * stride + 1)    # (N, H0, W0, 3)
    except UnusableVideo as error:
        raise SystemExit(f"error: {video_path}: {error}")
    clip = resize_center_crop(frames[:(num_frames - 1) * stride + 1:stride], size)   # (T, H, W, 3)
    flow = RAFT(weights, device)(frames_to_tensor(clip))                        # (T-1, 2, H, W)
    heatmap = heatmap_from_flow(flow)                                           # (T, H, W)
    flow_colours = flow_to_image(torch.cat([flow, torch.zeros_like(flow[:1])]))  # (T, 3, H, W), last: none
    heatmap_grey = (heatmap * 255).round().to(torch.uint8)[:, None].expand(-1, 3, -1, -1)  # (T, 3, H, W)
    panels = torch.cat([torch.from_numpy(clip).permute(0, 3, 1, 2), flow_colours, heatmap_grey], dim=3)
    write_video(out, panels.permute(0, 2, 3, 1).numpy(), (fps or FALLBACK_FPS) / stride)  # (T, H, 3W, 3)
    print(f"wrote {out}: {num_frames} frames of {video_path} at stride {stride}, "
          f"moving (heatmap > 0.5): {(heatmap > 0.5).float().mean():.1%} of pixels")


def parse_size(text):
    """'320x512' -> (320, 512)."""
    try:
        height, width = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW like 320x512, got {text!r}")
    if height <= 0 or width <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return height, width


def main(argv=None):
    parser = argparse.ArgumentParser(description="RAFT optical flow -> MotiF motion heatmaps")
    commands = parser.add_subparsers(dest="command", required=True)
    cache = commands.add_parser("cache", help="cache the heatmaps of every video in a folder")
    cache.add_argument("root", type=Path, help="folder with captions.csv or captions.jsonl")
    cache.add_argument("--size", type=parse_size, default=(320, 512), help="HxW the clips are trained at")
    cache.add_argument("--max-stride", type=int, default=8, help="largest frame stride the training uses")
    show_parser = commands.add_parser("show", help="visualise the flow and heatmap of a video")
    show_parser.add_argument("video", type=Path)
    show_parser.add_argument("--size", type=parse_size, default=(320, 512), help="HxW")
    show_parser.add_argument("--frames", type=int, default=16)
    show_parser.add_argument("--stride", type=int, default=1, help="use every stride-th frame")
    show_parser.add_argument("--out", type=Path, required=True, help="vis.mp4 or vis.gif")
    for command in (cache, show_parser):
        command.add_argument("--weights", default="small", help="small, large (torchvision's, downloaded "
                             "once) or a path to a torchvision RAFT state dict")
        command.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but no CUDA GPU is available")

    if args.command == "cache":
        if args.max_stride < 1:
            parser.error("--max-stride must be at least 1")
        cache_folder(args.root, args.weights, args.size, args.max_stride, args.device)
    else:
        if args.frames < 2 or args.stride < 1:
            parser.error("--frames must be at least 2 and --stride at least 1")
        if args.out.suffix.lower() not in (".mp4", ".gif"):
            parser.error(f"--out must end in .mp4 or .gif, got {args.out}")
        show(args.video, args.weights, args.size, args.frames, args.stride, args.out, args.device)


if __name__ == "__main__":
    main()
