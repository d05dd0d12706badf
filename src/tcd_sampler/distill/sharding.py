"""A full student sharded across processes with torch's FSDP2 (``torch.distributed.fsdp.fully_shard``), which runs
on any process group (NCCL on GPUs, gloo on CPUs) without accelerate's FSDP plugin (accelerate 1.x never shards a
CPU run).

Each block of the network (a UNet's ``down_blocks``, ``mid_block`` and ``up_blocks``; a transformer's
``transformer_blocks``) is one FSDP unit, the rest of the network the root unit: a block's parameters are gathered
for its forward and backward only, and each process keeps and updates its shard of every parameter (DTensors).
:func:`full_state_dict` gathers the whole network for an export; :func:`gradient_sync` skips the gradient
reduction on the micro-batches before the last; :func:`tcd_sampler.distill.losses.ema_update` updates a sharded
EMA target shard by shard; :mod:`tcd_sampler.distill.checkpoints` saves and loads sharded runs as plain ones.

torch.distributed is imported when called.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["BLOCKS", "full_state_dict", "gradient_sync", "is_sharded", "local_tensor", "shard"]

#: The attributes that hold a network's blocks (a module list or one module), each block one FSDP unit: diffusers'
#: UNet2DConditionModel and UNet2DModel (down, middle, up), and its transformers (double- and single-stream blocks).
BLOCKS = ("down_blocks", "mid_block", "up_blocks", "transformer_blocks", "single_transformer_blocks")


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a view: an in-place update reaches the DTensor), or ``tensor`` itself."""
    to_local = getattr(tensor, "to_local", None)
    return tensor if to_local is None else to_local()


def _blocks(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of ``network`` that :data:`BLOCKS` names, in order (a UNet2DModel without a middle block has
    ``mid_block`` None)."""
    found: list[torch.nn.Module] = []
    for name in BLOCKS:
        value = getattr(network, name, None)
        if isinstance(value, torch.nn.ModuleList):
            found.extend(value)
        elif isinstance(value, torch.nn.Module):
            found.append(value)
    return found


def shard(
    unet: Any, *, reshard_after_forward: bool | None = None, mixed_precision: torch.dtype | None = None
) -> Any:  # fmt: skip
    """Shard ``unet`` in place across the default process group (every process calls this, on the same
    architecture with the same weights): each block (:data:`BLOCKS`) one FSDP2 unit, then the root. Returns the
    module (its class becomes an ``FSDPModule`` subclass, its parameters DTensors: an optimizer must be built after).

    Args:
        unet: the network (a diffusers UNet2DConditionModel, UNet2DModel, or anything with :data:`BLOCKS`).
        reshard_after_forward: FSDP2's setting (None, default: every block frees its gathered parameters after its
            forward, the root keeps its own until the backward — for a trained network). Pass True for a network
            that runs without gradients, the EMA target: otherwise its root stays gathered after a forward, and
            its parameters are not the DTensors that :func:`~tcd_sampler.distill.losses.ema_update` updates.
        mixed_precision: the dtype the gathered parameters are cast to for the forward and backward (``torch.
            bfloat16``, ``torch.float16``), gradients reduced in float32; None (default): the parameters' own dtype.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy() if mixed_precision is None else MixedPrecisionPolicy(
        param_dtype=mixed_precision, reduce_dtype=torch.float32)  # fmt: skip
    for block in _blocks(unet):
        fully_shard(block, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    return fully_shard(unet, reshard_after_forward=reshard_after_forward, mp_policy=policy)


def is_sharded(module: Any) -> bool:
    """Whether any parameter of ``module`` is a DTensor (a network sharded by :func:`shard`)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state_dict(module: Any) -> dict[str, torch.Tensor]:
    """The whole state dict of ``module`` on the CPU. A sharded module's is gathered: a collective, which every
    process must call; the first process gets the tensors, the others ``{}``. A plain module's is its own, detached
    (every process gets it)."""
    if not is_sharded(module):
        return {key: value.detach().cpu() for key, value in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    gathered: dict[str, Any] = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True,
                                                                                     cpu_offload=True))  # fmt: skip
    return gathered


@contextlib.contextmanager
def gradient_sync(module: Any, enabled: bool) -> Iterator[None]:
    """A context in which the backward passes of ``module`` reduce its gradients across processes (``enabled``
    True) or only accumulate them locally (False: the micro-batches before the last of a step). For a sharded module
    FSDP2's ``set_requires_gradient_sync``, on again on leaving; for a DDP wrapper (one with ``no_sync``, as
    ``accelerator.no_sync`` does) its ``no_sync()``; nothing for a module of one process."""
    if enabled:
        yield
    elif is_sharded(module):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        with getattr(module, "no_sync", contextlib.nullcontext)():
            yield
