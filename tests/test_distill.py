"""TCD / LCM distillation: the loss of a short run decreases, runs are reproducible, students reload bit-identically,
and the shipped students are what their cards say."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch

from tcd_sampler.distill import DistillConfig, distill, load_student, save_student
from tcd_sampler.evaluation.demo import ASSETS

SHORT = {"steps": 150, "warmup_steps": 100, "batch_size": 256}


@pytest.mark.parametrize("method", ["tcd", "lcm"])
def test_short_run_loss_decreases(method: str) -> None:
    _, card = distill(DistillConfig(method=method, **SHORT), progress=False, log_every=1)
    warm, loss = card["warm_start_loss"], card["loss"]
    assert statistics.mean(warm[-10:]) < 0.5 * statistics.mean(warm[:10])
    assert statistics.mean(loss[-15:]) < 0.5 * statistics.mean(loss[:15])


def test_reproducible_and_reloads_bit_identically(tmp_path: Path) -> None:
    config = DistillConfig(method="tcd", data="gmm16", steps=20, warmup_steps=20, batch_size=64, seed=3)
    a, card = distill(config, progress=False)
    b, _ = distill(config, progress=False)
    for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    save_student(a, card, tmp_path / "student")
    loaded = load_student(tmp_path / "student")
    x, t = torch.randn(32, 16), torch.randint(0, 1000, (32,))
    assert torch.equal(loaded.model(x, t), a(x, t))
    assert loaded.config == config
    assert loaded.card["loss"] == card["loss"]


@pytest.mark.parametrize("kind", ["tcd", "lcm"])
def test_shipped_students(kind: str) -> None:
    student = load_student(ASSETS / f"ring2d_{kind}")
    assert student.config.method == kind and student.config.data == "ring2d"
    assert student.card["loss"][-1] < 0.01  # the distillation converged
    out = student.model(torch.zeros(3, 2), torch.tensor([999, 500, 0]))
    assert out.shape == (3, 2) and torch.isfinite(out).all()


def test_bad_configs() -> None:
    with pytest.raises(ValueError, match="method must be 'tcd' or 'lcm'"):
        DistillConfig(method="cm")
    with pytest.raises(ValueError, match="data must be one of"):
        DistillConfig(data="moons")
    with pytest.raises(ValueError, match="ema_decay"):
        DistillConfig(ema_decay=1.0)
    with pytest.raises(FileNotFoundError, match=r"student\.safetensors"):
        load_student(Path("/nonexistent"))
