"""Tests for the synthetic dataset (medpeft_ray/data/synthetic.py) and the split containers (data/base.py)."""

from __future__ import annotations

import numpy as np
import pytest

from medpeft_ray.data.base import DatasetSplits, LabeledImages
from medpeft_ray.data.synthetic import FINDINGS, SyntheticOptions, load_synthetic, make_synthetic, render_image

SIZE = 32
SMALL = dict(image_size=SIZE, num_patients=40, images_per_patient=2, num_classes=4)


@pytest.fixture(scope="module")
def small() -> DatasetSplits:
    return make_synthetic(seed=3, **SMALL)


def _splits(ds: DatasetSplits) -> list[LabeledImages]:
    return [ds.train, ds.val, ds.test]


# ----------------------------------------------------------------------------- determinism


def test_same_arguments_give_identical_bytes(small: DatasetSplits) -> None:
    again = make_synthetic(seed=3, **SMALL)
    for a, b in zip(_splits(small), _splits(again)):
        assert a.images.tobytes() == b.images.tobytes()
        assert a.labels.tobytes() == b.labels.tobytes()
        assert np.array_equal(a.groups, b.groups)
    assert again.class_names == small.class_names


def test_different_seed_gives_different_images(small: DatasetSplits) -> None:
    other = make_synthetic(seed=4, **SMALL)
    all_a = np.concatenate([s.images for s in _splits(small)])
    all_b = np.concatenate([s.images for s in _splits(other)])
    assert all_a.shape == all_b.shape
    assert not np.array_equal(all_a, all_b)
    # not only different, but different in most images (not a one-pixel fluke)
    differing = (all_a != all_b).reshape(len(all_a), -1).any(axis=1)
    assert differing.mean() > 0.9


def test_load_synthetic_matches_make_synthetic() -> None:
    opts = SyntheticOptions(num_classes=3, num_patients=30, images_per_patient=1, prevalence=0.4)
    via_registry = load_synthetic(None, SIZE, opts, 7)
    direct = make_synthetic(image_size=SIZE, num_classes=3, num_patients=30, images_per_patient=1, prevalence=0.4, seed=7)
    for a, b in zip(_splits(via_registry), _splits(direct)):
        assert np.array_equal(a.images, b.images)
        assert np.array_equal(a.labels, b.labels)
        assert np.array_equal(a.groups, b.groups)
    assert via_registry.class_names == FINDINGS[:3]


# ----------------------------------------------------------------------------- structure


def test_splits_are_patient_disjoint(small: DatasetSplits) -> None:
    sets = [set(np.unique(s.groups).tolist()) for s in _splits(small)]
    assert not sets[0] & sets[1]
    assert not sets[0] & sets[2]
    assert not sets[1] & sets[2]
    # every patient appears somewhere, with all of its images in that one split
    assert sets[0] | sets[1] | sets[2] == set(range(SMALL["num_patients"]))
    for s in _splits(small):
        _, counts = np.unique(s.groups, return_counts=True)
        assert (counts == SMALL["images_per_patient"]).all()


def test_shapes_dtypes_and_sizes(small: DatasetSplits) -> None:
    k = SMALL["num_classes"]
    total = 0
    for s in _splits(small):
        n = len(s)
        total += n
        assert s.images.dtype == np.uint8
        assert s.images.shape == (n, SIZE, SIZE)
        assert s.labels.dtype == np.float32
        assert s.labels.shape == (n, k)
        assert set(np.unique(s.labels).tolist()) <= {0.0, 1.0}
        assert s.groups.shape == (n,)
    assert total == SMALL["num_patients"] * SMALL["images_per_patient"]
    assert small.class_names == FINDINGS[:k]
    assert small.num_classes == k
    assert small.task == "multilabel"


def test_split_fractions_follow_arguments() -> None:
    ds = make_synthetic(image_size=SIZE, num_patients=40, images_per_patient=1, val_fraction=0.25, test_fraction=0.1, seed=0)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (26, 10, 4)


