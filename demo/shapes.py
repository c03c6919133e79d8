"""The demo's task: synthetic "shapes" videos in which only the text tells the motion.

Where it sits: train.py's `--preset shapes` trains on ShapesDataset, which answers items like data.py's
video folders (see data.py for the item's keys), with the exact optical flow of each clip through flow.py's
heatmap code; demo/bench.py scores a checkpoint on held_out_pairs(), first frames from the test split that
training never sees, each with several captions.

A clip: a faint textured background and 1-3 coloured shapes (circle, square, triangle); the caption says
which shape moves where ("the red circle moves left") or stays still, and shapes it does not name stay
still. Items 4k..4k+3 share a first frame with different captions, so the first frame alone cannot tell
the motion: only the text can.

    python -m demo.shapes image first.png     # a held-out first frame, and the prompts that fit it
    python -m demo.shapes video clip.gif      # a training clip next to its motion heatmap
"""
import argparse
import sys
import tomllib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data import fail, frames_to_clip, write_video
from flow import heatmap_from_flow

PALETTE = {"red": (220, 50, 50), "green": (40, 170, 60), "blue": (50, 90, 230), "yellow": (235, 205, 40)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
PHRASES = {"left": "moves left", "right": "moves right", "up": "moves up", "down": "moves down",
           "still": "stays still"}
SPEED = 3 / 32          # frame widths per source frame: 3 px at 32 px, heatmap sigma(0.094) = 0.99
ROOM_TO_MOVE = 1 / 4    # a shape may be told to move a way only if it has this much room (in widths)
CLIPS_PER_SCENE = 4     # consecutive indices share a first frame, with different captions
NOMINAL_LENGTH = 1_000_000
# Seed streams: item i of a split draws from numpy's SeedSequence([seed, split, stream, i]).
# Train and test differ in the split entry, so their scenes are independent draws that never
# share a seed; the held-out benchmark lives in the test split.
SPLITS = {"train": 0, "test": 1}
SCENE_STREAM, CLIP_STREAM, HELD_OUT_SCENE_STREAM, HELD_OUT_PROMPT_STREAM = 0, 1, 2, 3
HELD_OUT_SEED = 2025


def textured_background(rng, size):
    """A static, low-contrast grey texture: a few random plane waves and a faint tint."""
    ys, xs = np.mgrid[0:size, 0:size] / size                             # (H, W) each, in [0, 1)
    texture = np.zeros((size, size))                                     # (H, W)
    for _ in range(3):
        fx, fy = rng.uniform(-3, 3, size=2)                              # cycles per frame
        texture += np.sin(2 * np.pi * (fx * xs + fy * ys) + rng.uniform(0, 2 * np.pi))
    tint = rng.uniform(-0.05, 0.05, size=3)                              # (3,)
    return 0.5 + tint + 0.04 * texture[..., None]                        # (H, W, 3) in [0.33, 0.67]


def allowed_motions(obj, size):
    """The motions a shape may be told to make: 'still', and each direction with enough room.

    Shapes are at most size/3 wide, so along each axis one side always has >= size/3 of room:
    every shape can move at least one way horizontally and one way vertically."""
    x, y, radius = obj["x"], obj["y"], obj["radius"]
    room = {"left": x - radius, "right": size - radius - x, "up": y - radius, "down": size - radius - y}
    return ["still"] + [name for name, free in room.items() if free >= ROOM_TO_MOVE * size]


def make_scene(rng, size=32, num_objects=None, scale=1.0, max_objects=3):
    """The content of a first frame: a background and 1-max_objects (or num_objects) non-overlapping shapes, unique
    colours.

    Returns {"size": int, "background": float (H, W, 3) in [0, 1],
             "objects": [{"colour", "shape", "x", "y", "radius"}]}: centres and half-sizes in
    pixels, each shape fully inside the frame, between 1/4 and 1/3 of the frame wide times `scale`."""
    num_objects = num_objects or int(rng.integers(1, max_objects + 1))
    colours = rng.choice(list(PALETTE), size=num_objects, replace=False)
    objects = []
    for _ in range(100 * num_objects):                  # rejection sampling of free positions
        radius = rng.uniform(size / 8, size / 6) * scale
        x, y = rng.uniform(radius, size - radius, size=2)
        apart = all(max(abs(x - o["x"]), abs(y - o["y"])) >= radius + o["radius"] + 1 for o in objects)
        if apart:
            objects.append({"colour": str(colours[len(objects)]), "shape": str(rng.choice(SHAPES)),
                            "x": float(x), "y": float(y), "radius": float(radius)})
        if len(objects) == num_objects:
            break
    return {"size": size, "background": textured_background(rng, size), "objects": objects}


def make_caption_and_motions(rng, scene):
    """Mention 1 or 2 shapes and give each a motion; shapes not mentioned stay still.

    Returns (caption, motions): motions maps object index -> 'left'|'right'|'up'|'down'|'still'
    for the mentioned shapes, in caption order, e.g.
    "the blue square moves up and the green triangle stays still", {2: "up", 0: "still"}."""
    objects = scene["objects"]
    count = 1 if len(objects) == 1 or rng.random() < 0.5 else 2
    mentioned = rng.choice(len(objects), size=count, replace=False)
    motions = {int(i): str(rng.choice(allowed_motions(objects[i], scene["size"]))) for i in mentioned}
    caption = " and ".join(f"the {objects[i]['colour']} {objects[i]['shape']} {PHRASES[motion]}"
                           for i, motion in motions.items())
    return caption, motions


def shape_masks(shape, xs, ys, radius):
    """Which pixel centres (xs, ys) fall inside a circle/square/triangle of half-size radius.

    xs, ys are pixel-centre coordinates relative to the shape centre, broadcast to any shape."""
    if shape == "circle":
        return xs ** 2 + ys ** 2 <= radius ** 2
    if shape == "square":
        return (np.abs(xs) <= radius) & (np.abs(ys) <= radius)
    # triangle pointing up: apex at (0, -radius), base from (-radius, radius) to (radius, radius)
    return (ys <= radius) & (np.abs(xs) <= (ys + radius) / 2)


def render_clip(scene, motions, frames=8, stride=1, speed=SPEED):
    """Draw the clip in which each shape makes its motion, and its exact optical flow.

    A moving shape travels speed * stride * width pixels per frame and stops at the frame's edge.
    Returns (video uint8 (T, H, W, 3), flow float32 tensor (T, 2, H, W)): flow[i] is, on every
    pixel of frame i, the displacement (x, y) in pixels to frame i+1 of the shape drawn there
    (later shapes are drawn on top), and 0 on the background; the last frame's is its displacement
    to the frame before (backward), so that every frame's flow lies where its shapes are (flow.clip_pairs)."""
    size, objects = scene["size"], scene["objects"]
    step = speed * stride * size                                         # pixels per frame
    pixel_centres = np.arange(size) + 0.5                                # (W,)
    video = np.repeat(scene["background"][None], frames, axis=0)         # (T, H, W, 3)
    owner = np.full((frames, size, size), -1)                            # (T, H, W) shape index
    centres = []
    for index, obj in enumerate(objects):
        dx, dy = DIRECTIONS[motions.get(index, "still")]
        travel = step * np.arange(frames)                                # (T,)
        low, high = obj["radius"], size - obj["radius"]
        cx = np.clip(obj["x"] + dx * travel, low, high)                  # (T,)
        cy = np.clip(obj["y"] + dy * travel, low, high)                  # (T,)
        inside = shape_masks(obj["shape"], pixel_centres[None, None, :] - cx[:, None, None],
                             pixel_centres[None, :, None] - cy[:, None, None], obj["radius"])  # (T, H, W)
        video[inside] = np.array(PALETTE[obj["colour"]]) / 255
        owner[inside] = index
        centres.append(np.stack([cx, cy], axis=1))                       # (T, 2)
    flow = np.zeros((frames, 2, size, size), dtype=np.float32)           # (T, 2, H, W)
    for index, centre in enumerate(centres):
        target = np.concatenate([centre[1:], centre[-2:-1]]) if frames > 1 else centre  # (T, 2): frame i's partner
        displacement = (target - centre)[:, :, None, None]               # (T, 2, 1, 1)
        flow = np.where(owner[:, None] == index, displacement, flow)     # (T, 2, H, W)
    video = (video * 255).round().astype(np.uint8)                       # (T, H, W, 3)
    return video, torch.from_numpy(flow.astype(np.float32))


class ShapesDataset(torch.utils.data.Dataset):
    """Shapes clips: item i is a pure function of (seed, split, i).

    Items 4k..4k+3 share one scene (the same first frame) with independently drawn captions,
    motions and strides. The frame stride s ~ U{1..max_stride} scales the motion per frame,
    and fps = base_fps / s tells the model which it was."""

    def __init__(self, split="train", size=32, frames=8, max_stride=2, base_fps=8, seed=0, speed=SPEED, shape_scale=1.0,
                 max_shapes=3):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        self.split, self.size, self.frames, self.max_stride = split, size, frames, max_stride
        self.base_fps, self.seed, self.speed, self.shape_scale = base_fps, seed, speed, shape_scale
        self.max_shapes = max_shapes

    def __len__(self):
        return NOMINAL_LENGTH

    def __getitem__(self, index):
        split = SPLITS[self.split]
        scene_rng = np.random.default_rng([self.seed, split, SCENE_STREAM, index // CLIPS_PER_SCENE])
        scene = make_scene(scene_rng, self.size, scale=self.shape_scale, max_objects=self.max_shapes)
        rng = np.random.default_rng([self.seed, split, CLIP_STREAM, index])
        caption, motions = make_caption_and_motions(rng, scene)
        stride = int(rng.integers(1, self.max_stride + 1))
        video, flow = render_clip(scene, motions, self.frames, stride, self.speed)  # (T,H,W,3), (T,2,H,W)
        return {"video": frames_to_clip(video),                                    # (3, T, H, W) uint8
                "heatmap": heatmap_from_flow(flow),                               # (T, H, W)
                "caption": caption,
                "fps": torch.tensor(self.base_fps / stride, dtype=torch.float32),
                "index": index}


def held_out_pairs(num_images=64, prompts_per_image=(3, 5), size=32, seed=HELD_OUT_SEED, shape_scale=1.0, max_shapes=3):
    """The fixed benchmark: test-split first frames, each with several prompts.

    Image k has 1 + k % max_shapes shapes (with 3, two thirds of the images hold distractors of other
    colours) and between prompts_per_image[0] and [1] distinct prompts (at least 3: every shape
    can stay still or move two ways). Returns a list of dicts, one per (image, prompt):
        "image_id": k,  "image": uint8 (H, W, 3) first frame,  "caption": str,
        "motions": {object index: motion} for the shapes the caption names (others stay still),
        "scene": the scene dict of make_scene (shapes' colours, kinds, positions, sizes)."""
    entries = []
    for image_id in range(num_images):
        split = SPLITS["test"]
        scene = make_scene(np.random.default_rng([seed, split, HELD_OUT_SCENE_STREAM, image_id]),
                           size, num_objects=1 + image_id % max_shapes, scale=shape_scale)
        rng = np.random.default_rng([seed, split, HELD_OUT_PROMPT_STREAM, image_id])
        wanted = int(rng.integers(prompts_per_image[0], prompts_per_image[1] + 1))
        prompts = {}
        for _ in range(100):
            caption, motions = make_caption_and_motions(rng, scene)
            prompts.setdefault(caption, motions)
            if len(prompts) == wanted:
                break
        first_frame = render_clip(scene, {}, frames=1)[0][0]              # (H, W, 3)
        entries += [{"image_id": image_id, "image": first_frame, "caption": caption,
                     "motions": motions, "scene": scene} for caption, motions in prompts.items()]
    return entries


# ----------------------------------------------------------------------------- looking at the demo: a first frame, a clip

def upscale(image, size):
    """Nearest-neighbour resize of uint8 (H, W, 3) to size x size, for looking at 32 px frames."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.NEAREST))


PRESET = tomllib.loads((Path(__file__).parents[1] / "config" / "shapes.toml").read_text())  # its frames, shapes per scene


def demo_image(path, index, view_size):
    """Write held-out first frame number `index` of the demo (upscaled for viewing) and print the prompts that fit it."""
    held_out = held_out_pairs(max_shapes=PRESET["max_shapes"])
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
    item = ShapesDataset("train", frames=PRESET["frames"], max_shapes=PRESET["max_shapes"])[index]
    video = item["video"].permute(1, 2, 3, 0)                                         # (T, H, W, 3) uint8
    heatmap = (item["heatmap"][..., None] * 255).round().to(torch.uint8).expand_as(video)  # (T, H, W, 3)
    panels = torch.cat([video, heatmap], dim=2).numpy()                              # (T, H, 2W, 3)
    scale = view_size // panels.shape[1] or 1
    write_video(path, panels.repeat(scale, axis=1).repeat(scale, axis=2), float(item["fps"]))
    print(f"wrote {path} (clip | motion heatmap) at {float(item['fps']):g} fps: {item['caption']}")

def main(argv=None):
    parser = argparse.ArgumentParser(description="Look at the demo's shapes videos.")
    commands = parser.add_subparsers(dest="command", required=True)
    image = commands.add_parser("image", help="write a held-out shapes first frame; print its prompts")
    video = commands.add_parser("video", help="write a shapes training clip beside its motion heatmap")
    for command, what in ((image, "held-out image"), (video, "training clip")):
        command.add_argument("out", type=Path, help=".png/.jpg" if command is image else ".gif/.mp4")
        command.add_argument("--index", type=int, default=0, help=f"which {what}")
        command.add_argument("--view-size", type=int, default=256, help="upscale to this many pixels (only for "
                             "viewing: sample.py resizes images to the model's resolution)")
    args = parser.parse_args(argv)
    try:
        suffixes = (".png", ".jpg", ".jpeg") if args.command == "image" else (".gif", ".mp4")
        if args.out.suffix.lower() not in suffixes:
            raise ValueError(f"{args.command} writes {' or '.join(suffixes)} files, not {args.out}")
        if args.view_size <= 0 or args.index < 0:
            raise ValueError("--view-size must be positive and --index non-negative")
        (demo_image if args.command == "image" else demo_video)(args.out, args.index, args.view_size)
    except (ValueError, OSError) as error:
        fail(error)


if __name__ == "__main__":
    main(sys.argv[1:])
