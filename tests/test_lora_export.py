"""The distillation trainer's outputs (``tcd_sampler.distill.export``): the LoRA that diffusers' ``load_lora_weights``
loads (the UNet then computes what the in-memory peft model computes), the same LoRA in kohya's format, every key of
which ComfyUI's LoRA loader maps onto a real SD1.5-structured ComfyUI UNet (and which, applied by ComfyUI, changes
that UNet's output as peft's LoRA changes diffusers'), the full student as a diffusers model folder, the card and the
scheduler it builds, and writes that leave nothing half-written when they fail midway.

Tiny random-weight models built locally (``tiny_pipelines.py``); nothing downloads. The ComfyUI test skips with the
harness's reason (``comfy_env.comfy_or_skip``) where the vendored ComfyUI or a dependency of it is absent.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file

import comfy_env
from tcd_sampler import TCDScheduler, TCDSchedulerOutput
from tcd_sampler.distill import export
from tcd_sampler.distill.export import (
    CARD_NAME,
    LORA_WEIGHT_NAME,
    comfyui_lora_path,
    load_card,
    lora_state_dicts,
    pipeline_kwargs,
    save_full_student,
    save_lora,
    scheduler_from_card,
    scheduler_settings,
    write_card,
)
from tcd_sampler.integrations.diffusers import TCDScheduler as PipelineTCDScheduler
from tiny_pipelines import sd, sdxl

# the SD pipelines' constructor warns about our scheduler's steps_offset=0 (TCD's grid), which these tests never sample
pytestmark = pytest.mark.filterwarnings("ignore:The configuration file of this scheduler:FutureWarning")

# diffusers' LCM-LoRA scripts' default target modules: attention, feed-forward, and the convolutions
# diffusers' LCM-LoRA scripts' list, the trainer's default (models.LORA_TARGETS is checked against it)
LCM_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
               "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]  # fmt: skip
RANK, ALPHA = 4, 8  # alpha != rank: a file that lost alpha would scale the LoRA by 1 instead of 2
# an SD1.5 pipeline's scheduler config (PNDM's), as a trainer's teacher has it
SD_TEACHER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
              "steps_offset": 1, "set_alpha_to_one": False, "skip_prk_steps": True, "clip_sample": False}  # fmt: skip


def add_lora(unet: Any, seed: int, how: str = "add_adapter") -> Any:
    """A rank-4, alpha-8 LoRA on the LCM targets, added as diffusers' script (``add_adapter``) or peft
    (``get_peft_model``) does, its A and B perturbed from a fixed seed (B starts at zero: the LoRA would do nothing)."""
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=LCM_TARGETS)
    if how == "add_adapter":
        unet.add_adapter(config)
        model = unet
    else:
        model = get_peft_model(unet, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    return model.eval()


def unet_inputs(unet: Any, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A fixed batch of two for ``unet`` (with SDXL's added conditions where it takes them)."""
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    side = cfg.sample_size
    kwargs: dict[str, Any] = {
        "sample": torch.randn(2, cfg.in_channels, side, side, generator=g, dtype=dtype),
        "timestep": torch.tensor([999, 250]),
        "encoder_hidden_states": torch.randn(2, 5, cfg.cross_attention_dim, generator=g, dtype=dtype),
    }
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, generator=g, dtype=dtype),
            "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2, dtype=dtype),
        }
    return kwargs


