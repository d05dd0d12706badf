"""The vendored ComfyUI, imported as a library for tests: CPU only, no server, none of its own custom nodes.

ComfyUI (GPL-3.0) lives outside the project, at ``<repo>/../shared/vendor/ComfyUI`` or ``$TCD_COMFYUI_ROOT``; nothing
of it is copied here, it is only imported. What this module gives the tests:

- ``comfy_or_skip()``: the imported ComfyUI modules (once per process), or ``pytest.skip`` with the reason (folder
  absent, a dependency missing: named, with the install command);
- ``tiny_model(kind)``: a real ``comfy.model_base.BaseModel`` around a tiny random conv network, wrapped in a
  ``ModelPatcher`` and, for every family but plain SD1.5 ε, patched by ComfyUI's own ModelSampling* node;
- ``sample_custom(...)``: ComfyUI's own ``SamplerCustom`` (or ``SamplerCustomAdvanced``) node on a latent, with an
  option to record what the preview callback is handed;
- ``sampler(name)``, ``sigmas(...)``, ``karras_sigmas(...)``: ComfyUI's samplers and schedulers;
- ``load_custom_node(path)``: ComfyUI's own custom-node loader, as ComfyUI runs it at start-up.

Importing ComfyUI changes a few process-wide things (see ``GlobalState``); they are put back right after the import, and
``IMPORT_CHANGES`` says what was found changed. The torchvision stub (tests/stubs) is visible only while ComfyUI's
modules are imported, so transformers/diffusers never mistake it for the real package.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib
import importlib.util
import logging
import math
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV_VAR = "TCD_COMFYUI_ROOT"
DEFAULT_ROOT = REPO_ROOT.parent / "shared" / "vendor" / "ComfyUI"
STUBS = Path(__file__).resolve().parent / "stubs"
INSTALL = '.venv/bin/python -m pip install -c constraints.txt -e ".[dev]"'

# Import name -> distribution: what ComfyUI's sampling and custom-node import path needs besides torch and numpy
# (pyproject's `dev` extra installs them). torchvision is stubbed; torchaudio is optional (ComfyUI logs a warning).
REQUIRED = {
    "torchsde": "torchsde",
    "einops": "einops",
    "av": "av",
    "psutil": "psutil",
    "yaml": "PyYAML",
    "scipy": "scipy",
    "tqdm": "tqdm",
    "PIL": "Pillow",
    "safetensors": "safetensors",
    "transformers": "transformers",
    "pydantic_settings": "pydantic-settings",
}


def comfy_root() -> Path:
    """The ComfyUI folder: ``$TCD_COMFYUI_ROOT`` if set, else ``<repo>/../shared/vendor/ComfyUI``."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser().resolve() if env else DEFAULT_ROOT.resolve()


COMFY_ROOT = comfy_root()


def missing_reason(root: Path | None = None, required: dict[str, str] | None = None) -> str | None:
    """Why ComfyUI cannot be imported from ``root`` (None: it can, as far as can be told without importing it)."""
    root = comfy_root() if root is None else Path(root)
    if not (root / "comfy" / "samplers.py").is_file() or not (root / "nodes.py").is_file():
        return (
            f"vendored ComfyUI not found at {root} (expected comfy/samplers.py and nodes.py there); "
            f"set {ENV_VAR} to a ComfyUI checkout to run the ComfyUI tests"
        )
    required = REQUIRED if required is None else required
    missing = sorted(dist for mod, dist in required.items() if importlib.util.find_spec(mod) is None)
    if missing:
        return f"ComfyUI needs {', '.join(missing)} (not installed); install with: {INSTALL}"
    return None


# --------------------------------------------------------------------------------------------------------------------
# Process-wide state that ComfyUI's import touches


