"""The trainer's data (tcd_sampler.distill.data): the three sources, the transform to the model's input and SDXL's
conditions, caption dropout, the bad-data policy, DataLoader workers and the rank × worker split of shards."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tcd_sampler.distill.data import (
    DataError,
    DataOptions,
    DataReport,
    ImageCaptionDataset,
    WebDatasetShards,
    collate,
    detect_source,
    expand_shards,
    open_dataset,
)

# --- fixtures: tiny images, folders and shards -------------------------------------------------------------------


def pattern(width: int, height: int, shift: int = 0) -> Image.Image:
    """An RGB image whose every pixel tells where it is (red: x, green: y)."""
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([(x * 5 + shift) % 256, (y * 7 + shift) % 256, np.full_like(x, 128)], axis=-1)
    return Image.fromarray(array.astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def caption_folder(root: Path, count: int = 3, size: tuple[int, int] = (24, 20)) -> Path:
    """``count`` images with captions: PNG + .txt at the top, JPEG + .caption in a subfolder (every other one)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        folder = root / "sub" if i % 2 else root
        folder.mkdir(exist_ok=True)
        ext, cap = (".jpg", ".caption") if i % 2 else (".png", ".txt")
        pattern(*size, shift=i).save(folder / f"img{i}{ext}")
        (folder / f"img{i}{cap}").write_text(f"caption {i}\n", encoding="utf-8")
    return root


def metadata_folder(root: Path, count: int = 3, column: str = "text", extra_lines: tuple[str, ...] = ()) -> Path:
    (root / "train").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        pattern(20, 24, shift=i).save(root / "train" / f"{i}.png")
        lines.append(json.dumps({"file_name": f"train/{i}.png", column: f"meta {i}"}))
    (root / "metadata.jsonl").write_text("\n".join([*lines, *extra_lines]) + "\n", encoding="utf-8")
    return root


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def sample_members(name: str, index: int, image_ext: str = "png", caption_ext: str = "txt") -> list[tuple[str, bytes]]:
    fmt = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}[image_ext]
    caption = name.encode()
    if caption_ext == "json":
        caption = json.dumps({"text": name, "width": 20}).encode()
    return [(f"{name}.{image_ext}", encode(pattern(20, 18, shift=index), fmt)), (f"{name}.{caption_ext}", caption)]