def test_images_are_not_blank(small: DatasetSplits) -> None:
    imgs = small.train.images.astype(np.float64)
    # each image has real contrast (body, lungs, spine), not a constant
    assert (imgs.reshape(len(imgs), -1).std(axis=1) > 10).all()


@pytest.mark.parametrize("num_classes", [0, -1, len(FINDINGS) + 1])
def test_num_classes_out_of_range_raises(num_classes: int) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic(image_size=SIZE, num_classes=num_classes, num_patients=10)


def test_num_classes_out_of_range_rejected_by_options() -> None:
    with pytest.raises(ValueError):  # pydantic.ValidationError is a ValueError
        SyntheticOptions(num_classes=len(FINDINGS) + 1)


def test_all_findings_usable() -> None:
    ds = make_synthetic(image_size=SIZE, num_classes=len(FINDINGS), num_patients=20, images_per_patient=1, seed=0)
    assert ds.class_names == FINDINGS
    assert ds.train.labels.shape[1] == len(FINDINGS)


# ----------------------------------------------------------------------------- labels are visible in pixels

R = 64  # render size for the pixel checks (cheap: one image at a time)


def _rows_cols(lo_y: float, hi_y: float, lo_x: float, hi_x: float, size: int = R) -> tuple[slice, slice]:
    """Pixel slices of a box given in the normalised [-1, 1] grid render_image uses (y down, x right)."""
    lin = np.linspace(-1.0, 1.0, size)
    rows = np.flatnonzero((lin >= lo_y) & (lin <= hi_y))
    cols = np.flatnonzero((lin >= lo_x) & (lin <= hi_x))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _anatomies() -> list[np.ndarray]:
    rng = np.random.default_rng(123)
    return [rng.random(5, dtype=np.float32) for _ in range(4)] + [
        np.full(5, 0.5, np.float32),
        np.zeros(5, np.float32),
    ]


@pytest.mark.parametrize("case", range(6))
def test_cardiomegaly_widens_bright_heart_shadow(case: int) -> None:
    anatomy = _anatomies()[case]
    off = render_image(R, anatomy, np.array([0, 0, 0, 0, 0], np.float32), np.random.default_rng(case))
    on = render_image(R, anatomy, np.array([1, 0, 0, 0, 0], np.float32), np.random.default_rng(case))
    assert off.shape == on.shape == (R, R) and on.dtype == np.uint8
    # Cardiomegaly draws no random numbers, so both images share their noise: only the heart differs,
    # and a wider heart only adds brightness.
    assert (on.astype(np.int16) >= off.astype(np.int16)).all()
    # heart centred at (y=0.3, x=-0.08); the normal heart is at most ~0.24 wide, an enlarged one ~0.34+.
    # Compare the flanks of the heart (centre-lower region, just outside the normal outline).
    left = _rows_cols(0.2, 0.4, -0.45, -0.36)
    right = _rows_cols(0.2, 0.4, 0.2, 0.28)
    for box in (left, right):
        assert on[box].mean() > off[box].mean() + 15
    # far from the heart (upper lungs) nothing changes
    upper = _rows_cols(-0.5, -0.3, -0.5, -0.2)
    assert np.array_equal(on[upper], off[upper])


@pytest.mark.parametrize("case", range(6))
def test_effusion_brightens_lower_lung(case: int) -> None:
    anatomy = _anatomies()[case]
    off = render_image(R, anatomy, np.array([0, 0], np.float32), np.random.default_rng(case))
    on = render_image(R, anatomy, np.array([0, 1], np.float32), np.random.default_rng(case))
    # the effusion fills the lower part of one lung (centre x = +-0.36, lower half y ~ 0.3..0.5)
    lower_left = _rows_cols(0.3, 0.5, -0.45, -0.27)
    lower_right = _rows_cols(0.3, 0.5, 0.27, 0.45)
    gain = max(on[b].mean() - off[b].mean() for b in (lower_left, lower_right))
    assert gain > 25
    # the upper lungs stay as they were (only the noise differs)
    for upper in (_rows_cols(-0.5, -0.3, -0.45, -0.27), _rows_cols(-0.5, -0.3, 0.27, 0.45)):
        assert abs(on[upper].mean() - off[upper].mean()) < 6


