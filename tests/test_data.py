"""Specification of the data layer: Parquet shards, built-in datasets, transforms."""
from __future__ import annotations

import hashlib
import json
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from biflow.config import DataConfig
from biflow.data import (
    DataError,
    ShardError,
    ShardSet,
    ShardWriter,
    batches,
    load_split,
    prepare,
    read_manifest,
    read_shards,
    save_grid,
    split_indices,
    to_model,
    to_uint8,
    write_shards,
)
from biflow.data.builtin import PHOTOS, prepared_dir
from biflow.data.imagefolder import load_image

PINNED_PYARROW = "25.0.1"  # Parquet files name their writer's version, so pinned hashes hold for this one


def _toy(n: int = 20, shape: tuple[int, int, int] = (4, 5, 3), classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)  # (N, H, W, C)
    labels = rng.integers(0, classes, n).astype(np.int64)  # (N,)
    meta = dict(name="toy", split="train", num_classes=classes, class_names=["a", "b", "c"][:classes])
    return images, labels, meta


# ------------------------------------------------------------------------ shard format
def test_write_then_read_returns_identical_arrays(tmp_path):
    images, labels, meta = _toy(20)
    paths = write_shards(tmp_path / "s", images, labels, meta, rows_per_shard=7)
    assert [p.name for p in paths] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    got = read_shards(tmp_path / "s")
    assert isinstance(got, ShardSet)
    assert got.images.dtype == np.uint8 and got.labels.dtype == np.int64
    np.testing.assert_array_equal(got.images, images)
    np.testing.assert_array_equal(got.labels, labels)
    assert got.meta["image_shape"] == [4, 5, 3] and got.meta["count"] == 20
    assert len(got) == 20 and got.num_classes == 3 and got.image_shape == (4, 5, 3)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["manifest.json", *(p.name for p in paths)]


