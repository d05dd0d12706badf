"""Tiny random-weight diffusers pipelines, built locally from configs, for fast CPU pipeline tests.

Nothing here touches the Hugging Face Hub: every model is built from a config, and the tokenizers from a small
vocabulary written on the spot. Each component is built right after ``torch.manual_seed``, so two calls of a
factory give identical weights (the caller's global RNG state is left as it was).

All pipelines run at 32x32 pixels: the VAEs have two blocks (scale factor 2), so latents are 16x16 (FLUX packs them
into 8x8 tokens, SD3 patches them 2x2). Every factory takes the scheduler to use and returns the pipeline with its
progress bar disabled; ``call_kwargs(kind)`` gives the arguments of a quick deterministic call, less
``num_inference_steps``, ``generator`` and ``eta``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    FluxPipeline,
    FluxTransformer2DModel,
    LatentConsistencyModelImg2ImgPipeline,
    LatentConsistencyModelPipeline,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from PIL import Image
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import decoders as tok_decoders
from tokenizers import processors as tok_processors
from tokenizers.models import Unigram
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

__all__ = [
    "FACTORIES",
    "IMAGE_SIZE",
    "KINDS",
    "PROMPT",
    "call_kwargs",
    "clip_tokenizer",
    "flux",
    "init_image",
    "lcm",
    "lcm_img2img",
    "mask_image",
    "sd",
    "sd3",
    "sd_img2img",
    "sd_inpaint",
    "sdxl",
    "sdxl_img2img",
    "sdxl_inpaint",
    "t5_tokenizer",
]

IMAGE_SIZE = 32
PROMPT = "a photo of a cat"
CLIP_MAX_LENGTH = 77
# A few whole words the tokenizers know (BPE merges for CLIP, pieces for T5); the rest falls back to characters.
_WORDS = ("a", "photo", "of", "the", "cat", "dog", "an", "astronaut", "riding", "horse", "painting")

_P = TypeVar("_P", bound=DiffusionPipeline)
_Clip = TypeVar("_Clip", CLIPTextModel, CLIPTextModelWithProjection)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG for the block and restore the caller's state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _finish(pipe: _P) -> _P:
    """Disable the pipeline's progress bar and hand it back."""
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------------- tokenizers


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """Byte-level symbols (alone and word-final), plus left-to-right merges spelling out a few common words."""
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    for suffix in ("", "</w>"):
        for symbol in symbols:
            vocab[symbol + suffix] = len(vocab)
    merges: list[str] = []
    for word in _WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            left, right = pieces[0], pieces[1]
            if left + right not in vocab:
                vocab[left + right] = len(vocab)
                merges.append(f"{left} {right}")
            pieces = [left + right, *pieces[2:]]
    return vocab, merges


def clip_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over a 550-token vocabulary, read from files written to a temporary directory."""
    vocab, merges = _clip_vocab_and_merges()
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = os.path.join(tmp, "vocab.json")
        merges_file = os.path.join(tmp, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump(vocab, f)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("\n".join(["#version: 0.2", *merges]) + "\n")
        return CLIPTokenizer(vocab_file, merges_file, model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer() -> T5TokenizerFast:
    """A T5-style Unigram tokenizer (``<pad>``=0, ``</s>``=1, ``<unk>``=2) over printable ASCII and a few words."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [(chr(c), -5.0) for c in range(33, 127)]
    pieces += [("▁" + chr(c), -4.0) for c in range(33, 127)]
    pieces += [("▁" + word, -2.0) for word in _WORDS if len(word) > 1]
    backend = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = tok_decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = tok_processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=backend,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=512,
    )


# ------------------------------------------------------------------------------------------------------- models


def _clip_text(cls: type[_Clip], tokenizer: CLIPTokenizer, seed: int, hidden: int = 16, projection: int = 16) -> _Clip:
    """A two-layer CLIP text encoder sized to ``tokenizer``; ``projection`` only matters for the projection class."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed):
        return cls(config).eval()


def _t5_text(tokenizer: T5TokenizerFast, seed: int, d_model: int = 32) -> T5EncoderModel:
    """A one-layer T5 encoder sized to ``tokenizer``."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with _seeded(seed):
        return T5EncoderModel(config).eval()


def _vae(latent_channels: int, flow: bool, seed: int = 0) -> AutoencoderKL:
    """Two-block VAE (scale factor 2). ``flow`` gives the SD3/FLUX layout: no quant convs, a shift factor."""
    with _seeded(seed):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=4,
            sample_size=IMAGE_SIZE,
            scaling_factor=1.5 if flow else 0.18215,
            shift_factor=0.06 if flow else None,
            use_quant_conv=not flow,
            use_post_quant_conv=not flow,
            force_upcast=False,  # float32 throughout; avoids SDXL re-casting the VAE on every call
        ).eval()


