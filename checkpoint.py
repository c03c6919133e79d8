"""Checkpoints: ours (written by train.py, read by train.py, sample.py and eval.py) and VideoCrafter2's.

Ours: out_dir/ckpt_0001000.pt, ... and out_dir/latest, a one-line text file naming the newest complete one.
A checkpoint is a plain dict {"kind", "step", "config" (train.py's Config as a dict), "model", "ema",
"optimizer"}; every file is written atomically (utils.write_atomically), so a run killed at any moment
leaves the previous checkpoint and pointer intact. Every torch.load uses weights_only=True: a checkpoint
is untrusted input and is never allowed to run code.

VideoCrafter2's released model.ckpt (--init of the full recipe) holds the U-Net under
`model.diffusion_model.`, the KL-f8 autoencoder under `first_stage_model.` and the OpenCLIP text tower
under `cond_stage_model.`; model.py uses the same names, so they load with no key map. The text-to-video
U-Net has C input channels, ours 2C (x-cat): the C image-latent channels of the first conv start at zero,
so the loaded model computes exactly what it did before.
"""
from pathlib import Path

import torch
import torch.nn as nn

from encoders import KL_SIZES, KLAutoencoder, OpenCLIPTextEncoder
from model import ModelConfig, MotifModel
from unet import UNet
from utils import write_atomically

CHECKPOINT_KIND = "motif-ti2v"


# ----------------------------------------------------------------------------- ours

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
    """Load a checkpoint of ours (a file or a run folder); a clear error for anything else. Memory-mapped: the ranks
    of a resumed run share one copy in the page cache, and each reads only what it uses (a sharded run: its shards)."""
    path = resolve_checkpoint(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist" + (" or is a folder" if path.exists() else ""))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a truncated file, a pickle with code, not a torch file at all
        raise ValueError(f"cannot read checkpoint {path}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{path} is not a MotiF checkpoint written by train.py")
    return ckpt


def load_model(path, device, use_ema=True):
    """The model of a checkpoint, for sampling: (model in eval mode on device, its config dict, its step).
    The EMA weights unless use_ema is False."""
    ckpt = load_checkpoint(path)
    config = ckpt.get("config")
    needed = ("model", "frames", "height", "width")
    if not isinstance(config, dict) or not all(key in config for key in needed):
        raise ValueError(f"{path}: its config lacks {[k for k in needed if k not in (config or {})]}: "
                         "not written by this version of train.py")
    model = MotifModel(ModelConfig.from_run_config(config))
    try:
        model.load_state_dict(ckpt["model"])
        if use_ema:
            unexpected = model.load_state_dict(ckpt["ema"], strict=False).unexpected_keys  # trainable parameters only
            if unexpected:
                raise RuntimeError(f"EMA weights that are not the model's: {unexpected[:2]}")
    except (RuntimeError, KeyError) as e:
        raise ValueError(f"{path}: its weights do not fit the model its config describes "
                         f"({str(e).splitlines()[0][:160]})") from None
    return model.to(device).eval(), config, ckpt["step"]


# ----------------------------------------------------------------------------- state dicts of other code

def read_state_dict(path) -> dict:
    """The state dict in a checkpoint file (bare, or under "state_dict"), wrappers stripped. Read with
    weights_only=True, so a file carrying code is refused, and memory-mapped where the format allows (VideoCrafter2's
    model.ckpt is 5.5 GB). Anything unreadable is a one-line ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files in the legacy (non-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code, a truncated file, not a torch file at all
        raise ValueError(f"cannot read {path}: {str(e).splitlines()[0][:200]}") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors")
    return strip_wrappers(state)


def strip_wrappers(state_dict: dict) -> dict:
    """Drop the `module.` of DistributedDataParallel and the `_orig_mod.` of torch.compile from every key."""
    return {k.replace("_orig_mod.", "").removeprefix("module."): v for k, v in state_dict.items()}


def check_fits(module: nn.Module, state_dict: dict, what: str) -> None:
    """Strict loading's checks, as one line: a ValueError that says how the state dict does not fit."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{what} does not fit this model size: {len(missing)} missing keys (e.g. {missing[:2]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(wrong)} of another shape "
                         f"(e.g. {wrong[:2]})")


def xcat_unet_state(unet: UNet, state_dict: dict) -> dict:
    """A text-to-video U-Net's weights (C input channels) made fit for our x-cat U-Net (2C): the C image-latent
    input channels of the first conv start at zero, so the model computes what it did before. Checked to fit."""
    key = "input_blocks.0.0.weight"
    if key not in state_dict:
        raise ValueError("not a VideoCrafter-style U-Net state dict (no input_blocks.0.0.weight)")
    ours = unet.input_blocks[0][0].weight
    theirs = state_dict[key]  # (C_out, C, 3, 3)
    if theirs.shape[1] * 2 == ours.shape[1] and theirs.shape[0] == ours.shape[0]:
        state_dict = {**state_dict, key: torch.cat([theirs, torch.zeros_like(theirs)], dim=1)}  # (C_out, 2C, 3, 3)
    check_fits(unet, state_dict, "U-Net")
    return state_dict


