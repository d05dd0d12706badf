"""TCD's training objective on diffusers UNets equals a float64 reference written here from the paper's algorithm
(TCD and LCM, epsilon and v-prediction teachers, huber and L2), and a short run lowers it on tiny SD and SDXL UNets,
with a LoRA student and a full one."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tcd_sampler.distill.objective import Objective, batch_loss, draw
from tcd_sampler.distill.teachers import Conditioning, teacher_path
from tiny_pipelines import _unet

SD_CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}


def perturbed(unet: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    other = copy.deepcopy(unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return other


def sd_batch(dtype: torch.dtype, batch: int = 3, sdxl: bool = False) -> tuple[torch.Tensor, Conditioning, Conditioning]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, 4, 8, 8, generator=g, dtype=dtype)
    dim = 32 if sdxl else 16
    text = torch.randn(batch, 3, dim, generator=g, dtype=dtype)
    added = {}
    if sdxl:
        added = {"text_embeds": torch.randn(batch, 16, generator=g, dtype=dtype),
                 "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch, dtype=dtype)}  # fmt: skip
    cond = Conditioning(text, added)
    uncond = Conditioning(torch.zeros_like(text), {k: torch.zeros_like(v) for k, v in added.items()})
    return z, cond, uncond


def reference_loss(objective, acp, prediction_type, student, target, teacher, z, cond, uncond, d):  # type: ignore[no-untyped-def]
    """The objective in float64, straight from the algorithm (independent of the package's step code)."""
    acp = acp.double()
    a = lambda t: acp[t].sqrt().reshape(-1, 1, 1, 1)  # noqa: E731
    s = lambda t: (1 - acp[t]).sqrt().reshape(-1, 1, 1, 1)  # noqa: E731

    def run(unet, x, t, c):  # type: ignore[no-untyped-def]
        kw = {"added_cond_kwargs": c.added_cond_kwargs} if c.added_cond_kwargs else {}
        return unet(x, t, encoder_hidden_states=c.encoder_hidden_states, **kw).sample.double()

    def x0_eps(m, x, t):  # type: ignore[no-untyped-def]
        if prediction_type == "epsilon":
            return (x - s(t) * m) / a(t), m
        return a(t) * x - s(t) * m, a(t) * m + s(t) * x  # v

    def consistency(unet, x, t, t_m):  # type: ignore[no-untyped-def]
        x0, eps = x0_eps(run(unet, x, t, cond), x, t)
        if objective.method == "lcm":
            scaled = (t * objective.timestep_scaling).double().reshape(-1, 1, 1, 1)
            c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25).sqrt()
            return c_out * x0 + c_skip * x  # the clean end: x_s = x̂0
        return a(t_m) * x0 + s(t_m) * eps

    x = a(d.t) * z + s(d.t) * d.noise.double()
    w = d.omega.reshape(-1, 1, 1, 1)
    m = run(teacher, x, d.t, uncond) + w * (run(teacher, x, d.t, cond) - run(teacher, x, d.t, uncond))
    x0, eps = x0_eps(m, x, d.t)
    x_n = a(d.t_n) * x0 + s(d.t_n) * eps
    with torch.no_grad():
        y = consistency(target, x_n, d.t_n, d.t_m)
    diff = consistency(student, x, d.t, d.t_m) - y
    if objective.distance == "huber":
        return (torch.sqrt(diff**2 + objective.huber_c**2) - objective.huber_c).mean()
    return (diff**2).mean()