def _unet(
    cross_attention_dim: int,
    in_channels: int = 4,
    time_cond_proj_dim: int | None = None,
    pooled_dim: int | None = None,
    seed: int = 0,
) -> UNet2DConditionModel:
    """Two-level UNet on 16x16 latents; ``pooled_dim`` switches on SDXL's ``text_time`` added conditioning."""
    sdxl_kwargs: dict[str, Any] = {}
    if pooled_dim is not None:
        time_embed_dim = 8
        sdxl_kwargs = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": time_embed_dim,
            # six size/crop ids (original size, crop top-left, target size), each embedded, plus the pooled text
            "projection_class_embeddings_input_dim": 6 * time_embed_dim + pooled_dim,
            "use_linear_projection": True,
        }
    with _seeded(seed):
        return UNet2DConditionModel(
            sample_size=IMAGE_SIZE // 2,
            in_channels=in_channels,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4,
            attention_head_dim=2,
            cross_attention_dim=cross_attention_dim,
            time_cond_proj_dim=time_cond_proj_dim,
            **sdxl_kwargs,
        ).eval()


# ---------------------------------------------------------------------------------------------------- factories


def _sd_components(scheduler: Any, in_channels: int = 4, time_cond_proj_dim: int | None = None) -> dict[str, Any]:
    tokenizer = clip_tokenizer()
    return {
        "vae": _vae(latent_channels=4, flow=False),
        "text_encoder": _clip_text(CLIPTextModel, tokenizer, seed=1),
        "tokenizer": tokenizer,
        "unet": _unet(cross_attention_dim=16, in_channels=in_channels, time_cond_proj_dim=time_cond_proj_dim),
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def _sdxl_components(scheduler: Any, in_channels: int = 4) -> dict[str, Any]:
    tokenizer = clip_tokenizer()
    tokenizer_2 = clip_tokenizer()
    return {
        "vae": _vae(latent_channels=4, flow=False),
        "text_encoder": _clip_text(CLIPTextModel, tokenizer, seed=1),
        "text_encoder_2": _clip_text(CLIPTextModelWithProjection, tokenizer_2, seed=2),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        # prompt embeddings are both encoders' hidden states side by side: 16 + 16
        "unet": _unet(cross_attention_dim=32, in_channels=in_channels, pooled_dim=16),
        "scheduler": scheduler,
        "add_watermarker": False,
    }


def sd(scheduler: Any) -> StableDiffusionPipeline:
    """Tiny Stable Diffusion (1.x layout) text-to-image pipeline."""
    return _finish(StableDiffusionPipeline(**_sd_components(scheduler)))


def sd_img2img(scheduler: Any) -> StableDiffusionImg2ImgPipeline:
    """Tiny Stable Diffusion image-to-image pipeline (same weights as :func:`sd`)."""
    return _finish(StableDiffusionImg2ImgPipeline(**_sd_components(scheduler)))


def sd_inpaint(scheduler: Any) -> StableDiffusionInpaintPipeline:
    """Tiny Stable Diffusion inpainting pipeline (UNet input: 4 latent + 1 mask + 4 masked-image channels)."""
    return _finish(StableDiffusionInpaintPipeline(**_sd_components(scheduler, in_channels=9)))


def sdxl(scheduler: Any) -> StableDiffusionXLPipeline:
    """Tiny Stable Diffusion XL text-to-image pipeline."""
    return _finish(StableDiffusionXLPipeline(**_sdxl_components(scheduler)))


def sdxl_img2img(scheduler: Any) -> StableDiffusionXLImg2ImgPipeline:
    """Tiny SDXL image-to-image pipeline (same weights as :func:`sdxl`)."""
    return _finish(StableDiffusionXLImg2ImgPipeline(**_sdxl_components(scheduler)))


def sdxl_inpaint(scheduler: Any) -> StableDiffusionXLInpaintPipeline:
    """Tiny SDXL inpainting pipeline with a 9-channel UNet."""
    return _finish(StableDiffusionXLInpaintPipeline(**_sdxl_components(scheduler, in_channels=9)))


def lcm(scheduler: Any) -> LatentConsistencyModelPipeline:
    """Tiny latent consistency model pipeline: the SD layout plus the UNet's guidance-scale embedding."""
    return _finish(LatentConsistencyModelPipeline(**_sd_components(scheduler, time_cond_proj_dim=8)))


def lcm_img2img(scheduler: Any) -> LatentConsistencyModelImg2ImgPipeline:
    """Tiny latent consistency model image-to-image pipeline (same weights as :func:`lcm`)."""
    return _finish(LatentConsistencyModelImg2ImgPipeline(**_sd_components(scheduler, time_cond_proj_dim=8)))


def sd3(scheduler: Any) -> StableDiffusion3Pipeline:
    """Tiny Stable Diffusion 3 pipeline: MMDiT on 16-channel latents, two CLIP encoders with projection and a T5."""
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    with _seeded(0):
        transformer = SD3Transformer2DModel(
            sample_size=IMAGE_SIZE // 2,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            # CLIP hidden states (16 + 16) are zero-padded to the T5 width, so that must be at least 32
            joint_attention_dim=32,
            caption_projection_dim=16,  # = heads * head_dim
            pooled_projection_dim=32,  # both CLIP projections side by side
            pos_embed_max_size=IMAGE_SIZE // 2,
        ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=_vae(latent_channels=16, flow=True),
        text_encoder=_clip_text(CLIPTextModelWithProjection, tokenizer, seed=1),
        tokenizer=tokenizer,
        text_encoder_2=_clip_text(CLIPTextModelWithProjection, tokenizer_2, seed=2),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_t5_text(tokenizer_3, seed=3, d_model=32),
        tokenizer_3=tokenizer_3,
    )
    return _finish(pipe)


def flux(scheduler: Any) -> FluxPipeline:
    """Tiny FLUX.1-dev-style pipeline (guidance-distilled: ``guidance_scale`` is embedded, never doubled)."""
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    with _seeded(0):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels packed 2x2
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,  # T5 width
            pooled_projection_dim=16,  # CLIP pooled output width
            guidance_embeds=True,
            axes_dims_rope=(2, 2, 4),  # sums to attention_head_dim
        ).eval()
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=_vae(latent_channels=16, flow=True),
        text_encoder=_clip_text(CLIPTextModel, tokenizer, seed=1),
        tokenizer=tokenizer,
        text_encoder_2=_t5_text(tokenizer_2, seed=2, d_model=32),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return _finish(pipe)


