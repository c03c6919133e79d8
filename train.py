"""Train a text-image-to-video model with the Motion Focal Loss.

    python train.py --preset shapes                                   # the CPU demo on built-in synthetic videos
    python train.py --data=videos --init=model.ckpt                   # the paper's recipe from VideoCrafter2
    torchrun --nproc_per_node 8 --shutdown-timeout 600 train.py --data=videos --init=model.ckpt   # on 8 GPUs
    python train.py --data=videos --model=demo --autoencoder=pixel --text_encoder=bytes   # small, from scratch

One process or many (torchrun sets RANK / LOCAL_RANK / WORLD_SIZE): each step draws the global
batch's sample indices step*B .. step*B+B-1; each rank takes a disjoint slice, and every sample's
noise, timestep and text dropout come from a generator seeded by (seed, step, sample index), and a
micro-batch's dropout masks from one seeded by its first sample, so for a given micro_batch the maths
of a run does not depend on how many processes share it. Gradients are averaged over the global
batch: under DDP every rank holds the whole model and gradients are synced on the last micro-step;
with --shard=true (train.py, FSDP2) each rank holds 1 / world of the weights, gradients, AdamW state
and EMA, and gradients are reduce-scattered after every micro-step. Rank 0 writes logs
and checkpoints; a checkpoint is the same plain file whichever way it was trained.

Data flow of a step (DESIGN.md): clip + heatmap (demo/shapes.py or data.py / flow.py) -> z0 = encode(clip), image
latent = z0 of frame 0 repeated -> z_t, v (loss.py) -> v_hat = model(z_t, z_img, t, text, fps) ->
L = L_diffusion + lambda * L_motif -> AdamW, EMA, checkpoint (model.py).

The file reads top to bottom: the config's defaults; train(), setup and then a loop of step / log / validate /
save; the step written out in one function (train_step) and its parts; the validation samples; then the plumbing:
config parsing (presets and flags), the log, what setup builds (the model, the data), sharding, checkpoints and the
processes.
"""
import dataclasses
import difflib
import gc
import inspect
import json
import math
import os
import resource
import signal
import sys
import time
import tomllib
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data import (FALLBACK_FPS, UnusableVideo, VideoFolderDataset, fail, frames_to_tensor, heatmap_size,
                  resize_center_crop, summarise, to_unit_range, write_atomically, write_video)
from demo.bench import score
from demo.shapes import ShapesDataset, held_out_pairs
from demo.unet import high_t_floor
from flow import RAFT, MotionMonitor, clip_heatmaps, first_logged_ratio, load_monitor_raft
from loss import latent_heatmap, motif_loss, q_sample, v_target
from model import (CHECKPOINT_KIND, ModelConfig, MotifModel, Stage, autocast, init_from, load_checkpoint, pick_device,
                   resolve_checkpoint, resolve_rescale, training_flops, wants_bf16)
from sample import MODEL_SIZES, build_model, ddim_sample, to_uint8_frames


class TrainingStopped(Exception):
    """The run cannot go on (non-finite training); its message is for the user, the last checkpoint is safe."""


# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    # data: a video folder (captions.csv / captions.jsonl inside), a captions file (e.g. WebVid's CSV; videos under
    # its folder) or "shapes" (built-in synthetic videos)
    data: str = ""
    frames: int = 16
    height: int = 320
    width: int = 512
    max_stride: int = 8  # dynamic frame stride: s ~ U[1, max_stride] per clip, fps = source fps / s
    max_shapes: int = 3  # shapes data: 1 to this many shapes in a scene (the demo: 1)
    shape_scale: float = 1.0  # shapes data: the shapes' sizes times this (0.65: about 3 % of the pixels move, as in the paper's videos)
    flow_weights: str = ""  # RAFT inside the step for video folders, no heatmap cache: small | large | a .pth ("" = the cache)
    monitor_weights: str = ""  # RAFT of the motion monitor (flow.py) when flow_weights is "": small | large | a .pth
    latents: bool = False  # read the autoencoder's latents from the cache of `python data.py latents` (video folders)
    workers: int = 4  # data loader processes per rank
    # model (model.py)
    model: str = "vc2"  # one of sample.MODEL_SIZES (demo: the CPU demo's U-Net)
    text_encoder: str = "openclip"  # VideoCrafter2's, frozen (from --init) | bytes (trained from scratch)
    autoencoder: str = "kl-f8"  # VideoCrafter2's, frozen (from --init) | pixel (space-to-depth, from scratch)
    pixel_patch: int = 8  # space-to-depth factor of the pixel autoencoder
    temporal_dropout: float = 0.1
    gradient_checkpointing: bool = True
    init: str = ""  # a text-to-video U-Net checkpoint to start from (new input channels start at zero)
    # z0 times VideoCrafter2's s_t (1 -> 0.7, loss.input_scale), which its checkpoint learned: auto (on with --init)
    rescale: str = "auto"  # auto | true | false
    zero_terminal_snr: bool = False  # DynamiCrafter's option: betas rescaled so that t = 999 is pure noise (Lin et al.)
    # objective (loss.py)
    motif_lambda: float = 1.0  # lambda; 0 = plain diffusion loss
    loss_mode: str = "motif"  # motif | inverse (weights static regions: Inv-MotiF)
    # not MotiF: what made the 32x32 demo read its prompt (demo/unet.py, config/shapes.toml); off in the recipe
    noise_shift: float = 1.0  # noise schedule (demo.demo_alphas_cumprod): signal-to-noise ratio / noise_shift^2 at every t
    high_t_share: float = 0.0  # share of samples whose timestep is drawn from the top tenth of the range
    # the objective's other settings
    text_dropout: float = 0.1  # share of captions replaced by "" (for classifier-free guidance)
    cfg_scale: float = 7.5  # classifier-free guidance of this model's samples (validation, sample.py, demo/bench.py)
    # optimisation
    batch_size: int = 64  # global batch, whatever the number of processes
    micro_batch: int = 8  # clips per process per forward/backward
    lr: float = 5e-5
    warmup_steps: int = 500
    cooldown_steps: int = 0  # the last N steps (or all, if fewer) take the lr linearly to 0 (warmup-stable-decay); 0: off
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # the gradients' global norm is clipped to this; 0: no clipping
    ema_decay: float = 0.9999
    steps: int = 32000
    # memory (train.py; README "Memory per GPU")
    shard: bool = False  # FSDP2: each rank keeps 1 / world of the U-Net's weights, gradients, AdamW state and EMA
    offload: bool = False  # with shard: keep those shards in CPU memory and step AdamW there (one 24 GB GPU)
    # bookkeeping
    out_dir: str = "out/recipe"
    seed: int = 0
    log_every: int = 20
    sample_every: int = 0  # validation samples of held-out pairs (or the folder's first videos) every N steps; 0: off
    ckpt_every: int = 1000
    keep_checkpoints: int = 3  # the newest N of out_dir/ckpt_STEP.pt are kept
    resume: str = ""  # "latest" (out_dir/latest, or a fresh start if there is none) or a checkpoint path
    max_bad_steps: int = 20  # stop after this many steps in a row with a non-finite loss or gradient
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32


