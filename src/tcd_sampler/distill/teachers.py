"""Teachers and students from diffusers: the network ``(x_t, t) → m`` of a ``UNet2DConditionModel`` (SD1.5, SD2.1,
SDXL with its added conditions) or a ``UNet2DModel`` (unconditional or class-conditional) under a condition, and the
path and prediction type of its scheduler config. diffusers is not imported here: the adapters call the module they
are given."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.paths import VPDiscrete
from ..core.predictions import PREDICTION_TYPES
from ..core.schedules import make_betas, rescale_zero_terminal_snr

__all__ = [
    "Conditioning",
    "check_class_captions",
    "class_labels",
    "conditions",
    "encode_latents",
    "network",
    "teacher_path",
]

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Conditioning:
    """What a diffusers UNet is conditioned on, per sample (batch first).

    Attributes:
        encoder_hidden_states: the text embeddings ``(B, tokens, dim)`` of a ``UNet2DConditionModel``; None for a
            ``UNet2DModel``.
        added_cond_kwargs: SDXL's added conditions (``text_embeds`` ``(B, pooled)``, ``time_ids`` ``(B, 6)``); empty
            for SD1.5/SD2.1.
        class_labels: class labels ``(B,)`` of a class-conditional UNet; None otherwise.
        timestep_cond: the guidance-scale embedding ``(B, time_cond_proj_dim)`` of a UNet with a
            ``time_cond_proj_dim`` (a guidance-conditioned student, :func:`guidance_embedding`); None otherwise.
    """

    encoder_hidden_states: torch.Tensor | None = None
    added_cond_kwargs: dict[str, torch.Tensor] = field(default_factory=dict)
    class_labels: torch.Tensor | None = None
    timestep_cond: torch.Tensor | None = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        """The conditioning with ``fn`` applied to every tensor (slicing, moving, casting)."""
        return Conditioning(
            None if self.encoder_hidden_states is None else fn(self.encoder_hidden_states),
            {k: fn(v) for k, v in self.added_cond_kwargs.items()},
            None if self.class_labels is None else fn(self.class_labels),
            None if self.timestep_cond is None else fn(self.timestep_cond),
        )


_TAKES_TEXT: dict[type, bool] = {}


def _takes_text(cls: type) -> bool:
    """Whether a UNet class's forward takes text embeddings (``UNet2DConditionModel``; a ``UNet2DModel`` does not);
    inspected once per class, since the trainer builds four models a step."""
    if cls not in _TAKES_TEXT:
        _TAKES_TEXT[cls] = "encoder_hidden_states" in inspect.signature(getattr(cls, "forward")).parameters  # noqa: B009
    return _TAKES_TEXT[cls]


def network(unet: Any, cond: Conditioning) -> Model:
    """The model ``(x_t, t) → m`` of a diffusers UNet under ``cond`` (its ``.sample`` output, in ``x_t``'s dtype's
    working precision as the UNet returns it)."""
    inner = getattr(unet, "module", unet)  # a DistributedDataParallel wrapper forwards to its module
    kwargs: dict[str, Any] = {}
    if _takes_text(type(inner)):
        if cond.encoder_hidden_states is None:
            raise ValueError(f"{type(inner).__name__} needs encoder_hidden_states (text embeddings) to be conditioned")
        kwargs["encoder_hidden_states"] = cond.encoder_hidden_states
        if cond.added_cond_kwargs:
            kwargs["added_cond_kwargs"] = cond.added_cond_kwargs
    if cond.class_labels is not None:
        kwargs["class_labels"] = cond.class_labels
    if cond.timestep_cond is not None:
        kwargs["timestep_cond"] = cond.timestep_cond

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x, t, return_dict=False, **kwargs)[0]

    return model


def teacher_path(scheduler_config: Mapping[str, Any]) -> tuple[VPDiscrete, str]:
    """The discrete VP path and prediction type of a teacher's scheduler config (a diffusers ``scheduler_config.json``
    mapping: betas from ``beta_schedule``/``beta_start``/``beta_end``/``trained_betas``, ``rescale_betas_zero_snr``).
    ValueError for a flow-matching config or a prediction type TCD does not know."""
    c = dict(scheduler_config)
    if "shift" in c or "use_dynamic_shifting" in c:
        raise ValueError(
            "a flow-matching teacher is not supported by this trainer yet (its scheduler config has shift)"
        )
    if c.get("sigma_data") is not None:  # EDM schedulers' (discrete schedulers may carry sigma_min/max: None)
        raise ValueError("an EDM teacher (its scheduler config has sigma_data) is not supported by this trainer yet")
    prediction_type = str(c.get("prediction_type", "epsilon"))
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"the teacher's prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    T = int(c.get("num_train_timesteps", 1000))
    betas = make_betas(T, float(c.get("beta_start", 0.00085)), float(c.get("beta_end", 0.012)),
                       str(c.get("beta_schedule", "scaled_linear")), c.get("trained_betas"))  # fmt: skip
    if c.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return VPDiscrete.from_betas(betas), prediction_type


def guidance_embedding(omega: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The embedding ``(B, dim)`` of guidance scales ``omega`` ``(B,)`` (this package's ``m_u + ω·(m_c − m_u)``) that
    a UNet with ``time_cond_proj_dim = dim`` takes as ``timestep_cond``: the sinusoidal embedding of ``(ω − 1)·1000``
    (VDM's), what diffusers' pipelines compute from their ``guidance_scale`` for such a UNet, so a student trained
    on it samples in them with ``guidance_scale = ω``."""
    w = (omega.to(torch.float64) - 1.0) * 1000.0
    half = dim // 2
    scale = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -scale)
    angles = w.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def check_class_captions(captions: list[str], null_class: int, what: str = "sample") -> None:
    """ValueError unless every caption is a class label of a class-conditional teacher: an integer in
    ``[0, null_class − 1]`` (the last embedding, ``null_class``, is classifier-free guidance's "no class");
    ``what`` names the captions' owners in the message."""
    for index, caption in enumerate(captions):
        text = caption.strip()
        if not (text.isascii() and text.isdigit() and int(text) < null_class):
            raise ValueError(
                f"the teacher is class-conditional ({null_class} classes and a null class): every caption must be a "
                f"class label in [0, {null_class - 1}], but {what} {index}'s is {caption!r}"
            )


