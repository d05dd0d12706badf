"""The TCD nodes in the real ComfyUI (the vendored source, see tests/comfy_env.py): loaded with ComfyUI's own
``nodes.load_custom_node`` from a clone of this repository and from the pip shim, run through the real
``SamplerCustom`` on real ``BaseModel``s of every model sampling family. γ = 0 is ComfyUI's ``euler``, γ = 1 its
``lcm``; on SD1.5 the TCD sigmas reproduce ``TCDScheduler``; inpainting, img2img, batches and previews work; a step
lands on the exact marginal of a flow and an EDM model."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

import comfy_env as ce
from tcd_sampler import TCDScheduler
from tcd_sampler.core.paths.times import GridTime
from tcd_sampler.core.table import build_table
from tcd_sampler.integrations.comfyui import sample_tcd_comfy, tcd_path

SCHEDULES = ("simple", "sgm_uniform", "karras", "tcd")


@pytest.fixture(scope="module")
def nodes() -> Iterator[dict[str, Any]]:
    """Our nodes, loaded as ComfyUI loads a clone in custom_nodes/ (the repository root's __init__.py)."""
    c = ce.comfy_or_skip()
    added = ce.load_custom_node(ce.REPO_ROOT)
    yield {name: c.nodes.NODE_CLASS_MAPPINGS[name] for name in added}
    for name in added:
        c.nodes.NODE_CLASS_MAPPINGS.pop(name, None)
    _MODELS.clear()  # model patchers go while ComfyUI is still whole (their __del__ needs it)
    gc.collect()


_MODELS: dict[str, Any] = {}


def model(kind: str) -> Any:
    if kind not in _MODELS:
        _MODELS[kind] = ce.tiny_model(kind)
    return _MODELS[kind]


def tcd(nodes: dict[str, Any], gamma: float) -> Any:
    return nodes["SamplerTCD"]().get_sampler(gamma)[0]


def schedule(nodes: dict[str, Any], patcher: Any, name: str, steps: int = 4, denoise: float = 1.0) -> torch.Tensor:
    if name == "tcd":
        return nodes["TCDScheduler"]().get_sigmas(patcher, steps, denoise, 50)[0]
    if name == "karras":
        return ce.karras_sigmas(patcher, steps)
    return ce.sigmas(patcher, name, steps, denoise)


def lcm() -> Any:
    """ComfyUI's own ``lcm`` with current ComfyUI's step noise (seed + 1 on the CPU; 0.3.64 reuses the seed, and with
    it the initial noise, which the node does not: see ``step_noise``)."""
    c = ce.comfy_or_skip()
    k = c.k_diffusion_sampling

    def sample(model: Any, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Any, callback: Any, disable: Any) -> Any:
        noise = k.default_noise_sampler(x, seed=extra_args["seed"] + 1)
        return k.sample_lcm(model, x, sigmas, extra_args, callback, disable, noise_sampler=noise)

    return c.samplers.KSAMPLER(sample)


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    return bool((a - b).abs().max() <= rel * b.abs().max())


def test_the_nodes_load_from_a_clone_and_from_the_pip_shim(nodes: dict[str, Any], tmp_path: Any) -> None:
    c = ce.comfy_or_skip()
    assert set(nodes) == {"SamplerTCD", "TCDScheduler"}
    assert c.nodes.NODE_DISPLAY_NAME_MAPPINGS["SamplerTCD"] == "TCD Sampler"
    shim = tmp_path / "tcd_sampler_nodes.py"
    shim.write_text("from tcd_sampler.integrations.comfyui import *  # noqa: F401,F403\n")
    for name in ce.load_custom_node(shim):  # already present from the clone: the shim adds nothing new
        c.nodes.NODE_CLASS_MAPPINGS.pop(name, None)
    assert "tcd" in c.samplers.KSampler.SAMPLERS and "tcd" in c.samplers.KSAMPLER_NAMES
    assert "tcd" in c.nodes_custom_sampler.KSamplerSelect.INPUT_TYPES()["required"]["sampler_name"][0]
    tooltip = nodes["SamplerTCD"].INPUT_TYPES()["required"]["gamma"][1]["tooltip"]
    assert "eta" in tooltip and "0: deterministic" in tooltip and "1: LCM" in tooltip


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("kind", ce.KINDS)
def test_gamma_0_is_euler_and_gamma_1_is_lcm(nodes: dict[str, Any], kind: str, name: str) -> None:
    patcher = model(kind)
    sigmas = schedule(nodes, patcher, name)
    run = lambda sampler, seed=7: ce.sample_custom(patcher, sampler, sigmas, ce.latent(), seed=seed).samples  # noqa: E731
    assert close(run(tcd(nodes, 0.0)), run(ce.sampler("euler")))
    assert close(run(tcd(nodes, 1.0)), run(lcm()))
    a, b, other = run(tcd(nodes, 0.3)), run(tcd(nodes, 0.3)), run(tcd(nodes, 0.3), seed=8)
    assert torch.isfinite(a).all() and torch.equal(a, b) and not torch.equal(a, other)


def test_the_stock_ksampler_entry_is_tcd_at_gamma_03(nodes: dict[str, Any]) -> None:
    patcher = model("eps")
    sigmas = schedule(nodes, patcher, "tcd")
    stock = ce.sample_custom(patcher, ce.sampler("tcd"), sigmas, ce.latent(), seed=3).samples
    assert torch.equal(stock, ce.sample_custom(patcher, tcd(nodes, 0.3), sigmas, ce.latent(), seed=3).samples)


class ReplayedNoise:
    """The same z for both loops, in the order they draw it."""

    def __init__(self, shape: tuple[int, ...], n: int) -> None:
        g = torch.Generator().manual_seed(11)
        self.draws = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]

    def sampler(self) -> Any:
        it = iter(self.draws)
        return lambda sigma, sigma_next: next(it)