def test_parquet_schema_and_metadata_follow_the_documented_format(tmp_path):
    images, labels, meta = _toy(5)
    (path,) = write_shards(tmp_path, images, labels, {**meta, "extra": {"k": 1}})
    schema = pq.read_schema(path)
    assert [(f.name, f.type) for f in schema] == [
        ("image", pa.binary()), ("height", pa.int32()), ("width", pa.int32()),
        ("channels", pa.int32()), ("label", pa.int64()),
    ]
    stored = json.loads(schema.metadata[b"biflow"])
    assert stored == {**meta, "extra": {"k": 1}, "image_shape": [4, 5, 3], "count": 5}
    row = pq.read_table(path).slice(0, 1).to_pylist()[0]
    assert row["image"] == images[0].tobytes() and (row["height"], row["width"], row["channels"]) == (4, 5, 3)
    manifest = read_manifest(tmp_path)
    assert manifest["files"][0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest["files"][0]["rows"] == 5 and manifest["meta"] == stored


def test_content_hash_is_stable_and_changes_with_content(tmp_path):
    images, labels, meta = _toy(10)
    write_shards(tmp_path / "a", images, labels, meta)
    write_shards(tmp_path / "b", images, labels, meta)
    changed = images.copy()
    changed[3, 0, 0, 0] ^= 1
    write_shards(tmp_path / "c", changed, labels, meta)
    ha, hb, hc = (read_shards(tmp_path / k).content_hash for k in "abc")
    assert ha == hb and ha != hc and len(ha) == 64


def test_rewrite_replaces_old_shards(tmp_path):
    images, labels, meta = _toy(20)
    write_shards(tmp_path, images, labels, meta, rows_per_shard=5)
    write_shards(tmp_path, images[:6], labels[:6], meta, rows_per_shard=5)
    assert sorted(p.name for p in tmp_path.glob("part-*")) == ["part-00000.parquet", "part-00001.parquet"]
    assert len(read_shards(tmp_path)) == 6
    assert not list(tmp_path.glob(".*tmp")), "no temp files left behind"


def test_empty_split_round_trips(tmp_path):
    images, labels, meta = _toy(0)
    write_shards(tmp_path, images, labels, meta)
    got = read_shards(tmp_path)
    assert got.images.shape == (0, 4, 5, 3) and got.labels.shape == (0,)


def test_write_shards_output_is_pinned_byte_for_byte(tmp_path, monkeypatch):
    """Content hashes recorded with the in-memory writer this streaming one replaced (and its digits recipe)."""
    if pa.__version__ != PINNED_PYARROW:
        pytest.skip(f"hashes pinned with pyarrow {PINNED_PYARROW}, this is {pa.__version__}")
    write_shards(tmp_path / "a", *_toy(20), rows_per_shard=7)
    write_shards(tmp_path / "empty", *_toy(0))
    assert read_manifest(tmp_path / "a")["content_hash"].startswith("c027de0d434b8ed835bbc686")
    assert read_manifest(tmp_path / "empty")["content_hash"].startswith("beb9634480d59904f866871b")
    digits = prepare(DataConfig(name="digits", seed=0, workers=3), tmp_path / "digits")
    assert read_manifest(digits / "test")["content_hash"].startswith("2e6777c8b1c6894d495fe414")
    import biflow.data.shards as shards

    monkeypatch.setattr(shards, "_ROW_GROUP_BYTES", 3 * 60)  # several row groups per part
    write_shards(tmp_path / "groups", *_toy(20), rows_per_shard=100)
    assert read_manifest(tmp_path / "groups")["content_hash"].startswith("4b250d0f12942a46ffd93f7f")


def test_streaming_writer_flushes_parts_of_rows_per_shard_and_matches_write_shards(tmp_path):
    images, labels, meta = _toy(20)
    writer = ShardWriter(tmp_path / "stream", meta, image_shape=(4, 5, 3), count=20, rows_per_shard=7)
    written = []
    for lo, hi in [(0, 3), (3, 3), (3, 12), (12, 20)]:  # batches of 3, 0, 9 and 8 rows
        writer.add(images[lo:hi], labels[lo:hi])
        written.append([e["rows"] for e in writer.entries])
    assert written == [[], [], [7], [7, 7]]  # a part is written as soon as rows_per_shard rows are buffered
    manifest = writer.close()
    assert [f["rows"] for f in manifest["files"]] == [7, 7, 6]
    write_shards(tmp_path / "whole", images, labels, meta, rows_per_shard=7)
    assert manifest == read_manifest(tmp_path / "whole")
    for name in ("part-00000.parquet", "part-00002.parquet", "manifest.json"):
        assert (tmp_path / "stream" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_streaming_writer_keeps_the_old_directory_until_its_first_part(tmp_path):
    images, labels, meta = _toy(20)
    write_shards(tmp_path, images, labels, meta, rows_per_shard=5)
    writer = ShardWriter(tmp_path, meta, (4, 5, 3), count=8, rows_per_shard=5)
    writer.add(images[:4], labels[:4])
    assert len(read_shards(tmp_path)) == 20  # nothing written yet: the old directory still reads
    writer.add(images[4:8], labels[4:8])
    with pytest.raises(ShardError, match="manifest missing"):  # mid-rewrite reads as incomplete
        read_shards(tmp_path)
    writer.close()
    assert sorted(p.name for p in tmp_path.glob("part-*")) == ["part-00000.parquet", "part-00001.parquet"]
    np.testing.assert_array_equal(read_shards(tmp_path).images, images[:8])


def test_streaming_writer_checks_batches_and_the_declared_count(tmp_path):
    images, labels, meta = _toy(6)
    writer = ShardWriter(tmp_path, meta, (4, 5, 3), count=5)
    with pytest.raises(ValueError, match=r"uint8 \(n, 4, 5, 3\)"):
        writer.add(images[:, :2], labels)
    with pytest.raises(ValueError, match="6 rows added, count is 5"):
        writer.add(images, labels)
    writer.add(images[:4], labels[:4])
    with pytest.raises(ValueError, match="4 rows added, count is 5"):
        writer.close()
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(ValueError, match=r"image_shape must be \(H, W, C\)"):
        ShardWriter(tmp_path, meta, (4, 5), count=1)


def test_write_rejects_bad_input(tmp_path):
    images, labels, meta = _toy(4)
    with pytest.raises(ValueError, match="uint8"):
        write_shards(tmp_path, images.astype(np.float32), labels, meta)
    with pytest.raises(ValueError, match="labels"):
        write_shards(tmp_path, images, labels + 3, meta)


def test_truncated_parquet_is_a_shard_error_naming_the_file(tmp_path):
    images, labels, meta = _toy(20)
    paths = write_shards(tmp_path, images, labels, meta, rows_per_shard=10)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=r"part-00001\.parquet: corrupt or truncated") as err:
        read_shards(tmp_path)
    assert "\n" not in str(err.value)


def test_garbage_file_is_a_shard_error_naming_the_file(tmp_path):
    images, labels, meta = _toy(20)
    paths = write_shards(tmp_path, images, labels, meta, rows_per_shard=10)
    paths[0].write_bytes(b"this is not parquet" * 10)
    with pytest.raises(ShardError, match=r"part-00000\.parquet"):
        read_shards(tmp_path)


def test_edited_shard_fails_the_manifest_hash(tmp_path):
    images, labels, meta = _toy(10)
    (path,) = write_shards(tmp_path, images, labels, meta)
    write_shards(tmp_path / "other", images[::-1].copy(), labels, meta)
    shutil.copy(tmp_path / "other" / path.name, path)  # valid Parquet, different content
    with pytest.raises(ShardError, match=r"part-00000\.parquet: content differs"):
        read_shards(tmp_path)


def test_missing_directory_is_a_shard_error(tmp_path):
    with pytest.raises(ShardError, match=r"nowhere: no shards found; run `biflow prepare` or check data.source"):
        read_shards(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="no shards found"):
        read_shards(tmp_path / "empty")


def test_missing_manifest_reads_as_an_incomplete_write(tmp_path):
    write_shards(tmp_path, *_toy(5))
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ShardError, match="manifest missing"):
        read_shards(tmp_path)


