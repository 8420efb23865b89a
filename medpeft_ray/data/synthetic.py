"""A deterministic synthetic chest-radiograph-like dataset that needs no files.

Every image shows a body silhouette, two dark lung fields, a spine, ribs and a heart shadow, with
per-patient anatomy (size, position, exposure) and noise. Each finding class draws its own
label-dependent structure, loosely after the radiographic sign it is named for, so a small ViT
can learn the labels from pixels in a few CPU minutes while the task stays multi-label and noisy.

Every image also has a caption (:func:`caption_of`), an impression-style line written from its
labels alone, so the same data serves text-to-image fine-tuning.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field

from medpeft_ray.data.base import DatasetSplits, LabeledImages
from medpeft_ray.data.registry import DatasetOptions, register_dataset

#: Finding classes in the order they are labelled; ``num_classes`` takes a prefix of this list.
FINDINGS = ("Cardiomegaly", "Effusion", "Nodule", "Pneumothorax", "Consolidation", "Mass")
#: The impression sentence of each finding, after the sign :func:`render_image` draws for it.
IMPRESSIONS = {
    "Cardiomegaly": "Enlarged cardiac silhouette.",
    "Effusion": "Pleural effusion.",
    "Nodule": "Multiple small pulmonary nodules.",
    "Pneumothorax": "Apical pneumothorax.",
    "Consolidation": "Focal consolidation.",
    "Mass": "Pulmonary mass.",
}
#: The caption of an image without any finding.
NO_FINDING_CAPTION = "No acute cardiopulmonary process."


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float, soft: float = 0.04) -> np.ndarray:
    """A soft-edged filled ellipse in [0, 1] on the normalised grid."""
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    return np.clip((1.0 - r) / soft + 0.5, 0.0, 1.0)


def _blob(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, sigma: float) -> np.ndarray:
    return np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)))


def render_image(size: int, anatomy: np.ndarray, findings: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draws one radiograph-like image (uint8, size x size).

    Args:
        size: image side in pixels.
        anatomy: per-patient parameters in [0, 1): body scale, lung size, heart size, exposure, tilt.
        findings: 0/1 per class in ``FINDINGS`` order (shorter arrays mean fewer classes).
        rng: per-image generator (placement of findings, noise).
    """
    lin = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    yy, xx = np.meshgrid(lin, lin, indexing="ij")
    body_scale, lung_size, heart_size, exposure, tilt = anatomy
    tilt = (tilt - 0.5) * 0.08
    xx = xx + tilt * yy  # a slightly rotated patient

    # Soft tissue, then air-filled lungs (dark), bone (bright): intensities in [0, 1].
    img = 0.15 + 0.45 * _ellipse(yy, xx, 0.05, 0.0, 0.95, 0.78 + 0.12 * body_scale, soft=0.15)
    ly, lry, lrx = -0.05, 0.55 + 0.12 * lung_size, 0.25 + 0.05 * lung_size
    lungs = [(ly, -0.36, lry, lrx), (ly, 0.36, lry, lrx)]
    lung_mask = np.zeros_like(img)
    for cy, cx, ry, rx in lungs:
        lung_mask = np.maximum(lung_mask, _ellipse(yy, xx, cy, cx, ry, rx, soft=0.1))
    img = img - 0.3 * lung_mask
    ribs = 0.5 + 0.5 * np.sin((yy + 0.15 * xx**2) * 22.0)
    img = img + 0.06 * ribs * lung_mask
    img = img + 0.25 * np.exp(-(xx**2) / 0.004) * (yy > -0.8)  # spine

    has = lambda k: k < len(findings) and findings[k] > 0  # noqa: E731
    heart_rx = 0.2 + 0.04 * heart_size
    if has(0):  # Cardiomegaly: a heart shadow much wider than the patient's normal one
        heart_rx *= 1.7
    img = img + 0.28 * _ellipse(yy, xx, 0.3, -0.08, 0.24, heart_rx, soft=0.2)

    side = rng.choice([-0.36, 0.36])
    if has(1):  # Effusion: fluid fills the lower part of one lung with a meniscus
        meniscus = ly + lry * (0.35 - 0.15 * rng.random()) - 0.15 * (xx - side) ** 2
        img = img + 0.28 * (yy > meniscus) * _ellipse(yy, xx, ly, side, lry, lrx, soft=0.1)
    if has(2):  # Nodule: a few small dense round spots inside the lungs
        for _ in range(rng.integers(2, 4)):
            cx = rng.choice([-0.36, 0.36]) + rng.uniform(-0.12, 0.12)
            img = img + 0.35 * _blob(yy, xx, rng.uniform(-0.4, 0.25), cx, 0.045)
    if has(3):  # Pneumothorax: apical air without lung markings along the outer edge of one lung
        rim = _ellipse(yy, xx, ly - 0.25, side * 1.15, lry * 0.6, lrx * 0.55, soft=0.1)
        img = img - 0.22 * rim - 0.06 * ribs * rim
    if has(4):  # Consolidation: a broad, ill-defined opacity
        img = img + 0.3 * _blob(yy, xx, rng.uniform(-0.3, 0.2), -side, 0.18) * lung_mask
    if has(5):  # Mass: one large, well-defined dense lesion
        img = img + 0.4 * _ellipse(yy, xx, rng.uniform(-0.35, 0.1), side * 0.8, 0.14, 0.12, soft=0.15)

    img = img * (0.8 + 0.4 * exposure)
    img = img + rng.normal(0.0, 0.05, img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def caption_of(findings_row: np.ndarray, class_names: tuple[str, ...] | list[str]) -> str:
    """The caption of one image: one sentence per positive finding, in ``class_names`` order.

    Sentences come from :data:`IMPRESSIONS` (a class not named there gives ``"<name>."``) and are
    joined with spaces; an image without a positive (0 or NaN everywhere) gives
    :data:`NO_FINDING_CAPTION`. E.g. Cardiomegaly and Nodule positive:
    ``"Enlarged cardiac silhouette. Multiple small pulmonary nodules."``
    """
    row = np.asarray(findings_row, dtype=np.float64).reshape(-1)
    if len(row) != len(class_names):
        raise ValueError(f"{len(row)} findings for {len(class_names)} class names")
    sentences = [IMPRESSIONS.get(name, f"{name}.") for name, value in zip(class_names, row) if value > 0]
    return " ".join(sentences) if sentences else NO_FINDING_CAPTION


def make_synthetic(
    image_size: int = 64,
    num_classes: int = 5,
    num_patients: int = 600,
    images_per_patient: int = 2,
    prevalence: float = 0.3,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> DatasetSplits:
    """Builds the synthetic dataset; the same arguments give the same bytes on every machine.

    Splits are patient-disjoint: every image of a patient lands in one split. Each image has a
    caption written from its labels (:func:`caption_of`; no random draw, so images and labels are
    what they were before captions existed).
    """
    if not 1 <= num_classes <= len(FINDINGS):
        raise ValueError(f"num_classes must be in 1..{len(FINDINGS)}, got {num_classes}")
    rng = np.random.default_rng(seed)
    anatomy = rng.random((num_patients, 5), dtype=np.float32)
    n = num_patients * images_per_patient
    groups = np.repeat(np.arange(num_patients), images_per_patient)
    # Findings are correlated within a patient (follow-up images mostly keep them).
    patient_findings = rng.random((num_patients, num_classes)) < prevalence
    flips = rng.random((n, num_classes)) < 0.1
    labels = (patient_findings[groups] ^ flips).astype(np.float32)
    image_seeds = rng.integers(0, 2**63 - 1, size=n)
    images = np.stack(
        [render_image(image_size, anatomy[g], labels[i], np.random.default_rng(image_seeds[i])) for i, g in enumerate(groups)]
    )

    order = rng.permutation(num_patients)
    n_val, n_test = int(round(val_fraction * num_patients)), int(round(test_fraction * num_patients))
    split_of_patient = np.empty(num_patients, dtype=np.int8)
    split_of_patient[order[:n_val]] = 1
    split_of_patient[order[n_val : n_val + n_test]] = 2
    split_of_patient[order[n_val + n_test :]] = 0
    split_of_image = split_of_patient[groups]
    # a subgroup attribute, so that subgroup metrics run on the default data: read off the
    # patient's drawn body scale (no extra draw, so the images and labels stay as they were)
    sex = np.where(anatomy[groups, 0] > 0.5, "M", "F")
    class_names = FINDINGS[:num_classes]
    captions = np.empty(n, dtype=object)
    captions[:] = [caption_of(row, class_names) for row in labels]

    def take(split_id: int) -> LabeledImages:
        index = np.flatnonzero(split_of_image == split_id)
        return LabeledImages(images[index], labels[index], groups[index], {"sex": sex[index]}, captions[index])

    return DatasetSplits(take(0), take(1), take(2), class_names, "multilabel")


class SyntheticOptions(DatasetOptions):
    num_classes: int = Field(5, ge=1, le=len(FINDINGS), description="findings to label (a prefix of FINDINGS)")
    num_patients: int = Field(600, ge=10, description="patients; each contributes images_per_patient images")
    images_per_patient: int = Field(2, ge=1)
    prevalence: float = Field(0.3, gt=0, lt=1, description="probability of each finding per patient")


@register_dataset("synthetic", options=SyntheticOptions, needs_root=False,
                  classes=lambda options: FINDINGS[: options.num_classes])
def load_synthetic(root: Path | None, image_size: int, options: SyntheticOptions, seed: int) -> DatasetSplits:
    return make_synthetic(image_size=image_size, seed=seed, **options.model_dump())