@pytest.mark.parametrize("method", ["tcd", "lcm"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("distance", ["huber", "l2"])
@pytest.mark.parametrize("sdxl", [False, True])
def test_the_loss_equals_a_float64_reference(method: str, prediction_type: str, distance: str, sdxl: bool) -> None:
    objective = Objective(method=method, distance=distance)
    path, _ = teacher_path(SD_CONFIG)
    teacher = _unet(cross_attention_dim=32 if sdxl else 16, pooled_dim=16 if sdxl else None).double()
    student, target = perturbed(teacher, 1), perturbed(teacher, 2)
    z, cond, uncond = sd_batch(torch.float64, sdxl=sdxl)
    d = draw(objective, 1000, tuple(z.shape), torch.Generator().manual_seed(3))
    ours = batch_loss(objective, path, prediction_type, student, target, teacher, z, cond, uncond, d)
    ref = reference_loss(objective, path.alphas_cumprod, prediction_type, student, target, teacher, z, cond, uncond, d)
    # LCM's boundary scalings are computed in float32 from the integer timestep, as the reference scheduler does
    assert math.isclose(ours.item(), ref.item(), rel_tol=1e-10 if method == "tcd" else 1e-6)
    ours.backward()
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)  # type: ignore[union-attr]
    assert all(p.grad is None for p in teacher.parameters()) and all(p.grad is None for p in target.parameters())


@pytest.mark.parametrize("method", ["tcd", "lcm"])
def test_guidance_off_is_the_conditional_teacher_alone(method: str) -> None:
    objective = Objective(method=method, guidance_min=1.0, guidance_max=1.0)
    path, _ = teacher_path(SD_CONFIG)
    teacher = _unet(cross_attention_dim=16).double()
    student, target = perturbed(teacher, 1), perturbed(teacher, 2)
    z, cond, uncond = sd_batch(torch.float64)
    d = draw(objective, 1000, tuple(z.shape), torch.Generator().manual_seed(3))
    assert bool((d.omega == 1.0).all())
    ours = batch_loss(objective, path, "epsilon", student, target, teacher, z, cond, None, d)  # no uncond needed
    ref = reference_loss(objective, path.alphas_cumprod, "epsilon", student, target, teacher, z, cond, uncond, d)
    assert math.isclose(ours.item(), ref.item(), rel_tol=1e-10 if method == "tcd" else 1e-6)
    with pytest.raises(ValueError, match="needs uncond"):
        batch_loss(Objective(method=method), path, "epsilon", student, target, teacher, z, cond, None, d)


def test_the_draws_follow_the_grid_and_the_guidance_range() -> None:
    objective = Objective(guidance_min=2.0, guidance_max=8.0)
    d = draw(objective, 1000, (4096, 1), torch.Generator().manual_seed(0))
    assert torch.equal(d.t - d.t_n, torch.full_like(d.t, 20)) and bool(((d.t_n + 1) % 20 == 0).all())
    assert int(d.t.max()) <= 999 and int(d.t_n.min()) >= 19
    assert bool((d.t_m <= d.t_n).all()) and bool(((d.t_m == 0) | ((d.t_m + 1) % 20 == 0)).all())
    assert float(d.omega.min()) >= 2.0 and float(d.omega.max()) <= 8.0
    assert torch.equal(d.rows(1, 3).t, d.t[1:3])


@pytest.mark.parametrize("sdxl", [False, True])
@pytest.mark.parametrize("lora", [True, False])
def test_a_short_run_lowers_the_loss(sdxl: bool, lora: bool) -> None:
    torch.manual_seed(0)
    objective = Objective()
    path, _ = teacher_path(SD_CONFIG)
    teacher = _unet(cross_attention_dim=32 if sdxl else 16, pooled_dim=16 if sdxl else None)
    teacher.requires_grad_(False)
    student = copy.deepcopy(teacher)
    if lora:
        from peft import LoraConfig

        student.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))  # fmt: skip
        params = [p for p in student.parameters() if p.requires_grad]
        target = student  # LoRA: the target is the student itself (LCM-LoRA's recipe), without gradients
    else:
        student.requires_grad_(True)
        params = list(student.parameters())
        target = copy.deepcopy(teacher)
    z, cond, uncond = sd_batch(torch.float32, batch=4, sdxl=sdxl)
    d = draw(objective, 1000, tuple(z.shape), torch.Generator().manual_seed(5))
    opt = torch.optim.Adam(params, lr=1e-2 if lora else 3e-4)
    losses = []
    for _ in range(25):
        loss = batch_loss(objective, path, "epsilon", student, target, teacher, z, cond, uncond, d)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_bad_settings_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="method must be one of"):
        Objective(method="dmd")
    with pytest.raises(ValueError, match="guidance_max must be in"):
        Objective(guidance_min=5.0, guidance_max=2.0)
    with pytest.raises(ValueError, match="distance must be one of"):
        Objective(distance="l1")
    with pytest.raises(ValueError, match="fewer than 2 grid points"):
        draw(Objective(skip=600), 1000, (2, 1), torch.Generator())
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        teacher_path({**SD_CONFIG, "prediction_type": "flow"})
    with pytest.raises(ValueError, match="flow-matching teacher"):
        teacher_path({"shift": 3.0})
    with pytest.raises(ValueError, match="EDM teacher"):
        teacher_path({"sigma_data": 0.5, "sigma_max": 80.0})
    assert teacher_path({**SD_CONFIG, "sigma_min": None, "sigma_max": None})[1] == "epsilon"  # EulerDiscrete's keys