def test_shapes_must_agree_across_shards(tmp_path):
    images, labels, meta = _toy(10, shape=(4, 5, 3))
    write_shards(tmp_path / "a", images, labels, meta, rows_per_shard=5)
    small, _, _ = _toy(5, shape=(2, 2, 3))
    write_shards(tmp_path / "b", small, labels[:5], meta)
    # Splice b's shard into a and make the manifest agree, so only the shape is wrong.
    foreign = tmp_path / "a" / "part-00001.parquet"
    shutil.copy(tmp_path / "b" / "part-00000.parquet", foreign)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest["files"][1]["sha256"] = hashlib.sha256(foreign.read_bytes()).hexdigest()
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"part-00001\.parquet: image shape \(2, 2, 3\) differs"):
        read_shards(tmp_path / "a")


# ----------------------------------------------------------------------- built-ins
@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    return prepare(DataConfig(name="digits", seed=0), tmp_path_factory.mktemp("digits"))


def test_digits_are_8x8_uint8_in_0_255_with_10_classes(digits_root):
    train, test = load_split(digits_root, "train"), load_split(digits_root, "test")
    assert len(train) + len(test) == 1797
    assert len(test) == pytest.approx(0.2 * 1797, abs=10)
    for s in (train, test):
        assert s.images.shape[1:] == (8, 8, 1) and s.images.dtype == np.uint8
        assert s.num_classes == 10 and set(np.unique(s.labels)) == set(range(10))
    assert train.images.min() == 0 and train.images.max() == 255
    assert train.meta["split"] == "train" and test.meta["split"] == "test"


def test_digits_split_is_deterministic_stratified_and_disjoint(digits_root, tmp_path):
    labels = np.random.default_rng(1).integers(0, 10, 500)
    tr, te = split_indices(labels, 0.2, seed=0)
    tr2, te2 = split_indices(labels, 0.2, seed=0)
    np.testing.assert_array_equal(te, te2)
    assert not set(tr) & set(te) and sorted([*tr, *te]) == list(range(500))
    assert not np.array_equal(te, split_indices(labels, 0.2, seed=1)[1])
    again = prepare(DataConfig(name="digits", seed=0), tmp_path / "again")
    for split in ("train", "test"):
        assert load_split(again, split).content_hash == load_split(digits_root, split).content_hash


def test_prepare_skips_work_when_already_prepared(digits_root):
    manifest = digits_root / "train" / "manifest.json"
    before = manifest.stat().st_mtime_ns
    assert prepare(DataConfig(name="digits", seed=0), digits_root) == digits_root
    assert manifest.stat().st_mtime_ns == before


def test_shards_dataset_reads_a_prepared_directory(digits_root):
    cfg = DataConfig(name="shards", source=str(digits_root))
    assert prepare(cfg, "/unused") == digits_root
    assert load_split(cfg, "test").content_hash == load_split(digits_root, "test").content_hash
    with pytest.raises(ValueError, match="split must be"):
        load_split(digits_root, "val")


def test_patches_are_rgb_crops_of_the_requested_size(tmp_path):
    cfg = DataConfig(name="patches", image_size=12, patches_per_image=5, test_fraction=0.4, seed=3)
    train = load_split(cfg, "train", root=tmp_path)
    test = load_split(cfg, "test", root=tmp_path)
    assert train.images.shape[1:] == (12, 12, 3) and train.images.dtype == np.uint8
    assert train.num_classes == len(train.meta["class_names"]) >= 2
    assert train.num_classes <= len(PHOTOS)
    assert len(train) + len(test) == 5 * train.num_classes
    assert set(np.unique(test.labels)) == set(range(test.num_classes))  # every photo in both splits
    again = load_split(cfg, "train", root=tmp_path / "fresh")
    np.testing.assert_array_equal(again.images, train.images)


