"""Memory per GPU of TCD distillation runs on SDXL (or SD 1.5), estimated from the real model configs on the meta
device (issue 18, item 8): no weights, no GPU, no download.

The UNet, the VAE and the text encoders are built from their configs (written below as data) on the meta device, and
peft's LoRA is added there (``unet.add_adapter`` under ``torch.device("meta")``). Weights, gradients and optimizer
states are counted from the parameters; activations by running the real diffusers forward on meta tensors:

* saved for backward: the forward runs inside ``torch.autograd.graph.saved_tensors_hooks``, whose pack hook adds the
  bytes of each saved tensor's storage once. Meta tensors have no data pointer, so a storage is identified by its
  ``StorageImpl`` address (``untyped_storage()._cdata``, shared by views); the packed object holds the tensor, so the
  address cannot be reused while it counts, and releases the storage when autograd drops it. Storages of the
  parameters, buffers and inputs are not counted (the parameters are the weights' count): a frozen weight saved by a
  layer costs nothing, a cast copy of it (autocast over fp32 weights) does.
* gradient checkpointing (diffusers' ``enable_gradient_checkpointing``: torch's non-reentrant checkpoint of each
  ResnetBlock2D and BasicTransformerBlock call, with grad enabled): derived from the plain pass, with diffusers' own
  checkpoint calls made plain and marked (our ``gradient_checkpointing_func``): kept = what is saved outside them +
  the tensor arguments of those that have a graph (the checkpoint's frame holds them). Equal, byte for byte, to a
  real checkpointed pass (the cross-check line of the output; the tests).
* backward's extra: with checkpointing, the recomputation of the largest segment (its own saved bytes), plus two of
  the largest saved tensors (the gradients of an operation's output and input).
* no-grad passes (teacher cond, teacher uncond, target) and the VAE encode: the peak of the live bytes of every
  tensor the pass creates (a ``TorchDispatchMode`` registers each operation's outputs by storage; a
  ``weakref.finalize`` on each tensor releases the storage when its last tensor dies). Kernel workspaces (cuBLAS,
  cuDNN, flash attention) and the allocator's rounding are not in it.

Emulation: CUDA autocast does not act on meta (or CPU) tensors, so a ``TorchFunctionMode`` applies its bf16 policy:
matmul/linear/conv/baddbmm/attention cast their floating inputs to bf16 (the cast of a float32 leaf that requires
grad cached for the pass, with grad enabled, as autocast's cache); group_norm, layer_norm, softmax, exp, pow, sum and
the rest of the float32 list cast to float32; other operations run in their inputs' dtype. peft casts a LoRA layer's
input to the LoRA weight's dtype, and the emulated autocast casts it back to bf16 for the LoRA matmul, as on CUDA.
Attention on meta takes the math path and would save the (L × L) matrix; ``scaled_dot_product_attention`` is replaced
(on every device) by a function that saves what CUDA's flash / memory-efficient kernels save: q, k, v, the output and
a float32 log-sum-exp (B, heads, L).

Checks (``--verify``, and tests/test_estimate_memory.py): on a tiny UNet the counts on meta equal those of the same
forward on real CPU tensors, and on CPU they match the CPU allocator (torch.profiler's memory events) to within a
kilobyte, for the bytes held after the forward and the peak of a no-grad forward.

Run: .venv/bin/python benchmarks/estimate_memory.py [--estimate sdxl|sd15] [--rows 1,12] [--json PATH] [--verify]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from tcd_sampler.distill.teachers import VAE_PIXELS  # the trainer's VAE chunk

GB = 1e9  # decimal gigabytes, as the goals are stated (80 GB card, 18 GB)

#: SDXL base 1.0's UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json). diffusers' attention_head_dim
#: is the number of heads here (5, 10, 20 heads of 64).
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

#: Stable Diffusion 1.5's UNet (unet/config.json): 8 heads at every level.
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

#: A tiny UNet of SDXL's layout (the checks of ``--verify`` and tests/test_estimate_memory.py, on real CPU tensors).
TINY_UNET: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,
}

#: The VAE of both (AutoencoderKL, 4 latent channels, 8× down).
VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
}

#: CLIP ViT-L/14's text model (SD 1.5's text encoder, SDXL's first) and OpenCLIP ViT-bigG/14's (SDXL's second,
#: with its projection).
CLIP_L: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
CLIP_BIGG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

#: LoRA target modules: (i) the attention projections (our trainer's, tcd_sampler.distill.models.LORA_TARGETS),
#: (ii) diffusers' LCM-LoRA script's default list.
LORA_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
LORA_LCM = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
    "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)  # fmt: skip
LORA_LISTS = {"attention": LORA_ATTENTION, "lcm": LORA_LCM}


@dataclass(frozen=True)
class Family:
    """A model family: its UNet config, native resolution, VAE and text encoders (config, with projection)."""

    name: str
    unet: dict[str, Any]
    resolution: int
    text_encoders: tuple[tuple[dict[str, Any], bool], ...]
    recipe_rows: int  # rows per GPU of docs/training.md's recipe on 8 GPUs


FAMILIES = {
    "sdxl": Family("sdxl", SDXL_UNET, 1024, ((CLIP_L, False), (CLIP_BIGG, True)), recipe_rows=12),
    "sd15": Family("sd15", SD15_UNET, 512, ((CLIP_L, False),), recipe_rows=24),
}

CUDA_CONTEXT = 0.5 * GB  # the CUDA context and the cuBLAS workspace, outside PyTorch's allocator
GOAL_ONE_ROW = 18 * GB
GOAL_CARD = 80 * GB


# ---------------------------------------------------------------------------------------------------------------
# models on meta


def _quiet_diffusers() -> None:
    from diffusers.utils import logging

    logging.set_verbosity_error()  # "modules that should be kept in float32" on .to(bf16): none in these UNets


def build_unet(config: dict[str, Any], *, dtype: torch.dtype = torch.bfloat16, device: str = "meta") -> Any:
    """``UNet2DConditionModel(**config)`` on ``device`` in ``dtype``, frozen (no parameter requires grad)."""
    from diffusers import UNet2DConditionModel

    _quiet_diffusers()
    with torch.device(device):
        unet: Any = UNet2DConditionModel(**config)
    return unet.to(dtype).requires_grad_(False)


def add_lora(
    unet: Any, targets: Sequence[str], rank: int = 64, alpha: int = 64, dtype: torch.dtype = torch.float32
) -> Any:
    """Add a LoRA (peft ``LoraConfig`` through ``unet.add_adapter``, as our trainer) of ``rank`` on ``targets`` and
    cast its parameters to ``dtype`` (peft creates them in the base weights' dtype; diffusers'
    ``cast_training_params`` does the same cast). The layers are created on the UNet's device: on meta, adding the
    adapters takes seconds instead of initialising hundreds of MB of real weights on the CPU."""
    from peft import LoraConfig

    device = next(unet.parameters()).device
    with torch.device(device):
        init: Any = "gaussian" if device.type != "meta" else False  # (values do not exist on meta)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=list(targets)))
    set_trainable_dtype(unet, dtype)
    return unet


def set_trainable_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters that require grad to ``dtype`` (in place, as ``cast_training_params``)."""
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)


