"""The counters of benchmarks/estimate_memory.py on a tiny UNet: what they count on meta tensors is what they count
on real CPU tensors, gradient checkpointing lowers it (and the checkpointed counts derived from one plain pass are
those of a real checkpointed pass), and the LoRA sizes from the layers' shapes are peft's."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import estimate_memory as em

ROWS = 2


def _counts(device: str, lora: bool) -> dict[str, Any]:
    """The counts of one model on ``device``: a bf16 base with an fp32 LoRA on the LCM list (convolutions
    included), or a fully trainable fp32 UNet (autocast's cache of its casts)."""
    torch.manual_seed(0)
    unet = em.build_unet(em.TINY_UNET, device=device)
    if lora:
        em.add_lora(unet, em.LORA_LCM, rank=4)
    else:
        unet.requires_grad_(True)
        em.set_trainable_dtype(unet, torch.float32)
    args, kwargs = em.unet_inputs(em.TINY_UNET, ROWS, device=device)
    real_ckpt, seen = em.student_pass(unet, args, kwargs)
    return {
        "passes": em.student_passes(unet, args, kwargs),
        "real_ckpt": real_ckpt,
        "seen": {t.__name__ for t in seen},
        "nograd": em.nograd_peak(unet, args, kwargs),
    }


@pytest.fixture(scope="module", params=[True, False], ids=["lora", "full"])
def counts(request: pytest.FixtureRequest) -> dict[str, dict[str, Any]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add synchronisation
    try:
        return {device: _counts(device, request.param) for device in ("meta", "cpu")}
    finally:
        torch.set_num_threads(threads)


def test_meta_counts_equal_cpu_counts(counts: dict[str, dict[str, Any]]) -> None:
    meta, cpu = counts["meta"], counts["cpu"]
    assert cpu["passes"][False].saved > 0
    assert meta["passes"] == cpu["passes"]  # saved, cached casts, largest, segment, for checkpointing off and on
    assert meta["real_ckpt"] == cpu["real_ckpt"]
    assert meta["nograd"] == cpu["nograd"] > 0


def test_checkpointing_lowers_the_saved_bytes(counts: dict[str, dict[str, Any]]) -> None:
    for device in ("meta", "cpu"):
        passes, real = counts[device]["passes"], counts[device]["real_ckpt"]
        assert 0 < passes[True].saved < passes[False].saved
        assert 0 < passes[True].segment < passes[False].saved
        assert (real.saved, real.cache) == (passes[True].saved, passes[True].cache)  # derived = real checkpoint
        assert counts[device]["seen"] == {"ResnetBlock2D", "BasicTransformerBlock"}


def test_full_student_caches_its_casts() -> None:
    """An fp32 student under autocast keeps a bf16 cast of its weights (autocast's cache): saved for backward
    without checkpointing, held beside the saved bytes with it (at most a bf16 copy of every parameter)."""
    unet = em.build_unet(em.TINY_UNET).requires_grad_(True)
    em.set_trainable_dtype(unet, torch.float32)
    args, kwargs = em.unet_inputs(em.TINY_UNET, ROWS)
    passes = em.student_passes(unet, args, kwargs)
    assert passes[False].cache < passes[True].cache <= 2 * em.parameter_count(unet)


@pytest.mark.parametrize("targets", [em.LORA_ATTENTION, em.LORA_LCM], ids=["attention", "lcm"])
@pytest.mark.parametrize("linear_projection", [True, False])
def test_lora_parameter_count_is_peft_count(targets: tuple[str, ...], linear_projection: bool) -> None:
    config = {**em.TINY_UNET, "use_linear_projection": linear_projection}
    unet = em.build_unet(config, device="cpu")
    expected = em.lora_parameter_count(unet, targets, rank=4)
    em.add_lora(unet, targets, rank=4)
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert trainable == expected > 0
    assert {p.dtype for p in unet.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in unet.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_attention_saves_what_cuda_kernels_save() -> None:
    """The emulated attention saves q, k, v, the output and a float32 log-sum-exp, not the (L × L) matrix."""
    q = torch.randn(1, 2, 64, 8, device="meta", dtype=torch.bfloat16, requires_grad=True)
    counter = em.SavedTensors(set())
    with counter.hooks(), em.CudaEmulation():
        out = torch.nn.functional.scaled_dot_product_attention(q * 1, q * 2, q * 3)
    assert counter.bytes == 4 * q.numel() * 2 + 2 * 64 * 4
    del out