@dataclass
class GlobalState:
    """What importing ComfyUI could change for the rest of the test session, captured and put back.

    Found changed by ComfyUI 0.3.64 on CPU: ``torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)``
    (comfy/model_management.py, at import; a process-wide flag of the math SDPA kernel), a ``StreamHandler`` on the
    root logger (a root-level ``logging.warning`` at import, e.g. "torchaudio missing", runs ``basicConfig`` when the
    root has no handler), warning filters (added by scipy/sympy imports), ``sys.path`` (nodes.py inserts
    ``ComfyUI/comfy`` in front). Checked unchanged: default dtype, thread counts, deterministic flags, grad mode, RNG
    states, ``os.environ``.
    """

    argv: list[str]
    default_dtype: torch.dtype
    num_threads: int
    deterministic: bool
    deterministic_warn_only: bool
    grad_enabled: bool
    fp16_bf16_reduction_math_sdp: bool
    sdp: tuple[bool, bool, bool]
    float32_matmul_precision: str
    root_handlers: list[logging.Handler]
    root_level: int
    logging_disable: int
    warning_filters: list[Any]
    environ: dict[str, str]
    torch_rng: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def capture(cls) -> GlobalState:
        root = logging.getLogger()
        return cls(
            argv=list(sys.argv),
            default_dtype=torch.get_default_dtype(),
            num_threads=torch.get_num_threads(),
            deterministic=torch.are_deterministic_algorithms_enabled(),
            deterministic_warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
            grad_enabled=torch.is_grad_enabled(),
            fp16_bf16_reduction_math_sdp=torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed(),
            sdp=(
                torch.backends.cuda.flash_sdp_enabled(),
                torch.backends.cuda.mem_efficient_sdp_enabled(),
                torch.backends.cuda.math_sdp_enabled(),
            ),
            float32_matmul_precision=torch.get_float32_matmul_precision(),
            root_handlers=list(root.handlers),
            root_level=root.level,
            logging_disable=logging.root.manager.disable,
            warning_filters=list(warnings.filters),
            environ=dict(os.environ),
            torch_rng=torch.get_rng_state(),
        )

    def comparable(self) -> dict[str, Any]:
        """Everything but the RNG tensor, as plain values (for diffs and asserts)."""
        out = {k: v for k, v in vars(self).items() if k not in ("torch_rng", "extra")}
        out["torch_rng"] = self.torch_rng.tolist()
        return out

    def diff(self, other: GlobalState) -> list[str]:
        a, b = self.comparable(), other.comparable()
        return sorted(k for k in a if a[k] != b[k])

    def restore(self) -> None:
        sys.argv[:] = self.argv
        torch.set_default_dtype(self.default_dtype)
        if torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)
        torch.use_deterministic_algorithms(self.deterministic, warn_only=self.deterministic_warn_only)
        torch.set_grad_enabled(self.grad_enabled)
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(self.fp16_bf16_reduction_math_sdp)
        torch.backends.cuda.enable_flash_sdp(self.sdp[0])
        torch.backends.cuda.enable_mem_efficient_sdp(self.sdp[1])
        torch.backends.cuda.enable_math_sdp(self.sdp[2])
        torch.set_float32_matmul_precision(self.float32_matmul_precision)
        root = logging.getLogger()
        for h in list(root.handlers):
            if h not in self.root_handlers:
                root.removeHandler(h)
        for h in self.root_handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(self.root_level)
        logging.disable(self.logging_disable)
        cast(list[Any], warnings.filters)[:] = self.warning_filters
        mutated = getattr(warnings, "_filters_mutated", None)  # drops the warnings module's "already warned" caches
        if mutated is not None:
            mutated()
        for k in set(os.environ) - set(self.environ):
            del os.environ[k]
        for k, v in self.environ.items():
            if os.environ.get(k) != v:
                os.environ[k] = v
        torch.set_rng_state(self.torch_rng)


# --------------------------------------------------------------------------------------------------------------------
# Importing ComfyUI

_CACHE: dict[str, Any] = {}
IMPORT_CHANGES: list[str] = []  # what the import had changed (GlobalState fields), all put back
BEFORE_IMPORT: list[GlobalState] = []  # the state captured just before the import


def _real_torchvision_importable() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        importlib.import_module("torchvision")
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return not (getattr(sys.modules["torchvision"], "__file__", None) or "").startswith(str(STUBS))