def set_frozen_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters that do not require grad to ``dtype`` (in place)."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)


def _targeted(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)  # peft's rule for a list of names


def lora_parameter_count(unet: torch.nn.Module, targets: Sequence[str], rank: int) -> int:
    """The parameters of a rank-``rank`` LoRA on ``targets``, from the shapes of the UNet's layers (computed before
    any adapter is added): ``r·(in + out)`` per Linear, ``r·in·kh·kw/groups + out·r`` per Conv2d."""
    total = 0
    for name, module in unet.named_modules():
        if not _targeted(name, targets):
            continue
        if isinstance(module, torch.nn.Linear):
            total += rank * (module.in_features + module.out_features)
        elif isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            total += rank * module.in_channels * kh * kw // module.groups + module.out_channels * rank
    return total


def parameter_bytes(model: torch.nn.Module, trainable: bool | None = None) -> int:
    """Bytes of the parameters (all, or those that do / do not require grad)."""
    return sum(p.numel() * p.element_size() for p in model.parameters()
               if trainable is None or p.requires_grad == trainable)  # fmt: skip


def parameter_count(model: torch.nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in model.parameters() if trainable is None or p.requires_grad == trainable)


def unet_inputs(
    config: dict[str, Any], rows: int, *, device: str = "meta", text_dtype: torch.dtype = torch.bfloat16,
    latent_dtype: torch.dtype = torch.float32, tokens: int = 77,
) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:  # fmt: skip
    """The UNet's inputs for ``rows`` rows at its native size, as our trainer passes them: float32 latents, integer
    timesteps, text embeddings (and SDXL's pooled embeddings and time ids) from bf16 text encoders."""
    size = config["sample_size"]
    sample = torch.randn(rows, config["in_channels"], size, size, device=device, dtype=latent_dtype)
    timestep = torch.full((rows,), 499, device=device, dtype=torch.long)
    embeds = torch.randn(rows, tokens, config["cross_attention_dim"], device=device, dtype=text_dtype)
    kwargs: dict[str, Any] = {"encoder_hidden_states": embeds}
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(rows, pooled, device=device, dtype=text_dtype),
            "time_ids": torch.randn(rows, 6, device=device, dtype=text_dtype),
        }
    return (sample, timestep), kwargs


# ---------------------------------------------------------------------------------------------------------------
# counting


def storage_key(t: torch.Tensor) -> int:
    """A storage's identity (its StorageImpl address; views share it; valid on meta, where data_ptr is 0)."""
    return int(t.untyped_storage()._cdata)


def storage_bytes(t: torch.Tensor) -> int:
    return int(t.untyped_storage().nbytes())


def _keys(values: Any) -> set[int]:
    return {storage_key(t) for t in tree_leaves(values) if isinstance(t, torch.Tensor)}


def model_keys(*models: torch.nn.Module) -> set[int]:
    """The storages of the models' parameters and buffers (counted as weights, never as activations)."""
    return {storage_key(t) for m in models for t in (*m.parameters(), *m.buffers())}


_UNTRACKED = [0]  # > 0 while the emulated attention computes real values (CPU), which CUDA does in its kernel


@contextmanager
def _untracked() -> Iterator[None]:
    _UNTRACKED[0] += 1
    try:
        yield
    finally:
        _UNTRACKED[0] -= 1


class _Held:
    """A saved tensor as autograd keeps it (the pack hook's result): releases its storage's count when dropped."""

    __slots__ = ("counter", "key", "tensor")

    def __init__(self, counter: SavedTensors, key: int, tensor: torch.Tensor) -> None:
        self.counter, self.key, self.tensor = counter, key, tensor

    def __del__(self) -> None:
        self.counter.release(self.key)


