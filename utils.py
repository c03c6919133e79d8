"""What every command shares: the device and the process group, the autocast context, HxW sizes, files written
atomically, peak memory and a GPU's peak FLOP/s.

Library functions in this project raise ValueError for anything a user can get wrong; only a
command's `main` turns it into one line, `error: ...`, and exit status 1 (`fail`).
"""
import os
import resource
import sys
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def pick_device(name="auto"):
    """"auto" (the GPU if there is one, else the CPU), "cpu", "cuda" or "cuda:N" -> torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name}, but no CUDA GPU is visible")
    return torch.device(name)


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


def wants_bf16(dtype, device):
    """A run's `dtype` ("auto": bf16 on a GPU, fp32 on the CPU; "bf16"; "fp32") on `device` -> whether it computes in
    bf16. Training, its validation samples, sample.py, eval.py and prepare.py's latent cache all decide it here."""
    return dtype == "bf16" or (dtype == "auto" and device.type == "cuda")


def autocast(device, bf16, cache=True):
    """The one precision context of a forward: bf16 autocast, or nothing (fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache) if bf16 else nullcontext()


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, for MFU


def peak_bf16_flops(device):
    """The dense bf16 peak of the GPU `device` is, for MFU (None on CPU or an unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def parse_size(text):
    """'320x512' -> (320, 512): height x width, both positive."""
    try:
        height, width = (int(side) for side in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"expected a size HxW like 320x512, got {text!r}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"sizes must be positive, got {text!r}")
    return height, width


def write_atomically(path, write):
    """Call write(file) on a temporary file beside `path`, fsync it, rename it to `path` and fsync the folder:
    a reader (or a run killed at any moment) sees the old file or the new one whole, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


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


def fail(error):
    """A command's way out for a user's mistake: `error: <the message's last line>` on stderr, exit status 1.
    The last line, because an error raised in a DataLoader worker arrives with the worker's traceback before it."""
    if isinstance(error, OSError) and error.strerror:  # a full disk, a folder given as a file, no permission
        raise SystemExit(f"error: {error.strerror}: {error.filename or ''}")
    text = str(error).strip()
    raise SystemExit(f"error: {text.splitlines()[-1] if text else type(error).__name__}")
