"""State that cannot lie, and reproducible noise: assigned schedules re-sync the step, a step at the wrong timestep is
an error wherever that is known without a device read, the lazy x̂0 never goes stale silently, fused half-precision
steps round once and keep channels_last, flow pipelines reproduce with one line, and the k-diffusion samplers take
ComfyUI's seed."""

from __future__ import annotations

import logging
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch

from helpers import run_loop, toy_model
from tcd_sampler import FlowMatchTCDScheduler, TCDScheduler, sample_tcd
from tcd_sampler.integrations import diffusers as integration
from tcd_sampler.sampling import DiscreteVPTime, tcd_table
from tiny_pipelines import FACTORIES, call_kwargs


def sample(seed: int = 0, shape: tuple[int, ...] = (2, 4, 8, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ schedules


def test_assigning_timesteps_resyncs_the_step() -> None:
    a, b = TCDScheduler(), TCDScheduler()
    a.set_timesteps(8)
    a.timesteps = torch.tensor([999, 499, 99])
    b.set_timesteps(timesteps=[999, 499, 99])
    x = sample()
    assert a.num_inference_steps == 3
    assert torch.equal(run_loop(a, x, 0.3), run_loop(b, x, 0.3))


def test_assigning_flow_sigmas_or_timesteps_resyncs_the_step() -> None:
    ref = FlowMatchTCDScheduler(shift=3.0)
    ref.set_timesteps(4)
    by_sigmas, by_timesteps = FlowMatchTCDScheduler(shift=3.0), FlowMatchTCDScheduler(shift=3.0)
    by_sigmas.set_timesteps(10)
    by_timesteps.set_timesteps(10)
    by_sigmas.sigmas = ref.sigmas.clone()
    by_timesteps.timesteps = ref.timesteps.clone()
    x = sample()
    outs = []
    for sched in (ref, by_sigmas, by_timesteps):
        assert sched.num_inference_steps == 4 and torch.allclose(sched.sigmas, ref.sigmas)
        y, g = x.clone(), torch.Generator().manual_seed(0)
        for t in sched.timesteps:
            y = sched.step(0.3 * y, t, y, generator=g).prev_sample
        outs.append(y)
    assert torch.equal(outs[0], outs[1]) and torch.allclose(outs[0], outs[2], atol=1e-6)
    with pytest.raises(ValueError, match="strictly descending"):
        by_sigmas.sigmas = torch.tensor([0.5, 0.8, 0.0])


# ------------------------------------------------------------------ timesteps


@pytest.mark.parametrize("kind", ["int", "float", "numpy", "cpu tensor", "view"])
def test_a_step_at_the_wrong_timestep_is_an_error(kind: str) -> None:
    sched = TCDScheduler()
    sched.set_timesteps(4)
    x = sample()
    sched.step(toy_model(x, 999), sched.timesteps[0], x, eta=0.0)
    wrong = {
        "int": 999,
        "float": 999.0,
        "numpy": np.int64(999),
        "cpu tensor": torch.tensor(999),
        "view": sched.timesteps[0],
    }[kind]
    with pytest.raises(ValueError, match="step 1 of the schedule is at 759"):
        sched.step(toy_model(x, 759), wrong, x, eta=0.0)


def test_right_timesteps_in_every_form_pass() -> None:
    sched = TCDScheduler()
    sched.set_timesteps(4)
    x = sample()
    for t in (999, 759.0, np.int64(499), torch.tensor([259, 259])):
        x = sched.step(toy_model(x, t), t, x, eta=0.0).prev_sample


def test_flow_wrong_timestep_is_an_error() -> None:
    sched = FlowMatchTCDScheduler(shift=3.0)
    sched.set_timesteps(4)
    x = sample()
    sched.step(x, sched.timesteps[0], x, gamma=0.0)
    with pytest.raises(ValueError, match=r"must follow scheduler\.timesteps"):
        sched.step(x, float(sched.timesteps[2]), x, gamma=0.0)


@pytest.mark.parametrize("cls", [TCDScheduler, FlowMatchTCDScheduler])
@pytest.mark.parametrize("bad", ["999", None, True, [999]])
def test_a_timestep_of_the_wrong_type_is_a_type_error(cls: type, bad: object) -> None:
    sched = cls()
    sched.set_timesteps(4)
    x = sample()
    with pytest.raises(TypeError, match="timestep must be a number or a tensor"):
        sched.step(x, bad, x)


# ------------------------------------------------------------------ lazy x̂0


@pytest.mark.parametrize("mutate", ["sample", "model_output"])
def test_lazy_x0_raises_after_its_inputs_change_in_place(mutate: str) -> None:
    sched = TCDScheduler(fused_step=True)
    sched.set_timesteps(4)
    x = sample()
    m = toy_model(x, 999)
    out = sched.step(m, 999, x, eta=0.0)
    (x if mutate == "sample" else m).mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        _ = out.pred_original_sample


def test_lazy_x0_read_first_stays_right_after_mutation() -> None:
    fused, exact = TCDScheduler(fused_step=True), TCDScheduler()
    for s in (fused, exact):
        s.set_timesteps(4)
    x = sample()
    m = toy_model(x, 999)
    out = fused.step(m, 999, x, eta=0.0)
    x0 = out.pred_original_sample
    x.add_(1.0)
    assert out.pred_original_sample is x0
    ref = exact.step(toy_model(x - 1.0, 999), 999, x - 1.0, eta=0.0).pred_original_sample
    torch.testing.assert_close(x0, ref, rtol=1e-5, atol=1e-5)


def test_lazy_x0_under_inference_mode_is_computed_at_once() -> None:
    """Inference-mode tensors keep no version counter, so a change could not be seen: x̂0 is computed in the step."""
    sched = TCDScheduler(fused_step=True)
    sched.set_timesteps(4)
    with torch.inference_mode():
        x = sample()
        m = toy_model(x, 999)
        out = sched.step(m, 999, x, eta=0.0)
        expected = (x - sched.step_table(0.0).rows[0].sigma_t * m) / sched.step_table(0.0).rows[0].alpha_t
        x.mul_(0)
        torch.testing.assert_close(out.pred_original_sample, expected, rtol=1e-5, atol=1e-5)


def test_flow_x0_stays_right_after_mutation() -> None:
    """The flow step (a default path) computes x̂0 with the step: reusing the inputs cannot change it."""
    sched = FlowMatchTCDScheduler()
    sched.set_timesteps(4)
    x = sample()
    u = 0.5 * x
    out = sched.step(u, sched.timesteps[0], x, gamma=0.0)
    expected = x - sched.sigmas[0] * u
    x.data.zero_()  # a write torch does not count
    u.zero_()
    torch.testing.assert_close(out.pred_original_sample, expected)


def test_copying_an_output_with_a_stale_lazy_x0() -> None:
    """Copies work; reading the stale deferred x̂0 raises on the copy as on the original."""
    import copy
    import pickle

    sched = TCDScheduler(fused_step=True)
    sched.set_timesteps(4)
    x = sample()
    out = sched.step(toy_model(x, 999), 999, x, eta=0.0)
    x.add_(1.0)
    for clone in (copy.deepcopy(out), copy.copy(out), pickle.loads(pickle.dumps(out))):
        assert torch.equal(clone.prev_sample, out.prev_sample)
        with pytest.raises(RuntimeError, match="modified in place"):
            _ = clone.pred_original_sample


def test_step_output_as_diffusers_base_output() -> None:
    """Pytree node (tree_map, accelerate's send_to_device), built from a mapping, free extra attributes."""
    import torch.utils._pytree as pytree
    from accelerate.utils import send_to_device

    sched = TCDScheduler()
    sched.set_timesteps(2)
    x = sample()
    out = sched.step(toy_model(x, 999), 999, x, eta=0.0)
    doubled = pytree.tree_map(lambda t: t * 2, out)
    assert type(doubled) is type(out) and torch.equal(doubled.prev_sample, out.prev_sample * 2)
    assert torch.equal(doubled.pred_original_sample, out.pred_original_sample * 2)
    moved = send_to_device(out, "cpu")
    assert type(moved) is type(out) and list(moved.keys()) == list(out.keys())
    rebuilt = type(out)({k: v for k, v in out.items()})
    assert torch.equal(rebuilt[0], out[0]) and rebuilt.pred_original_sample is None
    out.denoised = out.pred_original_sample  # as InvokeAI's inpainting may set
    assert out.denoised is out.pred_original_sample and "denoised" not in out
    flow = FlowMatchTCDScheduler()
    flow.set_timesteps(2)
    fout = flow.step(x, flow.timesteps[0], x, gamma=0.0)
    assert list(fout.keys()) == ["prev_sample"] and fout.pred_noised_sample.shape == x.shape
    assert torch.equal(pytree.tree_map(lambda t: t + 1, fout).pred_noised_sample, fout.pred_noised_sample + 1)


def test_step_output_is_assignable_and_copyable() -> None:
    import copy
    import pickle

    sched = TCDScheduler()
    sched.set_timesteps(2)
    x = sample()
    out = sched.step(toy_model(x, 999), 999, x, eta=0.0)
    out.pred_original_sample = torch.zeros_like(x)
    assert torch.equal(out.pred_original_sample, torch.zeros_like(x))
    out.prev_sample = x
    assert out["prev_sample"] is x and out[0] is x and out.to_tuple()[0] is x
    for clone in (copy.deepcopy(out), pickle.loads(pickle.dumps(out))):
        assert list(clone.keys()) == ["prev_sample", "pred_noised_sample"]
        assert torch.equal(clone.pred_original_sample, torch.zeros_like(x))
    with pytest.raises(KeyError):
        out["pred_original_sample"] = x


# ------------------------------------------------------- fused half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_half_precision_rounds_once(dtype: torch.dtype) -> None:
    """The fused step in half precision is the float32 fused step rounded once."""
    half, full = TCDScheduler(fused_step=True), TCDScheduler(fused_step=True)
    for s in (half, full):
        s.set_timesteps(4)
    x = sample().to(dtype)
    for t in half.timesteps:
        m = toy_model(x, t)
        g1, g2 = torch.Generator().manual_seed(int(t)), torch.Generator().manual_seed(int(t))
        out = half.step(m, t, x, eta=0.3, generator=g1)
        # the noise is drawn in the half dtype, as diffusers draws it; the rest is float32, rounded at the end
        noise = torch.randn(x.shape, generator=g2, dtype=dtype)
        row = full.step_table(0.3).rows[int(full._step_index or 0)]
        lin = full._folded[(0.3, torch.float32)][int(full._step_index or 0)]
        full._step_index = (full._step_index or 0) + 1
        x_s = torch.add(x.float() * lin.xs_x, m.float(), alpha=lin.xs_m)
        prev = torch.add(x_s * row.renoise, noise.float(), alpha=row.noise) if row.draws_noise else x_s
        assert out.prev_sample.dtype == dtype
        assert torch.equal(out.prev_sample, prev.to(dtype))
        assert torch.equal(out.pred_noised_sample, x_s.to(dtype))
        x = out.prev_sample


@pytest.mark.parametrize("fused", [False, True])
def test_steps_keep_channels_last(fused: bool) -> None:
    sched = TCDScheduler(fused_step=fused)
    sched.set_timesteps(4)
    x = sample().to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    for t in sched.timesteps:
        out = sched.step(toy_model(x, t).to(memory_format=torch.channels_last), t, x, eta=0.3, generator=g)
        x = out.prev_sample
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert out.pred_noised_sample.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------ reproducibility


def _flow_pipeline_images(kind: str, seeded: bool, caplog: pytest.LogCaptureFixture) -> list[np.ndarray]:
    pipe = FACTORIES[kind](integration.FlowMatchTCDScheduler(gamma=0.5))
    if seeded:
        pipe.scheduler.noise_seed = 0  # the documented one line
    images = []
    for _ in range(2):
        kwargs = {**call_kwargs(kind), "num_inference_steps": 4, "generator": torch.Generator().manual_seed(0)}
        images.append(np.asarray(pipe(**kwargs).images))
    return images


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_flow_pipelines_reproduce_with_noise_seed(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tcd_sampler"):
        first, second = _flow_pipeline_images(kind, seeded=True, caplog=caplog)
    assert np.array_equal(first, second)
    assert "global RNG" not in caplog.text


@pytest.mark.parametrize("kind", ["sd3"])
def test_flow_pipelines_without_a_seed_warn_once_per_call(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tcd_sampler"):
        first, second = _flow_pipeline_images(kind, seeded=False, caplog=caplog)
    warnings = [r for r in caplog.records if "global RNG" in r.getMessage()]
    assert len(warnings) == 2  # one per pipeline call (loop), not one per step
    assert "noise_seed" in warnings[0].getMessage()
    assert not np.array_equal(first, second)  # which is what the warning is about


def test_noise_seed_restarts_with_every_loop_and_yields_to_a_generator() -> None:
    sched = TCDScheduler()
    sched.noise_seed = 5
    x = sample()
    sched.set_timesteps(4)
    a = run_loop(sched, x, 0.3, seed=None)
    sched.set_timesteps(4)
    b = run_loop(sched, x, 0.3, seed=None)
    sched.set_timesteps(4)
    c = run_loop(sched, x, 0.3, seed=5)  # a generator passed to step wins
    ref = diffusers.TCDScheduler()
    ref.set_timesteps(4)
    assert torch.equal(a, b) and torch.equal(c, run_loop(ref, x, 0.3, seed=5))
    with pytest.raises(ValueError, match="noise_seed"):
        sched.noise_seed = -1


# ----------------------------------------------------------- k-diffusion side


def test_sample_tcd_takes_comfyuis_seed_from_extra_args() -> None:
    seen: list[dict] = []

    def model(x: torch.Tensor, sigma: torch.Tensor, **kwargs: object) -> torch.Tensor:
        seen.append(dict(kwargs))
        return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)

    sigmas = torch.tensor([14.6, 3.0, 0.8, 0.0])
    x = sample() * sigmas[0]
    args = {"seed": 7, "cond": 1}
    a = sample_tcd(model, x, sigmas, extra_args=args, disable=True)
    b = sample_tcd(model, x, sigmas, seed=7, extra_args={"cond": 1}, disable=True)
    assert torch.equal(a, b) and args == {"seed": 7, "cond": 1}  # the caller's dict is left alone
    assert all(kw == {"cond": 1} for kw in seen)  # the seed never reaches the model
    with pytest.raises(ValueError, match="seed or noise_sampler, not both"):
        sample_tcd(model, x, sigmas, seed=1, noise_sampler=lambda s, n: torch.zeros_like(x), disable=True)
    with pytest.raises(ValueError, match="disagree"):
        sample_tcd(model, x, sigmas, seed=1, extra_args={"seed": 2}, disable=True)
    # a model that names a seed parameter (ComfyUI's KSamplerX0Inpaint) still gets it, as ComfyUI's samplers do
    got: list[object] = []

    def comfy_like(x: torch.Tensor, sigma: torch.Tensor, cond: int = 0, seed: int | None = None) -> torch.Tensor:
        got.append(seed)
        return model(x, sigma)

    assert torch.equal(sample_tcd(comfy_like, x, sigmas, extra_args=args, disable=True), a) and got == [7, 7, 7]
    # ComfyUI always sends its seed; an explicit noise sampler then decides the noise
    zeros = sample_tcd(model, x, sigmas, extra_args={"seed": 7}, noise_sampler=lambda s, n: torch.zeros_like(x))
    assert not torch.equal(zeros, a)


class _Float64Guard:
    """A time map that fails if it is handed a float64 tensor (Apple's MPS has no float64)."""

    def __init__(self, inner: DiscreteVPTime) -> None:
        self.inner = inner

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        assert sigma.dtype != torch.float64, "float64 sent to the model's device"
        return self.inner.sigma_to_t(sigma)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype != torch.float64, "float64 sent to the model's device"
        return self.inner.t_to_sigma(t).float()


def test_no_float64_reaches_an_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    """tcd_table hands the time maps float32 on any device but the CPU (checked here with the meta device)."""
    time = DiscreteVPTime(TCDScheduler().alphas_cumprod)
    guard = _Float64Guard(time)
    calls: list[torch.dtype] = []
    original = guard.sigma_to_t

    def spy(sigma: torch.Tensor) -> torch.Tensor:
        calls.append(sigma.dtype)
        return original(sigma.cpu()).to(sigma.device)

    monkeypatch.setattr(guard, "sigma_to_t", spy)
    sigmas = time.sigmas_for([999, 759, 499, 259]).tolist()
    with pytest.raises((NotImplementedError, RuntimeError)):  # meta tensors cannot be read back; dtypes are checked
        tcd_table(sigmas, 0.3, guard, device="meta")
    assert calls == [torch.float32]


def test_discrete_time_caches_its_tables() -> None:
    time = DiscreteVPTime(TCDScheduler().alphas_cumprod)
    time.sigma_to_t(torch.tensor([1.0]))
    tables = dict(time._tables)
    time.sigma_to_t(torch.tensor([2.0]))
    time.t_to_sigma(torch.tensor([3]))
    assert time._tables.keys() == tables.keys() and all(time._tables[k] is tables[k] for k in tables)
    assert time.sigma_to_t(torch.tensor([0.0, time.sigmas[500].item()])).tolist() == [0, 500]


def test_saving_a_pipeline_that_holds_the_core_class_warns(tmp_path: Path) -> None:
    """The core class is not a diffusers component: a pipeline save skips it, with diffusers' warning (not silently);
    the integration class saves and loads."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    pipe = FACTORIES["sd"](TCDScheduler())
    diffusers_logger = logging.getLogger("diffusers")
    level = diffusers_logger.level  # the suite's conftest quiets diffusers to ERROR; its default is WARNING
    diffusers_logger.addHandler(handler)
    diffusers_logger.setLevel(logging.WARNING)
    try:
        pipe.save_pretrained(tmp_path / "core")
    finally:
        diffusers_logger.removeHandler(handler)
        diffusers_logger.setLevel(level)
    text = " ".join(r.getMessage() for r in records if r.levelno >= logging.WARNING)
    assert "cannot be saved" in text and "tcd_sampler.schedulers.vp.TCDScheduler" in text
    pipe = FACTORIES["sd"](integration.TCDScheduler())
    pipe.save_pretrained(tmp_path / "component")
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "component")
    assert type(loaded.scheduler) is integration.TCDScheduler


def test_integration_classes_pass_diffusers_isinstance_checks() -> None:
    """InvokeAI tests `isinstance(scheduler, diffusers.TCDScheduler)`; EasyAnimate, Bria and LongCat pipelines test
    `isinstance(scheduler, FlowMatchEulerDiscreteScheduler)` (LongCat replaces any other scheduler)."""
    assert isinstance(integration.TCDScheduler(), diffusers.TCDScheduler)
    flow = integration.FlowMatchTCDScheduler()
    assert isinstance(flow, diffusers.FlowMatchEulerDiscreteScheduler)
    assert isinstance(flow, diffusers.SchedulerMixin)
    # diffusers' helpers that the integration class still inherits are pure functions of the config
    flow_shifted = integration.FlowMatchTCDScheduler(shift_terminal=0.1)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift_terminal=0.1)
    t = torch.linspace(1.0, 0.1, 5)
    assert torch.equal(flow_shifted.stretch_shift_to_terminal(t), ref.stretch_shift_to_terminal(t))
    with pytest.raises(NotImplementedError, match="DDIM"):
        integration.TCDScheduler()._get_variance(999, 759)
