"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the trainer: what is sharded, how a sharded module is read
whole, and the DTensor <-> local-shard conversions the checkpoint format needs.

Under ``--sharding fsdp2`` the trainer itself applies ``fully_shard`` to every module a checkpoint holds (the
student, DMD's fake score network, LCM's EMA target network): each block of a UNet's ``down_blocks`` /
``up_blocks`` and its ``mid_block`` is one FSDP unit, the root holds the rest. Parameters become DTensors sharded
on dim 0 across the ranks; the optimisers and both EMAs (the trainer's student EMA, LCM's target network) are
built over them and update each rank's shard locally (elementwise maths needs no communication).

The frozen teacher is NOT sharded: it has no gradients and no optimiser state (FSDP's main saving), every rank
runs its whole forward on its own batch, and sharding it would add an all-gather per teacher block per call. It
only saves memory once the teacher alone crowds a device (Flux-sized teachers): future work.

The same code path runs on GPUs (NCCL) and on CPU (gloo, tested with two processes); accelerate only provides the
process group, the device and autocast: its own FSDP wrapping (``accelerator.prepare``) is not used, because on CPU
it falls back to DDP.
"""

from __future__ import annotations

import contextlib
import copy

import torch

SHARDING = ("none", "fsdp2")


def is_dtensor(t) -> bool:
    """Whether ``t`` is a torch DTensor (a sharded parameter, gradient or optimiser moment)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view of its storage: writing it writes the parameter); ``t`` otherwise."""
    return t.to_local() if is_dtensor(t) else t


def shard_dim(t) -> int | None:
    """The dimension a DTensor is sharded on (FSDP2: 0), None for a replicated or plain tensor."""
    if not is_dtensor(t):
        return None
    dims = [p.dim for p in t.placements if p.is_shard()]
    return dims[0] if dims else None


def like_param(value: torch.Tensor, param) -> torch.Tensor:
    """A local shard ``value`` as a DTensor placed like ``param``; ``value`` itself when ``param`` is no DTensor or
    ``value`` is a per-parameter scalar (AdamW's ``step``)."""
    if not is_dtensor(param) or value.ndim != param.ndim:
        return value
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(value.to(param.device), param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def meta_skeleton(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` with its parameters on the meta device (no memory) and its buffers copied: the shape
    a gathered full state dict is loaded into (``load_state_dict(assign=True)``). Taken before sharding."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in module.parameters()}
    return copy.deepcopy(module, memo)


def shard_module(module: torch.nn.Module) -> None:
    """``fully_shard`` ``module`` in place: every block of its ModuleList children (a UNet's down/up blocks) and
    its ``mid_block`` as their own units, then the root."""
    from torch.distributed.fsdp import fully_shard

    for name, child in module.named_children():
        if isinstance(child, torch.nn.ModuleList):
            for block in child:
                fully_shard(block)
        elif name == "mid_block" and child is not None:
            fully_shard(child)
    fully_shard(module)


def reshard(modules) -> None:
    """Free the unsharded parameters FSDP keeps after a forward under no_grad (the root keeps them for a backward
    that never comes): afterwards ``parameters()`` are the sharded DTensors again, as the EMAs need them."""
    for m in modules:
        if hasattr(m, "reshard"):
            m.reshard()


@contextlib.contextmanager
def no_gradient_sync(modules):
    """Accumulate gradients locally in every FSDP module (no reduce-scatter) inside the block."""
    for m in modules:
        m.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for m in modules:
            m.set_requires_gradient_sync(True)


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of an FSDP module, gathered to the CPU of rank 0 (empty on the other ranks).
    Collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def whole_module(skeleton: torch.nn.Module, state: dict[str, torch.Tensor], device) -> torch.nn.Module:
    """A plain (unsharded) module: a fresh copy of ``skeleton`` holding the full ``state``, on ``device``."""
    module = copy.deepcopy(skeleton)
    module.load_state_dict(state, strict=True, assign=True)
    return module.to(device)


def min_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The elementwise minimum of ``t`` over all ranks (an all-reduce: every rank gets the same answer)."""
    import torch.distributed as dist

    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t
