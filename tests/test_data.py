"""data.py: captioned video folders full of broken files, odd encodings and odd formats; clips read a few frames at
a time."""
import fractions
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from test_shapes import uint8_frames

import data

ROOT = Path(__file__).resolve().parent.parent


# ---- video folders ----

FRAMES, SIZE, MAX_STRIDE = 4, (24, 32), 3


def index_frames(count, height=36, width=48):
    """uint8 (count, H, W, 3) frames whose grey level tells their index k: 16 + 18 k."""
    return np.repeat((16 + 18 * np.arange(count, dtype=np.uint8))[:, None, None, None], height * width * 3
                     ).reshape(count, height, width, 3)


def frame_index(frame):
    """Which index_frames frame this is (after resizing and lossy coding)."""
    return int(round((float(frame.mean()) - 16) / 18))


def write_pillow_animation(path, images, fps):
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


def write_audio_only(path):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for k in range(10):
            samples = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            samples.sample_rate, samples.pts = 16000, k * 1024
            for packet in stream.encode(samples):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


GOOD = {"good.mp4": 24.0, "good.gif": 10.0, "grey.gif": 10.0, "rgba.gif": 10.0, "rgba.png": 10.0}   # container fps
BAD = {"empty.mp4": "empty file", "truncated.mp4": "unreadable", "random.mp4": "unreadable",
       "text.mp4": "unreadable", "short.mp4": "too short", "audio.m4a": "no video stream"}