# ----------------------------------------------------------------------------- the run: setup, then a loop of step / log / save

@dataclass
class TrainState:
    """What a training step works on: the model (and `wrapped`, the same model in DDP, or itself alone or sharded),
    AdamW, the EMA (fp32 shadow weights of the trainable parameters, by name), the precision, the processes, and
    RAFT when heatmaps are computed inside the step (else None)."""
    cfg: Config
    model: torch.nn.Module
    wrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: dict
    autocast: object
    device: torch.device
    world: int = 1
    rank: int = 0
    raft: object = None


def train(cfg: Config):
    """Train as cfg says; returns the model. One process, or this rank's share under torchrun."""
    # ---- setup
    stop_signals = catch_stop_signals()
    state, step, dataset = setup(cfg)
    master, model = state.rank == 0, state.model
    batches = make_batches(cfg, dataset, state.rank, state.world, step, state.device)
    flops_per_clip = None
    if state.device.type == "cuda":  # for MFU: the U-Net's forward + backward FLOPs, counted once on the meta device
        latent_size = (cfg.height // model.autoencoder.factor, cfg.width // model.autoencoder.factor)
        flops_per_clip = training_flops(model.unet.cfg, cfg.frames, latent_size, model.text_encoder.max_len)
    log = Log(cfg, state.world, state.device, master, flops_per_clip, step)
    validation = validation_set(cfg, dataset) if cfg.sample_every and master else None
    monitor = motion_monitor(cfg, state) if validation else None
    bad_in_a_row, skipped = 0, 0
    model.train()

    while step < cfg.steps:
        # ---- step
        losses, stepped, grad_norm, lr = train_step(state, batches, step)
        bad_in_a_row = 0 if stepped else bad_in_a_row + 1
        skipped += not stepped
        if bad_in_a_row >= cfg.max_bad_steps:
            raise TrainingStopped(f"{bad_in_a_row} steps in a row had a non-finite loss or gradient (step {step + 1}); "
                                  f"stopping. Lower lr (now {cfg.lr}) or check the data; the last good checkpoint is kept")
        step += 1

        # ---- log
        log.add(losses)
        if step % cfg.log_every == 0 or step == cfg.steps:
            log.write(step, lr, grad_norm, skipped)

        # ---- evaluate: samples of held-out pairs (or the folder's first videos) with the EMA weights, scored
        if validation and step % cfg.sample_every == 0:
            log.write_validation(step, *validate(state, validation, step, monitor))

        # ---- save (and stop, together, if any rank got a stop signal)
        stopping = any_rank(bool(stop_signals), state.world, state.device)
        if step % cfg.ckpt_every == 0 or step == cfg.steps or stopping:
            save(state, step)
        if stopping:
            if master:
                log.bar.write(f"stop signal: saved step {step} to {cfg.out_dir}; continue with --resume")
            break

    log.close()
    if master:
        print(f"done: step {step}, checkpoint {Path(cfg.out_dir) / (Path(cfg.out_dir) / 'latest').read_text().strip()}")
    if dist.is_initialized():
        # every rank past its last collective; then the DDP wrapper and whatever else holds the process group's work
        # freed now, not in the interpreter's teardown, where gloo's threads can no longer take the GIL (SIGABRT)
        dist.barrier()
        del state, batches
        gc.collect()
        dist.destroy_process_group()
    return model


def setup(cfg):
    """Processes, precision, model, AdamW and EMA (fresh or resumed), RAFT if asked: (TrainState, the step to start
    from, the dataset)."""
    rank, world, device = setup_distributed(cfg.device, cfg.shard, cfg.offload)
    check_config(cfg, world)
    master = rank == 0
    use_bf16 = wants_bf16(cfg.dtype, device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # the same shapes every step: cuDNN times its algorithms once
    torch.backends.cuda.matmul.allow_tf32 = use_bf16  # what stays fp32 in a bf16 run (RAFT in the step and the monitor): TF32
    model, optimizer, ema, step = setup_model(cfg, device, master, *resume_checkpoint(cfg, rank, world), world, use_bf16)
    dataset = build_dataset(cfg, model)
    raft = RAFT(cfg.flow_weights, device=device) if cfg.flow_weights and cfg.data != "shapes" else None
    if world > 1 and not cfg.shard:  # the gradients are views of DDP's all-reduce buckets, not a second copy of them
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          gradient_as_bucket_view=True, broadcast_buffers=False)  # no buffer changes
    else:
        wrapped = model  # alone, or sharded in place
    state = TrainState(cfg, model, wrapped, optimizer, ema, autocast(device, use_bf16), device, world, rank, raft)
    if master:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        print(f"training {cfg.model} ({sum(p.numel() for p in ema.values()) / 1e6:.1f} M trainable parameters) on "
              f"{cfg.data}: {world} process(es) on {device.type}"
              + (f", sharded{' and offloaded to CPU memory' if cfg.offload else ''}" if cfg.shard else "")
              + f", global batch {cfg.batch_size} = {cfg.micro_batch} x {cfg.batch_size // (cfg.micro_batch * world)} "
              f"micro-steps x {world}, {'bf16' if use_bf16 else 'fp32'}")
    return state, step, dataset


# ----------------------------------------------------------------------------- one step

LOSS_TERMS = ("loss", "diffusion", "motif", "moving", "static")  # what motif_loss returns, all logged


def train_step(state, batches, step):
    """One step of MotiF, top to bottom. Per micro-batch: the clips' latents z0 and motion heatmaps m; per sample,
    from its own seed, t, noise and text dropout; z_t and the target v; v_hat from the U-Net given z_t, the image
    latent (x-cat), t, the text and fps; the loss and its backward (DDP syncs on the last micro-batch; sharded
    gradients are reduce-scattered after each, train.py). Then one update: clipping, AdamW, EMA. Returns (the loss
    terms averaged over the micro-batches, stepped, gradient norm, lr)."""
    cfg, model, device = state.cfg, state.model, state.device
    lr = learning_rate(cfg, step)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    accum = cfg.batch_size // (cfg.micro_batch * state.world)
    losses = dict.fromkeys(LOSS_TERMS, 0.0)
    for micro in range(accum):
        batch = next(batches)
        # the global RNG drives only dropout: seeded by the micro-batch's first sample (a negative index, never a
        # sample's), so that its masks do not depend on the rank or the world size for a given micro_batch
        torch.manual_seed(sample_seed(cfg.seed, step, -1 - batch["index"][0].item()))
        # per sample, seeded by (seed, step, sample index): the maths does not depend on the world size; with the
        # kl-f8 autoencoder inside the step, also the draw of its posterior sample (DESIGN.md: the cache holds means)
        cached = "latent" in batch
        posterior = not cached and cfg.autoencoder == "kl-f8"
        latent_shape = batch["latent"].shape[1:] if cached else model.latent_shape(batch["video"].shape[2:])
        t, noise, drop, eps_z0 = draw_randomness(cfg, step, batch["index"].tolist(), latent_shape,
                                                 model.schedule.num_steps, posterior)
        # the clips -> z0, from the latent cache of `data.py latents` or through the (frozen) autoencoder
        if cached:
            z0 = batch["latent"].to(device, non_blocking=True)  # (b, C, T, h, w)
        else:
            video = to_unit_range(batch["video"].to(device, non_blocking=True))  # (b, 3, T, H, W) in [-1, 1]
            with torch.no_grad(), state.autocast:
                z0 = model.encode_video(video, None if eps_z0 is None else eps_z0.to(device)).float()  # (b, C, T, h, w)
        # their motion heatmaps m: cached (video folders) or exact (shapes), or RAFT on just these clips' frame pairs
        if state.raft is None:
            heatmap = batch["heatmap"].to(device, non_blocking=True)  # (b, T, H', W'): H' = H (shapes) or H/8 (cache)
        else:
            heatmap = clip_heatmaps(state.raft, video, heatmap_size(video.shape[-2:]))  # (b, T, H/8, W/8)
        m = latent_heatmap(heatmap, z0.shape[-2:])  # (b, 1, T, h, w): m', area-averaged to the latent size
        if device.type == "cuda":  # drawn on the CPU: pinned, so the copies do not wait
            t, noise = t.pin_memory(), noise.pin_memory()
        t, noise = t.to(device, non_blocking=True), noise.to(device, non_blocking=True)
        z_t = q_sample(model.schedule, z0, t, noise)  # (b, C, T, h, w)
        v = v_target(model.schedule, z0, t, noise)  # (b, C, T, h, w)
        z_img = model.image_latent(z0)  # (b, C, T, h, w): frame 0's latent over every frame
        captions = ["" if d else c for d, c in zip(drop, batch["caption"])]
        fps = batch["fps"].to(device, non_blocking=True)
        # v_hat = U-Net(cat[z_t, z_img], t, text, fps); L = L_diffusion + lambda * L_motif; backward
        sync = state.world == 1 or cfg.shard or micro == accum - 1
        with nullcontext() if sync else state.wrapped.no_sync():
            with state.autocast:
                v_hat = state.wrapped(z_t, z_img, t, captions, fps)  # (b, C, T, h, w)
            terms = loss_backward(v_hat, v, m, cfg, accum)
        losses = {k: losses[k] + terms[k] / accum for k in LOSS_TERMS}
    losses = dict(zip(LOSS_TERMS, torch.stack([losses[k] for k in LOSS_TERMS]).tolist()))  # the step's one sync
    stepped, grad_norm = update(state, losses, step)
    return losses, stepped, grad_norm, lr


def sample_seed(seed, step, index):
    """A 63-bit seed for one sample of one step; independent of the rank that handles it."""
    return ((seed * 1_000_003 + step) * 1_000_033 + index) % (2 ** 63)


def draw_randomness(cfg, step, indices, latent_shape, num_timesteps, posterior=False):
    """Per sample: timestep, noise, text dropout and, with posterior, the N(0, 1) draws of the autoencoder's posterior
    sample (else None), from its own seeded generator; the posterior's last, so the others do not depend on it."""
    t, noise, drop, eps_z0 = [], [], [], []
    for index in indices:
        g = torch.Generator().manual_seed(sample_seed(cfg.seed, step, index))
        low = high_t_floor(g, cfg.high_t_share, num_timesteps) if cfg.high_t_share else 0  # the demo's (demo/unet.py)
        t.append(torch.randint(low, num_timesteps, (1,), generator=g))
        drop.append(torch.rand(1, generator=g).item() < cfg.text_dropout)
        noise.append(torch.randn(latent_shape, generator=g))
        if posterior:
            eps_z0.append(torch.randn(latent_shape, generator=g))
    return torch.cat(t), torch.stack(noise), drop, torch.stack(eps_z0) if posterior else None


def loss_backward(v_hat, v, m, cfg, accum=1):
    """The MotiF loss of v_hat (loss.py: L_diffusion + lambda * L_motif, or Inv-MotiF) and its backward, scaled by
    1 / accum. train_step, tools/bench.py and tools/memory.py all run this, then update(). Returns the loss terms as
    0-d float64 tensors on the device: no host sync per micro-batch (float64, so that train_step's mean over
    micro-batches is what Python floats would give, bit for bit)."""
    losses = motif_loss(v_hat, v, m, cfg.motif_lambda, cfg.loss_mode)
    (losses["loss"] / accum).backward()
    return {k: value.detach().double() for k, value in losses.items()}


def update(state, losses, step):
    """Clip the (synced) gradients and step AdamW and the EMA; or, if any rank saw a non-finite loss (losses["loss"],
    a float or a 0-d tensor) or gradient, skip the step on every rank. Returns (stepped, gradient norm)."""
    cfg = state.cfg
    trainable = [p for p in state.model.parameters() if p.requires_grad]
    max_norm = cfg.grad_clip or math.inf  # 0: no clipping, the norm still measured for the log
    # clip_grad_norm_'s two steps, on this rank's shards when sharded: DTensor would plan one foreach op over all the
    # sharded gradients, in n^2 time on its first call (adamw says more)
    grads = [local(p.grad) for p in trainable if p.grad is not None]
    total_norm = torch.nn.utils.get_total_norm(grads)
    if cfg.shard and state.world > 1:  # the global norm: the shards' squared norms summed over the ranks
        total_norm = total_norm.square()
        dist.all_reduce(total_norm)
        total_norm = total_norm.sqrt()
    if grads:  # none after a step with no graph
        torch._foreach_mul_(grads, (max_norm / (total_norm + 1e-6)).clamp(max=1.0))
    grad_norm = total_norm.item()  # the global norm, all ranks
    finite = math.isfinite(losses["loss"]) and math.isfinite(grad_norm)
    stepped = not any_rank(not finite, state.world, state.device)
    if stepped:
        state.optimizer.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # a short memory in the first steps
        # shard by shard when sharded: an EMA shard and its parameter's shard are the same elements
        torch._foreach_lerp_([local(e) for e in state.ema.values()], [local(p).detach().float() for p in trainable],
                             1 - decay)
    state.optimizer.zero_grad(set_to_none=True)
    return stepped, grad_norm


def learning_rate(cfg, step):
    """Linear warmup over warmup_steps, constant, then linear to 0 over the last cooldown_steps (all of a run shorter
    than that; step counts from 0)."""
    lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.cooldown_steps:
        lr *= min(1.0, (cfg.steps - step) / min(cfg.cooldown_steps, cfg.steps))
    return lr


def save(state, step):
    """Every rank calls it; rank 0 writes one file, sharded or not (a sharded model's state gathered whole onto
    rank 0's CPU memory first). Non-finite weights are never written over a good checkpoint."""
    cfg, model, master = state.cfg, state.model, state.rank == 0
    trainable = [local(p) for p in model.parameters() if p.requires_grad]
    if any_rank(not torch.stack([torch.isfinite(p).all() for p in trainable]).all().item(), state.world, state.device):
        raise TrainingStopped(f"non-finite weights at step {step}: not saving; the last good checkpoint stays")
    if cfg.shard:
        saved = gather_state(model, state.optimizer, state.ema, master, state.device)
    else:
        saved = {"model": model.state_dict(), "ema": state.ema, "optimizer": state.optimizer.state_dict()}
    if master:
        save_checkpoint(cfg.out_dir, {"kind": CHECKPOINT_KIND, "step": step, "config": asdict(cfg), **saved},
                        cfg.keep_checkpoints)
    if state.world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- validation samples

VALIDATION_IMAGES = 4  # shapes: the first held-out first frames, each with all its prompts (13 pairs)
VALIDATION_VIDEOS = 8  # a video folder: its first videos' first frames


VALIDATION_STEPS = 25  # DDIM steps of a validation sample


VALIDATION_FPS = 8  # a video folder's real clips are taken at the stride nearest this fps (VBench's choice)


def validation_set(cfg, dataset):
    """What the validation samples show, as held_out_pairs-style entries with "image" (H, W, 3) uint8, "caption" and
    "fps" (what the sample is told): on shapes, the first held-out first frames with all their prompts (scored: they
    carry their scenes and motions); on a video folder, the first frames of its first usable videos (the others skipped
    and counted as the training clips skip them) with their captions, and
    "clip" (T, H, W, 3) uint8, the real clip from that frame at the stride nearest VALIDATION_FPS, for the motion
    monitor."""
    if cfg.data == "shapes":
        return [{**e, "fps": 8.0} for e in held_out_pairs(VALIDATION_IMAGES, size=cfg.height,
                                                          shape_scale=cfg.shape_scale, max_shapes=cfg.max_shapes)]
    entries = []
    bad_paths = {path for _, path in dataset.unusable}
    for video in (v for v in dataset.videos if v["path"] not in bad_paths):
        if len(entries) == VALIDATION_VIDEOS:
            break
        try:  # an unusable video is skipped and counted, as the training clips do
            file = dataset.open_video(video["path"])
            fps = video["fps"] or file.fps or FALLBACK_FPS
            stride = max(1, min(round(fps / VALIDATION_FPS), cfg.max_stride, (file.num_frames - 1) // (cfg.frames - 1)))
            clip = resize_center_crop(file.read(range(0, stride * cfg.frames, stride)), (cfg.height, cfg.width))
        except UnusableVideo as error:
            dataset.skip(video, error)
            continue
        entries.append({"image": clip[0], "clip": clip, "caption": video["caption"], "fps": fps / stride})
    if not entries:
        raise ValueError(f"no usable video in {dataset.root} for the validation samples: {summarise(dataset.unusable)}")
    return entries


@torch.no_grad()
def validate(state, entries, step, monitor=None):
    """Sample `entries` with the EMA weights (swapped into the model, then back: bit for bit), write
    out_dir/samples/step_NNNNNNN.gif (conditioning image | sample, a row per entry) and return (figures, a warning
    or None): on shapes, the ShapesBench figures of these pairs; on a video folder with a `monitor`, the motion of the
    samples against their real clips (flow.py). Each sample's noise comes from its own seed: no training RNG is
    touched."""
    cfg, model, ema = state.cfg, state.model, state.ema
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    kept = {name: p.detach().clone() for name, p in trainable.items()}
    for name, p in trainable.items():
        p.copy_(ema[name])
    model.eval()
    try:
        images = torch.stack([frames_to_tensor(e["image"][None])[0] for e in entries])  # (N, 3, H, W)
        with state.autocast:
            videos = ddim_sample(model, images, [e["caption"] for e in entries], cfg.frames, [e["fps"] for e in entries],
                                 VALIDATION_STEPS, cfg.cfg_scale, seeds=range(len(entries)), progress=False)  # (N, 3, T, H, W)
    finally:
        for name, p in trainable.items():
            p.copy_(kept[name])
        model.train()
    frames = [to_uint8_frames(video) for video in videos]  # N x (T, H, W, 3)
    rows = [np.concatenate([np.repeat(e["image"][None], cfg.frames, 0), f], axis=2) for e, f in zip(entries, frames)]
    grid = np.concatenate(rows, axis=1)  # (T, N*H, 2W, 3)
    scale = max(1, 128 // cfg.height)
    write_video(Path(cfg.out_dir) / "samples" / f"step_{step:07d}.gif", grid.repeat(scale, 1).repeat(scale, 2), 4)
    if cfg.data == "shapes":
        figures = score(entries, frames)
        keys = ("direction_accuracy", "text_contrast_accuracy", "still_accuracy", "static_video_rate")
        return {k: figures[k] for k in keys}, None
    if monitor is None:
        return {}, None
    reals = torch.stack([frames_to_tensor(e["clip"]).transpose(0, 1) for e in entries])  # (N, 3, T, H, W)
    return monitor(videos.float().cpu(), reals, torch.tensor([e["fps"] for e in entries]))


def motion_monitor(cfg, state):
    """The motion monitor of a video folder's validation passes, on the step's RAFT (--flow_weights) or on
    --monitor_weights; None, said in one line, without either (and on shapes, which ShapesBench scores)."""
    if cfg.data == "shapes":
        return None
    if state.raft is None and not cfg.monitor_weights:
        print("motion monitor off (no RAFT): --monitor_weights=small|large|PATH measures at each validation pass "
              "whether the samples move as much as their real clips")
        return None
    raft = state.raft or load_monitor_raft(cfg.monitor_weights, state.device)
    return MotionMonitor(raft, first_logged_ratio(Path(cfg.out_dir) / "log.jsonl"))  # a resumed run: its own first


# ----------------------------------------------------------------------------- config parsing: presets and flags

PRESET_DIR = Path(__file__).resolve().parent / "config"


def parse_value(key, text, kind):
    if kind is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"--{key} takes true or false, not {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"--{key} takes a {kind.__name__}, not {text!r}") from None


def load_config(argv):
    """Defaults <- --preset NAME (config/NAME.toml) <- --key=value flags, each type-checked; a flag wins over a preset
    wherever it stands. --resume, --resume=true: "latest"; --resume=false: a fresh start."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    values = {}

    def set_value(key, value, source):
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            raise ValueError(f"unknown config key {key!r} in {source}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        kind = type(fields[key].default)
        if isinstance(value, str) and kind is not str:
            value = parse_value(key, value, kind)
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind):
            raise ValueError(f"{key} takes a {kind.__name__}, not {value!r} (in {source})")
        values[key] = value

    presets, flags = [], []  # presets first, then flags: a flag wins wherever it stands
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--preset" or arg.startswith("--preset="):
            presets.append(arg.split("=", 1)[1] if "=" in arg else (args.pop(0) if args else ""))
        elif arg == "--resume":
            flags.append(("resume", "latest"))
        elif arg.startswith("--") and "=" in arg:
            key, text = arg[2:].split("=", 1)
            flags.append((key.replace("-", "_"), text))
        elif arg.startswith("--") and args and not args[0].startswith("--"):
            flags.append((arg[2:].replace("-", "_"), args.pop(0)))
        else:
            raise ValueError(f"cannot read argument {arg!r}: use --key=value (see the Config class in train.py)")
    for name in presets:
        path = PRESET_DIR / f"{name}.toml"
        if not path.is_file():
            names = sorted(p.stem for p in PRESET_DIR.glob("*.toml"))
            raise ValueError(f"unknown preset {name!r}; presets: {', '.join(names)}")
        for key, value in tomllib.loads(path.read_text()).items():
            set_value(key, value, path.name)
    for key, text in flags:
        if key == "resume" and text.lower() in RESUME_WORDS:  # --resume=true is the bare --resume, not a file "true"
            text = RESUME_WORDS[text.lower()]
        set_value(key, text, "the command line")
    return Config(**values)


RESUME_WORDS = {"1": "latest", "true": "latest", "yes": "latest", "0": "", "false": "", "no": ""}


POSITIVE = ("height", "width", "max_stride", "max_shapes", "pixel_patch", "batch_size", "micro_batch", "steps",
            "log_every", "ckpt_every", "keep_checkpoints", "max_bad_steps", "shape_scale", "noise_shift")
NOT_NEGATIVE = ("workers", "warmup_steps", "cooldown_steps", "sample_every", "seed", "motif_lambda", "cfg_scale",
                "weight_decay", "grad_clip", "lr")
FRACTIONS = ("temporal_dropout", "text_dropout", "high_t_share", "ema_decay")  # in [0, 1]


def check_config(cfg, world_size):
    for keys, rule, holds in ((POSITIVE, "positive", lambda v: v > 0), (NOT_NEGATIVE, "0 or more", lambda v: v >= 0),
                              (FRACTIONS, "in [0, 1]", lambda v: 0 <= v <= 1)):
        for key in keys:
            value = getattr(cfg, key)
            if not (math.isfinite(value) and holds(value)):
                raise ValueError(f"{key} must be {rule}, not {value}")
    per_step = cfg.micro_batch * world_size
    if cfg.batch_size % per_step:
        raise ValueError(f"batch_size {cfg.batch_size} does not divide into micro_batch {cfg.micro_batch} "
                         f"x {world_size} processes; pick a batch_size that is a multiple of {per_step}")
    if cfg.model not in MODEL_SIZES:
        raise ValueError(f"unknown model size {cfg.model!r}; sizes: {', '.join(MODEL_SIZES)}")
    resolve_rescale(cfg.rescale, cfg.init)
    if cfg.loss_mode not in ("motif", "inverse"):
        raise ValueError(f"loss_mode must be motif or inverse, not {cfg.loss_mode!r}")
    if cfg.frames < 2:
        raise ValueError(f"frames must be at least 2 (motion needs two frames), not {cfg.frames}")
    if cfg.dtype not in ("auto", "bf16", "fp32") or cfg.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto|cpu|cuda and dtype auto|bf16|fp32 (got {cfg.device}, {cfg.dtype})")
    if cfg.offload and not cfg.shard:
        raise ValueError("--offload=true moves the shards of --shard=true to CPU memory: add --shard=true")
    if cfg.shard and cfg.sample_every:
        raise ValueError("validation samples (--sample_every) need the whole model on rank 0; with --shard=true "
                         "set --sample_every=0 and sample the checkpoints with sample.py or demo/bench.py")
    if not cfg.data:
        raise ValueError("no training data: pass --data=DIR (a folder of videos with captions.csv or "
                         "captions.jsonl, see README) or try the built-in demo with --preset shapes")


# ----------------------------------------------------------------------------- the log

class Log:
    """Loss terms averaged over the steps since the last line, clips/s, and one JSON line per log_every steps in
    out_dir/log.jsonl (rank 0), echoed under the progress bar. On a GPU with a known peak, MFU per GPU."""

    def __init__(self, cfg, world, device, master, flops_per_clip, step):
        self.cfg, self.world, self.device, self.master = cfg, world, device, master
        self.flops_per_clip, self.peak_flops = flops_per_clip, peak_bf16_flops(device)
        self.file = open(Path(cfg.out_dir) / "log.jsonl", "a") if master else None
        self.bar = tqdm(total=cfg.steps, initial=step, disable=not master, desc="train", dynamic_ncols=True)
        self.reset()

    def reset(self):
        self.sums, self.steps, self.clips, self.started = dict.fromkeys(LOSS_TERMS, 0.0), 0, 0, time.time()

    def add(self, losses):
        """One step's loss terms (averaged over its micro-batches)."""
        for key in LOSS_TERMS:
            self.sums[key] += losses[key]
        self.steps += 1
        self.clips += self.cfg.batch_size
        self.bar.update(1)

    def write(self, step, lr, grad_norm, skipped):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.time() - self.started
        means = torch.tensor([self.sums[k] / self.steps for k in LOSS_TERMS], device=self.device)
        if self.world > 1:  # the mean over ranks
            dist.all_reduce(means)
            means /= self.world
        record = {"step": step, **dict(zip(LOSS_TERMS, means.tolist())), "lr": lr, "grad_norm": grad_norm,
                  "skipped_steps": skipped, "clips_per_s": self.clips / elapsed, "peak_mem_gb": peak_memory_gb(self.device)}
        if self.flops_per_clip and self.peak_flops:
            record["mfu"] = self.flops_per_clip * record["clips_per_s"] / self.world / self.peak_flops  # per GPU
        if self.master:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", moving=f"{record['moving']:.3f}",
                                 static=f"{record['static']:.3f}", clips_s=f"{record['clips_per_s']:.1f}")
            self.bar.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        self.reset()

    def write_validation(self, step, figures, warning=None):
        """Where the validation samples are, and their figures (ShapesBench's, or the motion monitor's) and warning in
        log.jsonl (rank 0 calls it)."""
        if figures:
            self.file.write(json.dumps({"step": step, "validation": figures, **({"warning": warning} if warning else {})})
                            + "\n")
            self.file.flush()
        self.bar.write(f"validation samples: {Path(self.cfg.out_dir) / 'samples' / f'step_{step:07d}.gif'}  "
                       + " ".join(f"{k} {v:.3f}" for k, v in figures.items()))
        if warning:
            self.bar.write(warning)

    def close(self):
        self.bar.close()
        if self.file:
            self.file.close()


# ----------------------------------------------------------------------------- what setup builds: the model, the data

def setup_model(cfg, device, master, resume, ckpt, world, bf16):
    """The model, its AdamW and its EMA (fp32 shadow weights of the trainable parameters): from --init, or fresh
    (the same initial weights on every rank), or those of `ckpt`, read from the file `resume`, when resuming; then
    sharded with --shard (train.py: the optimizer and the EMA hold this rank's shards). Returns them and the step."""
    if not ckpt and not cfg.init and (cfg.autoencoder == "kl-f8" or cfg.text_encoder == "openclip"):  # before building
        raise ValueError(f"the {cfg.autoencoder} autoencoder and the {cfg.text_encoder} text encoder are frozen and "
                         "need pretrained weights: pass --init=path/to/VideoCrafter2/model.ckpt (see README), or "
                         "train everything from scratch with --autoencoder=pixel --text_encoder=bytes")
    torch.manual_seed(cfg.seed)
    model = build_model(ModelConfig.from_run_config(asdict(cfg))).to(device)
    if ckpt:  # it holds every weight, --init's included
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError:
            keys = ("model", "text_encoder", "autoencoder", "pixel_patch")
            saved, ours = ({k: c.get(k) for k in keys} for c in (ckpt["config"], asdict(cfg)))
            raise ValueError(f"{resume} holds another model ({saved}) than this config builds ({ours}); "
                             "resume with its settings or start a new out_dir") from None
    elif cfg.init:
        message = init_from(model, cfg.init)
        if master:
            print(message)
    if cfg.shard:
        shard_model(model, device, world, bf16, cfg.offload)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = adamw(trainable.values(), cfg.lr, cfg.weight_decay)
    ema = {name: p.detach().clone().float() for name, p in trainable.items()}  # sharded: this rank's shards
    if not ckpt:
        return model, optimizer, ema, 0
    saved = regrouped(ckpt["optimizer"], optimizer)
    optimizer.load_state_dict(local_optimizer_state(saved, optimizer) if cfg.shard else saved)
    for group in optimizer.param_groups:  # the flags' (the lr is set every step), not the saved state's
        group["weight_decay"] = cfg.weight_decay
    changed = [f"{key} {getattr(cfg, key)} (the checkpoint's run: {ckpt['config'][key]})" for key in OPTIMIZATION
               if ckpt["config"].get(key, getattr(cfg, key)) != getattr(cfg, key)]
    if master and changed:
        print("resuming with the flags' " + ", ".join(changed))
    for name, shadow in ema.items():
        shadow.copy_(local_part(ckpt["ema"][name], shadow))
    if master:
        print(f"resumed from {resume} at step {ckpt['step']}")
    return model, optimizer, ema, ckpt["step"]


OPTIMIZATION = ("lr", "warmup_steps", "cooldown_steps", "weight_decay", "grad_clip", "ema_decay")  # flags win on resume
ADAMW_GROUP = 16  # parameters per AdamW group


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """train.py's optimizer: fused AdamW (one kernel per group; docs/performance.md) over `params` in groups of
    ADAMW_GROUP, in order, so that the state's indices stay the parameters'. Groups, because torch 2.12+'s DTensor
    plans a fused or foreach op over n sharded tensors in n^2 time on its first call: seconds for VideoCrafter2's
    1482 tensors in one group (docs/performance.md)."""
    params = list(params)
    groups = [{"params": params[i:i + ADAMW_GROUP]} for i in range(0, len(params), ADAMW_GROUP)]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True)


def regrouped(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A saved optimizer.state_dict() with its parameters in `optimizer`'s groups, each with the saved first group's
    settings: a checkpoint of a train.py that grouped them otherwise (one group) resumes. Parameters by index, as both
    keep them; a state of another number of parameters is returned as it is (loading it then fails)."""
    indices = [i for group in saved["param_groups"] for i in group["params"]]
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    if [len(group["params"]) for group in saved["param_groups"]] == sizes or len(indices) != sum(sizes):
        return saved
    settings = {key: value for key, value in saved["param_groups"][0].items() if key != "params"}
    groups = [{**settings, "params": indices[i:i + ADAMW_GROUP]} for i in range(0, len(indices), ADAMW_GROUP)]
    return {**saved, "param_groups": groups}


def resume_checkpoint(cfg, rank, world):
    """(the file, the checkpoint) to resume from, or ("", None) for a fresh start. Rank 0 decides which file (what
    --resume names; "latest": out_dir's, if it has one) and so the step; every rank loads that file and checks its
    step, so that ranks without a shared file system cannot start at different steps. Any rank's error is every
    rank's, and a fresh run into an out_dir that holds a run (its log would mix with this one's) is refused."""
    path, ckpt, error = "", None, None
    if rank == 0:
        try:
            path = str(resume_file(cfg))
            ckpt = load_checkpoint(path) if path else None
        except ValueError as failure:
            error = str(failure)
    path, step, error = from_rank_0((path, ckpt["step"] if ckpt else None, error), world)
    if rank and path and not error:
        try:
            ckpt = load_checkpoint(path)
            if ckpt["step"] != step:
                error = (f"rank {rank}'s {path} holds step {ckpt['step']}, rank 0's step {step}: every node needs "
                         "rank 0's file")
        except ValueError as failure:
            error = f"rank {rank} cannot resume at rank 0's step {step}: {failure}; every node needs that file"
    error = first_error(error, world)
    if error:
        raise ValueError(error)
    return path, ckpt


def resume_file(cfg):
    """What --resume names, as a checkpoint file; "latest" is out_dir's if it has one, else a fresh start ("")."""
    out_dir = Path(cfg.out_dir)
    if not cfg.resume:
        if (out_dir / "log.jsonl").exists() or (out_dir / "latest").exists() or any(out_dir.glob("ckpt_*.pt")):
            raise ValueError(f"{out_dir} holds a run already: continue it with --resume, or start a new run with a "
                             "new --out_dir")
        return ""
    if cfg.resume != "latest":
        return resolve_checkpoint(cfg.resume)
    if (out_dir / "latest").is_file():
        return resolve_checkpoint(out_dir)
    print(f"no checkpoint in {out_dir} yet: starting from step 0")
    return ""


def build_dataset(cfg: Config, model: MotifModel):
    """The training data the config names: the shapes videos or a video folder (with its caches)."""
    factor = model.resolution_factor
    if cfg.height % factor or cfg.width % factor:
        raise ValueError(f"height and width must be multiples of {factor} for this model "
                         f"(got {cfg.height}x{cfg.width})")
    if cfg.data == "shapes":
        if cfg.height != cfg.width:
            raise ValueError(f"shapes videos are square: set height = width (got {cfg.height}x{cfg.width})")
        return ShapesDataset("train", size=cfg.height, frames=cfg.frames, max_stride=cfg.max_stride, seed=cfg.seed,
                             max_shapes=cfg.max_shapes,
                             shape_scale=cfg.shape_scale)
    if not Path(cfg.data).exists():
        raise ValueError(f"--data={cfg.data}: no such folder or file (give a folder of videos with captions.csv or "
                         "captions.jsonl, a captions file such as WebVid's results_2M_train.csv, or use --preset shapes)")
    if cfg.latents and (cfg.flow_weights or cfg.autoencoder == "pixel"):
        raise ValueError("--latents reads cached kl-f8 latents and cached heatmaps: it goes with --autoencoder=kl-f8 "
                         "and without --flow_weights")
    return VideoFolderDataset(cfg.data, frames=cfg.frames, size=(cfg.height, cfg.width), max_stride=cfg.max_stride,
                              seed=cfg.seed, cached_heatmaps=not cfg.flow_weights,
                              latents=cfg.autoencoder if cfg.latents else "")


class StepIndices(torch.utils.data.Sampler):
    """The sample indices this rank reads, micro-batch after micro-batch, from `start_step` on:
    step s covers global indices s*B .. s*B+B-1, split into micro-batches dealt out to the ranks."""

    def __init__(self, cfg: Config, rank, world_size, start_step):
        self.cfg, self.rank, self.world, self.start = cfg, rank, world_size, start_step

    def __iter__(self):
        mb, accum = self.cfg.micro_batch, self.cfg.batch_size // (self.cfg.micro_batch * self.world)
        for step in range(self.start, self.cfg.steps):
            for micro in range(accum):
                first = step * self.cfg.batch_size + (micro * self.world + self.rank) * mb
                yield from range(first, first + mb)

    def __len__(self):
        return (self.cfg.steps - self.start) * self.cfg.batch_size // self.world


def make_batches(cfg, dataset, rank, world, step, device):
    """This rank's micro-batches from `step` on (StepIndices), loaded by cfg.workers processes."""
    return iter(torch.utils.data.DataLoader(dataset, batch_size=cfg.micro_batch,
                                            sampler=StepIndices(cfg, rank, world, step), num_workers=cfg.workers,
                                            worker_init_fn=ignore_stop_signals,
                                            pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0))


# ----------------------------------------------------------------------------- sharded training (FSDP2)
# Sharded training (FSDP2): the U-Net's weights, gradients, optimizer state and EMA split over the ranks.
#
#     torchrun --nproc_per_node 4 train.py --data=videos --init=model.ckpt --shard=true
#     python train.py --data=videos --init=model.ckpt --shard=true --offload=true     # one 24 GB GPU
#
# Under DDP every rank holds all of the trainable state: fp32 weights (4 bytes a parameter), gradients (4), AdamW's
# two moments (8) and the EMA (4), 28 GB for VideoCrafter2's 1.41 B-parameter U-Net. `shard_model` makes every U-Net
# block (model.Stage) one unit of torch.distributed.fsdp.fully_shard and the rest of the trainable parameters (the
# time and fps embeddings, the output layer, a trainable text encoder) the root unit, so each rank keeps 1 / world of
# each parameter (dim-0 shards, DTensors). A unit's weights are all-gathered just before its forward (in bf16 on a GPU
# run) and again for its backward, then freed; its gradients are reduce-scattered (in fp32) and averaged over the
# ranks, as DDP averages them. The frozen kl-f8 autoencoder and OpenCLIP text encoder are not sharded: every rank keeps
# them whole. With offload the shards live in CPU memory and AdamW steps there (FSDP2's CPUOffloadPolicy).
#
# Data flow (train.py): MotifModel -> shard_model -> AdamW over the sharded parameters, EMA = a clone of each shard
# (so no rank ever holds a full EMA); the step runs as under DDP, except that gradients are reduce-scattered after
# every micro-batch (an unsynced backward would hold whole, unsharded gradients). A checkpoint stays the plain file
# an unsharded run writes : `gather_state` gathers the weights, AdamW's state and the EMA onto rank 0's
# CPU memory, with AdamW's state keyed by parameter index as `optimizer.state_dict()` keys it; `local_optimizer_state`
# and `local_part` split such a file's state over any number of ranks. So sample.py, demo/bench.py and --resume read it
# whatever world size or sharding wrote it, and a run can resume sharded or not, on any number of ranks.

def shard_model(model: nn.Module, device, world, bf16=False, offload=False) -> nn.Module:
    """Shard `model`'s trainable parameters over `world` ranks, in place: one FSDP2 unit per U-Net block (Stage),
    the other trainable parameters in the root unit, frozen parameters left whole. bf16: weights gathered in bf16
    for compute (autocast still decides each op's precision), gradients reduced in fp32. offload: shards in CPU memory.
    Needs the process group (of any size, 1 included). Returns the model."""
    if "ignored_params" not in inspect.signature(fully_shard).parameters:  # the frozen encoders stay whole
        raise ValueError(f"sharded training needs torch 2.7 or newer (FSDP2's ignored_params); this is {torch.__version__}")
    if dist.get_backend() == "gloo" and not gloo_averages():
        raise ValueError(f"torch {torch.__version__}'s gloo sums where FSDP2 asks for the mean of the gradients: "
                         "sharded training on the CPU needs a newer torch (2.14 checked)")
    # the U-Net never changes a unit's output in place, which is what FSDP2's warning about returned views guards
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    options = {"mesh": init_device_mesh(device.type, (world,)),
               "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                 cast_forward_inputs=False) if bf16 else MixedPrecisionPolicy(),
               "offload_policy": CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()}
    for module in model.modules():
        if isinstance(module, Stage):
            fully_shard(module, **options)
    frozen = {p for p in model.parameters() if not p.requires_grad}
    fully_shard(model, ignored_params=frozen or None, **options)
    return model


def gloo_averages() -> bool:
    """Whether gloo's reduce-scatter averages when asked to: FSDP2 averages gradients with ReduceOp.AVG, which
    torch 2.7's gloo silently sums (every gradient world times too large). A collective: every rank calls it."""
    world = dist.get_world_size()
    out = torch.empty(1)
    reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)  # renamed in torch 2.14
    reduce_scatter(out, torch.ones(world), op=dist.ReduceOp.AVG)
    return out.item() == 1


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly sharded) tensor that this rank holds."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of the whole tensor `full` that this rank keeps for `like` (a DTensor: its shard, cut locally with no
    communication; a plain tensor: all of it), on like's device."""
    full = full.to(local(like).device)
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


