"""Benchmarks: a training step of the U-Net, DDIM sampling, RAFT motion heatmaps. A tool: nothing in the method
imports it; run it from the repository's root.

    python -m tools.bench                            # training step of the "bench" size on CPU (2 x 8 x 32x32)
    python -m tools.bench --size vc2 --batch 2 --frames 16 --latent 40x64 --dtype bf16 --checkpointing   # GPU: 320x512
    python -m tools.bench --compare videocrafter,diffusers --videocrafter ~/VideoCrafter --threads 2
    python -m tools.bench --what sample --size vc2 --frames 16 --latent 40x64 --dtype bf16
    python -m tools.bench --what heatmap --size 320x512 --frames 16 --raft tests/fixtures/raft_small.pth
    python -m tools.bench --what data --data videos --frames 16 --max-stride 8 --threads 1   # a video folder's costs
    python -m tools.bench --what roof --threads 2                        # the machine's matmul FLOP/s, for a step's share

--what train times one training step: forward + backward + AdamW step of the U-Net on random inputs of the
size asked (x-cat latents, timesteps, fps, and a random text context of 77 tokens: the text encoder is not
part of the U-Net step and is not timed), through train.py's own step (the autocast forward; train.loss_backward:
diffusion + motion focal loss on a random heatmap, backward; train.update: gradient clipping, fused AdamW, EMA). It reports the median step time
after --warmup steps and its spread, clips/s, peak memory (CUDA max allocated; on CPU the peak RSS of
the process), parameters, FLOPs per step and FLOP/s (and MFU against the GPU's bf16 peak).

FLOPs are model FLOPs: torch.utils.flop_counter.FlopCounterMode over the forward and backward of the
same model built on the meta device, without gradient checkpointing, where scaled_dot_product_attention
decomposes into its matmuls; every contender is counted the same way, whichever kernels it runs.
--flops device counts on the real device instead (executed FLOPs: flash attention's backward recomputes
Q K^T, checkpointing recomputes the forward); bench.py registers the formulas PyTorch lacks for the CPU
flash-attention ops, so CPU attention counts there as it does on GPU. train.py's MFU counts ours the same way
(model.training_flops).

--what data measures, per video of the folder --data (captions.csv/.jsonl), what a training item of --frames frames
at --size with a stride up to --max-stride costs today and now: decoding (the whole video, or the clip's frames
by seeking: video_io.VideoFile), RAFT (every pair at full size, or at a short side of 128 px: RAFT.heatmaps), the
heatmap cache (bytes per video-second and the per-item read, from the real pair heatmaps of --flow-clips sampled
clips tiled to the video's pair count), how far m' moves (mean |difference| and IoU of m' > 0.5), and the folder's
data loader in one process (clips/s per worker, with the caches of `data.py heatmaps` and without); it projects
bytes and FLOPs to 10 k, 100 k and 10 M clips like each video.

--compare adds other implementations of the same network, run the same way and interleaved round by
round (ours, theirs, ..., then in reverse order), so a load that changes over time hits all alike; the
speed-up is the median over rounds of their step time / ours. Peak memory per contender: on GPU the
most allocated during its steps less the other models' weights and optimizer states; on CPU the peak
RSS of a fresh process running that contender alone. The baselines are imported only when asked for:
  videocrafter   github.com/AILab-CVC/VideoCrafter's UNetModel (lvdm), from the checkout --videocrafter
                 names (pip install einops); without xformers its attention is the einsum path.
  diffusers      diffusers' UNet3DConditionModel (pip install diffusers), built with our size's head width.
  compiled       ours under torch.compile (inductor fuses the norms, activations and residual adds).
  channels-last  ours with its convolution weights channels-last, so its 2-D convolutions run NHWC.
"""
import argparse
import dataclasses
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import (FlopCounterMode, flop_registry, register_flop_formula, sdpa_backward_flop_count,
                                      sdpa_flop_count)

from data import (VideoFile, VideoFolderDataset, cache_path, fail, frames_to_tensor, heatmap_cache_is_complete,
                  heatmap_size, load_frames, parse_size, read_captions, resize_center_crop, write_atomically)
from demo.unet import DEMO
from flow import RAFT, clip_pairs, frame_heatmaps, pair_heatmaps, video_heatmap
from loss import latent_heatmap
from model import (KL_SIZES, SIZES as MODEL_SIZES, KLAutoencoder, ModelConfig, UNetConfig, autocast, build_unet,
                   pick_device, training_flops)
from sample import build_model, ddim_sample
from train import PEAK_BF16_FLOPS, Config, TrainState, adamw, loss_backward, peak_bf16_flops, peak_memory_gb, update

ROOT = Path(__file__).resolve().parent.parent
SIZES = {
    **MODEL_SIZES,
    "demo": DEMO,
    # the CPU comparison with VideoCrafter's and diffusers' code: vc2's shape (2 res blocks, attention at 3 levels,
    # heads of 64 channels, an init temporal attention of 8 heads of 64) at a fifth of its width: widths
    # (64, 128, 256, 256), so 1, 2, 4, 4 heads; context 256
    "bench": UNetConfig(model_channels=64, context_dim=256),
}


