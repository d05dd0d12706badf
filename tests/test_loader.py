"""The input pipeline of folder sources (tcd_sampler.distill.batches, .cache, the data index): the DataLoader gives
exactly the rows of the seeded per-epoch permutation for any number of workers, resume step or rank split, making
each epoch's permutation once; a worker's DataError reaches the caller as it was raised and the workers stop on
close; the scanned index round-trips and refuses another folder or options; the encodings cached on disk are
reused by a later cache (and by another rank) without running the VAE or text encoders, and a changed key
rebuilds them."""

from __future__ import annotations

import json
import logging
import multiprocessing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image

from tcd_sampler.distill import batches as batches_module
from tcd_sampler.distill import data as data_module
from tcd_sampler.distill.batches import EpochOrder, FolderBatches, StepSampler
from tcd_sampler.distill.cache import KEY_FILE, EncodingCache
from tcd_sampler.distill.data import DataError, DataOptions, ImageCaptionDataset, collate
from tcd_sampler.distill.teachers import conditions

RANDOM = DataOptions(16, crop="random", random_flip=True, caption_dropout=0.3, min_size=8, seed=3)
FIXED = DataOptions(16, min_size=8)


def reference_order(n: int, step: int, batch: int, seed: int) -> list[tuple[int, int]]:
    """The rows of a step as the trainer read them before the DataLoader (a permutation made per step): the
    specification the loader must keep."""
    out: list[tuple[int, int]] = []
    start = step * batch
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        out.extend((i, epoch) for i in perm[offset : offset + batch - len(out)])
    return out


def folder(root: Path, count: int = 7) -> Path:
    """``count`` 24×20 images with distinct pixels and captions."""
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        pixels = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"caption {i}")
    return root


def expected(dataset: ImageCaptionDataset, rows: list[tuple[int, int]]) -> dict[str, Any]:
    """What the trainer's old main-thread loop made of ``rows``."""
    return collate([dataset.sample(index, epoch) for index, epoch in rows])


