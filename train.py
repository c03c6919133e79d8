"""Train a text-image-to-video model with the Motion Focal Loss.

    python train.py --preset shapes                      # CPU demo on built-in synthetic videos
    python train.py --data=path/to/videos                # the paper recipe on your videos
    torchrun --nproc_per_node 8 train.py --data=videos   # the same on 8 GPUs

One process or many (torchrun sets RANK / LOCAL_RANK / WORLD_SIZE): each step draws the global
batch's sample indices step*B .. step*B+B-1; each rank takes a disjoint slice, and every sample's
noise, timestep and text dropout come from a generator seeded by (seed, step, sample index), so the
maths of a run does not depend on how many processes share it. Gradients are averaged over the
global batch and synced only on the last micro-step. Rank 0 writes logs and checkpoints.

Data flow of a step (DESIGN.md): clip + heatmap (data.py / flow.py) -> z0 = encode(clip), image
latent = z0 of frame 0 repeated -> z_t, v (loss.py) -> v_hat = model(z_t, z_img, t, text, fps) ->
L = L_diffusion + lambda * L_motif -> AdamW, EMA, checkpoint.
"""
import dataclasses
import difflib
import json
import math
import os
import signal
import sys
import time
import tomllib
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from loss import Schedule, diffusion_loss, latent_heatmap, q_sample, v_target
from model import SIZES, ModelConfig, MotifModel, load_t2v_unet, load_videocrafter2, read_state_dict

CHECKPOINT_KIND = "motif-ti2v"


class TrainingStopped(Exception):
    """The run cannot go on (non-finite training); its message is for the user, the last checkpoint is safe."""


# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    # data: a video folder (captions.csv / captions.jsonl inside) or "shapes" (built-in synthetic videos)
    data: str = ""
    frames: int = 16
    height: int = 320
    width: int = 512
    max_stride: int = 8  # dynamic frame stride: s ~ U[1, max_stride] per clip, fps = source fps / s
    flow_weights: str = ""  # RAFT for videos without cached heatmaps: small | large | a .pth ("" = cache only)
    latents: bool = False  # read the autoencoder's latents from the cache of `python data.py encode` (video folders)
    workers: int = 4  # data loader processes per rank
    # model (model.py)
    model: str = "vc2"  # a size of model.SIZES
    text_encoder: str = "bytes"
    autoencoder: str = "pixel"
    pixel_patch: int = 8  # space-to-depth factor of the pixel autoencoder
    temporal_dropout: float = 0.1
    gradient_checkpointing: bool = True
    init: str = ""  # a text-to-video U-Net checkpoint to start from (new input channels start at zero)
    # objective (loss.py)
    motif_lambda: float = 1.0  # lambda; 0 = plain diffusion loss
    loss_mode: str = "motif"  # motif | inverse (weights static regions: Inv-MotiF)
    text_dropout: float = 0.1  # share of captions replaced by "" (for classifier-free guidance)
    # optimisation
    batch_size: int = 64  # global batch, whatever the number of processes
    micro_batch: int = 8  # clips per process per forward/backward
    lr: float = 5e-5
    warmup_steps: int = 500
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    steps: int = 32000
    # bookkeeping
    out_dir: str = "out/recipe"
    seed: int = 0
    log_every: int = 20
    ckpt_every: int = 1000
    keep_checkpoints: int = 3  # the newest N of out_dir/ckpt_STEP.pt are kept
    resume: str = ""  # "latest" (out_dir/latest, or a fresh start if there is none) or a checkpoint path
    max_bad_steps: int = 20  # stop after this many steps in a row with a non-finite loss or gradient
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32


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
    """Defaults <- --preset NAME (config/NAME.toml) <- --key=value flags, each type-checked."""
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

    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--preset" or arg.startswith("--preset="):
            name = arg.split("=", 1)[1] if "=" in arg else (args.pop(0) if args else "")
            path = PRESET_DIR / f"{name}.toml"
            if not path.is_file():
                presets = sorted(p.stem for p in PRESET_DIR.glob("*.toml"))
                raise ValueError(f"unknown preset {name!r}; presets: {', '.join(presets)}")
            for key, value in tomllib.loads(path.read_text()).items():
                set_value(key, value, path.name)
        elif arg == "--resume":
            values["resume"] = "latest"
        elif arg.startswith("--") and "=" in arg:
            key, text = arg[2:].split("=", 1)
            set_value(key.replace("-", "_"), text, "the command line")
        elif arg.startswith("--") and args and not args[0].startswith("--"):
            set_value(arg[2:].replace("-", "_"), args.pop(0), "the command line")
        else:
            raise ValueError(f"cannot read argument {arg!r}: use --key=value (see the Config class in train.py)")
    return Config(**values)