@dataclass
class Options:
    what: str = "train"  # train | sample | heatmap | data | roof
    size: str = ""  # a model.SIZES name (train, sample; default bench) or the frame size HxW (heatmap, data; 320x512)
    batch: int = 2  # clips per step (train)
    frames: int = 8
    latent: str = "32x32"  # latent height x width (train, sample); frames are 8x larger with kl-f8
    dtype: str = "fp32"  # fp32 | bf16 (autocast around the forward, as train.py)
    checkpointing: bool = False  # gradient checkpointing (train)
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch.set_num_threads on CPU (0: PyTorch's default)
    warmup: int = -1  # untimed runs first (-1: 2 for train, 1 otherwise)
    steps: int = 0  # timed runs (0: 10 for train, 3 for sample, 5 for heatmap)
    compare: str = ""  # train: baselines to run beside ours, comma separated: videocrafter, diffusers
    only: str = ""  # train: run this one contender alone instead of ours (ours | videocrafter | diffusers | ...)
    videocrafter: str = ""  # path to a checkout of github.com/AILab-CVC/VideoCrafter (for videocrafter)
    context_len: int = 77  # tokens of the random text context
    flops: str = "meta"  # meta (model FLOPs) | device (executed FLOPs) | none
    isolate_memory: bool = True  # with --compare: each contender's peak memory from a fresh process
    ddim_steps: int = 50  # sample
    cfg_scale: float = 7.5  # sample
    autoencoder: str = "kl-f8"  # sample: kl-f8 (VideoCrafter2's) | pixel (the CPU demo's, config/shapes.toml)
    kl_size: str = "full"  # sample: a model.KL_SIZES name
    pixel_patch: int = 4  # sample: the pixel autoencoder's space-to-depth factor
    text_encoder: str = "bytes"  # sample: bytes | openclip (random weights either way)
    raft: str = str(ROOT / "tests" / "fixtures" / "raft_small.pth")  # heatmap, data: small | large | a .pth
    data: str = ""  # data: a video folder (captions.csv or captions.jsonl)
    max_stride: int = 8  # data: the training's largest frame stride
    flow_clips: int = 2  # data: clips per video whose heatmaps are computed both ways (full-size RAFT is slow)
    json: str = "out/bench.json"  # where the results go ("" for nowhere)
    seed: int = 0


def parse_hw(text, what):
    try:
        return parse_size(text)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def resolve(opts: Options) -> Options:
    """Fill the per-mode defaults and check the options; a ValueError says what is wrong."""
    if opts.what not in ("train", "sample", "heatmap", "data", "roof"):
        raise ValueError(f"--what takes train, sample, heatmap, data or roof, not {opts.what!r}")
    if opts.what in ("heatmap", "data"):
        parse_hw(opts.size or "320x512", f"--size (the frame size, for {opts.what})")
    elif (opts.size or "bench") not in SIZES:
        raise ValueError(f"--size {opts.size!r} is no model size; sizes: {', '.join(SIZES)}")
    if opts.what == "data" and not (Path(opts.data).is_dir() and opts.frames >= 2 and opts.max_stride >= 1
                                    and opts.flow_clips >= 1):
        raise ValueError(f"--what data needs --data, a video folder ({opts.data!r} is none), --frames of at least 2, "
                         "--max-stride and --flow-clips of at least 1")
    h, w = parse_hw(opts.latent, "--latent")
    if opts.what in ("train", "sample"):
        factor = 2 ** (len(SIZES[opts.size or "bench"].channel_mult) - 1)
        if h % factor or w % factor:
            raise ValueError(f"--latent {opts.latent}: this U-Net halves it {factor.bit_length() - 1} times; "
                             f"give sides that are multiples of {factor}")
    if opts.autoencoder not in ("kl-f8", "pixel") or opts.text_encoder not in ("bytes", "openclip"):
        raise ValueError(f"--autoencoder takes kl-f8|pixel and --text-encoder bytes|openclip "
                         f"(got {opts.autoencoder}, {opts.text_encoder})")
    if opts.dtype not in ("fp32", "bf16") or opts.flops not in ("meta", "device", "none"):
        raise ValueError(f"--dtype takes fp32|bf16 and --flops meta|device|none (got {opts.dtype}, {opts.flops})")
    if opts.frames < 1 or opts.batch < 1:
        raise ValueError("--frames and --batch must be at least 1")
    if (opts.compare or opts.only) and opts.what != "train":
        raise ValueError("--compare and --only are for --what train")
    for name in [n for n in opts.compare.split(",") if n] + ([opts.only] if opts.only else []):
        if name not in CONTENDERS:
            raise ValueError(f"unknown contender {name!r}; contenders: {', '.join(CONTENDERS)}")
        if name == "videocrafter":
            import_videocrafter(opts)  # fails now, not after the other models are built
    default_size = "320x512" if opts.what in ("heatmap", "data") else "bench"
    return replace(opts, size=opts.size or default_size,
                   warmup=opts.warmup if opts.warmup >= 0 else (2 if opts.what == "train" else 1),
                   steps=opts.steps or {"train": 10, "sample": 3, "heatmap": 5, "data": 10, "roof": 10}[opts.what])


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- FLOPs

def register_cpu_sdpa_flops():
    """PyTorch's FlopCounterMode has formulas for the GPU attention kernels (flash, memory-efficient, cuDNN) but
    none for the CPU flash kernel, which would count as 0: give it the same formulas (forward: Q K^T and P V;
    backward: those two recomputed/propagated as the GPU formula counts them)."""
    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:
        @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
        def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return sdpa_flop_count(query_shape, key_shape, value_shape)
    if aten._scaled_dot_product_flash_attention_for_cpu_backward not in flop_registry:
        @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
        def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_flops(fn):
    """FLOPs that FlopCounterMode sees while fn() runs (fn does its own backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- the contenders (training step)

def unet_config(opts):
    return replace(SIZES[opts.size], gradient_checkpointing=opts.checkpointing)


def build_ours(opts, cfg):
    return build_unet(cfg)


def call_ours(model, x):
    return model(x["x"], x["t"], x["context"], x["fps"])


def import_videocrafter(opts):
    if not opts.videocrafter:
        raise ValueError("the videocrafter baseline needs --videocrafter PATH, a checkout of "
                         "github.com/AILab-CVC/VideoCrafter (git clone it; it also needs: pip install einops)")
    path = str(Path(opts.videocrafter).expanduser().resolve())
    if not (Path(path) / "lvdm" / "modules" / "networks" / "openaimodel3d.py").is_file():
        raise ValueError(f"--videocrafter {opts.videocrafter}: no lvdm/modules/networks/openaimodel3d.py there")
    if path not in sys.path:
        sys.path.insert(0, path)
    ours = sys.modules.get("utils")  # lvdm imports its own top-level `utils` folder, which our model.py would shadow
    theirs = types.ModuleType("utils")
    theirs.__path__ = [str(Path(path) / "utils")]
    sys.modules["utils"] = theirs
    try:
        from lvdm.modules import attention
        from lvdm.modules.networks import openaimodel3d
    except ImportError as e:
        raise ValueError(f"cannot import VideoCrafter's lvdm from {path}: {e} (pip install einops?)") from None
    finally:
        sys.modules["utils"] = ours
    return openaimodel3d, attention


def build_videocrafter(opts, cfg):
    """VideoCrafter's UNetModel configured as VideoCrafter2 (use_linear, temporal conv and attention, self-attention
    only in time, no relative position, the extra temporal attention after the first conv, fps conditioning)."""
    openaimodel3d, attention = import_videocrafter(opts)
    if getattr(attention, "XFORMERS_IS_AVAILBLE", False):
        print("note: xformers is installed, so VideoCrafter's spatial attention runs through it (not the einsum path)")
    if cfg.init_attn_heads != 8:
        raise ValueError("VideoCrafter's init_attn has 8 heads; this size has another number")
    return openaimodel3d.UNetModel(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, model_channels=cfg.model_channels,
        attention_resolutions=[2 ** level for level in cfg.attention_levels], num_res_blocks=cfg.num_res_blocks,
        channel_mult=list(cfg.channel_mult), num_head_channels=cfg.head_channels, transformer_depth=1, dropout=0.0,
        context_dim=cfg.context_dim, use_linear=True, use_checkpoint=cfg.gradient_checkpointing, temporal_conv=True,
        temporal_attention=True, temporal_selfatt_only=True, use_relative_position=False, use_causal_attention=False,
        temporal_length=opts.frames, addition_attention=True, fps_cond=True)


def call_videocrafter(model, x):
    return model(x["x"], x["t"], context=x["context"], fps=x["fps"])


def build_diffusers(opts, cfg):
    """diffusers' UNet3DConditionModel of the same widths, depth, attention levels and head width (its 3-D blocks read
    attention_head_dim as the head width; its transformer_in is 8 heads of it, as our init_attn)."""
    try:
        from diffusers import UNet3DConditionModel
    except ImportError:
        raise ValueError("the diffusers baseline needs diffusers: pip install diffusers") from None
    attends = [level in cfg.attention_levels for level in range(len(cfg.channel_mult))]
    model = UNet3DConditionModel(
        sample_size=None, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult), layers_per_block=cfg.num_res_blocks,
        cross_attention_dim=cfg.context_dim, norm_num_groups=32, attention_head_dim=cfg.head_channels,
        down_block_types=tuple("CrossAttnDownBlock3D" if a else "DownBlock3D" for a in attends),
        up_block_types=tuple("CrossAttnUpBlock3D" if a else "UpBlock3D" for a in reversed(attends)))
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def call_diffusers(model, x):
    return model(x["x"], x["t"], x["context"], return_dict=False)[0]


def build_compiled(opts, cfg):
    return torch.compile(build_unet(cfg))


def build_channels_last(opts, cfg):
    model = build_unet(cfg)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):  # the 4-D weights; Conv3d's 5-D ones have no channels-last
            module.to(memory_format=torch.channels_last)
    return model


CONTENDERS = {
    "ours": (build_ours, call_ours, "model.build_unet"),
    "compiled": (build_compiled, call_ours, "ours under torch.compile (inductor's fused kernels; compiled in warm-up)"),
    "channels-last": (build_channels_last, call_ours, "ours with the conv weights channels-last (NHWC convolutions)"),
    "videocrafter": (build_videocrafter, call_videocrafter, "VideoCrafter lvdm UNetModel (einsum attention)"),
    "diffusers": (build_diffusers, call_diffusers, "diffusers UNet3DConditionModel, same heads; no fps embedding"),
}
OUR_VARIANTS = ("compiled", "channels-last")  # ours in other kernels: counted as ours


def make_inputs(opts, cfg, device, seed):
    """Random inputs of a training step: x-cat latents, timesteps, fps, text context, v target, heatmap."""
    g = torch.Generator().manual_seed(seed)
    h, w = parse_hw(opts.latent, "--latent")
    b, t = opts.batch, opts.frames
    x = {"x": torch.randn(b, cfg.in_channels, t, h, w, generator=g),
         "t": torch.randint(0, 1000, (b,), generator=g),
         "fps": torch.randint(4, 31, (b,), generator=g),
         "context": torch.randn(b, opts.context_len, cfg.context_dim, generator=g),
         "v": torch.randn(b, cfg.out_channels, t, h, w, generator=g),
         "heatmap": torch.rand(b, 1, t, h, w, generator=g)}
    return {k: v.to(device) for k, v in x.items()}


def training_step(run, inputs, step):
    """train.py's step on random inputs, for any contender: the autocast forward, train.loss_backward (diffusion +
    motion focal loss, backward), then train.update (gradient clipping, fused AdamW, EMA)."""
    state = run["state"]
    with state.autocast:
        v_hat = run["call"](state.model, inputs)
    update(state, loss_backward(v_hat, inputs["v"], inputs["heatmap"], state.cfg), step)


def forward_backward(model, call, inputs):
    """A forward and a backward for FlopCounterMode (the loss's elementwise work counts no FLOPs)."""
    call(model, inputs).float().square().mean().backward()


def step_flops(opts, run, cfg, inputs, precision):
    """FLOPs of one forward + backward of a contender: model FLOPs (a copy built on the meta device, no gradient
    checkpointing) or, with --flops device, what the run's own model executes."""
    if opts.flops == "none":
        return None
    model, call = run["model"], run["call"]
    if opts.flops == "meta":  # ours' variants count as ours: the same network, other kernels
        build = build_ours if run["name"] in OUR_VARIANTS else CONTENDERS[run["name"]][0]
        with torch.device("meta"):
            model = build(opts, replace(cfg, gradient_checkpointing=False)).train()
        inputs, precision = {k: v.to("meta") for k, v in inputs.items()}, nullcontext()
    register_cpu_sdpa_flops()
    with precision:
        flops = count_flops(lambda: forward_backward(model, call, inputs))
    run["state"].optimizer.zero_grad(set_to_none=True)
    return flops


def state_bytes(state):
    """Bytes of what a contender holds between steps: weights, AdamW's state, the EMA."""
    optimizer_state = [v for s in state.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    tensors = list(state.model.parameters()) + optimizer_state + list(state.ema.values())
    return sum(t.numel() * t.element_size() for t in tensors)


def new_run(opts, cfg, name, device, precision):
    """A contender built with its optimizer and EMA, ready for training_step."""
    build, call, note = CONTENDERS[name]
    torch.manual_seed(opts.seed)
    model = build(opts, cfg).to(device).train()
    optimizer = adamw(model.parameters(), lr=1e-5, weight_decay=0.01)  # train.py's, for every contender
    ema = {n: p.detach().clone().float() for n, p in model.named_parameters()}
    state = TrainState(Config(), model, model, optimizer, ema, precision, device)
    return {"name": name, "note": note, "model": model, "call": call, "state": state,
            "params": sum(p.numel() for p in model.parameters()), "times": [], "peak": 0}


def bench_train(opts, device):
    """Time the training step of ours and of each contender asked for, interleaved round by round."""
    cfg = unet_config(opts)
    names = [opts.only] if opts.only else ["ours"] + [n for n in opts.compare.split(",") if n]
    precision = autocast(device, opts.dtype == "bf16")
    runs = [new_run(opts, cfg, name, device, precision) for name in names]
    inputs = make_inputs(opts, cfg, device, opts.seed)
    for run in runs:  # warm-up, and the optimizer states exist from here on
        for step in range(opts.warmup):
            training_step(run, inputs, step)
    synchronize(device)
    held = {run["name"]: state_bytes(run["state"]) for run in runs}
    for i in range(opts.steps):
        for run in (runs if i % 2 == 0 else runs[::-1]):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            start = time.perf_counter()
            training_step(run, inputs, opts.warmup + i)
            synchronize(device)
            run["times"].append(time.perf_counter() - start)
            if device.type == "cuda":  # the most allocated during its step, less what the other models hold
                others = sum(b for n, b in held.items() if n != run["name"])
                run["peak"] = max(run["peak"], torch.cuda.max_memory_allocated(device) - others)
    results = []
    for run in runs:
        times = run["times"]
        median = statistics.median(times)
        result = {"name": run["name"], "note": run["note"], "params": run["params"], "step_s": median,
                  "step_min_s": min(times), "step_max_s": max(times), "clips_per_s": opts.batch / median,
                  "flops": step_flops(opts, run, cfg, inputs, precision)}
        if device.type == "cuda":
            result["peak_memory_gib"] = run["peak"] / 2 ** 30
        elif len(runs) == 1:
            result["peak_memory_gib"] = peak_memory_gb(device)
        elif opts.isolate_memory:
            result["peak_memory_gib"] = memory_alone(opts, run["name"])
        if result["flops"]:
            result["flop_per_s"] = result["flops"] / median
            peak = peak_flops(device, opts.dtype)
            if peak:
                result["mfu"] = result["flop_per_s"] / peak
        if run is not runs[0]:  # paired by round: their time / ours in the same round
            ratios = [theirs / ours for theirs, ours in zip(times, runs[0]["times"])]
            result["ours_speedup"] = statistics.median(ratios)
            result["ours_speedup_min"], result["ours_speedup_max"] = min(ratios), max(ratios)
        results.append(result)
    return results


def memory_alone(opts, name):
    """Peak RSS of a fresh process that builds one contender and runs one warm-up and one step."""
    with tempfile.TemporaryDirectory() as tmp:
        alone = replace(opts, compare="", only=name, warmup=1, steps=1, flops="none", json=f"{tmp}/alone.json")
        args = [f"--{f.name.replace('_', '-')}={getattr(alone, f.name)}" for f in dataclasses.fields(Options)]
        done = subprocess.run([sys.executable, "-m", "tools.bench", *args], capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            print(f"(peak memory of {name} alone: the run failed: {done.stderr.strip()[-300:]})")
            return None
        return json.loads(Path(f"{tmp}/alone.json").read_text())["results"][0]["peak_memory_gib"]


def peak_flops(device, dtype):
    """The GPU's dense bf16 peak, for MFU; None on CPU, for fp32, or an unknown GPU."""
    return peak_bf16_flops(device) if dtype == "bf16" else None


# ----------------------------------------------------------------------------- sampling, heatmaps

def timed_runs(opts, device, fn):
    for _ in range(opts.warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(opts.steps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def summary(name, note, times, per_run_flops, device, dtype):
    median = statistics.median(times)
    result = {"name": name, "note": note, "step_s": median, "step_min_s": min(times), "step_max_s": max(times),
              "clips_per_s": 1 / median, "peak_memory_gib": peak_memory_gb(device), "flops": per_run_flops}
    if per_run_flops:
        result["flop_per_s"] = per_run_flops / median
        peak = peak_flops(device, dtype)
        if peak:
            result["mfu"] = result["flop_per_s"] / peak
    return result


def sample_model(opts, device):
    """The whole TI2V model (random weights): U-Net, text encoder, autoencoder."""
    model = build_model(ModelConfig(size=opts.size, text_encoder=opts.text_encoder, autoencoder=opts.autoencoder,
                                   kl_size=opts.kl_size, pixel_patch=opts.pixel_patch, temporal_dropout=0.0))
    return model.to(device).eval()


def bench_sample(opts, device):
    """One clip: encode the image, 2 x ddim_steps U-Net evaluations (classifier-free guidance), decode."""
    torch.manual_seed(opts.seed)
    model = sample_model(opts, device)
    h, w = parse_hw(opts.latent, "--latent")
    factor = model.autoencoder.factor
    image = torch.rand(1, 3, h * factor, w * factor) * 2 - 1
    precision = autocast(device, opts.dtype == "bf16")

    def run(steps, on=model, img=image):
        with precision:
            return ddim_sample(on, img, ["the red circle moves right"], opts.frames, 8, steps, opts.cfg_scale,
                               [opts.seed], progress=False)
    for _ in range(opts.warmup):
        run(2)
    times = timed_runs(replace(opts, warmup=0), device, lambda: run(opts.ddim_steps))
    flops = None
    if opts.flops != "none":
        counted, counted_image = model, image
        if opts.flops == "meta":
            with torch.device("meta"):
                counted = sample_model(opts, torch.device("meta"))
            counted_image = image.to("meta")
        register_cpu_sdpa_flops()
        flops = count_flops(lambda: run(opts.ddim_steps, counted, counted_image))
    autoencoder = f"kl-f8 {opts.kl_size}" if opts.autoencoder == "kl-f8" else f"pixel (patch {opts.pixel_patch})"
    note = (f"{opts.ddim_steps} DDIM steps, CFG {opts.cfg_scale} (U-Net batch 2), {autoencoder} autoencoder, "
            f"{opts.text_encoder} text encoder, random weights")
    return [summary(f"sample {opts.size}", note, times, flops, device, opts.dtype)]


def bench_roof(opts, device):
    """The matmul roof: a square matrix product big enough to run at the device's best, in the step's precision. A
    step's FLOP/s over this is its share of what the machine's matrix units give (docs/performance.md)."""
    n = 4096 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if opts.dtype == "bf16" else torch.float32
    g = torch.Generator().manual_seed(opts.seed)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    times = timed_runs(opts, device, lambda: a @ b)
    return [summary(f"matmul {n}x{n}", f"{opts.dtype} matrix product, random data", times, 2 * n ** 3, device,
                    opts.dtype)]


def bench_heatmap(opts, device):
    """Motion heatmap of one clip through RAFT (flow.video_heatmap)."""
    h, w = parse_hw(opts.size, "--size")
    raft = RAFT(opts.raft, device=device)
    g = torch.Generator().manual_seed(opts.seed)
    base = torch.rand(1, 3, h + 4 * opts.frames, w + 4 * opts.frames, generator=g) * 2 - 1  # a texture, shifted
    frames = torch.cat([base[:, :, 4 * i:4 * i + h, 4 * i:4 * i + w] for i in range(opts.frames)]).to(device)

    def run():
        with torch.no_grad():
            return video_heatmap(frames, raft)
    times = timed_runs(opts, device, run)
    flops = None
    if opts.flops != "none":  # RAFT's convs and correlation matmuls, counted where they run
        flops = count_flops(run)
    note = f"RAFT {Path(opts.raft).stem}, {opts.frames} frame pairs, chunks of {raft.chunk}"
    return [summary(f"heatmap {h}x{w}", note, times, flops, device, "fp32")]


# ----------------------------------------------------------------------------- a video folder's data

PROJECTED_CLIPS = (10_000, 100_000, 10_000_000)
RECIPE_CLIPS = 32_000 * 64  # training clips the recipe draws (steps x global batch), whatever the folder's size
ASSUMED_MFU = 0.4  # of an H100's dense bf16 peak: an assumption for what one GPU consumes, not a measurement


def npz_bytes(**arrays):
    """Bytes of np.savez_compressed(arrays): what data.save_npz writes."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def spread(times):
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def dataset_draws(num_frames, opts, rng):
    """(stride, frame numbers) of opts.steps clips, drawn as VideoFolderDataset draws them."""
    draws = []
    for _ in range(opts.steps):
        stride = int(rng.integers(1, min(opts.max_stride, (num_frames - 1) // (opts.frames - 1)) + 1))
        start = int(rng.integers(0, num_frames - (opts.frames - 1) * stride))
        draws.append((stride, start + stride * np.arange(opts.frames)))
    return draws


def cache_read_time(pairs, num_frames, stride, picked, small):
    """Seconds the loader spends on one item's heatmap (np.load of the stride's arrays, its pairs, frame_heatmaps)
    from a cache whose forward and backward arrays are the clip's real uint8 pairs (T, h, w) tiled to the video's
    N - s pairs."""
    tiled = np.resize(pairs, (num_frames - stride, *pairs.shape[1:]))                    # (N-s, h, w)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cache.npz"
        path.write_bytes(npz_bytes(num_frames=np.array(num_frames), heatmap_size=np.array(small),
                                   **{f"stride_{stride}": tiled, f"back_{stride}": tiled}))

        def read():
            with np.load(path) as cache:
                motion = np.concatenate([cache[f"stride_{stride}"][picked[:-1]],
                                         cache[f"back_{stride}"][picked[-1:] - stride]])  # (T, h, w)
                return frame_heatmaps(torch.from_numpy(motion).float() / 255)
        read()
        return statistics.median(timed(read)[0] for _ in range(3))


def bench_data(opts, device):
    """Per video of --data: decoding, RAFT, heatmap cache and m', today (whole decode, full-size heatmaps of every pair
    and stride) and now (seek, RAFT at 128 px, heatmaps at 1/8 size); the folder's loader; projections."""
    size = parse_hw(opts.size, "--size")
    small = heatmap_size(size)
    raft = RAFT(opts.raft, device=device)
    one_pair = torch.rand(1, 3, *size) * 2 - 1
    flops_per_pair = {"today": count_flops(lambda: raft.pairs(one_pair, one_pair)),
                      "now": count_flops(lambda: raft.heatmaps(one_pair, one_pair, small))}
    videos, _ = read_captions(opts.data)
    results = []
    for number, video in enumerate(videos):
        path = Path(opts.data) / video["path"]
        file = VideoFile(path)
        num_frames, fps = file.num_frames, video["fps"] or file.fps
        if num_frames < opts.frames:
            print(f"{video['path']}: {num_frames} frames, fewer than --frames {opts.frames}: left out")
            continue
        draws = dataset_draws(num_frames, opts, np.random.default_rng([opts.seed, number]))
        decode = {"today": [], "now": []}
        for i, (stride, picked) in enumerate(draws):   # interleaved, alternating which goes first
            for which in (("today", "now") if i % 2 == 0 else ("now", "today")):
                read = (lambda: load_frames(path)[0][picked]) if which == "today" else (lambda: VideoFile(path).read(picked))
                seconds, _ = timed(lambda: resize_center_crop(read(), size))
                decode[which].append(seconds)
        raft_time, cache_bytes, cache_read = {"today": [], "now": []}, {"today": [], "now": []}, {"today": [], "now": []}
        difference, intersection, union = [], 0, 0
        for stride, picked in draws[:opts.flow_clips]:
            clip = frames_to_tensor(resize_center_crop(file.read(picked), size)).to(device)   # (T, 3, H, W)
            for which in ("today", "now"):
                compute = ((lambda: pair_heatmaps(raft.pairs(*clip_pairs(clip)))) if which == "today" else
                           (lambda: raft.heatmaps(*clip_pairs(clip), small)))
                seconds, pairs = timed(compute)
                pairs = (pairs.cpu() * 255).round().to(torch.uint8).numpy()                   # (T, h, w)
                raft_time[which].append(seconds)
                cache_bytes[which].append((len(npz_bytes(pairs=pairs)) - len(npz_bytes(pairs=pairs[:0]))) / len(pairs))
                cache_read[which].append(cache_read_time(pairs, num_frames, stride, picked, small))
                m = latent_heatmap(frame_heatmaps(torch.from_numpy(pairs).float() / 255)[None], small)[0, 0]  # (T, h, w)
                if which == "today":
                    m_today = m
            difference.append((m - m_today).abs().mean().item())
            intersection += ((m > 0.5) & (m_today > 0.5)).sum().item()
            union += ((m > 0.5) | (m_today > 0.5)).sum().item()
        pairs_per_video = sum(2 * (num_frames - s) for s in range(1, min(opts.max_stride, num_frames - 1) + 1))
        seconds_of_video = num_frames / (fps or 30.0)
        result = {"name": video["path"], "frames": num_frames, "seconds": seconds_of_video, "fps": fps,
                  "decode_s": {w: spread(t) for w, t in decode.items()},
                  "raft_clip_s": {w: statistics.median(t) for w, t in raft_time.items()},
                  "raft_pair_gflop": {w: f / 1e9 for w, f in flops_per_pair.items()},
                  "pairs_per_video": pairs_per_video, "pairs_per_clip": opts.frames,
                  "cache_bytes_per_video_s": {w: statistics.mean(b) * pairs_per_video / seconds_of_video
                                              for w, b in cache_bytes.items()},
                  "cache_raw_bytes_per_video_s": {"today": pairs_per_video * size[0] * size[1] / seconds_of_video,
                                                  "now": pairs_per_video * small[0] * small[1] / seconds_of_video},
                  "cache_read_s": {w: statistics.median(t) for w, t in cache_read.items()},
                  "m_mean_abs_difference": statistics.mean(difference), "m_iou": intersection / union if union else None,
                  "m_moving_share": union / (len(difference) * opts.frames * small[0] * small[1])}
        results.append(result)
    return results + [loader_speed(opts, size), gpu_appetite(opts, size, flops_per_pair["now"])]


def gpu_appetite(opts, size, raft_pair_flops):
    """Model FLOPs per clip of the vc2 U-Net's forward + backward and of the kl-f8 encoder (meta device), and the
    clips/s one H100 would take at ASSUMED_MFU: an estimate (no GPU measured it), with cached latents, with the encoder
    in the step, and with RAFT (--raft, at 128 px) in the step too."""
    latent = (size[0] // 8, size[1] // 8)
    unet = training_flops(SIZES["vc2"], opts.frames, latent, 77)
    with torch.device("meta"):
        encoder = KLAutoencoder(KL_SIZES["full"])
        encode = count_flops(lambda: encoder.encode(torch.zeros(1, 3, opts.frames, *size)))
    rate = ASSUMED_MFU * PEAK_BF16_FLOPS["H100"]
    raft = (opts.frames - 1) * raft_pair_flops
    return {"name": "gpu estimate", "unet_flops": unet, "encode_flops": encode, "raft_flops": raft,
            "clips_per_s": {"cached latents and heatmaps": rate / unet, "encoder in the step": rate / (unet + encode),
                            "encoder and RAFT in the step": rate / (unet + encode + raft)}}


def loader_speed(opts, size):
    """Seconds per item of the folder's VideoFolderDataset in this process (one loader worker), over opts.steps items:
    with its heatmap cache when `data.py heatmaps` made one, and with heatmaps left to the step."""
    videos, _ = read_captions(opts.data)
    cached = all(heatmap_cache_is_complete(cache_path(opts.data, v["path"], size), size, opts.max_stride, opts.frames)
                 for v in videos)
    result = {"name": "loader"}
    for which, cached_heatmaps in (("cache", True), ("in the step", False)):
        if cached_heatmaps and not cached:
            print(f"loader with the heatmap cache: not measured, run python data.py heatmaps {opts.data} first")
            continue
        dataset = VideoFolderDataset(opts.data, frames=opts.frames, size=size, max_stride=opts.max_stride,
                                     seed=opts.seed, cached_heatmaps=cached_heatmaps)
        dataset[0]
        result[which] = spread([timed(lambda: dataset[index])[0] for index in range(1, opts.steps + 1)])
    return result


def print_data_table(opts, results):
    videos, loader, gpu = results[:-2], results[-2], results[-1]
    print(f"data of {opts.data}: clips of {opts.frames} frames at {opts.size}, strides 1-{opts.max_stride}; "
          f"RAFT {Path(opts.raft).stem}; {torch.get_num_threads()} threads; medians (min-max) of {opts.steps} "
          f"items, RAFT over {opts.flow_clips} clips; today -> now")
    for r in videos:
        d = r["decode_s"]
        mb = {w: r["cache_bytes_per_video_s"][w] / 1e6 for w in ("today", "now")}
        print(f"{r['name']}: {r['frames']} frames, {r['seconds']:.1f} s at {r['fps'] or 0:.3g} fps")
        print(f"  decode + resize per item  {d['today']['median']:.3f} s ({d['today']['min']:.3f}-{d['today']['max']:.3f})"
              f" -> {d['now']['median']:.3f} s ({d['now']['min']:.3f}-{d['now']['max']:.3f})")
        print(f"  RAFT per training clip    {r['raft_clip_s']['today']:.2f} s -> {r['raft_clip_s']['now']:.2f} s "
              f"({r['pairs_per_clip']} pairs; {r['raft_pair_gflop']['today']:.1f} -> {r['raft_pair_gflop']['now']:.1f} "
              f"GFLOP per pair)")
        print(f"  RAFT per video (cache)    {r['pairs_per_video']} pairs: "
              f"{r['raft_clip_s']['today'] / r['pairs_per_clip'] * r['pairs_per_video'] / 60:.1f} min -> "
              f"{r['raft_clip_s']['now'] / r['pairs_per_clip'] * r['pairs_per_video'] / 60:.1f} min")
        print(f"  cache per video-second    {mb['today']:.2f} MB ({r['cache_raw_bytes_per_video_s']['today'] / 1e6:.1f} MB "
              f"raw) -> {mb['now'] * 1e3:.1f} kB ({r['cache_raw_bytes_per_video_s']['now'] / 1e3:.1f} kB raw)")
        print(f"  cache read per item       {r['cache_read_s']['today'] * 1e3:.1f} ms -> {r['cache_read_s']['now'] * 1e3:.2f} ms")
        iou = "-" if r["m_iou"] is None else f"{r['m_iou']:.3f}"
        print(f"  m' now vs today           mean |difference| {r['m_mean_abs_difference']:.4f}, IoU of m' > 0.5 {iou} "
              f"(moving in either: {r['m_moving_share']:.1%} of m')")
        for clips in PROJECTED_CLIPS:
            seconds = clips * r["seconds"]
            print(f"  {clips:>10,} such clips: cache {mb['today'] * seconds / 1e6:,.1f} TB -> {mb['now'] * seconds / 1e6:,.3f} TB;"
                  f" RAFT for the cache {clips * r['pairs_per_video'] * r['raft_pair_gflop']['today'] / 1e9:,.1f} -> "
                  f"{clips * r['pairs_per_video'] * r['raft_pair_gflop']['now'] / 1e9:,.1f} EFLOP")
        print(f"  RAFT in the step, the recipe's {RECIPE_CLIPS:,} clips: "
              f"{RECIPE_CLIPS * r['pairs_per_clip'] * r['raft_pair_gflop']['now'] / 1e9:,.1f} EFLOP, whatever the folder's size")
    for which in ("cache", "in the step"):
        if which in loader:
            t = loader[which]
            print(f"loader, heatmaps {'from the cache' if which == 'cache' else 'left to the step'}: {t['median']:.3f} s "
                  f"per item ({t['min']:.3f}-{t['max']:.3f}), {1 / t['median']:.2f} clips/s per worker")
    print(f"one GPU, an estimate (not measured): {gpu['unet_flops'] / 1e12:.1f} TFLOP per clip for the vc2 U-Net's forward"
          f" + backward, {gpu['encode_flops'] / 1e12:.1f} for the kl-f8 encoder, {gpu['raft_flops'] / 1e12:.2f} for RAFT at"
          f" 128 px; at {ASSUMED_MFU:.0%} of an H100's {PEAK_BF16_FLOPS['H100'] / 1e12:.0f} TFLOP/s it takes "
          + ", ".join(f"{rate:.1f} clips/s ({how})" for how, rate in gpu["clips_per_s"].items()))


# ----------------------------------------------------------------------------- report

def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_table(opts, device, results):
    if opts.what == "data":
        return print_data_table(opts, results)
    if opts.what == "train":
        head = (f"training step (forward + backward + AdamW): size {opts.size}, batch {opts.batch}, "
                f"{opts.frames} frames, latent {opts.latent}, {opts.dtype}"
                + (", gradient checkpointing" if opts.checkpointing else ""))
    elif opts.what == "sample":
        head = f"sampling one clip: size {opts.size}, {opts.frames} frames, latent {opts.latent}, {opts.dtype}"
    elif opts.what == "roof":
        head = "the matmul roof"
    else:
        head = f"motion heatmap of one clip: {opts.frames} frames of {opts.size}"
    print(f"{head}; {device_name(device)}, {torch.get_num_threads()} threads; median of {opts.steps} runs after "
          f"{opts.warmup} warm-up")
    rows = [("", "params", "time s", "min-max s", "clips/s", "GFLOP", "GFLOP/s", "MFU", "peak GiB", "speed-up")]
    for r in results:
        speedup = (f"{r['ours_speedup']:.2f}x ({r['ours_speedup_min']:.2f}-{r['ours_speedup_max']:.2f})"
                   if "ours_speedup" in r else "")
        rows.append((r["name"], f"{r['params'] / 1e6:.2f} M" if r.get("params") else "-",
                     f"{r['step_s']:.3f}", f"{r['step_min_s']:.3f}-{r['step_max_s']:.3f}", f"{r['clips_per_s']:.3f}",
                     fmt(r["flops"] and r["flops"] / 1e9, ".1f"),
                     fmt(r.get("flop_per_s") and r["flop_per_s"] / 1e9, ".1f"),
                     f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-", fmt(r.get("peak_memory_gib"), ".2f"), speedup))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                        for i, (cell, width) in enumerate(zip(row, widths))))
    for r in results:
        print(f"  {r['name']}: {r['note']}")
    if opts.what == "train":
        print(f"  inputs: random latents, timesteps, fps and a random {opts.context_len}-token text context "
              "(the text encoder is not part of the U-Net step); train.py's loss")
        if len(results) > 1:
            print("  speed-up: their step time / ours, median (min-max) over the interleaved rounds")
    if opts.what == "heatmap":
        print("  GFLOP: per clip, counted by FlopCounterMode where RAFT runs (convolutions, correlation matmuls)")
    elif opts.what == "roof":
        print("  GFLOP: 2 n^3 per product")
    elif opts.flops == "meta":
        print("  GFLOP: model FLOPs of " + ("the forward + backward" if opts.what == "train" else "the whole run") +
              ", by FlopCounterMode on the meta device (attention as its matmuls, no recomputation)")
    elif opts.flops == "device":
        print(f"  GFLOP: FLOPs executed on {device.type}, by FlopCounterMode (recomputation included)")
    if device.type == "cpu":
        alone = "a process running that contender alone" if len(results) > 1 else "the process"
        print(f"  peak GiB: peak RSS of {alone}; MFU: GPU only")
    elif opts.dtype != "bf16":
        print("  MFU: for bf16 only (the peaks are bf16 dense)")


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def options_parser(description):
    """A flag for each field of Options (tools.profile_step takes the same)."""
    parser = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(Options):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or isinstance(f.default, bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), nargs="?", const=True,
                                default=f.default)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)
    return parser


def main(argv=None):
    args = options_parser(__doc__.splitlines()[0]).parse_args(argv)
    try:
        opts = resolve(Options(**vars(args)))
        device = pick_device(opts.device)
        if opts.threads and device.type == "cpu":
            torch.set_num_threads(opts.threads)
        results = {"train": bench_train, "sample": bench_sample, "heatmap": bench_heatmap,
                   "data": bench_data, "roof": bench_roof}[opts.what](opts, device)
    except ValueError as e:
        fail(e)
    print_table(opts, device, results)
    if opts.json:
        out = Path(opts.json)
        report = json.dumps({"options": dataclasses.asdict(opts), "device": device_name(device),
                             "torch": torch.__version__, "threads": torch.get_num_threads(), "results": results},
                            indent=1) + "\n"
        write_atomically(out, lambda f: f.write(report.encode()))
        print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