#: The FLUX pipelines' stock scheduler settings (dynamic shifting), for the flow schedulers built around them.
FLUX_SCHEDULER_CONFIG: dict[str, Any] = {
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "shift": 3.0,
}

FACTORIES: dict[str, Callable[[Any], DiffusionPipeline]] = {
    "sd": sd,
    "sd_img2img": sd_img2img,
    "sd_inpaint": sd_inpaint,
    "sdxl": sdxl,
    "sdxl_img2img": sdxl_img2img,
    "sdxl_inpaint": sdxl_inpaint,
    "lcm": lcm,
    "lcm_img2img": lcm_img2img,
    "sd3": sd3,
    "flux": flux,
}
KINDS: tuple[str, ...] = tuple(FACTORIES)


# -------------------------------------------------------------------------------------------------- call inputs


def init_image(seed: int = 0) -> Image.Image:
    """A seeded RGB image: a smooth colour ramp plus noise, ``IMAGE_SIZE`` square."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 255.0, IMAGE_SIZE)
    base = np.stack([ramp[None, :].repeat(IMAGE_SIZE, 0), ramp[:, None].repeat(IMAGE_SIZE, 1)], axis=-1)
    base = np.concatenate([base, np.full((IMAGE_SIZE, IMAGE_SIZE, 1), 128.0)], axis=-1)
    pixels = np.clip(base + rng.normal(0.0, 24.0, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def mask_image() -> Image.Image:
    """An inpainting mask: white (repaint) over the central square, black elsewhere."""
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    quarter = IMAGE_SIZE // 4
    mask[quarter:-quarter, quarter:-quarter] = 255
    return Image.fromarray(mask)


def call_kwargs(kind: str) -> dict[str, Any]:
    """Keyword arguments for a quick deterministic call of the pipeline ``kind`` (a key of ``FACTORIES``).

    Leaves out ``num_inference_steps``, ``generator`` and ``eta``. ``guidance_scale=1.0`` everywhere: no
    classifier-free-guidance batch doubling (SD/SDXL/SD3 only double above 1); LCM and FLUX embed the value.
    img2img/inpaint use ``strength=0.75``: the SD/SDXL ones then run ``int(0.75 * steps)`` steps (one of two)."""
    if kind not in FACTORIES:
        raise KeyError(f"unknown pipeline kind {kind!r}; expected one of {KINDS}")
    kwargs: dict[str, Any] = {
        "prompt": PROMPT,
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
        "guidance_scale": 1.0,
        "output_type": "np",
    }
    if kind.endswith(("_img2img", "_inpaint")):
        kwargs["image"] = init_image()
        kwargs["strength"] = 0.75
    if kind.endswith("_inpaint"):
        kwargs["mask_image"] = mask_image()
    return kwargs
