"""The motion monitor (flow.py): a real clip against itself is 1, a first-frame copy is static and warned about,
VBench's dynamic degree follows its rule, and a run's losses do not change with the monitor on."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
import train
from conftest import user_error
from flow import RAFT, STATIC_FRACTION, MotionMonitor, clip_motion, motion_figures
from tools import curves

SIZE = (64, 96)


@pytest.fixture(scope="module")
def raft(fixtures):
    return RAFT(str(fixtures / "raft_small.pth"))


@pytest.fixture(scope="module")
def real(fixtures):
    """Two 4-frame clips of the fixture video (stride 4, from frames 0 and 12): (2, 3, 4, H, W) in [-1, 1]."""
    video = data.VideoFile(fixtures / "realshort.mp4")
    clips = [data.resize_center_crop(video.read(range(start, start + 16, 4)), SIZE) for start in (0, 12)]
    return torch.stack([data.frames_to_tensor(c).transpose(0, 1) for c in clips])


def test_a_real_clip_scored_against_itself_gives_one(raft, real):
    figures, warning = MotionMonitor(raft)(real, real, torch.tensor([7.5, 7.5]))
    assert figures["motion_ratio"] == pytest.approx(1.0) and figures["static_sample_rate"] == 0
    assert figures["sample_moving_area"] == figures["real_moving_area"] > 0
    assert figures["dynamic_degree"] == figures["real_dynamic_degree"] and warning is None


def test_a_sampler_that_repeats_the_first_frame_goes_static_and_is_warned_about(raft, real):
    monitor = MotionMonitor(raft)
    copies = real[:, :, :1].expand_as(real).contiguous()  # every frame the conditioning image
    figures, warning = monitor(copies, real, torch.tensor([7.5, 7.5]))
    assert figures["motion_ratio"] < 0.05 and figures["static_sample_rate"] == 1.0
    assert figures["dynamic_degree"] == 0 and figures["sample_moving_area"] < 0.01
    assert warning.startswith("warning: the samples are going static: motion ratio 0.0") and "\n" not in warning

    # a run whose first pass moved like its clips, and whose later pass moves in one frame pair of three
    half = torch.cat([real[:, :, :2], real[:, :, 1:2], real[:, :, 1:2]], dim=2)  # moves in its first pair only
    monitor = MotionMonitor(raft)
    assert monitor(real, real, torch.tensor([7.5, 7.5]))[1] is None
    figures, warning = monitor(half, real, torch.tensor([7.5, 7.5]))
    assert figures["motion_ratio"] < 0.5 and "under half the first pass's 1.00" in warning


class FrameDifference:
    """A stand-in for RAFT: a pair's flow is 10 px to the right times the mean change of its pixels."""

    def pairs(self, first, second):
        return torch.stack([10 * (second - first).abs().mean(1), torch.zeros_like(first[:, 0])], dim=1)


def test_the_warning_compares_with_the_data_and_with_the_first_pass_at_most_one(real):
    monitor, fps = MotionMonitor(FrameDifference()), torch.tensor([7.5, 7.5])
    noisy = real + 0.5 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))  # an untrained model
    first, warning = monitor(noisy, real, fps)
    assert first["motion_ratio"] > 2 and warning is None
    assert monitor(real, real, fps)[1] is None  # down from the noise to the data's motion: no drift
    slower = torch.cat([real[:, :, :2], real[:, :, 1:2], real[:, :, 1:2]], dim=2)  # moves in one pair of three
    figures, warning = monitor(0.6 * slower + 0.4 * real, real, fps)
    assert 0.5 < figures["motion_ratio"] and warning is None
    figures, warning = monitor(slower, real, fps)
    assert figures["motion_ratio"] < 0.5 and "under 0.5 of the real clips' motion" in warning
    assert "under half the first pass's 1.00" in warning


class FixedFlow:
    """A stand-in for RAFT: every pair moves `pixels` to the right."""

    def __init__(self, pixels):
        self.pixels = pixels

    def pairs(self, first, second):
        flow = torch.zeros(len(first), 2, *first.shape[-2:])
        flow[:, 0] = self.pixels
        return flow


def test_vbench_dynamic_degree_follows_its_rule_by_hand():
    videos = torch.zeros(1, 3, 4, 64, 64)  # 4 frames: VBench wants round(4 * 4 / 16) = 1 pair over the threshold
    # threshold = max(1, 8 / fps) * 6 * 64 / 256 = 1.5 px at fps 8, 3 px at fps 4
    assert clip_motion(FixedFlow(2.0), videos, torch.tensor([8.0]))["dynamic"].item() == 1.0
    assert clip_motion(FixedFlow(2.0), videos, torch.tensor([4.0]))["dynamic"].item() == 0.0
    assert clip_motion(FixedFlow(1.0), videos, torch.tensor([16.0]))["dynamic"].item() == 0.0
    moved = clip_motion(FixedFlow(6.4), videos, torch.tensor([8.0]))
    assert moved["flow"].item() == pytest.approx(0.1) and moved["moving_area"].item() > 0.99  # x = 0.1 > 0.05
    # static: a sample under STATIC_FRACTION of its real clip's flow
    slow = clip_motion(FixedFlow(6.4 * STATIC_FRACTION * 0.9), videos, torch.tensor([8.0]))
    assert motion_figures(slow, moved)["static_sample_rate"] == 1.0
    assert motion_figures(moved, moved)["static_sample_rate"] == 0.0