@contextlib.contextmanager
def _torchvision_stub(enabled: bool) -> Iterator[None]:
    """The stub importable as ``torchvision`` inside the block only (ComfyUI's modules keep what they bound)."""
    if not enabled:
        yield
        return
    sys.path.insert(0, str(STUBS))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(STUBS))
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        importlib.invalidate_caches()


def _import_comfy(root: Path) -> SimpleNamespace:
    # transformers' availability checks (lru-cached) must not run while the stub is importable: import it first.
    importlib.import_module("transformers")
    stub = not _real_torchvision_importable()
    before = GlobalState.capture()
    BEFORE_IMPORT.append(before)
    base_dir = tempfile.mkdtemp(prefix="tcd-comfyui-")  # models/input/output/user: never inside the vendored tree
    atexit.register(shutil.rmtree, base_dir, ignore_errors=True)
    root_s, comfy_dir = str(root), str(root / "comfy")
    sys.path.insert(0, root_s)
    try:
        with _torchvision_stub(stub):
            sys.argv = [before.argv[0] if before.argv else "comfyui", "--cpu", "--disable-all-custom-nodes"]
            sys.argv += ["--base-directory", base_dir]
            options = importlib.import_module("comfy.options")
            options.enable_args_parsing()
            names = {
                "model_management": "comfy.model_management",
                "cli_args": "comfy.cli_args",
                "utils": "comfy.utils",
                "samplers": "comfy.samplers",
                "sample": "comfy.sample",
                "sampler_helpers": "comfy.sampler_helpers",
                "k_diffusion_sampling": "comfy.k_diffusion.sampling",
                "model_sampling": "comfy.model_sampling",
                "model_base": "comfy.model_base",
                "model_patcher": "comfy.model_patcher",
                "supported_models": "comfy.supported_models",
                "latent_formats": "comfy.latent_formats",
                "lora": "comfy.lora",
                "sd": "comfy.sd",
                "nodes": "nodes",
                "folder_paths": "folder_paths",
                "latent_preview": "latent_preview",
                "nodes_custom_sampler": "comfy_extras.nodes_custom_sampler",
                "nodes_model_advanced": "comfy_extras.nodes_model_advanced",
            }
            ns = SimpleNamespace(root=root, base_dir=base_dir, torchvision_stub=stub)
            for attr, mod in names.items():
                setattr(ns, attr, importlib.import_module(mod))
            ns.comfy = sys.modules["comfy"]
            ns.version = getattr(importlib.import_module("comfyui_version"), "__version__", "?")
            ns.utils.set_progress_bar_enabled(False)  # ComfyUI's own flag: no tqdm bars from k-diffusion loops
    finally:
        after = GlobalState.capture()
        IMPORT_CHANGES[:] = [k for k in before.diff(after) if k != "argv"]  # argv: set above, by us
        if comfy_dir in sys.path:
            IMPORT_CHANGES.append("sys.path")
        before.restore()
        # ComfyUI's folders (its root, and ComfyUI/comfy that nodes.py inserts in front for legacy imports) go behind
        # everything else, so that none of their top-level names (utils, app, ops, hooks, ...) shadows another.
        for p in (comfy_dir, root_s):
            while p in sys.path:
                sys.path.remove(p)
        sys.path.extend([root_s, comfy_dir])
    return ns


def comfy_or_skip() -> SimpleNamespace:
    """ComfyUI's modules (``ns.samplers``, ``ns.nodes_custom_sampler``, ...), imported once per process; skips the
    calling test with the reason when ComfyUI or a dependency of it is missing."""
    if "ns" in _CACHE:
        return _CACHE["ns"]
    if "skip" in _CACHE:
        pytest.skip(_CACHE["skip"])
    reason = missing_reason()
    if reason is None:
        try:
            _CACHE["ns"] = _import_comfy(comfy_root())
            return _CACHE["ns"]
        except ModuleNotFoundError as e:
            top = (e.name or "?").split(".")[0]
            reason = (
                f"ComfyUI's import needs {top!r} (not installed): {e}; install with: {INSTALL} (or pip install {top})"
            )
    _CACHE["skip"] = reason
    pytest.skip(reason)


