"""Half precision: coefficients in float32 and one rounding at the end bring loops at least as close to a float64
reference as diffusers' (which rounds every coefficient and intermediate to half). Numbers: docs/parity.md."""

from __future__ import annotations

import diffusers
import pytest
import torch

from helpers import half_precision_errors
from tcd_sampler import TCDScheduler


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(("steps", "eta"), [(1, 0.0), (4, 0.0), (4, 0.3), (8, 0.3)])
def test_half_precision_at_least_as_accurate(dtype: torch.dtype, prediction_type: str, steps: int, eta: float) -> None:
    ours = half_precision_errors(TCDScheduler, dtype, steps, eta, prediction_type)
    ref = half_precision_errors(diffusers.TCDScheduler, dtype, steps, eta, prediction_type)
    assert ours <= ref, (ours, ref)
    assert ours < (2e-3 if dtype == torch.float16 else 2e-2)


def test_float32_matches_reference_error_exactly() -> None:
    """float32 is bit-identical to diffusers, so its distance to float64 is the same number."""
    ours = half_precision_errors(TCDScheduler, torch.float32, 8, 0.3, "epsilon")
    ref = half_precision_errors(diffusers.TCDScheduler, torch.float32, 8, 0.3, "epsilon")
    assert ours == ref < 1e-6


def test_float64_inputs_use_float64_coefficients() -> None:
    ours = half_precision_errors(TCDScheduler, torch.float64, 8, 0.3, "epsilon")
    assert ours < 1e-12
