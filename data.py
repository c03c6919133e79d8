"""The training data from video files: captioned video folders (ours, JSONL, WebVid's CSV), their caches, and the
commands that look at and prepare them.

    python data.py check videos --frames 16        # which videos of a folder are usable, and why not the others
    python data.py heatmaps videos --size 320x512 --max-stride 8    # RAFT motion heatmaps (1/8 size), cached once
    python data.py latents videos --init model.ckpt --size 320x512  # kl-f8 latents, cached once (full recipe)
    python data.py show clip.mp4 --out vis.mp4     # frame | optical flow | heatmap, side by side

Where it sits: train.py asks a dataset for items by global sample index; each item is a clip
with its caption, its fps and its motion heatmap (from flow.py), which loss.py uses as the
weights of the motion focal loss:

    {"video":   uint8 (3, T, H, W)   (or "latent": (C, T, h, w), from a latent cache): a quarter of float32's bytes
                through the loader's shared memory; train.py takes it to [-1, 1] on the device (to_unit_range),
     "heatmap": float32 (T, h, w) in [0, 1]: shapes at pixel resolution, video folders at 1/8 of it
                (or none: train.py computes it inside the step),
     "caption": str,
     "fps":     float32 scalar tensor, source fps / frame stride,
     "index":   int, the item's index: train.py seeds this sample's noise and timestep with it}

Every dataset answers ANY non-negative index (an infinite, deterministic stream), so a resumed
run or a different world size sees exactly the same samples; `len()` is only nominal. The demo's
synthetic shapes videos answer the same way (demo/shapes.py).

ROOT/captions.csv (ours, or WebVid's as it is) or captions.jsonl lists videos (any format FFmpeg
reads); clips are drawn with a random frame stride and only their frames are decoded (VideoFile:
seek to the key frame before the first); heatmaps come from the cache written by
`python data.py heatmaps ROOT`, or from RAFT inside the training step. Rows and videos that
cannot be used are skipped and counted in warnings; only a folder with nothing usable stops the
run (a ValueError). Every cache file is written whole and renamed into place, so a killed command
leaves no half cache; rerunning a command skips what is already cached.

Contents, in order: a folder of captioned videos; reading and writing videos; files and command lines (sizes,
atomic writes, the one-line error); the data commands.
"""
import argparse
import csv
import io
import json
import math
import os
import sys
import time
import zipfile
from pathlib import Path

import av
import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from flow import RAFT, frame_heatmaps, heatmap_from_flow
from model import autocast, load_kl_autoencoder, pick_device, read_state_dict, wants_bf16


# ----------------------------------------------------------------------------- a folder of captioned videos

ORDER_STREAM, PICK_STREAM = 0, 1    # seed streams: the per-epoch video order, and each item's clip

def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def video_root(data):
    """The folder the videos' paths are relative to: `data` itself, or the folder of a captions file given by name."""
    return Path(data).parent if Path(data).is_file() else Path(data)


def captions_file(data):
    """The captions file of `data`: a .csv or .jsonl file named directly (WebVid's results_2M_train.csv as it is), or
    a folder's captions.csv or captions.jsonl (exactly one of them)."""
    path = Path(data)
    if path.is_file():
        if path.suffix not in (".csv", ".jsonl"):
            raise ValueError(f"{path}: a captions file is a .csv or a .jsonl")
        return path
    if not path.is_dir():
        raise ValueError(f"video folder {path} does not exist")
    present = [p for p in (path / "captions.csv", path / "captions.jsonl") if p.is_file()]
    if len(present) != 1:
        raise ValueError(f"{path} needs exactly one of captions.csv or captions.jsonl, found {len(present)}")
    return present[0]