def video_folder(root, fixtures):
    video = data.VideoFile(fixtures / "realshort.mp4")
    data.write_video(root / "a.mp4", video.read(range(0, 10, 2)), fps=15)  # 5 frames: 3 at stride 2, no more to cache
    data.write_video(root / "b.mp4", video.read(range(0, 10, 2))[::-1].copy(), fps=15)
    (root / "captions.csv").write_text("path,caption\na.mp4,the scene pans\nb.mp4,the scene pans back\n")


def test_the_monitor_logs_each_pass_and_leaves_the_losses_bit_identical(tmp_path, fixtures, capsys, monkeypatch):
    monkeypatch.setattr(train, "VALIDATION_STEPS", 2)  # the passes and their figures are tested, not the samples
    video_folder(tmp_path, fixtures)
    weights = str(fixtures / "raft_small.pth")
    common = [f"--data={tmp_path}", "--model=demo", "--autoencoder=pixel", "--text_encoder=bytes", "--height=32",
              "--width=64", "--frames=3", "--max_stride=2", "--batch_size=2", "--micro_batch=2", "--steps=2",
              "--log_every=1", "--workers=0", "--device=cpu"]
    # the step's RAFT (no cache yet) serves the monitor; then, from the cache, a run without the monitor and one
    # whose monitor builds its own RAFT: the same losses, bit for bit
    runs = {"step's raft": [f"--flow_weights={weights}", "--sample_every=1", "--steps=1"],
            "off": ["--sample_every=0"], "on": ["--sample_every=1", f"--monitor_weights={weights}"]}
    logs = {}
    for name, extra in runs.items():
        if name == "off":
            data.cache_heatmaps(tmp_path, weights, (32, 64), 2, torch.device("cpu"))
        train.train(train.load_config([*common, f"--out_dir={tmp_path / name}", *extra]))
        logs[name] = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
    losses = {name: [r for r in log if "loss" in r] for name, log in logs.items()}
    strip = lambda records: [{k: v for k, v in r.items() if k not in ("clips_per_s", "peak_mem_gb")} for r in records]  # noqa: E731
    assert strip(losses["on"]) == strip(losses["off"]) and len(losses["on"]) == 2
    for name, steps in (("on", [1, 2]), ("step's raft", [1])):
        passes = [r for r in logs[name] if "validation" in r]
        assert [r["step"] for r in passes] == steps
        for r in passes:
            figures = r["validation"]
            assert figures["motion_ratio"] >= 0 and 0 <= figures["static_sample_rate"] <= 1
            assert figures["real_moving_area"] > 0 and np.isfinite(figures["dynamic_degree"])
    curves.main([str(tmp_path / "on")])  # the picture of the run
    assert Image.open(tmp_path / "on" / "curves.png").size[0] > 800
    capsys.readouterr()
    train.train(train.load_config([*common, "--steps=1", "--sample_every=1", f"--out_dir={tmp_path / 'none'}"]))
    assert "motion monitor off (no RAFT): --monitor_weights=" in capsys.readouterr().out


def test_curves_reads_a_resumed_log_and_refuses_what_is_not_one(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [{"step": 1, "loss": 0.5, "diffusion": 0.4, "moving": 0.9, "static": 0.3},
             {"step": 2, "loss": 0.4, "diffusion": 0.3, "moving": 0.8, "static": 0.2},
             {"step": 2, "validation": {"motion_ratio": 0.9, "static_sample_rate": 0.0}},
             {"step": 2, "loss": 0.45, "diffusion": 0.35, "moving": 0.85, "static": 0.25}]  # resumed from step 1
    log.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    losses, passes = curves.read_log(log)
    assert list(losses) == [1, 2] and losses[2]["loss"] == 0.45 and passes == {2: lines[2]["validation"]}
    curves.main([str(tmp_path), "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").stat().st_size > 10_000
    assert "does not exist" in user_error(curves.main, [str(tmp_path / "nope")])
    log.write_text("{not json\n")
    assert "is not a JSON line" in user_error(curves.main, [str(tmp_path)])


def test_a_resumed_run_warns_against_its_own_first_pass(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"step": 10, "loss": 0.5}\n{"step": 20, "validation": {"motion_ratio": 0.8}}\n'
                                        '{"step": 40, "validation": {"motion_ratio": 0.3}}\n{"step": 41, "valid')
    cfg = train.load_config([f"--data={tmp_path}", f"--out_dir={tmp_path}"])
    state = train.TrainState(cfg, None, None, None, {}, None, torch.device("cpu"), raft=FrameDifference())
    assert train.motion_monitor(cfg, state).first_ratio == 0.8
    (tmp_path / "log.jsonl").unlink()
    assert train.motion_monitor(cfg, state).first_ratio is None