def check_config(cfg, world_size):
    per_step = cfg.micro_batch * world_size
    if cfg.batch_size % per_step:
        raise ValueError(f"batch_size {cfg.batch_size} does not divide into micro_batch {cfg.micro_batch} "
                         f"x {world_size} processes; pick a batch_size that is a multiple of {per_step}")
    if cfg.model not in SIZES:
        raise ValueError(f"unknown model size {cfg.model!r}; sizes: {', '.join(SIZES)}")
    if cfg.loss_mode not in ("motif", "inverse"):
        raise ValueError(f"loss_mode must be motif or inverse, not {cfg.loss_mode!r}")
    if cfg.frames < 2:
        raise ValueError(f"frames must be at least 2 (motion needs two frames), not {cfg.frames}")
    if cfg.dtype not in ("auto", "bf16", "fp32") or cfg.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto|cpu|cuda and dtype auto|bf16|fp32 (got {cfg.device}, {cfg.dtype})")
    if not cfg.data:
        raise ValueError("no training data: pass --data=DIR (a folder of videos with captions.csv or "
                         "captions.jsonl, see README) or try the built-in demo with --preset shapes")


def model_config(cfg: Config) -> ModelConfig:
    return ModelConfig(size=cfg.model, text_encoder=cfg.text_encoder, autoencoder=cfg.autoencoder,
                       pixel_patch=cfg.pixel_patch, temporal_dropout=cfg.temporal_dropout,
                       gradient_checkpointing=cfg.gradient_checkpointing)


# ----------------------------------------------------------------------------- data

