"""Sharded training (FSDP2): the U-Net's weights, gradients, optimizer state and EMA split over the ranks.

    torchrun --nproc_per_node 4 train.py --data=videos --init=model.ckpt --shard=true
    python train.py --data=videos --init=model.ckpt --shard=true --offload=true     # one 24 GB GPU

Under DDP every rank holds all of the trainable state: fp32 weights (4 bytes a parameter), gradients (4), AdamW's
two moments (8) and the EMA (4), 28 GB for VideoCrafter2's 1.41 B-parameter U-Net. `shard_model` makes every U-Net
block (unet.Stage) one unit of torch.distributed.fsdp.fully_shard and the rest of the trainable parameters (the
time and fps embeddings, the output layer, a trainable text encoder) the root unit, so each rank keeps 1 / world of
each parameter (dim-0 shards, DTensors). A unit's weights are all-gathered just before its forward (in bf16 on a GPU
run) and again for its backward, then freed; its gradients are reduce-scattered (in fp32) and averaged over the
ranks, as DDP averages them. The frozen kl-f8 autoencoder and OpenCLIP text encoder are not sharded: every rank keeps
them whole. With offload the shards live in CPU memory and AdamW steps there (FSDP2's CPUOffloadPolicy).

Data flow (train.py): MotifModel -> shard_model -> AdamW over the sharded parameters, EMA = a clone of each shard
(so no rank ever holds a full EMA); the step runs as under DDP, except that gradients are reduce-scattered after
every micro-batch (an unsynced backward would hold whole, unsharded gradients). A checkpoint stays the plain file
an unsharded run writes (checkpoint.py): `gather_state` gathers the weights, AdamW's state and the EMA onto rank 0's
CPU memory, with AdamW's state keyed by parameter index as `optimizer.state_dict()` keys it; `load_optimizer_state`
and `local_part` split such a file's state over any number of ranks. So sample.py, eval.py and --resume read it
whatever world size or sharding wrote it, and a run can resume sharded or not, on any number of ranks.
"""
import warnings

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from unet import Stage


def shard_model(model: nn.Module, device, world, bf16=False, offload=False) -> nn.Module:
    """Shard `model`'s trainable parameters over `world` ranks, in place: one FSDP2 unit per U-Net block (Stage),
    the other trainable parameters in the root unit, frozen parameters left whole. bf16: weights gathered in bf16
    for compute (autocast still decides each op's precision), gradients reduced in fp32. offload: shards in CPU memory.
    Needs the process group (of any size, 1 included). Returns the model."""
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


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value, gathered on every rank (a collective: every rank calls it); other tensors as they are."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


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


def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer, ema: dict, master: bool) -> dict:
    """A sharded model's {"model", "optimizer", "ema"} as an unsharded run would save them, whole, in CPU memory on
    rank 0 (the master); other ranks get {}. A collective: every rank calls it. "optimizer" is keyed by parameter index,
    as optimizer.state_dict() of an unsharded AdamW over the same trainable parameters."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)  # {name: tensor} on rank 0, {} elsewhere
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    shadows = {}
    for name, shadow in ema.items():  # one parameter at a time: no rank holds more than one whole EMA tensor on device
        whole = full_value(shadow)
        if master:
            shadows[name] = whole.cpu()
    if not master:
        return {}
    index = {name: i for i, name in enumerate(trainable_names(model))}
    optimizer_state = {"state": {index[name]: state for name, state in by_name["state"].items()},
                       "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                                        for group in by_name["param_groups"]]}
    return {"model": weights, "optimizer": optimizer_state, "ema": shadows}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an unsharded optimizer.state_dict() (parameters by index; from a checkpoint written by any world size,
    sharded or not) into the optimizer of a sharded model: each rank keeps its shards. Every rank calls it with the
    whole state."""
    names = trainable_names(model)
    try:
        by_name = {"state": {names[i]: value for i, value in state["state"].items()},
                   "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                    for group in state["param_groups"]]}
    except (IndexError, KeyError, TypeError):
        raise ValueError("the checkpoint's optimizer state does not fit this model's trainable parameters") from None
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):  # as saved: it makes betas a list
        group.update({key: value for key, value in saved.items() if key != "params"})


def trainable_names(model: nn.Module) -> list:
    """The trainable parameters' names in the order train.py gives them to AdamW (the optimizer's indices)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]