def run(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


# ---------------------------------------------------------------------------------------------------- diffusers


@pytest.mark.parametrize(("factory", "how"), [(sd, "add_adapter"), (sd, "get_peft_model"), (sdxl, "add_adapter")])
def test_diffusers_loads_the_lora(factory: Callable[[Any], Any], how: str, tmp_path: Path) -> None:
    """``pipe.load_lora_weights(folder)`` on a fresh pipeline gives the UNet the in-memory peft model computes."""
    trained = factory(PipelineTCDScheduler())
    inputs = unet_inputs(trained.unet)
    base = run(trained.unet, inputs)
    student = add_lora(trained.unet, seed=1, how=how)
    expected = run(student, inputs)
    assert (expected - base).abs().max() > 0.1  # the LoRA matters

    folder = save_lora(student, tmp_path / "tcd-lora", metadata={"tcd_sampler.steps": "3"})
    assert folder == tmp_path / "tcd-lora"
    assert sorted(p.name for p in folder.iterdir()) == sorted([LORA_WEIGHT_NAME, "tcd-lora_comfyui.safetensors"])

    fresh = factory(PipelineTCDScheduler())
    assert torch.equal(run(fresh.unet, inputs), base)
    fresh.load_lora_weights(folder)
    got = run(fresh.unet, inputs)
    assert (got - expected).abs().max() <= 1e-5, (got - expected).abs().max()
    config = fresh.unet.peft_config["default_0"]
    assert (config.r, config.lora_alpha) == (RANK, ALPHA)


def test_diffusers_file_is_what_diffusers_writes(tmp_path: Path) -> None:
    """The diffusers-format file holds exactly the tensors and ``lora_adapter_metadata`` that diffusers' own
    ``save_lora_weights`` writes from ``get_peft_model_state_dict`` and the adapter's config, plus the caller's
    metadata; the ComfyUI file has the keys of diffusers' ``convert_state_dict_to_kohya`` and the same weights, but
    ``alpha`` = lora_alpha (diffusers' converter writes the rank)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    unet = add_lora(sd(PipelineTCDScheduler()).unet, seed=2)
    ours = save_lora(unet, tmp_path / "ours", metadata={"ss_note": "x"}, name="student") / LORA_WEIGHT_NAME
    peft_sd = get_peft_model_state_dict(unet)
    adapter_config = unet.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "theirs", unet_lora_layers=peft_sd, unet_lora_adapter_metadata=adapter_config
    )
    theirs = tmp_path / "theirs" / LORA_WEIGHT_NAME
    with safe_open(str(ours), "pt") as a, safe_open(str(theirs), "pt") as b:
        meta_a, meta_b = a.metadata(), b.metadata()
    assert meta_a.pop("ss_note") == "x"
    config_a = json.loads(meta_a.pop("lora_adapter_metadata"))
    config_b = json.loads(meta_b.pop("lora_adapter_metadata"))
    assert config_a["unet.target_modules"] == sorted(config_b.pop("unet.target_modules"))  # a set: ours sorted
    assert config_a.pop("unet.target_modules") and config_a == config_b
    assert meta_a == meta_b == {"format": "pt"}
    a_sd, b_sd = load_file(str(ours)), load_file(str(theirs))
    assert a_sd.keys() == b_sd.keys() and all(torch.equal(a_sd[k], b_sd[k]) for k in a_sd)

    comfy = load_file(str(tmp_path / "ours" / "student_comfyui.safetensors"))
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_sd.items()})
    assert comfy.keys() == kohya.keys()
    weights = [k for k in comfy if not k.endswith(".alpha")]
    assert weights and all(torch.equal(comfy[k], kohya[k]) for k in weights)
    alphas = {float(comfy[k]) for k in comfy if k.endswith(".alpha")}
    assert alphas == {float(ALPHA)} and {float(kohya[k]) for k in kohya if k.endswith(".alpha")} == {float(RANK)}
    with safe_open(str(tmp_path / "ours" / "student_comfyui.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "ss_note": "x"}


def test_lora_refusals(tmp_path: Path) -> None:
    unet = sd(PipelineTCDScheduler()).unet
    with pytest.raises(ValueError, match="no LoRA adapter 'default'"):
        save_lora(unet, tmp_path / "a")
    add_lora(unet, seed=3)
    with pytest.raises(ValueError, match="no LoRA adapter 'other'"):
        save_lora(unet, tmp_path / "a", adapter_name="other")
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        save_lora(torch.nn.Linear(2, 2), tmp_path / "a")
    with pytest.raises(ValueError, match="may not set"):
        save_lora(unet, tmp_path / "a", metadata={"format": "np"})
    with pytest.raises(ValueError, match="name must be"):
        save_lora(unet, tmp_path / "a", name="../escape")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        save_lora(unet, tmp_path / "file")
    layer = next(m for m in unet.modules() if hasattr(m, "scaling") and "default" in m.scaling)
    layer.scaling["default"] *= 3  # what set_scale / a pipeline's lora_scale leaves behind if not undone
    with pytest.raises(ValueError, match="set_scale"):
        save_lora(unet, tmp_path / "a")
    dora = sd(PipelineTCDScheduler()).unet
    dora.add_adapter(LoraConfig(r=2, lora_alpha=2, use_dora=True, target_modules=["to_q"]))
    with pytest.raises(ValueError, match="use_dora"):
        save_lora(dora, tmp_path / "a")
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------------------------------------------ ComfyUI


def sd15_structured_unet() -> Any:
    """SD1.5's UNet layout (four levels of two ResNet blocks, one-transformer cross-attention at the top three, conv
    projections, GEGLU, 8 heads), with 32-64 channels instead of 320-1280, in float64. ComfyUI's UNetModel
    hard-codes ``GroupNorm(32, ·)``, so the widths are multiples of 32 (tiny_pipelines' 8-channel UNet cannot be
    built in ComfyUI)."""
    cross, plain = "CrossAttnDownBlock2D", "DownBlock2D"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet: Any = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(32, 32, 64, 64),
            down_block_types=(cross, cross, cross, plain),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16,
            attention_head_dim=8,
        )
    return unet.to(torch.float64).eval()


def comfy_unet_config(config: Any) -> dict[str, Any]:
    """ComfyUI's ``unet_config`` (comfy/model_detection.py's SD15 entry) of a diffusers SD1.5-layout UNet config."""
    mc = config.block_out_channels[0]
    per_level = [1 if "CrossAttn" in t else 0 for t in config.down_block_types]
    up_levels = [1 if "CrossAttn" in t else 0 for t in config.up_block_types]
    up_depths = [d for d in up_levels for _ in range(config.layers_per_block + 1)]
    return {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": config.in_channels, "out_channels": config.out_channels,
        "model_channels": mc, "num_res_blocks": [config.layers_per_block] * len(per_level),
        "transformer_depth": [d for d in per_level for _ in range(config.layers_per_block)],
        "transformer_depth_output": up_depths[::-1],  # ComfyUI pops it from the end, deepest level first
        "channel_mult": [c // mc for c in config.block_out_channels], "transformer_depth_middle": 1,
        "use_linear_in_transformer": bool(config.use_linear_projection), "context_dim": config.cross_attention_dim,
        "use_temporal_resblock": False, "use_temporal_attention": False,
    }  # fmt: skip


def comfy_model(c: Any, unet: Any) -> Any:
    """The UNet as ComfyUI holds a loaded SD1.5 checkpoint: its weights under ComfyUI's (LDM) names, by ComfyUI's own
    ``unet_to_diffusers`` map; the config ComfyUI's ``detect_unet_config`` reads off those weights (checked against
    the diffusers config's); ``supported_models.SD15`` on it builds a real ``BaseModel`` around ComfyUI's
    ``UNetModel``, which loads the weights strictly (every key, every shape); in a ``ModelPatcher`` on the CPU."""
    detection = importlib.import_module("comfy.model_detection")
    expected = comfy_unet_config(unet.config)
    to_ldm = c.utils.unet_to_diffusers(expected)
    weights = unet.state_dict()
    assert not [k for k in weights if k not in to_ldm]
    ldm = {to_ldm[k]: v for k, v in weights.items()}
    detected = detection.detect_unet_config({f"model.diffusion_model.{k}": v for k, v in ldm.items()},
                                            "model.diffusion_model.")  # fmt: skip
    assert {k: detected.get(k) for k in expected} == expected
    model = c.supported_models.SD15(detected).get_model({})
    assert isinstance(model, c.model_base.BaseModel)
    model.diffusion_model.to(unet.dtype).load_state_dict(ldm, strict=True)
    cpu = torch.device("cpu")
    return c.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def comfy_run(patcher: Any, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return patcher.model.diffusion_model(
            inputs["sample"], inputs["timestep"].to(inputs["sample"].dtype), context=inputs["encoder_hidden_states"]
        )


def test_the_trainers_default_targets_are_lcm_loras() -> None:
    from tcd_sampler.distill.models import LORA_TARGETS

    assert list(LORA_TARGETS) == LCM_TARGETS


def test_comfyui_maps_every_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every key of the ComfyUI-format file maps in ComfyUI's LoRA loader, for a real SD1.5-structured model.

    The key map is ``comfy.lora.model_lora_keys_unet`` of a real ComfyUI SD1.5 ``BaseModel`` (:func:`comfy_model`),
    so it is computed from that model's config and weights as for a loaded checkpoint. Checked: every
    ``lora_unet_*`` module of the file is in the key map; ``comfy.lora.load_lora`` logs no unloaded key and makes
    one patch per LoRA layer, each onto a weight of the model; ``comfy.sd.load_lora_for_models`` (what the
    LoraLoader nodes call, on the file as ``comfy.utils.load_torch_file`` reads it) adds every patch; and the patched
    ComfyUI UNet's output equals the peft model's within 1e-5 (so alpha, the up/down order and the conv shapes are
    read as meant), where the LoRA moves it by about 1. In float64, where the two UNets agree to 1e-10 before the
    LoRA (the weight conversion is exact); the LoRA's remaining ~1e-6 is ComfyUI's, which computes patches in
    float32."""
    c = comfy_env.comfy_or_skip()
    unet = sd15_structured_unet()
    inputs = unet_inputs(unet, dtype=torch.float64)
    patcher = comfy_model(c, unet)
    base = run(unet, inputs)
    assert (comfy_run(patcher, inputs) - base).abs().max() <= 1e-10  # the same network in both
    student = add_lora(unet, seed=4)
    expected = run(student, inputs)
    assert (expected - base).abs().max() > 0.1

    path = comfyui_lora_path(save_lora(student, tmp_path / "tcd_sd15"))
    assert path.name == "tcd_sd15_comfyui.safetensors"
    lora = c.utils.load_torch_file(str(path), safe_load=True)
    modules = {k.split(".", 1)[0] for k in lora}
    layers = [n for n, m in unet.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(modules) == len(layers) and len(lora) == 3 * len(layers)

    key_map = c.lora.model_lora_keys_unet(patcher.model, {})
    assert sorted(m for m in modules if m not in key_map) == []
    model_weights = patcher.model.state_dict()
    with caplog.at_level(logging.WARNING):
        patches = c.lora.load_lora(lora, key_map, log_missing=True)
        patched, _ = c.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    assert [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()] == []
    assert len(patches) == len(modules) and all(k in model_weights for k in patches)
    assert set(patched.patches) == set(patches)

    patched.patch_model()
    try:
        got = comfy_run(patched, inputs)
    finally:
        patched.unpatch_model()
    assert (got - expected).abs().max() <= 1e-5, (got - expected).abs().max()


# ------------------------------------------------------------------------------------------------- full student


def test_full_student_folder(tmp_path: Path) -> None:
    unet = sd(PipelineTCDScheduler()).unet
    with torch.no_grad():
        unet.conv_out.bias.add_(0.5)  # a trained student: not the factory's weights
    target = tmp_path / "out" / "unet"
    assert save_full_student(unet, target) == target
    loaded = UNet2DConditionModel.from_pretrained(target)
    inputs = unet_inputs(unet)
    assert torch.equal(run(loaded, inputs), run(unet, inputs))
    assert sorted(p.name for p in tmp_path.joinpath("out").iterdir()) == ["unet"]  # no temporary folder left

    write_card(target, {"scheduler": scheduler_settings(SD_TEACHER)})  # a card beside it is replaced with it
    with torch.no_grad():
        unet.conv_out.bias.add_(0.5)
    save_full_student(unet, target)
    assert not (target / CARD_NAME).exists()
    assert torch.equal(UNet2DConditionModel.from_pretrained(target).conv_out.bias, unet.conv_out.bias)
    assert sorted(p.name for p in tmp_path.joinpath("out").iterdir()) == ["unet"]

    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"notes\.txt"):
        save_full_student(unet, target)
    add_lora(unet, seed=5)
    with pytest.raises(ValueError, match="peft adapters"):
        save_full_student(unet, tmp_path / "other")


