"""Every training command the README, docs/ and the files' docstrings show, run as written.

The commands are read from the documents themselves (fenced blocks, inline code, docstring lines), so a command
added to a page is tested without a line here. Each runs with only size-shrinking flags appended (4 frames of 32 x
32, a batch of one clip, a clip a rank under torchrun, one step): the recipe's sizes are swapped for compact ones in
the process that runs it (VideoCrafter2's U-Net at the `tiny` width, kl-f8 at the size of
tests/fixtures/vae_kl_small.pt, OpenCLIP ViT-H-14 as a 2-block text tower, RAFT small / large as
tests/fixtures/raft_small.pth), and the files a command names are made first: `videos/` (two real clips), WebVid's
CSV layout, `model.ckpt` in VideoCrafter2's layout, the heatmap and latent caches by the documents' own `data.py`
commands. A command that would not start (a flag train.py no longer has, a default that does not fit --init, a
torchrun flag torchrun does not take) fails here.

Under torchrun this file is the training script: `torchrun ... tests/test_commands.py ARGS` shrinks the sizes
and runs train.py's main with ARGS.
"""
import functools
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch.distributed.run import get_args_parser

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import flow  # noqa: E402
import model  # noqa: E402
import train  # noqa: E402

DOCUMENTS = [ROOT / "README.md", ROOT / "DESIGN.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("*.py"))]
SHRINK_TRAIN = ["--frames=4", "--height=32", "--width=32", "--max_stride=2", "--batch_size=1", "--micro_batch=1",
                "--steps=1", "--workers=1", "--log_every=1"]
ONE_STEP_NEVER_READS = ("out_dir", "seed", "steps", "ckpt_every", "keep_checkpoints", "cooldown_steps")
SHRINK_PREPARE = {"heatmaps": ["--size", "32x32", "--max-stride", "2"], "latents": ["--size", "32x32"]}
SMALL_CLIP = {"embed_dim": 32, "quick_gelu": False,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}


def shrink(setitem, setattr_):
    """Swap the recipe's sizes for compact ones (the U-Net's context width, 64, is the small text tower's), and take
    validation samples in 2 DDIM steps: their code runs, and a compact untrained model's samples are noise anyway."""
    import open_clip
    setitem(model.SIZES, "vc2", model.SIZES["tiny"])
    setitem(model.KL_SIZES, "full", model.KL_SIZES["small"])
    setitem(open_clip.factory._MODEL_CONFIGS, "ViT-H-14", SMALL_CLIP)
    load = flow.load_raft_model
    setattr_(flow, "load_raft_model", lambda w: load(FIXTURES / "raft_small.pth" if w in ("small", "large") else w))
    setattr_(train, "VALIDATION_STEPS", 2)


# ----------------------------------------------------------------------------- the commands, from the documents

def documented_commands(program):
    """(where, argv) of each `python PROGRAM ...` / `torchrun ... PROGRAM ...` shown as code in the documents."""
    pattern = re.compile(rf"^(?:python|torchrun)\s[^#]*?(?<=\s){re.escape(program)}(?=\s|$)[^#]*")
    found = []
    for path in DOCUMENTS:
        text = path.read_text()
        if path.suffix == ".py":  # the module docstring's indented lines
            docstring = text.split('"""')[1] if text.startswith('"""') else ""
            snippets = [line for line in docstring.splitlines() if line.startswith("    ")]
        else:  # fenced blocks line by line (a trailing backslash continues), and inline code (may wrap a line)
            fenced = re.findall(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", text, flags=re.S | re.M)
            snippets = [s for block in fenced for s in block.replace("\\\n", " ").splitlines()]
            prose = re.sub(r"^[ \t]*```[^\n]*\n.*?^[ \t]*```", "", text, flags=re.S | re.M)
            snippets += re.findall(r"`([^`]+)`", prose.replace("\n", " "))
        for snippet in snippets:
            match = pattern.match(snippet.strip())
            if match:
                found.append((f"{path.relative_to(ROOT)}: {match.group(0).strip()}", shlex.split(match.group(0))))
    return found


def split_launcher(argv, program):
    """argv -> (the launcher's arguments before PROGRAM, PROGRAM's arguments)."""
    at = argv.index(program)
    return argv[1:at], argv[at + 1:]


def this_torchruns_flags(launcher):
    """The launcher's arguments as this torch's torchrun takes them: --shutdown-timeout came with torch 2.12 (README:
    older ones run the line without it, and torchrun's own 30 s applies)."""
    if "--shutdown-timeout" in launcher and "--shutdown-timeout" not in get_args_parser()._option_string_actions:
        at = launcher.index("--shutdown-timeout")
        launcher = launcher[:at] + launcher[at + 2:]
    return launcher


def test_the_documents_show_the_commands_this_file_runs():
    shown = [where for where, _ in documented_commands("train.py")]
    for expected in ("README.md: python train.py --preset shapes", "train.py: torchrun --nproc_per_node 8",
                     "README.md: torchrun --nproc_per_node 8 --shutdown-timeout 600 train.py --data=webvid",
                     "docs/memory.md: python train.py --data=videos --init=model.ckpt --latents=true --shard=true",
                     "docs/motion-monitor.md: python train.py --data=out/realvideos"):
        assert any(where.startswith(expected) for where in shown), (expected, shown)
    assert any(argv[2] == "latents" for _, argv in documented_commands("data.py"))


# ----------------------------------------------------------------------------- the files the commands name

@functools.cache
def clips():
    """(name, frames, caption) of two real 7-frame clips: the fixture's, panning one way and back. 7 frames are what
    SHRINK_TRAIN's 4 frames at stride 2 span; each frame more is 2 RAFT pairs more per stride for every cache."""
    frames = data.VideoFile(FIXTURES / "realshort.mp4").read(range(0, 21, 3))
    return (("clip_a", frames, "the scene pans"), ("clip_b", frames[::-1].copy(), "the scene pans back"))


@functools.cache
def mp4(name):
    """The bytes of clips()' clip `name` as an .mp4, encoded once: every folder the commands name holds the same."""
    frames = {n: video for n, video, _ in clips()}[name]
    with tempfile.TemporaryDirectory() as tmp:
        data.write_video(Path(tmp) / "clip.mp4", frames, fps=10)
        return (Path(tmp) / "clip.mp4").read_bytes()


def make_folder(root):
    """A video folder with its captions.csv."""
    root.mkdir(parents=True, exist_ok=True)
    for name, _, _ in clips():
        (root / f"{name}.mp4").write_bytes(mp4(name))
    (root / "captions.csv").write_text("path,caption\n" + "".join(f"{n}.mp4,{c}\n" for n, _, c in clips()))


def make_webvid(csv_path):
    """WebVid's layout: the CSV, and videos/{page_dir}/{videoid}.mp4 under its folder."""
    root = csv_path.parent
    lines = ["videoid,contentUrl,duration,page_dir,name"]
    for videoid, (name, _, caption) in zip(("1001", "1002"), clips()):
        (root / "videos" / "000001_000050").mkdir(parents=True, exist_ok=True)
        (root / "videos" / "000001_000050" / f"{videoid}.mp4").write_bytes(mp4(name))
        lines.append(f"{videoid},https://x/{videoid}.mp4,PT00H00M10S,000001_000050,{caption}")
    csv_path.write_text("\n".join(lines) + "\n")


def make_videocrafter2_checkpoint(path):
    """model.ckpt in VideoCrafter2's layout at the shrunk sizes: a text-to-video U-Net (4 input channels), kl-f8,
    OpenCLIP's text half (`cond_stage_model.model.*`), random weights."""
    torch.manual_seed(0)
    t2v = model.UNet(model.UNetConfig(**{**asdict(model.SIZES["vc2"]), "in_channels": 4}))
    autoencoder = model.KLAutoencoder(model.KL_SIZES["full"])
    text = model.OpenCLIPTextEncoder("ViT-H-14")
    state = {**{"model.diffusion_model." + k: v for k, v in t2v.state_dict().items()},
             **{"first_stage_model." + k: v for k, v in autoencoder.state_dict().items()},
             **{"cond_stage_model.model." + k: v for k, v in text.model.state_dict().items()}}
    torch.save({"state_dict": state}, path)


def make_named_files(argv):
    """The video folder, captions file or checkpoint a command names, made once."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "--data" and value.endswith(".csv") and not Path(value).exists():
            make_webvid(Path(value))
        elif key == "--data" and value not in ("", "shapes") and not Path(value).exists():
            make_folder(Path(value))
        elif key in ("--init", "--monitor_weights") and not Path(value).exists():
            Path(value).parent.mkdir(parents=True, exist_ok=True)
            if value.endswith(".pth"):
                Path(value).write_bytes((FIXTURES / "raft_small.pth").read_bytes())
            else:
                make_videocrafter2_checkpoint(value)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder to run the commands in, ../shared/weights beside it as motion-monitor.md's command expects."""
    work = tmp_path_factory.mktemp("commands") / "work"
    work.mkdir()
    return work


# ----------------------------------------------------------------------------- running them

def test_every_documented_training_command_starts(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    shrink(monkeypatch.setitem, monkeypatch.setattr)

    # the caches first, by the documents' own data.py commands (a cache for a folder no training command reads
    # is made all the same: the command must start)
    for where, argv in documented_commands("data.py"):
        _, args = split_launcher(argv, "data.py")
        if args[0] not in ("heatmaps", "latents"):
            continue
        named = dict(zip(args[2::2], args[3::2]))  # --size 320x512 --weights large ...
        make_named_files([f"--data={args[1]}", f"--init={named.get('--init', 'model.ckpt')}"]
                         + ([f"--monitor_weights={named['--weights']}"] if named.get("--weights", "").endswith(".pth") else []))
        data.main(args + SHRINK_PREPARE[args[0]])

    ran = {}
    for where, argv in documented_commands("train.py"):
        launcher, args = split_launcher(argv, "train.py")
        if argv[0] == "torchrun":  # torchrun's own parser takes its flags as written
            parsed = get_args_parser().parse_args(this_torchruns_flags(launcher) + ["train.py"])
            assert int(parsed.nproc_per_node) >= 1, where
        make_named_files(args)
        cfg = train.load_config(args + SHRINK_TRAIN)
        train.check_config(cfg, world_size=1)
        # one step reaches no checkpoint but the last, no sample, no cooldown: a command that differs from one before
        # only there (or in out_dir, or seed) runs the same code, so it is checked, not trained again
        key = repr({k: v for k, v in asdict(cfg).items() if k not in ONE_STEP_NEVER_READS}
                   | {"sample_every": bool(cfg.sample_every)})
        if key in ran:
            continue
        shutil.rmtree(cfg.out_dir, ignore_errors=True)  # commands that share an out_dir are separate runs: each fresh
        train.main(args + SHRINK_TRAIN)
        assert (Path(cfg.out_dir) / "latest").is_file(), where
        ran[key] = where
    assert len(ran) >= 7, sorted(ran.values())


@pytest.mark.slow
def test_the_recipe_under_torchrun(workspace, monkeypatch):
    """The README's 8-GPU line, as written but for 2 processes (gloo on the CPU) and the shrunk sizes."""
    monkeypatch.chdir(workspace)
    shrink(monkeypatch.setitem, monkeypatch.setattr)
    make_named_files(["--data=videos", "--init=model.ckpt"])
    data.main(["latents", "videos", "--init", "model.ckpt"] + SHRINK_PREPARE["latents"])
    data.main(["heatmaps", "videos"] + SHRINK_PREPARE["heatmaps"])
    (where, argv), = [c for c in documented_commands("train.py")
                      if c[0].startswith("README.md: torchrun") and "--latents=true" in c[1]]
    launcher, args = split_launcher(argv, "train.py")
    launcher = this_torchruns_flags(launcher)
    launcher[launcher.index("--nproc_per_node") + 1] = "2"
    from conftest import free_port
    shutil.rmtree(train.load_config(args).out_dir, ignore_errors=True)  # the run of the test before: this one is fresh
    command = [sys.executable, "-m", "torch.distributed.run",  # torchrun, whether or not its script is on PATH
               *launcher, f"--master_port={free_port()}", __file__, *args, *SHRINK_TRAIN, "--batch_size=2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) on cpu" in result.stdout and (workspace / "out/motif/latest").is_file(), result.stdout


if __name__ == "__main__":  # torchrun's script in test_the_recipe_under_torchrun
    shrink(lambda d, k, v: d.__setitem__(k, v), setattr)
    train.main(sys.argv[1:])
