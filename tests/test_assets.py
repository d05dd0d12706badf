"""The shipped files and their manifest (``tcd_sampler.assets``): every shipped file has a checksum that matches and is
shipped in the wheel, and a damaged copy of a shipped student, classifier or digits model is refused by its loader
with an error naming the file, before anything samples."""

from __future__ import annotations

import fnmatch
import hashlib
import shutil
import tomllib
from pathlib import Path

import pytest

from tcd_sampler import _checksums, assets
from tcd_sampler.assets import MANIFEST_NAME, ROOT, read_manifest, shipped_files, verify, write_manifest
from tcd_sampler.assets.__main__ import main as assets_main
from tcd_sampler.distill.student import load_student
from tcd_sampler.evaluation.digits.classifier import load_classifier

REPOSITORY = Path(__file__).resolve().parent.parent
DAMAGED = r"shipped file .*{} is damaged \(sha256 differs from the package manifest\): reinstall tcd-sampler"


def files_on_disk(root: Path) -> list[str]:
    """Every file under ``root`` but the code and the manifest itself."""
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and p.name != MANIFEST_NAME and "__pycache__" not in p.parts
    )


def flip_byte(file: Path, at: int | None = None) -> None:
    """Flip every bit of one byte of ``file`` (the middle one by default), keeping its size."""
    data = bytearray(file.read_bytes())
    index = len(data) // 2 if at is None else at
    data[index] ^= 0xFF
    file.write_bytes(bytes(data))
    _checksums._clear_cache()


@pytest.fixture
def copied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the shipped files (and manifest), which :func:`assets.verify` then takes for the shipped ones."""
    root = tmp_path / "assets"
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    monkeypatch.setattr(assets, "ROOT", root.resolve())
    return root


def test_the_manifest_covers_every_shipped_file_and_matches() -> None:
    names = shipped_files()
    assert "ring2d_tcd/student.safetensors" in names and "digits/tcd/unet/diffusion_pytorch_model.safetensors" in names
    assert files_on_disk(ROOT) == names  # no file under assets/ the manifest would not cover (a new kind of asset)
    manifest = read_manifest()
    assert sorted(manifest) == names  # a new asset without a checksum fails here: run --write-manifest
    for name, digest in manifest.items():
        assert hashlib.sha256((ROOT / name).read_bytes()).hexdigest() == digest, name
    verify(ROOT)


def test_the_wheel_ships_every_shipped_file_and_the_manifest() -> None:
    config = tomllib.loads((REPOSITORY / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = [p.removeprefix("assets/") for p in config["tool"]["setuptools"]["package-data"]["tcd_sampler"]]
    for name in [*shipped_files(), MANIFEST_NAME]:
        assert any(fnmatch.fnmatchcase(name, p) and name.count("/") == p.count("/") for p in patterns), name


def test_a_damaged_shipped_student_is_refused(copied: Path) -> None:
    load_student(copied / "ring2d_tcd")  # the copy as shipped loads
    flip_byte(copied / "ring2d_tcd" / "student.safetensors")
    with pytest.raises(ValueError, match=DAMAGED.format(r"ring2d_tcd/student\.safetensors")):
        load_student(copied / "ring2d_tcd")
    load_student(copied / "ring2d_lcm")  # the other one is intact
    flip_byte(copied / "ring2d_lcm" / "card.json", at=-3)  # a card is checked too
    with pytest.raises(ValueError, match=DAMAGED.format(r"ring2d_lcm/card\.json")):
        load_student(copied / "ring2d_lcm")


def test_a_damaged_classifier_and_digits_model_are_refused(copied: Path) -> None:
    digits = copied / "digits"
    flip_byte(digits / "classifier" / "classifier.safetensors")
    with pytest.raises(ValueError, match=DAMAGED.format(r"classifier\.safetensors")):
        load_classifier(digits / "classifier")
    from tcd_sampler.evaluation.digits.models import load_models

    with pytest.raises(ValueError, match="damaged"):
        load_models(digits)
    shutil.copy2(ROOT / "digits" / "classifier" / "classifier.safetensors", digits / "classifier")
    flip_byte(digits / "tcd" / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=DAMAGED.format(r"digits/tcd/unet/diffusion_pytorch_model\.safetensors")):
        load_models(digits)


def test_a_file_missing_from_the_manifest_and_a_missing_manifest(copied: Path) -> None:
    shutil.copy2(copied / "ring2d_tcd" / "card.json", copied / "ring2d_tcd" / "other.json")
    with pytest.raises(ValueError, match=r"other\.json is not in the package manifest .*--write-manifest"):
        verify(copied / "ring2d_tcd")
    (copied / MANIFEST_NAME).unlink()
    with pytest.raises(ValueError, match=r"manifest .*SHA256SUMS is missing: reinstall tcd-sampler"):
        verify(copied / "ring2d_lcm" / "student.safetensors")


def test_paths_outside_the_shipped_folder_are_not_checked(tmp_path: Path) -> None:
    own = tmp_path / "student.safetensors"
    own.write_bytes(b"not a shipped file")
    verify(own)
    verify(tmp_path)
    verify(ROOT / "no-such-model")  # left for the loader to report


def test_writing_the_manifest_again_and_the_command(copied: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shipped = (copied / MANIFEST_NAME).read_text(encoding="utf-8")
    assert write_manifest(copied) == copied / MANIFEST_NAME
    assert (copied / MANIFEST_NAME).read_text(encoding="utf-8") == shipped  # the same files: the same manifest
    assert assets_main([]) == 0
    assert f"{len(shipped_files())} shipped files match {copied.resolve() / MANIFEST_NAME}" in capsys.readouterr().out
    flip_byte(copied / "ring2d_tcd" / "student.safetensors")
    assert assets_main([]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "student.safetensors is damaged" in err
    assert assets_main(["--write-manifest"]) == 0  # after retraining: the new files' checksums
    assert "wrote" in capsys.readouterr().out
    load_student(copied / "ring2d_tcd")
