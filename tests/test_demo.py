"""The 2-D study (``tcd-sampler demo-2d``) end to end, on a small budget: every method runs, the table prints, the
files are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tcd_sampler.cli import main
from tcd_sampler.evaluation.demo import run_demo


def test_demo_writes_its_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = run_demo(tmp_path, samples=300, nfes=(1, 2), progress=False)
    out = capsys.readouterr().out
    assert "| TCD γ=0.3 |" in out and "| LCM |" in out and "| Teacher DPM-Solver++ |" in out
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["metrics"] == json.loads(json.dumps(report["metrics"]))
    assert set(saved["metrics"]) == {
        "TCD γ=0.0", "TCD γ=0.3", "TCD γ=0.5", "TCD γ=1.0", "LCM", "Teacher DDIM", "Teacher DPM-Solver++"
    }  # fmt: skip
    for by_nfe in saved["metrics"].values():
        assert set(by_nfe) == {"1", "2"}
        assert all(m["finite"] == 1.0 for m in by_nfe.values())
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    # one step draws no noise: every gamma gives the same samples
    assert saved["metrics"]["TCD γ=0.0"]["1"] == saved["metrics"]["TCD γ=1.0"]["1"]


def test_demo_command(tmp_path: Path) -> None:
    assert main(["demo-2d", "--output-dir", str(tmp_path), "--samples", "200", "--no-figure"]) == 0
    assert (tmp_path / "demo.json").exists() and not (tmp_path / "demo.png").exists()


def test_distill_command(tmp_path: Path) -> None:
    argv = ["distill", "--method", "lcm", "--steps", "5", "--warmup-steps", "5", "--batch-size", "32"]
    assert main([*argv, "--output", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "student.safetensors").exists() and (tmp_path / "s" / "card.json").exists()