# --------------------------------------------------------------------------------------------------------------------
# Tiny models

CHANNELS = 4  # SD1.5's latent channels (and Playground's, SDXL's): the latent formats ComfyUI pairs with them
CONTEXT_DIM = 8
TOKENS = 2

KINDS = (
    "eps",
    "v",
    "v_zsnr",
    "lcm",
    "x0",
    "edm",
    "v_edm",
    "continuous_v",
    "flow",
    "flux",
    "cosmos_rflow",
    "stable_cascade",
)

# kind -> (ComfyUI node class in comfy_extras/nodes_model_advanced.py, its patch() arguments); "eps" is the plain
# SD1.5 model (ModelType.EPS: ModelSamplingDiscrete + EPS, no patch), as a loaded SD1.5 checkpoint is.
RECIPES: dict[str, tuple[str, dict[str, Any]] | None] = {
    "eps": None,
    "v": ("ModelSamplingDiscrete", {"sampling": "v_prediction", "zsnr": False}),
    "v_zsnr": ("ModelSamplingDiscrete", {"sampling": "v_prediction", "zsnr": True}),
    "lcm": ("ModelSamplingDiscrete", {"sampling": "lcm", "zsnr": False}),
    "x0": ("ModelSamplingDiscrete", {"sampling": "x0", "zsnr": False}),
    # Playground v2.5: EDM, sigma_data 0.5 (set by the node), also patches the latent format to Playground's
    "edm": ("ModelSamplingContinuousEDM", {"sampling": "edm_playground_v2.5", "sigma_max": 80.0, "sigma_min": 0.002}),
    # SVD-like: V_PREDICTION on ModelSamplingContinuousEDM (supported_models.SVD_img2vid's sigma range)
    "v_edm": ("ModelSamplingContinuousEDM", {"sampling": "v_prediction", "sigma_max": 700.0, "sigma_min": 0.002}),
    # Stable Audio's sigma range (supported_models.StableAudio)
    "continuous_v": ("ModelSamplingContinuousV", {"sampling": "v_prediction", "sigma_max": 500.0, "sigma_min": 0.03}),
    "flow": ("ModelSamplingSD3", {"shift": 3.0}),
    "flux": ("ModelSamplingFlux", {"max_shift": 1.15, "base_shift": 0.5, "width": 1024, "height": 1024}),
    # Cosmos Predict2's sigma range (supported_models.CosmosT2IPredict2)
    "cosmos_rflow": ("ModelSamplingContinuousEDM", {"sampling": "cosmos_rflow", "sigma_max": 80.0, "sigma_min": 0.002}),
    "stable_cascade": ("ModelSamplingStableCascade", {"shift": 2.0}),
}

# kind -> the comfy.model_sampling classes its model_sampling object derives from
EXPECTED_CLASSES: dict[str, tuple[str, str]] = {
    "eps": ("ModelSamplingDiscrete", "EPS"),
    "v": ("ModelSamplingDiscrete", "V_PREDICTION"),
    "v_zsnr": ("ModelSamplingDiscrete", "V_PREDICTION"),
    "lcm": ("ModelSamplingDiscrete", "EPS"),  # nodes_model_advanced's ModelSamplingDiscreteDistilled + LCM
    "x0": ("ModelSamplingDiscrete", "X0"),
    "edm": ("ModelSamplingContinuousEDM", "EDM"),
    "v_edm": ("ModelSamplingContinuousEDM", "V_PREDICTION"),
    "continuous_v": ("ModelSamplingContinuousV", "V_PREDICTION"),
    "flow": ("ModelSamplingDiscreteFlow", "CONST"),
    "flux": ("ModelSamplingFlux", "CONST"),
    "cosmos_rflow": ("ModelSamplingCosmosRFlow", "COSMOS_RFLOW"),
    "stable_cascade": ("StableCascadeSampling", "EPS"),
}


def _node_options(node: Any, name: str) -> list[str]:
    spec = node.INPUT_TYPES()["required"][name][0]
    return list(spec) if isinstance(spec, (list, tuple)) else []


