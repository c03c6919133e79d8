"""The training data from video files: captioned video folders (ours, JSONL, WebVid's CSV) and their caches.

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
synthetic shapes videos answer the same way (shapes.py).

ROOT/captions.csv (ours, or WebVid's as it is) or captions.jsonl lists videos (any format FFmpeg
reads); clips are drawn with a random frame stride and only their frames are decoded (VideoFile:
seek to the key frame before the first); heatmaps come from the cache written by
`python prepare.py heatmaps ROOT`, or from RAFT inside the training step. Rows and videos that
cannot be used are skipped and counted in warnings; only a folder with nothing usable stops the
run (a ValueError).

The commands that look at and prepare data (check a folder, cache heatmaps and latents, write a
demo image) are in prepare.py.
"""
import csv
import io
import json
import math
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from flow import frame_heatmaps
from utils import write_atomically
from video_io import FALLBACK_FPS, UnusableVideo, VideoFile, frames_to_clip, resize_center_crop

# ---- a folder of captioned videos ----

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
    """Where `python prepare.py heatmaps` stores a video's pair heatmaps for frames of size (H, W):
    {"num_frames": N, "heatmap_size": (h, w), and for s = 1..max stride "stride_s": uint8 (N-s, h, w), the pairs
    (j, j+s) laid on frame j, and "back_s": uint8 (N-s, h, w), the pairs (j+s, j) laid on frame j+s}."""
    return Path(root) / ".motion_cache" / f"{relpath}.{size[0]}x{size[1]}.npz"


def heatmap_cache_is_complete(path, size, max_stride, frames=2):
    """Whether the cache file at path holds, at heatmap_size(size), every stride up to max_stride that a clip of
    `frames` frames of its video can have (False for a missing or damaged file, one written with a smaller
    --max-stride, or one written by an older prepare.py, which stored full-size heatmaps or no backward pairs)."""
    try:
        with np.load(path) as cache:
            if "heatmap_size" not in cache.files or tuple(cache["heatmap_size"]) != heatmap_size(size):
                return False
            needed = min(max_stride, (int(cache["num_frames"]) - 1) // (frames - 1))
            return all(f"{kind}_{stride}" in cache.files for stride in range(1, needed + 1) for kind in ("stride", "back"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False


def latent_cache_path(root, relpath, size):
    """Where `python prepare.py latents` stores a video's per-frame latents, frames resized to (H, W)."""
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
    (`prepare.py heatmaps`), and videos with no cache are left out (with a warning); with cached_heatmaps=False items carry no heatmap and
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
        self.heatmaps_command = f"python prepare.py heatmaps {root} --size {size_text} --max-stride {max_stride}"
        caches = [("heatmaps", cache_path, self.heatmaps_command)] if cached_heatmaps else []
        if latents:
            caches.append(("latents", latent_cache_path, f"python prepare.py latents {root} --size {size_text} "
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
            raise ValueError(f"stale heatmap cache {first_cache} (written by an older prepare.py, which stored full-size "
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
        """(latents float16 (N, C, h, w), the video's fps or None) from `python prepare.py latents`'s cache."""
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
        or damaged, or was made from a different video, by an older prepare.py or with a smaller max stride."""
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
