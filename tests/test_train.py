"""train.py and sample.py end to end on tiny shapes runs: config, resume, sampling, bad input (torchrun: test_shard.py)."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import sample
import train
from conftest import user_error
from demo.unet import DEMO
from model import MotifModel, build_unet, resolve_checkpoint
from sample import build_model, ddim_sample, load_model
from tools.shapesbench import main as eval_main

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--preset=shapes", "--height=16", "--width=16", "--frames=4", "--batch_size=4", "--micro_batch=2",
        "--log_every=1", "--warmup_steps=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run(args, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, **kw)


def losses(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- config

def test_config_layers_defaults_preset_and_flags():
    cfg = train.load_config(["--preset", "shapes", "--lr=3e-4", "--steps", "7", "--resume", "--gradient_checkpointing=true"])
    assert cfg.data == "shapes" and cfg.model == "demo" and cfg.frames == 4 and cfg.max_shapes == 1  # config/shapes.toml
    assert cfg.lr == 3e-4 and cfg.steps == 7 and cfg.resume == "latest" and cfg.gradient_checkpointing is True
    recipe = train.load_config([])  # the paper's recipe is the default, as the README says
    assert (recipe.model, recipe.text_encoder, recipe.autoencoder) == ("vc2", "openclip", "kl-f8")
    assert (recipe.frames, recipe.height, recipe.width, recipe.batch_size, recipe.lr, recipe.steps) == \
        (16, 320, 512, 64, 5e-5, 32000)
    assert (recipe.motif_lambda, recipe.text_dropout, recipe.max_stride) == (1.0, 0.1, 8)
    assert "--init" in user_error(train.main, ["--data=videos"])  # frozen encoders: from VideoCrafter2's model.ckpt


def test_flags_win_over_presets_wherever_they_stand():
    assert train.load_config(["--steps=3", "--preset", "shapes"]).steps == 3
    assert train.load_config(["--max_shapes", "2", "--preset=shapes", "--lr=1e-3"]).max_shapes == 2


@pytest.mark.parametrize("text, resume", [("true", "latest"), ("yes", "latest"), ("1", "latest"), ("latest", "latest"),
                                          ("false", ""), ("run/ckpt_0000002.pt", "run/ckpt_0000002.pt")])
def test_resume_true_means_latest(text, resume):
    assert train.load_config([f"--resume={text}"]).resume == resume


@pytest.mark.parametrize("argv, message", [
    (["--lerning_rate=1"], "unknown config key 'lerning_rate'"),
    (["--lr=fast"], "--lr takes a float"),
    (["--steps=1.5"], "--steps takes a int"),
    (["--gradient_checkpointing=maybe"], "takes true or false"),
    (["--preset=nope"], "unknown preset 'nope'"),
    (["stray"], "cannot read argument"),
])
def test_bad_config_is_a_clear_error(argv, message):
    with pytest.raises(ValueError, match=message):
        train.load_config(argv)


@pytest.mark.parametrize("argv, message", [
    (["--offload=true"], "add --shard=true"),
    (["--shard=true", "--sample_every=10"], "set --sample_every=0"),
    (["--loss_mode=focal"], "motif or inverse"),
    (["--cooldown_steps=-1"], "cooldown_steps must be 0 or more"),
    (["--steps=-1"], "steps must be positive, not -1"),
    (["--lr=nan"], "lr must be 0 or more, not nan"),
    (["--cfg_scale=inf"], "cfg_scale must be 0 or more, not inf"),
    (["--text_dropout=1.5"], r"text_dropout must be in \[0, 1\], not 1.5"),
    (["--workers=-2"], "workers must be 0 or more"),
    (["--shape_scale=0"], "shape_scale must be positive"),
])
def test_inconsistent_config_is_a_clear_error(argv, message):
    with pytest.raises(ValueError, match=message):
        train.check_config(train.load_config(["--preset", "shapes", *argv]), world_size=1)


def test_learning_rate_warms_up_holds_and_cools_down():
    cfg = train.load_config(["--preset=shapes", "--lr=1e-3", "--warmup_steps=10", "--steps=100", "--cooldown_steps=20"])
    lrs = [train.learning_rate(cfg, step) for step in range(cfg.steps)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == lrs[79] == 1e-3  # warmup, then constant up to the cooldown
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:])) and lrs[-1] == pytest.approx(1e-3 / 20)  # linear, down to ~0
    cfg.steps = 10
    cooled = [train.learning_rate(cfg, step) for step in (0, 9)]  # a run shorter than its cooldown: all of it cools
    assert cooled == pytest.approx([1e-4, 1e-4])
    cfg.cooldown_steps = 0
    assert train.learning_rate(cfg, cfg.steps - 1) == 1e-3  # off: constant to the end


def test_user_errors_exit_with_one_line():
    no_data = run(["train.py"])  # once through the interpreter: the exit status and the one line on stderr
    assert no_data.returncode != 0 and no_data.stderr.strip().count("\n") == 0
    assert "--data=DIR" in no_data.stderr and "--preset shapes" in no_data.stderr
    assert "multiple of 4" in user_error(train.main, ["--preset=shapes", "--batch_size=6", "--micro_batch=4"])
    assert "multiples of 8" in user_error(train.main, ["--preset=shapes", "--height=20", "--width=20"])


# ----------------------------------------------------------------------------- resume

def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    torch.set_num_threads(1)
    full, part = tmp_path / "full", tmp_path / "part"
    constant = TINY + ["--cooldown_steps=0"]  # this test stops a run by giving it fewer steps; a cooldown ends with them
    train.train(train.load_config(constant + ["--steps=4", f"--out_dir={full}"]))
    train.train(train.load_config(constant + ["--steps=2", f"--out_dir={part}"]))
    ckpt = torch.load(resolve_checkpoint(part), weights_only=True)
    assert ckpt["step"] == 2 and ckpt["config"]["steps"] == 2 and len(ckpt["ema"]) > 0
    train.train(train.load_config(constant + ["--steps=4", f"--out_dir={part}", "--resume"]))
    a, b = losses(full), losses(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("loss", "diffusion", "motif", "moving", "static"):
            assert x[key] == y[key], (x["step"], key)
    final_full = torch.load(resolve_checkpoint(full), weights_only=True)
    final_part = torch.load(resolve_checkpoint(part), weights_only=True)
    for k, v in final_full["model"].items():
        assert torch.equal(v, final_part["model"][k]), k
    assert final_full["ema"].keys() == final_part["ema"].keys()
    assert all(torch.equal(v, final_part["ema"][k]) for k, v in final_full["ema"].items())


def test_a_checkpoint_with_adamw_in_one_group_resumes_exactly(tmp_path):
    """AdamW's parameters come in groups of train.ADAMW_GROUP; a checkpoint whose state holds them in one group (a
    train.py that grouped them otherwise wrote it) resumes as exactly as one of today's."""
    torch.set_num_threads(1)
    full, part = tmp_path / "full", tmp_path / "part"
    constant = TINY + ["--cooldown_steps=0"]
    train.train(train.load_config(constant + ["--steps=3", f"--out_dir={full}"]))
    train.train(train.load_config(constant + ["--steps=2", f"--out_dir={part}"]))
    path = resolve_checkpoint(part)
    ckpt = torch.load(path, weights_only=True)
    groups = ckpt["optimizer"]["param_groups"]
    assert len(groups) > 1 and all(len(g["params"]) <= train.ADAMW_GROUP for g in groups)
    ckpt["optimizer"]["param_groups"] = [{**groups[0], "params": [i for g in groups for i in g["params"]]}]
    torch.save(ckpt, path)
    train.train(train.load_config(constant + ["--steps=3", f"--out_dir={part}", "--resume"]))
    final_full = torch.load(resolve_checkpoint(full), weights_only=True)
    final_part = torch.load(resolve_checkpoint(part), weights_only=True)
    assert all(torch.equal(v, final_part["model"][k]) for k, v in final_full["model"].items())


