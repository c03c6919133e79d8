"""data.py's commands: the demo image, checking a folder, caching heatmaps and latents, showing a video's flow;
and their one-line errors."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import BAD, FRAMES, GOOD, MAX_STRIDE, cached_pairs, rows, write_csv, write_videos

import data
import flow
import train
from conftest import user_error
from demo import shapes
from model import KL_SIZES, KLAutoencoder

ROOT = Path(__file__).resolve().parent.parent


def write_folder(root, frames=4):
    """Two shapes clips (an mp4 and a gif), a broken file, and captions.csv listing them."""
    for k, name in enumerate(["a.mp4", "b.gif"]):
        rng = np.random.default_rng([5, k])
        scene = shapes.make_scene(rng, 32)
        video, _ = shapes.render_clip(scene, {0: shapes.allowed_motions(scene["objects"][0], 32)[1]}, frames=frames)
        data.write_video(root / name, video, fps=10)
    (root / "broken.mp4").write_text("not a video\n")
    (root / "captions.csv").write_text("path,caption\na.mp4,one\nb.gif,two\nbroken.mp4,three\n")


def test_heatmaps_cli_writes_every_stride_once_and_the_dataset_reads_it_like_raft(tmp_path, fixtures, capsys):
    """1/8-size pair heatmaps of every stride, forward and backward, from RAFT at a short side of 128; an older full-size cache is redone."""
    write_folder(tmp_path)
    command = ["heatmaps", str(tmp_path), "--size", "32x32", "--max-stride", "2", "--device", "cpu",
               "--weights", str(fixtures / "raft_small.pth")]
    data.main(command)
    first = capsys.readouterr().out
    assert "cached 2 videos" in first and "1 unreadable: broken.mp4" in first
    caches = {name: data.cache_path(tmp_path, name, (32, 32)) for name in ("a.mp4", "b.gif")}
    for path in caches.values():
        with np.load(path) as cache:
            assert sorted(cache.files) == ["back_1", "back_2", "heatmap_size", "num_frames", "stride_1", "stride_2"]
            assert cache["back_1"].shape == (3, 4, 4) and cache["back_2"].shape == (2, 4, 4)
            assert int(cache["num_frames"]) == 4 and cache["heatmap_size"].tolist() == [4, 4]
            assert cache["stride_1"].shape == (3, 4, 4) and cache["stride_2"].shape == (2, 4, 4)
            assert cache["stride_1"].dtype == np.uint8 and cache["stride_1"].max() > 100  # a shape moves
    stamps = {name: path.stat().st_mtime_ns for name, path in caches.items()}

    data.main(command)
    second = capsys.readouterr().out
    assert "2 already cached" in second and "cached 0 videos" in second
    assert {name: path.stat().st_mtime_ns for name, path in caches.items()} == stamps

    dataset = data.VideoFolderDataset(tmp_path, frames=3, size=(32, 32), max_stride=2)   # cache only
    raft = flow.RAFT(fixtures / "raft_small.pth")
    for index in range(2):
        item = dataset[index]
        in_the_step = flow.clip_heatmaps(raft, data.to_unit_range(item["video"][None]), (4, 4))[0]  # (T, h, w)
        assert item["heatmap"].shape == in_the_step.shape == (3, 4, 4)
        assert (item["heatmap"] - in_the_step).abs().max() <= 1 / 255

    path = caches["a.mp4"]                                             # made by the older data.py: full size
    data.save_npz(path, num_frames=np.array(4), stride_1=np.zeros((3, 32, 32), np.uint8),
                  stride_2=np.zeros((2, 32, 32), np.uint8))
    data.main(command)
    third = capsys.readouterr().out
    assert "1 already cached" in third and "cached 1 videos" in third
    assert data.heatmap_cache_is_complete(path, (32, 32), 2)

    with np.load(path) as cache:                                       # made before the backward pairs: redone
        data.save_npz(path, **{k: cache[k] for k in cache.files if not k.startswith("back_")})
    assert not data.heatmap_cache_is_complete(path, (32, 32), 2)
    data.main(command)
    assert "cached 1 videos" in capsys.readouterr().out


def test_show_cli_writes_frame_flow_and_heatmap_side_by_side(tmp_path, fixtures):
    out = tmp_path / "vis.mp4"
    data.main(["show", str(fixtures / "realshort.mp4"), "--out", str(out), "--frames", "4", "--size", "64x96",
                  "--device", "cpu", "--weights", str(fixtures / "raft_small.pth")])
    frames, _ = data.load_frames(out)
    assert frames.shape == (4, 64, 3 * 96, 3)
    heatmap = frames[..., 2 * 96:, :].astype(int)                          # (T, H, W, 3)
    assert np.abs(heatmap - heatmap.mean(-1, keepdims=True)).max() < 16   # grey


def test_bad_weights_and_missing_videos_are_one_line_errors(tmp_path, fixtures):
    not_raft = tmp_path / "not_raft.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, not_raft)
    video = str(fixtures / "realshort.mp4")
    assert "neither a torchvision raft_small nor a raft_large" in user_error(data.main, [
        "show", video, "--out", str(tmp_path / "x.mp4"), "--frames", "2", "--size", "64x64", "--device", "cpu",
        "--weights", str(not_raft)])
    assert "missing file" in user_error(data.main, [
        "show", str(tmp_path / "nothing.mp4"), "--out", str(tmp_path / "x.mp4"), "--device", "cpu",
        "--weights", str(fixtures / "raft_small.pth")])


def test_cached_latents_are_the_clip_encoded_frame_by_frame(tmp_path, capsys):
    """`data.py latents` + latents=...: an item's latent equals the autoencoder run on that item's frames."""
    write_videos(tmp_path)
    (tmp_path / "captions.csv").write_text("path,caption\ngood.mp4,a\ngood.gif,b\nempty.mp4,c\n")
    for name in ("good.mp4", "good.gif"):
        data.save_npz(data.cache_path(tmp_path, name, (32, 32)), **cached_pairs(12, (32, 32)))
    torch.manual_seed(0)
    autoencoder = KLAutoencoder(KL_SIZES["tiny"])
    with torch.no_grad():
        for p in autoencoder.parameters():
            p.normal_(0, 0.05)
    data.cache_latents(tmp_path, autoencoder, "kl-f8", (32, 32), "cpu", chunk=5)
    assert "encoded 2 videos; 1 unusable: 1 empty file: empty.mp4" in capsys.readouterr().out
    with np.load(data.latent_cache_path(tmp_path, "good.mp4", (32, 32))) as cache:
        assert cache["latents"].shape == (12, 4, 4, 4) and cache["latents"].dtype == np.float16
    frames = data.VideoFolderDataset(tmp_path, frames=FRAMES, size=(32, 32), max_stride=MAX_STRIDE)
    cached = data.VideoFolderDataset(tmp_path, frames=FRAMES, size=(32, 32), max_stride=MAX_STRIDE, latents="kl-f8")
    for index in range(4):
        item, from_cache = frames[index], cached[index]
        assert "video" not in from_cache and from_cache["caption"] == item["caption"]
        assert torch.equal(from_cache["fps"], item["fps"]) and torch.equal(from_cache["heatmap"], item["heatmap"])
        with torch.no_grad():
            expected = autoencoder.encode(data.to_unit_range(item["video"][None]))[0]  # (4, T, 4, 4)
        assert from_cache["latent"].shape == expected.shape
        assert torch.allclose(from_cache["latent"], expected, atol=2e-3 * expected.abs().max().item())
    with pytest.raises(ValueError, match="2 stale latent cache: good.mp4, good.gif"):  # another autoencoder's
        data.VideoFolderDataset(tmp_path, frames=FRAMES, size=(32, 32), latents="other")
    shutil.rmtree(tmp_path / ".latent_cache")
    with pytest.raises(ValueError, match="no video .* has cached latents.*python data.py latents"):
        data.VideoFolderDataset(tmp_path, frames=FRAMES, size=(32, 32), latents="kl-f8")
    assert "no such file" in user_error(data.main, ["latents", str(tmp_path), "--init", str(tmp_path / "missing.ckpt")])


def test_check_cli_counts_usable_and_skipped_videos(tmp_path, capsys):
    write_videos(tmp_path)
    write_csv(tmp_path)
    data.main(["check", str(tmp_path), "--frames", str(FRAMES)])
    report = capsys.readouterr().out
    assert f"{len(GOOD) + 1} usable, {len(BAD) + len(rows()[1])} skipped" in report
    for line in ("1 empty file: empty.mp4", "3 unreadable: truncated.mp4, random.mp4, text.mp4", "1 too short: short.mp4",
                 "1 no video stream: audio.m4a", "1 missing file: missing.mp4", "1 bad encoding: captions.csv line"):
        assert line in report
    (tmp_path / "captions.csv").write_text("path,caption\nempty.mp4,x\ntext.mp4,y\n")
    assert "no usable video" in user_error(data.main, ["check", str(tmp_path), "--frames", str(FRAMES)])
    assert "0 usable, 2 skipped" in capsys.readouterr().out


def test_demo_image_cli_writes_a_png_and_its_prompts(tmp_path):
    out = tmp_path / "first.png"
    result = subprocess.run([sys.executable, "-m", "demo.shapes", "image", str(out)], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # once through the interpreter
    assert result.returncode == 0, result.stderr[-2000:]
    image = np.asarray(Image.open(out))
    assert Image.open(out).format == "PNG" and image.shape == (256, 256, 3)
    prompts = [e["caption"] for e in shapes.held_out_pairs() if e["image_id"] == 0]
    assert [line.strip() for line in result.stdout.splitlines()[1:]] == prompts
    with pytest.raises(SystemExit, match="png"):
        shapes.main(["image", str(tmp_path / "first.txt")])


def test_training_with_heatmaps_from_the_step_matches_training_from_the_cache(tmp_path, fixtures):
    """--flow_weights: RAFT on each micro-batch's frame pairs inside the step, no cache, loader workers still on.
    Its first step sees the same clips, noise and, up to the cache's uint8 rounding, the same m' as a run reading
    the cache of `data.py heatmaps`; a stale cache stops the cached run before training, in one line."""
    write_folder(tmp_path)
    (tmp_path / "captions.csv").write_text("path,caption\na.mp4,one\nb.gif,two\n")   # both cacheable: the same list
    weights = str(fixtures / "raft_small.pth")
    data.cache_heatmaps(tmp_path, weights, (32, 32), 1, torch.device("cpu"))
    common = [f"--data={tmp_path}", "--model=demo", "--autoencoder=pixel", "--text_encoder=bytes", "--height=32",
              "--width=32", "--frames=3", "--max_stride=1", "--batch_size=2", "--micro_batch=2", "--steps=1",
              "--log_every=1", "--workers=1", "--device=cpu"]
    records = {}
    for name, extra in (("cached", []), ("in the step", [f"--flow_weights={weights}"])):
        train.train(train.load_config([*common, f"--out_dir={tmp_path / 'out' / name}", *extra]))
        records[name] = json.loads((tmp_path / "out" / name / "log.jsonl").read_text().splitlines()[-1])
    cached, in_step = records["cached"], records["in the step"]
    assert cached["diffusion"] == in_step["diffusion"] and cached["motif"] > 0
    assert in_step["motif"] == pytest.approx(cached["motif"], rel=0.02)
    data.save_npz(data.cache_path(tmp_path, "a.mp4", (32, 32)), num_frames=np.array(4),
                  stride_1=np.zeros((3, 32, 32), np.uint8))                # the older data.py's full-size cache
    with pytest.raises(SystemExit, match="error: stale heatmap cache .*run: python data.py heatmaps") as error:
        train.main([*common, f"--out_dir={tmp_path / 'out' / 'stale'}"])
    assert "\n" not in str(error.value)