def assert_same_batch(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["caption"] == want["caption"]
    for name in ("pixel_values", "original_size", "crop_top_left"):
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


class CountingVAE:
    """A VAE stand-in: latents are the 2×2-pooled pixels, in its dtype; counts its calls and images."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype, self.config, self.calls, self.images = dtype, SimpleNamespace(scaling_factor=0.5), 0, 0

    def encode(self, pixels: torch.Tensor) -> Any:
        self.calls += 1
        self.images += len(pixels)
        latents = torch.nn.functional.avg_pool2d(pixels.float(), 2).to(self.dtype)
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: latents))


class CountingText:
    """A text-to-image pipeline stand-in for teachers.conditions: encode_prompt's SD signature, counted."""

    def __init__(self, vae: CountingVAE) -> None:
        self.vae, self.calls, self.prompts = vae, 0, 0

    def encode_prompt(self, prompts: list[str], device: Any, count: int, guided: bool, *rest: Any) -> Any:
        self.calls += 1
        self.prompts += len(prompts)
        codes = torch.tensor([[float(sum(map(ord, p))), float(len(p))] for p in prompts])
        return codes[:, None, :].repeat(1, 3, 1).to(torch.bfloat16), None


# --- the rows ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "batch"), [(7, 4), (3, 8), (10, 5)])
def test_epoch_order_is_the_reference_order(n: int, batch: int) -> None:
    order = EpochOrder(n, batch, seed=11)
    for step in range(40):  # every epoch boundary, a batch larger than the data (n=3) included
        assert order.rows(step) == reference_order(n, step, batch, 11)
    assert batches_module._order(n, 17, batch, 11) == reference_order(n, 17, batch, 11)
    assert EpochOrder(n, batch, seed=11).rows(23) == reference_order(n, 23, batch, 11)  # straight to a late step


def test_each_epoch_permutation_is_made_once(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[int] = []
    real = torch.randperm

    def counted(n: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        made.append(n)
        return real(n, *args, **kwargs)

    monkeypatch.setattr(torch, "randperm", counted)
    order = EpochOrder(10, 4, seed=0)
    for step in range(25):  # 100 rows: 10 epochs, 25 steps
        order.rows(step)
    assert made == [10] * 10
    made.clear()
    sampler = StepSampler(EpochOrder(10, 4, seed=0), rank=1, local=2, start=5, stop=30)
    assert sum(1 for _ in sampler) == 25 and made == [10] * len({row // 10 for row in range(5 * 4, 30 * 4)})
    made.clear()
    for step in range(25):
        batches_module._order(10, step, 4, 0)  # the old way: a permutation a step (two at a boundary)
    assert len(made) > 25


@pytest.mark.parametrize("workers", [0, 2])
def test_folder_batches_give_the_reference_rows(tmp_path: Path, workers: int) -> None:
    """Any worker count, resume step and rank split: the rows, pixels (random crop and flip), captions (dropout) and
    sizes of the old loop."""
    dataset = ImageCaptionDataset(folder(tmp_path / "data"), RANDOM)
    pixel_space = SimpleNamespace(vae=None)
    for rank, local, start in [(0, 4, 0), (0, 2, 3), (1, 2, 3)]:
        with FolderBatches(dataset, pixel_space, "cpu", 4, 5, rank, local, workers=workers, start=start) as batches:
            for step in range(start, start + 6):
                rows = reference_order(len(dataset), step, 4, 5)[rank * local : (rank + 1) * local]
                latents, batch = batches(step)
                want = expected(dataset, rows)
                assert_same_batch(batch, want)
                assert torch.equal(latents, want["pixel_values"])


def test_steps_in_order_start_and_stop(tmp_path: Path) -> None:
    dataset = ImageCaptionDataset(folder(tmp_path / "data", 4), FIXED)
    batches = FolderBatches(dataset, SimpleNamespace(vae=None), "cpu", 2, 0, 0, 2, stop=5)
    batches(3)  # no start given: the first step asked for
    with pytest.raises(RuntimeError, match="step 4 is next, not 6"):
        batches(6)
    batches(4)
    with pytest.raises(RuntimeError, match="step 5 is past the last step: stop=5"):
        batches(5)
    with pytest.raises(RuntimeError, match="step 2 is next, not 0"):
        FolderBatches(dataset, SimpleNamespace(vae=None), "cpu", 2, 0, 0, 2, start=2)(0)
    with pytest.raises(ValueError, match=r"workers must be an integer in \[0"):
        FolderBatches(dataset, None, "cpu", 2, 0, 0, 2, workers=-1)
    with pytest.raises(ValueError, match=r"prefetch must be an integer in \[1"):
        FolderBatches(dataset, None, "cpu", 2, 0, 0, 2, prefetch=0)


def test_worker_data_error_reaches_the_caller_and_workers_stop(tmp_path: Path) -> None:
    root = folder(tmp_path / "data", 4)
    dataset = ImageCaptionDataset(root, FIXED)
    (root / "02.png").write_bytes(b"overwritten after the scan")
    before = set(multiprocessing.active_children())
    batches = FolderBatches(dataset, SimpleNamespace(vae=None), "cpu", 2, 0, 0, 2, workers=2)
    with pytest.raises(DataError) as caught:
        for step in range(4):  # two epochs: image 2 is in one of the first two steps
            batches(step)
    message = str(caught.value)
    assert message.startswith(f"folder {root}: the image {root / '02.png'} cannot be read any more")
    assert "Caught" not in message and "Traceback" not in message
    assert caught.value.worker_traceback is not None and "in DataLoader worker process" in caught.value.worker_traceback
    started = set(multiprocessing.active_children()) - before
    assert len(started) == 2
    batches.close()
    assert not any(process.is_alive() for process in started)
    assert set(multiprocessing.active_children()) - before == set()


# --- the scanned index -------------------------------------------------------------------------------------------


def test_index_round_trip_without_scanning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = folder(tmp_path / "data", 5)
    (root / "bad.png").write_bytes(b"not an image")
    (root / "bad.txt").write_text("a bad one")
    options = DataOptions(16, min_size=8, max_bad_fraction=0.5)
    scanned = ImageCaptionDataset(root, options)
    index = scanned.save_index(tmp_path / "run" / "data-index.json")
    assert index.is_file() and [p.name for p in index.parent.iterdir()] == ["data-index.json"]  # no temp file left

    def no_scan(*args: Any) -> None:
        raise AssertionError("from_index scanned")

    monkeypatch.setattr(data_module.folders, "_probe", no_scan)
    read = ImageCaptionDataset.from_index(index, root, options)
    assert read.records == scanned.records and read.source == scanned.source == "folder"
    assert (read.report.used, read.report.skipped) == (5, {"unreadable_image": 1})
    assert read.report.examples == scanned.report.examples
    assert read.fingerprint() == scanned.fingerprint()
    assert_same_batch(expected(read, [(0, 0), (3, 2)]), expected(scanned, [(0, 0), (3, 2)]))


def test_index_refuses_other_options_or_folders(tmp_path: Path) -> None:
    root = folder(tmp_path / "data", 3)
    other = folder(tmp_path / "other", 3)
    index = ImageCaptionDataset(root, FIXED).save_index(tmp_path / "data-index.json")
    name = str(index).replace("\\", "\\\\")
    with pytest.raises(ValueError, match=rf"data index {name} was made with another data options \(resolution=16, "
                                         r"not 32\)"):  # fmt: skip
        ImageCaptionDataset.from_index(index, root, DataOptions(32, min_size=8))
    with pytest.raises(ValueError, match=rf"data index {name} was made with another root \(.*data', not .*other'\)"):
        ImageCaptionDataset.from_index(index, other, FIXED)
    with pytest.raises(ValueError, match=rf"data index {name} was made with another source \('folder', not "):
        ImageCaptionDataset.from_index(index, root, FIXED, source="imagefolder")
    with pytest.raises(ValueError, match=rf"data index {name} was made with another verify_images"):
        ImageCaptionDataset.from_index(index, root, FIXED, verify_images=False)
    (tmp_path / "not-an-index.json").write_text(json.dumps({"records": []}))
    with pytest.raises(ValueError, match=r"not-an-index\.json is not a tcd-sampler data index"):
        ImageCaptionDataset.from_index(tmp_path / "not-an-index.json", root, FIXED)
    with pytest.raises(ValueError, match=r"missing\.json cannot be read"):
        ImageCaptionDataset.from_index(tmp_path / "missing.json", root, FIXED)
    # a different folder content has a different fingerprint
    assert ImageCaptionDataset(root, FIXED).fingerprint() != ImageCaptionDataset(folder(tmp_path / "d4", 4),
                                                                                 FIXED).fingerprint()  # fmt: skip


# --- the encodings on disk ---------------------------------------------------------------------------------------


def run_cached(dataset: ImageCaptionDataset, cache: EncodingCache, pipe: CountingText, steps: int,
               workers: int = 0) -> list[tuple[torch.Tensor, dict[str, Any], torch.Tensor, torch.Tensor]]:  # fmt: skip
    """A few steps of the trainer's data path: the batch, then its text conditions through the cache."""
    out = []
    with FolderBatches(dataset, pipe, "cpu", 4, 1, 0, 4, cache, workers=workers) as batches:
        for step in range(steps):
            latents, batch = batches(step)
            cond, uncond = conditions(pipe, batch["caption"], batch, "cpu", True, cache.text)
            assert uncond is not None
            out.append((latents, batch, cond.encoder_hidden_states, uncond.encoder_hidden_states))
    return out


def assert_same_runs(got: list[Any], want: list[Any]) -> None:
    for (latents, batch, text, empty), (latents_, batch_, text_, empty_) in zip(got, want, strict=True):
        for a, b in ((latents, latents_), (text, text_), (empty, empty_)):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        assert batch["caption"] == batch_["caption"] and batch["resolution"] == batch_["resolution"]
        assert torch.equal(batch["original_size"], batch_["original_size"])
        assert torch.equal(batch["crop_top_left"], batch_["crop_top_left"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_disk_cache_is_reused_without_encoding(tmp_path: Path, dtype: torch.dtype) -> None:
    dataset = ImageCaptionDataset(folder(tmp_path / "data", 7), DataOptions(16, min_size=8, caption_dropout=0.3))
    key = {"teacher": "tiny", "vae_dtype": str(dtype), "data": dataset.fingerprint()}
    memory_pipe = CountingText(CountingVAE(dtype))
    in_memory = run_cached(dataset, EncodingCache(memory_pipe, "cpu", 16), memory_pipe, 5)
    first_pipe = CountingText(CountingVAE(dtype))
    with EncodingCache(first_pipe, "cpu", 16, folder=tmp_path / "cache", key=key, shard_size=3) as cache:
        first = run_cached(dataset, cache, first_pipe, 5)
    assert first_pipe.vae.images == 7 and first_pipe.calls > 0  # every image once; the captions
    assert first_pipe.vae.calls == memory_pipe.vae.calls  # one VAE call per batch of new images, as in memory
    assert_same_runs(first, in_memory)
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert KEY_FILE in names and any(n.startswith("latents-r0-") for n in names)
    assert any(n.startswith("text-r0-") for n in names) and not any(n.startswith(".") for n in names)
    second_pipe = CountingText(CountingVAE(dtype))
    with pytest.MonkeyPatch.context() as patch:  # every image is cached: none is read again
        patch.setattr(ImageCaptionDataset, "__getitem__", lambda self, index: pytest.fail(f"read image {index}"))
        second = run_cached(dataset, EncodingCache(second_pipe, "cpu", 16, folder=tmp_path / "cache", key=key),
                            second_pipe, 5)  # fmt: skip
    assert (second_pipe.vae.calls, second_pipe.calls) == (0, 0)
    assert_same_runs(second, in_memory)
    third_pipe = CountingText(CountingVAE(dtype))
    third = run_cached(dataset, EncodingCache(third_pipe, "cpu", 16, folder=tmp_path / "cache", key=key), third_pipe,
                       5, workers=2)  # fmt: skip
    assert (third_pipe.vae.calls, third_pipe.calls) == (0, 0)
    assert_same_runs(third, in_memory)


@pytest.mark.parametrize("ahead", [[3, 1], [1, 3, 5, 6], []])
def test_cache_takes_what_workers_decoded_ahead(tmp_path: Path, ahead: list[int]) -> None:
    """Samples decoded ahead (some, others, none of the missing ones) give the latents of the in-process read."""
    from tcd_sampler.distill.cache import Decoded

    dataset = ImageCaptionDataset(folder(tmp_path / "data", 7), FIXED)
    rows = [(1, 2), (3, 2), (5, 2)]
    plain = EncodingCache(SimpleNamespace(vae=CountingVAE()), "cpu", 16)
    want_latents, want = plain.batch(dataset, rows)
    decoded = Decoded(ahead, expected(dataset, [(i, 2) for i in ahead])) if ahead else None
    vae = CountingVAE()
    got_latents, got = EncodingCache(SimpleNamespace(vae=vae), "cpu", 16).batch(dataset, rows, decoded)
    assert torch.equal(got_latents, want_latents) and vae.calls == 1 and vae.images == 3
    assert got["caption"] == want["caption"] and torch.equal(got["original_size"], want["original_size"])


def test_disk_cache_shared_by_ranks(tmp_path: Path) -> None:
    dataset = ImageCaptionDataset(folder(tmp_path / "data", 6), FIXED)
    key = {"data": dataset.fingerprint()}
    zero_pipe, one_pipe = CountingText(CountingVAE()), CountingText(CountingVAE())
    zero = EncodingCache(zero_pipe, "cpu", 16, folder=tmp_path / "cache", key=key, rank=0)
    one = EncodingCache(one_pipe, "cpu", 16, folder=tmp_path / "cache", key=key, rank=1)  # opened before rank 0 writes
    first, _ = zero.batch(dataset, [(0, 0), (4, 0), (2, 0)])
    zero.flush()
    again, _ = one.batch(dataset, [(4, 1), (2, 1), (5, 1)])  # 4 and 2 from rank 0's shard, 5 encoded
    assert (zero_pipe.vae.images, one_pipe.vae.images) == (3, 1)
    assert torch.equal(again[:2], first[1:])
    one.flush()
    assert len(list((tmp_path / "cache").glob("latents-r1-*.safetensors"))) == 1


def test_disk_cache_rebuilt_when_the_key_changes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dataset = ImageCaptionDataset(folder(tmp_path / "data", 4), FIXED)
    pipe = CountingText(CountingVAE())
    with EncodingCache(pipe, "cpu", 16, folder=tmp_path / "cache", key={"teacher": "a"}) as cache:
        cache.batch(dataset, [(0, 0), (1, 0)])
    shards = sorted((tmp_path / "cache").glob("latents-*"))
    assert len(shards) == 1
    (tmp_path / "cache" / "notes.txt").write_text("not ours")
    with caplog.at_level(logging.WARNING, logger="tcd_sampler.distill.cache"):
        changed = EncodingCache(pipe, "cpu", 16, folder=tmp_path / "cache", key={"teacher": "b"})
    assert len(caplog.records) == 1
    assert "made for another key['teacher']; removing its 1 shard files and encoding again" in caplog.text
    assert not shards[0].exists() and (tmp_path / "cache" / "notes.txt").exists()
    assert json.loads((tmp_path / "cache" / KEY_FILE).read_text())["key"] == {"teacher": "b"}
    changed.batch(dataset, [(0, 0), (1, 0)])
    assert pipe.vae.images == 4  # encoded again
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tcd_sampler.distill.cache"):
        EncodingCache(pipe, "cpu", 32, folder=tmp_path / "cache", key={"teacher": "b"})  # another resolution
    assert "made for another resolution" in caplog.text
    with pytest.raises(ValueError, match="key is needed with a folder"):
        EncodingCache(pipe, "cpu", 16, folder=tmp_path / "cache")
    with pytest.raises(TypeError, match="key must hold JSON values"):
        EncodingCache(pipe, "cpu", 16, folder=tmp_path / "cache", key={"dtype": torch.float16})