# -------------------------------------------------------------------------------------------------------- card


def test_card_round_trip_and_scheduler(tmp_path: Path) -> None:
    section = scheduler_settings(SD_TEACHER, num_inference_steps=4, eta=0.3, guidance_scale=1.0,
                                 original_inference_steps=50, timestep_spacing="trailing")  # fmt: skip
    teacher_schedule = {k: v for k, v in SD_TEACHER.items() if k in export.SCHEDULE_KEYS}  # nothing else taken over
    assert section["config"] == {**teacher_schedule, "original_inference_steps": 50, "timestep_spacing": "trailing",
                                 "eta": 0.3}  # fmt: skip
    card = {
        "config": {"method": "tcd", "lora_rank": 4, "lr": 1e-4},
        "data": {"source": "images/", "images": 12, "skipped": 1},
        "steps": 3,
        "loss": [0.5, 0.25, torch.tensor(0.125)],
        "scheduler": section,
    }
    path = write_card(tmp_path / "run", card)
    assert path == tmp_path / "run" / CARD_NAME
    loaded = load_card(tmp_path / "run")
    assert loaded == load_card(path)
    assert loaded["loss"] == [0.5, 0.25, 0.125] and loaded["format"] == "tcd-sampler-card"
    assert {k: v for k, v in loaded.items() if k not in ("format", "format_version", "loss")} == {
        k: v for k, v in card.items() if k != "loss"
    }

    scheduler = scheduler_from_card(loaded)
    assert type(scheduler) is TCDScheduler
    assert scheduler.config["timestep_spacing"] == "trailing" and scheduler.config["eta"] == 0.3
    kwargs = pipeline_kwargs(tmp_path / "run")
    assert kwargs == {"num_inference_steps": 4, "eta": 0.3, "guidance_scale": 1.0}
    scheduler.set_timesteps(kwargs["num_inference_steps"])
    assert scheduler.timesteps.tolist() == [999, 749, 499, 249]  # trailing applied: it was explicit in the card
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    for t in scheduler.timesteps:
        out = scheduler.step(0.1 * x, t, x, eta=kwargs["eta"], generator=g)
        assert isinstance(out, TCDSchedulerOutput)
        x = out.prev_sample
    assert torch.isfinite(x).all()
    assert type(scheduler_from_card(path)) is TCDScheduler


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.pop("scheduler"), "no 'scheduler'"),
        (lambda c: c["scheduler"].update({"class": "LCMScheduler"}), "must be 'TCDScheduler'"),
        (lambda c: c["scheduler"]["config"].update({"_class_name": "PNDMScheduler"}), "not TCDScheduler parameters"),
        (lambda c: c["scheduler"]["config"].update({"beta_schedule": "cubic"}), "scheduler settings are invalid"),
        (lambda c: c["scheduler"].update({"eta": 1.5}), "eta"),
        (lambda c: c["scheduler"].update({"num_inference_steps": 0}), "num_inference_steps"),
        (lambda c: c.update({"loss": [math.nan]}), "not JSON-serializable"),
        (lambda c: c.update({"steps": -1}), "steps"),
        (lambda c: c.update({"format_version": 2}), "version"),
    ],
)
def test_bad_cards(change: Callable[[dict[str, Any]], Any], message: str, tmp_path: Path) -> None:
    card: dict[str, Any] = {"steps": 1, "loss": [1.0], "scheduler": scheduler_settings(SD_TEACHER)}
    change(card)
    with pytest.raises(ValueError, match=message):
        write_card(tmp_path, card)
    assert list(tmp_path.iterdir()) == []


