"""Memory per GPU: what a training step of the U-Net holds, measured per rank, and the full recipe's table computed
from the measured figures (README, "Memory per GPU").

    torchrun --nproc_per_node 4 -m tools.memory --what states --size bench --parallel shard   # per rank, any world size
    python -m tools.memory --what activations --size vc2 --frames 2 --latent 40x64 --dtype bf16 --checkpointing
    python -m tools.memory --what table                                                       # from out/memory/*.json

--what states runs --steps training steps of the U-Net as train.py does them (random inputs as bench.py's, autocast
forward, train.py's loss, backward, gradient clipping, fused AdamW, EMA) under DDP, sharded (train.py) or sharded and
offloaded, and reports per rank the bytes of its weights, gradients, AdamW state and EMA (counted from the tensors it
holds: under sharding, its shards), its peak memory (CUDA max allocated, or on CPU the peak RSS and the part of it
above the process's start-up), and the time of the first step (a sharded run sets up its DTensor operations there)
and the median of the others.
--what activations measures what a forward + backward with gradient checkpointing holds above the weights, per
micro-batch: gradients are dropped as they are produced and autocast's cache of bf16 weight copies is off, so the
peak above the weights is the activations (and the temporaries of the largest block). It also measures, once with the
cache on, what autocast's bf16 copies of the fp32 weights add (a DDP run has them until its forward ends).
--what table lists the states runs, takes the bytes per parameter of each kind of state from them and the vc2
activations from the activations runs (bf16), and computes the vc2 rows: DDP and sharded over 1-8 GPUs, offloaded on
one (compute_table says how each column is obtained).
On CPU, bf16 autocast runs GroupNorm and LayerNorm in fp32 here, as CUDA's autocast does (the CPU's keeps them in
bf16): the activations measured are a GPU run's, as far as a CPU can tell.
"""
import argparse
import dataclasses
import json
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import ctypes
import ctypes.util
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from data import fail, write_atomically
from model import ModelConfig, MotifModel, Stage, autocast, build_unet, pick_device
from tools.bench import SIZES, make_inputs, parse_hw
from train import (Config, TrainState, adamw, local, loss_backward, peak_memory_gb, setup_distributed, shard_model,
                   update)

GIB = 2 ** 30
REGISTRATIONS = []


@dataclass
class Options:
    what: str = "states"  # states | activations | table
    size: str = "bench"  # a bench.py size (model.SIZES and "bench")
    frames: int = 8
    latent: str = "16x16"  # latent height x width
    batch: int = 1  # clips per rank (micro-batch)
    dtype: str = "fp32"  # fp32 | bf16 (autocast around the forward, as train.py)
    checkpointing: bool = True
    parallel: str = "ddp"  # states: ddp | shard | offload
    steps: int = 3  # states: training steps (the first is not timed)
    device: str = "auto"
    context_len: int = 77  # tokens of the random text context
    out: str = "out/memory"  # the folder of results (one JSON per run), read by --what table
    seed: int = 0


def track_cpu_memory_exactly():
    """Make the resident set follow the live tensors: glibc's malloc keeps freed blocks of up to 32 MiB in its heap
    (still resident) once it has raised its mmap threshold, so a second pass reuses them unseen. With the threshold
    fixed at 64 KiB (mallopt M_MMAP_THRESHOLD) every larger block is mapped on its own and unmapped when freed."""
    libc = ctypes.util.find_library("c")
    if not libc or not ctypes.CDLL(libc).mallopt(-3, 64 * 1024):  # -3: M_MMAP_THRESHOLD
        raise ValueError("CPU memory figures need glibc (Linux): mallopt(M_MMAP_THRESHOLD) is not available")


def autocast_norms_in_fp32():
    """Under autocast on the CPU, run GroupNorm and LayerNorm in fp32, as CUDA's autocast runs them (the CPU's keeps
    them in bf16), so that the activations measured on a CPU are those of a GPU run: fp32 norm outputs."""
    library = torch.library.Library("aten", "IMPL")

    def in_fp32(op):
        def kernel(*args, **kwargs):
            with torch.autocast("cpu", enabled=False):
                return op(*[a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args], **kwargs)
        return kernel

    for name in ("group_norm", "layer_norm"):
        library.impl(name, in_fp32(getattr(torch.ops.aten, name).default), "AutocastCPU")
    REGISTRATIONS.append(library)  # a registration lasts as long as its Library object


def rss_gib(field="VmRSS"):
    """This process's resident memory (VmRSS) or its peak (VmHWM), GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2 ** 20
    raise ValueError("peak memory on CPU needs Linux's /proc/self/status")


def reset_peak(device):
    """Start a new peak: CUDA's max allocated, or on Linux the peak RSS (echo 5 > /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")


