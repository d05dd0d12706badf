"""The ComfyUI test harness (tests/comfy_env.py) itself: the vendored ComfyUI imports as a library without changing the
test process, every model-sampling family builds and samples through ComfyUI's own nodes, custom-node folders load with
ComfyUI's own loader, and everything skips cleanly without the vendored folder."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import comfy_env
from comfy_env import GlobalState


def test_import_leaves_process_state_alone() -> None:
    """First in the file, so that in a plain run the import happens here: nothing the rest of the suite depends on
    (default dtype, threads, deterministic and SDPA flags, logging handlers, warning filters, env, RNG) changes."""
    now = GlobalState.capture()
    c = comfy_env.comfy_or_skip()
    assert now.diff(GlobalState.capture()) == []
    assert comfy_env.comfy_or_skip() is c  # idempotent
    before = comfy_env.BEFORE_IMPORT[0].comparable()
    current = GlobalState.capture().comparable()
    for key in ("default_dtype", "num_threads", "deterministic", "deterministic_warn_only", "grad_enabled"):
        assert current[key] == before[key], key
    for key in ("fp16_bf16_reduction_math_sdp", "sdp", "float32_matmul_precision"):
        assert current[key] == before[key], key
    # What 0.3.64 was seen to change (all put back): a new kind of change would show here
    assert set(comfy_env.IMPORT_CHANGES) <= {
        "fp16_bf16_reduction_math_sdp",
        "root_handlers",
        "warning_filters",
        "sys.path",
    }
    # ComfyUI's folders sit behind everything else on sys.path; the torchvision stub is gone again
    root = str(c.root)
    assert sys.path.index(root) > max(i for i, p in enumerate(sys.path) if "site-packages" in p)
    assert str(comfy_env.STUBS) not in sys.path
    if c.torchvision_stub:
        import importlib.util

        assert importlib.util.find_spec("torchvision") is None
        assert c.model_base.comfy.ldm.cosmos.model.transforms.InterpolationMode.NEAREST.value == "nearest"
    assert c.cli_args.args.cpu and c.cli_args.args.disable_all_custom_nodes
    assert not str(c.folder_paths.get_input_directory()).startswith(root)  # nothing written into the vendored tree


def test_missing_folder_reason(tmp_path: Path) -> None:
    reason = comfy_env.missing_reason(tmp_path)
    assert reason is not None
    assert str(tmp_path) in reason and "not found" in reason and comfy_env.ENV_VAR in reason


def test_missing_dependency_reason(tmp_path: Path) -> None:
    (tmp_path / "comfy").mkdir()
    (tmp_path / "comfy" / "samplers.py").write_text("")
    (tmp_path / "nodes.py").write_text("")
    reason = comfy_env.missing_reason(tmp_path, {"torch": "torch", "surely_not_a_module_x9": "surely-not-a-dist"})
    assert reason is not None
    assert "surely-not-a-dist" in reason and "torch" not in reason.split("(")[0]
    assert comfy_env.INSTALL in reason
    assert comfy_env.missing_reason(tmp_path, {"torch": "torch"}) is None


def test_everything_skips_without_vendored_folder(tmp_path: Path) -> None:
    """This file run in a fresh process with TCD_COMFYUI_ROOT pointing at an empty folder: no failure, no error, the
    ComfyUI tests skipped with the reason."""
    env = {**os.environ, comfy_env.ENV_VAR: str(tmp_path)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", __file__, "-k", "not skips_without"]
    proc = subprocess.run(cmd, cwd=comfy_env.REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "failed" not in out and "error" not in out.lower(), out
    assert "skipped" in out and f"vendored ComfyUI not found at {tmp_path}" in out, out


@pytest.fixture(scope="module")
def comfy() -> Any:
    return comfy_env.comfy_or_skip()


def test_all_kinds_available_in_this_version(comfy: Any) -> None:
    gone = comfy_env.unavailable_kinds()
    if comfy.version == "0.3.64":
        assert gone == {}
    assert comfy_env.available_kinds() == [k for k in comfy_env.KINDS if k not in gone]


@pytest.mark.parametrize("kind", comfy_env.KINDS)
def test_euler_simple_every_kind(comfy: Any, kind: str) -> None:
    """ComfyUI's own euler, `simple` sigmas, 4 steps, through SamplerCustom: finite, right shape, same result for the
    same seed, another for another seed; the model sampling is the family's, patched by ComfyUI's node."""
    model = comfy_env.tiny_model(kind)
    ms = comfy_env.model_sampling(model)
    names = {cls.__name__ for cls in type(ms).__mro__}
    assert set(comfy_env.EXPECTED_CLASSES[kind]) <= names
    sig = comfy_env.sigmas(model, "simple", 4)
    assert sig.shape == (5,) and float(sig[-1]) == 0.0 and bool((sig[:-1] > sig[1:]).all())
    lat = comfy_env.latent(batch=1, size=8)
    euler = comfy_env.sampler("euler")
    a = comfy_env.sample_custom(model, euler, sig, lat, seed=7)
    b = comfy_env.sample_custom(model, euler, sig, lat, seed=7)
    c = comfy_env.sample_custom(model, euler, sig, lat, seed=8)
    assert a.samples.shape == (1, comfy_env.CHANNELS, 8, 8)
    assert bool(torch.isfinite(a.samples).all()) and float(a.samples.abs().max()) > 0
    assert torch.equal(a.samples, b.samples)
    assert not torch.allclose(a.samples, c.samples)


def test_sampling_leaves_global_rng_alone(comfy: Any) -> None:
    """comfy.sample.prepare_noise calls torch.manual_seed(seed); sample_custom puts the global RNG state back."""
    model = comfy_env.tiny_model("eps")
    before = GlobalState.capture()
    comfy_env.sample_custom(model, comfy_env.sampler("euler"), comfy_env.sigmas(model), comfy_env.latent(), seed=1)
    assert before.diff(GlobalState.capture()) == []  # RNG included
    comfy_env.sample_custom(
        model, comfy_env.sampler("euler"), comfy_env.sigmas(model), comfy_env.latent(), keep_rng=False
    )
    assert not torch.equal(torch.get_rng_state(), before.torch_rng)
    torch.set_rng_state(before.torch_rng)


def test_preview_callback_receives_x0(comfy: Any) -> None:
    """The preview callback gets (step, x0 = the step's denoised prediction, x = the sample the step starts from,
    total_steps), in the model's latent space; SamplerCustom's denoised_output is the last x0, process_latent_out'd."""
    model = comfy_env.tiny_model("eps")
    sig = comfy_env.sigmas(model, "simple", 4)
    res = comfy_env.sample_custom(model, comfy_env.sampler("euler"), sig, comfy_env.latent(), seed=3)
    assert [p.step for p in res.previews] == [0, 1, 2, 3]
    assert {p.total_steps for p in res.previews} == {4}
    assert all(p.x0.shape == p.x.shape == (1, comfy_env.CHANNELS, 8, 8) for p in res.previews)
    base = model.model
    torch.testing.assert_close(res.denoised, base.process_latent_out(res.previews[-1].x0))
    # euler's last step (to sigma 0) lands on the last x0
    torch.testing.assert_close(res.samples, base.process_latent_out(res.previews[-1].x0))
    # step 0 starts from noise_scaling(sigma_max, noise, empty latent, max_denoise=True) = noise * sqrt(1 + sigma^2)
    noise = comfy.sample.prepare_noise(torch.zeros(1, comfy_env.CHANNELS, 8, 8), 3)
    torch.testing.assert_close(res.previews[0].x, noise * torch.sqrt(1 + sig[0] ** 2))


