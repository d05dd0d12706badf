"""The main job on real images: scikit-learn's digits, the shipped teacher, TCD and LCM students and classifier load
and sample; the classifier's test accuracy is above its floor; FID of the test split against itself is ~0 and of
noise is large; precision and recall behave at their extremes; the demo runs end to end on a tiny budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("torchmetrics")
pytest.importorskip("diffusers")

from tcd_sampler.cli import main
from tcd_sampler.distill.data import ImageCaptionDataset
from tcd_sampler.evaluation.digits.classifier import accuracy, load_classifier
from tcd_sampler.evaluation.digits.data import load_digits_split, write_imagefolder
from tcd_sampler.evaluation.digits.demo import run_digits_demo
from tcd_sampler.evaluation.digits.metrics import DigitMetrics, precision_recall
from tcd_sampler.evaluation.digits.models import DIGITS_ASSETS, load_models, samplers

#: The shipped classifier's test accuracy must be at least this (it measured 0.98 when trained).
ACCURACY_FLOOR = 0.95


@pytest.fixture(scope="module")
def models():  # type: ignore[no-untyped-def]
    return load_models()


@pytest.fixture(scope="module")
def test_split():  # type: ignore[no-untyped-def]
    return load_digits_split("test")


def test_the_split_is_fixed_stratified_and_complete() -> None:
    train, test = load_digits_split("train"), load_digits_split("test")
    assert (len(train), len(test)) == (1438, 359)
    assert test.labels.bincount().tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]
    assert train.images.shape == (1438, 1, 8, 8) and train.images.min() == -1 and train.images.max() == 1
    torch.testing.assert_close(load_digits_split("test").images, test.images, rtol=0, atol=0)  # the same every time
    with pytest.raises(ValueError, match="split must be"):
        load_digits_split("validation")


def test_the_image_folder_is_what_the_trainer_reads(tmp_path: Path) -> None:
    from tcd_sampler.distill.data import DataOptions

    folder = write_imagefolder(tmp_path / "train")
    dataset = ImageCaptionDataset(folder, DataOptions(resolution=8, channels=1))
    train = load_digits_split("train")
    assert len(dataset) == len(train)
    sample = dataset[5]
    assert sample["caption"] == str(int(train.labels[5]))
    torch.testing.assert_close(sample["pixel_values"], train.images[5], rtol=0, atol=1 / 127.5)  # uint8 rounding


def test_the_classifier_is_above_its_floor(models, test_split) -> None:  # type: ignore[no-untyped-def]
    card = json.loads((DIGITS_ASSETS / "classifier" / "classifier.json").read_text())
    score = accuracy(models.classifier, test_split.images, test_split.labels)
    assert score == pytest.approx(card["test_accuracy"], abs=1e-6)
    assert score >= ACCURACY_FLOOR
    assert load_classifier(DIGITS_ASSETS / "classifier").head.weight.shape == (10, 64)


def test_fid_of_the_test_split_against_itself_is_zero_and_of_noise_large(models, test_split) -> None:  # type: ignore[no-untyped-def]
    metrics = DigitMetrics(models.classifier, test_split.images)
    same = metrics(test_split.images, test_split.labels)
    assert abs(same["fid"]) < 1e-3 and same["precision"] == 1.0 and same["recall"] == 1.0
    noise = torch.rand((500, 1, 8, 8), generator=torch.Generator().manual_seed(0)) * 2 - 1
    scored = metrics(noise, torch.arange(500) % 10)
    assert scored["fid"] > 100 and scored["accuracy"] < 0.5


def test_precision_and_recall_at_their_extremes() -> None:
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 4, generator=g)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    far = torch.randn(200, 4, generator=g) + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    # samples on one half of the real set: precise, but they recall only part of it
    half = real[real[:, 0] > 0]
    precision, recall = precision_recall(real, half)
    assert precision == 1.0 and recall < 0.8


def test_the_shipped_models_load_and_sample_digits(models) -> None:  # type: ignore[no-untyped-def]
    assert models.null_class == 10
    for kind, card in (("tcd", models.tcd_card), ("lcm", models.lcm_card)):
        assert card["config"]["objective"]["method"] == kind and card["steps"] > 0
    teacher_card = json.loads((DIGITS_ASSETS / "teacher" / "card.json").read_text())
    assert teacher_card["config"]["objective"]["method"] == "diffusion"
    labels = torch.arange(100) % 10
    noise = torch.randn((100, 1, 8, 8), generator=torch.Generator().manual_seed(7))
    for name, sample in samplers(models, (0.3,)).items():
        images = sample(4, noise.clone(), labels, torch.Generator().manual_seed(8))
        assert images.shape == (100, 1, 8, 8) and torch.isfinite(images).all()
        # real digits of the requested class, not noise: the classifier agrees most of the time
        assert accuracy(models.classifier, images, labels) > 0.8, name


def test_the_demo_runs_end_to_end_on_a_tiny_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = run_digits_demo(tmp_path, samples=20, seeds=(0, 1), nfes=(1, 2), progress=False)
    out = capsys.readouterr().out
    assert "**fid ↓**" in out and "| TCD γ=0.3 |" in out and "| DDIM 50 steps (reference) |" in out
    saved = json.loads((tmp_path / "digits.json").read_text())
    assert set(saved["summary"]) == {"TCD γ=0", "TCD γ=0.3", "TCD γ=0.5", "TCD γ=1", "LCM", "DDIM",
                                     "DPM-Solver++", "Euler"}  # fmt: skip
    assert set(saved["summary"]["DDIM"]) == {"1", "2", "50"} and set(saved["summary"]["LCM"]) == {"1", "2"}
    assert len(saved["per_seed"]["LCM"]["1"]) == 2 and saved["seeds"] == [0, 1]
    assert saved["summary"] == json.loads(json.dumps(report["summary"]))
    assert saved["train_split_vs_test"]["images"] == 20  # the baseline at the generated sets' size
    assert (tmp_path / "digits.png").stat().st_size > 10_000
    # one step draws no noise: every gamma gives the same images
    assert saved["per_seed"]["TCD γ=0"]["1"] == saved["per_seed"]["TCD γ=1"]["1"]


def test_the_demo_command_checks_before_it_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--output-dir", str(tmp_path / "ok"), "--samples", "20", "--seeds", "3", "--no-figure",
                 "--no-progress"]) == 0  # fmt: skip
    assert (tmp_path / "ok" / "digits.json").exists() and not (tmp_path / "ok" / "digits.png").exists()
    capsys.readouterr()
    assert main(["demo", "--output-dir", str(tmp_path / "few"), "--samples", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--samples must be at least 20" in err[0]
    assert main(["demo", "--models", str(tmp_path / "none"), "--output-dir", str(tmp_path / "m")]) == 2
    assert "lack ['teacher', 'tcd', 'lcm', 'classifier']" in capsys.readouterr().err