def unavailable_kinds() -> dict[str, str]:
    """Kinds this ComfyUI version cannot build, with why (empty for 0.3.64)."""
    c = comfy_or_skip()
    adv, ms = c.nodes_model_advanced, c.model_sampling
    out: dict[str, str] = {}
    for kind, recipe in RECIPES.items():
        if recipe is None:
            continue
        node_name, kwargs = recipe
        node = getattr(adv, node_name, None)
        if node is None:
            out[kind] = f"comfy_extras.nodes_model_advanced has no {node_name} node in ComfyUI {c.version}"
        elif "sampling" in kwargs and kwargs["sampling"] not in _node_options(node, "sampling"):
            out[kind] = f"{node_name} has no sampling option {kwargs['sampling']!r} in ComfyUI {c.version}"
        else:
            missing = [n for n in EXPECTED_CLASSES[kind] if not hasattr(ms, n)]
            if missing:
                out[kind] = f"comfy.model_sampling has no {', '.join(missing)} in ComfyUI {c.version}"
    return out


def available_kinds() -> list[str]:
    gone = unavailable_kinds()
    return [k for k in KINDS if k not in gone]


class TinyNet(torch.nn.Module):
    """A tiny denoiser with the signature ComfyUI's BaseModel calls its ``diffusion_model`` with:
    ``(x, timesteps, context=..., control=..., transformer_options=..., **extra_conds)``. Built with ComfyUI's
    ``operations`` (as its UNet is, so weight casting and patching go through comfy.ops), initialised from a fixed
    seed. Each batch item's output depends on that item (its ``x``, ``t``, context) alone; the timestep enters through
    sin/cos features at several scales, since each model family hands a differently scaled ``t``."""

    FREQS = (1.0, 0.1, 0.01, 0.001)

    def __init__(
        self,
        in_channels: int = CHANNELS,
        out_channels: int = CHANNELS,
        model_channels: int = 8,
        context_dim: int = CONTEXT_DIM,
        dtype: torch.dtype | None = None,
        device: Any = None,
        operations: Any = None,
        init_seed: int = 0,
        **_: Any,
    ) -> None:
        super().__init__()
        ops = operations if operations is not None else torch.nn
        self.dtype = dtype or torch.float32
        kw = {"dtype": self.dtype, "device": device}
        self.conv_in = ops.Conv2d(in_channels, model_channels, 3, padding=1, **kw)
        self.time_proj = ops.Linear(2 * len(self.FREQS), model_channels, **kw)
        self.context_proj = ops.Linear(context_dim, model_channels, **kw)
        self.conv_out = ops.Conv2d(model_channels, out_channels, 3, padding=1, **kw)
        g = torch.Generator().manual_seed(init_seed)
        with torch.no_grad():
            for name, p in sorted(self.named_parameters()):
                fan_in = p[0].numel() if p.ndim > 1 else 1
                std = (0.5 if name.endswith("bias") else 1.0) / math.sqrt(fan_in)
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).mul(std).to(p.dtype))

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        control: Any = None,
        transformer_options: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        t = torch.as_tensor(timesteps, device=x.device, dtype=torch.float32).reshape(-1)
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        feats = torch.cat([f(t[:, None] * torch.tensor(self.FREQS)) for f in (torch.sin, torch.cos)], dim=1)
        h = self.conv_in(x) + self.time_proj(feats.to(x.dtype))[:, :, None, None]
        if context is not None:
            h = h + self.context_proj(context.mean(dim=1).to(x.dtype))[:, :, None, None]
        return x + 0.3 * self.conv_out(torch.nn.functional.silu(h))