def shard_folder(root: Path, shards: int = 6, per_shard: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        members = []
        for j in range(per_shard):
            members += sample_members(f"s{s:02d}_{j}", s * per_shard + j)
        write_shard(root / f"data-{s:03d}.tar", members)
    return root


OPTS = DataOptions(resolution=16)


# --- the three sources -------------------------------------------------------------------------------------------


def test_folder_source(tmp_path):
    root = caption_folder(tmp_path / "data")
    dataset = ImageCaptionDataset(root, OPTS)
    assert dataset.source == "folder" and len(dataset) == 3
    assert dataset.report.total == 3 and dataset.report.used == 3 and dataset.report.skipped == {}
    captions = []
    for i in range(len(dataset)):
        sample = dataset[i]
        assert set(sample) == {"pixel_values", "caption", "original_size", "crop_top_left"}
        pixels = sample["pixel_values"]
        assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32 and pixels.is_contiguous()
        assert pixels.min() >= -1.0 and pixels.max() <= 1.0
        assert sample["original_size"] == (20, 24)
        captions.append(sample["caption"])
    assert sorted(captions) == ["caption 0", "caption 1", "caption 2"]
    assert torch.equal(dataset[-1]["pixel_values"], dataset[2]["pixel_values"])
    with pytest.raises(IndexError):
        dataset[3]
    # exact values of a solid PNG: 255 → 1, 0 → -1, 128 → 128/127.5 - 1
    Image.new("RGB", (16, 16), (255, 0, 128)).save(root / "solid.png")
    (root / "solid.txt").write_text("solid")
    solid = ImageCaptionDataset(root, OPTS)
    sample = solid[[r.path for r in solid.records].index(str(root / "solid.png"))]
    assert torch.equal(sample["pixel_values"][0], torch.ones(16, 16))
    assert torch.equal(sample["pixel_values"][1], -torch.ones(16, 16))
    assert torch.allclose(sample["pixel_values"][2], torch.full((16, 16), 128 / 127.5 - 1), atol=1e-6)


def test_caption_file_preference_and_require_captions(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    pattern(16, 16).save(root / "a.png")
    (root / "a.txt").write_text("  from txt \n")
    (root / "a.caption").write_text("from caption")
    pattern(16, 16).save(root / "b.png")  # no caption
    assert [r.caption for r in ImageCaptionDataset(root, DataOptions(16, require_captions=False)).records] == [
        "from txt",
        "",
    ]


def test_imagefolder_source(tmp_path):
    root = metadata_folder(tmp_path / "hf")
    assert detect_source(root) == "imagefolder"
    dataset = ImageCaptionDataset(root, OPTS)
    assert dataset.source == "imagefolder" and [dataset[i]["caption"] for i in range(3)] == [
        "meta 0",
        "meta 1",
        "meta 2",
    ]
    assert dataset[0]["pixel_values"].shape == (3, 16, 16) and dataset[0]["original_size"] == (24, 20)
    other = metadata_folder(tmp_path / "hf2", column="caption")
    assert [r.caption for r in ImageCaptionDataset(other, DataOptions(16, caption_column="caption")).records] == [
        "meta 0",
        "meta 1",
        "meta 2",
    ]


@pytest.mark.parametrize("form", ["folder", "brace", "file_list", "glob"])
def test_webdataset_source(tmp_path, form):
    root = shard_folder(tmp_path / "shards", shards=3, per_shard=2)
    given = {
        "folder": root,
        "brace": str(root / "data-{000..002}.tar"),
        "file_list": sorted(root.glob("*.tar")),
        "glob": str(root / "data-*.tar"),
    }[form]
    assert detect_source(given) == "webdataset"
    dataset = open_dataset(given, OPTS)
    assert isinstance(dataset, WebDatasetShards) and len(dataset.shards) == 3
    dataset.shuffle_shards = False
    samples = list(dataset)
    assert [s["caption"] for s in samples] == [f"s{s:02d}_{j}" for s in range(3) for j in range(2)]
    assert all(s["pixel_values"].shape == (3, 16, 16) and s["original_size"] == (18, 20) for s in samples)
    assert dataset.report.used == 6 and dataset.report.total == 6


def test_webdataset_extensions_and_grouping(tmp_path):
    members = (
        sample_members("a", 0, "jpg", "caption")
        + sample_members("b", 1, "webp", "json")
        + sample_members("dir/c", 2, "jpeg", "txt")
        + [("d.png", encode(pattern(20, 20), "PNG")), ("d.cls", b"3"), ("d.txt", b"d text")]  # an extra member
        + [("._e.png", b"macOS resource fork"), ("__meta__.yaml", b"ignored: true")]
    )
    shard = write_shard(tmp_path / "one.tar", members)
    dataset = WebDatasetShards(shard, OPTS)
    assert [s["caption"] for s in dataset] == ["a", "b", "dir/c", "d text"]
    assert dataset.report.total == 4 and dataset.report.skipped == {}


def test_detect_source(tmp_path):
    folder = caption_folder(tmp_path / "f", count=1)
    assert detect_source(folder) == "folder"
    shards = shard_folder(tmp_path / "s", shards=1, per_shard=1)
    assert detect_source(shards) == "webdataset"
    assert detect_source(shards / "data-000.tar") == "webdataset"
    with pytest.raises(ValueError, match="does not exist"):
        detect_source(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"is a file, not a folder"):
        detect_source(folder / "img0.txt")
    (folder / "metadata.csv").write_text("file_name,text\n")
    with pytest.raises(ValueError, match=r"metadata\.csv: only metadata\.jsonl is read"):
        detect_source(folder)
    with pytest.raises(ValueError, match="stream them with WebDatasetShards"):
        ImageCaptionDataset(shards, OPTS)


def test_expand_shards():
    assert expand_shards("d-{000..003}.tar") == ["d-000.tar", "d-001.tar", "d-002.tar", "d-003.tar"]
    assert expand_shards("d-{8..10}.tar") == ["d-8.tar", "d-9.tar", "d-10.tar"]
    assert expand_shards("{a,b}/x-{0..1}.tar") == ["a/x-0.tar", "a/x-1.tar", "b/x-0.tar", "b/x-1.tar"]
    assert expand_shards("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="cannot expand"):
        expand_shards("d-{abc}.tar")


# --- the transform and SDXL's conditions -------------------------------------------------------------------------


def reference(image: Image.Image, size: int, top: int, left: int, flip: bool) -> torch.Tensor:
    """torchvision's Resize(size) → [flip] → crop, written out with PIL."""
    w, h = image.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    resized = image.resize(new, Image.Resampling.BILINEAR)
    if flip:
        resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    window = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32)
    return torch.from_numpy(window).permute(2, 0, 1) / 127.5 - 1


def single(tmp_path: Path, image: Image.Image, name: str = "a") -> Path:
    root = tmp_path / name
    root.mkdir()
    image.save(root / "a.png")
    (root / "a.txt").write_text("a")
    return root


@pytest.mark.parametrize(("width", "height"), [(40, 24), (24, 40), (16, 16), (12, 30)])
def test_center_crop_and_sdxl_conditions(tmp_path, width, height):
    image = pattern(width, height)
    sample = ImageCaptionDataset(single(tmp_path, image), DataOptions(16, min_size=8))[0]
    new_w, new_h = (16, int(16 * height / width)) if width <= height else (int(16 * width / height), 16)
    top, left = round((new_h - 16) / 2), round((new_w - 16) / 2)
    assert sample["original_size"] == (height, width)
    assert sample["crop_top_left"] == (top, left)
    assert torch.equal(sample["pixel_values"], reference(image, 16, top, left, flip=False))


def test_random_crop_and_flip_reproducible(tmp_path):
    image = pattern(48, 24)
    root = single(tmp_path, image)
    options = DataOptions(16, crop="random", random_flip=True, seed=7)
    dataset = ImageCaptionDataset(root, options)
    again = ImageCaptionDataset(root, options)
    seen = set()
    flips = 0
    for epoch in range(24):
        dataset.set_epoch(epoch)
        again.set_epoch(epoch)
        a, b = dataset[0], again[0]
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["crop_top_left"] == b["crop_top_left"]
        top, left = a["crop_top_left"]
        assert top == 0 and 0 <= left <= 32 - 16
        plain = reference(image, 16, top, left, flip=False)
        flipped = reference(image, 16, top, left, flip=True)
        is_flipped = torch.equal(a["pixel_values"], flipped)
        assert is_flipped or torch.equal(a["pixel_values"], plain)
        flips += is_flipped
        seen.add(left)
    assert len(seen) > 4 and 4 <= flips <= 20  # the crop moves and about half are flipped
    other = ImageCaptionDataset(root, DataOptions(16, crop="random", random_flip=True, seed=8))
    lefts = []
    for epoch in range(24):
        other.set_epoch(epoch)
        lefts.append(other[0]["crop_top_left"][1])
    dataset_lefts = []
    for epoch in range(24):
        dataset.set_epoch(epoch)
        dataset_lefts.append(dataset[0]["crop_top_left"][1])
    assert lefts != dataset_lefts  # another seed, other crops


def test_exif_orientation_and_modes(tmp_path):
    root = tmp_path / "modes"
    root.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: a 30x20 file is a 20x30 image
    pattern(30, 20).save(root / "rot.jpg", exif=exif)
    Image.new("L", (20, 20), 200).save(root / "grey.png")
    Image.new("RGBA", (20, 20), (10, 20, 30, 0)).save(root / "alpha.png")
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(root / "deep.png")
    for name in ("rot", "grey", "alpha", "deep"):
        (root / f"{name}.txt").write_text(name)
    dataset = ImageCaptionDataset(root, OPTS)
    samples = {dataset[i]["caption"]: dataset[i] for i in range(len(dataset))}
    assert samples["rot"]["original_size"] == (30, 20)
    assert torch.allclose(samples["grey"]["pixel_values"], torch.full((3, 16, 16), 200 / 127.5 - 1), atol=1e-6)
    assert torch.allclose(samples["alpha"]["pixel_values"][0], torch.full((16, 16), 10 / 127.5 - 1), atol=1e-6)
    assert torch.equal(samples["deep"]["pixel_values"], torch.ones(3, 16, 16))  # 16-bit white stays white


def test_caption_dropout_rate(tmp_path):
    root = caption_folder(tmp_path / "data", count=4)
    dataset = ImageCaptionDataset(root, DataOptions(16, caption_dropout=0.25, seed=3))
    dropped = 0
    trials = 0
    for epoch in range(150):
        dataset.set_epoch(epoch)
        for i in range(4):
            dropped += dataset[i]["caption"] == ""
            trials += 1
    sd = (trials * 0.25 * 0.75) ** 0.5
    assert abs(dropped - trials * 0.25) < 4 * sd
    never = ImageCaptionDataset(root, DataOptions(16, caption_dropout=0.0))
    always = ImageCaptionDataset(root, DataOptions(16, caption_dropout=1.0))
    assert all(never[i]["caption"] for i in range(4)) and not any(always[i]["caption"] for i in range(4))
    shards = shard_folder(tmp_path / "s", shards=2, per_shard=2)
    assert all(s["caption"] == "" for s in WebDatasetShards(shards, DataOptions(16, caption_dropout=1.0)))


def test_collate(tmp_path):
    dataset = ImageCaptionDataset(caption_folder(tmp_path / "data"), OPTS)
    batch = collate([dataset[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    assert isinstance(batch["caption"], list) and len(batch["caption"]) == 3
    assert batch["original_size"].dtype == torch.int64 and batch["original_size"].tolist() == [[20, 24]] * 3
    assert batch["crop_top_left"].shape == (3, 2)
    with pytest.raises(ValueError, match="at least one sample"):
        collate([])
    with pytest.raises(ValueError, match="keys"):
        collate([{"pixel_values": torch.zeros(3, 16, 16)}])


# --- bad data ----------------------------------------------------------------------------------------------------


def truncated_png(path: Path) -> None:
    data = encode(pattern(64, 64), "PNG")
    path.write_bytes(data[: len(data) // 2])


BAD_CASES = {
    "unreadable_image": lambda root: (root / "bad.png").write_bytes(b"this is not an image"),
    "truncated": lambda root: truncated_png(root / "bad.png"),
    "missing_caption": lambda root: (root / "bad.txt").unlink(),
    "empty_caption": lambda root: (root / "bad.txt").write_text("   \n"),
    "too_small": lambda root: pattern(6, 40).save(root / "bad.png"),
}
REASON_OF = {"truncated": "unreadable_image", "empty_caption": "missing_caption"}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_folder_bad_data(tmp_path, case, caplog):
    root = caption_folder(tmp_path / "data", count=9)
    pattern(24, 20).save(root / "bad.png")
    (root / "bad.txt").write_text("bad")
    BAD_CASES[case](root)
    reason = REASON_OF.get(case, case)
    # below the threshold: skipped and counted, and the summary logged
    with caplog.at_level("WARNING", logger="tcd_sampler.distill.data"):
        dataset = ImageCaptionDataset(root, DataOptions(16, max_bad_fraction=0.1))
    assert len(dataset) == 9 and str(root / "bad.png") not in [r.path for r in dataset.records]
    report = dataset.report
    assert (report.total, report.used, report.skipped) == (10, 9, {reason: 1})
    assert report.examples[reason][0].startswith(str(root / "bad.png"))
    assert "9 of 10 samples used, 1 skipped (10%" in report.summary() and reason in caplog.text
    # above it: one clear error naming the file, the rule and the counts
    with pytest.raises(DataError, match=r"1 of 10 samples are bad \(10%\), above max_bad_fraction=0.05") as info:
        ImageCaptionDataset(root, DataOptions(16, max_bad_fraction=0.05))
    assert f"{reason} (" in str(info.value) and str(root / "bad.png") in str(info.value)
    assert isinstance(info.value, ValueError)


def test_too_small_is_configurable(tmp_path):
    root = single(tmp_path, pattern(40, 6))
    with pytest.raises(DataError, match=r"too_small .*40x6, shorter side 6 < min_size 8"):
        ImageCaptionDataset(root, DataOptions(16))
    assert ImageCaptionDataset(root, DataOptions(16, min_size=6))[0]["pixel_values"].shape == (3, 16, 16)


def test_truncated_image_without_verify_stops_in_getitem(tmp_path):
    root = caption_folder(tmp_path / "data", count=2)
    truncated_png(root / "img0.png")
    dataset = ImageCaptionDataset(root, OPTS, verify_images=False)  # headers only: it passes the scan
    assert len(dataset) == 2
    with pytest.raises(DataError, match=rf"the image {root / 'img0.png'} cannot be read any more"):
        dataset[dataset.records.index(next(r for r in dataset.records if r.path.endswith("img0.png")))]


def test_empty_sources(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("no images here")
    with pytest.raises(DataError, match=rf"folder {empty}: no samples found \(no .png/.jpg.* 1 other files\)"):
        ImageCaptionDataset(empty, OPTS)
    nested = shard_folder(tmp_path / "nested" / "train", shards=2, per_shard=1).parent
    (nested / "readme.md").write_text("shards below")
    with pytest.raises(DataError, match=r"3 other files, 2 of them shards: use source='webdataset'"):
        ImageCaptionDataset(nested, OPTS)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "metadata.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"metadata\.jsonl has no records"):
        ImageCaptionDataset(hf, OPTS)
    shard = write_shard(tmp_path / "empty.tar", [])
    with pytest.raises(DataError, match=r"webdataset .*empty\.tar.*no samples found \(shards read: empty\.tar\)"):
        list(WebDatasetShards(shard, OPTS))


def test_all_bad_stops_even_at_threshold_one(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.png").write_bytes(b"junk")
    (root / "a.txt").write_text("a")
    with pytest.raises(DataError, match="none of the 1 samples is usable"):
        ImageCaptionDataset(root, DataOptions(16, max_bad_fraction=1.0))


METADATA_CASES = {
    "bad_json_line": ("{not json", "bad_metadata", "not a JSON line"),
    "not_an_object": ("[1, 2]", "bad_metadata", "a JSON list, not an object"),
    "missing_file_name": (json.dumps({"text": "no file"}), "bad_metadata", "no 'file_name'"),
    "missing_image": (json.dumps({"file_name": "gone.png", "text": "x"}), "missing_image", "'gone.png' is not a file"),
    "missing_caption": (json.dumps({"file_name": "train/0.png"}), "missing_caption", "no 'text'"),
    "caption_not_text": (json.dumps({"file_name": "train/0.png", "text": ["a"]}), "missing_caption", "list, not text"),
}


@pytest.mark.parametrize("case", list(METADATA_CASES))
def test_imagefolder_bad_metadata(tmp_path, case):
    line, reason, detail = METADATA_CASES[case]
    root = metadata_folder(tmp_path / "hf", count=9, extra_lines=(line,))
    dataset = ImageCaptionDataset(root, DataOptions(16, max_bad_fraction=0.1))
    assert len(dataset) == 9 and dataset.report.skipped == {reason: 1} and dataset.report.total == 10
    assert dataset.report.examples[reason][0].startswith(f"{root / 'metadata.jsonl'}:10 (")
    assert detail in dataset.report.examples[reason][0]
    with pytest.raises(DataError, match=rf"{reason} \(.*metadata\.jsonl:10 \(.*{detail[:8]}"):
        ImageCaptionDataset(root, DataOptions(16, max_bad_fraction=0.0))


def bad_shard(root: Path) -> Path:
    """One shard of 10 samples: 7 good, a missing caption, an unreadable image, a caption without its image."""
    members = []
    for j in range(7):
        members += sample_members(f"good{j}", j)
    members += [("nocap.png", encode(pattern(20, 20), "PNG"))]
    members += [("junk.png", b"not a png"), ("junk.txt", b"junk")]
    members += [("orphan.txt", b"no image")]
    root.mkdir(parents=True, exist_ok=True)
    return write_shard(root / "bad.tar", members)


def test_webdataset_bad_samples_counted_and_threshold(tmp_path):
    shard = bad_shard(tmp_path / "s")
    dataset = WebDatasetShards(shard, DataOptions(16, max_bad_fraction=0.5))
    assert sorted(s["caption"] for s in dataset) == [f"good{j}" for j in range(7)]
    report = dataset.report
    assert (report.total, report.used) == (10, 7)
    assert report.skipped == {"missing_caption": 1, "unreadable_image": 1, "missing_image": 1}
    assert report.examples["unreadable_image"][0].startswith(f"{shard}:junk.png (")
    # the running check: after min_samples samples, above the threshold → one error
    with pytest.raises(DataError, match=r"running count after 9 samples\): 2 of 9 samples are bad") as info:
        list(WebDatasetShards(shard, DataOptions(16, max_bad_fraction=0.2), min_samples=5))
    assert "junk.png" in str(info.value) and "nocap.png" in str(info.value)
    # fewer samples than min_samples: the end of the pass checks the whole count
    with pytest.raises(DataError, match=r"3 of 10 samples are bad \(30%\), above max_bad_fraction=0.2:"):
        list(WebDatasetShards(shard, DataOptions(16, max_bad_fraction=0.2)))


def test_webdataset_unreadable_shard(tmp_path):
    root = shard_folder(tmp_path / "s", shards=4, per_shard=40)
    for name, cut in (("data-001.tar", 0), ("data-002.tar", 700)):  # cut between members, cut inside a member
        data = (root / name).read_bytes()
        (root / name).write_bytes(data[: len(data) // 2 + cut])
    (root / "data-003.tar").write_bytes(b"not a tar at all")
    dataset = WebDatasetShards(root, DataOptions(16, max_bad_fraction=0.1), shuffle_shards=False)
    captions = [s["caption"] for s in dataset]
    assert captions[:40] == [f"s00_{j}" for j in range(40)]
    assert 40 < len(captions) < 120 and all(c.startswith(("s00", "s01", "s02")) for c in captions)  # halves kept
    assert dataset.report.skipped == {"unreadable_shard": 3}
    examples = " ".join(dataset.report.examples["unreadable_shard"])
    assert "data-001.tar (cut short: it ends at byte" in examples
    assert "data-002.tar" in examples and "data-003.tar" in examples


def test_webdataset_repeat_and_epochs(tmp_path):
    root = shard_folder(tmp_path / "s", shards=2, per_shard=2)
    dataset = WebDatasetShards(root, DataOptions(16, crop="random", random_flip=True), repeat=True)
    stream = iter(dataset)
    captions = [next(stream)["caption"] for _ in range(12)]
    assert Counter(captions) == Counter({f"s{s:02d}_{j}": 3 for s in range(2) for j in range(2)})
    assert dataset.shards_for(epoch=0) != dataset.shards_for(epoch=1) or dataset.shards_for(epoch=1) != (
        dataset.shards_for(epoch=2)
    )
    # the same samples with the same seed, whatever the shuffle buffer
    plain = {s["caption"]: s["pixel_values"] for s in WebDatasetShards(root, DataOptions(16, crop="random"))}
    buffered = {
        s["caption"]: s["pixel_values"]
        for s in WebDatasetShards(root, DataOptions(16, crop="random"), shuffle_buffer=3)
    }
    assert plain.keys() == buffered.keys() and all(torch.equal(plain[k], buffered[k]) for k in plain)


# --- arguments ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"resolution": 12}, ValueError, "resolution must be a positive multiple of 8, got 12"),
        ({"resolution": 0}, ValueError, "resolution must be an integer in"),
        ({"resolution": 16.0}, TypeError, "resolution must be an integer"),
        ({"crop": "top"}, ValueError, r"crop must be one of \('center', 'random'\)"),
        ({"random_flip": 1}, TypeError, "random_flip must be a bool"),
        ({"caption_dropout": 1.5}, ValueError, r"caption_dropout must be in \[0.0, 1.0\], got 1.5"),
        ({"caption_dropout": -0.1}, ValueError, r"caption_dropout must be in \[0.0, 1.0\]"),
        ({"max_bad_fraction": 2}, ValueError, r"max_bad_fraction must be in \[0.0, 1.0\], got 2"),
        ({"max_bad_fraction": "0.1"}, TypeError, "max_bad_fraction must be a number"),
        ({"min_size": 0}, ValueError, "min_size must be an integer in"),
        ({"caption_column": ""}, TypeError, "caption_column must be a non-empty string"),
        ({"interpolation": "cubic"}, ValueError, "interpolation must be one of"),
        ({"seed": -1}, ValueError, "seed must be an integer in"),
    ],
)
def test_invalid_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        DataOptions(**kwargs)


def test_invalid_dataset_arguments(tmp_path):
    root = caption_folder(tmp_path / "data", count=1)
    shards = shard_folder(tmp_path / "s", shards=2, per_shard=1)
    with pytest.raises(ValueError, match="does not exist"):
        ImageCaptionDataset(tmp_path / "missing", OPTS)
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike"):
        ImageCaptionDataset(3, OPTS)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="options must be a DataOptions"):
        ImageCaptionDataset(root, {"resolution": 16})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="source must be one of"):
        ImageCaptionDataset(root, OPTS, source="csv")
    with pytest.raises(ValueError, match=r"scan_workers must be an integer in \[1"):
        ImageCaptionDataset(root, OPTS, scan_workers=0)
    with pytest.raises(ValueError, match=r"shards: 1 of 2 shard files do not exist: .*data-009\.tar"):
        WebDatasetShards(str(shards / "data-{000,009}.tar"), OPTS)
    with pytest.raises(ValueError, match=r"holds no \.tar"):
        WebDatasetShards(root, OPTS)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, 1\], got 2"):
        WebDatasetShards(shards, OPTS, rank=2, world_size=2)
    with pytest.raises(ValueError, match="2 shards cannot be split across world_size=3"):
        WebDatasetShards(shards, OPTS, rank=0, world_size=3)
    with pytest.raises(ValueError, match="shuffle_buffer must be an integer"):
        WebDatasetShards(shards, OPTS, shuffle_buffer=-1)
    with pytest.raises(ValueError, match="min_samples must be an integer"):
        WebDatasetShards(shards, OPTS, min_samples=0)
    with pytest.raises(ValueError, match="shards must name at least one shard"):
        WebDatasetShards([], OPTS)


def test_report_object():
    report = DataReport("folder", "/data", 0.25)
    for _ in range(3):
        report.record_used()
    for i in range(5):
        report.record_bad("too_small", f"/data/{i}.png", "4x4")
    assert report.examples["too_small"] == ["/data/0.png (4x4)", "/data/1.png (4x4)", "/data/2.png (4x4)"]
    assert report.bad_fraction == 5 / 8 and report.exceeds
    text = report.summary()
    assert text.startswith("folder /data: 3 of 8 samples used, 5 skipped (62.5%; max_bad_fraction 0.25)")
    assert "too_small (the image's shorter side is below min_size): 5, e.g. /data/0.png (4x4)" in text
    with pytest.raises(ValueError, match="reason must be one of"):
        report.record_bad("odd", "/x")


# --- DataLoader workers and ranks --------------------------------------------------------------------------------


def test_dataloader_workers_over_folder(tmp_path):
    dataset = ImageCaptionDataset(caption_folder(tmp_path / "data", count=6), OPTS)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == 3 and all(b["pixel_values"].shape == (2, 3, 16, 16) for b in batches)
    assert sorted(c for b in batches for c in b["caption"]) == [f"caption {i}" for i in range(6)]
    # the same tensors as in-process: the draws do not depend on the worker
    assert torch.equal(batches[0]["pixel_values"][0], dataset[0]["pixel_values"])


def test_shards_split_across_ranks_and_workers(tmp_path):
    root = shard_folder(tmp_path / "s", shards=7, per_shard=3)
    options = DataOptions(16, crop="random", random_flip=True, seed=5)
    everything = Counter(f"s{s:02d}_{j}" for s in range(7) for j in range(3))
    alone = {s["caption"]: s["pixel_values"] for s in WebDatasetShards(root, options)}  # one process, no workers
    per_rank = []
    for rank in range(2):
        dataset = WebDatasetShards(root, options, rank=rank, world_size=2)
        loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate)
        seen: Counter[str] = Counter()
        for batch in loader:
            seen.update(batch["caption"])
            for caption, pixels in zip(batch["caption"], batch["pixel_values"], strict=True):
                assert torch.equal(pixels, alone[caption])  # the draws do not depend on the split
        per_rank.append(seen)
        readers = [set(dataset.shards_for(w, 2)) for w in range(2)]
        assert readers[0].isdisjoint(readers[1]) and all(readers)
    assert per_rank[0] + per_rank[1] == everything  # every sample exactly once
    assert not set(per_rank[0]) & set(per_rank[1]) and all(per_rank)


def loader_error(loader: DataLoader) -> DataError:
    """The DataError that iterating ``loader`` raises, its traceback dropped: the traceback's frames hold the
    loader's iterator, whose workers would otherwise be shut down only at interpreter exit (seconds of timeouts)."""
    try:
        for _ in loader:
            pass
    except DataError as err:
        return err.with_traceback(None)
    raise AssertionError("the loader raised no DataError")


def test_worker_errors_surface_as_the_clear_error(tmp_path):
    root = caption_folder(tmp_path / "data", count=4)
    dataset = ImageCaptionDataset(root, OPTS)
    (root / "img2.png").write_bytes(b"overwritten after the scan")
    error = loader_error(DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=collate))
    assert isinstance(error, ValueError)
    message = str(error)
    assert message.startswith(f"folder {root}: the image {root / 'img2.png'} cannot be read any more")
    assert "Traceback" not in message and "Caught" not in message
    assert error.worker_traceback is not None and "in DataLoader worker process" in error.worker_traceback
    # a stream above the threshold in a worker
    shard = bad_shard(tmp_path / "s")
    dataset = WebDatasetShards(shard, DataOptions(16, max_bad_fraction=0.1))
    error = loader_error(DataLoader(dataset, num_workers=2, batch_size=2, collate_fn=collate))
    assert re.match(r"webdataset .*bad\.tar \(1 shards\); rank 0, worker 0: 3 of 10 samples are bad", str(error))
    assert "Traceback" not in str(error) and error.worker_traceback is not None


def test_distributed_defaults(tmp_path, monkeypatch):
    root = shard_folder(tmp_path / "s", shards=4, per_shard=1)
    assert (WebDatasetShards(root, OPTS).rank, WebDatasetShards(root, OPTS).world_size) == (0, 1)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    dataset = WebDatasetShards(root, OPTS)
    assert (dataset.rank, dataset.world_size) == (1, 4) and len(dataset.shards_for()) == 1
    assert os.path.basename(dataset.shards[dataset.shards_for()[0]]).startswith("data-")