class Wrapped:
    """A denoiser with ComfyUI's attribute path to its model sampling (``model.inner_model.inner_model``)."""

    def __init__(self, fn: Any, model_sampling: Any) -> None:
        self.fn = fn
        self.inner_model = type("Guider", (), {"inner_model": type("Model", (), {"model_sampling": model_sampling})})

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.fn(x, sigma)


def test_the_tcd_sigmas_on_sd15_reproduce_the_scheduler(nodes: dict[str, Any]) -> None:
    """Each interior step's s is TCDScheduler's integer timestep, and with the same noise the trajectory is the
    scheduler's (VE latents are the VP ones divided by α_t) within 1e-5."""
    patcher = model("eps")
    ms = ce.model_sampling(patcher)
    sigmas = schedule(nodes, patcher, "tcd")
    sched = TCDScheduler()
    sched.set_timesteps(4)
    assert torch.equal(sigmas[:-1], ms.sigmas[sched.timesteps])
    path = tcd_path(ms)
    assert isinstance(path.time, GridTime)
    rows = build_table(path, sigmas.double().numpy(), 0.3).rows
    ours = [round(float(path.time.sigma_to_t(np.array([r.s]))[0])) for r in rows[:-1]]
    assert ours == [r.s for r in sched.step_table(0.3).rows[:-1]] == [531, 349, 181]

    bm = patcher.model
    ctx = torch.zeros(1, ce.TOKENS, ce.CONTEXT_DIM)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:  # the model in float32, read in float64
        return bm.apply_model(x.float(), sigma.float(), c_crossattn=ctx).double()

    x_ve = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * sigmas[0]
    noise = ReplayedNoise(tuple(x_ve.shape), 3)
    seen: list[torch.Tensor] = []
    got = sample_tcd_comfy(
        Wrapped(denoise, ms), x_ve, sigmas.double(), gamma=0.3, noise_sampler=noise.sampler(),
        callback=lambda d: seen.append(d["x"]),
    )  # fmt: skip
    acp = sched.alphas_cumprod.double()
    x = x_ve * acp[999].sqrt()
    replay = iter(noise.draws)
    for i, t in enumerate(sched.timesteps.tolist()):
        a = acp[t].sqrt()
        torch.testing.assert_close(seen[i], x / a, rtol=1e-5, atol=1e-5)  # each model call's input
        eps = (x / a - denoise(x / a, sigmas[i : i + 1].double())) / sigmas[i].double()
        row = sched.step_table(0.3, torch.float64).rows[i]
        x0 = (x - row.sigma_t * eps) / row.alpha_t
        x_s = row.alpha_s * x0 + row.sigma_s * eps
        x = row.renoise * x_s + row.noise * next(replay) if row.draws_noise else x_s
    # the scheduler's last step ends at ᾱ_0; sigma-space loops end clean, at that step's x̂0
    torch.testing.assert_close(got, x0, rtol=1e-5, atol=1e-5)