def test_sampler_function_sees_patched_model_sampling(comfy: Any) -> None:
    """What a sampler function registered with KSAMPLER is handed, per family: `model.inner_model.inner_model` is the
    BaseModel with the node's model_sampling patched in, extra_args carries the seed and model_options, and x is the
    already noise-scaled start."""
    seen: dict[str, Any] = {}

    def recording_euler(model: Any, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Any = None, **kw: Any) -> Any:
        seen["model_sampling"] = model.inner_model.inner_model.model_sampling
        seen["extra_args"] = sorted(extra_args)
        seen["seed"] = extra_args["seed"]
        seen["x"] = x.clone()
        return comfy.k_diffusion_sampling.sample_euler(model, x, sigmas, extra_args=extra_args, **kw)

    for kind in ("eps", "flow", "edm"):
        model = comfy_env.tiny_model(kind)
        # A node's object patch is applied to the shared BaseModel when ComfyUI loads the model for sampling (and
        # stays while it is loaded): before that, model.model.model_sampling is still the base model's.
        assert (model.model.model_sampling is comfy_env.model_sampling(model)) == (kind == "eps")
        sig = comfy_env.sigmas(model, "simple", 4)
        res = comfy_env.sample_custom(model, comfy.samplers.KSAMPLER(recording_euler), sig, comfy_env.latent(), seed=5)
        assert seen["model_sampling"] is comfy_env.model_sampling(model)
        assert seen["extra_args"] == ["denoise_mask", "model_options", "seed"] and seen["seed"] == 5
        ref = comfy_env.sample_custom(model, comfy_env.sampler("euler"), sig, comfy_env.latent(), seed=5)
        torch.testing.assert_close(res.samples, ref.samples)
        noise = comfy.sample.prepare_noise(torch.zeros(1, comfy_env.CHANNELS, 8, 8), 5)
        ms = seen["model_sampling"]
        torch.testing.assert_close(seen["x"], ms.noise_scaling(sig[0], noise, torch.zeros_like(noise), True))
        assert model.model.model_sampling is ms  # still patched in: the model stays loaded after sampling