def test_grad_clip_0_means_no_clipping(tmp_path):
    torch.set_num_threads(1)
    model = train.train(train.load_config(TINY + ["--steps=1", "--grad_clip=0", "--lr=1e-2", f"--out_dir={tmp_path}"]))
    torch.manual_seed(0)  # the run's --seed: its initial weights
    initial = build_model(model.cfg).state_dict()
    assert any(not torch.equal(v, initial[k]) for k, v in model.state_dict().items())  # the step moved the weights
    assert losses(tmp_path)[0]["grad_norm"] > 0


def test_pruning_removes_only_this_runs_older_checkpoints(tmp_path):
    """Another run's higher-numbered checkpoints stay, and this run's newest is never pruned (keep 1 included)."""
    other = tmp_path / "ckpt_0000010.pt"
    other.write_bytes(b"another run's")
    for step in (1, 2):
        train.save_checkpoint(tmp_path, {"step": step}, keep=1)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == ["ckpt_0000002.pt", "ckpt_0000010.pt"]
    assert resolve_checkpoint(tmp_path).is_file() and resolve_checkpoint(tmp_path).name == "ckpt_0000002.pt"


def test_pruning_spares_the_checkpoint_latest_names(tmp_path, monkeypatch):
    """A run killed while it writes must leave `latest` naming a file, whichever files lie beside it."""
    for step in (2, 3, 4):
        (tmp_path / f"ckpt_{step:07d}.pt").write_bytes(b"x")
    (tmp_path / "latest").write_text("ckpt_0000002.pt\n")
    seen = []
    monkeypatch.setattr(train.torch, "save", lambda obj, f: seen.append(resolve_checkpoint(tmp_path).is_file()))
    train.save_checkpoint(tmp_path, {"step": 5}, keep=1)
    assert seen == [True]
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == ["ckpt_0000005.pt"]