def test_img2img_inpainting_a_batch_and_previews(nodes: dict[str, Any]) -> None:
    """denoise < 1 takes TCDScheduler's strength; a noise mask keeps the unmasked latent; a batch of 2 runs; the
    previews get x̂0 (the model's denoised output at each step's input), not the noisy latent."""
    patcher = model("eps")
    image = ce.latent(batch=2, seed=4, scale=0.5)
    sigmas = schedule(nodes, patcher, "tcd", steps=2, denoise=0.5)
    sched = TCDScheduler()
    sched.set_timesteps(2, strength=0.5)
    assert torch.equal(sigmas[:-1], ce.model_sampling(patcher).sigmas[sched.timesteps])
    assert close(
        ce.sample_custom(patcher, tcd(nodes, 0.0), sigmas, image, seed=1).samples,
        ce.sample_custom(patcher, ce.sampler("euler"), sigmas, image, seed=1).samples,
    )
    mask = torch.ones(2, 8, 8)
    mask[:, :, :4] = 0.0  # keep the left half
    out = ce.sample_custom(patcher, tcd(nodes, 0.3), sigmas, image, seed=1, noise_mask=mask)
    assert torch.isfinite(out.samples).all() and not torch.equal(out.samples[0], out.samples[1])
    torch.testing.assert_close(out.samples[..., :4], image["samples"][..., :4], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.samples[..., 4:], image["samples"][..., 4:], atol=1e-3)

    bm, sig = patcher.model, schedule(nodes, patcher, "tcd")
    run = ce.sample_custom(patcher, tcd(nodes, 0.3), sig, ce.latent(batch=2), seed=2)
    assert [p.step for p in run.previews] == [0, 1, 2, 3] and all(p.total_steps == 4 for p in run.previews)
    for p, s in zip(run.previews, sig[:-1], strict=True):
        denoised = bm.apply_model(p.x, s.expand(2), c_crossattn=ce.conditioning(0.0, 2)[0][0])
        torch.testing.assert_close(p.x0, denoised, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run.denoised, bm.process_latent_out(run.previews[-1].x0), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the exact marginal, through the node

N_SIDE = (250, 200)  # 50 000 samples of 4-dim Gaussian data, one per latent pixel
MU = torch.tensor([0.8, -0.4, 0.2, 0.0], dtype=torch.float64)
L = torch.tensor([[0.7, 0, 0, 0], [0.3, 0.9, 0, 0], [0, 0.2, 0.5, 0], [0.1, 0, 0.3, 0.6]], dtype=torch.float64)


class OracleNet(torch.nn.Module):
    """A diffusion model that knows the clean data: whatever its input, its output is what the model sampling
    turns into the exact x̂0 (its calculate_denoised is affine in the output)."""

    def __init__(self, **_: Any) -> None:
        super().__init__()
        self.dtype = torch.float32
        self.x0: torch.Tensor | None = None
        self.ms: Any = None

    def forward(
        self, x_in: torch.Tensor, timesteps: torch.Tensor, transformer_options: Any = None, **_: Any
    ) -> torch.Tensor:
        assert self.x0 is not None and self.ms is not None
        sigma = torch.as_tensor(transformer_options["sigmas"]).reshape(-1).float()  # what the guider hands over
        x = x_in / self.ms.calculate_input(sigma, torch.ones_like(x_in))
        at_zero = self.ms.calculate_denoised(sigma, torch.zeros_like(x), x)
        slope = self.ms.calculate_denoised(sigma, torch.ones_like(x), x) - at_zero
        return (self.x0 - at_zero) / slope


def oracle_model(kind: str) -> Any:
    c = ce.comfy_or_skip()
    unet_config = {"in_channels": ce.CHANNELS, "out_channels": ce.CHANNELS, "model_channels": 8,
                   "context_dim": ce.CONTEXT_DIM, "adm_in_channels": None, "use_linear_in_transformer": False,
                   "use_temporal_attention": False, "dtype": torch.float32}  # fmt: skip
    bm = c.model_base.BaseModel(
        c.supported_models.SD15(unet_config), model_type=c.model_base.ModelType.EPS, device=torch.device("cpu"),
        unet_model=OracleNet,
    )  # fmt: skip
    patcher = c.model_patcher.ModelPatcher(bm, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    node, kwargs = ce.RECIPES[kind]  # type: ignore[misc]
    return getattr(c.nodes_model_advanced, node)().patch(patcher, **kwargs)[0]


def assert_marginal(y: torch.Tensor, alpha: float, sigma: float) -> None:
    """Latent pixels y ~ N(α·μ, α²·LLᵀ + σ²·I) within 4 standard errors, entry by entry."""
    x = y.double().reshape(4, -1).T
    n = x.shape[0]
    mean, cov = alpha * MU, alpha**2 * L @ L.T + sigma**2 * torch.eye(4, dtype=torch.float64)
    se_mean = (cov.diagonal() / n).sqrt()
    se_cov = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / n).sqrt()
    assert ((x.mean(0) - mean).abs() <= 4 * se_mean).all(), (x.mean(0), mean)
    assert ((torch.cov(x.T) - cov).abs() <= 4 * se_cov).all(), (torch.cov(x.T), cov)


@pytest.mark.parametrize(("kind", "sigma", "sigma_next"), [("flow", 0.9, 0.5), ("edm", 10.0, 1.5)])
def test_a_step_lands_on_the_exact_marginal(nodes: dict[str, Any], kind: str, sigma: float, sigma_next: float) -> None:
    """Data noised to σ by ComfyUI, one TCD step (γ = 0.3) with an exact denoiser: the latent is the data noised to σ'
    (flow: x = (1 − σ)·x0 + σ·ε, returned divided by 1 − σ' as ComfyUI's inverse noise scaling; EDM: x0 + σ·ε)."""
    patcher = oracle_model(kind)
    ms, fmt = ce.model_sampling(patcher), patcher.get_model_object("latent_format")
    g = torch.Generator().manual_seed(0)
    x0 = (MU[:, None] + L @ torch.randn(4, N_SIDE[0] * N_SIDE[1], generator=g, dtype=torch.float64)).float()
    x0 = x0.reshape(1, 4, *N_SIDE)
    net = patcher.model.diffusion_model
    net.x0, net.ms = x0, ms
    out = ce.sample_custom(patcher, tcd(nodes, 0.3), torch.tensor([sigma, sigma_next]), fmt.process_out(x0), seed=3)
    y = fmt.process_in(out.samples)
    if kind == "flow":
        assert_marginal(y * (1 - sigma_next), 1 - sigma_next, sigma_next)
    else:
        assert_marginal(y, 1.0, sigma_next)


def test_the_registry_metadata_parses_with_comfyuis_own_parser() -> None:
    ce.comfy_or_skip()
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(ce.REPO_ROOT))
    assert config is not None and config.project.name == "tcd-sampler"
    assert config.tool_comfy.display_name == "TCD Sampler" and "src" in config.tool_comfy.includes


def test_a_denoise_too_low_for_the_grid_is_named_in_the_nodes_words(nodes: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"4 steps at denoise 0\.05"):
        nodes["TCDScheduler"]().get_sigmas(model("eps"), 4, 0.05, 50)