def test_findings_beyond_array_length_are_absent() -> None:
    anatomy = np.full(5, 0.5, np.float32)
    short = render_image(R, anatomy, np.array([1.0], np.float32), np.random.default_rng(0))
    padded = render_image(R, anatomy, np.array([1, 0, 0, 0, 0, 0], np.float32), np.random.default_rng(0))
    assert np.array_equal(short, padded)


def test_cardiomegaly_label_visible_across_dataset() -> None:
    ds = make_synthetic(image_size=SIZE, num_classes=2, num_patients=60, images_per_patient=1, prevalence=0.5, seed=1)
    images = np.concatenate([s.images for s in _splits(ds)]).astype(np.float64)
    labels = np.concatenate([s.labels for s in _splits(ds)])
    flanks = _rows_cols(0.2, 0.4, -0.45, -0.36, size=SIZE)
    region = images[:, flanks[0], flanks[1]].reshape(len(images), -1).mean(axis=1)
    pos, neg = region[labels[:, 0] == 1], region[labels[:, 0] == 0]
    assert len(pos) >= 5 and len(neg) >= 5
    assert pos.mean() > neg.mean() + 10


# ----------------------------------------------------------------------------- base containers


def _hand_split(labels: list[list[int]]) -> LabeledImages:
    lab = np.asarray(labels, dtype=np.float32)
    n = len(lab)
    return LabeledImages(np.zeros((n, 4, 4), np.uint8), lab, np.arange(n))


def test_summary_counts_hand_made() -> None:
    ds = DatasetSplits(
        train=_hand_split([[1, 0, 1], [1, 1, 0], [0, 0, 0], [1, 0, 0]]),
        val=_hand_split([[0, 1, 0], [0, 1, 1]]),
        test=_hand_split([[0, 0, 0]]),
        class_names=("a", "b", "c"),
        task="multilabel",
    )
    assert ds.summary() == {
        "train": {"images": 4, "positives": {"a": 3, "b": 1, "c": 1}},
        "val": {"images": 2, "positives": {"a": 0, "b": 2, "c": 1}},
        "test": {"images": 1, "positives": {"a": 0, "b": 0, "c": 0}},
    }
    assert ds.num_classes == 3


def test_summary_counts_synthetic(small: DatasetSplits) -> None:
    summary = small.summary()
    assert set(summary) == {"train", "val", "test"}
    for name in ("train", "val", "test"):
        split = getattr(small, name)
        assert summary[name]["images"] == len(split)
        for k, cls in enumerate(small.class_names):
            assert summary[name]["positives"][cls] == int(split.labels[:, k].sum())
            assert isinstance(summary[name]["positives"][cls], int)


def test_labeled_images_validation() -> None:
    with pytest.raises(ValueError, match="uint8"):
        LabeledImages(np.zeros((2, 4, 4), np.float32), np.zeros((2, 1), np.float32), np.arange(2))
    with pytest.raises(ValueError, match="uint8"):
        LabeledImages(np.zeros((2, 4), np.uint8), np.zeros((2, 1), np.float32), np.arange(2))
    with pytest.raises(ValueError, match="differ in length"):
        LabeledImages(np.zeros((2, 4, 4), np.uint8), np.zeros((3, 1), np.float32), np.arange(2))
    with pytest.raises(ValueError, match="differ in length"):
        LabeledImages(np.zeros((2, 4, 4), np.uint8), np.zeros((2, 1), np.float32), np.arange(1))


def test_subset_and_positives_per_class() -> None:
    split = _hand_split([[1, 0], [0, 1], [1, 1], [0, 0]])
    sub = split.subset(np.array([0, 2]))
    assert len(sub) == 2
    assert np.array_equal(sub.groups, [0, 2])
    assert sub.positives_per_class().tolist() == [2, 1]
    assert split.positives_per_class().dtype == np.int64