def write_videos(root):
    """The good and the bad files of GOOD and BAD."""
    root.mkdir(parents=True, exist_ok=True)
    frames = index_frames(12)                                               # (12, 36, 48, 3)
    data.write_video(root / "good.mp4", frames, fps=24)
    data.write_video(root / "good.gif", frames, fps=10)
    write_pillow_animation(root / "grey.gif", [Image.fromarray(f[..., 0], "L") for f in frames], fps=10)
    rgba = np.concatenate([frames, np.full((*frames.shape[:3], 1), 255, np.uint8)], axis=-1)  # (12, H, W, 4)
    rgba[:, :4, :4, 3] = 0                                                  # a transparent corner
    write_pillow_animation(root / "rgba.gif", [Image.fromarray(f, "RGBA") for f in rgba], fps=10)
    write_pillow_animation(root / "rgba.png", [Image.fromarray(f, "RGBA") for f in rgba], fps=10)  # APNG
    (root / "empty.mp4").write_bytes(b"")
    good = (root / "good.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(good[:len(good) // 2])
    (root / "random.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    (root / "text.mp4").write_text("this is not a video\n" * 50)
    data.write_video(root / "short.mp4", frames[:FRAMES - 1], fps=24)
    write_audio_only(root / "audio.m4a")


def rows():
    """(path, caption, fps) for every file, then the rows that must be skipped, with why."""
    listed = [(name, f"clip {name}", "5" if name == "good.gif" else "") for name in [*GOOD, *BAD]]
    listed.append(("good.mp4", "the same clip, with a comma, and ünïcode", "12"))
    skipped = [(("missing.mp4", "gone", ""), "missing file"), (("good.mp4", "  ", ""), "empty caption"),
               (("good.mp4", "caf\udce9 in latin-1", ""), "bad encoding"), (("good.mp4", "bad fps", "inf"), "bad fps"),
               (("../good.mp4", "outside", ""), "bad path")]
    return listed, skipped


def write_csv(root):
    listed, skipped = rows()
    lines = ["path,caption,fps"] + [f'{p},"{c}",{f}' for p, c, f in listed + [row for row, _ in skipped]]
    text = "\n".join(lines) + "\n"
    (root / "captions.csv").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8", errors="surrogateescape"))


def write_jsonl(root):
    """No fps key at all, except on the good.gif row; plus a line that is not JSON."""
    listed, skipped = rows()
    lines = [json.dumps({"path": p, "caption": c, **({"fps": float(f)} if p == "good.gif" else {})},
                        ensure_ascii=False) for p, c, f in listed + [row for row, _ in skipped if row[2] != "inf"]]
    lines.insert(3, "{not json")
    (root / "captions.jsonl").write_bytes(("\n".join(lines) + "\n").encode("utf-8", errors="surrogateescape"))


WRITE_CAPTIONS = {"csv": write_csv, "jsonl": write_jsonl}


@pytest.mark.parametrize("captions", ["csv", "jsonl"])
def test_read_captions_keeps_good_rows_and_says_why_it_skips_the_others(tmp_path, captions):
    write_videos(tmp_path)
    WRITE_CAPTIONS[captions](tmp_path)
    videos, skipped = data.read_captions(tmp_path)
    listed, expected_skips = rows()
    assert [(v["path"], v["caption"]) for v in videos] == [(p, c) for p, c, _ in listed]
    assert videos[-1]["caption"] == "the same clip, with a comma, and ünïcode"
    reasons = [reason for reason, _ in skipped]
    expected = [why for (_, _, fps), why in expected_skips if captions == "csv" or fps != "inf"]
    assert sorted(reasons) == sorted(expected + ([] if captions == "csv" else ["bad JSON"]))
    assert ("missing file", "missing.mp4") in skipped
    fps = {v["path"]: v["fps"] for v in videos[:-1]}
    assert fps["good.gif"] == 5.0 and fps["good.mp4"] is None and videos[-1]["fps"] == (12.0 if captions == "csv" else None)


def test_a_captions_file_that_cannot_be_parsed_is_a_one_line_error(tmp_path):
    cases = {"csv": ("name,text\na.mp4,hello\n", "path and caption columns"),
             "jsonl": ("path,caption\na.mp4,hello\n", "not JSON lines")}
    for suffix, (text, message) in cases.items():
        folder = tmp_path / suffix
        folder.mkdir()
        (folder / f"captions.{suffix}").write_text(text)
        with pytest.raises(ValueError, match=message) as error:
            data.read_captions(folder)
        assert "\n" not in str(error.value)
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "captions.csv").write_bytes(np.random.default_rng(1).bytes(3000))
    with pytest.raises(ValueError, match="path and caption columns"):
        data.read_captions(binary)


@pytest.mark.parametrize("captions", ["csv", "jsonl"])
def test_video_folder_items_skip_every_unusable_video_and_keep_stride_and_fps_right(tmp_path, captions, capsys):
    write_videos(tmp_path)
    WRITE_CAPTIONS[captions](tmp_path)
    dataset = data.VideoFolderDataset(tmp_path, frames=FRAMES, size=SIZE, max_stride=MAX_STRIDE, cached_heatmaps=False)
    items = {index: dataset[index] for index in range(3 * len(dataset))}
    used = {}
    for index, item in items.items():
        assert item["video"].dtype == torch.uint8 and item["video"].shape == (3, FRAMES, *SIZE)
        assert "heatmap" not in item                                        # train.py computes it in the step
        assert item["fps"].dtype == torch.float32 and item["fps"].ndim == 0
        path, row_fps = next((v["path"], v["fps"]) for v in dataset.videos if v["caption"] == item["caption"])
        used[path] = used.get(path, 0) + 1
        stride = (row_fps or GOOD[path]) / item["fps"].item()
        assert stride == pytest.approx(round(stride)) and 1 <= round(stride) <= MAX_STRIDE, (path, stride)
        picked = [frame_index(frame) for frame in uint8_frames(item)]     # which source frames
        assert np.diff(picked).tolist() == [round(stride)] * (FRAMES - 1), (path, picked, stride)
        grey = uint8_frames(item).astype(int)
        assert np.abs(grey - grey[..., :1]).max() <= 3                     # grey and RGBA came back as RGB
    assert set(used) == set(GOOD)
    assert {path: reason for reason, path in dataset.unusable} == BAD
    warnings = capsys.readouterr().err
    assert "skipped" in warnings and "missing.mp4" in warnings
    for path, reason in BAD.items():
        assert f"skipping {path}: {reason}" in warnings
    fresh = data.VideoFolderDataset(tmp_path, frames=FRAMES, size=SIZE, max_stride=MAX_STRIDE, cached_heatmaps=False)
    for index in (len(items) - 1, 7):                                      # no matter which failures it saw first
        assert torch.equal(fresh[index]["video"], items[index]["video"])
        assert fresh[index]["caption"] == items[index]["caption"]


def test_a_folder_dataset_draws_each_epoch_order_once(tmp_path, monkeypatch):
    """The order of the videos is one permutation per epoch, drawn once, not once per item (O(N) each)."""
    write_videos(tmp_path)
    (tmp_path / "captions.csv").write_text("path,caption\n" + "".join(f"{name},{name}\n" for name in GOOD))
    dataset = data.VideoFolderDataset(tmp_path, frames=FRAMES, size=SIZE, max_stride=MAX_STRIDE, cached_heatmaps=False)
    draws = []
    real = data.np.random.default_rng
    monkeypatch.setattr(data.np.random, "default_rng", lambda seed: draws.append(seed) or real(seed))
    epoch = [dataset[index]["caption"] for index in range(2 * len(GOOD))]  # two epochs
    assert sorted(epoch[:len(GOOD)]) == sorted(GOOD) == sorted(epoch[len(GOOD):])  # each video once an epoch
    orders = [seed for seed in draws if seed[1] == data.ORDER_STREAM]
    assert [seed[2] for seed in orders] == [0, 1]


def test_a_folder_with_no_usable_video_stops_before_training(tmp_path):
    write_videos(tmp_path)
    (tmp_path / "captions.csv").write_text("path,caption\n" + "".join(f"{name},x\n" for name in BAD))
    with pytest.raises(ValueError, match="no usable clip") as error:
        data.VideoFolderDataset(tmp_path, frames=FRAMES, size=SIZE, cached_heatmaps=False)
    assert "\n" not in str(error.value) and "empty file: empty.mp4" in str(error.value)
    (tmp_path / "captions.csv").write_text("path,caption\ngood.mp4,x\n")
    with pytest.raises(ValueError, match="no video .* has cached heatmaps.*python data.py heatmaps"):
        data.VideoFolderDataset(tmp_path, frames=FRAMES, size=SIZE)           # no cache, and not told to do without


def cached_pairs(num_frames, size, max_stride=MAX_STRIDE):
    """A heatmap cache's arrays in data.py's layout for frames of size (H, W): every forward pair of stride s is
    40 s / 255, every backward pair (40 s + 20) / 255."""
    return {"num_frames": np.array(num_frames), "heatmap_size": np.array(data.heatmap_size(size)),
            **{f"{kind}_{s}": np.full((num_frames - s, *data.heatmap_size(size)), 40 * s + extra, np.uint8)
               for s in range(1, max_stride + 1) for kind, extra in (("stride", 0), ("back", 20))}}


def test_cached_heatmaps_are_used_and_uncached_or_stale_videos_skipped(tmp_path, capsys):
    write_videos(tmp_path)
    (tmp_path / "captions.csv").write_text("path,caption\ngood.mp4,cached\ngood.gif,not cached\n")
    path = data.cache_path(tmp_path, "good.mp4", SIZE)
    data.save_npz(path, **cached_pairs(12, SIZE))
    dataset = data.VideoFolderDataset(tmp_path, frames=FRAMES, size=SIZE, max_stride=MAX_STRIDE)
    assert [v["path"] for v in dataset.videos] == ["good.mp4"] and "no cached heatmaps: good.gif" in capsys.readouterr().err
    for index in range(6):
        item = dataset[index]
        stride = round(24 / item["fps"].item())
        expected = torch.full((FRAMES, *data.heatmap_size(SIZE)), 40 * stride / 255)
        expected[-1] = (40 * stride + 20) / 255                          # the last frame's: the backward pair into it
        assert torch.allclose(item["heatmap"], expected)
    full_size = {f"stride_{s}": np.full((12 - s, *SIZE), 40 * s, np.uint8) for s in range(1, MAX_STRIDE + 1)}
    stale = {"made by the older data.py (full-size heatmaps)": {"num_frames": np.array(12), **full_size},
             "made with --max-stride 1": {**cached_pairs(12, SIZE, max_stride=1)},
             "made before the backward pairs": {k: v for k, v in cached_pairs(12, SIZE).items() if "back" not in k},
             "damaged": None}
    for why, arrays in stale.items():
        if arrays is None:
            path.write_bytes(b"PK not a zip file")
        else:
            data.save_npz(path, **arrays)
        with pytest.raises(ValueError, match="stale heatmap cache .*run: python data.py heatmaps") as error:
            data.VideoFolderDataset(tmp_path, frames=FRAMES, size=SIZE, max_stride=MAX_STRIDE)
        assert "\n" not in str(error.value), why
        assert not data.heatmap_cache_is_complete(path, SIZE, MAX_STRIDE), why
    data.save_npz(path, **cached_pairs(12, SIZE, max_stride=1))
    assert data.heatmap_cache_is_complete(path, SIZE, 1) and not data.heatmap_cache_is_complete(path, (48, 64), 1)
    data.save_npz(path, **cached_pairs(12, SIZE))                      # good again, but good.gif's is stale
    data.save_npz(data.cache_path(tmp_path, "good.gif", SIZE), num_frames=np.array(12), **full_size)
    mixed = data.VideoFolderDataset(tmp_path, frames=FRAMES, size=SIZE, max_stride=MAX_STRIDE)
    assert {mixed[index]["caption"] for index in range(4)} == {"cached"}
    assert mixed.unusable == [("stale heatmap cache", "good.gif")]
    assert "re-run python data.py heatmaps" in capsys.readouterr().err


# ---- a clip's frames only: seeking, against whole decoding ----

def write_variable_rate_mp4(path, count=40, size=(48, 64)):
    """H.264 with B-frames, a key frame every 7 frames and uneven gaps between frames (1 to 5 sixtieths of a
    second, so frame k is not at k / fps): frame k is a fixed random texture brightened by 4 k."""
    texture = np.random.default_rng(0).integers(0, 60, (*size, 3), dtype=np.uint8)
    gaps, time_base = [1, 3, 2, 5, 1, 4], fractions.Fraction(1, 60)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", options={"x264-params": "keyint=7:min-keyint=7:scenecut=0:bframes=2"})
        stream.width, stream.height, stream.pix_fmt = size[1], size[0], "yuv420p"
        stream.codec_context.time_base = time_base
        for k in range(count):
            frame = av.VideoFrame.from_ndarray(texture + np.uint8(4 * k), format="rgb24")
            frame.pts, frame.time_base = sum(gaps[j % len(gaps)] for j in range(k)), time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def decode_whole(path):
    """Every frame, decoded from the first: what reading a clip did before it could seek. uint8 (N, H, W, 3)."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(container.streams.video[0])])


def windows(num_frames, frames, max_stride=8, count=12, seed=0):
    """Frame numbers of clips drawn as VideoFolderDataset draws them: stride, then start."""
    rng = np.random.default_rng(seed)
    picked = []
    for _ in range(count):
        stride = int(rng.integers(1, min(max_stride, (num_frames - 1) // (frames - 1)) + 1))
        start = int(rng.integers(0, num_frames - (frames - 1) * stride))
        picked.append(start + stride * np.arange(frames))
    return picked


def check_clips_match_whole_decoding(path, frames, monkeypatch, count=12, extra_starts=()):
    """VideoFile.read of `count` dataset-drawn clips and of clips at extra_starts == those frames of the whole
    decode. Returns how many were read by seeking to a key frame other than the first (none fell back)."""
    whole, video = decode_whole(path), data.VideoFile(path)
    assert video.num_frames == len(whole)
    seeks, decode = [], data.VideoFile.decode
    monkeypatch.setattr(data.VideoFile, "decode", lambda self, picked, seek_to: seeks.append(
        (seek_to, found := decode(self, picked, seek_to))) or found)
    for picked in windows(len(whole), frames, count=count) + [start + np.arange(frames) for start in extra_starts]:
        assert np.array_equal(video.read(picked), whole[picked]), (path.name, picked)
    monkeypatch.undo()
    assert all(found is not None for _, found in seeks)                  # no seek missed a frame
    return sum(seek_to is not None for seek_to, _ in seeks)


def test_a_clip_reads_the_frames_whole_decoding_gives(tmp_path, fixtures, monkeypatch):
    """Seeking (mp4s: a real clip, and a variable-frame-rate one with B-frames) and decoding from the start
    (gif, animated png, whose frames draw over the previous ones) give exactly the frames of a whole decode."""
    write_videos(tmp_path)
    write_variable_rate_mp4(tmp_path / "vfr.mp4")
    frames = [Image.fromarray(f) for f in index_frames(12)]
    frames[0].save(tmp_path / "uneven.gif", save_all=True, append_images=frames[1:], duration=[20, 70, 30] * 4, loop=0)
    vfr = data.VideoFile(tmp_path / "vfr.mp4")
    assert len(set(np.diff(vfr.timestamps))) > 2 and len(vfr.key_frames) == 6   # uneven gaps, seekable
    assert check_clips_match_whole_decoding(tmp_path / "vfr.mp4", 8, monkeypatch, extra_starts=(6, 7, 8, 28, 32)) > 5
    assert check_clips_match_whole_decoding(fixtures / "realshort.mp4", 4, monkeypatch, extra_starts=(29, 30, 32)) >= 2
    for name in ("good.gif", "uneven.gif", "rgba.gif", "rgba.png"):
        assert data.VideoFile(tmp_path / name).timestamps is None               # not a seekable codec
        assert check_clips_match_whole_decoding(tmp_path / name, FRAMES, monkeypatch) == 0
    with pytest.raises(data.UnusableVideo, match="frame 40 of 40 does not decode"):
        vfr.read([38, 40])


def test_real_clips_read_the_frames_whole_decoding_gives(shared, monkeypatch):
    """A 720p x264 clip whose key frames decode to green without the file's first packet (FFmpeg learns the x264
    version from it, and works around that version's 4:4:4 bug), and a gif with uneven frame times."""
    videos = shared / "videos"
    assert check_clips_match_whole_decoding(videos / "cockatoo.mp4", 16, monkeypatch, count=3,
                                            extra_starts=(76, 145, 200)) >= 3
    assert check_clips_match_whole_decoding(videos / "newtonscradle.gif", 16, monkeypatch) == 0


# ---- WebVid's captions CSV ----

WEBVID_HEADER = "videoid,contentUrl,duration,page_dir,name"


def write_webvid(root):
    """WebVid's layout: ROOT/videos/{page_dir}/{videoid}.mp4 and its CSV, with rows that must be skipped."""
    frames = index_frames(12)
    for page_dir, videoid in (("000001_000050", "1001"), ("000001_000050", "1002"), ("000051_000100", "77")):
        (root / "videos" / page_dir).mkdir(parents=True, exist_ok=True)
        data.write_video(root / "videos" / page_dir / f"{videoid}.mp4", frames, fps=24)
    (root / "videos" / "000051_000100" / "broken.mp4").write_text("not a video")
    lines = [WEBVID_HEADER,
             '1001,https://x/1001.mp4,PT00H00M14S,000001_000050,"Cockatoo, close up, looks ""left"""',
             "1002,https://x/1002.mp4,PT00H00M10S,000001_000050,Waves roll in",
             "77,https://x/77.mp4,PT00H00M05S,000051_000100,Aerial view of a city",
             "broken,https://x/b.mp4,PT00H00M05S,000051_000100,A broken file",
             "404,https://x/404.mp4,PT00H00M05S,000001_000050,Not downloaded",
             "1003,https://x/1003.mp4,PT00H00M05S,000001_000050,",
             ",https://x/.mp4,PT00H00M05S,000001_000050,No video id",
             "1,https://x/1.mp4,PT00H00M05S,..,Outside the folder"]
    (root / "captions.csv").write_text("\n".join(lines) + "\n")


def test_webvid_csv_reads_as_dynamicrafter_reads_it(tmp_path, capsys):
    write_webvid(tmp_path)
    videos, skipped = data.read_captions(tmp_path)
    assert [(v["path"], v["caption"], v["fps"]) for v in videos] == [
        ("videos/000001_000050/1001.mp4", 'Cockatoo, close up, looks "left"', None),
        ("videos/000001_000050/1002.mp4", "Waves roll in", None),
        ("videos/000051_000100/77.mp4", "Aerial view of a city", None),
        ("videos/000051_000100/broken.mp4", "A broken file", None)]
    assert sorted(reason for reason, _ in skipped) == ["bad path", "empty caption", "missing file", "no path"]
    assert ("missing file", "videos/000001_000050/404.mp4") in skipped
    dataset = data.VideoFolderDataset(tmp_path, frames=FRAMES, size=SIZE, max_stride=MAX_STRIDE, cached_heatmaps=False)
    items = [dataset[index] for index in range(8)]
    assert {item["caption"] for item in items} == {v["caption"] for v in videos[:3]}
    assert all(item["fps"].item() in (24, 12, 8) for item in items)             # the container's fps / stride
    assert dataset.unusable == [("unreadable", "videos/000051_000100/broken.mp4")]
    data.main(["check", str(tmp_path), "--frames", str(FRAMES)])             # the command, in this process
    report = capsys.readouterr().out
    assert "3 usable, 5 skipped" in report and "1 unreadable: videos/000051_000100/broken.mp4" in report
    assert "1 missing file: videos/000001_000050/404.mp4" in report
    (tmp_path / "captions.csv").write_text("videoid,page_dir,caption_text\n1001,000001_000050,x\n")
    with pytest.raises(SystemExit, match="error: .*WebVid's videoid, name and page_dir") as error:
        data.main(["check", str(tmp_path)])
    assert "\n" not in str(error.value)


def test_an_error_is_one_line_that_says_what_went_wrong():
    # a message that goes on (FSDP2 prints the module it refused) gives its first line, not the repr's closing ")"
    with pytest.raises(SystemExit) as stop:
        data.fail(ValueError("fully_shard does not support this module: Stage(\n  (0): Conv2d(24, 32)\n)"))
    assert str(stop.value) == "error: fully_shard does not support this module: Stage("
    # an error from a DataLoader worker carries the worker's traceback first: its last line is the message
    worker = "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n" \
             '  File "data.py", line 1, in __getitem__\nValueError: clip.mp4 has 2 frames, 16 wanted'
    with pytest.raises(SystemExit) as stop:
        data.fail(ValueError(worker))
    assert str(stop.value) == "error: ValueError: clip.mp4 has 2 frames, 16 wanted"