def tensor_gib(tensors):
    """GiB of the tensors this rank holds (a sharded tensor: its shard)."""
    return sum(local(t).numel() * local(t).element_size() for t in tensors) / GIB


def run_name(opts, world):
    latent = "x".join(str(s) for s in parse_hw(opts.latent, "--latent"))
    mode = f"_{opts.parallel}{world}" if opts.what == "states" else ""
    return f"{opts.what}_{opts.size}{mode}_{opts.frames}x{latent}_b{opts.batch}_{opts.dtype}"


def measure_states(opts, device):
    """Train --steps steps (DDP, sharded or offloaded) and count what each rank holds. Returns rank 0's report of
    every rank ({} on the other ranks)."""
    rank, world, device = setup_distributed(device.type, shard=opts.parallel != "ddp", offload=opts.parallel == "offload")
    start_gib = rss_gib() if device.type == "cpu" else 0.0
    torch.manual_seed(opts.seed)
    cfg = replace(SIZES[opts.size], gradient_checkpointing=opts.checkpointing)
    unet = build_unet(cfg).to(device).train()
    params = sum(p.numel() for p in unet.parameters())
    if opts.parallel == "ddp":
        wrapped = DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None,
                                          gradient_as_bucket_view=True) if world > 1 else unet
    else:
        wrapped = shard_model(unet, device, world, bf16=opts.dtype == "bf16", offload=opts.parallel == "offload")
    optimizer = adamw(unet.parameters(), lr=1e-5, weight_decay=0.01)
    ema = {name: p.detach().clone().float() for name, p in unet.named_parameters()}
    state = TrainState(Config(), unet, wrapped, optimizer, ema, autocast(device, opts.dtype == "bf16"), device, world,
                       rank)
    inputs = make_inputs(opts, cfg, device, opts.seed + rank)
    grads = []  # the gradients of the last step, counted before update() drops them
    times = []
    for step in range(opts.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        with state.autocast:  # train.py's step: the forward under autocast, loss_backward, then update()
            v_hat = wrapped(inputs["x"], inputs["t"], inputs["context"], inputs["fps"])
        losses = loss_backward(v_hat, inputs["v"], inputs["heatmap"], state.cfg)
        grads = [p.grad for p in unet.parameters() if p.grad is not None]
        update(state, losses, step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    optimizer_state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    report = {"rank": rank, "weights_gib": tensor_gib(unet.parameters()), "gradients_gib": tensor_gib(grads),
              "adamw_gib": tensor_gib(optimizer_state), "ema_gib": tensor_gib(ema.values()),
              "peak_gib": peak_memory_gb(device), "start_gib": start_gib, "first_step_s": times[0],
              "step_s": statistics.median(times[1:] or times)}
    reports = [report]
    if dist.is_initialized():
        reports = [None] * world
        dist.all_gather_object(reports, report)
        dist.destroy_process_group()
    if rank:
        return {}
    return {"params": params, "world": world, "ranks": reports}


def measure_activations(opts, device):
    """Peak memory of a forward + backward above the weights, gradients dropped as they come, autocast's weight cache
    off; then, with bf16, what the cache adds. One process."""
    cfg = replace(SIZES[opts.size], gradient_checkpointing=opts.checkpointing)
    unet = build_unet(cfg).to(device).train()
    for p in unet.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    inputs = make_inputs(opts, cfg, device, opts.seed)

    def peak_above_weights(cache):
        precision = autocast(device, opts.dtype == "bf16", cache)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else rss_gib()
        reset_peak(device)
        with precision:
            v_hat = unet(inputs["x"], inputs["t"], inputs["context"], inputs["fps"])
        loss_backward(v_hat, inputs["v"], inputs["heatmap"], Config())
        return peak_memory_gb(device) - before

    peak_above_weights(False)  # warm-up: the allocator's pools and PyTorch's one-time buffers
    height, width = parse_hw(opts.latent, "--latent")
    report = {"params": sum(p.numel() for p in unet.parameters()), "voxels": opts.frames * height * width,
              "activations_gib": peak_above_weights(False)}
    if opts.dtype == "bf16":
        report["autocast_cache_gib"] = peak_above_weights(True) - report["activations_gib"]
    return report


# ----------------------------------------------------------------------------- the table

RECIPE = {"frames": 16, "latent": (40, 64)}  # 320x512 frames through the kl-f8 autoencoder
GPUS = (1, 2, 4, 8)
MICRO_BATCHES = (1, 2, 4, 8)


def recipe_counts():
    """Parameters of the full recipe, counted on the meta device: the trainable U-Net, the frozen text encoder and
    autoencoder, and the largest FSDP unit (U-Net block)."""
    with torch.device("meta"):
        model = MotifModel(ModelConfig(size="vc2", text_encoder="openclip", autoencoder="kl-f8"))
    blocks = [sum(p.numel() for p in m.parameters()) for m in model.unet.modules() if isinstance(m, Stage)]
    return {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad), "largest_block": max(blocks)}


def load_results(folder):
    """The states runs and the vc2 bf16 activations runs in `folder`."""
    results = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]
    states = [r for r in results if r["options"]["what"] == "states"]
    activations = [r for r in results if r["options"]["what"] == "activations" and r["options"]["size"] == "vc2"
                   and r["options"]["dtype"] == "bf16"]
    if not states or len(activations) < 2:
        raise ValueError(f"{folder}: the table needs states runs and at least two vc2 bf16 activations runs "
                         f"(found {len(states)} and {len(activations)}); see memory.py's docstring")
    return states, activations