GATHER_BUCKET = 2**26  # elements of whole tensors gathered by one collective (256 MB in fp32): the memory it takes


def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer, ema: dict, master: bool, device) -> dict:
    """A sharded model's {"model", "optimizer", "ema"} as an unsharded run would save them, whole, in CPU memory on
    rank 0 (the master); other ranks get {}. A collective: every rank calls it. "optimizer" is optimizer.state_dict():
    keyed by parameter index, which adamw's groups keep the unsharded run's."""
    weights, adamw = model.state_dict(), optimizer.state_dict()  # DTensors where sharded
    parts = [weights, ema, *adamw["state"].values()]  # dicts of tensors; AdamW's: one per parameter
    whole = iter(gather_whole([tensor for part in parts for tensor in part.values()], master, device))
    if not master:
        return {}
    weights, ema, *states = [{key: next(whole) for key in part} for part in parts]
    return {"model": weights, "optimizer": {"state": dict(zip(adamw["state"], states)),
                                            "param_groups": adamw["param_groups"]}, "ema": ema}


def gather_whole(tensors: list, master: bool, device) -> list:
    """Each of `tensors` whole, in CPU memory on rank 0 ([] on the others): a DTensor's dim-0 shards gathered, a plain
    tensor as it is. Consecutive DTensors of one dtype travel together, up to GATHER_BUCKET elements a collective: one
    collective per tensor would be about 5,900 a checkpoint for the weights, two moments and EMA of the 1,484 trainable
    tensors of VideoCrafter2's layout. A collective: every rank calls it with the same tensors."""
    groups, size = [], 0  # runs of DTensors to gather together, and single plain tensors
    for tensor in tensors:
        sharded = isinstance(tensor, DTensor)
        if sharded and tensor.placements != (Shard(0),):
            raise ValueError(f"cannot gather a DTensor placed {tensor.placements}: gather_whole takes dim-0 shards")
        if (sharded and groups and isinstance(groups[-1][0], DTensor) and groups[-1][0].dtype == tensor.dtype
                and size + tensor.numel() <= GATHER_BUCKET):
            groups[-1].append(tensor)
            size += tensor.numel()
        else:
            groups.append([tensor])
            size = tensor.numel()
    gathered = []
    for group in groups:
        if isinstance(group[0], DTensor):
            gathered += gather_shards(group, master, device)
        elif master:
            gathered.append(group[0].cpu())
    return gathered