def base_model_patcher(init_seed: int = 0) -> Any:
    """The plain SD1.5-configured BaseModel (ModelType.EPS) around a TinyNet, in a ModelPatcher (what ComfyUI's
    MODEL sockets carry)."""
    c = comfy_or_skip()
    unet_config = {
        "in_channels": CHANNELS,
        "out_channels": CHANNELS,
        "model_channels": 8,
        "context_dim": CONTEXT_DIM,
        "adm_in_channels": None,
        "use_linear_in_transformer": False,
        "use_temporal_attention": False,
        "dtype": torch.float32,
        "init_seed": init_seed,
    }
    config = c.supported_models.SD15(unet_config)
    device = c.model_management.get_torch_device()
    model = c.model_base.BaseModel(
        config, model_type=c.model_base.ModelType.EPS, device=torch.device("cpu"), unet_model=TinyNet
    )
    return c.model_patcher.ModelPatcher(
        model, load_device=device, offload_device=c.model_management.unet_offload_device()
    )


def tiny_model(kind: str, init_seed: int = 0) -> Any:
    """A ModelPatcher of ``kind`` (see ``KINDS``/``RECIPES``): a fresh tiny BaseModel, patched by ComfyUI's own
    ModelSampling* node as a workflow would. Skips when this ComfyUI version lacks the kind."""
    if kind not in RECIPES:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    c = comfy_or_skip()
    gone = unavailable_kinds()
    if kind in gone:
        pytest.skip(gone[kind])
    patcher = base_model_patcher(init_seed)
    recipe = RECIPES[kind]
    if recipe is None:
        return patcher
    node_name, kwargs = recipe
    (patched,) = getattr(c.nodes_model_advanced, node_name)().patch(patcher, **kwargs)
    return patched


def model_sampling(patcher: Any) -> Any:
    """The model sampling object ``patcher`` samples with (the node's object patch, else the model's own)."""
    return patcher.get_model_object("model_sampling")


# --------------------------------------------------------------------------------------------------------------------
# Samplers, sigmas, conditioning, sampling


def sampler(name: str) -> Any:
    """ComfyUI's own sampler object (``comfy.samplers.sampler_object``: a KSAMPLER around k-diffusion's function)."""
    return comfy_or_skip().samplers.sampler_object(name)


def sigmas(patcher: Any, scheduler: str = "simple", steps: int = 4, denoise: float = 1.0) -> torch.Tensor:
    """ComfyUI's BasicScheduler node: ``calculate_sigmas(model_sampling, scheduler, steps)`` (``steps/denoise``
    and the tail when ``denoise < 1``)."""
    c = comfy_or_skip()
    (s,) = c.nodes_custom_sampler.BasicScheduler().get_sigmas(patcher, scheduler, steps, denoise)
    return s


def karras_sigmas(patcher: Any, steps: int = 4, rho: float = 7.0) -> torch.Tensor:
    """ComfyUI's KarrasScheduler node over the model's own sigma range."""
    c = comfy_or_skip()
    ms = model_sampling(patcher)
    node = c.nodes_custom_sampler.KarrasScheduler()
    (s,) = node.get_sigmas(steps, float(ms.sigma_max), float(ms.sigma_min), rho)
    return s


def conditioning(value: float = 0.0, batch: int = 1) -> list[list[Any]]:
    """Minimal valid CONDITIONING for the tiny model: one cross-attention tensor (TinyNet averages it over tokens)."""
    return [[torch.full((batch, TOKENS, CONTEXT_DIM), float(value)), {}]]


def latent(batch: int = 1, size: int = 8, seed: int | None = None, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A LATENT dict: zeros (ComfyUI's EmptyLatentImage) or, with ``seed``, a fixed random latent."""
    shape = (batch, CHANNELS, size, size)
    if seed is None:
        return {"samples": torch.zeros(shape)}
    return {"samples": scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))}


@dataclass
class PreviewCall:
    """One call of the callback SamplerCustom hands ComfyUI's sampler (``latent_preview.prepare_callback``):
    ``step`` (0-based), ``x0`` (the step's denoised prediction, in the model's latent space, i.e. after
    ``process_latent_in``), ``x`` (the sample the step started from), ``total_steps`` (``len(sigmas) - 1``)."""

    step: int
    x0: torch.Tensor
    x: torch.Tensor
    total_steps: int


@dataclass
class SampleResult:
    samples: torch.Tensor  # SamplerCustom's "output" latent (process_latent_out applied)
    denoised: torch.Tensor  # its "denoised_output": the last preview x0, process_latent_out applied
    previews: list[PreviewCall]


