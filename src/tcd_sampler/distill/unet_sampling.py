"""Sampling a diffusers UNet under a condition with any diffusers-style scheduler (``set_timesteps``,
``scale_model_input``, ``step``): ours (``TCDScheduler``) or diffusers' own (DDIM, DPM-Solver++, Euler, LCM), with
classifier-free guidance in one batched forward. Pipelines do this for text; a class-conditional ``UNet2DModel`` has
no pipeline that takes labels, so the trainer's validation grids and the digits demo sample with this loop."""

from __future__ import annotations

from typing import Any

import torch

from .teachers import Conditioning, network

__all__ = ["sample_unet"]


def _stack(a: Conditioning, b: Conditioning) -> Conditioning:
    """``a``'s rows then ``b``'s (one forward for the conditional and unconditional halves)."""
    cat = lambda x, y: None if x is None else torch.cat([x, y])  # noqa: E731
    return Conditioning(
        cat(a.encoder_hidden_states, b.encoder_hidden_states),
        {k: torch.cat([v, b.added_cond_kwargs[k]]) for k, v in a.added_cond_kwargs.items()},
        cat(a.class_labels, b.class_labels),
    )


@torch.no_grad()
def sample_unet(
    unet: Any,
    scheduler: Any,
    noise: torch.Tensor,
    num_inference_steps: int,
    cond: Conditioning | None = None,
    uncond: Conditioning | None = None,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    **step_kwargs: Any,
) -> torch.Tensor:
    """Sample from ``noise`` in ``num_inference_steps`` scheduler steps.

    Args:
        unet: a diffusers UNet (``UNet2DModel`` or ``UNet2DConditionModel``).
        scheduler: a diffusers-style scheduler; ``set_timesteps`` is called here.
        noise: the initial noise ``(B, C, H, W)`` at unit variance; multiplied by the scheduler's
            ``init_noise_sigma``.
        num_inference_steps: the model calls (each a batch of ``2B`` rows under guidance).
        cond: the condition (class labels, text embeddings). Default None: unconditional.
        uncond: the unconditional input of classifier-free guidance (the null class); needed when
            ``guidance_scale != 1``.
        guidance_scale: ``ω`` in ``m_u + ω·(m_c − m_u)``; 1 (default) is no guidance.
        generator: the scheduler's step noise (TCD's and LCM's re-noising; DDPM's). Default None.
        step_kwargs: further arguments of every ``scheduler.step`` call (TCD's ``eta``, DDIM's ``eta``).

    Returns:
        The final sample, the last step's ``prev_sample``.
    """
    cond = cond or Conditioning()
    guided = guidance_scale != 1.0
    if guided and uncond is None:
        raise ValueError("guidance_scale != 1 needs uncond (the unconditional input)")
    both = _stack(cond, uncond) if guided and uncond is not None else cond
    model = network(unet, both)
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        if guided:
            out_c, out_u = model(torch.cat([x_in, x_in]), t).chunk(2)
            out = out_u + guidance_scale * (out_c - out_u)
        else:
            out = model(x_in, t)
        x = scheduler.step(out, t, x, generator=generator, return_dict=False, **step_kwargs)[0]
    return x
