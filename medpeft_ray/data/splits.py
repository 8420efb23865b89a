"""Label-ratio subsets of a training split.

A subset is chosen by patient (group), so a patient's images are all in or all out. Patients are
ranked once by a seeded permutation and every ratio takes a prefix of that ranking, which makes the
subsets nested (the 1% subset lies inside the 10% subset) and identical on every machine.
"""

from __future__ import annotations

import math

import numpy as np

from medpeft_ray.data.base import DatasetSplits, LabeledImages
from medpeft_ray.label_ratios import same_label_ratio


def label_ratio_index(split: LabeledImages, ratio: float, seed: int) -> np.ndarray:
    """Sorted indices of the images in the ``ratio`` subset of ``split``.

    Every class with a positive in ``split`` keeps at least one positive: where the prefix has
    none, the first-ranked patient with one is added. That patient also lies in any larger
    ratio's prefix or is added there too, so nesting holds. Data without classes (captions
    only, labels (N, 0)) takes the prefix alone: patients drawn at random, fixed by ``seed``.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"label ratio must be in (0, 1], got {ratio}")
    if ratio == 1.0:
        return np.arange(len(split))
    groups, group_of_image = np.unique(split.groups, return_inverse=True)
    ranking = np.random.default_rng(seed).permutation(len(groups))
    rank_of_group = np.empty(len(groups), dtype=np.int64)
    rank_of_group[ranking] = np.arange(len(groups))
    n_keep = max(1, math.ceil(ratio * len(groups)))
    keep_group = rank_of_group < n_keep

    # positives of each class per group, to find the best-ranked group holding each class
    # (no columns for data without classes: nothing is added to the prefix)
    group_positives = np.zeros((len(groups), split.labels.shape[1]), dtype=np.int64)
    np.add.at(group_positives, group_of_image, (split.labels > 0).astype(np.int64))
    for c in np.flatnonzero(group_positives.sum(axis=0) > 0):
        if not (group_positives[keep_group, c] > 0).any():
            holders = np.flatnonzero(group_positives[:, c] > 0)
            keep_group[holders[np.argmin(rank_of_group[holders])]] = True
    return np.flatnonzero(keep_group[group_of_image])


def train_subset_index(splits: DatasetSplits, ratio: float, seed: int) -> np.ndarray:
    """The training images of a label ratio: the publisher's subset where one is given, else drawn."""
    for given, index in splits.ratio_subsets.items():
        if same_label_ratio(given, ratio):
            return np.asarray(index)
    return label_ratio_index(splits.train, ratio, seed)
