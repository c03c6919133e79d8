"""tools.bench's training step under torch.profiler: where a step's kernel time goes.

    python -m tools.profile_step OUT_DIR --size vc2 --batch 8 --frames 16 --latent 40x64 --dtype bf16 --checkpointing

Takes tools.bench's flags (its train row), runs --warmup steps, then profiles one step and writes OUT_DIR/profile.txt:
the top 20 ops by CUDA time (CPU time on a CPU), and the share of kernel time in matmul, convolution and attention
kernels against the rest, the split that says whether the step is bound by its tensor-core work or by the
elementwise and normalisation kernels around it.
"""
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from model import autocast, pick_device
from tools import bench

# substrings of kernel and op names, lower-cased; the first kind that matches takes the kernel
KINDS = {"attention": ("flash", "fmha", "attention", "sdpa", "softmax"),
         "convolution": ("conv", "cudnn", "winograd", "implicit_gemm", "dgrad", "wgrad"),
         "matmul": ("gemm", "matmul", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "cublas", "cutlass",
                    "xmma", "nvjet")}


def kind_of(name):
    lowered = name.lower()
    return next((kind for kind, marks in KINDS.items() if any(m in lowered for m in marks)), "the rest")


def kernel_shares(events, cuda):
    """{kind: (seconds, share)} of the self time of the kernels (on a CPU: of the ops), by kind of KINDS."""
    if cuda:
        timed = [(e.key, e.self_device_time_total) for e in events if e.device_type == DeviceType.CUDA]
    else:
        timed = [(e.key, e.self_cpu_time_total) for e in events]
    totals = {kind: 0.0 for kind in [*KINDS, "the rest"]}
    for name, microseconds in timed:
        totals[kind_of(name)] += microseconds
    whole = sum(totals.values()) or 1.0
    return {kind: (us / 1e6, us / whole) for kind, us in totals.items()}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    out, flags = Path(argv[0]), argv[1:]
    opts = bench.resolve(bench.Options(**vars(bench.options_parser(__doc__.splitlines()[0]).parse_args(flags))))
    device = pick_device(opts.device)
    cfg = bench.unet_config(opts)
    run = bench.new_run(opts, cfg, "ours", device, autocast(device, opts.dtype == "bf16"))
    inputs = bench.make_inputs(opts, cfg, device, opts.seed)
    for step in range(opts.warmup):  # the optimizer's state and the kernels' autotuning exist before the profile
        bench.training_step(run, inputs, step)
    bench.synchronize(device)
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        bench.training_step(run, inputs, opts.warmup)
        bench.synchronize(device)
    events = prof.key_averages()
    table = events.table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=20)
    shares = kernel_shares(events, cuda)
    lines = [f"one training step of {opts.size}, batch {opts.batch}, {opts.frames} x {opts.latent} latents, "
             f"{opts.dtype}, on {bench.device_name(device)}, torch {torch.__version__}", table,
             f"share of {'kernel' if cuda else 'op'} self time:"]
    lines += [f"  {kind:12s} {seconds:9.4f} s  {share:6.1%}" for kind, (seconds, share) in shares.items()]
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[2:]))
    print(f"wrote {out / 'profile.txt'}")


if __name__ == "__main__":
    main()