def read_captions(data):
    """Parse a captions file (DATA itself, or DATA/captions.csv or DATA/captions.jsonl: captions_file), UTF-8 with or
    without BOM; video paths are relative to its folder, ROOT:
      - a CSV with path and caption columns (and optionally fps);
      - WebVid's CSV as it is (columns videoid, name, page_dir, ...): video ROOT/videos/{page_dir}/{videoid}.mp4,
        caption `name`, the container's fps, the layout DynamiCrafter's WebVid dataset reads (webvid_row);
      - JSON lines, one {"path", "caption"[, "fps"]} object per line.

    Returns (videos, skipped): videos = [{"path": relative str, "caption": str, "fps": float or
    None}] for good rows whose file exists; skipped = [(reason, where)] for the others (bad
    encoding, bad JSON, no path, bad path, empty caption, bad fps, missing file). A captions file
    that cannot be parsed at all, or a CSV with neither layout's columns, is a ValueError."""
    listing, root = captions_file(data), video_root(data)
    try:   # undecodable bytes become lone surrogates here, and make their row a "bad encoding" skip
        text = listing.read_text(encoding="utf-8-sig", errors="surrogateescape")
    except OSError as error:
        raise ValueError(f"cannot read {listing}: {error.strerror}") from None
    rows = read_csv_rows(listing, text) if listing.suffix == ".csv" else read_jsonl_rows(listing, text)
    videos, skipped = [], []
    for where, row in rows:
        where = f"{listing.name} {where}"
        video, reason = parse_caption_row(row)
        if video is None:
            skipped.append((reason, where))
        elif not (root / video["path"]).is_file():
            skipped.append(("missing file", video["path"]))
        else:
            videos.append(video)
    return videos, skipped


WEBVID_COLUMNS = {"videoid", "name", "page_dir"}


def webvid_row(row):
    """A row of WebVid's CSV -> our {"path", "caption"}: DynamiCrafter's WebVid dataset (github.com/Doubiiu/
    DynamiCrafter, lvdm/data/webvid.py: _load_metadata and _get_video_path) reads the caption from `name` and the
    video from os.path.join(data_dir, 'videos', page_dir, str(videoid) + '.mp4'); ROOT is its data_dir here. A row
    without a videoid or page_dir gets no path (a "no path" skip); fps comes from the container."""
    videoid, page_dir = (str(row.get(key) or "").strip() for key in ("videoid", "page_dir"))
    path = f"videos/{page_dir}/{videoid}.mp4" if videoid and page_dir else None
    return {"path": path, "caption": row.get("name")}


def read_csv_rows(captions_file, text):
    """[(where, {column: value})] of a captions.csv's text in our layout (path, caption[, fps]), WebVid's rows
    converted to it; the header names are matched without case or surrounding spaces."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = [name.strip().lower() for name in reader.fieldnames or []]
        webvid = not {"path", "caption"} <= set(header) and WEBVID_COLUMNS <= set(header)
        if not ({"path", "caption"} <= set(header) or webvid):
            found = ", ".join(header[:5]) or "nothing"
            raise ValueError(f"{captions_file} needs a header line with path and caption columns (and optionally "
                             f"fps), or WebVid's videoid, name and page_dir; found: {found}")
        reader.fieldnames = header
        return [(f"line {reader.line_num}", webvid_row(row) if webvid else row) for row in reader]
    except csv.Error as error:
        raise ValueError(f"{captions_file} is not a readable CSV file (line {reader.line_num}: {error})")


def read_jsonl_rows(captions_file, text):
    """[(where, parsed object or None)] of a captions.jsonl's non-blank lines; None where a line is
    not JSON. A file in which no line is JSON is a ValueError."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError:
                rows.append((f"line {number}", None))
    if rows and all(row is None for _, row in rows):
        raise ValueError(f"{captions_file} is not JSON lines: no line is a JSON object")
    return rows


