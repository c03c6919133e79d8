"""Look at data and prepare it for training: every data command in one place.

    python prepare.py demo-image first.png            # a held-out shapes first frame, and the prompts that fit it
    python prepare.py demo-video clip.gif             # a shapes training clip next to its motion heatmap
    python prepare.py check videos --frames 16        # which videos of a folder are usable, and why not the others
    python prepare.py heatmaps videos --size 320x512 --max-stride 8    # RAFT motion heatmaps (1/8 size), cached once
    python prepare.py latents videos --init model.ckpt --size 320x512  # kl-f8 latents, cached once (full recipe)
    python prepare.py show clip.mp4 --out vis.mp4     # frame | optical flow | heatmap, side by side

Where it sits: data.py reads what these commands write (data.cache_path, data.latent_cache_path),
flow.py computes the heatmaps. Every cache file is written whole and renamed into place, so a
killed command leaves no half cache; rerunning a command skips what is already cached.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import flow_to_image
from tqdm import tqdm

from checkpoint import load_kl_autoencoder, read_state_dict
from data import (cache_path, heatmap_cache_is_complete, heatmap_size, latent_cache_path, read_captions, save_npz,
                  summarise, video_root)
from flow import RAFT, heatmap_from_flow
from shapes import ShapesDataset, held_out_pairs
from train import load_config
from utils import autocast, fail, parse_size, pick_device, wants_bf16
from video_io import FALLBACK_FPS, UnusableVideo, frames_to_tensor, load_frames, resize_center_crop, write_video


# ----------------------------------------------------------------------------- the shapes videos

def upscale(image, size):
    """Nearest-neighbour resize of uint8 (H, W, 3) to size x size, for looking at 32 px frames."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.NEAREST))


DEMO = load_config(["--preset", "shapes"])  # the demo's videos: its frames and shapes per scene


def demo_image(path, index, view_size):
    """Write held-out first frame number `index` of the demo (upscaled for viewing) and print the prompts that fit it."""
    held_out = held_out_pairs(max_shapes=DEMO.max_shapes)
    prompts = [entry for entry in held_out if entry["image_id"] == index]
    if not prompts:
        raise ValueError(f"--index must pick a held-out image, 0..{held_out[-1]['image_id']}")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(upscale(prompts[0]["image"], view_size)).save(path)
    print(f"wrote {path}; prompts that fit it:")
    for entry in prompts:
        print(f"  {entry['caption']}")


def demo_video(path, index, view_size):
    """Write training clip number `index` beside its motion heatmap."""
    item = ShapesDataset("train", frames=DEMO.frames, max_shapes=DEMO.max_shapes)[index]
    video = item["video"].permute(1, 2, 3, 0)                                         # (T, H, W, 3) uint8
    heatmap = (item["heatmap"][..., None] * 255).round().to(torch.uint8).expand_as(video)  # (T, H, W, 3)
    panels = torch.cat([video, heatmap], dim=2).numpy()                              # (T, H, 2W, 3)
    scale = view_size // panels.shape[1] or 1
    write_video(path, panels.repeat(scale, axis=1).repeat(scale, axis=2), float(item["fps"]))
    print(f"wrote {path} (clip | motion heatmap) at {float(item['fps']):g} fps: {item['caption']}")


# ----------------------------------------------------------------------------- a folder of videos

def check_folder(root, frames):
    """Decode every listed video and report which are usable; a ValueError if none is."""
    videos, skipped = read_captions(root)
    root = video_root(root)  # a captions file given by name: its folder
    usable = 0
    for video in tqdm(videos, desc="decoding", unit="video", disable=None):
        try:
            load_frames(Path(root) / video["path"], frames)
            usable += 1
        except UnusableVideo as error:
            skipped.append((error.reason, video["path"]))
    print(f"{root}: {usable} usable, {len(skipped)} skipped (clips of {frames} frames)")
    for line in summarise(skipped).split("; ") if skipped else []:
        print(f"  skipped {line}")
    if usable == 0:
        raise ValueError(f"no usable video in {root}")