def test_a_fresh_run_into_a_used_out_dir_is_refused(tmp_path):
    torch.set_num_threads(1)
    train.train(train.load_config(TINY + ["--steps=1", f"--out_dir={tmp_path}"]))
    message = user_error(train.main, TINY + ["--steps=2", f"--out_dir={tmp_path}"])
    assert "--resume" in message and "new --out_dir" in message
    assert [r["step"] for r in losses(tmp_path)] == [1]  # the old log, untouched
    train.train(train.load_config(TINY + ["--steps=2", f"--out_dir={tmp_path}", "--resume"]))
    assert [r["step"] for r in losses(tmp_path)] == [1, 2]


def test_on_resume_the_flags_optimizer_settings_apply_and_are_said(tmp_path, capsys):
    torch.set_num_threads(1)
    train.train(train.load_config(TINY + ["--steps=1", "--weight_decay=0", f"--out_dir={tmp_path}"]))
    train.train(train.load_config(TINY + ["--steps=2", "--weight_decay=0.5", f"--out_dir={tmp_path}", "--resume"]))
    ckpt = torch.load(resolve_checkpoint(tmp_path), weights_only=True)
    assert ckpt["step"] == 2 and all(g["weight_decay"] == 0.5 for g in ckpt["optimizer"]["param_groups"])
    said = [line for line in capsys.readouterr().out.splitlines() if "weight_decay" in line]
    assert said == ["resuming with the flags' weight_decay 0.5 (the checkpoint's run: 0.0)"]


# ----------------------------------------------------------------------------- sampling

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    torch.set_num_threads(1)
    train.train(train.load_config(TINY + ["--steps=2", f"--out_dir={out}"]))
    return resolve_checkpoint(out)