def gather_shards(tensors: list, master: bool, device) -> list:
    """DTensors of one dtype, each sharded on dim 0 over all ranks, made whole by one all-gather of every rank's shards
    laid end to end: on rank 0 in CPU memory, [] on the others."""
    world, rank = dist.get_world_size(), dist.get_rank()
    rows = [shard_rows(t.shape[0], world) for t in tensors]  # rows[i][r]: rank r's rows of tensor i
    widths = [math.prod(t.shape[1:]) for t in tensors]
    sizes = [[n[r] * w for n, w in zip(rows, widths)] for r in range(world)]  # sizes[r][i]: rank r's elements of it
    mine = torch.cat([local(t).reshape(-1) for t in tensors]).to(device)  # (sum(sizes[rank]),)
    if mine.numel() != sum(sizes[rank]):
        raise ValueError("a parameter's shards are not the dim-0 chunks FSDP2 makes: cannot gather the checkpoint")
    longest = max(map(sum, sizes))
    everyone = torch.empty(world * longest, dtype=mine.dtype, device=device)  # (world * longest,)
    all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)  # renamed in torch 2.14
    all_gather(everyone, torch.cat([mine, mine.new_zeros(longest - mine.numel())]))
    if not master:
        return []
    by_rank = [row[:sum(sizes[r])].split(sizes[r]) for r, row in enumerate(everyone.cpu().view(world, longest))]
    return [torch.cat([by_rank[r][i] for r in range(world)]).view(t.shape) for i, t in enumerate(tensors)]