def test_cfg_positive_negative_batch_and_noise_mask(comfy: Any) -> None:
    model = comfy_env.tiny_model("v")
    sig = comfy_env.sigmas(model, "karras", 4)  # BasicScheduler("karras") = KarrasScheduler over the model's range
    torch.testing.assert_close(sig, comfy_env.karras_sigmas(model, 4))
    assert sig.shape == (5,) and float(sig[-1]) == 0.0
    lat = comfy_env.latent(batch=2, size=8, seed=11)
    pos, neg = comfy_env.conditioning(1.0), comfy_env.conditioning(-1.0)
    euler = comfy_env.sampler("euler")
    g1 = comfy_env.sample_custom(model, euler, sig, lat, seed=2, cfg=1.0, positive=pos, negative=neg)
    g3 = comfy_env.sample_custom(model, euler, sig, lat, seed=2, cfg=3.0, positive=pos, negative=neg)
    g3b = comfy_env.sample_custom(model, euler, sig, lat, seed=2, cfg=3.0, positive=pos, negative=neg)
    assert g1.samples.shape == (2, comfy_env.CHANNELS, 8, 8)
    assert torch.equal(g3.samples, g3b.samples) and not torch.allclose(g1.samples, g3.samples)
    # noise_mask 0 keeps the input latent there, 1 samples
    mask = torch.zeros(1, 8, 8)
    mask[:, :, :4] = 1.0
    m = comfy_env.sample_custom(model, euler, sig, lat, seed=2, noise_mask=mask)
    torch.testing.assert_close(m.samples[..., 4:], lat["samples"][..., 4:], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(m.samples[..., :4], lat["samples"][..., :4], atol=1e-2)


def test_advanced_node_and_lcm_sampler(comfy: Any) -> None:
    """SamplerCustomAdvanced (RandomNoise + CFGGuider nodes) gives SamplerCustom's result; ComfyUI's lcm sampler on
    the LCM model sampling: its fresh noise comes from extra_args["seed"], so runs repeat and seeds differ."""
    model = comfy_env.tiny_model("lcm")
    sig = comfy_env.sigmas(model, "sgm_uniform", 4)
    assert sig.shape == (5,)
    lcm = comfy_env.sampler("lcm")
    lat = comfy_env.latent()
    a = comfy_env.sample_custom(model, lcm, sig, lat, seed=4)
    b = comfy_env.sample_custom(model, lcm, sig, lat, seed=4, advanced=True)
    c = comfy_env.sample_custom(model, lcm, sig, lat, seed=9)
    torch.testing.assert_close(a.samples, b.samples)
    assert bool(torch.isfinite(a.samples).all()) and not torch.allclose(a.samples, c.samples)
    # add_noise=False: no initial noise, the start is the latent itself (sigma-scaled noise of zeros)
    img = comfy_env.latent(seed=1)
    d = comfy_env.sample_custom(model, lcm, sig, img, seed=4, add_noise=False)
    e = comfy_env.sample_custom(model, lcm, sig, img, seed=4, add_noise=False, advanced=True)
    assert bool(torch.isfinite(d.samples).all())
    assert not torch.allclose(d.samples, e.samples)  # SamplerCustom passes noise_seed, Advanced's DisableNoise seed 0


NODE_INIT = """
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
"""

NODE_MODULE = """
import comfy.samplers


class TrivialEulerSampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"
    CATEGORY = "sampling/custom_sampling/samplers"

    def get_sampler(self):
        return (comfy.samplers.ksampler("euler"),)


NODE_CLASS_MAPPINGS = {"TrivialEulerSampler_tcdtest": TrivialEulerSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"TrivialEulerSampler_tcdtest": "Trivial Euler (tcd test)"}
"""


def test_load_custom_node_folder(comfy: Any, tmp_path: Path) -> None:
    """A custom-node package (relative imports, importing comfy) written to tmp_path loads with ComfyUI's own
    nodes.load_custom_node, and the SAMPLER its node returns drives SamplerCustom."""
    pkg = tmp_path / "tcd_trivial_node"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(NODE_INIT))
    (pkg / "nodes.py").write_text(textwrap.dedent(NODE_MODULE))
    (pkg / "pyproject.toml").write_text('[project]\nname = "tcd-trivial-node"\nversion = "0.0.1"\n')
    mappings = comfy.nodes.NODE_CLASS_MAPPINGS
    try:
        added = comfy_env.load_custom_node(pkg)
        assert added == ["TrivialEulerSampler_tcdtest"]
        node_cls = mappings["TrivialEulerSampler_tcdtest"]
        assert node_cls.RELATIVE_PYTHON_MODULE == "custom_nodes.tcd_trivial_node"
        assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS["TrivialEulerSampler_tcdtest"] == "Trivial Euler (tcd test)"
        (smp,) = getattr(node_cls(), node_cls.FUNCTION)()
        model = comfy_env.tiny_model("flow")
        sig = comfy_env.sigmas(model)
        ours = comfy_env.sample_custom(model, smp, sig, comfy_env.latent(), seed=6)
        ref = comfy_env.sample_custom(model, comfy_env.sampler("euler"), sig, comfy_env.latent(), seed=6)
        torch.testing.assert_close(ours.samples, ref.samples)
    finally:
        for name in [n for n in mappings if n.endswith("_tcdtest")]:
            del mappings[name]
            comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS.pop(name, None)
        for mod in [m for m in sys.modules if m.startswith(str(pkg).replace(".", "_x_"))]:
            del sys.modules[mod]


def test_load_custom_node_failure_raises(comfy: Any, tmp_path: Path) -> None:
    bad = tmp_path / "broken_node"
    bad.mkdir()
    (bad / "__init__.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(RuntimeError, match="load_custom_node failed"):
        comfy_env.load_custom_node(bad)
    sys.modules.pop(str(bad).replace(".", "_x_"), None)