@contextlib.contextmanager
def record_previews(records: list[PreviewCall]) -> Iterator[None]:
    """Wrap ``latent_preview.prepare_callback`` (which both SamplerCustom nodes call) to record each preview call."""
    lp = comfy_or_skip().latent_preview
    original = lp.prepare_callback

    def prepare_callback(model: Any, steps: int, x0_output_dict: Any = None) -> Any:
        inner = original(model, steps, x0_output_dict)

        def callback(step: int, x0: torch.Tensor, x: torch.Tensor, total_steps: int) -> Any:
            records.append(PreviewCall(int(step), x0.detach().clone(), x.detach().clone(), int(total_steps)))
            return inner(step, x0, x, total_steps)

        return callback

    lp.prepare_callback = prepare_callback
    try:
        yield
    finally:
        lp.prepare_callback = original


def sample_custom(
    model_patcher: Any,
    sampler_obj: Any,
    sigmas_: torch.Tensor,
    latent_in: dict[str, torch.Tensor] | torch.Tensor,
    seed: int = 0,
    add_noise: bool = True,
    cfg: float = 1.0,
    positive: list[list[Any]] | None = None,
    negative: list[list[Any]] | None = None,
    noise_mask: torch.Tensor | None = None,
    advanced: bool = False,
    keep_rng: bool = True,
) -> SampleResult:
    """Run ComfyUI's own SamplerCustom node (``advanced``: SamplerCustomAdvanced with the RandomNoise/DisableNoise and
    CFGGuider nodes, which is the same computation) on ``latent_in`` (a LATENT dict or its ``samples`` tensor).

    ``positive``/``negative`` default to ``conditioning(0.0)``. ComfyUI's noise (``comfy.sample.prepare_noise``)
    reseeds torch's *global* generator with ``seed``; with ``keep_rng`` the global RNG state is put back afterwards.
    """
    c = comfy_or_skip()
    lat = dict(latent_in) if isinstance(latent_in, dict) else {"samples": latent_in}
    if noise_mask is not None:
        lat["noise_mask"] = noise_mask
    positive = conditioning(0.0) if positive is None else positive
    negative = conditioning(0.0) if negative is None else negative
    records: list[PreviewCall] = []
    ncs = c.nodes_custom_sampler
    rng = torch.random.fork_rng(devices=[]) if keep_rng else contextlib.nullcontext()
    with rng, record_previews(records):
        if advanced:
            (noise,) = ncs.RandomNoise().get_noise(seed) if add_noise else ncs.DisableNoise().get_noise()
            (guider,) = ncs.CFGGuider().get_guider(model_patcher, positive, negative, cfg)
            out, denoised = ncs.SamplerCustomAdvanced().sample(noise, guider, sampler_obj, sigmas_, lat)
        else:
            out, denoised = ncs.SamplerCustom().sample(
                model_patcher, add_noise, seed, cfg, positive, negative, sampler_obj, sigmas_, lat
            )
    return SampleResult(out["samples"], denoised["samples"], records)


# --------------------------------------------------------------------------------------------------------------------
# Custom nodes


def load_custom_node(path: str | os.PathLike[str], module_parent: str = "custom_nodes") -> list[str]:
    """Load a custom-node folder (or .py file) with ComfyUI's own ``nodes.load_custom_node``, as ComfyUI does at
    start-up; returns the node names it added to ``nodes.NODE_CLASS_MAPPINGS`` (the caller removes them when done).
    Raises when the loader reports failure (it logs the traceback and returns False)."""
    c = comfy_or_skip()
    mappings = c.nodes.NODE_CLASS_MAPPINGS
    before = set(mappings)
    with _torchvision_stub(c.torchvision_stub):
        ok = asyncio.run(c.nodes.load_custom_node(os.fspath(path), module_parent=module_parent))
    if not ok:
        raise RuntimeError(f"ComfyUI's load_custom_node failed for {path} (see the log)")
    return sorted(set(mappings) - before)