def cache_heatmaps(root, weights, size, max_stride, device):
    """Store, for every listed video, the pair heatmaps of frames (j, j+s) for all j and each stride s <= max_stride,
    laid on frame j, under "stride_s", and of the backward pairs (j+s, j), laid on frame j+s, under "back_s" (a clip's
    last frame takes its heatmap from these: flow.clip_pairs), computed by RAFT.heatmaps (flow at a short side of
    128 px, area-averaged to data.heatmap_size(size), 1/8 of the frames), as uint8 (round(255 h)), with the video's
    frame count under "num_frames" and the heatmaps' size under "heatmap_size", in data.cache_path(root, video,
    size). Complete caches are kept; missing, damaged, too-few-strides and older ones are (re)computed. Unusable
    videos are skipped and counted; a folder where nothing is usable is a ValueError."""
    videos, skipped = read_captions(root)
    root = video_root(root)  # a captions file given by name: its folder
    todo = [video for video in videos
            if not heatmap_cache_is_complete(cache_path(root, video["path"], size), size, max_stride)]
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
        heatmaps = {"num_frames": np.array(len(frames)), "heatmap_size": np.array(heatmap_size(size))}
        with tqdm(total=sum(2 * (len(frames) - s) for s in strides), desc=video["path"], unit="pair", leave=False,
                  disable=None) as bar:
            for stride in strides:
                for key, (first, second) in ((f"stride_{stride}", (0, stride)), (f"back_{stride}", (stride, 0))):
                    chunks = []
                    for start in range(0, len(frames) - stride, raft.chunk):
                        end = min(start + raft.chunk, len(frames) - stride)
                        chunks.append(raft.heatmaps(frames_to_tensor(frames[start + first:end + first]),
                                                    frames_to_tensor(frames[start + second:end + second]),
                                                    heatmap_size(size)))               # (n, h, w)
                        bar.update(end - start)
                    heatmaps[key] = (torch.cat(chunks) * 255).round().to(torch.uint8).numpy()  # (N-s, h, w)
        save_npz(cache_path(root, video["path"], size), **heatmaps)
        done, pairs = done + 1, pairs + bar.total
    seconds = time.perf_counter() - started
    print(f"cached {done} videos ({pairs} frame pairs) in {seconds:.1f} s ({seconds / max(done, 1):.1f} s/clip)"
          f"; {len(unusable)} unusable{': ' + summarise(unusable) if unusable else ''}")
    if len(videos) == len(unusable):
        raise ValueError(f"no usable video in {root}")


def cache_latents(root, autoencoder, kind, size, device, chunk=16):
    """Store every listed video's latents, frame by frame (both autoencoders work on single frames), with frames
    resized and center-cropped to size = (H, W): {"latents": float16 (N, C, h, w), "autoencoder": kind,
    "fps": the container's fps or 0} in data.latent_cache_path. A training clip's latent is then latents[picked]:
    no decoding, no encoder on the training GPU. Existing caches are kept; unusable videos are counted. The frames
    are encoded in the precision the training step encodes in (utils.wants_bf16: bf16 on a GPU)."""
    device = torch.device(device)
    videos, skipped = read_captions(root)
    root = video_root(root)  # a captions file given by name: its folder
    todo = [v for v in videos if not latent_cache_path(root, v["path"], size).is_file()]
    print(f"{root}: {len(videos)} videos listed, {len(videos) - len(todo)} already encoded, {len(skipped)} skipped")
    autoencoder = autoencoder.to(device)
    unusable = []
    for video in tqdm(todo, desc="encoding", unit="video", disable=None):
        try:
            frames, fps = load_frames(Path(root) / video["path"])                      # (N, H0, W0, 3)
        except UnusableVideo as error:
            unusable.append((error.reason, video["path"]))
            continue
        latents = []
        with torch.no_grad(), autocast(device, wants_bf16("auto", device)):  # the precision the step encodes in
            for start in range(0, len(frames), chunk):
                part = frames_to_tensor(resize_center_crop(frames[start:start + chunk], size))  # (n, 3, H, W)
                z = autoencoder.encode(part.transpose(0, 1)[None].to(device)).float()           # (1, C, n, h, w)
                latents.append(z[0].transpose(0, 1).half().cpu())                               # (n, C, h, w)
        save_npz(latent_cache_path(root, video["path"], size), latents=torch.cat(latents).numpy(),
                 autoencoder=np.array(kind), fps=np.array(fps or 0.0))
    print(f"encoded {len(todo) - len(unusable)} videos; {len(unusable)} unusable"
          f"{': ' + summarise(unusable) if unusable else ''}")
    if len(videos) == len(unusable):
        raise ValueError(f"no usable video in {root}")