def test_load_card_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_card(tmp_path)
    (tmp_path / CARD_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON card"):
        load_card(tmp_path)
    incomplete = {"scheduler": {"class": "TCDScheduler", "config": {"steps_offset": 1}}}
    (tmp_path / CARD_NAME).write_text(json.dumps(incomplete))
    with pytest.raises(ValueError, match="lacks"):
        scheduler_from_card(tmp_path)


# ------------------------------------------------------------------------------------------ interrupted writes


def half_then_fail(real: Callable[..., Any], fail_on: int) -> tuple[Callable[..., None], list[str]]:
    """A stand-in for safetensors' ``save_file`` that writes the first ``fail_on - 1`` files whole and then half of
    the next one before raising, as a full disk would; records the paths it was given."""
    calls: list[str] = []

    def save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: Any = None) -> None:
        calls.append(filename)
        real(tensors, filename, metadata=metadata)
        if len(calls) == fail_on:
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            raise RuntimeError("No space left on device")

    return save_file, calls


@pytest.mark.parametrize("fail_on", [1, 2])
def test_interrupted_lora_write_leaves_no_partial_file(
    fail_on: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    unet = add_lora(sd(PipelineTCDScheduler()).unet, seed=6)
    folder = tmp_path / "lora"
    fake, calls = half_then_fail(safetensors.torch.save_file, fail_on)
    monkeypatch.setattr(safetensors.torch, "save_file", fake)
    with pytest.raises(OSError, match=r"cannot write .*: no space left on device"):
        save_lora(unet, folder)
    assert len(calls) == fail_on and all(Path(p).parent == folder for p in calls)
    assert list(folder.iterdir()) == []  # neither target, nor a temporary file

    monkeypatch.undo()
    save_lora(unet, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with torch.no_grad():
        next(p for n, p in unet.named_parameters() if ".lora_B" in n).add_(1.0)
    fake, _ = half_then_fail(safetensors.torch.save_file, fail_on)
    monkeypatch.setattr(safetensors.torch, "save_file", fake)
    with pytest.raises(OSError, match=r"cannot write .*: no space left on device"):
        save_lora(unet, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the previous LoRA, untouched


def test_interrupted_student_and_card_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unet = sd(PipelineTCDScheduler()).unet
    real = UNet2DConditionModel.save_pretrained

    def half_written(self: Any, save_directory: Any, **kwargs: Any) -> None:
        real(self, save_directory, **kwargs)
        weights = Path(save_directory) / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        raise OSError("No space left on device")

    monkeypatch.setattr(UNet2DConditionModel, "save_pretrained", half_written)
    with pytest.raises(OSError, match=r"cannot write .*: no space left on device"):
        save_full_student(unet, tmp_path / "student")
    assert list(tmp_path.iterdir()) == []  # no student folder, no temporary one

    card = {"steps": 1, "loss": [1.0], "scheduler": scheduler_settings(SD_TEACHER)}
    write_card(tmp_path / "run", card)
    old = (tmp_path / "run" / CARD_NAME).read_bytes()

    def write_half(self: Path, text: str, *args: Any, **kwargs: Any) -> int:
        with open(self, "w", encoding="utf-8") as f:
            f.write(text[: len(text) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", write_half)
    with pytest.raises(OSError, match=r"cannot write .*: no space left on device"):
        write_card(tmp_path / "run", {**card, "steps": 2})
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "run").iterdir()] == [CARD_NAME]
    assert (tmp_path / "run" / CARD_NAME).read_bytes() == old


def test_state_dicts_without_writing() -> None:
    unet = add_lora(sd(PipelineTCDScheduler()).unet, seed=7)
    diffusers_sd, comfy_sd, config = lora_state_dicts(unet)
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA
    assert len(comfy_sd) == 3 * len(diffusers_sd) // 2
    assert all(k.startswith("lora_unet_") for k in comfy_sd)
    assert export.COMFYUI_SUFFIX == "_comfyui.safetensors"


# ---------------------------------------------------------------------------------------- checksums, permissions


def test_the_card_records_the_results_and_their_loaders_check_them(tmp_path: Path) -> None:
    """``write_card`` records the SHA-256 and size of the LoRA (both formats) or the ``unet/`` folder beside it;
    ``verify_card_files`` (what loading such a folder calls) refuses a file with one flipped byte, naming it."""
    from tcd_sampler import _checksums
    from tcd_sampler.integrations.pipelines import verify_local_files

    folder = save_lora(add_lora(sd(PipelineTCDScheduler()).unet, seed=8), tmp_path / "run")
    (folder / "validation.png").write_bytes(b"not a result")  # other files are not recorded
    write_card(folder, {"steps": 1, "scheduler": scheduler_settings(SD_TEACHER), "files": {"stale": "given"}})
    card = load_card(folder)
    comfy = comfyui_lora_path(folder).name
    assert sorted(card["files"]) == sorted([LORA_WEIGHT_NAME, comfy])
    for name, entry in card["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert sorted(export.verify_card_files(folder)) == sorted([LORA_WEIGHT_NAME, comfy])
    assert export.verify_card_files(folder, only=[comfy]) == [comfy]

    data = bytearray((folder / LORA_WEIGHT_NAME).read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / LORA_WEIGHT_NAME).write_bytes(bytes(data))
    _checksums._clear_cache()
    damaged = rf"{LORA_WEIGHT_NAME} is damaged \(sha256 differs from the one its card .*card\.json records\)"
    with pytest.raises(ValueError, match=damaged):
        export.verify_card_files(folder)
    with pytest.raises(ValueError, match=damaged):
        verify_local_files(folder)  # what load_pipeline(lora=folder) and `generate --lora` check
    with pytest.raises(ValueError, match=damaged):
        verify_local_files(folder / LORA_WEIGHT_NAME)
    verify_local_files(folder / comfy)  # the intact file alone passes
    (folder / comfy).write_bytes(b"cut")
    with pytest.raises(ValueError, match=r"is damaged \(3 bytes; its card .* records \d+\)"):
        export.verify_card_files(folder, only=[comfy])

    student = tmp_path / "full"  # a full student: unet/ beside the card
    save_full_student(sd(PipelineTCDScheduler()).unet, student / "unet")
    write_card(student, {"scheduler": scheduler_settings(SD_TEACHER)})
    assert sorted(load_card(student)["files"]) == ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    assert export.verify_card_files(student, only=["unet"]) == sorted(load_card(student)["files"])


def test_cards_without_files_and_malformed_files(tmp_path: Path) -> None:
    write_card(tmp_path / "empty", {"scheduler": scheduler_settings(SD_TEACHER)})
    assert "files" not in load_card(tmp_path / "empty")  # nothing to record: no entry, as before
    assert export.verify_card_files(tmp_path / "empty") == []
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / CARD_NAME).write_text('{"files": 3}')  # another tool's card.json: not ours, not checked
    assert export.verify_card_files(tmp_path / "foreign") == []
    card = json.loads((tmp_path / "empty" / CARD_NAME).read_text())
    for files, message in [
        ({"../x": {"sha256": "0" * 64, "bytes": 1}}, "not a relative path"),
        ({"x": {"sha256": "xyz", "bytes": 1}}, "must be"),
        ([], "must be a mapping"),
    ]:
        (tmp_path / "empty" / CARD_NAME).write_text(json.dumps({**card, "files": files}))
        with pytest.raises(ValueError, match=message):
            load_card(tmp_path / "empty")
        with pytest.raises(ValueError, match=message):
            export.verify_card_files(tmp_path / "empty")


def test_exported_files_get_the_modes_a_plain_open_gives(tmp_path: Path) -> None:
    """safetensors writes 0600 and ``mkdtemp`` makes 0700: the exported LoRA, student folder and their files get the
    mode the card gets, what the umask gives a plain ``open()``/``mkdir()``."""
    old = os.umask(0o027)
    try:
        folder = save_lora(add_lora(sd(PipelineTCDScheduler()).unet, seed=9), tmp_path / "run")
        card = write_card(folder, {"scheduler": scheduler_settings(SD_TEACHER)})
        student = save_full_student(sd(PipelineTCDScheduler()).unet, tmp_path / "run" / "unet")
    finally:
        os.umask(old)
    mode = card.stat().st_mode & 0o777
    assert mode == 0o640
    for file in (folder / LORA_WEIGHT_NAME, comfyui_lora_path(folder), *student.iterdir()):
        assert file.stat().st_mode & 0o777 == mode, file
    assert student.stat().st_mode & 0o777 == 0o750
    os.chmod(folder / LORA_WEIGHT_NAME, 0o600)  # a replaced file keeps the mode its owner gave it
    save_lora(add_lora(sd(PipelineTCDScheduler()).unet, seed=10), folder)
    assert (folder / LORA_WEIGHT_NAME).stat().st_mode & 0o777 == 0o600