def test_sample_writes_a_readable_video(tiny_ckpt, tmp_path):
    image = tmp_path / "img.png"
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    iio.imwrite(image, rgba)  # RGBA, not square, not the model's size
    result = run(["sample.py", str(image), "the red circle moves right", f"--ckpt={tiny_ckpt}", "--steps=3",
                  "--upscale=2", "--fps=4", f"--out={tmp_path / 'clip'}"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "EMA" in result.stdout
    frames = iio.imread(tmp_path / "clip.mp4", plugin="pyav")
    assert frames.shape == (4, 32, 32, 3)  # 4 frames of 16x16, upscaled 2x
    gif = iio.imread(tmp_path / "clip.gif")
    assert gif.shape[0] == 4


def test_sampling_is_deterministic_for_a_seed(tiny_ckpt):
    model, cfg, _ = load_model(tiny_ckpt, "cpu")
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    a = ddim_sample(model, image, ["the red circle moves up"], 4, 8, steps=3, seeds=[5], progress=False)
    b = ddim_sample(model, image, ["the red circle moves up"], 4, 8, steps=3, seeds=[5], progress=False)
    c = ddim_sample(model, image, ["the red circle moves up"], 4, 8, steps=3, seeds=[6], progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sample_rejects_bad_input(tiny_ckpt, tmp_path):
    image = tmp_path / "img.png"
    iio.imwrite(image, np.zeros((16, 16), np.uint8))  # grey is fine
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    other_ckpt = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other_ckpt)
    cases = [
        ([str(tmp_path / "missing.png"), "x"], "does not exist"),
        ([str(tmp_path), "x"], "folder"),
        ([str(not_image), "x"], "cannot read"),
        ([str(image), "   "], "prompt is empty"),
        ([str(image), "x" * 500], "at most"),
        ([str(image), "x", f"--ckpt={other_ckpt}"], "not a MotiF checkpoint"),
        ([str(image), "x", f"--ckpt={tmp_path / 'none.pt'}"], "does not exist"),
        ([str(image), "x", "--cfg=nan"], "--cfg (the guidance scale) must be a number 0 or more, not nan"),
        ([str(image), "x", "--fps=inf"], "--fps and --batch must be positive"),
        ([str(image), "x", "--upscale=-1"], "--upscale and --seed 0 or more"),
        ([str(image), "x", "--seed=-1"], "--upscale and --seed 0 or more"),
    ]
    for args, message in cases:
        ckpt = [] if any("--ckpt" in a for a in args) else [f"--ckpt={tiny_ckpt}"]
        assert message in user_error(sample.main, [*args, f"--out={tmp_path / 'o'}", *ckpt]), args


def test_init_from_a_text_to_video_unet(tmp_path):

    t2v = build_unet(replace(DEMO, in_channels=12, out_channels=12))  # pixel_patch 2: 12 latent channels
    with torch.no_grad():
        for p in t2v.parameters():
            p.normal_(0, 0.02)
    path = tmp_path / "t2v.ckpt"
    torch.save({"state_dict": {"model.diffusion_model." + k: v for k, v in t2v.state_dict().items()}}, path)
    torch.set_num_threads(1)
    model = train.train(train.load_config(TINY + ["--steps=1", "--lr=0", f"--init={path}", f"--out_dir={tmp_path / 'run'}"]))
    ours = model.unet.state_dict()
    for k, v in t2v.state_dict().items():
        if k == "input_blocks.0.0.weight":
            assert torch.equal(ours[k][:, :12], v) and ours[k][:, 12:].abs().max() == 0  # image channels start at 0
        else:
            assert torch.equal(ours[k], v), k
    assert "no such file" in user_error(train.main, [*TINY, f"--init={tmp_path / 'missing.ckpt'}",
                                                     f"--out_dir={tmp_path / 'x'}"])


def test_sample_a_benchmark_in_ti2v_bench_layout(tiny_ckpt, tmp_path, capsys):
    bench = tmp_path / "bench"
    bench.mkdir()
    iio.imwrite(bench / "a.png", np.full((20, 30, 3), 200, np.uint8))
    iio.imwrite(bench / "b.png", np.zeros((16, 16, 4), np.uint8))  # RGBA
    iio.imwrite(bench / "c.jpg", np.full((50, 40), 90, np.uint8))  # grey
    rows = [("a.png", "the red circle moves left"), ("b.png", "the blue square moves up"),
            ("a.png", "the red circle stays still"), ("c.jpg", "the green triangle moves down")]
    (bench / "prompts.csv").write_text("image,prompt\n" + "".join(f"{i},{p}\n" for i, p in rows))
    out = tmp_path / "out"
    args = [f"--prompts={bench / 'prompts.csv'}", f"--ckpt={tiny_ckpt}", "--steps=2", "--batch=3", f"--out={out}"]
    sample.main(args)
    videos = sorted(out.glob("*.mp4"))
    assert [v.name for v in videos] == ["0000_a.mp4", "0001_b.mp4", "0002_a.mp4", "0003_c.mp4"]
    clips = {v.name: iio.imread(v, plugin="pyav") for v in videos}
    assert all(c.shape == (4, 16, 16, 3) for c in clips.values())
    index = (out / "index.csv").read_text().splitlines()
    assert index[0] == "row,image,prompt,seed,video" and len(index) == 5 and index[2].startswith("1,b.png,")
    # resumable: only the missing row is sampled, and it comes out as before although its batch differs
    (out / "0002_a.mp4").unlink()
    capsys.readouterr()
    sample.main(args + ["--batch=1"])
    assert "3 already sampled" in capsys.readouterr().out
    assert np.array_equal(iio.imread(out / "0002_a.mp4", plugin="pyav"), clips["0002_a.mp4"])
    (bench / "bad.csv").write_text("file,text\na.png,x\n")
    assert "columns image and prompt" in user_error(
        sample.main, [f"--prompts={bench / 'bad.csv'}", f"--ckpt={tiny_ckpt}", f"--out={out}"])


def huge_png(path, width, height):
    """A valid PNG header announcing width x height pixels: a decompression bomb, a few bytes on disk."""
    import struct
    import zlib

    def chunk(tag, payload):
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_huge_images_and_bad_eval_input_are_one_line_errors(tiny_ckpt, tmp_path):
    bomb = tmp_path / "bomb.png"
    huge_png(bomb, 50_000, 50_000)
    assert "exceeds limit" in user_error(sample.main, [str(bomb), "x", f"--ckpt={tiny_ckpt}"])
    bad_eval = run(["-m", "tools.shapesbench"])  # once through the interpreter
    assert bad_eval.returncode != 0 and "give --ckpt" in bad_eval.stderr and bad_eval.stderr.strip().count("\n") == 0
    cases = [
        ([f"--ckpt={tmp_path / 'none.pt'}"], "does not exist"),
        ([f"--ckpt={tmp_path}"], "without a 'latest' checkpoint"),
        ([f"--ckpt={tiny_ckpt}", "--steps=0"], "DDIM steps"),
        (["--baselines", "--images=0"], "must be positive"),
        ([f"--ckpt={tiny_ckpt}", "--cfg=nan"], "must be a number 0 or more, not nan"),
        ([f"--ckpt={tiny_ckpt}", "--images=2", "--strip=2"], "0..1 with --images 2, not 2: add --images 3"),
        ([f"--ckpt={tiny_ckpt}", "--strip=-1"], "not -1"),
        ([f"--ckpt={tiny_ckpt}", "--seed=-1", "--loss-shares"], "--seed 0 or more"),
    ]
    for args, message in cases:
        assert message in user_error(eval_main, args), args


def test_ddim_returns_the_clean_video_when_the_model_knows_it():
    """An oracle that answers the exact v for a known z0: DDIM (any steps, any guidance) must land on z0."""
    from loss import Schedule
    from model import PixelAutoencoder
    from sample import ddim_sample
    abar = Schedule().alphas_cumprod.float()

    class Oracle(torch.nn.Module):
        def __init__(self, z0):
            super().__init__()
            self.z0, self.autoencoder, self.weight = z0, PixelAutoencoder(4), torch.nn.Parameter(torch.zeros(1))
            self.image_latent, self.encode_video = MotifModel.image_latent, self.autoencoder.encode
            self.schedule = Schedule()

        def text_encoder(self, captions):
            return torch.zeros(len(captions), 1, 1)

        def denoise(self, z_t, z_img, t, context, fps):
            a = abar[t].view(-1, 1, 1, 1, 1)
            z0 = self.z0.repeat(2, 1, 1, 1, 1)
            noise = (z_t - a.sqrt() * z0) / (1 - a).sqrt()
            return a.sqrt() * noise - (1 - a).sqrt() * z0  # the v-target

    video = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    oracle = Oracle(PixelAutoencoder(4).encode(video))
    for steps, scale in ((1, 1.0), (7, 7.5), (50, 3.0)):
        out = ddim_sample(oracle, video[:, :, 0], ["a", "b"], 4, 8, steps, scale, seeds=[0, 1], progress=False)
        assert (out - video).abs().max() < 1e-4, (steps, scale)


# ----------------------------------------------------------------------------- validation samples

def test_validation_samples_do_not_change_training(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "VALIDATION_STEPS", 2)  # what is tested is that sampling leaves training alone
    torch.set_num_threads(1)
    plain, sampled = tmp_path / "plain", tmp_path / "sampled"
    train.train(train.load_config(TINY + ["--steps=3", f"--out_dir={plain}"]))
    train.train(train.load_config(TINY + ["--steps=3", "--sample_every=2", f"--out_dir={sampled}"]))
    a = [r for r in losses(plain) if "loss" in r]
    b = [r for r in losses(sampled) if "loss" in r]
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 3
    final = [torch.load(resolve_checkpoint(run), weights_only=True) for run in (plain, sampled)]
    for part in ("model", "ema"):
        assert all(torch.equal(v, final[1][part][k]) for k, v in final[0][part].items()), part
    (validation,) = [r for r in losses(sampled) if "validation" in r]
    assert validation["step"] == 2
    assert set(validation["validation"]) == {"direction_accuracy", "text_contrast_accuracy", "still_accuracy",
                                             "static_video_rate"}
    assert all(0 <= v <= 1 for v in validation["validation"].values())
    gif = iio.imread(sampled / "samples" / "step_0000002.gif")
    pairs = len(train.validation_set(train.load_config(TINY), None))
    assert gif.shape == (4, pairs * 16 * 8, 2 * 16 * 8, 3)  # 4 frames; a row per pair: image | sample, upscaled 8x
    assert not (plain / "samples").exists()


def write_heatmap_caches(folder, names, size=(16, 16)):
    """A heatmap cache in data.py's layout for each named 12-frame video: strides 1 and 2, every pair 200 / 255."""
    import data
    small = data.heatmap_size(size)
    for name in names:
        pairs = {f"{kind}_{s}": np.full((12 - s, *small), 200, np.uint8) for s in (1, 2) for kind in ("stride", "back")}
        data.save_npz(data.cache_path(folder, name, size), num_frames=np.array(12), heatmap_size=np.array(small), **pairs)


def test_training_on_a_video_folder_with_validation_samples(tmp_path, monkeypatch):
    """A captioned folder with cached heatmaps trains, and its validation samples are its first videos' frames."""
    monkeypatch.setattr(train, "VALIDATION_STEPS", 2)
    from test_data import GOOD, write_videos
    write_videos(tmp_path / "videos")
    (tmp_path / "videos" / "captions.csv").write_text("path,caption\n" + "".join(f"{n},clip {n}\n" for n in GOOD))
    write_heatmap_caches(tmp_path / "videos", GOOD)
    torch.set_num_threads(1)
    out = tmp_path / "run"
    train.train(train.load_config(["--data=" + str(tmp_path / "videos"), "--model=demo", "--autoencoder=pixel",
                                   "--text_encoder=bytes", "--pixel_patch=2",
                                   "--height=16", "--width=16", "--frames=4", "--max_stride=2", "--batch_size=2",
                                   "--micro_batch=2", "--workers=0", "--steps=2", "--sample_every=2", "--log_every=1",
                                   f"--out_dir={out}"]))
    records = losses(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2] and all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    gif = iio.imread(out / "samples" / "step_0000002.gif")
    assert gif.shape == (4, len(GOOD) * 16 * 8, 2 * 16 * 8, 3)
    assert not any("validation" in r for r in records)  # no figures: no RAFT for the motion monitor


def test_a_validation_set_skips_unusable_videos_as_the_training_set_does(tmp_path, capsys):
    from test_data import GOOD, write_videos
    import data
    write_videos(tmp_path / "videos")
    good = list(GOOD)
    names = ["truncated.mp4", good[0], "short.mp4", *good[1:]]  # the dataset finds the first bad one, not the second
    (tmp_path / "videos" / "captions.csv").write_text("path,caption\n" + "".join(f"{n},clip {n}\n" for n in names))
    write_heatmap_caches(tmp_path / "videos", names)
    cfg = train.load_config([f"--data={tmp_path / 'videos'}", "--height=16", "--width=16", "--frames=4", "--max_stride=2"])
    dataset = data.VideoFolderDataset(cfg.data, frames=4, size=(16, 16), max_stride=2)
    assert "1 unusable videos skipped so far: 1 unreadable: truncated.mp4" in capsys.readouterr().err
    entries = train.validation_set(cfg, dataset)
    assert [e["caption"] for e in entries] == [f"clip {n}" for n in GOOD]
    assert "skipping short.mp4: too short" in capsys.readouterr().err
    assert dataset.unusable == [("unreadable", "truncated.mp4"), ("too short", "short.mp4")]
    dataset.unusable += [("unreadable", name) for name in GOOD]
    with pytest.raises(ValueError, match="no usable video .* for the validation samples"):
        train.validation_set(cfg, dataset)


def test_the_process_group_waits_an_hour_for_rank_0(monkeypatch):
    """Rank 0 saves and samples while the others wait at their next collective: longer than NCCL's default 10
    minutes. A sharded run alone has a process group, so this process can look at its timeout."""
    import torch.distributed as dist
    from train import PROCESS_GROUP_TIMEOUT, setup_distributed
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    setup_distributed("cpu", shard=True)
    try:
        group = dist.distributed_c10d._get_default_group()
        assert group._get_backend(torch.device("cpu")).options._timeout == PROCESS_GROUP_TIMEOUT
        assert PROCESS_GROUP_TIMEOUT.total_seconds() >= 3600
    finally:
        dist.destroy_process_group()


def test_one_precision_rule_for_training_sampling_and_caches():
    from model import wants_bf16
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert not wants_bf16("auto", cpu) and wants_bf16("auto", gpu) and wants_bf16("bf16", cpu) and not wants_bf16("fp32", gpu)
    assert train.load_config(["--preset=shapes"]).dtype == "fp32"  # the demo's figures, on any device
    assert train.load_config([]).dtype == "auto"  # the recipe: bf16 on GPUs
