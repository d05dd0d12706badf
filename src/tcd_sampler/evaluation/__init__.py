"""Measuring samplers and students: on real images (the digits), and against an exact teacher (the 2-D study).

- :mod:`~tcd_sampler.evaluation.metrics`: sample-quality metrics against a known Gaussian mixture (sliced W2,
  mode-weight total variation, sharpness) and :func:`evaluate`, all three at once.
- :mod:`~tcd_sampler.evaluation.digits`: the main job (``tcd-sampler demo`` / ``make demo``): a digits model trained
  here and its TCD and LCM students against the teacher's solvers, FID and friends in a digit classifier's features.
- :mod:`~tcd_sampler.evaluation.demo`: the 2-D study (``tcd-sampler demo-2d``): the shipped TCD and
  LCM students and the exact teacher at 1–8 NFE from the same noise, as a table, ``demo.json`` and ``demo.png``.
"""

from .demo import ASSETS, run_demo
from .metrics import evaluate, mode_weight_tv, sharpness, sliced_w2

__all__ = ["ASSETS", "evaluate", "mode_weight_tv", "run_demo", "sharpness", "sliced_w2"]
