"""FID for the diffusion setting: the stand-in extractor, a weights file through torch-fidelity's
Inception-v3 (random weights here, nothing is downloaded), the exact low-rank distance, and one-line
refusals of unusable weights files."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medpeft_ray.errors import CheckpointError
from medpeft_ray.train import fid as fid_module
from medpeft_ray.train.fid import FidScorer, check_fid_weights, inception_skeleton


def images(seed: int, n: int = 16, size: int = 32, brightness: int = 0, noise: float = 0.0) -> np.ndarray:
    """Smooth grey blobs, (N, H, W) uint8: a "distribution" of images parametrised by brightness and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
        blob = 60 + 120 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        blob = blob + brightness + noise * rng.standard_normal(blob.shape)
        out.append(np.clip(blob, 0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope="module")
def stand_in() -> FidScorer:
    scorer = FidScorer(None)
    scorer.set_real(images(0))
    return scorer


# ------------------------------------------------------------------------------------------------
# Stand-in extractor
# ------------------------------------------------------------------------------------------------


def test_stand_in_is_labelled_and_warns_once(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fid_module, "_stand_in_warned", False)
    with caplog.at_level(logging.WARNING, logger="medpeft_ray.train.fid"):
        first = FidScorer(None)
        FidScorer(None, stand_in_dim=32)
    warnings = [r.getMessage() for r in caplog.records if "stand-in" in r.getMessage()]
    assert warnings == [fid_module.STAND_IN_WARNING]
    assert first.stand_in and first.dim == 64
    assert first.features == "stand-in random-conv 64 (not comparable with published FID)"


def test_a_set_against_itself_is_zero(stand_in: FidScorer) -> None:
    assert stand_in.score(images(0)) == pytest.approx(0.0, abs=1e-6)


def test_another_distribution_scores_much_higher(stand_in: FidScorer) -> None:
    same = stand_in.score(images(1))  # a second draw of the real distribution
    brighter = stand_in.score(images(1, brightness=60))
    noisy = stand_in.score(images(1, noise=40.0))
    assert math.isfinite(same) and same > 0
    assert brighter > 5 * same
    assert noisy > 5 * same


def test_deterministic_across_instances(stand_in: FidScorer) -> None:
    other = FidScorer(None)
    other.set_real(images(0))
    fake = images(2, brightness=20)
    assert torch.equal(other.extract(fake), stand_in.extract(fake))
    assert other.score(fake) == stand_in.score(fake)


def test_real_set_is_kept_and_scores_do_not_mix(stand_in: FidScorer) -> None:
    a, b = images(3), images(4, noise=30.0)
    first = stand_in.score(a)
    assert stand_in.score(a) == first
    stand_in.score(b)
    assert stand_in.score(a) == first
    assert stand_in.real_count == 16


def test_image_layouts_give_the_same_features(stand_in: FidScorer) -> None:
    grey = images(5, n=4)
    rgb_chw = np.repeat(grey[:, None], 3, axis=1)
    rgb_hwc = np.ascontiguousarray(rgb_chw.transpose(0, 2, 3, 1))
    reference = stand_in.extract(grey)
    for layout in (rgb_chw, rgb_hwc, torch.from_numpy(rgb_chw), grey[:, None], list(grey)):
        assert torch.equal(stand_in.extract(layout), reference)
    with pytest.raises(TypeError, match="uint8"):
        stand_in.extract(grey.astype(np.float32))
    with pytest.raises(ValueError, match="at least 2 images"):
        stand_in.score(grey[:1])
    with pytest.raises(RuntimeError, match="before set_real"):
        FidScorer(None).score(grey)


def test_small_sets_fewer_than_feature_dims_are_finite() -> None:
    scorer = FidScorer(None, stand_in_dim=128)
    scorer.set_real(images(0, n=8))
    assert scorer.score(images(0, n=8)) == pytest.approx(0.0, abs=1e-6)
    value = scorer.score(images(1, n=8))
    assert math.isfinite(value) and value > 0


@pytest.mark.parametrize("n_real, n_fake", [(12, 10), (150, 100)])  # fewer and more images than the 64 dims
def test_distance_matches_the_reference_formula(stand_in: FidScorer, n_real: int, n_fake: int) -> None:
    """The low-rank distance equals pytorch-fid's (scipy sqrtm) and torchmetrics' computations."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    real = stand_in.extract(images(10, n=n_real)).numpy()
    fake = stand_in.extract(images(11, n=n_fake, brightness=15)).numpy()
    ours = fid_module._frechet(fid_module._Gaussian.of(torch.from_numpy(real)),
                               fid_module._Gaussian.of(torch.from_numpy(fake)))
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    root = scipy_linalg.sqrtm(s1 @ s2).real
    reference = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))
    assert ours == pytest.approx(reference, rel=1e-5, abs=1e-6)

    torchmetrics_fid = pytest.importorskip("torchmetrics.image.fid")
    # a copy: the metric owns (and may convert) its feature module; its statistics are float64 anyway
    metric = torchmetrics_fid.FrechetInceptionDistance(feature=copy.deepcopy(stand_in.extractor))
    metric.update(torch.from_numpy(np.repeat(images(10, n=n_real)[:, None], 3, axis=1)), real=True)
    metric.update(torch.from_numpy(np.repeat(images(11, n=n_fake, brightness=15)[:, None], 3, axis=1)), real=False)
    assert ours == pytest.approx(float(metric.compute()), rel=1e-3)


# ------------------------------------------------------------------------------------------------
# A weights file: torch-fidelity's Inception-v3 with random weights
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torch-fidelity's FID Inception-v3 with random weights, its BatchNorm statistics fitted to a few
    images (so that the features are not vanishingly small), saved as a plain state dict."""
    torch.manual_seed(0)
    model = inception_skeleton("cpu")
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative: one batch sets the statistics
            module.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(np.repeat(images(20, n=4, size=64)[:, None], 3, axis=1)))
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-random.pth"
    torch.save(state, path)
    return path