class SavedTensors:
    """The bytes autograd saves for backward, by storage (see the module docstring), while :meth:`hooks` is active.

    Attributes:
        bytes: the bytes saved now (storages still referenced by the graph).
        largest: the largest single saved storage.
        segment_peak: the largest saved bytes of one segment (a module marked by :meth:`segments`).
    """

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.bytes = self.largest = self.segment_peak = 0
        self._segment: dict[int, int] | None = None
        self._segment_inputs: set[int] = set()
        self._outside: set[int] = set()  # saved while no segment runs
        self._all_inputs: dict[int, torch.Tensor] = {}  # the kept segments' inputs, held (their keys stay theirs)
        self._packed = False

    def pack(self, t: torch.Tensor) -> Any:
        key = storage_key(t)
        self._packed = True
        if key in self.exclude:
            return t
        if key not in self.refs:
            size = storage_bytes(t)
            self.refs[key], self.sizes[key] = 0, size
            self.bytes += size
            self.largest = max(self.largest, size)
        self.refs[key] += 1
        if self._segment is None:
            self._outside.add(key)
        elif key not in self._segment_inputs:
            self._segment[key] = self.sizes[key]
        return _Held(self, key, t)

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Held) else packed

    def release(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.bytes -= self.sizes.pop(key)
            self._outside.discard(key)

    def checkpointed(self) -> dict[int, int]:
        """The storages a checkpointed forward would keep (with :meth:`segments` active during the count): those
        saved outside the segments and the segments' inputs (torch's non-reentrant checkpoint saves them), by key."""
        kept = {key: self.sizes[key] for key in self._outside if key in self.sizes}
        kept.update((key, storage_bytes(t)) for key, t in self._all_inputs.items())
        return kept

    @contextmanager
    def hooks(self) -> Iterator[SavedTensors]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield self

    @contextmanager
    def segments(self, model: Any) -> Iterator[set[type]]:
        """Run the calls that diffusers' gradient checkpointing would checkpoint (``enable_gradient_checkpointing``
        with our function) as plain calls, each marked as a segment: its own saved bytes are what backward
        recomputes at once, and its tensor arguments are what torch's non-reentrant checkpoint keeps. Yields the
        module types it saw."""
        seen: set[type] = set()

        def segment(module: Any, *args: Any) -> Any:
            seen.add(type(module))
            inputs = [t for t in args if isinstance(t, torch.Tensor)]  # checkpoint saves its tensor arguments
            outer = self._segment, self._segment_inputs, self._packed
            self._segment, self._segment_inputs, self._packed = {}, {storage_key(t) for t in inputs}, False
            try:
                return module(*args)
            finally:
                self.segment_peak = max(self.segment_peak, sum(self._segment.values()))
                if self._packed:  # the segment has a graph, which holds its frame, which holds its inputs
                    self._all_inputs.update((storage_key(t), t) for t in inputs if storage_key(t) not in self.exclude)
                self._segment, self._segment_inputs, self._packed = outer[0], outer[1], outer[2] or self._packed

        model.enable_gradient_checkpointing(segment)
        try:
            yield seen
        finally:
            model.disable_gradient_checkpointing()


class LiveTensors(TorchDispatchMode):
    """The live bytes of the tensors created while active (by storage; outputs of every operation, views
    included, released by a weakref finalizer on each tensor); ``peak`` is their maximum."""

    def __init__(self, exclude: set[int]) -> None:
        super().__init__()
        self.exclude = exclude
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.bytes = self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not _UNTRACKED[0]:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self._add(t)
        return out

    def _add(self, t: torch.Tensor) -> None:
        key = storage_key(t)
        if key in self.exclude:
            return
        if key not in self.refs:
            self.refs[key], self.sizes[key] = 0, storage_bytes(t)
            self.bytes += self.sizes[key]
            self.peak = max(self.peak, self.bytes)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.bytes -= self.sizes.pop(key)


# ---------------------------------------------------------------------------------------------------------------
# emulation of CUDA autocast (bf16) and of the CUDA attention kernels

#: CUDA autocast's lower-precision ops (torch.amp docs, "CUDA Ops that can autocast to float16"), by function name.
AUTOCAST_LOWER = frozenset({
    "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "matmul",
    "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm", "addmv", "addr", "mv", "einsum",
    "chain_matmul", "prelu", "scaled_dot_product_attention",
})  # fmt: skip
#: CUDA autocast's float32 ops ("CUDA Ops that can autocast to float32").
AUTOCAST_FP32 = frozenset({
    "group_norm", "layer_norm", "rms_norm", "softmax", "log_softmax", "softmin", "exp", "expm1", "log", "log10",
    "log2", "log1p", "pow", "__pow__", "__rpow__", "reciprocal", "rsqrt", "sinh", "cosh", "tan", "acos", "asin",
    "erfinv", "softplus", "norm", "normalize", "sum", "prod", "cumsum", "cumprod", "logsumexp", "cosine_similarity",
    "dist", "pdist", "cdist", "renorm", "mse_loss", "l1_loss", "smooth_l1_loss", "kl_div", "nll_loss",
})  # fmt: skip


class _Attention(torch.autograd.Function):
    """Scaled dot-product attention that saves what CUDA's flash / memory-efficient kernels save for backward: q,
    k, v, the output and a float32 log-sum-exp (B, heads, L) (and the mask, if any). Counting only: no backward."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                options: dict[str, Any]) -> torch.Tensor:  # fmt: skip
        out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        if q.device.type != "meta":  # real values (the CPU test); not counted, a CUDA kernel writes `out` itself
            with _untracked():
                out.copy_(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **options))
        ctx.save_for_backward(q, k, v, out, lse, *([] if mask is None else [mask]))
        return out

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuntimeError("the emulated attention only counts memory; it has no backward")


def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
               dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
               enable_gqa: bool = False) -> torch.Tensor:  # fmt: skip
    options = {"dropout_p": dropout_p, "is_causal": is_causal, "scale": scale, "enable_gqa": enable_gqa}
    return _Attention.apply(query, key, value, attn_mask, options)


class CudaEmulation(TorchFunctionMode):
    """CUDA's bf16 autocast policy (``autocast=True``) and CUDA's attention kernels on any device (see the module
    docstring). ``cache`` holds the casts of float32 leaves that require grad, as autocast's cache does;
    ``weight_casts`` records the per-use casts of (frozen) parameters with grad enabled."""

    def __init__(self, autocast: bool = True, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.autocast, self.dtype = autocast, dtype
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.weight_casts: dict[int, torch.Tensor] = {}

    def _cast(self, value: Any, dtype: torch.dtype) -> Any:
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast(v, dtype) for v in value)
        if (
            not isinstance(value, torch.Tensor)
            or not value.is_floating_point()
            or value.dtype in (dtype, torch.float64)
        ):
            return value
        cacheable = dtype == self.dtype and value.dtype == torch.float32 and value.requires_grad and value.is_leaf
        if cacheable and value._base is None and torch.is_grad_enabled():
            hit = self.cache.get(id(value))
            if hit is None:
                hit = self.cache[id(value)] = (value, value.to(dtype))
            return hit[1]
        cast = value.to(dtype)
        if isinstance(value, torch.nn.Parameter) and dtype == self.dtype and torch.is_grad_enabled():  # per use
            self.weight_casts[storage_key(cast)] = cast  # held: its key stays its own
        return cast

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.autocast and (name in AUTOCAST_LOWER or name in AUTOCAST_FP32):
            dtype = self.dtype if name in AUTOCAST_LOWER else torch.float32
            args, kwargs = self._cast(args, dtype), {k: self._cast(v, dtype) for k, v in kwargs.items()}
        if name == "scaled_dot_product_attention":
            return _attention(*args, **kwargs)
        return func(*args, **kwargs)

    def cache_bytes(self, exclude: set[int] | frozenset[int] = frozenset()) -> int:
        """Bytes of the cached casts whose storages are not in ``exclude``."""
        return sum(storage_bytes(c) for _, c in self.cache.values() if storage_key(c) not in exclude)


# ---------------------------------------------------------------------------------------------------------------
# passes


@dataclass
class StudentPass:
    """The student's forward with gradients (bytes).

    Attributes:
        saved: saved for backward at the end of the forward (activations, parameters excluded).
        cache: autocast's cached casts (float32 trainable parameters to bf16) not among ``saved``: alive until the
            autocast region ends.
        largest: the largest saved storage.
        segment: the largest checkpoint segment's saved bytes (what backward recomputes at once).
        weight_casts: the part of ``saved`` that is bf16 casts of frozen weights (autocast over fp32 weights).
    """

    saved: int
    cache: int
    largest: int
    segment: int = 0
    weight_casts: int = 0


def _casts_in(emulation: CudaEmulation, keys: set[int] | dict[int, int]) -> int:
    return sum(storage_bytes(t) for k, t in emulation.weight_casts.items() if k in keys)


def student_pass(
    model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], *, autocast: bool = True
) -> tuple[StudentPass, set[type]]:
    """Count the student's forward (training mode, grad enabled) with diffusers' gradient checkpointing really on
    (``enable_gradient_checkpointing``: torch's non-reentrant checkpoint); returns the counts (``segment`` 0) and
    the module types it checkpointed."""
    seen: set[type] = set()

    def checkpoint(module: Any, *inputs: Any) -> Any:  # diffusers' default function, recording what it wraps
        seen.add(type(module))
        return torch.utils.checkpoint.checkpoint(module.__call__, *inputs, use_reentrant=False)

    counter, emulation = SavedTensors(model_keys(model) | _keys((args, kwargs))), CudaEmulation(autocast)
    model.train().enable_gradient_checkpointing(checkpoint)
    try:
        with torch.enable_grad(), counter.hooks(), emulation:
            out = model(*args, **kwargs).sample
    finally:
        model.disable_gradient_checkpointing()
    kept = set(counter.refs)
    result = StudentPass(counter.bytes, emulation.cache_bytes(kept), counter.largest, 0, _casts_in(emulation, kept))
    del out
    return result, seen


def student_passes(
    model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], *, autocast: bool = True
) -> dict[bool, StudentPass]:
    """The student's forward (training mode, grad enabled) without checkpointing, counted, and the checkpointed
    counts derived from it (kept: what is saved outside the segments + the inputs of the segments that have a
    graph; ``segment``: the largest segment's own saved bytes), by checkpointing off / on. One forward instead of
    two; :func:`student_pass` gives the same checkpointed counts (tests/test_estimate_memory.py, and the
    cross-check line of the output)."""
    counter, emulation = SavedTensors(model_keys(model) | _keys((args, kwargs))), CudaEmulation(autocast)
    model.train()
    with torch.enable_grad(), counter.segments(model), counter.hooks(), emulation:
        out = model(*args, **kwargs).sample
    plain_keys, ckpt_keys = set(counter.refs), counter.checkpointed()
    plain = StudentPass(counter.bytes, emulation.cache_bytes(plain_keys), counter.largest, counter.segment_peak,
                        _casts_in(emulation, plain_keys))  # fmt: skip
    ckpt = StudentPass(sum(ckpt_keys.values()), emulation.cache_bytes(set(ckpt_keys)), counter.largest,
                       counter.segment_peak, _casts_in(emulation, ckpt_keys))  # fmt: skip
    del out
    return {False: plain, True: ckpt}


def nograd_peak(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], *, autocast: bool = True) -> int:
    """Peak live bytes of one forward without gradients (teacher or target)."""
    live = LiveTensors(model_keys(model) | _keys((args, kwargs)))
    with torch.no_grad(), CudaEmulation(autocast), live:
        out = model(*args, **kwargs)
        del out
    return live.peak


def vae_encode_peak(rows: int, resolution: int, device: str = "meta") -> tuple[int, int]:
    """(parameter bytes, peak live bytes) of the VAE encoding ``rows`` images in float32 without autocast (our
    trainer's ``encode_latents``: one call on all the local rows)."""
    from diffusers import AutoencoderKL

    _quiet_diffusers()
    with torch.device(device):
        vae: Any = AutoencoderKL(**VAE, sample_size=resolution)
    vae.requires_grad_(False)
    pixels = torch.zeros(rows, 3, resolution, resolution, device=device)
    live = LiveTensors(model_keys(vae) | _keys(pixels))
    with torch.no_grad(), CudaEmulation(autocast=False), live:
        out = vae.encode(pixels).latent_dist.mode()
        del out
    return parameter_bytes(vae), live.peak


def text_encoder_bytes(family: Family, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the family's text encoders in ``dtype`` (built on meta from their configs)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    total = 0
    for config, projection in family.text_encoders:
        cls = CLIPTextModelWithProjection if projection else CLIPTextModel
        with torch.device("meta"):
            model = cls(CLIPTextConfig(**config))
        total += parameter_count(model) * torch.finfo(dtype).bits // 8
    return total


def fsdp_units(model: torch.nn.Module) -> tuple[int, int]:
    """(largest unit, root remainder) in parameters, with FSDP units wrapped around each BasicTransformerBlock and
    ResnetBlock2D (a transformer-based auto-wrap policy) and the rest (conv_in/out, embeddings, norms, proj_in/out,
    down/upsamplers) in the root unit."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    units = [parameter_count(m) for m in model.modules() if isinstance(m, (BasicTransformerBlock, ResnetBlock2D))]
    return max(units), parameter_count(model) - sum(units)


# ---------------------------------------------------------------------------------------------------------------
# the estimate


@dataclass
class Row:
    """One configuration's memory per GPU (bytes). ``activations`` is the largest of the phases: VAE encode,
    no-grad passes (plus the student's saved bytes when the student runs first), end of the student's forward
    (saved + cached casts), backward (saved + recomputed segment + two of the largest saved tensors)."""

    arrangement: str
    rows: int
    checkpointing: bool
    weights: int
    train_state: int
    other_models: int
    extra: int
    vae_encode: int
    nograd: int
    saved: int
    forward_extra: int
    backward_extra: int
    student_first: bool = False
    weight_casts: int = 0

    @property
    def phases(self) -> dict[str, int]:
        return {
            "vae encode": self.vae_encode,
            "no-grad passes": self.nograd + (self.saved if self.student_first else 0),
            "student forward": self.saved + self.forward_extra,
            "backward": self.saved + self.backward_extra,
        }

    @property
    def activations(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda k: self.phases[k])

    @property
    def total(self) -> int:
        return self.weights + self.train_state + self.other_models + self.extra + self.activations

    @property
    def total_cached(self) -> int:
        """The total without the VAE encode phase (encodings cached, after the first epoch; or encoded a row at a
        time, which costs a twelfth of the 12-row peak)."""
        fixed = self.weights + self.train_state + self.other_models + self.extra
        return fixed + max(v for k, v in self.phases.items() if k != "vae encode")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(activations=self.activations, peak_phase=self.peak_phase, total=self.total,
                 total_with_context=self.total + CUDA_CONTEXT, total_cached_encodings=self.total_cached,
                 total_cached_encodings_with_context=self.total_cached + CUDA_CONTEXT)  # fmt: skip
        return d


def _student_row(
    arrangement: str, rows: int, ckpt: bool, passes: dict[bool, StudentPass], *, weights: int, train_state: int,
    other: int, vae: int, nograd: int, extra: int = 0, student_first: bool = False,
) -> Row:  # fmt: skip
    p, plain = passes[ckpt], passes[False]
    backward = (plain.segment if ckpt else 0) + 2 * plain.largest
    return Row(arrangement, rows, ckpt, weights, train_state, other, extra, vae, nograd, p.saved, p.cache, backward,
               student_first, p.weight_casts)  # fmt: skip


def estimate(family_name: str = "sdxl", rows: Sequence[int] = (1, 12), rank: int = 64, world: int = 8,
             log: Any = None) -> dict[str, Any]:  # fmt: skip
    """All the estimates for a family (see the module docstring and :func:`main`)."""
    say = log or (lambda *a: None)
    family = FAMILIES[family_name]
    cfg = family.unet
    bf16, fp32 = torch.bfloat16, torch.float32
    result: dict[str, Any] = {"family": family_name, "resolution": family.resolution, "rank": rank, "world": world}

    base = build_unet(cfg)  # frozen, bf16
    n_base = parameter_count(base)
    lora_counts = {name: lora_parameter_count(base, targets, rank) for name, targets in LORA_LISTS.items()}
    result["unet_parameters"] = n_base
    te = text_encoder_bytes(family)
    vae_bytes, _ = vae_encode_peak(1, family.resolution)
    other = te + vae_bytes
    result["other_models"] = {"text_encoders_bf16": te, "vae_fp32": vae_bytes}
    # our encode_latents: chunks of at most VAE_PIXELS pixels (one 1024² image, four 512² ones a call); the old
    # trainer encoded all of a process's rows in one call
    chunk = max(1, VAE_PIXELS // family.resolution**2)
    vae_peak = {b: vae_encode_peak(min(b, chunk), family.resolution)[1] for b in rows}
    vae_peak_old = {b: vae_encode_peak(b, family.resolution)[1] for b in rows}
    vae_peak_lcm = {b: vae_encode_peak(min(b, 8), family.resolution)[1] for b in rows}  # --vae_encode_batch_size 8
    result["vae_encode_peak"] = vae_peak
    say(f"{family_name}: UNet {n_base / 1e6:.1f} M parameters; VAE encode peaks computed")

    table: list[Row] = []
    lora_checked: dict[str, int] = {}
    teacher_peak: dict[int, int] = {}
    inputs = {b: unet_inputs(cfg, b) for b in rows}

    def student_rows(unet: Any, arrangement: str, weights: int, train_state: int, vae: dict[int, int],
                     student_first: bool = False) -> dict[int, dict[bool, StudentPass]]:  # fmt: skip
        """``arrangement``'s rows of the table (each of ``rows``, with and without checkpointing) for ``unet`` as it
        is now; returns the passes measured, by rows."""
        measured = {}
        for b in rows:
            args, kwargs = inputs[b]
            target = nograd_peak(unet, args, kwargs)
            measured[b] = passes = student_passes(unet, args, kwargs)
            for ckpt in (False, True):
                table.append(_student_row(
                    arrangement, b, ckpt, passes, weights=weights, train_state=train_state, other=other, vae=vae[b],
                    nograd=max(teacher_peak[b], target), student_first=student_first,
                ))  # fmt: skip
            say(f"  {arrangement}: rows {b} done")
        return measured

    for list_name, targets in LORA_LISTS.items():
        unet = add_lora(build_unet(cfg), targets, rank)  # bf16 base, fp32 LoRA
        lora_checked[list_name] = parameter_count(unet, trainable=True)
        n_lora = lora_checked[list_name]
        for b in rows:
            if b not in teacher_peak:  # the teacher: the same UNet with its adapters disabled
                args, kwargs = inputs[b]
                unet.disable_adapters()
                teacher_peak[b] = nograd_peak(unet, args, kwargs)
                unet.enable_adapters()
        ours = student_rows(unet, f"(a) LoRA {list_name}, one bf16 base", 2 * n_base, 16 * n_lora, vae_peak)
        if list_name == "attention":  # the derived checkpointed counts against a real one
            args, kwargs = inputs[rows[0]]
            actual, seen = student_pass(unet, args, kwargs)
            result["checkpoint_cross_check"] = {
                "arrangement": "(a) attention", "rows": rows[0], "derived_saved": ours[rows[0]][True].saved,
                "actual_saved": actual.saved, "derived_cache": ours[rows[0]][True].cache, "actual_cache": actual.cache,
                "checkpointed": sorted(t.__name__ for t in seen),
            }  # fmt: skip
        if list_name == "lcm":  # (c) the LCM-LoRA script at bf16: cast_training_params only for fp16
            set_trainable_dtype(unet, bf16)
            student_rows(unet, "(c) LCM-LoRA script (LoRA bf16)", 2 * n_base, 8 * n_lora, vae_peak_lcm,
                         student_first=True)  # fmt: skip
        else:  # (b) the old arrangement: an fp32 copy of the base under the LoRA, a separate bf16 teacher
            set_frozen_dtype(unet, fp32)
            student_rows(unet, f"(b) old: LoRA {list_name}, fp32 base + bf16 teacher", 4 * n_base + 2 * n_base,
                         16 * n_lora, vae_peak_old)  # fmt: skip
        del unet

    # (d) a full student: FSDP (bf16 mixed precision: the forward sees bf16 unsharded params) and DDP (fp32 params)
    full = build_unet(cfg).requires_grad_(True)
    largest_unit, root = fsdp_units(full)
    result["fsdp_units"] = {"largest_unit_parameters": largest_unit, "root_parameters": root}
    gathered = 2 * root + 2 * (2 * largest_unit) + 2 * largest_unit  # root + current & prefetched unit + unit grads
    shard = 16 * n_base // world  # fp32 params, grads, AdamW's 2 states
    for b in rows:
        args, kwargs = inputs[b]
        passes = student_passes(full, args, kwargs)
        for teacher_sharded, ema in ((False, "sharded"), (True, "cpu")):
            teacher = 2 * n_base // world if teacher_sharded else 2 * n_base
            ema_bytes = 4 * n_base // world if ema == "sharded" else 0
            name = f"(d) full, FSDP×{world}: teacher {'sharded' if teacher_sharded else 'bf16 whole'}, EMA {ema}"
            table.append(_student_row(
                name, b, True, passes, weights=teacher, train_state=shard + ema_bytes, other=other,
                vae=vae_peak[b], nograd=teacher_peak[b], extra=gathered,
            ))  # fmt: skip
        say(f"  (d) FSDP rows {b} done")
    set_trainable_dtype(full, fp32)
    for b in rows:
        args, kwargs = inputs[b]
        full.requires_grad_(False)
        target = nograd_peak(full, args, kwargs)  # the fp32 EMA target under autocast
        full.requires_grad_(True)
        passes = student_passes(full, args, kwargs)
        for ckpt in (False, True):
            table.append(_student_row(
                f"(d) full, DDP×{world} (replicated)", b, ckpt, passes, weights=2 * n_base,
                train_state=16 * n_base + 4 * n_base, other=other, vae=vae_peak[b],
                nograd=max(teacher_peak[b], target), extra=4 * n_base,
            ))  # fmt: skip
        say(f"  (d) DDP rows {b} done")

    result["lora_parameters"] = {"expected_from_shapes": lora_counts, "requires_grad_after_add_adapter": lora_checked}
    result["rows"] = [r.as_dict() for r in table]
    result["table"] = table
    return result


# ---------------------------------------------------------------------------------------------------------------
# output

EMULATION = (
    "emulation: CUDA bf16 autocast's policy applied by a TorchFunctionMode (matmul/linear/conv/attention → bf16, "
    "with autocast's cache for the casts of trainable fp32 parameters; group_norm/layer_norm/softmax/exp/… → fp32); "
    "attention saves what CUDA's flash/efficient kernels save (q, k, v, out, fp32 logsumexp), not the L×L matrix; "
    "frozen base bf16 (a, c, d-FSDP) or fp32 (b, d-DDP); LoRA fp32 (a, b) or bf16 (c); inputs: fp32 latents, bf16 "
    "text embeddings; the VAE encode in fp32 without autocast (our encode_latents)."
)
COUNTING = (
    "counting: saved-for-backward bytes by storage (saved_tensors_hooks; parameters, buffers and inputs excluded); "
    "checkpointed counts derived from the plain pass by diffusers' own checkpoint calls (cross-checked below); "
    "no-grad and VAE peaks = peak live bytes of all tensors a pass creates (dispatch mode + weakref finalizers); "
    "backward extra = the largest checkpoint segment's recomputation (checkpointing on) + 2 × the largest saved tensor."
)
COLUMNS = (
    "columns (GB = 1e9 bytes): weights = frozen or unsharded weights resident; train state = trainable parameters + "
    "grads + AdamW's 2 states [+ EMA target]; other = text encoders (bf16) + VAE (fp32), on the GPU as our place() "
    "puts them; extra = FSDP's all-gathered bf16 (root unit + 2 × largest unit, current and prefetched, + that unit's "
    "grads) or DDP's gradient buckets (one fp32 copy of the grads); VAE enc, no-grad = peaks of those passes; saved = "
    "the student's saved activations; fwd+ = autocast's cached casts beyond them; bwd+ = backward's extra; "
    "activations = the largest phase (named); grads are counted throughout (zero_grad(set_to_none) frees them "
    "during the forward: conservative)."
)
ORDER = (
    "phase order: our trainer runs the VAE encode, then the teacher (cond, uncond) and the target without grad, then "
    "the student (so the no-grad peaks do not overlap the student's saved activations); the LCM-LoRA script runs the "
    "student first, then the teacher and target passes on top of its saved activations, and encodes 8 rows at a time."
)


def _gb(x: float) -> str:
    return f"{x / GB:.2f}"


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def render(result: dict[str, Any], elapsed: float | None = None) -> str:
    """The readable report of :func:`estimate`'s result."""
    n, other = result["unet_parameters"], result["other_models"]
    out = [
        f"# Memory per GPU: {result['family']} at {result['resolution']} px, LoRA rank {result['rank']}, "
        f"{result['world']} GPUs (torch {torch.__version__}, meta device)",
        "",
        f"UNet: {n / 1e6:.1f} M parameters ({_gb(2 * n)} GB bf16, {_gb(4 * n)} GB fp32); text encoders "
        f"{_gb(other['text_encoders_bf16'])} GB bf16; VAE {_gb(other['vae_fp32'])} GB fp32",
    ]
    lora = result["lora_parameters"]
    for name, targets in LORA_LISTS.items():
        counted, shapes = lora["requires_grad_after_add_adapter"][name], lora["expected_from_shapes"][name]
        out.append(f"LoRA rank {result['rank']} on {name} ({len(targets)} names): {counted / 1e6:.1f} M parameters "
                   f"(requires_grad after add_adapter; {shapes / 1e6:.1f} M from the layers' shapes)")  # fmt: skip
    units = result["fsdp_units"]
    out += [
        f"FSDP units (each BasicTransformerBlock, ResnetBlock2D): largest {units['largest_unit_parameters'] / 1e6:.1f}"
        f" M parameters, root remainder {units['root_parameters'] / 1e6:.1f} M",
        "",
        EMULATION,
        COUNTING,
        ORDER,
        "",
        "| arrangement | rows | ckpt | weights | train state | other | extra | VAE enc | no-grad | saved | fwd+ | bwd+ "
        "| activations (phase) | total | + context | cached enc. + context |",
        "|---|---:|:-:|" + "---:|" * 13,
    ]
    for r in result["table"]:
        cells = (r.weights, r.train_state, r.other_models, r.extra, r.vae_encode, r.nograd, r.saved, r.forward_extra,
                 r.backward_extra)  # fmt: skip
        tail = (f"{_gb(r.activations)} ({r.peak_phase}) | {_gb(r.total)} | {_gb(r.total + CUDA_CONTEXT)} | "
                f"{_gb(r.total_cached + CUDA_CONTEXT)}")  # fmt: skip
        out.append(f"| {r.arrangement} | {r.rows} | {_on(r.checkpointing)} | {' | '.join(map(_gb, cells))} | {tail} |")
    out += ["", COLUMNS]
    out.append(f"constant overhead: + context = + {_gb(CUDA_CONTEXT)} GB (CUDA context, cuBLAS workspace); allocator "
               "fragmentation is NOT included (no factor applied), nor NCCL's buffers")  # fmt: skip
    for r in result["table"]:
        if r.weight_casts:
            out.append(f"{r.arrangement}, {r.rows} rows, ckpt {_on(r.checkpointing)}: {_gb(r.weight_casts)} GB of "
                       "the saved bytes are bf16 casts of frozen fp32 weights")  # fmt: skip
    check = result.get("checkpoint_cross_check")
    if check:
        same = (check["derived_saved"], check["derived_cache"]) == (check["actual_saved"], check["actual_cache"])
        out.append(f"checkpointing cross-check, {check['arrangement']} at {check['rows']} rows: derived saved "
                   f"{check['derived_saved']} B + cached casts {check['derived_cache']} B; real checkpointed pass "
                   f"{check['actual_saved']} B + {check['actual_cache']} B → {'equal' if same else 'DIFFERENT'} "
                   f"(diffusers checkpointed {', '.join(check['checkpointed'])})")  # fmt: skip
    out += ["", *_goals(result)]
    if elapsed is not None:
        out += ["", f"run time: {elapsed:.0f} s ({torch.get_num_threads()} threads)"]
    return "\n".join(out)


def _goals(result: dict[str, Any]) -> list[str]:
    lines = []
    recipe = FAMILIES[result["family"]].recipe_rows
    for r in (r for r in result["table"] if r.arrangement.startswith("(a)")):
        total, cached, ckpt = r.total + CUDA_CONTEXT, r.total_cached + CUDA_CONTEXT, _on(r.checkpointing)
        if r.rows == 1:
            verdict = "meets" if total <= GOAL_ONE_ROW else "MISSES"
            lines.append(f"goal: LoRA at 1 row ≤ 18 GB — {r.arrangement}, ckpt {ckpt}: {_gb(total)} GB → {verdict}")
        if r.rows == recipe:
            fits = ["fits" if t <= GOAL_CARD else "does NOT fit" for t in (total, cached)]
            name = f"{recipe} rows/GPU, {result['world']} GPUs, {result['resolution']} px, bf16, rank {result['rank']}"
            lines.append(f"goal: docs/training.md's recipe ({name}) in 80 GB — {r.arrangement}, ckpt {ckpt}: "
                         f"{_gb(total)} GB → {fits[0]}; encodings cached: {_gb(cached)} GB → {fits[1]}")  # fmt: skip
    return lines


def _allocator_timeline(prof: Any) -> tuple[int, int]:
    """(peak, final) bytes of the CPU allocator over a ``torch.profiler`` run with ``profile_memory=True``: each
    operator's own allocations and frees, and the frees recorded outside operators, in time order."""
    points = []
    for event in prof.events():
        if event.name == "[memory]":
            points.append((event.time_range.start, event.cpu_memory_usage))
        elif event.self_cpu_memory_usage:
            points.append((event.time_range.start, event.self_cpu_memory_usage))
    current = peak = 0
    for _, change in sorted(points, key=lambda point: point[0]):
        current += change
        peak = max(peak, current)
    return peak, current


def verify(rows: int = 2) -> list[str]:
    """Check the counters on :data:`TINY_UNET` (bf16 base, fp32 LoRA on the LCM list, rank 4): the meta counts
    against the same forward on real CPU tensors (they must be equal), the derived checkpointed counts against a
    real checkpointed pass, and the CPU counts against the CPU allocator (torch.profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile

    counts = {}
    torch.set_num_threads(1)  # tiny tensors: threads only add synchronisation
    for device in ("meta", "cpu"):
        torch.manual_seed(0)
        unet = add_lora(build_unet(TINY_UNET, device=device), LORA_LCM, rank=4)
        args, kwargs = unet_inputs(TINY_UNET, rows, device=device)
        passes = student_passes(unet, args, kwargs)
        counts[device] = (passes, student_pass(unet, args, kwargs)[0], nograd_peak(unet, args, kwargs))
    (meta_passes, meta_real_ckpt, meta_nograd), (passes, real_ckpt, nograd) = counts["meta"], counts["cpu"]
    lines = [
        f"tiny UNet, {rows} rows: saved (ckpt off / on) meta {meta_passes[False].saved} / {meta_passes[True].saved} B,"
        f" CPU {passes[False].saved} / {passes[True].saved} B; real checkpointed pass meta {meta_real_ckpt.saved} B,"
        f" CPU {real_ckpt.saved} B; no-grad peak meta {meta_nograd} B, CPU {nograd} B",
    ]
    emulation = CudaEmulation()
    unet.train()  # the CPU model and inputs of the loop's last round
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, torch.enable_grad(), emulation:
        out = unet(*args, **kwargs).sample
    _, retained = _allocator_timeline(prof)
    retained -= storage_bytes(out)
    del out
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, torch.no_grad(), CudaEmulation():
        out = unet(*args, **kwargs)
        del out
    peak, _ = _allocator_timeline(prof)
    counted = passes[False].saved + passes[False].cache
    lines.append(f"CPU allocator: held after the forward (output excepted) {retained} B vs counted saved + cached "
                 f"casts {counted} B; no-grad peak {peak} B vs counted {nograd} B")  # fmt: skip
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--estimate", choices=sorted(FAMILIES), default="sdxl")
    parser.add_argument("--rows", help="rows per GPU, comma-separated (default: 1, 12 and the recipe's)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--world", type=int, default=8, help="GPUs of the FSDP/DDP estimate (default 8)")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--verify", action="store_true", help="only check the counters on a tiny UNet (CPU vs meta)")
    ns = parser.parse_args(argv)
    if ns.verify:
        print("\n".join(verify()))
        return
    recipe = FAMILIES[ns.estimate].recipe_rows
    rows = tuple(int(r) for r in ns.rows.split(",")) if ns.rows else tuple(sorted({1, 12, recipe}))
    start = time.perf_counter()
    result = estimate(ns.estimate, rows, ns.rank, ns.world, log=lambda m: print(m, file=sys.stderr, flush=True))
    elapsed = time.perf_counter() - start
    print(render(result, elapsed))
    if ns.json:
        data = {k: v for k, v in result.items() if k != "table"}
        data.update(emulation=EMULATION, counting=COUNTING, cuda_context=CUDA_CONTEXT, seconds=elapsed,
                    goals={"one_row": GOAL_ONE_ROW, "card": GOAL_CARD}, unit="bytes")  # fmt: skip
        ns.json.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