def bytes_per_parameter(states):
    """Bytes per parameter of each kind of state, from the states runs: a DDP rank's, or the sum over a sharded run's
    ranks (sharding splits the state, it should not add to it); the largest over the runs."""
    kinds = ("weights", "gradients", "adamw", "ema")
    per_run = []
    for run in states:
        r = run["result"]
        ranks = r["ranks"] if run["options"]["parallel"] != "ddp" else r["ranks"][:1]
        per_run.append({k: sum(rank[f"{k}_gib"] for rank in ranks) * GIB / r["params"] for k in kinds})
    return {k: max(run[k] for run in per_run) for k in kinds}


def compute_table(folder):
    """The vc2 rows, GiB per GPU, from the measured figures in `folder` and parameter counts:
    weights, gradients, AdamW, EMA = bytes per parameter (states runs) x 1.41 B / GPUs (sharded) or / 1 (DDP), on the
    GPU unless offloaded (then in CPU memory); frozen = the fp32 OpenCLIP text encoder and kl-f8 autoencoder, whole on
    every GPU; activations = the peak above the weights of the measured vc2 run with the most latent voxels (clips x
    frames x latent pixels), moved along the line through the two largest runs to b clips of 16 x 40 x 64 (the peak
    grows faster than linearly at small sizes, where a block's constant part decides it; the two largest runs give
    the slope where the activations do); extra, DDP = what autocast's cache of bf16 weight copies adds to the peak of
    the largest run (measured); extra, sharded = FSDP2's buffers for the largest block, computed: its bf16 weights and
    the next block's (prefetch), its bf16 gradients and their fp32 copy for the reduce-scatter, 10 bytes a parameter."""
    states, activations = load_results(folder)
    counts = recipe_counts()
    per_param = bytes_per_parameter(states)
    runs = sorted(activations, key=lambda r: r["result"]["voxels"] * r["options"]["batch"])
    (x1, y1), (x2, y2) = ((r["result"]["voxels"] * r["options"]["batch"], r["result"]["activations_gib"]) for r in runs[-2:])
    slope = (y2 - y1) / (x2 - x1)
    clip_voxels = RECIPE["frames"] * RECIPE["latent"][0] * RECIPE["latent"][1]
    act = {b: y2 + slope * (b * clip_voxels - x2) for b in MICRO_BATCHES}
    ddp_extra = max(0.0, runs[-1]["result"]["autocast_cache_gib"])  # nothing if the backward's peak is higher
    p = counts["trainable"] / GIB
    frozen = 4 * counts["frozen"] / GIB
    working = 10 * counts["largest_block"] / GIB
    rows = []
    for mode, gpus in [("DDP", n) for n in GPUS] + [("sharded", n) for n in GPUS] + [("sharded + offload", 1)]:
        split, on_gpu = (1 if mode == "DDP" else gpus), "offload" not in mode
        row = {"mode": mode, "gpus": gpus, **{k: on_gpu * v * p / split for k, v in per_param.items()},
               "frozen": frozen, "extra": ddp_extra if mode == "DDP" else working, "activations": act,
               "cpu": (not on_gpu) * sum(per_param.values()) * p}
        fixed = sum(row[k] for k in ("weights", "gradients", "adamw", "ema", "frozen", "extra"))
        row["total"] = {b: fixed + a for b, a in act.items()}
        rows.append(row)
    measured = [{"voxels": r["result"]["voxels"] * r["options"]["batch"], "frames": r["options"]["frames"],
                 "latent": r["options"]["latent"], "batch": r["options"]["batch"], "gib": r["result"]["activations_gib"],
                 "autocast_cache_gib": r["result"].get("autocast_cache_gib")} for r in runs]
    return {"states": [measured_row(run) for run in states], "counts": counts, "bytes_per_parameter": per_param,
            "activations": {"measured": measured, "gib_per_voxel": slope, "per_micro_batch_gib": act},
            "ddp_extra_gib": ddp_extra, "fsdp_working_gib": working, "rows": rows}