def _png(path: Path, size: tuple[int, int], color, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def _tree(root: Path) -> Path:
    _png(root / "zebra" / "z1.png", (20, 12), (255, 0, 0))
    _png(root / "zebra" / "z2.png", (7, 9), 128, mode="L")
    _png(root / "apple" / "a1.png", (10, 10), (0, 0, 255, 255), mode="RGBA")
    _png(root / "apple" / "a2.png", (33, 17), (0, 255, 0))
    _png(root / "apple" / "a3.png", (16, 16), (1, 2, 3))
    (root / "apple" / "notes.txt").write_text("not an image, ignored")
    return root


def test_imagefolder_converts_a_class_per_folder_tree(tmp_path):
    cfg = DataConfig(name="imagefolder", source=str(_tree(tmp_path / "tree")), image_size=8, test_fraction=0.34)
    root = prepare(cfg, tmp_path / "out")
    train, test = load_split(root, "train"), load_split(root, "test")
    assert train.meta["class_names"] == ["apple", "zebra"] and train.num_classes == 2
    assert len(train) + len(test) == 5 and len(test) == 2  # one per class
    both = np.concatenate([train.images, test.images])
    assert both.shape == (5, 8, 8, 3) and both.dtype == np.uint8
    red = np.concatenate([train.labels, test.labels])[both[:, 4, 4, 0] == 255]
    assert list(red) == [1]  # the red image is a zebra
    gray = both[(both[:, 4, 4] == 128).all(axis=1)]
    assert len(gray) == 1  # the L-mode image became RGB gray


def _in_memory_reference(cfg: DataConfig, root: Path, out: Path) -> dict[str, str]:
    """The tree decoded whole (class folders sorted, files sorted), split, and written with write_shards -> hashes."""
    files = [(label, f) for label, d in enumerate(sorted(Path(cfg.source).iterdir()))
             for f in sorted(d.glob("*.png"))]
    images = np.stack([load_image(f, cfg.image_size) for _, f in files])  # (N, S, S, 3)
    labels = np.array([label for label, _ in files])
    hashes = {}
    for split, idx in zip(("train", "test"), split_indices(labels, cfg.test_fraction, cfg.seed)):
        meta = {k: v for k, v in read_manifest(root / split)["meta"].items() if k not in ("image_shape", "count")}
        write_shards(out / split, images[idx], labels[idx], meta, cfg.rows_per_shard)
        hashes[split] = read_manifest(out / split)["content_hash"]
    return hashes


def test_imagefolder_prepare_streams_in_chunks_with_bounded_memory(tmp_path, monkeypatch):
    """Decoded DECODE_CHUNK images at a time, written in file order: the same bytes as decoding all of it first."""
    import biflow.data.imagefolder as imagefolder

    monkeypatch.setattr(imagefolder, "DECODE_CHUNK", 2)
    added, add = [], ShardWriter.add

    def spy(self, images, labels):
        added.append((self.meta["split"], len(images)))
        add(self, images, labels)

    monkeypatch.setattr(ShardWriter, "add", spy)
    tree = _tree(tmp_path / "tree")
    for i in range(4):
        _png(tree / "apple" / f"b{i}.png", (12, 14), (40 * i, 9, 200))
    cfg = DataConfig(name="imagefolder", source=str(tree), image_size=8, test_fraction=0.34, rows_per_shard=3)
    root = prepare(cfg, tmp_path / "out")
    assert added == [("train", 2), ("train", 2), ("train", 2), ("test", 2), ("test", 1)]
    got = {split: read_manifest(root / split)["content_hash"] for split in ("train", "test")}
    assert got == _in_memory_reference(cfg, root, tmp_path / "reference")


def test_imagefolder_decoding_processes_do_not_change_the_data(tmp_path, monkeypatch):
    """data.workers processes decode (here 2, one image per task); output, recipe and cache dir are those of 1."""
    import biflow.data.imagefolder as imagefolder

    pools = []

    class Pool(ProcessPoolExecutor):
        def __init__(self, workers: int):
            pools.append(workers)
            super().__init__(workers)

    monkeypatch.setattr(imagefolder, "DECODE_TASK", 1)
    monkeypatch.setattr(imagefolder, "ProcessPoolExecutor", Pool)
    tree = _tree(tmp_path / "tree")
    serial = DataConfig(name="imagefolder", source=str(tree), image_size=8, test_fraction=0.34, workers=1)
    parallel = serial.model_copy(update={"workers": 2})
    a, b = prepare(serial, tmp_path / "serial"), prepare(parallel, tmp_path / "parallel")
    assert pools == [2, 2]  # one pool of 2 per split of the parallel run, none for the serial one
    for split in ("train", "test"):
        assert (a / split / "part-00000.parquet").read_bytes() == (b / split / "part-00000.parquet").read_bytes()
    assert prepared_dir(serial, tmp_path) == prepared_dir(parallel, tmp_path)
    before = (a / "train" / "manifest.json").stat().st_mtime_ns
    prepare(parallel, a)  # already prepared: workers is not part of the recipe
    assert (a / "train" / "manifest.json").stat().st_mtime_ns == before
    (tree / "zebra" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"broken\.png: unreadable image") as err:
        prepare(parallel, tmp_path / "broken")
    assert "\n" not in str(err.value)


def test_imagefolder_errors_are_one_line_and_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        prepare(DataConfig(name="imagefolder", source=str(tmp_path / "missing")), tmp_path / "o1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders found"):
        prepare(DataConfig(name="imagefolder", source=str(tmp_path / "empty")), tmp_path / "o2")
    tree = _tree(tmp_path / "tree")
    (tree / "zebra" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"broken\.png: unreadable image") as err:
        prepare(DataConfig(name="imagefolder", source=str(tree)), tmp_path / "o3")
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="data.source is required"):
        prepare(DataConfig(name="imagefolder"), tmp_path / "o4")