def build_dataset(cfg: Config, model: MotifModel, device):
    factor = model.resolution_factor
    if cfg.height % factor or cfg.width % factor:
        raise ValueError(f"height and width must be multiples of {factor} for this model "
                         f"(got {cfg.height}x{cfg.width})")
    import data
    if cfg.data == "shapes":
        if cfg.height != cfg.width:
            raise ValueError(f"shapes videos are square: set height = width (got {cfg.height}x{cfg.width})")
        return data.ShapesDataset("train", size=cfg.height, frames=cfg.frames, max_stride=cfg.max_stride, seed=cfg.seed)
    if not Path(cfg.data).is_dir():
        raise ValueError(f"--data={cfg.data}: no such folder (give a folder of videos with captions.csv "
                         "or captions.jsonl, or use --preset shapes)")
    if cfg.latents and (cfg.flow_weights or cfg.autoencoder == "pixel"):
        raise ValueError("--latents reads cached kl-f8 latents and cached heatmaps: it goes with --autoencoder=kl-f8 "
                         "and without --flow_weights")
    raft = None
    if cfg.flow_weights:
        from flow import RAFT
        raft = RAFT(cfg.flow_weights, device=device)
    return data.VideoFolderDataset(cfg.data, frames=cfg.frames, size=(cfg.height, cfg.width),
                                   max_stride=cfg.max_stride, seed=cfg.seed, raft=raft,
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


def sample_seed(seed, step, index):
    """A 63-bit seed for one sample of one step; independent of the rank that handles it."""
    return ((seed * 1_000_003 + step) * 1_000_033 + index) % (2 ** 63)


def draw_randomness(cfg, step, indices, latent_shape, num_timesteps):
    """Per sample: timestep, noise and text dropout from its own seeded generator."""
    t, noise, drop = [], [], []
    for index in indices:
        g = torch.Generator().manual_seed(sample_seed(cfg.seed, step, index))
        t.append(torch.randint(0, num_timesteps, (1,), generator=g))
        drop.append(torch.rand(1, generator=g).item() < cfg.text_dropout)
        noise.append(torch.randn(latent_shape, generator=g))
    return torch.cat(t), torch.stack(noise), drop


# ----------------------------------------------------------------------------- checkpoints
# out_dir/ckpt_0001000.pt, ... and out_dir/latest, a one-line text file naming the newest complete
# one. Every file is written to a temporary name, fsynced, then renamed: a run killed at any moment
# leaves the previous checkpoint and pointer intact.

def write_atomically(path, write):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


def save_checkpoint(out_dir, state, keep):
    """Write ckpt_STEP.pt, point `latest` at it, then delete all but the newest `keep`."""
    out_dir = Path(out_dir)
    path = out_dir / f"ckpt_{state['step']:07d}.pt"
    write_atomically(path, lambda f: torch.save(state, f))
    write_atomically(out_dir / "latest", lambda f: f.write(path.name.encode() + b"\n"))
    for old in sorted(out_dir.glob("ckpt_*.pt"))[:-keep]:
        old.unlink()
    return path


def resolve_checkpoint(path):
    """A checkpoint file, or a run folder -> the file its `latest` pointer names."""
    path = Path(path)
    if path.is_dir():
        pointer = path / "latest"
        if not pointer.is_file():
            raise ValueError(f"{path} is a folder without a 'latest' checkpoint pointer (no checkpoint saved there yet)")
        return path / pointer.read_text().strip()
    return path


def load_checkpoint(path):
    """Load a checkpoint of ours (a file or a run folder); a clear error for anything else.
    weights_only=True: a checkpoint is untrusted input and is never allowed to run code."""
    path = resolve_checkpoint(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist" + (" or is a folder" if path.exists() else ""))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, a pickle with code, not a torch file at all
        raise ValueError(f"cannot read checkpoint {path}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{path} is not a MotiF checkpoint written by train.py")
    return ckpt


def init_from(model, path, verbose):
    """--init: VideoCrafter2's model.ckpt (U-Net, KL-f8 autoencoder, OpenCLIP), or a bare text-to-video U-Net
    state dict; either way the new image-latent input channels start at zero."""
    state = read_state_dict(path)
    if any(k.startswith("model.diffusion_model.") for k in state):
        report = load_videocrafter2(model, state)
        if verbose:
            print(f"--init {path}: " + ", ".join(f"{part} {n['loaded']} tensors loaded" + (f", {n['ignored']} ignored"
                                                 if n["ignored"] else "") for part, n in report.items()))
    else:
        load_t2v_unet(model.unet, state)
        if verbose:
            print(f"--init {path}: U-Net loaded, image-latent input channels at zero")


# ----------------------------------------------------------------------------- training

def setup_distributed(cfg):
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device=cuda but no GPU is visible")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return rank, world, device


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def train(cfg: Config):
    # SIGTERM (schedulers, preemption) or SIGUSR1, even while starting up: finish the step, save, exit cleanly on
    # every rank
    stop_signal = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda number, frame: stop_signal.append(number))
    rank, world, device = setup_distributed(cfg)
    check_config(cfg, world)
    master = rank == 0
    out_dir = Path(cfg.out_dir)
    use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    resume = cfg.resume
    if resume == "latest":
        resume = str(out_dir) if (out_dir / "latest").is_file() else ""
        if not resume and master:
            print(f"no checkpoint in {out_dir} yet: starting from step 0")

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = MotifModel(model_config(cfg)).to(device)
    if cfg.init and not resume:  # a checkpoint to resume from holds every weight, --init's included
        init_from(model, cfg.init, master)
    elif not resume and (cfg.autoencoder == "kl-f8" or cfg.text_encoder == "openclip"):
        raise ValueError(f"the {cfg.autoencoder} autoencoder and the {cfg.text_encoder} text encoder are frozen and "
                         "need pretrained weights: pass --init=path/to/VideoCrafter2/model.ckpt (see README), or "
                         "train everything from scratch with --autoencoder=pixel --text_encoder=bytes")
    dataset = build_dataset(cfg, model, device)
    schedule = Schedule(device=device)
    named_trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    trainable = list(named_trainable.values())
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)  # one kernel for all
    ema = {name: p.detach().clone().float() for name, p in named_trainable.items()}  # fp32 shadow weights

    step = 0
    if resume:
        ckpt = load_checkpoint(resume)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError:
            keys = ("model", "text_encoder", "autoencoder", "pixel_patch")
            saved, ours = ({k: c.get(k) for k in keys} for c in (ckpt["config"], asdict(cfg)))
            raise ValueError(f"{resume} holds another model ({saved}) than this config builds ({ours}); "
                             "resume with its settings or start a new out_dir") from None
        optimizer.load_state_dict(ckpt["optimizer"])
        for name, e in ema.items():
            e.copy_(ckpt["ema"][name])
        step = ckpt["step"]
        if master:
            print(f"resumed from {resume} at step {step}")

    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    accum = cfg.batch_size // (cfg.micro_batch * world)
    workers = 0 if cfg.flow_weights else cfg.workers  # on-the-fly RAFT runs on the training device, in this process
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.micro_batch, sampler=StepIndices(cfg, rank, world, step),
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=workers > 0)
    batches = iter(loader)

    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        n_params = sum(p.numel() for p in trainable)
        print(f"training {cfg.model} ({n_params / 1e6:.1f} M trainable parameters) on {cfg.data}: "
              f"{world} process(es) on {device.type}, global batch {cfg.batch_size} = {cfg.micro_batch} x {accum} "
              f"micro-steps x {world}, {'bf16' if use_bf16 else 'fp32'}")
    log_file = open(out_dir / "log.jsonl", "a") if master else None
    flops_per_step, peak_flops = None, None
    if device.type == "cuda":
        peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name(device)), None)

    def save(at_step):
        if not all(torch.isfinite(p).all() for p in trainable):  # never write a broken model over a good one
            raise TrainingStopped(f"non-finite weights at step {at_step}: not saving; the last good checkpoint stays")
        if world > 1:
            dist.barrier()
        if master:
            save_checkpoint(out_dir, {
                "kind": CHECKPOINT_KIND, "step": at_step, "config": asdict(cfg),
                "model": model.state_dict(), "ema": ema, "optimizer": optimizer.state_dict()},
                cfg.keep_checkpoints)
        if world > 1:
            dist.barrier()

    model.train()
    window = {"loss": 0.0, "diffusion": 0.0, "motif": 0.0, "moving": 0.0, "static": 0.0, "n": 0}
    bad_in_a_row, skipped = 0, 0
    timer, clips = time.time(), 0
    bar = tqdm(total=cfg.steps, initial=step, disable=not master, desc="train", dynamic_ncols=True)
    while step < cfg.steps:
        # the global RNG drives only dropout; seed it from (seed, step, rank) so resume is exact
        torch.manual_seed(sample_seed(cfg.seed, step, -1 - rank))
        lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        finite = True
        for micro in range(accum):
            batch = next(batches)
            first = step * cfg.batch_size + (micro * world + rank) * cfg.micro_batch
            indices = range(first, first + cfg.micro_batch)
            heatmap = batch["heatmap"].to(device, non_blocking=True)  # (b, T, H, W)
            fps = batch["fps"].to(device)  # (b,)
            if "latent" in batch:  # cached by `python data.py encode`
                z0 = batch["latent"].to(device, non_blocking=True)  # (b, C, T, h, w)
            else:
                with torch.no_grad(), autocast:
                    z0 = model.encode_video(batch["video"].to(device, non_blocking=True)).float()  # (b, C, T, h, w)
            t, noise, drop = draw_randomness(cfg, step, indices, z0.shape[1:], schedule.num_steps)
            t, noise = t.to(device), noise.to(device)
            captions = ["" if d else c for d, c in zip(drop, batch["caption"])]
            z_t = q_sample(schedule, z0, t, noise)
            v = v_target(schedule, z0, t, noise)
            sync = micro == accum - 1 or world == 1
            flop_counter = None
            if peak_flops and flops_per_step is None:
                from torch.utils.flop_counter import FlopCounterMode
                flop_counter = FlopCounterMode(display=False)
            with (ddp.no_sync() if not sync else nullcontext()), (flop_counter or nullcontext()):
                with autocast:
                    v_hat = ddp(z_t, model.image_latent(z0), t, captions, fps)  # (b, C, T, h, w)
                losses = diffusion_loss(v_hat, v, latent_heatmap(heatmap, z0.shape[-2:]), cfg.motif_lambda, cfg.loss_mode)
                (losses["loss"] / accum).backward()
            if flop_counter is not None:
                flops_per_step = flop_counter.get_total_flops() * accum
            for k in ("loss", "diffusion", "motif", "moving", "static"):
                window[k] += losses[k].item() / accum
            finite = finite and math.isfinite(losses["loss"].item())
        window["n"] += 1
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)  # synced gradients: same on all ranks
        finite = finite and math.isfinite(grad_norm.item())
        if world > 1:  # a rank's non-finite loss skips the step on every rank
            flag = torch.tensor([float(not finite)], device=device)
            dist.all_reduce(flag)
            finite = flag.item() == 0
        if finite:
            optimizer.step()
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.values()), [p.detach().float() for p in trainable], 1 - decay)
            bad_in_a_row = 0
        else:  # a non-finite loss or gradient: skip the update, count it
            skipped += 1
            bad_in_a_row += 1
            if bad_in_a_row >= cfg.max_bad_steps:
                raise TrainingStopped(f"{bad_in_a_row} steps in a row had a non-finite loss or gradient (step {step + 1}); "
                                   f"stopping. Lower lr (now {cfg.lr}) or check the data; the last good checkpoint is kept")
        optimizer.zero_grad(set_to_none=True)
        step += 1
        clips += cfg.batch_size
        bar.update(1)

        if step % cfg.log_every == 0 or step == cfg.steps:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.time() - timer
            n = window.pop("n")
            record = {"step": step, **{k: v / n for k, v in window.items()}, "lr": lr, "grad_norm": grad_norm.item(),
                      "skipped_steps": skipped,
                      "clips_per_s": clips / elapsed, "peak_mem_gb": peak_memory_gb(device)}
            if flops_per_step and peak_flops:
                record["mfu"] = flops_per_step / world * n / elapsed / peak_flops  # per GPU
            if world > 1:  # average the logged numbers over ranks
                numbers = torch.tensor([record[k] for k in ("loss", "diffusion", "motif", "moving", "static")], device=device)
                dist.all_reduce(numbers)
                for k, value in zip(("loss", "diffusion", "motif", "moving", "static"), numbers.tolist()):
                    record[k] = value / world
            if master:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                bar.set_postfix(loss=f"{record['loss']:.4f}", moving=f"{record['moving']:.3f}",
                                static=f"{record['static']:.3f}", clips_s=f"{record['clips_per_s']:.1f}")
                bar.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
            window = {k: 0.0 for k in ("loss", "diffusion", "motif", "moving", "static")} | {"n": 0}
            timer, clips = time.time(), 0
        stopping = bool(stop_signal)
        if world > 1:  # stop together: any rank that got the signal stops them all
            flag = torch.tensor([float(stopping)], device=device)
            dist.all_reduce(flag)
            stopping = flag.item() > 0
        if step % cfg.ckpt_every == 0 or step == cfg.steps or stopping:
            save(step)
        if stopping:
            if master:
                bar.write(f"stop signal: saved step {step} to {out_dir}; continue with --resume")
            break
    bar.close()
    if master:
        log_file.close()
        print(f"done: step {step}, checkpoint {out_dir / (out_dir / 'latest').read_text().strip()}")
    if world > 1:
        dist.destroy_process_group()
    return model


def main(argv=None):
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        train(cfg)
    except (ValueError, ImportError, TrainingStopped) as e:  # the last line: a DataLoader worker's error comes with
        raise SystemExit(f"error: {str(e).strip().splitlines()[-1]}") from None  # the worker's traceback before it
    except OSError as e:  # a full disk, an out_dir that is a file, no permission: the message says which
        raise SystemExit(f"error: {e.strerror or e}: {e.filename or ''}") from None


if __name__ == "__main__":
    main()