def measured_row(run):
    """A states run in one line: its mode and world size, rank 0's states (the ranks hold the same to a few elements)
    and the highest peak of its ranks, all GiB."""
    o, r = run["options"], run["result"]
    top = max(r["ranks"], key=lambda rank: rank["peak_gib"])
    return {"size": o["size"], "parallel": o["parallel"], "world": r["world"], "params": r["params"],
            **{k: r["ranks"][0][f"{k}_gib"] for k in ("weights", "gradients", "adamw", "ema")},
            "peak": top["peak_gib"], "above_start": top["peak_gib"] - top["start_gib"],
            "first_step_s": max(rank["first_step_s"] for rank in r["ranks"]),
            "step_s": max(rank["step_s"] for rank in r["ranks"])}


def print_table(table):
    print("measured, GiB per rank   weights  grads  AdamW    EMA  states  peak  above start  first step s  step s")
    for m in sorted(table["states"], key=lambda m: (m["size"], m["parallel"], m["world"])):
        states = m["weights"] + m["gradients"] + m["adamw"] + m["ema"]
        print(f"{m['size']:>7} {m['parallel']:>7} x{m['world']}     {m['weights']:7.3f} {m['gradients']:6.3f} "
              f"{m['adamw']:6.3f} {m['ema']:6.3f} {states:7.3f} {m['peak']:5.2f} {m['above_start']:12.2f} "
              f"{m['first_step_s']:13.1f} {m['step_s']:7.1f}")
    c, a = table["counts"], table["activations"]
    print(f"vc2 U-Net {c['trainable'] / 1e9:.3f} B trainable parameters, frozen encoders {c['frozen'] / 1e6:.1f} M, "
          f"largest block {c['largest_block'] / 1e6:.1f} M")
    print("bytes per parameter (a DDP rank; a sharded run's ranks together): "
          + ", ".join(f"{k} {v:.3f}" for k, v in table["bytes_per_parameter"].items()))
    for m in a["measured"]:
        print(f"  vc2 activations, {m['batch']} x {m['frames']} x {m['latent']} latents ({m['voxels']} voxels): "
              f"{m['gib']:.3f} GiB" + (f"; autocast's cache adds {m['autocast_cache_gib']:.3f}" if m["autocast_cache_gib"]
                                        is not None else ""))
    print(f"activations: {a['gib_per_voxel'] * GIB:.0f} bytes per latent voxel at the largest sizes; extra: DDP "
          f"{table['ddp_extra_gib']:.2f} GiB (measured), sharded {table['fsdp_working_gib']:.2f} GiB (computed)")
    print("GiB per GPU          weights  grads  AdamW   EMA  frozen  extra |  act b=1  b=2   b=4   b=8 | total b=1  b=2   "
          "b=4   b=8")
    for r in table["rows"]:
        print(f"{r['mode']:>17} x{r['gpus']}  {r['weights']:7.2f} {r['gradients']:6.2f} {r['adamw']:6.2f} "
              f"{r['ema']:5.2f} {r['frozen']:7.2f} {r['extra']:6.2f} |  "
              + " ".join(f"{r['activations'][b]:5.1f}" for b in MICRO_BATCHES) + " |     "
              + " ".join(f"{r['total'][b]:5.1f}" for b in MICRO_BATCHES)
              + (f"   (+{r['cpu']:.1f} GiB of CPU memory)" if r["cpu"] else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Options):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), nargs="?", const=True,
                                default=f.default)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)
    opts = Options(**vars(parser.parse_args(argv)))
    try:
        if opts.what == "table":
            table = compute_table(opts.out)
            print_table(table)
            result = table
        else:
            if opts.what not in ("states", "activations") or opts.size not in SIZES or opts.dtype not in ("fp32", "bf16"):
                raise ValueError(f"--what takes states|activations|table, --size one of {', '.join(SIZES)}, --dtype "
                                 f"fp32|bf16 (got {opts.what}, {opts.size}, {opts.dtype})")
            if opts.parallel not in ("ddp", "shard", "offload"):
                raise ValueError(f"--parallel takes ddp, shard or offload, not {opts.parallel!r}")
            device = pick_device(opts.device)
            if device.type == "cpu":
                track_cpu_memory_exactly()
                autocast_norms_in_fp32()
            result = (measure_states if opts.what == "states" else measure_activations)(opts, device)
            if not result:
                return
            print(json.dumps(result, indent=1))
        report = json.dumps({"options": dataclasses.asdict(opts), "torch": torch.__version__, "result": result},
                            indent=1) + "\n"
        path = Path(opts.out) / (f"{run_name(opts, result.get('world', 1))}.json" if opts.what != "table" else "table.json")
        write_atomically(path, lambda f: f.write(report.encode()))
        print(f"wrote {path}")
    except ValueError as e:
        fail(e)


if __name__ == "__main__":
    main()