# ---------------------------------------------------------------------- transforms
def test_to_model_and_to_uint8_round_trip_exactly():
    u = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1).repeat(3, axis=3)  # (4, 8, 8, 3)
    x = to_model(u)
    assert x.dtype == torch.float32 and x.shape == (4, 3, 8, 8)
    assert x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_array_equal(to_uint8(x), u)
    assert to_uint8(torch.full((1, 1, 2, 2), 7.0)).max() == 255  # clamped
    assert to_uint8(torch.full((1, 1, 2, 2), -7.0)).min() == 0


def test_batches_yield_shuffled_model_tensors_forever():
    images, labels, meta = _toy(10, shape=(4, 4, 1))
    s = ShardSet(images, labels, meta)
    it = batches(s, batch_size=4, seed=0)
    got = [next(it) for _ in range(6)]  # 3 epochs of 2 full batches (2 rows dropped per epoch)
    for x, y in got:
        assert x.shape == (4, 1, 4, 4) and x.dtype == torch.float32 and y.shape == (4,) and y.dtype == torch.int64
    row_of = {img.tobytes(): i for i, img in enumerate(images)}  # toy rows are all distinct
    epochs = [[row_of[u.tobytes()] for x, _ in got[i : i + 2] for u in to_uint8(x)] for i in (0, 2, 4)]
    assert all(len(set(rows)) == 8 for rows in epochs)  # no repeats within an epoch
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch
    assert [int(y) for y in got[0][1]] == [int(labels[r]) for r in epochs[0][:4]]  # labels stay paired
    x, y = next(batches(s, batch_size=64, seed=0))  # dataset smaller than a batch: all of it
    assert x.shape[0] == 10 and sorted(y.tolist()) == sorted(labels.tolist())


def test_save_grid_writes_an_upscaled_png(tmp_path):
    digits = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 1), dtype=np.uint8)
    path = save_grid(digits, tmp_path / "grid.png", nrow=5)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "L"
        assert im.width >= 5 * 32 and im.height >= 2 * 32
    rgb = save_grid(np.zeros((3, 16, 16, 3), np.uint8), tmp_path / "rgb.png", nrow=8)
    with Image.open(rgb) as im:
        assert im.mode == "RGB"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "rgb.png"]


def test_large_shards_are_split_into_row_groups(tmp_path, monkeypatch):
    import biflow.data.shards as shards

    monkeypatch.setattr(shards, "_ROW_GROUP_BYTES", 3 * 60)  # 3 images of 4x5x3 bytes per row group
    images, labels, meta = _toy(20)
    (path,) = write_shards(tmp_path, images, labels, meta, rows_per_shard=100)
    assert pq.ParquetFile(path).metadata.num_row_groups == 7
    np.testing.assert_array_equal(read_shards(tmp_path).images, images)


def test_data_errors_are_user_errors():
    from biflow.errors import UserError

    assert issubclass(ShardError, UserError) and issubclass(ShardError, ValueError)
    assert issubclass(DataError, UserError) and issubclass(DataError, ValueError)