def is_utf8(text):
    """False for strings holding undecodable bytes (lone surrogates)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def parse_caption_row(row):
    """A caption row -> ({"path", "caption", "fps"}, None) if usable, else (None, why not)."""
    if not isinstance(row, dict):
        return None, "bad JSON"
    path, caption, fps = row.get("path"), row.get("caption"), row.get("fps")
    if not all(is_utf8(value) for value in (path, caption, fps) if isinstance(value, str)):
        return None, "bad encoding"
    if not isinstance(path, str) or not path.strip():
        return None, "no path"
    if "\0" in path or Path(path.strip()).is_absolute() or ".." in Path(path.strip()).parts:
        return None, "bad path"        # paths stay inside the folder (and its heatmap cache)
    if not isinstance(caption, str) or not caption.strip():
        return None, "empty caption"
    if fps in (None, ""):
        fps = None
    else:
        try:
            fps = float(fps)
        except (TypeError, ValueError):
            return None, "bad fps"
        if not (math.isfinite(fps) and fps > 0):
            return None, "bad fps"
    return {"path": path.strip(), "caption": caption.strip(), "fps": fps}, None


HEATMAP_FACTOR = 8      # cached pair heatmaps are 1/8 of the frame size: the kl-f8 latent's, where the loss uses them


def heatmap_size(size):
    """The size (h, w) of the cached heatmaps of frames of size (H, W)."""
    return max(1, size[0] // HEATMAP_FACTOR), max(1, size[1] // HEATMAP_FACTOR)


def cache_path(root, relpath, size):
    """Where `python data.py heatmaps` stores a video's pair heatmaps for frames of size (H, W):
    {"num_frames": N, "heatmap_size": (h, w), and for s = 1..max stride "stride_s": uint8 (N-s, h, w), the pairs
    (j, j+s) laid on frame j, and "back_s": uint8 (N-s, h, w), the pairs (j+s, j) laid on frame j+s}."""
    return Path(root) / ".motion_cache" / f"{relpath}.{size[0]}x{size[1]}.npz"


def heatmap_cache_is_complete(path, size, max_stride, frames=2):
    """Whether the cache file at path holds, at heatmap_size(size), every stride up to max_stride that a clip of
    `frames` frames of its video can have (False for a missing or damaged file, one written with a smaller
    --max-stride, or one written by an older data.py, which stored full-size heatmaps or no backward pairs)."""
    try:
        with np.load(path) as cache:
            if "heatmap_size" not in cache.files or tuple(cache["heatmap_size"]) != heatmap_size(size):
                return False
            needed = min(max_stride, (int(cache["num_frames"]) - 1) // (frames - 1))
            return all(f"{kind}_{stride}" in cache.files for stride in range(1, needed + 1) for kind in ("stride", "back"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False


def latent_cache_path(root, relpath, size):
    """Where `python data.py latents` stores a video's per-frame latents, frames resized to (H, W)."""
    return Path(root) / ".latent_cache" / f"{relpath}.{size[0]}x{size[1]}.npz"


def save_npz(path, **arrays):
    """Write a compressed .npz atomically: a killed run leaves no half cache."""
    write_atomically(path, lambda file: np.savez_compressed(file, **arrays))


def summarise(skipped, shown=3):
    """[(reason, where)] -> '2 missing file: a.mp4, b.mp4; 1 unreadable: c.mp4'."""
    by_reason = {}
    for reason, where in skipped:
        by_reason.setdefault(reason, []).append(where)
    return "; ".join(f"{len(wheres)} {reason}: {', '.join(wheres[:shown])}{', ...' if len(wheres) > shown else ''}"
                     for reason, wheres in by_reason.items())