def shard_rows(rows: int, world: int) -> list:
    """How many of a dim-0-sharded tensor's `rows` each rank holds: torch.chunk's split, ranks past the last chunk
    holding none (FSDP2's and DTensor's Shard(0))."""
    chunk = -(-rows // world)
    return [max(0, min(chunk, rows - r * chunk)) for r in range(world)]


def local_optimizer_state(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """An unsharded optimizer.state_dict() (parameters by index; from a checkpoint written by any world size, sharded
    or not) with each tensor of its parameter's shape (AdamW's moments) cut to this rank's shard of that parameter, for
    optimizer.load_state_dict. Cut locally, no communication. A state of other parameters is returned as it is
    (loading it then fails)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(not 0 <= i < len(params) for i in saved["state"]):
        return saved
    return {**saved, "state": {i: {key: local_part(value, params[i]) if value.shape == params[i].shape else value
                                   for key, value in state.items()} for i, state in saved["state"].items()}}


# ----------------------------------------------------------------------------- checkpoints
# Each file is written atomically (write_atomically), so a run killed at any moment leaves the previous checkpoint
# and `latest` pointer intact (model.py reads them: load_checkpoint).

def save_checkpoint(out_dir, state, keep):
    """Write ckpt_STEP.pt, point `latest` at it, then delete all but the newest `keep`. Only checkpoints of lower steps
    than this one are pruned (a higher-numbered file is another run's, or a branch this run resumed before), and never
    the one `latest` names. The oldest go before the write, so that the disk holds `keep` files at once, not keep + 1
    (a vc2 checkpoint is about 24 GB); the newest stays until the new one is in, whatever `keep`."""
    out_dir = Path(out_dir)
    path = out_dir / f"ckpt_{state['step']:07d}.pt"
    prune(out_dir, state["step"], max(keep - 1, 1))
    write_atomically(path, lambda f: torch.save(state, f))
    write_atomically(out_dir / "latest", lambda f: f.write(path.name.encode() + b"\n"))
    prune(out_dir, state["step"], keep - 1)
    return path


def prune(out_dir, step, keep):
    """Delete out_dir's checkpoints of steps below `step` but the newest `keep` of them; never the one `latest` names."""
    pointer = out_dir / "latest"
    named = pointer.read_text().strip() if pointer.is_file() else None
    steps = {p: int(p.stem[5:]) for p in out_dir.glob("ckpt_*.pt") if p.stem[5:].isdigit()}
    older = sorted((n, p) for p, n in steps.items() if n < step)
    for _, old in older[:max(len(older) - keep, 0)]:
        if old.name != named:
            old.unlink()


# ----------------------------------------------------------------------------- processes: the process group, peak FLOP/s and memory

PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)  # rank 0 saves a vc2 checkpoint and samples validation clips while
# the other ranks wait at the next collective: NCCL's watchdog would abort them after its default 10 minutes


def setup_distributed(device="auto", shard=False, offload=False):
    """(rank, world size, device): one process, or one of torchrun's (RANK / LOCAL_RANK / WORLD_SIZE; the GPU from
    LOCAL_RANK). A sharded run has a process group even alone (FSDP2 needs one); with offload, gloo carries what is
    in CPU memory. train.py and tools/memory.py set up their processes here."""
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    device = pick_device(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 or shard:
        backend = ("cuda:nccl,cpu:gloo" if offload else "nccl") if device.type == "cuda" else "gloo"
        alone = {"store": dist.HashStore(), "rank": 0, "world_size": 1} if "MASTER_ADDR" not in os.environ else {}
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None,
                                timeout=PROCESS_GROUP_TIMEOUT, **alone)
    return rank, world, device


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, for MFU


def peak_bf16_flops(device):
    """The dense bf16 peak of the GPU `device` is, for MFU (None on CPU or an unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def peak_memory_gb(device):
    """The most memory this process has held: CUDA max allocated on a GPU, else peak RSS (VmHWM on Linux, which,
    unlike ru_maxrss, does not carry a parent's peak across fork and exec)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2 ** 20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** (20 if sys.platform == "linux" else 30)


def any_rank(flag, world, device):
    """True on every rank if `flag` is true on any: ranks decide together to skip a step or to stop."""
    if world == 1:
        return bool(flag)
    flag = torch.tensor([float(flag)], device=device)
    dist.all_reduce(flag)
    return flag.item() > 0


def from_rank_0(value, world):
    """Rank 0's `value` (any picklable object) on every rank."""
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def first_error(message, world):
    """Each rank's error message (or None) -> the lowest rank's, on every rank: they fail together, none waits."""
    if world == 1:
        return message
    messages = [None] * world
    dist.all_gather_object(messages, message)
    return next((m for m in messages if m), None)


def ignore_stop_signals(worker_id):
    """A data loader worker leaves SIGTERM and SIGUSR1 to its training process: a scheduler signals the whole
    process group, and a worker that died of it first would stop the run before it saves. The workers end with
    the training process."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def catch_stop_signals():
    """SIGTERM (schedulers, preemption) or SIGUSR1 -> a list that gets the signal: the loop finishes its step,
    saves and exits cleanly. Installed first thing, so a signal during start-up is not lost either."""
    received = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda number, frame: received.append(number))
    return received


def main(argv=None):
    try:
        train(load_config(sys.argv[1:] if argv is None else argv))
    except (ValueError, ImportError, OSError, TrainingStopped) as e:
        fail(e)


if __name__ == "__main__":
    main()
