"""Tests for label-ratio subsets (medpeft_ray/data/splits.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medpeft_ray.data.base import LabeledImages
from medpeft_ray.data.splits import label_ratio_index

SEEDS = list(range(8))


def make_split(
    num_images: int = 300, num_groups: int = 80, num_classes: int = 4, prevalence: float = 0.2, seed: int = 0
) -> LabeledImages:
    """A hand-made split whose groups are interleaved (a group's images are not contiguous)."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, num_groups, size=num_images)
    labels = (rng.random((num_images, num_classes)) < prevalence).astype(np.float32)
    return LabeledImages(np.zeros((num_images, 2, 2), np.uint8), labels, groups)


def rare_class_split(seed: int = 0) -> tuple[LabeledImages, int]:
    """A split where class 2 has a single positive image, and class 3 has none; returns it and that image."""
    split = make_split(num_images=200, num_groups=100, num_classes=4, prevalence=0.25, seed=seed)
    labels = split.labels.copy()
    labels[:, 2] = 0.0
    labels[:, 3] = 0.0
    rare = int(np.random.default_rng(seed + 1000).integers(0, len(labels)))
    labels[rare, 2] = 1.0
    return LabeledImages(split.images, labels, split.groups), rare


def selected_groups(split: LabeledImages, index: np.ndarray) -> set:
    return set(np.unique(split.groups[index]).tolist())


@pytest.fixture(scope="module")
def split() -> LabeledImages:
    return make_split()


def test_deterministic_for_a_seed(split: LabeledImages) -> None:
    a = label_ratio_index(split, 0.2, seed=5)
    b = label_ratio_index(split, 0.2, seed=5)
    assert np.array_equal(a, b)


def test_different_seeds_give_different_subsets(split: LabeledImages) -> None:
    subsets = {tuple(label_ratio_index(split, 0.2, seed=s).tolist()) for s in SEEDS}
    assert len(subsets) > 1


def test_result_is_sorted_unique_valid_index(split: LabeledImages) -> None:
    idx = label_ratio_index(split, 0.3, seed=1)
    assert np.issubdtype(idx.dtype, np.integer)
    assert np.array_equal(idx, np.unique(idx))
    assert idx.min() >= 0 and idx.max() < len(split)
    assert 0 < len(idx) < len(split)


def test_ratio_one_returns_all(split: LabeledImages) -> None:
    assert np.array_equal(label_ratio_index(split, 1.0, seed=0), np.arange(len(split)))
    assert np.array_equal(label_ratio_index(split, 1.0, seed=9), np.arange(len(split)))


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, 1.0000001, float("nan")])
def test_invalid_ratio_raises(split: LabeledImages, ratio: float) -> None:
    with pytest.raises(ValueError, match="label ratio"):
        label_ratio_index(split, ratio, seed=0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.37, 0.9])
def test_group_disjoint(split: LabeledImages, seed: int, ratio: float) -> None:
    idx = label_ratio_index(split, ratio, seed)
    chosen = np.zeros(len(split), dtype=bool)
    chosen[idx] = True
    for g in np.unique(split.groups):
        members = chosen[split.groups == g]
        assert members.all() or not members.any(), f"group {g} is split"


@pytest.mark.parametrize("seed", SEEDS)
def test_nested(seed: int) -> None:
    split = make_split(seed=seed)
    ratios = [0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0]
    subsets = [set(label_ratio_index(split, r, seed).tolist()) for r in ratios]
    for smaller, larger in zip(subsets, subsets[1:]):
        assert smaller <= larger
    assert len(subsets[0]) < len(subsets[-2])


@pytest.mark.parametrize("seed", SEEDS)
def test_nested_with_rare_class(seed: int) -> None:
    split, _ = rare_class_split(seed)
    ratios = [0.01, 0.02, 0.1, 0.3, 0.5]
    subsets = [set(label_ratio_index(split, r, seed).tolist()) for r in ratios]
    for smaller, larger in zip(subsets, subsets[1:]):
        assert smaller <= larger


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ratio", [0.01, 0.05, 0.2])
def test_every_present_class_keeps_a_positive(seed: int, ratio: float) -> None:
    split = make_split(num_classes=5, prevalence=0.03, seed=seed)
    present = split.labels.sum(axis=0) > 0
    assert present.any()
    idx = label_ratio_index(split, ratio, seed)
    kept = split.labels[idx].sum(axis=0) > 0
    assert (kept[present]).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_single_positive_rare_class_is_kept(seed: int) -> None:
    split, rare = rare_class_split(seed)
    idx = label_ratio_index(split, 0.01, seed)
    assert rare in idx
    # the whole group of the rare image comes along
    rare_group = split.groups[rare]
    assert set(np.flatnonzero(split.groups == rare_group).tolist()) <= set(idx.tolist())
    # class 3 has no positive anywhere: nothing to keep, and no error
    assert split.labels[idx, 3].sum() == 0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.33, 0.5, 0.99])
def test_size_is_prefix_plus_at_most_one_group_per_class(seed: int, ratio: float) -> None:
    split = make_split(num_classes=4, prevalence=0.05, seed=seed)
    num_groups = len(np.unique(split.groups))
    base = max(1, math.ceil(ratio * num_groups))
    chosen = selected_groups(split, label_ratio_index(split, ratio, seed))
    assert base <= len(chosen) <= base + split.labels.shape[1]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.5])
def test_size_exact_without_positives(seed: int, ratio: float) -> None:
    split = make_split(seed=seed)
    empty = LabeledImages(split.images, np.zeros_like(split.labels), split.groups)
    num_groups = len(np.unique(split.groups))
    chosen = selected_groups(empty, label_ratio_index(empty, ratio, seed))
    assert len(chosen) == max(1, math.ceil(ratio * num_groups))


def test_string_group_ids_and_multi_image_groups() -> None:
    # patients with 3 images each, ids as strings, interleaved order
    patients = [f"p{i:03d}" for i in range(30)]
    groups = np.array(patients * 3)
    labels = np.zeros((len(groups), 2), np.float32)
    labels[groups == "p007", 1] = 1.0  # class 1 only in patient p007
    labels[::4, 0] = 1.0
    split = LabeledImages(np.zeros((len(groups), 2, 2), np.uint8), labels, groups)
    for seed in SEEDS:
        idx = label_ratio_index(split, 0.1, seed)
        chosen = selected_groups(split, idx)
        assert "p007" in chosen
        # whole patients only: 3 images per chosen patient
        assert len(idx) == 3 * len(chosen)
        assert math.ceil(0.1 * 30) <= len(chosen) <= math.ceil(0.1 * 30) + 2


def test_tiny_ratio_keeps_at_least_one_group(split: LabeledImages) -> None:
    empty = LabeledImages(split.images, np.zeros_like(split.labels), split.groups)
    idx = label_ratio_index(empty, 1e-9, seed=0)
    assert len(selected_groups(empty, idx)) == 1
    assert len(idx) >= 1