def show(video_path, weights, size, num_frames, stride, out, device):
    """Write an animation: frame | flow (colour = direction, white = still) | heatmap."""
    try:
        frames, fps = load_frames(video_path, (num_frames - 1) * stride + 1)    # (N, H0, W0, 3)
    except UnusableVideo as error:
        raise ValueError(f"{video_path}: {error}") from None
    clip = resize_center_crop(frames[:(num_frames - 1) * stride + 1:stride], size)   # (T, H, W, 3)
    flow = RAFT(weights, device)(frames_to_tensor(clip))                        # (T, 2, H, W)
    heatmap = heatmap_from_flow(flow)                                           # (T, H, W)
    flow_colours = flow_to_image(torch.cat([flow[:-1], -flow[-1:]]))  # (T, 3, H, W): the last's backward flow turned
    heatmap_grey = (heatmap * 255).round().to(torch.uint8)[:, None].expand(-1, 3, -1, -1)  # (T, 3, H, W)
    panels = torch.cat([torch.from_numpy(clip).permute(0, 3, 1, 2), flow_colours, heatmap_grey], dim=3)
    write_video(out, panels.permute(0, 2, 3, 1).numpy(), (fps or FALLBACK_FPS) / stride)  # (T, H, 3W, 3)
    print(f"wrote {out}: {num_frames} frames of {video_path} at stride {stride}, "
          f"moving (heatmap > 0.5): {(heatmap > 0.5).float().mean():.1%} of pixels")


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    image = commands.add_parser("demo-image", help="write a held-out shapes first frame; print its prompts")
    video = commands.add_parser("demo-video", help="write a shapes training clip beside its motion heatmap")
    for command, what in ((image, "held-out image"), (video, "training clip")):
        command.add_argument("out", type=Path, help=".png/.jpg" if command is image else ".gif/.mp4")
        command.add_argument("--index", type=int, default=0, help=f"which {what}")
        command.add_argument("--view-size", type=int, default=256, help="upscale to this many pixels (only for "
                             "viewing: sample.py resizes images to the model's resolution)")
    check = commands.add_parser("check", help="decode every video of a folder, report usable ones")
    check.add_argument("root", type=Path)
    check.add_argument("--frames", type=int, default=16, help="frames a clip needs")
    heatmaps = commands.add_parser("heatmaps", help="cache the RAFT motion heatmaps of every video in a folder")
    heatmaps.add_argument("root", type=Path, help="folder with captions.csv or captions.jsonl")
    heatmaps.add_argument("--max-stride", type=int, default=8, help="largest frame stride the training uses")
    latents = commands.add_parser("latents", help="cache the kl-f8 latents of every video in a folder")
    latents.add_argument("root", type=Path)
    latents.add_argument("--init", required=True, help="VideoCrafter2's model.ckpt (its first_stage_model.* weights)")
    show_parser = commands.add_parser("show", help="write frame | flow | heatmap of a video, side by side")
    show_parser.add_argument("video", type=Path)
    show_parser.add_argument("--frames", type=int, default=16)
    show_parser.add_argument("--stride", type=int, default=1, help="use every stride-th frame")
    show_parser.add_argument("--out", type=Path, required=True, help="vis.mp4 or vis.gif")
    for command in (heatmaps, latents, show_parser):
        command.add_argument("--size", default="320x512", help="HxW the clips are trained at")
        command.add_argument("--device", default="auto", help="auto, cpu or cuda")
    for command in (heatmaps, show_parser):
        command.add_argument("--weights", default="small", help="small, large (torchvision's, downloaded "
                             "once) or a path to a torchvision RAFT state dict")
    args = parser.parse_args(argv)

    try:
        if args.command in ("demo-image", "demo-video"):
            suffixes = (".png", ".jpg", ".jpeg") if args.command == "demo-image" else (".gif", ".mp4")
            if args.out.suffix.lower() not in suffixes:
                raise ValueError(f"{args.command} writes {' or '.join(suffixes)} files, not {args.out}")
            if args.view_size <= 0 or args.index < 0:
                raise ValueError("--view-size must be positive and --index non-negative")
            (demo_image if args.command == "demo-image" else demo_video)(args.out, args.index, args.view_size)
        elif args.command == "check":
            if args.frames < 2:
                raise ValueError("--frames must be at least 2")
            check_folder(args.root, args.frames)
        elif args.command == "heatmaps":
            if args.max_stride < 1:
                raise ValueError("--max-stride must be at least 1")
            cache_heatmaps(args.root, args.weights, parse_size(args.size), args.max_stride, pick_device(args.device))
        elif args.command == "latents":
            size, device = parse_size(args.size), pick_device(args.device)
            cache_latents(args.root, load_kl_autoencoder(read_state_dict(args.init)), "kl-f8", size, device)
        else:
            if args.frames < 2 or args.stride < 1:
                raise ValueError("--frames must be at least 2 and --stride at least 1")
            if args.out.suffix.lower() not in (".mp4", ".gif"):
                raise ValueError(f"--out must end in .mp4 or .gif, got {args.out}")
            show(args.video, args.weights, parse_size(args.size), args.frames, args.stride, args.out,
                 pick_device(args.device))
    except (ValueError, OSError) as error:
        fail(error)


if __name__ == "__main__":
    main(sys.argv[1:])
