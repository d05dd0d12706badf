"""Gaussian paths ``x_t = α_t·x0 + σ_t·ε``, each in its own time: one class a path, with the :class:`Path` interface
(``alpha_sigma`` on arrays or tensors, batched and differentiable; ``coefficients`` for the table builder; TCD's
``target`` ``s = (1 − γ)·t'``, never above ``t'``; ``sigma_to_t`` / ``t_to_sigma``, the time ↔ a k-diffusion sampler's
sigma). Here: :class:`VPDiscrete` (DDPM's integer grid, also a discrete VP model's time map in VE sigma), :class:`VE`
(``x = x0 + σ·ε``, optionally in a model's own time), :class:`EDM` (VE with Karras et al.'s preconditioning) and
:class:`RectifiedFlow` (``x = (1 − t)·x0 + t·ε``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from .predictions import PREDICTION_TYPES, prediction

__all__ = [
    "EDM",
    "VE",
    "DiscreteVPTime",
    "Path",
    "RectifiedFlow",
    "TimeMap",
    "VPDiscrete",
    "VPDiscretePath",
    "target_timesteps",
]

Times = TypeVar("Times", np.ndarray, torch.Tensor)
#: The six per-step columns of a table: α_t, σ_t, α_s, σ_s, renoise (α_t'/α_s), noise (√(σ_t'² − renoise²·σ_s²)).
Columns = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class Path(Protocol):
    """A Gaussian path in its own time (see the module docstring)."""

    #: Whether times are integers on a grid ``0 … T−1`` (the table keeps them as ints).
    discrete: bool

    def alpha_sigma(self, t: Any) -> tuple[Any, Any]: ...

    def coefficients(
        self, t: np.ndarray, s: np.ndarray, t_prev: np.ndarray, dtype: torch.dtype, clean_end: bool = False
    ) -> Columns: ...

    def target(self, t_prev: np.ndarray, gamma: float) -> np.ndarray: ...

    def sigma_to_t(self, sigma: Any) -> Any: ...

    def t_to_sigma(self, t: Any) -> Any: ...


class TimeMap(Protocol):
    """A model's time ↔ sigma maps (k-diffusion's ``DiscreteSchedule`` has this interface)."""

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor: ...

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor: ...


def target_timesteps(t_prev: np.ndarray | Sequence[int], gamma: float) -> np.ndarray:
    """``s = ⌊(1 − γ)·t'⌋`` on the integer grid, in float32 exactly as the reference computes it (torch rounds
    ``1 − γ`` to float32 and multiplies in float32; numpy's float32 product is the same IEEE operation).

    float64 would give a different ``s`` at some points (γ = 0.3, t' = 90: 63 in float32, 62 in float64).
    """
    prev = np.asarray(t_prev, dtype=np.int64).astype(np.float32)
    return np.floor(np.float32(1 - gamma) * prev).astype(np.int64)


def closed_form_coefficients(path: Path, t: np.ndarray, s: np.ndarray, t_prev: np.ndarray) -> Columns:
    """The table columns of a path given in closed form, in float64 from its ``alpha_sigma``; the renoising of the
    forward transition ``s → t'`` is ``α_t'/α_s`` with noise ``√max(σ_t'² − (α_t'/α_s)²·σ_s², 0)``."""
    (a_t, s_t), (a_s, s_s), (a_p, s_p) = (
        path.alpha_sigma(torch.as_tensor(np.asarray(v, dtype=np.float64))) for v in (t, s, t_prev)
    )
    renoise = a_p / a_s
    return a_t, s_t, a_s, s_s, renoise, (s_p**2 - (renoise * s_s) ** 2).clamp(min=0.0).sqrt()


@dataclass(frozen=True, eq=False)
class VPDiscrete:
    """The discrete VP (DDPM) path ``α_t = √ᾱ_t``, ``σ_t = √(1 − ᾱ_t)`` on the integer grid ``t ∈ [0, T−1]``.

    As a time map it is the same model in VE form, ``σ_t = √((1 − ᾱ_t)/ᾱ_t)``: ``sigma_to_t`` rounds to the nearest
    grid point (in log σ; σ = 0 maps to 0), ``t_to_sigma`` reads the grid, and targets are ``s = ⌊(1 − γ)·t'⌋`` in
    float32 as diffusers computes them, so ``sample_tcd`` over :meth:`sigmas_for` of a ``TCDScheduler`` schedule
    reproduces that scheduler's loop (``DiscreteVPTime`` is this class).

    Attributes:
        alphas_cumprod: ``ᾱ`` on the grid, float32 ``(T,)``, as torch computes ``Π (1 − β)`` in float32.
        betas: the betas it was built from (:meth:`from_betas`), or None.
    """

    alphas_cumprod: torch.Tensor
    betas: torch.Tensor | None = None
    discrete = True
    _tables: dict[Any, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> VPDiscrete:
        """Build the path from float32 betas of shape ``(T,)``."""
        return cls(torch.cumprod(1.0 - betas, dim=0), betas)

    @property
    def num_train_timesteps(self) -> int:
        """T, the number of grid points."""
        return int(self.alphas_cumprod.shape[0])

    def _grid(self, key: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-grid-point pairs on ``device`` in ``dtype``, computed once on the CPU and cached: ``"alpha_sigma"``
        ``(√ᾱ, √(1 − ᾱ))`` in ``dtype`` from the float32 ``ᾱ``; ``"sigma"`` the VE ``(σ, log σ)`` in float64."""
        if (key, device, dtype) not in self._tables:
            if key == "alpha_sigma":
                acp = self.alphas_cumprod.detach().cpu().to(dtype)
                pair = (acp.sqrt(), (1 - acp).sqrt())
            else:
                acp = self.alphas_cumprod.detach().cpu().double()
                sig = ((1 - acp) / acp).sqrt()
                pair = (sig, sig.log())
            self._tables[(key, device, dtype)] = (pair[0].to(dtype).to(device), pair[1].to(dtype).to(device))
        return self._tables[(key, device, dtype)]

    def alpha_sigma(self, t: Any = None, dtype: torch.dtype = torch.float64) -> tuple[Any, Any]:
        """``(α_t, σ_t)`` at integer times: a tensor ``t`` gives tensors in ``dtype`` on its device (read from a
        cached grid); an array or a sequence gives float64 arrays; None (default) the whole grid, ``(T,)`` tensors
        in ``dtype``, computed from the float32 ``ᾱ``."""
        if t is None:
            return self._grid("alpha_sigma", torch.device("cpu"), dtype)
        if isinstance(t, torch.Tensor):
            alpha, sigma = self._grid("alpha_sigma", t.device, dtype)
            return alpha[t.long()], sigma[t.long()]
        alpha, sigma = self._grid("alpha_sigma", torch.device("cpu"), torch.float64)
        idx = torch.as_tensor(np.asarray(t, dtype=np.int64))
        return alpha[idx].numpy(), sigma[idx].numpy()

    def coefficients(
        self, t: np.ndarray, s: np.ndarray, t_prev: np.ndarray, dtype: torch.dtype, clean_end: bool = False
    ) -> Columns:
        """The table columns with torch's arithmetic in ``dtype`` on the CPU, as the reference takes them: one
        gather of ``ᾱ_t, ᾱ_s, ᾱ_t'`` and one square root each of ``ᾱ`` and ``1 − ᾱ`` (renoise ``√(ᾱ_t'/ᾱ_s)``,
        noise ``√(1 − ᾱ_t'/ᾱ_s)``); torch's float32 ``sqrt`` on the CPU is not always the correctly rounded one, so
        numpy would not reproduce it. With ``clean_end`` a target ``s = 0`` has ``ᾱ = 1`` (LCM's
        ``final_alpha_cumprod`` with ``set_alpha_to_one``)."""
        acp = self.alphas_cumprod.detach().cpu().to(dtype)
        n = len(t)
        gathered = acp[torch.from_numpy(np.concatenate([t, s, t_prev]).astype(np.int64))]
        a_t, a_s, a_p = gathered[:n], gathered[n : 2 * n], gathered[2 * n :]
        if clean_end:
            a_s = torch.where(torch.from_numpy(np.asarray(s) == 0), torch.ones((), dtype=dtype), a_s)
        values = torch.cat([a_t, a_s, a_p / a_s])
        roots, co_roots = values.sqrt(), (1 - values).sqrt()
        return roots[:n], co_roots[:n], roots[n : 2 * n], co_roots[n : 2 * n], roots[2 * n :], co_roots[2 * n :]

    def target(self, t_prev: np.ndarray, gamma: float) -> np.ndarray:
        """``s = ⌊(1 − γ)·t'⌋`` in float32, as the reference (:func:`target_timesteps`)."""
        return target_timesteps(t_prev, gamma)

    # ------------------------------------------------------------ as a time map in VE sigma

    @property
    def sigmas(self) -> torch.Tensor:
        """The VE σ on the grid, float64 ``(T,)``."""
        return self._grid("sigma", torch.device("cpu"), torch.float64)[0]

    @staticmethod
    def _work(device: torch.device) -> torch.dtype:
        """float64 on the CPU; float32 on accelerators (Apple's MPS has no float64)."""
        return torch.float64 if device.type == "cpu" else torch.float32

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The nearest grid timestep (int64) of each VE sigma; works on any device without a host sync."""
        sigma = torch.as_tensor(sigma)
        dtype = self._work(sigma.device)
        log_table = self._grid("sigma", sigma.device, dtype)[1]
        t = (sigma.to(dtype).clamp(min=1e-30).log().unsqueeze(-1) - log_table).abs().argmin(dim=-1)
        return torch.where(sigma > 0, t, torch.zeros_like(t))

    def t_to_sigma(self, t: torch.Tensor | int) -> torch.Tensor:
        """The VE σ at integer timesteps (float64 on the CPU, float32 elsewhere)."""
        t = torch.as_tensor(t)
        return self._grid("sigma", t.device, self._work(t.device))[0][t.long()]

    def sigmas_for(self, timesteps: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The k-diffusion sigmas of a timestep schedule: ``[σ(t_0), …, σ(t_{N−1}), 0]`` (float32)."""
        ts = torch.as_tensor(timesteps).cpu().long()
        return torch.cat([self.t_to_sigma(ts), torch.zeros(1, dtype=torch.float64)]).float()

    def denoiser(
        self, model: Callable[..., torch.Tensor], prediction_type: str = "epsilon"
    ) -> Callable[..., torch.Tensor]:
        """Wrap a discrete VP network ``model(x_t, t, **kw)`` (diffusers' UNet convention) into a VE denoiser
        ``(x, sigma, **kw) → x̂0`` for the samplers; ``prediction_type`` as in ``TCDScheduler`` (default
        ``"epsilon"``)."""
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        convert = prediction(prediction_type).convert

        def denoise(x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            t = self.sigma_to_t(sigma)
            s = sigma.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
            c_in = (s**2 + 1).rsqrt()  # α_t: x_vp = α_t·x_ve, σ_vp = σ·α_t
            x_vp = x * c_in
            return convert(model(x_vp, t, **kwargs), x_vp, c_in, s * c_in)[0]  # x̂0 is the same in both scalings

        return denoise


#: The names this path had before: the discrete VP path, and its time map in VE sigma.
VPDiscretePath = DiscreteVPTime = VPDiscrete


@dataclass(frozen=True, eq=False)
class _Continuous:
    """A path whose time is its sampler's sigma unless a model's time map is given: TCD's target is then taken in
    that time, ``s = (1 − γ)·t(σ')``, and mapped back (the last step of a loop ending at σ = 0 ends clean).

    Attributes:
        time: the model's time maps (k-diffusion's wrapped models have them); None (default): the time is σ.
        device: where the time maps are called (their buffers may live on the model's device); default CPU.
    """

    time: TimeMap | None = None
    device: torch.device | str | None = None
    discrete = False

    def alpha_sigma(self, t: Any) -> tuple[Any, Any]:  # pragma: no cover - every path defines it
        raise NotImplementedError

    def coefficients(
        self, t: np.ndarray, s: np.ndarray, t_prev: np.ndarray, dtype: torch.dtype, clean_end: bool = False
    ) -> Columns:
        """Closed form in float64 (:func:`closed_form_coefficients`); ``dtype`` is recorded by the table only, and a
        target ``s = 0`` is the clean end already (``clean_end`` changes nothing)."""
        return closed_form_coefficients(self, t, s, t_prev)

    def target(self, t_prev: np.ndarray, gamma: float) -> np.ndarray:
        """``σ_s`` for next sigmas ``t_prev``: ``(1 − γ)·σ'``, or ``(1 − γ)·t'`` in the time map's time (its own
        ``target`` where it has one, as :class:`VPDiscrete`), read back once. ValueError where a target would lie
        above ``t'`` (a time map whose time is negative somewhere)."""
        nxt = np.asarray(t_prev, dtype=np.float64)
        if self.time is None:
            return (1.0 - gamma) * nxt
        where = torch.device(self.device) if self.device is not None else torch.device("cpu")
        dtype = torch.float64 if where.type == "cpu" else torch.float32  # no float64 on accelerators (MPS)

        def to_device(values: np.ndarray) -> torch.Tensor:
            tensor = torch.from_numpy(np.ascontiguousarray(values))
            return tensor.to(where) if not tensor.is_floating_point() else tensor.to(device=where, dtype=dtype)

        t_next = self.time.sigma_to_t(to_device(nxt)).detach().cpu().double().numpy()
        own_target = getattr(self.time, "target", None)
        s_time = own_target(t_next, gamma) if own_target is not None else (1.0 - gamma) * t_next
        if np.any(s_time > t_next):
            i = int(np.argmax(s_time > t_next))
            raise ValueError(
                f"the TCD target s = {s_time[i]} of step {i} lies above its next time t' = {t_next[i]}: a TCD time "
                "must be non-negative and 0 at the clean end (an EDM network's ¼·ln σ is not; use path=EDM())"
            )
        s_sigma = self.time.t_to_sigma(to_device(np.asarray(s_time))).detach().cpu().double().numpy()
        return s_sigma if own_target is not None else np.where(nxt > 0, s_sigma, 0.0)

    def sigma_to_t(self, sigma: Any) -> Any:
        """The path's time is its sigma."""
        return sigma

    def t_to_sigma(self, t: Any) -> Any:
        """The path's time is its sigma."""
        return t


@dataclass(frozen=True, eq=False)
class VE(_Continuous):
    """The variance-exploding path of k-diffusion and ComfyUI's ε/v models, ``x = x0 + σ·ε``: ``(α, σ) = (1, σ)``
    with time σ (see :class:`_Continuous` for ``time`` and ``device``)."""

    def alpha_sigma(self, t: Times) -> tuple[Times, Times]:
        """``(1, σ)``, as float64 arrays for arrays, tensors for tensors."""
        if isinstance(t, torch.Tensor):
            return torch.ones_like(t), t
        sigma = np.asarray(t, dtype=np.float64)
        return np.ones_like(sigma), sigma


@dataclass(frozen=True, eq=False)
class EDM(VE):
    """The path of EDM models (Karras et al. 2022: Playground v2.5, SVD, ComfyUI's continuous EDM sampling), the VE
    path ``x = x0 + σ·ε`` whose network is preconditioned with ``σ_data``.

    TCD's time on it is σ itself, so ``s = (1 − γ)·σ' ≤ σ'`` always and ``γ = 1`` targets the clean end: the
    network's own time ``c_noise = ¼·ln σ`` is negative below σ = 1, where ``(1 − γ)·t'`` would lie *above* ``t'``
    (a sigma-space port that takes it draws negative noise variances: black or NaN images for any ``γ > 0``).

    Attributes:
        sigma_data: the data's standard deviation the preconditioning assumes. Default 0.5.
    """

    sigma_data: float = 0.5

    def denoiser(self, network: Callable[..., torch.Tensor], prediction_type: str = "edm") -> Callable[..., Any]:
        """Wrap a raw EDM network ``network(c_in·x, c_noise, **kw)`` into the denoiser ``(x, sigma, **kw) → x̂0``,
        with ``c_in = 1/√(σ² + σ_d²)``, ``c_noise = ¼·ln σ``. On the unit-variance path of ``x·c_in`` (with
        ``α = σ_d·c_in``, ``σ·c_in``, in units of ``σ_d``) the network's output is read by the prediction registry:
        ``"v_prediction"`` (SVD; ComfyUI's V_PREDICTION and EDM outputs are ``∓v``), ``"edm"`` (Karras' ``F``:
        ``x̂0 = c_skip·x + c_out·F``, Playground v2.5), ``"epsilon"`` or ``"sample"``. Default ``"edm"``."""
        convert = prediction(prediction_type).convert
        sd = float(self.sigma_data)

        def denoise(x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            s = sigma.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
            c_in = (s**2 + sd**2).rsqrt()
            x_in = x * c_in
            out = network(x_in, sigma.clamp(min=1e-30).log() / 4, **kwargs)
            return convert(out, x_in, sd * c_in, s * c_in)[0] * sd

        return denoise


@dataclass(frozen=True, eq=False)
class RectifiedFlow(_Continuous):
    """The rectified-flow path of SD3, FLUX and ComfyUI's flow models, ``x = (1 − t)·x0 + t·ε``: ``(α, σ) = (1 − t,
    t)`` with time ``t = σ ∈ [0, 1]`` (see :class:`_Continuous` for ``time`` and ``device``)."""

    def alpha_sigma(self, t: Times) -> tuple[Times, Times]:
        """``(1 − t, t)``, as float64 arrays for arrays, tensors for tensors."""
        if isinstance(t, torch.Tensor):
            return 1.0 - t, t
        time = np.asarray(t, dtype=np.float64)
        return 1.0 - time, time
