"""The shipped digits models (``tcd_sampler/assets/digits``): the teacher pipeline, the TCD and LCM students (each a
``unet/`` folder with its training card) and the classifier, and the samplers the main job compares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...assets import verify as verify_shipped
from ...distill.export import load_card, verify_card_files
from ...distill.teachers import Conditioning
from ...distill.unet_sampling import sample_unet
from ...schedulers.vp import TCDScheduler
from .classifier import DigitClassifier, load_classifier

__all__ = ["DIGITS_ASSETS", "GUIDANCE", "DigitModels", "Sampler", "load_models", "samplers"]

#: Where the shipped digits models live.
DIGITS_ASSETS = Path(__file__).resolve().parent.parent.parent / "assets" / "digits"
#: The guidance scale ω of the teacher's solvers and of the students' distillation (chosen on the teacher alone:
#: the best FID of its 50-step DDIM samples, see docs/evaluation.md).
GUIDANCE = 1.0

#: A sampler: (NFE, initial noise, class labels, step-noise generator) → images in [-1, 1].
Sampler = Callable[[int, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class DigitModels:
    """The loaded models: the teacher pipeline, the students' UNets and cards, the classifier."""

    teacher: Any
    tcd: Any
    lcm: Any
    tcd_card: dict[str, Any]
    lcm_card: dict[str, Any]
    classifier: DigitClassifier

    @property
    def null_class(self) -> int:
        """The teacher's "no class" label (the last class embedding)."""
        return int(self.teacher.unet.config.num_class_embeds) - 1


def load_models(root: str | Path = DIGITS_ASSETS) -> DigitModels:
    """Load the models from ``root`` (default: the shipped ones): ``teacher/`` (a pipeline folder), ``tcd/`` and
    ``lcm/`` (``unet/`` and ``card.json``), ``classifier/``.

    Every file is checked first: the shipped ones against the package's manifest
    (:func:`tcd_sampler.assets.verify`), trained ones against the ``files`` their cards record
    (:func:`~tcd_sampler.distill.export.verify_card_files`); ValueError naming a damaged file."""
    from diffusers import DiffusionPipeline, UNet2DModel

    root = Path(root)
    missing = [name for name in ("teacher", "tcd", "lcm", "classifier") if not (root / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"the digits models in {root} lack {missing} (see docs/evaluation.md to train them)")
    verify_shipped(root)
    cards = {name: load_card(root / name) for name in ("tcd", "lcm")}
    for name in ("teacher", "tcd", "lcm"):
        verify_card_files(root / name, cards.get(name))
    teacher = DiffusionPipeline.from_pretrained(root / "teacher")
    if not getattr(getattr(teacher, "unet", None), "config", {}).get("num_class_embeds"):
        raise ValueError(f"the teacher in {root / 'teacher'} is not a class-conditional UNet2DModel pipeline "
                         "(its unet has no num_class_embeds)")  # fmt: skip
    tcd, lcm = (UNet2DModel.from_pretrained(root / name / "unet").eval() for name in ("tcd", "lcm"))
    teacher.unet.eval()
    classifier = load_classifier(root / "classifier")
    return DigitModels(teacher, tcd, lcm, cards["tcd"], cards["lcm"], classifier)


def _labels(labels: torch.Tensor) -> Conditioning:
    return Conditioning(class_labels=labels)


def samplers(models: DigitModels, gammas: tuple[float, ...], guidance: float = GUIDANCE) -> dict[str, Sampler]:
    """The compared samplers by name: ``TCD γ=…`` (the TCD student with :class:`TCDScheduler` from its card, one per
    gamma), ``LCM`` (the LCM student with diffusers' ``LCMScheduler`` on its card's grid), and the teacher at
    guidance scale ``guidance`` (the default :data:`GUIDANCE` is 1: its conditional output alone) under diffusers'
    ``DDIMScheduler``, ``DPMSolverMultistepScheduler`` (DPM-Solver++ 2M) and ``EulerDiscreteScheduler``, all three
    with trailing timestep spacing (the few-step setting: leading spacing never reaches the noisiest step). The
    students take no guidance input (they were distilled at the guidance they would use; the shipped ones at ω = 1,
    as the teacher's solvers run)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler

    teacher_config = models.teacher.scheduler.config
    null = models.null_class
    lcm_section = models.lcm_card["scheduler"]["config"]
    lcm = {k: lcm_section[k] for k in ("original_inference_steps", "timestep_scaling") if k in lcm_section}

    def student(unet: Any, make: Callable[[], Any], **step: Any) -> Sampler:
        def run(nfe: int, noise: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            return sample_unet(unet, make(), noise, nfe, _labels(labels), generator=generator, **step)

        return run

    def teacher(make: Callable[[], Any]) -> Sampler:
        def run(nfe: int, noise: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            uncond = _labels(torch.full_like(labels, null))
            return sample_unet(models.teacher.unet, make(), noise, nfe, _labels(labels), uncond, guidance, generator)

        return run

    def tcd_scheduler() -> TCDScheduler:
        return TCDScheduler.from_config(models.tcd_card["scheduler"]["config"])

    out: dict[str, Sampler] = {f"TCD γ={g:g}": student(models.tcd, tcd_scheduler, eta=g) for g in gammas}
    out["LCM"] = student(models.lcm, lambda: LCMScheduler.from_config(teacher_config, **lcm))
    trailing = {"timestep_spacing": "trailing"}
    out["DDIM"] = teacher(lambda: DDIMScheduler.from_config(teacher_config, **trailing))
    out["DPM-Solver++"] = teacher(lambda: DPMSolverMultistepScheduler.from_config(teacher_config, **trailing))
    out["Euler"] = teacher(lambda: EulerDiscreteScheduler.from_config(teacher_config, **trailing))
    return out