@pytest.mark.slow  # a whole Inception-v3 on CPU: seconds
def test_inception_weights_give_2048_features_and_a_finite_score(inception_file: Path) -> None:
    scorer = FidScorer(inception_file)
    assert not scorer.stand_in
    assert scorer.features == f"inception-v3 2048 ({inception_file.name})"
    real, fake = images(0, n=6), images(1, n=6, brightness=60)
    scorer.set_real(real)
    features = scorer.extract(fake)
    assert features.shape == (6, 2048) and bool(features.abs().max() > 1e-3)
    value = scorer.score(fake)
    assert math.isfinite(value) and value > 0
    assert scorer.score(real) == pytest.approx(0.0, abs=1e-6 * value)


def test_check_accepts_inception_weights(inception_file: Path) -> None:
    check_fid_weights(inception_file)


# ------------------------------------------------------------------------------------------------
# Unusable weights files: one line naming the file
# ------------------------------------------------------------------------------------------------


def refusal(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        check_fid_weights(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and message.startswith("search.fid_weights: ")
    assert info.value.exit_code == 2
    return message


def test_missing_file(tmp_path: Path) -> None:
    assert refusal(tmp_path / "pt_inception.pth").endswith("pt_inception.pth: file not found")


def test_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "pt_inception.pth"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    assert "is not an Inception-v3 FID weights file (torch.load cannot read it" in refusal(path)
    with pytest.raises(CheckpointError):
        FidScorer(path)  # the scorer refuses it the same way, before torch-fidelity opens it


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "pt_inception.pth"
    path.touch()
    assert "(empty file)" in refusal(path)


def test_another_models_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 2)).state_dict(), path)
    message = refusal(path)
    assert "is not an Inception-v3 FID weights file (lacks 472 of its 472 tensors" in message
    assert "4 tensors it does not have, e.g. 0.weight" in message


def test_wrong_shapes_and_torchvision_hint(tmp_path: Path) -> None:
    state = {k: torch.zeros(v) for k, v in fid_module._inception_shapes().items()}
    state["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's ImageNet head
    state["fc.bias"] = torch.zeros(1000)
    path = tmp_path / "inception_v3_google.pth"
    torch.save(state, path)
    message = refusal(path)
    assert "2 of another shape, e.g. fc.weight is 1000x2048 in the file, 1008x2048 in the FID network" in message
    assert "torchvision's ImageNet Inception-v3 is not the FID network" in message


def test_unsafe_pickle_and_nested_state(tmp_path: Path) -> None:
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"weights": torch.zeros(2), "when": Path("/x")}, unsafe)
    assert "refused: it pickles" in refusal(unsafe)
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(1008, 2048)}}, nested)
    assert "its tensors are under 'state_dict'" in refusal(nested)


def test_non_finite_weights(tmp_path: Path) -> None:
    state = {k: torch.zeros(v) for k, v in fid_module._inception_shapes().items()}
    state["fc.bias"][0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(state, path)
    assert "NaN or infinite values in fc.bias" in refusal(path)
