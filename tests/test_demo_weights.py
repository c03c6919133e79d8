"""The shipped demo weights (demo/weights.pt): the model the preset builds today, and samples that do what their text
says, from `python sample.py demo/first_frame.png "PROMPT"` with no --ckpt as the README shows it."""
from dataclasses import asdict

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import sample
import train
from conftest import ROOT, user_error
from demo.bench import held_out, score
from demo.shapes import held_out_pairs
from model import ModelConfig, load_checkpoint
from tools.shapesbench import sample_all

RUN_ONLY = {"sample_every", "ckpt_every", "keep_checkpoints", "log_every", "out_dir", "device", "workers", "resume"}


def test_the_shipped_weights_are_what_the_preset_builds_today():
    shipped = load_checkpoint(sample.DEMO_WEIGHTS)
    preset = asdict(train.load_config(["--preset", "shapes"]))
    differ = {k for k in preset if k not in RUN_ONLY and shipped["config"].get(k) != preset[k]}
    assert not differ, f"demo/weights.pt is stale: {differ} differ from config/shapes.toml (python -m tools.demo_weights)"
    built = sample.build_model(ModelConfig.from_run_config(preset)).state_dict()
    assert {k: v.shape for k, v in shipped["model"].items()} == {k: v.shape for k, v in built.items()}
    assert all(v.dtype == torch.float16 for v in shipped["model"].values() if v.is_floating_point())
    assert sample.DEMO_WEIGHTS.stat().st_size < 10 * 2 ** 20


def test_the_shipped_weights_move_what_the_text_says():
    model, cfg, step = sample.load_model(sample.DEMO_WEIGHTS, torch.device("cpu"))
    assert next(model.parameters()).dtype == torch.float32 and step == cfg["steps"]
    entries = held_out(cfg, 4)  # 4 held-out first frames, all their prompts
    figures = score(entries, sample_all(model, cfg, entries, 25, cfg["cfg_scale"], 0, len(entries)))
    assert figures["direction_accuracy"] >= 0.9 and figures["still_accuracy"] >= 0.9, figures


@pytest.mark.parametrize("prompt", (ROOT / "demo" / "first_frame.txt").read_text().splitlines())
def test_the_first_command_animates_the_shipped_frame_as_asked(prompt, tmp_path, capsys):
    sample.main([str(ROOT / "demo" / "first_frame.png"), prompt, "--steps", "25", "--out", str(tmp_path / "s")])
    assert "no --ckpt: using the shipped demo weights demo/weights.pt" in capsys.readouterr().out
    frames = iio.imread(tmp_path / "s.gif", index=None)[..., :3]  # (T, 256, 256, 3), upscaled 8x nearest
    frames = np.ascontiguousarray(frames[:, 4::8, 4::8])          # (T, 32, 32, 3)
    entry = next(e for e in held_out_pairs(1, max_shapes=1) if e["caption"] == prompt)
    figures = score([entry], [frames])
    asked = next(iter(entry["motions"].values()))
    assert figures["still_accuracy" if asked == "still" else "direction_accuracy"] == 1, (prompt, figures)


def test_no_ema_needs_a_checkpoint():
    assert "--no-ema needs --ckpt" in user_error(sample.main, [str(ROOT / "demo" / "first_frame.png"), "x", "--no-ema"])