class VideoFolderDataset(torch.utils.data.Dataset):
    """Clips of T frames from the captioned videos in ROOT, with a random frame stride.

    Item i: video = epoch permutation (epoch = i // num_videos) at position i % num_videos; then
    stride s ~ U{1..min(max_stride, (N-1)//(T-1))} and a uniform start a, from an RNG seeded by
    (seed, i). Frames a, a+s, ..., are decoded alone (VideoFile: from the key frame before frame a,
    N from the packets), resized and center-cropped to size; fps = (the row's fps, else the
    container's, else 30) / s. The heatmap (T, h, w) is frame_heatmaps of the cached stride-s pair
    heatmaps (a, a+s), (a+s, a+2s), ... and the backward pair into the last frame, at 1/8 of size
    (`data.py heatmaps`), and videos with no cache are left out (with a warning); with cached_heatmaps=False items carry no heatmap and
    train.py computes it inside the step (flow.clip_heatmaps). Unusable rows and videos are skipped
    and counted in warnings on stderr naming the first few: a video that turns out unusable is
    replaced by the next one in the permutation. A folder where no video can give a clip, or whose
    heatmap cache is stale, is a ValueError at construction."""

    def __init__(self, root, frames=16, size=(320, 512), max_stride=8, seed=0, cached_heatmaps=True, latents=""):
        self.root, self.frames, self.size = video_root(root), frames, tuple(size)
        self.max_stride, self.seed, self.cached_heatmaps, self.latents = max_stride, seed, cached_heatmaps, latents
        if latents and not cached_heatmaps:
            raise ValueError("cached latents need cached heatmaps: computing them in the step needs the frames")
        self.videos, skipped = read_captions(root)
        if skipped:
            warn(f"{len(skipped)} of {len(skipped) + len(self.videos)} listed videos skipped: {summarise(skipped)}")
        if not self.videos:
            raise ValueError(f"no usable video listed in {self.root}")
        size_text = f"{self.size[0]}x{self.size[1]}"
        self.heatmaps_command = f"python data.py heatmaps {root} --size {size_text} --max-stride {max_stride}"
        caches = [("heatmaps", cache_path, self.heatmaps_command)] if cached_heatmaps else []
        if latents:
            caches.append(("latents", latent_cache_path, f"python data.py latents {root} --size {size_text} "
                           "--init path/to/model.ckpt"))
        for what, path_of, command in caches:
            uncached = {v["path"] for v in self.videos if not path_of(self.root, v["path"], self.size).is_file()}
            if len(uncached) == len(self.videos):
                raise ValueError(f"no video in {self.root} has cached {what} at {size_text}; run: {command}")
            if uncached:
                warn(f"{len(uncached)} of {len(self.videos)} videos skipped: "
                     f"{summarise([(f'no cached {what}', path) for path in sorted(uncached)])}; to use them, run: {command}")
                self.videos = [v for v in self.videos if v["path"] not in uncached]
        first_cache = cache_path(self.root, self.videos[0]["path"], self.size)  # one file: a check that costs nothing
        if cached_heatmaps and not heatmap_cache_is_complete(first_cache, self.size, max_stride, frames):
            raise ValueError(f"stale heatmap cache {first_cache} (written by an older data.py, which stored full-size "
                             f"heatmaps or no backward pairs, or with a smaller --max-stride, or damaged); run: {self.heatmaps_command}")
        self.epoch_order = (-1, None)  # (epoch, its permutation of the videos)
        self.unusable = []             # [(reason, path)] found while reading, in this process
        for video in self.videos:      # fail now, not in the middle of training, if no video is readable
            try:
                self.cached_latents(video["path"]) if latents else self.open_video(video["path"])
                break
            except UnusableVideo as error:
                self.unusable.append((error.reason, video["path"]))
        else:
            raise ValueError(f"no usable clip of {frames} frames in {self.root}: {summarise(self.unusable)}")
        if self.unusable:
            warn(f"{len(self.unusable)} unusable videos skipped so far: {summarise(self.unusable)}")

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, index):
        count = len(self.videos)
        order = self.order(index // count)
        bad_paths = {path for _, path in self.unusable}
        for offset in range(count):
            video = self.videos[order[(index + offset) % count]]
            if video["path"] in bad_paths:
                continue
            try:   # a fresh RNG per try: the clip does not depend on which failures were seen before
                return {**self.clip(video, np.random.default_rng([self.seed, PICK_STREAM, index])), "index": index}
            except UnusableVideo as error:
                self.skip(video, error)
        raise ValueError(f"no usable clip of {self.frames} frames left in {self.root}: {summarise(self.unusable)}")

    def skip(self, video, error):
        """Count a listed video unusable (UnusableVideo `error`), in a warning naming the first few; train.py's
        validation set skips its videos here too."""
        self.unusable.append((error.reason, video["path"]))
        warn(f"skipping {video['path']}: {error}; {len(self.unusable)} unusable so far: {summarise(self.unusable)}")

    def order(self, epoch):
        """The videos' order in an epoch: a permutation drawn once per epoch (and per loader worker), not per item."""
        if self.epoch_order[0] != epoch:
            self.epoch_order = (epoch, np.random.default_rng([self.seed, ORDER_STREAM, epoch]).permutation(len(self.videos)))
        return self.epoch_order[1]

    def open_video(self, relpath):
        """The VideoFile of a listed video with at least T frames (its packets are read, nothing is decoded)."""
        video = VideoFile(self.root / relpath)
        if video.num_frames == 0:
            raise UnusableVideo("no frames")
        if video.num_frames < self.frames:
            raise UnusableVideo("too short", f"{video.num_frames} frames < {self.frames}")
        return video

    def clip(self, video, rng):
        if self.latents:
            latents, container_fps = self.cached_latents(video["path"])                # (N, C, h, w)
            num_frames = len(latents)
            if num_frames < self.frames:
                raise UnusableVideo("too short", f"{num_frames} frames < {self.frames}")
        else:
            file = self.open_video(video["path"])
            num_frames, container_fps = file.num_frames, file.fps
        max_stride = min(self.max_stride, (num_frames - 1) // (self.frames - 1))
        stride = int(rng.integers(1, max_stride + 1))
        start = int(rng.integers(0, num_frames - (self.frames - 1) * stride))
        picked = start + stride * np.arange(self.frames)                               # (T,)
        fps = video["fps"] or container_fps or FALLBACK_FPS
        item = {"caption": video["caption"], "fps": torch.tensor(fps / stride, dtype=torch.float32)}
        if self.cached_heatmaps:
            item["heatmap"] = self.cached_heatmap(video["path"], num_frames, picked, stride)  # (T, h, w)
            if item["heatmap"] is None:
                raise UnusableVideo("stale heatmap cache", f"re-run {self.heatmaps_command}")
        if self.latents:
            item["latent"] = torch.from_numpy(latents[picked]).float().transpose(0, 1)  # (C, T, h, w)
        else:
            frames = resize_center_crop(file.read(picked), self.size)                 # (T, H, W, 3)
            item["video"] = frames_to_clip(frames)                                     # (3, T, H, W) uint8
        return item

    def cached_latents(self, relpath):
        """(latents float16 (N, C, h, w), the video's fps or None) from `python data.py latents`'s cache."""
        try:
            with np.load(latent_cache_path(self.root, relpath, self.size)) as cache:
                kind, latents, fps = str(cache["autoencoder"]), cache["latents"], float(cache["fps"])
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            raise UnusableVideo("unreadable latent cache") from None
        if kind != self.latents:
            raise UnusableVideo("stale latent cache", f"made with the {kind} autoencoder, not {self.latents}")
        return latents, (fps if fps > 0 else None)

    def cached_heatmap(self, relpath, num_frames, picked, stride):
        """frame_heatmaps (T, h, w) of the clip of frames `picked` (T,) from the cache: the pairs (j, j+stride) for
        all but the last frame and the backward pair into the last (flow.clip_pairs), or None if the cache is missing
        or damaged, or was made from a different video, by an older data.py or with a smaller max stride."""
        path = cache_path(self.root, relpath, self.size)
        forward, backward = f"stride_{stride}", f"back_{stride}"
        try:
            with np.load(path) as cache:
                if ("heatmap_size" not in cache.files or tuple(cache["heatmap_size"]) != heatmap_size(self.size)
                        or {forward, backward} - set(cache.files) or len(cache[forward]) != num_frames - stride):
                    return None
                motion = np.concatenate([cache[forward][picked[:-1]], cache[backward][picked[-1:] - stride]])  # (T, H, W)
        except (OSError, ValueError, zipfile.BadZipFile):
            return None
        return frame_heatmaps(torch.from_numpy(motion).float() / 255)                  # (T, H, W)


# ----------------------------------------------------------------------------- reading and writing videos
# Training clips are read through VideoFile: only the frames of a clip are decoded, from the key frame before the
# first, in codecs whose key frames are intra-coded; other formats from the start. Samples and strips are written by
# write_video (mp4 or looping gif, atomically). A video that cannot give a clip raises UnusableVideo with a short
# reason, which the datasets count and skip. Frames are uint8 (T, H, W, 3) here; the models take float32 in [-1, 1]
# (to_unit_range, frames_to_tensor).

FALLBACK_FPS = 30.0     # when neither the caption row nor the container says


class UnusableVideo(Exception):
    """A video that cannot give a clip; reason is one of a few short categories."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}{f' ({detail})' if detail else ''}")
        self.reason = reason


# Codecs whose key frames are intra-coded: decoding from a key frame gives the frames that decoding from the start
# gives. Other formats (gif, animated png, ...) draw each frame over the previous ones and are decoded from the start.
SEEKABLE_CODECS = {"h264", "hevc", "av1", "vp8", "vp9", "mpeg4", "mpeg1video", "mpeg2video"}


def unreadable(error):
    """UnusableVideo("unreadable") with the first line of whatever a demuxer or decoder raised."""
    return UnusableVideo("unreadable", str(error).splitlines()[0] if str(error) else type(error).__name__)


class VideoFile:
    """A video file, read the way a training clip needs it: the frame count and fps from its packets (no
    decoding), then just the frames asked for, decoded from the key frame before the first of them.

        video = VideoFile(path)                  # UnusableVideo if it cannot give frames
        clip = video.read(range(40, 56, 2))      # uint8 (8, H, W, 3)

    Frame k is the k-th frame a decoder outputs when it decodes the whole file (presentation order), with any
    container FFmpeg reads (mp4, webm, gif, animated png ...); grey, palette and RGBA frames become RGB (alpha is
    dropped). Frames are found by their timestamps, so variable frame rates seek right; files whose codec cannot
    start at a key frame (SEEKABLE_CODECS), or whose packets lack distinct timestamps, are decoded from the start,
    stopping after the last frame asked for. Any failure is an UnusableVideo with a short reason."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UnusableVideo("missing file")
        if self.path.stat().st_size == 0:
            raise UnusableVideo("empty file")
        try:
            with av.open(str(self.path)) as container:
                if not container.streams.video:
                    raise UnusableVideo("no video stream")
                stream = container.streams.video[0]
                packets = [(packet.pts, packet.is_keyframe) for packet in container.demux(stream)
                           if packet.size and not packet.is_discard]            # what the decoder will output
                codec, rate = stream.codec_context.name, stream.average_rate or stream.guessed_rate
        except UnusableVideo:
            raise
        except Exception as error:       # demuxers raise many types for a corrupt file
            raise unreadable(error) from None
        fps = float(rate) if rate else None
        self.fps = fps if fps and math.isfinite(fps) and fps > 0 else None
        self.num_frames = len(packets)
        pts = [p for p, _ in packets]
        seekable = codec in SEEKABLE_CODECS and None not in pts and len(set(pts)) == len(pts)
        self.timestamps = sorted(pts) if seekable else None                         # frame k's pts
        self.frame_of = {t: k for k, t in enumerate(self.timestamps)} if seekable else None
        self.key_frames = sorted(p for p, key in packets if key) if seekable else []   # their pts

    def read(self, picked):
        """The frames picked (increasing frame numbers < num_frames) -> uint8 (len(picked), H, W, 3)."""
        picked = list(picked)
        if not picked:
            raise ValueError("read needs at least one frame number")
        seek_to = self.key_frame_before(picked[0])
        try:
            frames = self.decode(picked, seek_to)
            if frames is None:           # seeking missed a frame: decode from the start instead
                frames = self.decode(picked, None)
        except UnusableVideo:
            raise
        except Exception as error:       # decoders raise many types for a corrupt file
            raise unreadable(error) from None
        missing = [k for k in picked if k not in frames]
        if missing:
            raise UnusableVideo("unreadable", f"frame {missing[0]} of {self.num_frames} does not decode")
        return np.stack([frames[k] for k in picked])                               # (T, H, W, 3)

    def key_frame_before(self, k):
        """The timestamp of the last key frame at or before frame k, or None: decode from the start (a codec that
        cannot seek, or frame k is in the first group of pictures)."""
        if self.timestamps is None:
            return None
        before = [pts for pts in self.key_frames if pts <= self.timestamps[k]]
        return before[-1] if len(before) > 1 else None

    def decode(self, picked, seek_to):
        """{k: uint8 (H, W, 3)} for the frames k in picked that decode, from the start (seek_to None: frames counted)
        or from seek_to (a key frame's timestamp: frames known by their timestamps; None unless all are found)."""
        wanted, frames = set(picked), {}
        with av.open(str(self.path)) as container:
            stream = container.streams.video[0]
            if seek_to is not None:
                # the first packet first: decoders keep what it says (FFmpeg's H.264 decoder reads the x264 version
                # there, to work around old x264 bugs; without it a 4:4:4 clip decodes to green after a seek)
                stream.codec_context.decode(next(packet for packet in container.demux(stream) if packet.size))
                container.seek(seek_to, stream=stream, backward=True)
            for count, frame in enumerate(container.decode(stream)):
                k = count if seek_to is None else self.frame_of.get(frame.pts, -1)
                if k in wanted:
                    frames[k] = frame.to_ndarray(format="rgb24")                   # (H, W, 3)
                if k >= picked[-1]:
                    break
        return frames if seek_to is None or len(frames) == len(wanted) else None


def load_frames(path, min_frames=1):
    """Every frame of a video: (uint8 (N, H, W, 3), fps or None), or UnusableVideo with a short reason: missing
    file, empty file, no video stream, unreadable (not a video, truncated, corrupt, a codec FFmpeg cannot decode),
    no frames, too short (fewer than min_frames)."""
    video = VideoFile(path)
    if video.num_frames == 0:
        raise UnusableVideo("no frames")
    if video.num_frames < min_frames:
        raise UnusableVideo("too short", f"{video.num_frames} frames < {min_frames}")
    return video.read(range(video.num_frames)), video.fps


def write_video(path, frames, fps):
    """Write uint8 frames (T, H, W, 3) atomically as .gif (looping) or .mp4 (H.264, odd sizes padded)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".gif":
        encoded = iio.imwrite("<bytes>", frames, extension=".gif", plugin="pillow", duration=1000 / fps, loop=0)
    elif suffix == ".mp4":
        frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)))
        encoded = iio.imwrite("<bytes>", frames, extension=".mp4", plugin="pyav", codec="libx264", fps=fps)
    else:
        raise ValueError(f"cannot write {path}: use a .mp4 or .gif file name")
    write_atomically(path, lambda file: file.write(encoded))


def resize_center_crop(frames, size):
    """Resize uint8 frames (N, H, W, 3) to cover size = (h, w), then crop the centre: (N, h, w, 3)."""
    height, width = frames.shape[1:3]
    scale = max(size[0] / height, size[1] / width)
    cover = [max(size[0], round(height * scale)), max(size[1], round(width * scale))]
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)                              # (N, 3, H, W)
    video = F.interpolate(video, size=cover, mode="bilinear", antialias=True)        # (N, 3, H', W'): uint8 stays uint8
    top, left = round((cover[0] - size[0]) / 2), round((cover[1] - size[1]) / 2)
    video = video[:, :, top:top + size[0], left:left + size[1]]                      # (N, 3, h, w)
    return video.permute(0, 2, 3, 1).numpy()                                          # (N, h, w, 3)


def frames_to_clip(frames):
    """uint8 frames (T, H, W, 3) -> a dataset item's uint8 clip (3, T, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)


def to_unit_range(video):
    """uint8 pixels (any shape, on any device) -> float32 in [-1, 1], the range the models use."""
    return video.float() / 127.5 - 1


def frames_to_tensor(frames):
    """uint8 frames (T, H, W, 3) -> float32 (T, 3, H, W) in [-1, 1]."""
    return to_unit_range(torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2))


def to_uint8_frames(video, upscale=1):
    """(3, T, H, W) in [-1, 1] -> (T, H*upscale, W*upscale, 3) uint8."""
    frames = ((video.float().cpu() + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 3, 0)
    if upscale > 1:
        frames = frames.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2)
    return frames.numpy()


# ----------------------------------------------------------------------------- files and command lines: sizes, atomic writes, errors

def parse_size(text):
    """'320x512' -> (320, 512): height x width, both positive."""
    try:
        height, width = (int(side) for side in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"expected a size HxW like 320x512, got {text!r}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"sizes must be positive, got {text!r}")
    return height, width


def write_atomically(path, write):
    """Call write(file) on a temporary file beside `path`, fsync it, rename it to `path` and fsync the folder:
    a reader (or a run killed at any moment) sees the old file or the new one whole, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


def fail(error):
    """A command's way out for a user's mistake: `error: <the message in one line>` on stderr, exit status 1.
    An error raised in a DataLoader worker arrives with the worker's traceback before its message: then the last
    line; otherwise the first, since a message that goes on (a module's repr, say) starts with what went wrong."""
    if isinstance(error, OSError) and error.strerror:  # a full disk, a folder given as a file, no permission
        raise SystemExit(f"error: {error.strerror}: {error.filename or ''}")
    text = str(error).strip()
    lines = text.splitlines() or [type(error).__name__]
    raise SystemExit(f"error: {lines[-1] if 'Traceback (most recent call last)' in text else lines[0]}")


# ----------------------------------------------------------------------------- the data commands: check, heatmaps, latents, show

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
    are encoded in the precision the training step encodes in (model.wants_bf16: bf16 on a GPU)."""
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
    """Write an animation: frame | flow (colour = direction, white = still) | heatmap. torchvision is imported here,
    as flow.load_raft_model does: its import is slow, and every process that trains imports this file."""
    from torchvision.utils import flow_to_image
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
        if args.command == "check":
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