def load_t2v_unet(unet: UNet, state_dict: dict) -> None:
    """Load a text-to-video U-Net (C input channels) into our x-cat U-Net (2C), new channels at zero.
    Accepts VideoCrafter2's `model.diffusion_model.` prefix and `module.` / `_orig_mod.` wrappers."""
    prefix = "model.diffusion_model."
    state_dict = strip_wrappers(state_dict)
    if any(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    unet.load_state_dict(xcat_unet_state(unet, state_dict))




# ----------------------------------------------------------------------------- VideoCrafter2 (--init)

VIDEOCRAFTER2_PARTS = {"unet": "model.diffusion_model.", "autoencoder": "first_stage_model.",
                       "text_encoder": "cond_stage_model."}


def load_videocrafter2(model: MotifModel, checkpoint: dict) -> dict:
    """Load VideoCrafter2's released text-to-video model.ckpt (or any checkpoint of that layout, possibly inside
    {"state_dict": ...}, with `module.` / `_orig_mod.` wrappers) into `model`, each part strictly:
    model.diffusion_model.* -> the U-Net (its C-channel first conv into our 2C x-cat conv, image-latent channels
    at zero), first_stage_model.* -> the kl-f8 autoencoder, cond_stage_model.* -> the openclip text encoder.
    A part the model does not use (the pixel autoencoder, the bytes text encoder) is ignored, as are the other
    keys (the noise schedule's buffers). Every part is checked before any is loaded: a checkpoint that does not
    fit (missing, unexpected or misshapen keys, or no keys for a part the model needs) raises a one-line
    ValueError with the counts and leaves the model as it was.
    Returns {"unet" | "autoencoder" | "text_encoder" | "other": {"loaded": n, "ignored": n}}, in tensors."""
    state_dict = strip_wrappers(checkpoint.get("state_dict", checkpoint))
    parts = {part: {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
             for part, prefix in VIDEOCRAFTER2_PARTS.items()}
    used = {"unet": True, "autoencoder": isinstance(model.autoencoder, KLAutoencoder),
            "text_encoder": isinstance(model.text_encoder, OpenCLIPTextEncoder)}
    for part, prefix in VIDEOCRAFTER2_PARTS.items():
        if used[part] and not parts[part]:
            raise ValueError(f"the checkpoint has no {prefix}* keys, which this model's {part} needs "
                             f"(is it a VideoCrafter2 checkpoint? model {model.cfg.size}, autoencoder "
                             f"{model.cfg.autoencoder}, text encoder {model.cfg.text_encoder})")
    parts["unet"] = xcat_unet_state(model.unet, parts["unet"])
    for part in ("autoencoder", "text_encoder"):
        if used[part]:
            check_fits(getattr(model, part), parts[part], f"{VIDEOCRAFTER2_PARTS[part]}* ({part})")
    report = {}
    for part, weights in parts.items():
        if used[part]:
            getattr(model, part).load_state_dict(weights)
        report[part] = {"loaded": len(weights), "ignored": 0} if used[part] else {"loaded": 0, "ignored": len(weights)}
    report["other"] = {"loaded": 0, "ignored": len(state_dict) - sum(len(weights) for weights in parts.values())}
    return report


def load_kl_autoencoder(state_dict: dict, size: str = "full") -> KLAutoencoder:
    """The frozen kl-f8 autoencoder from a VideoCrafter2-layout state dict (its first_stage_model.* keys)."""
    prefix = VIDEOCRAFTER2_PARTS["autoencoder"]
    weights = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    autoencoder = KLAutoencoder(KL_SIZES[size])
    check_fits(autoencoder, weights, f"{prefix}* (autoencoder)")
    autoencoder.load_state_dict(weights)
    return autoencoder



def init_from(model: MotifModel, path) -> str:
    """--init: VideoCrafter2's model.ckpt (U-Net, KL-f8 autoencoder, OpenCLIP), or a bare text-to-video U-Net
    state dict; either way the new image-latent input channels start at zero. Returns what was loaded, in words."""
    state = read_state_dict(path)
    if any(k.startswith(VIDEOCRAFTER2_PARTS["unet"]) for k in state):
        report = load_videocrafter2(model, state)
        return f"--init {path}: " + ", ".join(f"{part} {n['loaded']} tensors loaded" + (
            f", {n['ignored']} ignored" if n["ignored"] else "") for part, n in report.items())
    load_t2v_unet(model.unet, state)
    return f"--init {path}: U-Net loaded, image-latent input channels at zero"