def class_labels(captions: list[str], null_class: int, device: Any = None) -> torch.Tensor:
    """The class labels of ``captions`` (an empty caption, dropped for guidance, is ``null_class``), int64 ``(B,)``."""
    values = [int(c) if c.strip() else null_class for c in captions]
    return torch.tensor(values, dtype=torch.int64, device=device)


TextCache = dict[str, tuple[torch.Tensor, "torch.Tensor | None"]]


def _encode(pipe: Any, captions: list[str], device: Any, cache: TextCache) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The text embeddings (and SDXL's pooled ones) of ``captions``, each distinct caption encoded once: the missing
    ones in one batch, kept in ``cache`` on the CPU."""
    missing = sorted({c for c in captions if c not in cache})
    if missing:
        if hasattr(pipe, "text_encoder_2"):
            embeds, _, pooled, _ = pipe.encode_prompt(missing, device=device, do_classifier_free_guidance=False)
        else:
            embeds, pooled = pipe.encode_prompt(missing, device, 1, False)[0], None
        for j, caption in enumerate(missing):
            cache[caption] = (embeds[j].cpu(), None if pooled is None else pooled[j].cpu())
    embeds = torch.stack([cache[c][0] for c in captions]).to(device)
    pooled_rows = [cache[c][1] for c in captions]
    pooled = None if pooled_rows[0] is None else torch.stack(pooled_rows).to(device)  # type: ignore[arg-type]
    return embeds, pooled


def _cached_text(pipe: Any, captions: list[str], device: Any, cache: TextCache) -> tuple[Any, Any, Any, Any]:
    """What ``encode_prompt`` returns for ``captions`` with guidance (SDXL: zeros as the unconditional input with
    ``force_zeros_for_empty_prompt``, else the empty prompt's encoding; SD: the empty prompt's), from ``cache``."""
    embeds, pooled = _encode(pipe, captions, device, cache)
    if hasattr(pipe, "text_encoder_2") and pipe.config.get("force_zeros_for_empty_prompt", True):
        assert pooled is not None
        return embeds, torch.zeros_like(embeds), pooled, torch.zeros_like(pooled)
    neg, neg_pooled = _encode(pipe, [""] * len(captions), device, cache)
    return embeds, neg, pooled, neg_pooled


def conditions(pipe: Any, captions: list[str], batch: dict[str, Any], device: Any, unconditional: bool = True,
               cache: TextCache | None = None) -> tuple[Conditioning, Conditioning | None]:  # fmt: skip
    """The conditions of ``captions`` and the empty condition (None unless ``unconditional``): text embeddings (and
    SDXL's added conditions, from ``batch``'s sizes) for a text-to-image pipeline; class labels for a
    class-conditional ``UNet2DModel`` (the captions are the labels; the null class is the last embedding); nothing
    for an unconditional one. With ``cache`` (a dict kept across steps) each distinct caption is encoded once."""
    with torch.no_grad():
        if not hasattr(pipe, "encode_prompt"):
            classes = getattr(pipe.unet.config, "num_class_embeds", None)
            if not classes:  # an unconditional UNet2DModel: no text, no guidance
                return Conditioning(), Conditioning() if unconditional else None
            labels = class_labels(captions, classes - 1, device)
            return Conditioning(class_labels=labels), (
                Conditioning(class_labels=torch.full_like(labels, classes - 1)) if unconditional else None
            )
        if hasattr(pipe, "text_encoder_2"):  # SDXL
            # no negative prompt: the pipeline's own unconditional input (zeros with force_zeros_for_empty_prompt)
            if cache is None:
                embeds, neg, pooled, neg_pooled = pipe.encode_prompt(captions, device=device)
            else:
                embeds, neg, pooled, neg_pooled = _cached_text(pipe, captions, device, cache)
            r = batch["resolution"] if "resolution" in batch else batch["pixel_values"].shape[-1]
            sizes = zip(batch["original_size"], batch["crop_top_left"], strict=True)
            ids = torch.tensor([[*o, *c, r, r] for o, c in sizes], dtype=embeds.dtype, device=device)
            return (
                Conditioning(embeds, {"text_embeds": pooled, "time_ids": ids}),
                Conditioning(neg, {"text_embeds": neg_pooled, "time_ids": ids}),
            )
        if cache is None:
            embeds, neg = pipe.encode_prompt(captions, device, 1, unconditional, [""] * len(captions))
        else:
            embeds, neg, _, _ = _cached_text(pipe, captions, device, cache)
        return Conditioning(embeds), Conditioning(neg) if unconditional else None


#: The pixels a VAE call encodes at most (in images × height × width): 4 images of 512², 1 of 1024² (SDXL's VAE
#: holds about 2.7 GB of activations per 1024² image in float32).
VAE_PIXELS = 4 * 512 * 512


def encode_latents(pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
    """The data latents ``z`` of ``pixels`` (the VAE's scaled mode), encoded in chunks of at most
    :data:`VAE_PIXELS` pixels (at least one image a call), or the pixels themselves for a pixel-space teacher (no
    VAE)."""
    if getattr(pipe, "vae", None) is None:
        return pixels
    chunk = max(1, VAE_PIXELS // (pixels.shape[-2] * pixels.shape[-1]))
    vae = pipe.vae
    with torch.no_grad():
        parts = [vae.encode(part.to(vae.dtype)).latent_dist.mode() for part in pixels.split(chunk)]
        return torch.cat(parts) * vae.config.scaling_factor
