"""Tests for the decode-once cache (data/cache.py), the image-folder format (data/folder.py) and load_splits."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import medpeft_ray.data.folder as folder_mod
import medpeft_ray.data.records as records_mod
from medpeft_ray.data.records import SplitOptions
from medpeft_ray.data import load_splits
from medpeft_ray.data.base import DatasetSplits, LabeledImages
from medpeft_ray.data.cache import cache_root, cached_splits
from medpeft_ray.errors import DataError

SIZE = 32


def _entries(cache: Path) -> list[Path]:
    if not cache.is_dir():
        return []
    return sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".tmp-"))


# ----------------------------------------------------------------------------- cache


def _toy_splits(seed: int) -> DatasetSplits:
    rng = np.random.default_rng(seed)

    def split(n: int, offset: int) -> LabeledImages:
        return LabeledImages(
            rng.integers(0, 256, size=(n, 8, 8), dtype=np.uint8),
            (rng.random((n, 3)) < 0.5).astype(np.float32),
            np.arange(offset, offset + n),
        )

    return DatasetSplits(split(6, 0), split(3, 100), split(2, 200), ("x", "y", "z"), "multilabel")


class CountingBuilder:
    def __init__(self, seed: int = 0) -> None:
        self.calls = 0
        self.seed = seed

    def __call__(self) -> DatasetSplits:
        self.calls += 1
        return _toy_splits(self.seed)


def test_cache_root_follows_env(cache_dir: Path) -> None:
    assert cache_root() == cache_dir


def test_second_load_reads_from_disk_without_building(cache_dir: Path) -> None:
    build = CountingBuilder()
    key = {"dataset": "toy", "image_size": 8, "seed": 0}
    first = cached_splits(key, build)
    assert build.calls == 1
    assert len(_entries(cache_dir)) == 1

    second = cached_splits(dict(key), build)
    assert build.calls == 1, "a cache hit must not call the builder"
    for name in ("train", "val", "test"):
        a, b = getattr(first, name), getattr(second, name)
        assert isinstance(b.images, np.memmap), "cached images should be memory-mapped"
        assert b.images.dtype == np.uint8
        assert np.array_equal(a.images, b.images)
        assert np.array_equal(a.labels, b.labels)
        assert b.labels.dtype == np.float32
        assert np.array_equal(a.groups, b.groups)
    assert second.class_names == first.class_names == ("x", "y", "z")
    assert second.task == "multilabel"


def test_key_order_does_not_matter(cache_dir: Path) -> None:
    build = CountingBuilder()
    cached_splits({"a": 1, "b": 2}, build)
    cached_splits({"b": 2, "a": 1}, build)
    assert build.calls == 1


def test_different_key_builds_again(cache_dir: Path) -> None:
    build = CountingBuilder()
    cached_splits({"dataset": "toy", "seed": 0}, build)
    other = CountingBuilder(seed=1)
    result = cached_splits({"dataset": "toy", "seed": 1}, other)
    assert other.calls == 1
    assert build.calls == 1
    assert len(_entries(cache_dir)) == 2
    assert np.array_equal(result.train.images, _toy_splits(1).train.images)
    # and each key still maps to its own data
    again = cached_splits({"dataset": "toy", "seed": 0}, CountingBuilder(seed=99))
    assert np.array_equal(again.train.images, _toy_splits(0).train.images)


def test_no_temporary_directories_left(cache_dir: Path) -> None:
    cached_splits({"k": 1}, CountingBuilder())
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".tmp-")]


def test_empty_split_round_trips(cache_dir: Path) -> None:
    def build() -> DatasetSplits:
        full = _toy_splits(0)
        empty = LabeledImages(np.zeros((0, 8, 8), np.uint8), np.zeros((0, 3), np.float32), np.zeros(0, np.int64))
        return DatasetSplits(full.train, empty, empty, full.class_names, full.task)

    cached_splits({"k": "empty"}, build)
    again = cached_splits({"k": "empty"}, lambda: pytest.fail("rebuilt"))
    assert len(again.val) == 0 and again.val.images.shape == (0, 8, 8)
    assert len(again.train) == 6


def test_load_splits_synthetic_uses_cache(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opts = {"num_patients": 20, "images_per_patient": 1, "num_classes": 2}
    first = load_splits("synthetic", None, SIZE, opts, 0)
    import medpeft_ray.data.registry as registry

    spec = registry.get_dataset("synthetic")

    def boom(*args: object) -> DatasetSplits:
        raise AssertionError("cache miss: the loader was called again")

    monkeypatch.setitem(registry._DATASETS, "synthetic", type(spec)(spec.name, boom, spec.options, spec.needs_root))
    second = load_splits("synthetic", None, SIZE, opts, 0)
    assert isinstance(second.train.images, np.memmap)
    assert np.array_equal(first.train.images, second.train.images)
    # a different seed is a different key: the (now failing) loader is called
    with pytest.raises(AssertionError, match="cache miss"):
        load_splits("synthetic", None, SIZE, opts, 1)


# ----------------------------------------------------------------------------- folder datasets


def _write_image(path: Path, size: tuple[int, int], mode: str, value: int, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(f"{path.name}|{value}".encode()))
    w, h = size
    base = np.clip(value + rng.integers(-10, 10, size=(h, w)), 0, 255).astype(np.uint8)
    if mode == "RGB":
        arr = np.stack([base, base, base], axis=-1)
    elif mode == "RGBA":
        arr = np.stack([base, base, base, np.full_like(base, 255)], axis=-1)
    else:
        arr = base
    img = Image.fromarray(arr)
    assert img.mode == mode
    img.save(path, format=fmt)


CLASS_VALUE = {"benign": 60, "malignant": 200, "normal": 130}


def _make_flat_folder(root: Path, per_class: int = 7) -> dict[str, int]:
    """``root/<class>/*`` with mixed formats, sizes and modes; returns the image count per class."""
    shapes = [(40, 30), (17, 23), (64, 64), (32, 32), (100, 50), (20, 80), (33, 33), (45, 12)]
    modes = ["RGB", "L", "RGBA", "L", "RGB", "L", "RGB", "L"]
    counts = {}
    # write classes out of sorted order to check that the class order is sorted, not creation order
    for cls in ("normal", "malignant", "benign"):
        for i in range(per_class):
            mode = modes[i % len(modes)]
            suffix = [".png", ".jpg", ".jpeg", ".PNG"][i % 4]
            if suffix in (".jpg", ".jpeg") and mode == "RGBA":
                mode = "RGB"  # JPEG cannot hold alpha
            _write_image(root / cls / f"img{i:02d}{suffix}", shapes[i % len(shapes)], mode, CLASS_VALUE[cls])
        counts[cls] = per_class
    # files that are not images are ignored
    (root / "benign" / "notes.txt").write_text("not an image")
    return counts


def _check_splits(ds: DatasetSplits, class_names: tuple[str, ...]) -> None:
    assert ds.class_names == class_names
    assert ds.task == "multiclass"
    for split in (ds.train, ds.val, ds.test):
        n = len(split)
        assert split.images.dtype == np.uint8
        assert split.images.shape == (n, SIZE, SIZE)
        assert split.labels.shape == (n, len(class_names))
        assert split.labels.dtype == np.float32
        if n:
            assert set(np.unique(split.labels).tolist()) == {0.0, 1.0} or len(class_names) == 1
            assert np.array_equal(split.labels.sum(axis=1), np.ones(n))


def test_folder_flat_layout(tmp_path: Path) -> None:
    root = tmp_path / "data"
    counts = _make_flat_folder(root)
    ds = load_splits("folder", root, SIZE, {}, 0)
    _check_splits(ds, ("benign", "malignant", "normal"))
    total = sum(counts.values())
    assert len(ds.train) + len(ds.val) + len(ds.test) == total
    defaults = SplitOptions()
    assert len(ds.val) == round(defaults.val_fraction * total) and len(ds.test) == round(defaults.test_fraction * total)
    # every file appears exactly once, with the label of its folder and its own pixels
    all_groups = np.concatenate([ds.train.groups, ds.val.groups, ds.test.groups])
    assert len(set(all_groups.tolist())) == total
    for split in (ds.train, ds.val, ds.test):
        for img, lab, grp in zip(split.images, split.labels, split.groups):
            cls = grp.split("/")[0]
            assert ds.class_names[int(np.argmax(lab))] == cls
            assert abs(float(img.mean()) - CLASS_VALUE[cls]) < 15
    assert "benign/notes.txt" not in set(all_groups.tolist())


def test_folder_split_depends_on_seed_and_fractions(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _make_flat_folder(root)
    a = load_splits("folder", root, SIZE, {}, 0)
    b = load_splits("folder", root, SIZE, {}, 1)
    assert set(a.val.groups.tolist()) != set(b.val.groups.tolist())
    c = load_splits("folder", root, SIZE, {"val_fraction": 0.0, "test_fraction": 0.5}, 0)
    assert len(c.val) == 0
    assert len(c.test) == 11  # 10.5 rounds half up
    assert len(c.train) == 21 - len(c.test)


def test_folder_unknown_option_rejected(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _make_flat_folder(root, per_class=1)
    from medpeft_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"dataset.options.no_such_option: unknown key"):
        load_splits("folder", root, SIZE, {"no_such_option": 1}, 0)


def test_folder_explicit_split_layout(tmp_path: Path) -> None:
    root = tmp_path / "data"
    layout = {
        "train": {"benign": 4, "malignant": 3, "normal": 2},
        "val": {"benign": 2, "malignant": 1},  # no "normal" in val
        "test": {"benign": 1, "malignant": 1, "normal": 1},
    }
    for split, classes in layout.items():
        for cls, n in classes.items():
            for i in range(n):
                suffix = ".jpg" if i % 2 else ".png"
                _write_image(root / split / cls / f"{split}_{i}{suffix}", (24 + i, 40), "RGB" if i % 2 else "L", CLASS_VALUE[cls])
    ds = load_splits("folder", root, SIZE, {}, 0)
    _check_splits(ds, ("benign", "malignant", "normal"))
    for split, classes in layout.items():
        part: LabeledImages = getattr(ds, split)
        assert len(part) == sum(classes.values())
        per_class = part.labels.sum(axis=0).astype(int).tolist()
        assert per_class == [classes.get(c, 0) for c in ds.class_names]
        assert all(g.split("/")[1].startswith(split + "_") for g in part.groups.tolist())
    # the split folders decide, not the seed
    other = load_splits("folder", root, SIZE, {}, 5)
    assert np.array_equal(other.val.groups, ds.val.groups)


def test_corrupt_image_raises_data_error_naming_file(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _make_flat_folder(root, per_class=3)
    bad = root / "malignant" / "x.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    with pytest.raises(DataError) as info:
        load_splits("folder", root, SIZE, {}, 0)
    assert str(bad) in str(info.value)
    assert info.value.exit_code == 2


def test_truncated_image_raises_data_error(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _make_flat_folder(root, per_class=2)
    good = root / "benign" / "img00.png"
    bad = root / "benign" / "trunc.png"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(DataError, match="trunc.png"):
        load_splits("folder", root, SIZE, {}, 0)


def test_corrupt_image_skipped_when_asked(tmp_path: Path) -> None:
    root = tmp_path / "data"
    counts = _make_flat_folder(root, per_class=3)
    bad = root / "malignant" / "x.png"
    bad.write_bytes(b"\x89PNG definitely not a png" + bytes(range(200)))
    ds = load_splits("folder", root, SIZE, {"skip_unreadable": True}, 0)
    total = len(ds.train) + len(ds.val) + len(ds.test)
    assert total == sum(counts.values())  # one fewer than the files on disk (which include x.png)
    all_groups = set(np.concatenate([ds.train.groups, ds.val.groups, ds.test.groups]).tolist())
    assert "malignant/x.png" not in all_groups
    assert len(all_groups) == total
    _check_splits(ds, ("benign", "malignant", "normal"))
    # the labels stay aligned with the kept images after the skip
    for split in (ds.train, ds.val, ds.test):
        for lab, grp in zip(split.labels, split.groups):
            assert ds.class_names[int(np.argmax(lab))] == grp.split("/")[0]


def test_empty_root_raises_data_error(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DataError) as info:
        load_splits("folder", root, SIZE, {}, 0)
    assert str(root.resolve()) in str(info.value)


def test_root_without_class_folders_raises(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    _write_image(root / "a.png", (10, 10), "L", 100)  # images but no class folders
    with pytest.raises(DataError) as info:
        load_splits("folder", root, SIZE, {}, 0)
    assert str(root.resolve()) in str(info.value)


def test_class_folders_without_images_raise(tmp_path: Path) -> None:
    root = tmp_path / "noimg"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no folder dataset found: looked for class folders"):
        load_splits("folder", root, SIZE, {}, 0)


def test_missing_root_raises_data_error(tmp_path: Path) -> None:
    root = tmp_path / "does_not_exist"
    with pytest.raises(DataError) as info:
        folder_mod.list_folder(root)
    assert str(root) in str(info.value)


def test_folder_is_cached_and_not_decoded_twice(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    _make_flat_folder(root, per_class=3)
    first = load_splits("folder", root, SIZE, {}, 0)

    def no_decode(path: Path, size: int) -> np.ndarray:
        raise AssertionError(f"decoded {path} again")

    monkeypatch.setattr(records_mod, "decode_image", no_decode)
    second = load_splits("folder", root, SIZE, {}, 0)
    assert isinstance(second.train.images, np.memmap)
    for name in ("train", "val", "test"):
        assert np.array_equal(getattr(first, name).images, getattr(second, name).images)
        assert np.array_equal(getattr(first, name).groups, getattr(second, name).groups)
    assert len(_entries(cache_dir)) == 1


def test_changed_file_changes_cache_key(tmp_path: Path, cache_dir: Path) -> None:
    root = tmp_path / "data"
    _make_flat_folder(root, per_class=3)
    first = load_splits("folder", root, SIZE, {}, 0)
    target = root / "normal" / "img00.png"
    grp = "normal/img00.png"

    def image_of(ds: DatasetSplits) -> np.ndarray:
        for split in (ds.train, ds.val, ds.test):
            hits = np.flatnonzero(split.groups == grp)
            if len(hits):
                return np.asarray(split.images[hits[0]])
        raise AssertionError(f"{grp} not found")

    assert abs(image_of(first).mean() - CLASS_VALUE["normal"]) < 15
    # overwrite with new content (a white image of another size) and move the mtime on explicitly
    Image.fromarray(np.full((50, 70), 255, np.uint8)).save(target)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    second = load_splits("folder", root, SIZE, {}, 0)
    assert len(_entries(cache_dir)) == 2, "a changed file must give a new cache entry"
    assert image_of(second).min() == 255, "the changed image must be decoded afresh, not read stale"


def test_touch_only_mtime_change_rebuilds(tmp_path: Path, cache_dir: Path) -> None:
    root = tmp_path / "data"
    _make_flat_folder(root, per_class=2)
    load_splits("folder", root, SIZE, {}, 0)
    target = root / "benign" / "img01.jpg"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    load_splits("folder", root, SIZE, {}, 0)
    assert len(_entries(cache_dir)) == 2


def test_adding_a_file_rebuilds(tmp_path: Path, cache_dir: Path) -> None:
    root = tmp_path / "data"
    counts = _make_flat_folder(root, per_class=2)
    first = load_splits("folder", root, SIZE, {}, 0)
    _write_image(root / "normal" / "new.png", (12, 12), "L", 130)
    second = load_splits("folder", root, SIZE, {}, 0)
    n = lambda ds: len(ds.train) + len(ds.val) + len(ds.test)  # noqa: E731
    assert n(first) == sum(counts.values())
    assert n(second) == n(first) + 1


def test_decode_image_modes_and_sizes(tmp_path: Path) -> None:
    cases = [("a.png", (13, 29), "L"), ("b.jpg", (64, 48), "RGB"), ("c.png", (5, 5), "RGBA")]
    for name, shape, mode in cases:
        path = tmp_path / name
        _write_image(path, shape, mode, 150)
        out = records_mod.decode_image(path, SIZE)
        assert out.shape == (SIZE, SIZE) and out.dtype == np.uint8
        assert abs(float(out.mean()) - 150) < 15


def test_sixteen_bit_png_keeps_its_contrast(tmp_path, monkeypatch) -> None:
    """16-bit radiographs are scaled to 8 bits, not clipped to white."""
    import numpy as np
    from PIL import Image

    from medpeft_ray.data.records import decode_image

    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    path = tmp_path / "xray16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    pixels = decode_image(path, 32)
    assert pixels.min() < 10 and pixels.max() > 245
    assert 100 < pixels.mean() < 155  # a ramp, not a white image


def test_hidden_and_empty_folders_are_not_classes(tmp_path, monkeypatch) -> None:
    import numpy as np
    from PIL import Image

    from medpeft_ray.data import load_splits

    root = tmp_path / "ds"
    for cls in ("a", "b", ".ipynb_checkpoints", "__MACOSX"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(root / cls / f"{i}.png")
    (root / "empty").mkdir()
    splits = load_splits("folder", root, 8, {}, 0)
    assert splits.class_names == ("a", "b")


def test_split_fractions_must_leave_a_train_split() -> None:
    import pytest
    from pydantic import ValidationError

    from medpeft_ray.data.records import SplitOptions as FolderOptions

    with pytest.raises(ValidationError, match="must be < 1"):
        FolderOptions(val_fraction=0.6, test_fraction=0.6)


def test_workers_that_ask_at_once_decode_the_dataset_once_and_share_one_map(cache_dir: Path) -> None:
    import threading

    builds: list[int] = []
    ready = threading.Barrier(4)

    def build() -> DatasetSplits:
        builds.append(1)
        return _toy_splits(0)

    results: list[DatasetSplits] = []

    def worker() -> None:
        ready.wait()  # all four miss the cache together; the entry's lock lets one build
        results.append(cached_splits({"dataset": "toy", "seed": 0}, build))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert len(results) == 4 and len(_entries(cache_dir)) == 1
    for splits in results:  # the builder too reads the entry's map: no worker keeps a private copy
        assert isinstance(splits.train.images, np.memmap)
        assert np.array_equal(splits.train.images, _toy_splits(0).train.images)


def test_a_named_cache_folder_travels_in_the_key_and_does_not_change_the_entry(
        cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medpeft_ray.data import dataset_key
    from medpeft_ray.data.cache import content_key

    opts = {"num_patients": 20, "images_per_patient": 1, "num_classes": 2}
    named = dataset_key("synthetic", None, SIZE, opts, 0)
    assert named["cache_dir"] == str(cache_dir.resolve())
    monkeypatch.delenv("MEDPEFT_CACHE")
    assert "cache_dir" not in dataset_key("synthetic", None, SIZE, opts, 0)
    assert content_key(named) == content_key(dataset_key("synthetic", None, SIZE, opts, 0))
    # a worker whose own environment names no folder (another node) decodes into the named one
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    load_splits("synthetic", None, SIZE, opts, 0, key=named)
    assert len(_entries(cache_dir)) == 1 and not (tmp_path / "home").exists()


def test_a_cache_folder_that_cannot_be_written_decodes_without_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("MEDPEFT_CACHE", str(blocked / "cache"))
    build = CountingBuilder()
    splits = cached_splits({"dataset": "toy"}, build)
    assert build.calls == 1 and np.array_equal(splits.train.images, _toy_splits(0).train.images)
